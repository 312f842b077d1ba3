"""`token-agent card ...`: status, enrol, login, watch, change-pin, unlock, self-unlock,
settings."""

from __future__ import annotations

import datetime as dt
import signal
import sys
import time

import click

from .. import exitcodes
from . import main
from .common import (
    Context, PinSource, ask, device_errors, emit, fail, json_option, new_pin, pass_ctx, say,
)
from .jsonout import emit_line, start_stream

reader_option = click.option("--reader", help="The reader to use (default: the first one "
                                              "holding a card).")
pin_stdin_option = click.option("--pin-stdin", is_flag=True,
                                help="Read PINs from standard input, one per line, instead "
                                     "of prompting.")


@main.group()
def card() -> None:
    """NHS-style smartcards: status, login, watch, PIN change, sponsor unlock."""


def _card_fail(e) -> None:
    from ..ceremonies.card import device_failure

    reason = device_failure(e)
    fail(e.message, exitcodes.REASON_CODES.get(reason, exitcodes.NO_DEVICE),
         reason=getattr(reason, "value", None))


def _action_failed(result) -> None:
    """A card action (PIN change, unlock) refused: its message, exit code and outcome."""
    data = result.to_json()
    fail(result.message, exitcodes.REASON_CODES.get(result.reason, exitcodes.ERROR),
         reason=data.get("reason"), data=data)


def _open(ctx: Context, reader: str | None):
    """The card in ``reader`` opened as config.toml's ``[cards] driver`` says
    (``token_agent.cardopen``), with errors turned into a message and an exit code."""
    from drivers.pcsc import errors as card_errors

    from ..cardopen import card_opener

    try:
        return card_opener(ctx.config().cards)(reader)
    except card_errors.PcscError as e:
        if reader and isinstance(e, card_errors.NoReader):
            _no_reader_named(reader)
        _card_fail(e)


def _no_reader_named(reader: str) -> None:
    """`--reader R` names no reader: say so, and which readers there are (exit 4)."""
    from drivers.pcsc.errors import PcscError
    from drivers.pcsc.readers import list_readers

    try:
        present = list_readers()
    except PcscError:
        return  # pcscd's own error says more
    if reader in present:
        return
    fail(f"No smartcard reader named {reader!r}. "
         + (f"The readers here: {', '.join(repr(r) for r in present)}." if present
            else "No reader is connected."), exitcodes.NO_DEVICE)


def _settings(ctx: Context):
    from ..ceremonies.card import CardSettings

    try:
        return CardSettings.from_store(ctx.store())
    except ValueError as e:
        fail(f"card settings: {e}", exitcodes.USAGE)


@card.command("status")
@reader_option
@json_option
@pass_ctx
def status(ctx: Context, reader: str | None, as_json: bool) -> None:
    """The reader, the card, its holder and UUID, the certificate's validity and trust, PIN
    tries left. Asks for no PIN."""
    from drivers.pcsc import errors as card_errors

    from ..cardtrust import CardCertificateError, validate_card_certificate
    from ..cardopen import session_driver
    from ..ceremonies.card import _certificate_subject

    settings = _settings(ctx)
    session = _open(ctx, reader)
    try:
        der = session.certificate("9a")
        uuid, holder, serial = _certificate_subject(der)
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        data = {"reader": session.reader, "card_present": True,
                "card_driver": session_driver(session),  # config's [cards] driver
                "atr": (getattr(session, "atr", None) or b"").hex(),  # "": PKCS#11 has none
                "holder_name": holder, "uuid": uuid,
                "certificate_serial": serial,
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "issuer": cert.issuer.rfc4514_string(), "pin_retries": session.pin_retries()}
        try:
            identity = validate_card_certificate(der, settings.trust_policy())
            data.update(trusted=True, verdict="valid", warnings=list(identity.warnings))
        except CardCertificateError as e:
            data.update(trusted=False, verdict=e.reason, message=e.message, warnings=[])
        except ValueError as e:
            data.update(trusted=False, verdict="no-trust-anchors", message=str(e), warnings=[])
        user = ctx.store().get_user_by_card_uuid(uuid) if uuid else None
        data["user"] = user.username if user else None
    except card_errors.PcscError as e:
        _card_fail(e)
    finally:
        session.close()

    def text() -> str:
        lines = [f"reader:       {data['reader']} ({data['card_driver']})",
                 f"holder:       {data['holder_name']} (UUID {data['uuid']})",
                 f"user:         {data['user'] or '(not enrolled)'}",
                 f"certificate:  serial {data['certificate_serial']}, valid "
                 f"{data['not_before'][:10]} to {data['not_after'][:10]}",
                 f"trust:        {'trusted' if data['trusted'] else 'REFUSED'}"
                 + (f" ({data['message']})" if data.get("message") else ""),
                 f"PIN tries:    {data['pin_retries']}"]
        lines += [f"warning:      {w}" for w in data["warnings"]]
        return "\n".join(lines)

    emit(as_json, data, text)


@card.command("enrol")
@click.option("--user", "username", required=True, help="The user the card's holder is.")
@reader_option
@json_option
@pass_ctx
def enrol(ctx: Context, username: str, reader: str | None, as_json: bool) -> None:
    """Enrol the holder of the inserted card (the UUID in its certificate) for a user. The
    certificate must be valid and trusted."""
    from drivers.pcsc import errors as card_errors

    from ..cardtrust import CardCertificateError, validate_card_certificate
    from ..ceremonies.card import enrol_card
    from ..store import CredentialExists, UnknownUser

    store = ctx.store()
    try:
        user = store.get_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)
    from .reauth import require_login

    require_login(ctx, user)  # a login first, unless admin or the first method
    settings = _settings(ctx)
    session = _open(ctx, reader)
    try:
        identity = validate_card_certificate(session.certificate("9a"), settings.trust_policy())
    except card_errors.PcscError as e:
        _card_fail(e)
    except CardCertificateError as e:
        fail(e.message, exitcodes.AUTH_FAILED)
    except ValueError as e:
        fail(str(e), exitcodes.AUTH_FAILED)
    finally:
        session.close()
    try:
        ident = enrol_card(store, user, identity)
    except CredentialExists as e:
        fail(str(e), exitcodes.CONFLICT)
    emit(as_json, ident.to_dict(),
         f"enrolled the card of {identity.holder_name} (UUID {identity.uuid}) for {username}")


@card.command("login")
@reader_option
@pin_stdin_option
@json_option
@pass_ctx
def login(ctx: Context, reader: str | None, pin_stdin: bool, as_json: bool) -> None:
    """Log in with the inserted card and its PIN. Exit status 0 only on success (the codes
    are those of `token-agent login`)."""
    from ..ceremonies.card import login_with_card

    store = ctx.store()
    settings = _settings(ctx)
    session = _open(ctx, reader)
    try:
        outcome = login_with_card(store, session, settings=settings,
                                  pin_provider=PinSource(pin_stdin, "PIN for your smartcard"))
    finally:
        session.close()
    data = outcome.to_json()
    if outcome.ok:
        for warning in outcome.detail.get("warnings", []):
            say(f"warning: {warning}")
        emit(as_json, data, f"logged in: {outcome.user} with the card of "
                            f"{outcome.detail.get('holder_name')} (something-you-have + "
                            f"something-you-know; multi-factor)")
        return
    fail(f"login failed: {outcome.message}",
         exitcodes.REASON_CODES.get(outcome.reason, exitcodes.ERROR),
         reason=data.get("reason"), data=data)


@card.command("change-pin")
@reader_option
@pin_stdin_option
@json_option
@pass_ctx
def change_pin(ctx: Context, reader: str | None, pin_stdin: bool, as_json: bool) -> None:
    """Change the card's PIN (with --pin-stdin: the current PIN, then the new one)."""
    from ..ceremonies.card import change_card_pin, check_new_pin

    store = ctx.store()
    session = _open(ctx, reader)
    try:
        old = PinSource(pin_stdin, "Current PIN")()
        if not old:
            fail("no PIN given", exitcodes.USAGE)
        new = new_pin(pin_stdin, "New PIN (4 to 8 digits)")
        try:
            check_new_pin(new)
        except ValueError as e:
            fail(str(e), exitcodes.USAGE)
        result = change_card_pin(store, session, old_pin=old, new_pin=new)
    finally:
        session.close()
    if not result.ok:
        _action_failed(result)
    emit(as_json, result.to_json(), "PIN changed")


@card.command("unlock")
@click.option("--sponsor", required=True, help="The sponsor (or RA) unlocking the card; they "
                                               "authenticate with their own security key.")
@reader_option
@click.option("--puk-stdin", is_flag=True, help="Read the card's PUK from standard input.")
@click.option("--ra", "ra_spec", metavar="SPEC",
              help="Take the card's PUK from this RA credentials source: file:PATH (a private "
                   "TOML/JSON file), or a source an installed package registers (simulated:"
                   "CA_DIR). Default: $TOKEN_AGENT_RA, else the setting card_ra_source.")
@click.option("--key", "key_path", help="The sponsor's security key (path from `keys list`).")
@pin_stdin_option
@json_option
@pass_ctx
@device_errors
def unlock(ctx: Context, sponsor: str, reader: str | None, puk_stdin: bool,
           ra_spec: str | None, key_path: str | None, pin_stdin: bool, as_json: bool) -> None:
    """A sponsor resets a blocked card's PIN with the card's PUK. The sponsor logs in with
    their own key first. With --pin-stdin, standard input holds, one per line: the sponsor's
    key PIN (when the key asks), the PUK (with --puk-stdin), the card's new PIN."""
    from .. import rasource
    from ..ceremonies.card import check_new_pin, unlock_card
    from ..ceremonies.cardunlock import card_ids
    from ..ceremonies.key import login_with_key
    from .common import cancellable, pin_guard, touch_prompt
    from .keys import open_key

    store = ctx.store()
    if puk_stdin and ra_spec:
        fail("give the PUK with one of --puk-stdin or --ra, not both", exitcodes.USAGE)
    source = None
    if not puk_stdin:
        ra_spec = ra_spec or rasource.configured_spec(store)
        if not ra_spec:
            fail("give the PUK with --puk-stdin or --ra SPEC (or set the setting "
                 "card_ra_source)", exitcodes.USAGE)
        try:
            source = rasource.load_source(ra_spec)
        except rasource.RaError as e:
            fail(str(e), exitcodes.USAGE)
    say(f"Sponsor {sponsor}: authenticate with your security key")
    with open_key(key_path, 30.0) as key:
        sponsor_outcome = cancellable(lambda cancel: login_with_key(
            store, key, username=sponsor, pin_provider=PinSource(pin_stdin),
            on_touch=touch_prompt, cancel=cancel, presence=pin_guard(30.0, cancel)))
    if not sponsor_outcome.ok:
        fail(f"sponsor login failed: {sponsor_outcome.message}",
             exitcodes.REASON_CODES.get(sponsor_outcome.reason, exitcodes.ERROR))
    session = _open(ctx, reader)
    try:
        if source is None:
            puk = sys.stdin.readline().rstrip("\r\n") if pin_stdin or not sys.stdin.isatty() \
                else ask("Card PUK", hide_input=True)
        else:
            uuid, serial = card_ids(session)
            try:
                puk = source.credentials(uuid=uuid or "", serial=serial).puk
            except rasource.UnknownCard as e:
                fail(f"no RA record for this card: {e}", exitcodes.NOT_FOUND)
            except rasource.RaError as e:
                fail(f"the RA's credentials cannot be had: {e}", exitcodes.ERROR)
        new = new_pin(pin_stdin, "New PIN for the card (4 to 8 digits)")
        try:
            check_new_pin(new)
        except ValueError as e:
            fail(str(e), exitcodes.USAGE)
        result = unlock_card(store, session, sponsor=sponsor, sponsor_outcome=sponsor_outcome,
                             puk=puk, new_pin=new)
    finally:
        session.close()
    if not result.ok:
        _action_failed(result)
    emit(as_json, result.to_json(), result.message)


@card.command("self-unlock")
@reader_option
@click.option("--ra", "ra_spec", metavar="SPEC",
              help="Where the card's PUK comes from (as `card unlock --ra`). Default: "
                   "$TOKEN_AGENT_RA, else the setting card_ra_source.")
@pin_stdin_option
@json_option
@pass_ctx
def self_unlock_cmd(ctx: Context, reader: str | None, ra_spec: str | None, pin_stdin: bool,
                    as_json: bool) -> None:
    """Unlock your own card, locked by wrong PINs (it stays in the reader): a one-time code
    sent to your verified mobile or email, your password, then a new PIN of 6 to 8 digits,
    twice. Without a terminal (or with --pin-stdin) standard input holds one answer a line:
    the code, the password, the new PIN, the new PIN again. Exit 0 when unlocked; 3 a wrong
    code or password, an unknown or untrusted card; 6 too many attempts for this card today;
    1 the card is not locked (or the unlock is not set up here); 4 no card."""
    from .. import rasource
    from ..ceremonies.cardunlock import self_unlock
    from .common import TerminalInteraction

    agent = ctx.agent()
    source = None
    if ra_spec:
        try:
            source = rasource.load_source(ra_spec)
        except rasource.RaError as e:
            fail(str(e), exitcodes.USAGE)
    session = _open(ctx, reader)
    try:
        result = self_unlock(agent, session, interaction=TerminalInteraction(), ra=source)
    finally:
        session.close()
    if not result.ok:
        _action_failed(result)
    emit(as_json, result.to_json(), result.message)


@card.command("watch")
@click.option("--reader", "readers", multiple=True, help="Watch only this reader (repeatable).")
@click.option("--lock-on-remove", is_flag=True,
              help="Start the lock action (setting card_lock_command) when a card that was "
                   "present at start, or inserted later, is removed.")
@click.option("--lock-command", help="Use this command as the lock action instead of the "
                                     "setting card_lock_command.")
@json_option
@pass_ctx
def watch(ctx: Context, readers: tuple[str, ...], lock_on_remove: bool,
          lock_command: str | None, as_json: bool) -> None:
    """Print card and reader events as they happen (one JSON object per line with --json)
    until Ctrl-C or SIGTERM."""
    import queue

    from drivers.pcsc import errors as card_errors
    from drivers.pcsc.readers import ReaderWatcher

    from ..cardsession import make_lock_action

    action = None
    if lock_on_remove:
        command = lock_command if lock_command is not None else _settings(ctx).lock_command
        action = make_lock_action(command)
        if action is None:
            fail("--lock-on-remove: no lock command is configured", exitcodes.USAGE)
    if as_json:
        start_stream()
    events: "queue.Queue" = queue.Queue()
    held: set[str] = set()  # readers holding a card that will lock when removed

    def on_event(event) -> None:
        if action is not None and event.kind == "card-inserted":
            held.add(event.reader)
        elif action is not None and event.kind in ("card-removed", "reader-removed") \
                and event.reader in held:
            held.discard(event.reader)
            try:
                action(None)
                started = time.monotonic()
                events.put(("lock-started", event.reader, None,
                            round((started - event.at) * 1000, 3), None))
            except Exception as e:
                events.put(("lock-failed", event.reader, None, None, str(e)))
        events.put((event.kind, event.reader, event.atr, None, None))

    def show(kind, reader, atr, latency, error) -> None:
        record = {"event": kind, "reader": reader, "at": time.time()}
        if atr:
            record["atr"] = bytes(atr).hex()
        if latency is not None:
            record["latency_ms"] = latency
        if error:
            record["error"] = error
        if as_json:
            emit_line(record)
        else:
            extra = f" (ATR {record['atr']})" if atr else ""
            extra += f" {latency} ms after the removal was seen" if latency is not None else ""
            extra += f": {error}" if error else ""
            stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
            click.echo(f"{stamp} {kind} {reader or ''}{extra}")
        sys.stdout.flush()

    def stop(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    watcher = ReaderWatcher(on_event, readers_filter=list(readers) or None)
    try:
        watcher.start()
    except card_errors.PcscError as e:
        _card_fail(e)
    try:
        for name, state in watcher.snapshot().items():
            show("card-present" if state.present else "reader-present", name, state.atr,
                 None, None)
            if state.present and action is not None:
                held.add(name)
        if not as_json:
            say("Watching (Ctrl-C to stop)")
        while True:
            try:
                item = events.get(timeout=0.2)
            except queue.Empty:
                continue
            show(*item)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()


@card.group("settings")
def settings_group() -> None:
    """The organisation's smartcard settings (trust anchors, CRLs, provisioning, lock)."""


@settings_group.command("show")
@json_option
@pass_ctx
def settings_show(ctx: Context, as_json: bool) -> None:
    """The smartcard settings in force, by the names `card settings set` takes (TOML)."""
    from .tomlout import dumps

    settings = _settings(ctx)
    data = settings.to_settings()
    emit(as_json, {**data, "crl_cache_dir": settings.crl_cache_dir}, lambda: dumps(data, header=[
        "smartcard settings (token-agent card settings set KEY VALUE...)",
        f"CRL cache (follows the store): {settings.crl_cache_dir}"]))


@settings_group.command("set")
@click.argument("key")
@click.argument("values", nargs=-1, required=True)
@pass_ctx
def settings_set(ctx: Context, key: str, values: tuple[str, ...]) -> None:
    """Set KEY (e.g. card_trust_anchors ROOT.pem [MORE.pem], card_provision_on_first_use
    true, card_lock_command "loginctl lock-session")."""
    from ..ceremonies.card import card_setting_name, is_list_setting, set_card_setting

    key = card_setting_name(key)
    value = list(values) if is_list_setting(key) else " ".join(values)
    try:
        stored = set_card_setting(ctx.store(create=True), key, value)
    except ValueError as e:
        fail(str(e), exitcodes.USAGE)
    say(f"{key} = {stored}")
