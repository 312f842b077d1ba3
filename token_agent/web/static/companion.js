// The phone companion for push approval (token_agent/web/companion.py).
//
// Pairing: this browser makes an Ed25519 key pair with WebCrypto, NOT extractable (the
// private key can sign, never be read or exported, even by this script), and keeps it in
// IndexedDB ("token-agent-companion", store "companion", key "this"). It sends the public
// key with the pairing code, and signs the server's pairing challenge.
// Approving: it reads its pending sign-ins as server-sent events from /companion/events,
// each request signed (device id, time, nonce); it shows who is signing in, where and when,
// and asks for the two-digit number shown on the sign-in screen (it never knows it), then
// signs the answer and posts it. Everything is built with textContent: no HTML from data.
"use strict";

(function () {
  const DB_NAME = "token-agent-companion";
  const DB_STORE = "companion";
  const DB_KEY = "this";
  const enc = new TextEncoder();
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------------ bytes and keys

  function concat(parts) {
    const chunks = parts.map((p) => (typeof p === "string" ? enc.encode(p) : new Uint8Array(p)));
    const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
    let at = 0;
    for (const c of chunks) { out.set(c, at); at += c.length; }
    return out;
  }

  function toB64(bytes) {
    let s = "";
    for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
    return btoa(s);
  }

  function fromB64(text) {
    const s = atob(text);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  function nonce() {
    return toB64(crypto.getRandomValues(new Uint8Array(18))).replace(/\+/g, "-").replace(/\//g, "_");
  }

  // push.PAIRING_PREFIX + device id + NUL + challenge
  const pairingBytes = (deviceId, challenge) =>
    concat(["token-agent push pairing v1\0", deviceId, "\0", challenge]);
  // push.answer_bytes(request_id, decision, number)
  const answerBytes = (requestId, decision, number) =>
    concat(["token-agent push v1\0", requestId, "\0", decision, "\0", number === null ? "" : String(number)]);
  // pushpairing.request_bytes(method, path, device_id, time, nonce)
  const requestBytes = (method, path, deviceId, time, n) =>
    concat(["token-agent companion request v1\0", [method, path, deviceId, String(time), n].join("\0")]);

  async function sign(key, bytes) {
    return new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, key, bytes));
  }

  function openDb() {
    return new Promise((resolve, reject) => {
      const req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = () => req.result.createObjectStore(DB_STORE);
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }

  async function dbDo(mode, fn) {
    const db = await openDb();
    try {
      return await new Promise((resolve, reject) => {
        const tx = db.transaction(DB_STORE, mode);
        const req = fn(tx.objectStore(DB_STORE));
        tx.oncomplete = () => resolve(req.result);
        tx.onerror = () => reject(tx.error);
        tx.onabort = () => reject(tx.error);
      });
    } finally {
      db.close();
    }
  }

  const loadCompanion = () => dbDo("readonly", (s) => s.get(DB_KEY));
  const saveCompanion = (record) => dbDo("readwrite", (s) => s.put(record, DB_KEY));
  const forgetCompanion = () => dbDo("readwrite", (s) => s.delete(DB_KEY));

  // ------------------------------------------------------------------ page helpers

  const NOTHING_WAITING = "No sign-in is waiting for you. Keep this page open: a new one appears here when you choose push approval on your computer.";

  function setStatus(text) { $("status").textContent = text; }

  // The outcome of the last answer stays on screen on its own line: the stream's next
  // "nothing waiting" must not overwrite it (whichever arrives first). A new request hides it.
  function setOutcome(text) {
    $("outcome").textContent = text || "";
    $("outcome-box").hidden = !text;
  }

  function clearProblems() {
    $("problem-slot").replaceChildren();
    for (const group of document.querySelectorAll(".nhsuk-form-group--error")) {
      group.classList.remove("nhsuk-form-group--error");
      const input = group.querySelector("input");
      if (input) {
        input.classList.remove("nhsuk-input--error");
        input.setAttribute("aria-describedby", input.id + "-hint");
      }
      const message = group.querySelector(".nhsuk-error-message");
      if (message) message.remove();
    }
  }

  // The NHS error summary at the top (linking to the field) and the message beside it.
  function showProblem(message, fieldId) {
    clearProblems();
    const summary = document.createElement("div");
    summary.className = "nhsuk-error-summary";
    summary.tabIndex = -1;
    const alert = document.createElement("div");
    alert.setAttribute("role", "alert");
    const heading = document.createElement("h2");
    heading.className = "nhsuk-error-summary__heading";
    heading.textContent = "There is a problem";
    const body = document.createElement("div");
    body.className = "nhsuk-error-summary__body";
    const list = document.createElement("ul");
    list.className = "nhsuk-list nhsuk-error-summary__list";
    const item = document.createElement("li");
    if (fieldId) {
      const link = document.createElement("a");
      link.href = "#" + fieldId;
      link.textContent = message;
      link.addEventListener("click", (e) => { e.preventDefault(); $(fieldId).focus(); });
      item.append(link);
    } else {
      item.textContent = message;
    }
    list.append(item);
    body.append(list);
    alert.append(heading, body);
    summary.append(alert);
    $("problem-slot").append(summary);
    if (fieldId) {
      const input = $(fieldId);
      const group = input.closest(".nhsuk-form-group");
      group.classList.add("nhsuk-form-group--error");
      input.classList.add("nhsuk-input--error");
      const beside = document.createElement("span");
      beside.className = "nhsuk-error-message";
      beside.id = fieldId + "-error";
      const hidden = document.createElement("span");
      hidden.className = "nhsuk-u-visually-hidden";
      hidden.textContent = "Error: ";
      beside.append(hidden, message);
      input.before(beside);
      input.setAttribute("aria-describedby", fieldId + "-hint " + fieldId + "-error");
    }
    if (!document.title.startsWith("Error: ")) document.title = "Error: " + document.title;
    summary.focus();
  }

  function noProblem() {
    clearProblems();
    document.title = document.title.replace(/^Error: /, "");
  }

  async function postJson(path, body) {
    const response = await fetch(path, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), credentials: "omit", cache: "no-store",
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    return { ok: response.ok, status: response.status, data: data || {} };
  }

  const timeOf = (seconds) => new Date(seconds * 1000).toLocaleTimeString("en-GB");

  // ------------------------------------------------------------------ pairing

  async function pair(code) {
    if (!window.crypto || !crypto.subtle) {
      showProblem("This browser cannot keep a key safely (no WebCrypto). Open this page in an up-to-date browser over https.");
      return;
    }
    const keys = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
    const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", keys.publicKey));
    const redeemed = await postJson("/companion/pair/redeem", { code: code, public_key: toB64(publicKey) });
    if (!redeemed.ok) {
      showProblem(redeemed.data.message || "The pairing code was refused: start pairing again on your computer.",
                  redeemed.status === 400 ? "pairing-code" : null);
      return;
    }
    const deviceId = redeemed.data.device_id;
    const challenge = fromB64(redeemed.data.challenge);
    const signature = await sign(keys.privateKey, pairingBytes(deviceId, challenge));
    const confirmed = await postJson("/companion/pair/confirm", {
      device_id: deviceId, challenge: redeemed.data.challenge, signature: toB64(signature),
    });
    if (!confirmed.ok) {
      showProblem(confirmed.data.message || "The phone could not be paired: start pairing again on your computer.");
      return;
    }
    await saveCompanion({ deviceId: deviceId, name: confirmed.data.name, privateKey: keys.privateKey,
                          publicKey: keys.publicKey, pairedAt: Date.now() });
    noProblem();
    history.replaceState(null, "", "/companion");
    document.title = document.title.replace("Pair this phone", "Approve sign-ins");
    $("pair-section").remove();
    $("approve-section").hidden = false;
    setStatus("This phone is paired as \u201c" + confirmed.data.name + "\u201d. Sign-ins waiting for you will appear here.");
    start();
  }

  function setUpPairing() {
    const input = $("pairing-code");
    const fromLink = decodeURIComponent(location.hash.replace(/^#/, "")).trim();
    if (fromLink) {
      input.value = fromLink;
      history.replaceState(null, "", location.pathname); // the code leaves the address bar
    }
    $("pair-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const code = input.value.replace(/[\s-]/g, "");
      if (!code) { showProblem("Enter the pairing code shown on your computer", "pairing-code"); return; }
      if (!/^[0-9A-Za-z]{10}$/.test(code)) {
        showProblem("Enter the pairing code as shown on your computer: 10 letters and numbers", "pairing-code");
        return;
      }
      const button = $("pair-button");
      button.disabled = true;
      try {
        await pair(input.value);
      } catch (e) {
        showProblem("The phone could not be paired because of a network or browser error. Check the connection and try again.");
      } finally {
        button.disabled = false;
      }
    });
  }

  // ------------------------------------------------------------------ pending sign-ins

  let companion = null;
  let running = false;
  const shown = new Map(); // request id -> its section
  // refusals of a signed request that pairing again cures (others: retried)
  const UNPAIRED = new Set(["unknown-credential", "credential-flagged", "method-not-confirmed"]);

  async function signedHeaders(method, path) {
    const time = Date.now();
    const n = nonce();
    const signature = await sign(companion.privateKey, requestBytes(method, path, companion.deviceId, time, n));
    return {
      "X-Companion-Device": companion.deviceId, "X-Companion-Time": String(time),
      "X-Companion-Nonce": n, "X-Companion-Signature": toB64(signature),
    };
  }

  function describe(request) {
    const list = document.createElement("dl");
    list.className = "nhsuk-summary-list";
    const rows = [["Who", request.user || "Unknown"],
                  ["From", (request.workstation ? request.workstation + ", " : "") +
                           (request.device === "unmanaged" ? "a web browser" : (request.device || "a computer")) +
                           " on network " + request.network],
                  ["When", "Asked at " + timeOf(request.created_at) + ", open until " + timeOf(request.expires_at)]];
    for (const [key, value] of rows) {
      const row = document.createElement("div");
      row.className = "nhsuk-summary-list__row";
      const dt = document.createElement("dt");
      dt.className = "nhsuk-summary-list__key";
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.className = "nhsuk-summary-list__value";
      dd.textContent = value;
      row.append(dt, dd);
      list.append(row);
    }
    return list;
  }

  function requestSection(request) {
    const section = document.createElement("section");
    section.className = "app-push-request";
    const headingId = "request-" + request.id + "-heading";
    section.setAttribute("aria-labelledby", headingId);
    const heading = document.createElement("h2");
    heading.id = headingId;
    heading.textContent = "Is this you signing in?";
    const form = document.createElement("form");
    form.noValidate = true;
    const group = document.createElement("div");
    group.className = "nhsuk-form-group";
    const inputId = "number-" + request.id;
    const label = document.createElement("label");
    label.className = "nhsuk-label";
    label.htmlFor = inputId;
    label.textContent = "Number shown on the sign-in screen";
    const hint = document.createElement("div");
    hint.className = "nhsuk-hint";
    hint.id = inputId + "-hint";
    hint.textContent = "Type the two-digit number you can see where you are signing in. If you are not signing in, choose Deny.";
    const input = document.createElement("input");
    input.className = "nhsuk-input nhsuk-input--width-2";
    input.id = inputId;
    input.name = "number";
    input.type = "text";
    input.inputMode = "numeric";
    input.autocomplete = "off";
    input.maxLength = 2;
    input.setAttribute("aria-describedby", hint.id);
    group.append(label, hint, input);
    const approve = document.createElement("button");
    approve.className = "nhsuk-button";
    approve.type = "submit";
    approve.textContent = "Approve";
    const deny = document.createElement("button");
    deny.className = "nhsuk-button nhsuk-button--secondary";
    deny.type = "button";
    deny.textContent = "Deny";
    const buttons = document.createElement("div");
    buttons.className = "nhsuk-button-group";
    buttons.append(approve, deny);
    form.append(group, buttons);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const typed = input.value.trim();
      if (!/^[0-9]{2}$/.test(typed)) {
        showProblem("Enter the two-digit number shown on the sign-in screen", inputId);
        return;
      }
      send(request, "approve", parseInt(typed, 10), [approve, deny]);
    });
    deny.addEventListener("click", () => send(request, "deny", null, [approve, deny]));
    section.append(heading, describe(request), form);
    return section;
  }

  async function send(request, decision, number, buttons) {
    for (const b of buttons) b.disabled = true;
    try {
      const signature = await sign(companion.privateKey, answerBytes(request.id, decision, number));
      const result = await postJson("/companion/answer", {
        version: 1, device_id: companion.deviceId, request_id: request.id,
        decision: decision, number: number, signature: toB64(signature),
      });
      noProblem();
      const section = shown.get(request.id);
      if (section) section.remove();
      shown.delete(request.id);
      if (result.ok || result.data.state) setOutcome(result.data.message);
      else showProblem(result.data.message || "Your answer could not be sent: try again.");
      if (shown.size === 0) setStatus(NOTHING_WAITING);
    } catch (e) {
      showProblem("Your answer could not be sent because of a network error. Check the connection and try again.");
      for (const b of buttons) b.disabled = false;
    }
  }

  function showPending(requests) {
    const ids = new Set(requests.map((r) => r.id));
    for (const [id, section] of shown) {
      if (!ids.has(id)) { section.remove(); shown.delete(id); }
    }
    for (const request of requests) {
      if (!shown.has(request.id)) {
        setOutcome("");
        const section = requestSection(request);
        shown.set(request.id, section);
        $("requests").append(section);
      }
    }
    if (requests.length === 0) {
      setStatus(NOTHING_WAITING);
    } else {
      setStatus(requests.length === 1 ? "A sign-in is waiting for you: check it below."
                                       : requests.length + " sign-ins are waiting for you: check them below.");
    }
  }

  function notPaired(message) {
    running = false;
    companion = null;
    $("paired-as").hidden = true;
    $("not-paired").hidden = false;
    setStatus(message);
  }

  // One server-sent events stream (fetch, so the request can carry its signature headers).
  async function listen() {
    const path = "/companion/events";
    const response = await fetch(path, { headers: await signedHeaders("GET", path),
                                         credentials: "omit", cache: "no-store" });
    if (response.status === 401) {
      let data = {};
      try { data = await response.json(); } catch (e) { data = {}; }
      if (UNPAIRED.has(data.reason)) {
        await forgetCompanion();
        notPaired((data.message || "This phone is not paired.") + "");
        return "stop";
      }
      return "retry";
    }
    if (!response.ok || !response.body) return "retry";
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "again";
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        let data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) name = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        if (name === "pending") showPending(JSON.parse(data).requests);
        else if (name === "unpaired") {
          await forgetCompanion();
          notPaired(JSON.parse(data).message);
          return "stop";
        }
      }
    }
  }

  async function start() {
    if (running) return;
    companion = await loadCompanion();
    if (!companion) { notPaired("This phone is not paired."); return; }
    running = true;
    $("not-paired").hidden = true;
    $("paired-as").hidden = false;
    $("paired-as").textContent = "This phone is paired as \u201c" + companion.name + "\u201d.";
    let pause = 1000;
    while (running) {
      let outcome;
      try {
        outcome = await listen();
      } catch (e) {
        outcome = "retry";
      }
      if (outcome === "stop") return;
      if (outcome === "again") { pause = 1000; await new Promise((r) => setTimeout(r, 200)); continue; }
      setStatus("Cannot reach the server just now: trying again.");
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 30000);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const root = $("companion");
    if (!root) return;
    if (root.dataset.mode === "pair") setUpPairing();
    else start().catch(() => setStatus("This page could not start: reload it."));
  });
})();
