// Security keys and passkeys on the pages, through WebAuthn (navigator.credentials).
//
// A page with a form marked data-webauthn="get" (signing in) or "create" (adding a key)
// carries the server's options as JSON in data-webauthn-options (base64url for the byte
// fields, as WebAuthn's JSON forms have them). This script asks the browser, puts what the
// key answered into the form's hidden fields (base64url again) and sends the form: the server
// checks everything (token_agent/browserkey.py). Nothing here decides anything.
//
// Without JavaScript, or in a browser without WebAuthn, the page says so and offers the
// password instead (elements marked data-webauthn-needs-js / data-webauthn-unsupported).
"use strict";

(function () {
  function toBytes(text) {
    var base64 = String(text).replace(/-/g, "+").replace(/_/g, "/");
    while (base64.length % 4) {
      base64 += "=";
    }
    var binary = window.atob(base64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i += 1) {
      bytes[i] = binary.charCodeAt(i);
    }
    return bytes.buffer;
  }

  function toText(buffer) {
    if (!buffer) {
      return "";
    }
    var bytes = new Uint8Array(buffer);
    var binary = "";
    for (var i = 0; i < bytes.length; i += 1) {
      binary += String.fromCharCode(bytes[i]);
    }
    return window.btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function descriptors(list) {
    return (list || []).map(function (d) {
      var out = { type: d.type || "public-key", id: toBytes(d.id) };
      if (d.transports) {
        out.transports = d.transports;
      }
      return out;
    });
  }

  function requestOptions(json) {
    var options = Object.assign({}, json);
    options.challenge = toBytes(json.challenge);
    options.allowCredentials = descriptors(json.allowCredentials);
    return options;
  }

  function creationOptions(json) {
    var options = Object.assign({}, json);
    options.challenge = toBytes(json.challenge);
    options.user = Object.assign({}, json.user, { id: toBytes(json.user.id) });
    options.excludeCredentials = descriptors(json.excludeCredentials);
    return options;
  }

  function setField(form, name, value) {
    var field = form.querySelector('input[type="hidden"][name="' + name + '"]');
    if (field) {
      field.value = value;
    }
  }

  // What the person is told when the browser gives no answer; the form stays, so they can
  // try again (the server's challenge is not spent until the form is sent).
  var MESSAGES = {
    NotAllowedError: "Your security key or passkey did not answer, or you cancelled. " +
      "Try again, or use your password instead.",
    InvalidStateError: "This security key is already registered to your account. " +
      "Use another key, or go back to your account.",
    SecurityError: "This page's address does not allow security keys. " +
      "Contact your IT service desk.",
    AbortError: "Using the security key was cancelled. Try again."
  };

  function showProblem(form, error) {
    var box = form.querySelector("[data-webauthn-problem]");
    var name = error && error.name ? error.name : "Error";
    var text = MESSAGES[name] || ("Your browser could not use the security key (" + name +
      "). Try again, or use your password instead.");
    if (box) {
      var message = box.querySelector("[data-webauthn-problem-text]") || box;
      message.textContent = text;
      box.hidden = false;
      box.focus();
    }
  }

  function busy(form, on) {
    form.querySelectorAll("[data-webauthn-start]").forEach(function (button) {
      button.disabled = on;
      button.setAttribute("aria-disabled", on ? "true" : "false");
    });
  }

  function signIn(form, json) {
    busy(form, true);
    navigator.credentials.get({ publicKey: requestOptions(json) }).then(function (credential) {
      var r = credential.response;
      setField(form, "credential_id", toText(credential.rawId));
      setField(form, "client_data_json", toText(r.clientDataJSON));
      setField(form, "authenticator_data", toText(r.authenticatorData));
      setField(form, "signature", toText(r.signature));
      setField(form, "user_handle", toText(r.userHandle));
      form.submit();
    }).catch(function (error) {
      busy(form, false);
      showProblem(form, error);
    });
  }

  function enrol(form, json) {
    busy(form, true);
    navigator.credentials.create({ publicKey: creationOptions(json) }).then(function (credential) {
      var r = credential.response;
      var extensions = credential.getClientExtensionResults ? credential.getClientExtensionResults() : {};
      var props = extensions.credProps || {};
      setField(form, "credential_id", toText(credential.rawId));
      setField(form, "client_data_json", toText(r.clientDataJSON));
      setField(form, "attestation_object", toText(r.attestationObject));
      setField(form, "transports", r.getTransports ? r.getTransports().join(",") : "");
      setField(form, "discoverable", props.rk === true ? "true" : "false");
      form.submit();
    }).catch(function (error) {
      busy(form, false);
      showProblem(form, error);
    });
  }

  function start(form) {
    var json;
    try {
      json = JSON.parse(form.getAttribute("data-webauthn-options"));
    } catch (e) {
      return;
    }
    form.querySelectorAll("[data-webauthn-needs-js]").forEach(function (el) {
      el.hidden = true;
    });
    if (!window.PublicKeyCredential || !navigator.credentials) {
      form.querySelectorAll("[data-webauthn-unsupported]").forEach(function (el) {
        el.hidden = false;
      });
      return;
    }
    form.querySelectorAll("[data-webauthn-start]").forEach(function (el) {
      el.hidden = false;
      var wrapper = el.closest("[data-webauthn-controls]");
      if (wrapper) {
        wrapper.hidden = false;
      }
    });
    var mode = form.getAttribute("data-webauthn");
    if (mode === "get") {
      form.querySelectorAll("[data-webauthn-start]").forEach(function (button) {
        button.addEventListener("click", function (event) {
          event.preventDefault();
          signIn(form, json);
        });
      });
    } else if (mode === "create") {
      form.addEventListener("submit", function (event) {
        var submitter = event.submitter;
        if (submitter && !submitter.hasAttribute("data-webauthn-start")) {
          return; // another button of the form (cancel): sent as it is
        }
        var name = form.querySelector('input[name="name"]');
        if (name && !name.value.trim()) {
          return; // the server says a name is needed, beside the field
        }
        event.preventDefault();
        enrol(form, json);
      });
    }
  }

  function init() {
    document.querySelectorAll("form[data-webauthn]").forEach(start);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
