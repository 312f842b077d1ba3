"""The service of a workstation that belongs to an organisation (config.toml
``[organisation] servers``): its logins, step-ups and key enrolments are run by the
organisation's server (``organisation/relay.py``), with this workstation's person, keys,
cards and PINs; its sessions (and their card binding, the lock when the card leaves) stay
here, in its own store, each row naming the organisation's user (``Store.mirror_user``).

When no server answers: the offline login of the organisation's cache (key or card, for
people who logged in here recently: ``organisation/offline.py``), else
``Reason.SERVER_UNAVAILABLE``. The other ops that read or change users and methods are
refused (:data:`LOCAL_OPS`): the organisation's server manages them.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..outcome import LoginOutcome, Reason

if TYPE_CHECKING:
    from .ceremony import Ceremony, SocketInteraction
    from .host import Host

log = logging.getLogger("token_agent.service")

#: ops of the local store's users and methods: refused on an organisation's workstation
LOCAL_OPS = frozenset({"methods.list", "methods.prefer", "methods.remove", "enrol.totp",
                       "enrol.totp.confirm", "enrol.backup-codes", "policy.explain",
                       "admin.unlock", "admin.reset-methods"})


def local_op_refusal(servers: list[str]) -> str:
    return (f"This workstation belongs to an organisation (servers: {', '.join(servers)}): "
            "users and methods are managed through the organisation's server, not here. "
            "Log in and enrol a security key here as usual; for anything else ask the "
            "organisation's administrator.")


#: seconds between two fetches of one user's offline codes and card trust
REFILL_SECONDS = 3600.0


class OrgLink:
    """The workstation's link to its organisation: the client (``OrgClient``) and the
    offline cache (None when the offline module cannot be used)."""

    def __init__(self, client: Any, servers: list[str], cache: Any = None) -> None:
        import threading

        self.client = client
        self.servers = servers
        self.cache = cache
        self._refilled: dict[str, float] = {}
        self._refill_lock = threading.Lock()
        self.deliverer = None  # outbox.Deliverer: the offline audit, delivered
        if cache is not None:
            try:
                from ..organisation.outbox import Deliverer

                self.deliverer = Deliverer(cache, lambda: self.client).start()
            except ImportError:
                log.warning("the offline audit cannot be delivered (no outbox module)")

    def server_answered(self) -> None:
        """A server answered: deliver the offline audit now (``Deliverer.kick``)."""
        if self.deliverer is not None:
            self.deliverer.kick()

    @classmethod
    def open(cls, config: Any, data_dir) -> "OrgLink | None":
        """None when config.toml has no ``[organisation] servers``; ``ConfigError`` /
        ``JoinRequired`` (the client's) when it has and the workstation cannot use them."""
        org = getattr(config, "organisation", None)
        if org is None or not getattr(org, "enabled", False):
            return None
        from ..organisation.client import OrgClient

        client = OrgClient.from_config(config, data_dir)
        cache = None
        try:
            from ..organisation.cache import OfflineCache

            cache = OfflineCache.open(org.directory(data_dir))
        except ImportError:
            log.warning("offline logins are not available (no offline cache module)")
        except Exception as e:  # noqa: BLE001 (online logins go on without it)
            log.error("the offline cache cannot be opened: %s", e)
        return cls(client, list(org.servers), cache)

    def keep_offline(self, username: str, bundle: dict) -> None:
        """After an online login: keep the user's offline bundle
        (``offline.store_login_result``), and, on a thread of its own and at most once per
        :data:`REFILL_SECONDS` per user, fetch what its offline logins need (the
        authenticator-app hashes, which cost the server seconds, and the card trust)."""
        import threading
        import time

        try:
            from ..organisation import offline

            offline.store_login_result(self.cache, bundle)
        except Exception as e:  # noqa: BLE001 (the login stands)
            log.error("cannot keep the offline bundle: %s", e)
            return
        key = username.casefold()
        now = time.monotonic()
        with self._refill_lock:
            if now - self._refilled.get(key, float("-inf")) < REFILL_SECONDS:
                return
            self._refilled[key] = now

        def refill() -> None:
            try:
                for problem in offline.store_login_result(self.cache, bundle,
                                                          client=self.client) or ():
                    log.warning("offline cache: %s", problem)
            except Exception as e:  # noqa: BLE001
                log.error("cannot refill the offline cache: %s", e)

        threading.Thread(target=refill, name="token-agent-offline-refill", daemon=True).start()

    def close(self) -> None:
        if self.deliverer is not None:
            self.deliverer.stop()
        if self.cache is not None:
            try:
                self.cache.close()
            except Exception:  # noqa: BLE001
                pass


# --------------------------------------------------------------------------- devices


def _key_opener(svc: "Host", c: "Ceremony", ui: "SocketInteraction"):
    """The relay's key opener: the service's key pool (the key holding the user's
    credentials, as the server names them)."""
    from ..ceremonies.keyfinding import explain
    from drivers.fido.errors import Cancelled, FidoKeyError

    from .errors import KeyBusy
    from .keys import Busy

    def open_(rp_id, credential_ids, timeout, cancel, on_touch):
        try:
            return svc.keys.acquire(rp_id=rp_id, credential_ids=credential_ids,
                                    timeout=timeout, cancel=c.cancel, on_touch=ui.touch)
        except Busy:
            if c.cancel.is_set():
                raise Cancelled() from None
            raise KeyBusy() from None
        except FidoKeyError as e:
            raise explain(e) from None

    return open_


class _NotingSession:
    """A card's ``PivSession`` that notes its certificate's serial (for the session's
    binding to the card)."""

    def __init__(self, session, reader) -> None:
        self._session = session
        self.reader = reader
        self.serial: str | None = None

    def certificate(self, slot="9a") -> bytes:
        from ..ceremonies.card import _certificate_subject

        der = self._session.certificate(slot)
        try:
            self.serial = _certificate_subject(der)[2]
        except ValueError:
            self.serial = None
        return der

    def __getattr__(self, name):
        return getattr(self._session, name)


def _card_opener(svc: "Host", c: "Ceremony", noted: dict):
    open_card = svc.cards.open_card  # config.toml's [cards] driver (token_agent.cardopen)

    @contextmanager
    def open_(timeout, cancel):
        with svc.cards.reader_held(c, timeout) as (reader, atr):
            session = _NotingSession(open_card(reader), reader)
            noted.update(session=session, reader=reader, atr=atr)
            try:
                yield session
            finally:
                session.close()

    return open_


# --------------------------------------------------------------------------- login


def run_login(svc: "Host", c: "Ceremony", a: dict, ui: "SocketInteraction"
              ) -> tuple[LoginOutcome, list]:
    """A login through the organisation's server (or offline): the outcome, and the card
    it used as ``service.cards`` binds a session to (``card_used``)."""
    from ..organisation import protocol
    from ..organisation.errors import ServerUnavailable
    from ..organisation.relay import relay_with_failover
    from .ceremony import pin_guard

    link = svc.org
    timeout = svc.config.keys.timeout
    noted: dict = {}
    first = protocol.login_request(user=c.user, primary=a["primary"], second=a["second"],
                                   step_up=bool(a["step_up"]),
                                   want_offline=link.cache is not None)
    try:
        relayed = relay_with_failover(link.client, first, ui, _key_opener(svc, c, ui),
                                      _card_opener(svc, c, noted), c.cancel,
                                      presence=pin_guard(svc, c, ui, timeout),
                                      idle_timeout=svc.config.service.prompt_timeout + 60)
    except ServerUnavailable as e:
        log.warning("no organisation server answers: %s", e)
        return offline_login(svc, c, a, ui), []
    outcome = relayed.outcome
    link.server_answered()
    if outcome.ok:
        c.user = outcome.user
        c.conn.org_ticket = (outcome.user_id, relayed.ticket)
        if link.cache is not None and relayed.offline is not None:
            link.keep_offline(outcome.user, relayed.offline)
    card_used = []
    session = noted.get("session")
    if outcome.ok and session is not None and "card" in outcome.method.split("+"):
        card = LoginOutcome(ok=True, method="card", user=outcome.user, user_id=outcome.user_id,
                            credential_id=session.serial)
        card_used.append((card, noted["reader"], noted["atr"]))
    return outcome, card_used


def offline_login(svc: "Host", c: "Ceremony", a: dict, ui: "SocketInteraction"
                  ) -> LoginOutcome:
    """No server answers: the offline login (key or card, a user seen here
    recently), or SERVER_UNAVAILABLE. THE ONE CALL SITE of ``organisation.offline.login``."""
    from ..ceremonies.card import device_failure as card_failure
    from ..ceremonies.key import device_failure as key_failure
    from ..organisation.relay import unavailable_outcome
    from .ceremony import pin_guard

    from ..organisation import offline

    link = svc.org
    if link.cache is None or c.user is None:
        return unavailable_outcome()
    timeout = svc.config.keys.timeout
    primary = a["primary"]
    if primary is None:
        primary = "card" if any(svc.cards.readers().values()) else "key"
    common = dict(interaction=ui, on_touch=ui.touch, timeout=timeout, cancel=c.cancel,
                  presence=pin_guard(svc, c, ui, timeout))
    from drivers.fido.errors import FidoKeyError
    from drivers.pcsc.errors import PcscError

    try:
        if primary == "key":
            rp_id, ids = _cached_credentials(link.cache, c.user)
            with _key_opener(svc, c, ui)(rp_id, ids, timeout, c.cancel, ui.touch) as key:
                return offline.login(link.cache, c.user, primary="key", key=key,
                                     key_pin=ui.key_pin, **common)
        if primary == "card":
            with _card_opener(svc, c, {})(timeout, c.cancel) as session:
                return offline.login(link.cache, c.user, primary="card", card_session=session,
                                     card_pin=ui.card_pin, **common)
        return offline.login(link.cache, c.user, primary=primary, **common)
    except FidoKeyError as e:
        return LoginOutcome.failure("key", key_failure(e), e.message)
    except PcscError as e:
        return LoginOutcome.failure("card", card_failure(e), e.message)


def _cached_credentials(cache, username: str) -> tuple[str | None, list[bytes]]:
    """The RP ID and credential ids of the user's cached bundle, so that the key pool picks
    the key that holds one of them when several keys are plugged in (as online, where the
    server names them); none when there is no readable bundle (the offline login then
    refuses with its own reason)."""
    from ..organisation.cache import CacheError

    try:
        bundle = cache.bundle(username)
    except CacheError:
        return None, []
    if not bundle:
        return None, []
    try:
        ids = [bytes.fromhex(cr["credential_id"]) for cr in bundle.get("credentials", ())
               if not cr.get("flagged")]
        rp_id = (bundle.get("settings") or {}).get("rp_id")
    except (KeyError, TypeError, ValueError):
        return None, []
    return rp_id, ids


# --------------------------------------------------------------------------- self-unlock


def run_self_unlock(svc: "Host", c: "Ceremony", ui: "SocketInteraction", user: str | None
                    ) -> dict:
    """``card.self-unlock`` through the organisation's server (its RA source holds the
    PUKs): the result, a ``CardActionOutcome.to_json()``. The person answers here; the card
    is this workstation's; its new PIN is asked and kept here (``relay.py``)."""
    from ..organisation import protocol
    from ..organisation.errors import ServerUnavailable
    from ..organisation.relay import relay_with_failover
    from .ceremony import pin_guard

    timeout = svc.config.keys.timeout
    first = protocol.card_self_unlock_request(user=user)
    try:
        relayed = relay_with_failover(svc.org.client, first, ui, _key_opener(svc, c, ui),
                                      _card_opener(svc, c, {}), c.cancel,
                                      presence=pin_guard(svc, c, ui, timeout),
                                      idle_timeout=svc.config.service.prompt_timeout + 60)
    except ServerUnavailable as e:
        log.warning("no organisation server answers: %s", e)
        return {"ok": False, "action": "self-unlock",
                "reason": Reason.SERVER_UNAVAILABLE.value,
                "message": "The organisation's server cannot be reached, and it holds what "
                           "unlocks your card: try again when the network is back, or ask "
                           "your sponsor."}
    svc.org.server_answered()
    if relayed.result:
        return relayed.result
    lost = relayed.outcome
    return {"ok": False, "action": "self-unlock",
            "reason": lost.reason.value if lost.reason else None, "message": lost.message}


def offer_self_unlock(svc: "Host", c: "Ceremony", ui: "SocketInteraction",
                      outcome: LoginOutcome, relogin) -> LoginOutcome:
    """The "Forgot your card PIN?" offer of a joined workstation's card login
    (``selfunlock.py`` says it for a standalone one): offered when the server said its RA
    source can unlock the locked card (``detail.self_unlock``) and the card's holder is the
    login's user; on yes, ``card.self-unlock`` through the server, then ``relogin()`` (the
    card login again, with the new PIN)."""
    from .selfunlock import OFFER_PROMPT, UNLOCKED_INFO, YES

    if outcome.ok or outcome.reason != Reason.PIN_BLOCKED or c.cancel.is_set():
        return outcome
    holder = outcome.user
    if (holder is None or outcome.detail.get("self_unlock") is not True
            or (c.user is not None and holder.casefold() != c.user.casefold())):
        return outcome
    answer = ui.text(OFFER_PROMPT)
    if answer is None:
        return LoginOutcome.failure("card", Reason.CANCELLED, "cancelled: no answer",
                                    user=holder, user_id=outcome.user_id)
    if answer.strip().casefold() not in YES:
        log.info("self-service card unlock declined", extra={"login": c.id, "user": holder})
        return outcome
    log.info("self-service card unlock started (organisation)",
             extra={"login": c.id, "user": holder})
    result = run_self_unlock(svc, c, ui, holder)
    log.info("self-service card unlock finished", extra={
        "login": c.id, "user": holder, "ok": result.get("ok"), "reason": result.get("reason")})
    if not result.get("ok"):
        reason = Reason.CANCELLED if result.get("reason") == Reason.CANCELLED.value \
            else Reason.PIN_BLOCKED
        return LoginOutcome.failure(
            "card", reason, result.get("message") or outcome.message, user=holder,
            user_id=outcome.user_id,
            detail={**outcome.detail, "self_unlock": result.get("reason") or "failed"})
    ui.info(result.get("message") or UNLOCKED_INFO)
    if c.cancel.is_set():
        return LoginOutcome.failure("card", Reason.CANCELLED, "cancelled", user=holder)
    return relogin()


# --------------------------------------------------------------------------- enrolment


def run_enrol_key(svc: "Host", c: "Ceremony", name: str | None,
                  ui: "SocketInteraction") -> dict:
    """``enrol.key`` through the organisation's server, with the ticket of this
    connection's login of the same user (the server checks it and the re-authentication
    rule)."""
    from ..organisation import protocol
    from ..organisation.errors import ServerUnavailable
    from ..organisation.relay import relay_with_failover
    from .ceremony import pin_guard

    held = getattr(c.conn, "org_ticket", None)
    ticket = held[1] if held is not None else None
    first = protocol.enrol_key_request(user=c.user, name=name, ticket=ticket)
    timeout = svc.config.keys.timeout

    def no_card(timeout, cancel):
        from drivers.pcsc.errors import PcscError

        raise PcscError("A key enrolment uses no card.")

    try:
        relayed = relay_with_failover(svc.org.client, first, ui, _key_opener(svc, c, ui),
                                      no_card, c.cancel,
                                      presence=pin_guard(svc, c, ui, timeout),
                                      idle_timeout=svc.config.service.prompt_timeout + 60)
    except ServerUnavailable as e:
        log.warning("no organisation server answers: %s", e)
        return {"ok": False, "method": "key", "reason": Reason.SERVER_UNAVAILABLE.value,
                "message": "The organisation's server cannot be reached, and a key is enrolled "
                           "only through it: try again when the network is back."}
    svc.org.server_answered()
    if relayed.result:
        return relayed.result
    lost = relayed.outcome
    return {"ok": False, "method": "key", "reason": lost.reason.value if lost.reason else None,
            "message": lost.message}
