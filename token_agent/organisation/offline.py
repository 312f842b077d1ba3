"""Offline logins at an organisation's workstation: what the server hands out, and the login
when no server answers.

Server side
    ``bundle_for(agent, user, workstation)``: after an online login that asked for it, what
    the workstation keeps (encrypted, ``cache.py``): the user (id, name, class, disabled),
    their FIDO2 credentials (credential id, COSE public key, signature counter, name, RP ID,
    flag), their card identities (holder UUID, flag), the key settings (RP ID, user
    verification), and the policy's decisions for this user on this workstation (a managed
    device named by the workstation) for a key with user verification, a key without, and a
    card with its PIN (``policy.decide`` through ``ceremonies.login.facts_for``, so exactly
    the online rules), and ``expires_at`` = now + ``[offline] max_hours`` (0: offline logins
    are off, the bundle is never usable). ``trust_for(agent)``: the card trust anchors,
    intermediates, settings and the CRLs of the configured sources.

Workstation side
    ``login(cache, username, primary=..., interaction=..., key=..., card_session=...)``:
    the existing key and card ceremonies (``ceremonies.key.login_with_key``,
    ``ceremonies.card.login_with_card``: ``webauthn.verify_assertion`` against the cached
    public key and counter, ``cardtrust.validate_card_certificate`` with the cached trust,
    the PIN on the card, ``ceremonies.card.verify_signature``) run unchanged over
    ``cachestore.CacheStore``, a store of one user read from the bundle: the counter they advance is
    the cached one and the audit events they record go to the outbox, in one local
    transaction. Then the cached decision: a second factor, when it asks for one, only by an
    authenticator-app code checked against the cached hashes (``totpcache``), single use.
    Refused with :data:`OFFLINE_REFUSAL`: a password or any other method, a user with no
    cached bundle, a bundle past ``expires_at`` (or a clock before the online login it came
    from). ``after_online_login(cache, client, bundle)``: what the workstation keeps after an
    online login (the bundle, then the TOTP hashes and card trust it may need).
"""

from __future__ import annotations

import base64
import datetime as _dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import kinds
from ..outcome import Factor, LoginOutcome, Reason
from .cachestore import CacheStore, RecordingKey

if TYPE_CHECKING:
    from ..agent import Agent
    from .cache import OfflineCache

log = logging.getLogger("token_agent.offline")

#: what a person is told when the server cannot be reached and this login cannot go offline
OFFLINE_REFUSAL = "The organisation's server cannot be reached; use your key or card."
BUNDLE_VERSION = 1
#: how far the workstation's clock may be behind the online login a bundle came from
CLOCK_SLACK = 300.0
TOTP_PROMPT = "Code from your authenticator app"


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# --------------------------------------------------------------------------- server side


def bundle_for(agent: "Agent", user, workstation: str, *, now: float | None = None
               ) -> dict[str, Any]:
    """The offline bundle of ``user`` (a ``User`` or a name) for ``workstation``."""
    from ..ceremonies.key import KeySettings
    from ..ceremonies.login import Device, facts_for
    from ..policy import decide
    from ..store import KIND_TOTP

    store = agent.store
    if isinstance(user, str):
        user = store.get_user(user)
    now = agent.now() if now is None else float(now)
    settings = KeySettings.from_store(store)
    device = Device("managed", device_id=workstation, network=None)

    def decision(primary: str, multi: bool) -> dict[str, Any]:
        facts, _ = facts_for(agent, user, device=device, primary=primary,
                             primary_multi_factor=multi)
        return decide(agent.policy, facts).to_json()

    hours = agent.policy.offline.max_hours
    return {
        "version": BUNDLE_VERSION,
        "workstation": workstation,
        "issued_at": now,
        "max_hours": hours,
        "expires_at": now + hours * 3600.0,
        "user": {"id": user.id, "username": user.username, "display_name": user.display_name,
                 "user_class": user.user_class, "mfa_enabled": user.mfa_enabled,
                 "mfa_source": user.mfa_source, "disabled": user.disabled,
                 "user_handle": _b64(user.user_handle)},
        "settings": {"rp_id": settings.rp_id, "user_verification": settings.user_verification},
        "credentials": [
            {"credential_id": c.credential_id.hex(), "public_key": _b64(c.public_key),
             "sign_count": c.sign_count, "name": c.name, "rp_id": c.rp_id,
             "aaguid": c.aaguid, "uv_enrolled": c.uv_enrolled, "flagged": c.flagged,
             "flag_reason": c.flag_reason}
            for c in store.list_fido_credentials(user.id)],
        "cards": [{"uuid": i.uuid, "name": i.name, "holder_name": i.holder_name,
                   "flagged": i.flagged, "flag_reason": i.flag_reason}
                  for i in store.list_card_identities(user.id)],
        "totp_last_steps": {str(m.id): int(store.totp_credential(m.id)["last_step"])
                            for m in store.list_methods(user.id, KIND_TOTP)
                            if store.totp_credential(m.id) is not None},
        "decisions": {"key_uv": decision("key", True), "key": decision("key", False),
                      "card": decision("card", True)},
    }


def trust_for(agent: "Agent") -> dict[str, Any]:
    """The card trust a workstation keeps for offline card logins: the card settings
    (anchors and intermediates as PEM text) and the CRL of each configured source (a
    source that cannot be read now is left out: offline, the CRL rules then apply as
    online)."""
    from ..cardtrust import fetch_crl
    from ..ceremonies.card import CardSettings

    settings = CardSettings.from_store(agent.store)

    def pem(items: tuple[str, ...]) -> list[str]:
        out = []
        for item in items:
            if "-----BEGIN" in item:
                out.append(item)
            else:
                try:
                    out.append(Path(item).read_text())
                except (OSError, UnicodeDecodeError) as e:
                    log.warning("card trust file %s cannot be read: %s", item, e)
        return out

    crls = []
    for source in settings.crl_sources:
        try:
            crls.append({"source": source, "crl": _b64(fetch_crl(source))})
        except ValueError as e:
            log.warning("CRL %s left out of the offline trust: %s", source, e)
    data = settings.to_settings()
    data["card_trust_anchors"] = pem(settings.trust_anchors)
    data["card_intermediates"] = pem(settings.intermediates)
    return {"settings": data, "crls": crls}


# --------------------------------------------------------------------------- workstation side


def _refuse(cache: "OfflineCache", username: str, why: str, now: float, *,
            primary: str | None, user_id: str | None = None,
            message: str = OFFLINE_REFUSAL, reason: Reason = Reason.SERVER_UNAVAILABLE
            ) -> LoginOutcome:
    cache.queue({"kind": "login", "user_id": user_id, "username": username,
                 "credential_id": None, "outcome": "failure",
                 "detail": {"reason": reason.value, "why": why, "primary": primary},
                 "at": now}, now=now)
    log.info("offline login refused for %s: %s", username, why)
    return LoginOutcome.failure("login", reason, message, user=username,
                                detail={"offline": True, "why": why})


def login(cache: "OfflineCache", username: str, *, primary: str | None,
          interaction, key=None, card_session=None, now: float | None = None,
          key_pin: Callable[[], str | None] | None = None,
          card_pin: Callable[[], str | None] | None = None,
          on_touch: Callable[[], None] | None = None, timeout: float = 30.0,
          cancel=None, presence=None) -> LoginOutcome:
    """An offline login (see the module docstring). Always returns an outcome; every
    success and failure is queued in the outbox. ``primary``: "key" or "card" (None: the
    device given); ``key``: a ``FidoKey`` (or what duck-types it); ``card_session``: a
    ``PivSession``; ``key_pin`` / ``card_pin``: the PIN prompts (default: asked through
    ``interaction``)."""
    from ..ceremonies.login import shown_before_first_factor
    from . import totpcache

    now = time.time() if now is None else float(now)
    if primary is None:
        primary = "key" if key is not None else "card" if card_session is not None else None
    if primary not in ("key", "card"):
        return _refuse(cache, username, "method-not-offline", now, primary=primary)
    from .cache import CacheError

    try:
        bundle = cache.bundle(username)
    except CacheError as e:  # altered, or another key file: as if nothing were cached
        log.error("offline login of %s: %s", username, e)
        return _refuse(cache, username, "cache-unreadable", now, primary=primary)
    if bundle is None:
        return _refuse(cache, username, "not-cached", now, primary=primary)
    user_id = bundle["user"]["id"]
    if bundle.get("version") != BUNDLE_VERSION:
        return _refuse(cache, username, "bundle-version", now, primary=primary, user_id=user_id)
    if now > float(bundle["expires_at"]) or not bundle.get("max_hours"):
        return _refuse(cache, username, "offline-window-ended", now, primary=primary,
                       user_id=user_id)
    if now < float(bundle["last_online_login_at"]) - CLOCK_SLACK:
        return _refuse(cache, username, "clock-before-online-login", now, primary=primary,
                       user_id=user_id)
    store = CacheStore(cache, bundle, now)

    if primary == "key":
        from ..ceremonies.key import KeySettings, login_with_key

        if key is None:
            return LoginOutcome.failure("key", Reason.NO_DEVICE, "no security key was found: "
                                        "insert your key and try again", user=username)
        settings = KeySettings(rp_id=bundle["settings"]["rp_id"],
                               user_verification=bundle["settings"]["user_verification"])
        store.key = RecordingKey(key)
        first = login_with_key(
            store, store.key, username=username,
            pin_provider=key_pin or (lambda: interaction.secret("PIN for your security key")),
            on_touch=on_touch, timeout=timeout, cancel=cancel, settings=settings,
            presence=presence)
        decision = bundle["decisions"]["key_uv" if first.user_verified else "key"]
    else:
        from ..ceremonies.card import CardSettings, login_with_card

        if card_session is None:
            return LoginOutcome.failure("card", Reason.NO_DEVICE, "no smartcard was found: "
                                        "insert your card and try again", user=username)
        try:
            trust = cache.trust()
            if trust is None:
                raise ValueError("no card trust is cached on this workstation")
            settings = _card_settings(cache, trust)
            policy = settings.trust_policy()
        except (ValueError, CacheError) as e:
            return _refuse(cache, username, "no-card-trust", now, primary=primary,
                           user_id=user_id, reason=Reason.CERT_UNTRUSTED,
                           message=f"{e}, and the organisation's server cannot be reached: "
                                   "use your key.")
        first = login_with_card(
            store, card_session,
            pin_provider=card_pin or (lambda: interaction.secret("PIN for your smartcard")),
            policy=policy, provision=False, settings=settings,
            now=_dt.datetime.fromtimestamp(now, _dt.timezone.utc))
        decision = bundle["decisions"]["card"]
    if not first.ok:
        with cache.transaction():
            store.record_event("login", user_id=user_id, outcome="failure",
                               detail={"reason": first.reason.value, "primary": primary})
        return shown_before_first_factor(first, username)

    second = None
    factors = list(first.factors)
    if decision["must_enrol"] or decision["mfa_required"]:
        why = ("a second factor must be set up first, which needs the organisation's server"
               if decision["must_enrol"] else None)
        try:
            apps = (cache.totp(username) or {}).get("apps", []) \
                if "totp" in decision["usable_methods"] else []
        except CacheError as e:
            log.error("offline login of %s: %s", username, e)
            apps = []
        if why is None and not apps:
            why = ("a second factor is needed, and offline only an authenticator-app code can "
                   "be checked")
        if why is not None:
            with cache.transaction():
                store.record_event("login", user_id=user_id, outcome="failure",
                                   detail={"reason": Reason.SERVER_UNAVAILABLE.value,
                                           "why": why, "primary": primary})
            return LoginOutcome.failure("login", Reason.SERVER_UNAVAILABLE,
                                        f"{why}: try again when the organisation's server can be "
                                        "reached", user=first.user, user_id=user_id,
                                        detail={"offline": True})
        typed = interaction.secret(TOTP_PROMPT)
        result, step, method = totpcache.WRONG, None, None
        if typed is None:
            result = "cancelled"
        else:
            for app in apps:
                r, s_ = totpcache.match(app, typed, now=now,
                                        last_step=cache.totp_last_step(username, app["method"]))
                if r == totpcache.OK:
                    result, step, method = r, s_, app
                    break
                if r == totpcache.REPLAYED or (r == totpcache.MALFORMED
                                               and result == totpcache.WRONG):
                    result = r
        with cache.transaction():
            if result == totpcache.OK and not cache.consume_totp_step(username, method["method"],
                                                                       step):
                result = totpcache.REPLAYED
            if result != totpcache.OK:
                reason = {totpcache.REPLAYED: Reason.CODE_REPLAYED,
                          "cancelled": Reason.CANCELLED}.get(result, Reason.WRONG_CODE)
                store.record_event("verify.totp", user_id=user_id, outcome="failure",
                                   detail={"reason": reason.value})
                store.record_event("login", user_id=user_id, outcome="failure",
                                   detail={"reason": reason.value, "primary": primary,
                                           "second": "totp"})
                message = {Reason.CODE_REPLAYED: "this code was already used: wait for the "
                                                 "next one",
                           Reason.CANCELLED: "cancelled: no answer"}.get(reason, "wrong code")
                return LoginOutcome.failure("login", reason, message, user=first.user,
                                            user_id=user_id, detail={"offline": True})
            store.record_event("verify.totp", user_id=user_id, outcome="success",
                               detail={"method_id": int(method["method"]), "step": step,
                                       "method": method["name"]})
            second = "totp"
            factor = Factor[kinds.by_policy("totp").factor.upper()]
            if factor not in factors:
                factors.append(factor)
            if len(set(factors)) < 2:  # as online (ceremonies/login.py)
                why = (f"{primary} and totp are the same kind of factor: multi-factor "
                       "authentication needs two different kinds")
                store.record_event("login", user_id=user_id, outcome="failure",
                                   detail={"reason": Reason.VERIFICATION_FAILED.value,
                                           "primary": primary, "second": second})
                return LoginOutcome.failure("login", Reason.VERIFICATION_FAILED, why,
                                            user=first.user, user_id=user_id,
                                            detail={"offline": True})
            _record_success(store, user_id, primary, second, decision)
    else:
        with cache.transaction():
            _record_success(store, user_id, primary, second, decision)
    log.info("offline login: %s with %s%s", first.user, primary,
             f" and {second}" if second else "")
    return LoginOutcome(
        ok=True, method="+".join(m for m in (primary, second) if m), user=first.user, user_id=user_id, factors=tuple(factors),
        credential=first.credential, credential_id=first.credential_id,
        user_verified=first.user_verified, warnings=first.warnings, message=first.message,
        detail={**first.detail, "offline": True, "primary": primary, "second": second,
                "expires_at": bundle["expires_at"]})


def _record_success(store: CacheStore, user_id: str, primary: str, second: str | None,
                    decision: dict[str, Any]) -> None:
    store.record_event("login", user_id=user_id, outcome="success",
                       detail={"primary": primary, "second": second,
                               "rules": decision.get("rules", [])[:8]})


def _card_settings(cache: "OfflineCache", trust: dict[str, Any]):
    """The card settings of the cached trust; its CRLs written as files beside the cache
    (public data), named as the sources they came from."""
    from ..atomicfile import write_private
    from ..ceremonies.card import CardSettings

    s = trust["settings"]
    directory = Path(cache.db.path).parent / "offline-crls"
    sources = []
    if trust.get("crls"):
        directory.mkdir(mode=0o700, exist_ok=True)
        for i, item in enumerate(trust["crls"]):
            path = directory / f"{i}.crl"
            data = _unb64(item["crl"])
            if not path.exists() or path.read_bytes() != data:
                write_private(path, data)
            sources.append(str(path))
    return CardSettings(
        trust_anchors=tuple(s["card_trust_anchors"]), intermediates=tuple(s["card_intermediates"]),
        # the configured sources' CRLs as the server had them; none fetched: the sources
        # themselves (unreachable offline: card_on_unreachable_crl decides, as online)
        crl_sources=tuple(sources) or tuple(s.get("card_crl_sources") or ()),
        crl_max_age=s["card_crl_max_age"], on_stale_crl=s["card_on_stale_crl"],
        on_unreachable_crl=s["card_on_unreachable_crl"],
        expiry_warning_days=s["card_expiry_warning_days"], provision_on_first_use=False,
        lock_command=s["card_lock_command"], crl_cache_dir=None)


def after_online_login(cache: "OfflineCache", client, bundle: dict[str, Any] | None, *,
                       now: float | None = None) -> list[str]:
    """What the workstation does after a successful online login whose answer carried a
    bundle (``{"offline": bundle}``): keep it, then fetch what an offline login of this user
    may need: the authenticator-app hashes when the cached decisions may ask for a code
    (``POST /v1/offline/totp``), the card trust when the user holds a card (``GET
    /v1/offline/trust``). ``client``: an ``OrgClient``. A fetch that fails leaves the cache as
    it was (the bundle is kept); the failures' messages are returned (for the log)."""
    if bundle is None:
        return []
    now = time.time() if now is None else float(now)
    cache.store_bundle(bundle, now=now)
    problems = []
    username = bundle["user"]["username"]
    wants_code = any(d["mfa_required"] and "totp" in d["usable_methods"]
                     for d in bundle["decisions"].values())
    if wants_code:
        try:
            cache.store_totp(username, client.request("POST", "/v1/offline/totp",
                                                      {"user": username}), now=now)
        except Exception as e:  # noqa: BLE001  (the client's errors: offline TOTP unavailable)
            problems.append(f"authenticator-app codes for offline logins: {e}")
    if bundle.get("cards"):
        try:
            cache.store_trust(client.request("GET", "/v1/offline/trust"))
        except Exception as e:  # noqa: BLE001
            problems.append(f"card trust for offline logins: {e}")
    return problems



def store_login_result(cache: "OfflineCache", bundle: dict[str, Any] | None, *,
                       client=None, now: float | None = None) -> list[str]:
    """After a successful online login: keep the server's bundle (when it sent one); with
    ``client``, also fetch the TOTP hashes and card trust (:func:`after_online_login`, which
    takes a few seconds for a user with an authenticator app: run it off the login's path)."""
    if bundle is None:
        return []
    if client is not None:
        return after_online_login(cache, client, bundle, now=now)
    cache.store_bundle(bundle, now=time.time() if now is None else float(now))
    return []
