"""`token-agent enrol password|totp|email|sms|voice|messaging|push|app-password|backup-codes`,
`token-agent verify ...`, `token-agent send-code ...`, `token-agent methods ...` and the
companion app, `token-agent approve`."""

from __future__ import annotations

import shlex
import sys

import click

from .. import admin_ops, exitcodes, kinds
from . import main
from .auth import enrol
from .common import (
    Context, TerminalInteraction, ask, emit, fail, json_option, pass_ctx, read_line, say,
)
from .reauth import require_login

CHANNELS = tuple(k.cli for k in kinds.CONTACTS)
VERIFY_KINDS = tuple(k.cli for k in kinds.ALL if k.verifiable)
#: what `verify` refuses in argv (--code): long-lived secrets, as PINs are (--pin-stdin only)
SECRET_KINDS = tuple(k.cli for k in kinds.ALL if k.secret)

user_option = click.option("--user", "username", required=True, help="The user.")
name_option = click.option("--name", help="Which one, when the user has several (by name).")


def _user(ctx: Context, username: str):
    from ..store import UnknownUser

    try:
        return ctx.store().get_user(username)
    except UnknownUser as e:
        fail(str(e), exitcodes.NOT_FOUND)


def _factor_error(e) -> None:
    fail(e.message, exitcodes.REASON_CODES.get(e.reason, exitcodes.ERROR),
         reason=e.reason.value if e.reason else None)


def _finish(result, as_json: bool, success: str | None = None) -> None:
    """Print a Verification and exit with its code."""
    data = result.to_json()
    if result.ok:
        emit(as_json, data, success or result.message)
        return
    fail(result.message, exitcodes.REASON_CODES.get(result.reason, exitcodes.AUTH_FAILED),
         reason=data.get("reason"), data=data)


def _code_arg(code: str | None, code_stdin: bool, prompt: str) -> str:
    if code is not None:
        return code
    value = read_line(prompt, hidden=True) if (code_stdin or not sys.stdin.isatty()) else \
        ask(prompt, hide_input=True)
    if not value:
        fail("no code given", exitcodes.USAGE)
    return value


code_options = [
    click.option("--code", help="The code (or --code-stdin, or you are asked); never a "
                 "password: those only from --code-stdin or the prompt."),
    click.option("--code-stdin", is_flag=True, help="Read the code from standard input."),
]


def with_code(func):
    for option in reversed(code_options):
        func = option(func)
    return func


# --------------------------------------------------------------------------- enrol


def _waiting(ctx: Context, user, kind: str) -> str | None:
    """`--confirm` without `--name`: the name of the only ``kind`` enrolment (``totp``, a
    channel: the command's and the store's name alike) waiting for its code, or the one
    the person picks at a terminal; without a terminal, several waiting is a usage error
    naming them (exit 2). None when none is waiting (the factor says so)."""
    names = [m.name for m in ctx.store().list_methods(user.id, kind) if not m.confirmed]
    if len(names) <= 1:
        return names[0] if names else None
    label = kinds.label_of_store(kind)
    if sys.stdin.isatty():
        say(f"Several {label} enrolments are waiting for their code:")
        chosen = TerminalInteraction().choose("Which one", [(n, n) for n in names], names[-1])
        if chosen is not None:
            return chosen
    fail(f"several {label} enrolments are waiting for their code: say which with --name ("
         + ", ".join(repr(n) for n in names) + f"), e.g. `token-agent enrol {kind} --user "
         f"{user.username} --name {shlex.quote(names[-1])} --confirm CODE`", exitcodes.USAGE)


@enrol.command("password")
@user_option
@click.option("--password-stdin", is_flag=True, help="Read the new password from standard input.")
@json_option
@pass_ctx
def enrol_password(ctx: Context, username: str, password_stdin: bool, as_json: bool) -> None:
    """Set or change a user's password (typed twice; at least 8 characters)."""
    from ..factors import FactorError, password

    user = _user(ctx, username)
    require_login(ctx, user)
    if password_stdin or not sys.stdin.isatty():
        new = read_line("New password", hidden=True)
    else:
        new = ask("New password", hide_input=True, confirmation_prompt=True)
    if not new:
        fail("no password given", exitcodes.USAGE)
    try:
        password.set_password(ctx.agent().factors(), user.id, new)
    except FactorError as e:
        fail(e.message, exitcodes.USAGE)
    emit(as_json, {"user": user.username, "password_set": True}, f"password set for {user.username}")


@enrol.command("totp")
@user_option
@click.option("--name", help="A name for this app (default: 'authenticator app'); with "
                             "--confirm, which waiting enrolment (default: the only one).")
@click.option("--qr", "qr_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Also write the QR code to FILE (.png or .svg), for a web page.")
@click.option("--confirm", "confirm_code", metavar="CODE",
              help="Confirm a waiting enrolment with the first code the app shows.")
@json_option
@pass_ctx
def enrol_totp(ctx: Context, username: str, name: str | None, qr_path: str | None,
               confirm_code: str | None, as_json: bool) -> None:
    """Set up an authenticator app (TOTP): shows the QR code, then asks for the first code.

    With --json (scripts, web pages) it prints the provisioning URI and stops; confirm with
    `--confirm CODE` afterwards. The enrolment is usable only once confirmed."""
    from ..factors import FactorError, totp

    user = _user(ctx, username)
    require_login(ctx, user)
    fctx = ctx.agent().factors()
    if confirm_code is not None:
        name = name or _waiting(ctx, user, "totp")
        try:
            result = totp.confirm_enrol(fctx, user.id, confirm_code, name=name)
        except FactorError as e:
            _factor_error(e)
        _finish(result, as_json, f"authenticator app {name!r} confirmed for {user.username}")
        return
    from ..store import CredentialExists

    name = name or totp.NAME

    try:
        pending = totp.begin_enrol(fctx, user.id, name=name)
    except CredentialExists as e:
        fail(str(e), exitcodes.CONFLICT)
    except FactorError as e:
        _factor_error(e)
    if qr_path:
        try:
            totp.write_qr(pending.uri, qr_path)
        except (ValueError, OSError) as e:
            fail(f"cannot write the QR code: {e}", exitcodes.USAGE)
    if as_json:
        emit(True, {**pending.to_json(), "qr_file": qr_path, "confirmed": False}, "")
        return
    say(f"Scan this QR code with your authenticator app (or enter the key {pending.secret}):")
    TerminalInteraction().show_qr(pending.uri)
    if qr_path:
        say(f"QR code written to {qr_path}")
    later = (f"not confirmed yet: run `token-agent enrol totp --user {user.username} "
             f"--name {shlex.quote(name)} --confirm CODE` with the code the app shows")

    def next_code(previous) -> str | None:  # a mistyped first code is asked for again
        if previous is not None:
            say(f"{previous.message}: type the code the app shows now")
        return read_line("Code shown by the app", hidden=False)

    try:
        result = totp.confirm_enrol_asking(fctx, user.id, next_code, name=name)
    except FactorError as e:
        _factor_error(e)
    if result is None:
        say(later)
        sys.exit(exitcodes.ERROR)
    if not result.ok and result.reason in totp.RETRY_REASONS:  # still waiting for its code
        fail(f"{result.message}; {later}", exitcodes.REASON_CODES[result.reason])
    _finish(result, False, f"authenticator app {name!r} set up for {user.username}")


def _enrol_contact(channel: str):
    label = kinds.by_cli(channel).destination

    @click.option("--to", "destination", help="The email address or phone number.")
    @click.option("--name", help="A name for it (default: the masked destination).")
    @click.option("--confirm", "confirm_code", metavar="CODE",
                  help="Confirm a waiting enrolment with the code that was sent.")
    @user_option
    @json_option
    @pass_ctx
    def command(ctx: Context, username: str, destination: str | None, name: str | None,
                confirm_code: str | None, as_json: bool) -> None:
        from ..factors import FactorError, codes

        user = _user(ctx, username)
        require_login(ctx, user)
        fctx = ctx.agent().factors()
        if confirm_code is None:
            if not destination:
                fail(f"give {label} with --to", exitcodes.USAGE)
            from ..store import CredentialExists

            try:
                method, receipt = codes.add_contact(fctx, user.id, channel, destination, name=name)
            except ValueError as e:
                fail(str(e), exitcodes.USAGE)
            except CredentialExists as e:
                fail(str(e), exitcodes.CONFLICT)
            except FactorError as e:
                _factor_error(e)
            prompt = codes.prompt_for(method, receipt)
            if as_json:
                emit(True, {"user": user.username, "channel": channel, "method": method.name,
                            "sent_via": receipt.channel, "to": receipt.destination_hint,
                            "confirmed": False}, "")
                return
            say(prompt)
            name = method.name
            confirm_code = read_line("Code", hidden=True)
            if not confirm_code:
                say(f"not confirmed yet: run `token-agent enrol {channel} --user {user.username} "
                    "--confirm CODE` with the code you received")
                sys.exit(exitcodes.ERROR)
        else:
            name = name or _waiting(ctx, user, channel)
        try:
            result = codes.confirm_contact(fctx, user.id, channel, confirm_code, name=name)
        except FactorError as e:
            _factor_error(e)
        _finish(result, as_json, f"{channel} confirmed for {user.username}")

    command.__doc__ = (f"Set up {label} for one-time codes: a code is sent there at once, and "
                       "the method is usable when that code is entered.")
    return command


for _channel in CHANNELS:
    enrol.command(_channel)(_enrol_contact(_channel))


@enrol.command("push")
@user_option
@click.option("--companion", "companion_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the companion app's file (its private key; keep it private).")
@click.option("--name", default="companion app", show_default=True)
@json_option
@pass_ctx
def enrol_push(ctx: Context, username: str, companion_path: str, name: str, as_json: bool) -> None:
    """Pair a companion app for push approval with number matching (`token-agent approve`
    plays the app)."""
    from ..factors import FactorError, push
    from ..store import CredentialExists

    user = _user(ctx, username)
    require_login(ctx, user)
    try:
        fctx = ctx.agent().factors()
        method = push.enrol(fctx, user.id, companion_path, name=name)
        # the companion file was written here: pair it in this process (the pairing signs
        # the agent's challenge with the companion's key, proving the file works)
        method = push.pair(fctx, user.id, method, push.load_companion(companion_path))
    except CredentialExists as e:
        fail(str(e), exitcodes.CONFLICT)
    except (FactorError, ValueError, OSError) as e:
        fail(getattr(e, "message", None) or str(e), exitcodes.USAGE)
    emit(as_json, {"user": user.username, "method": method.name, "companion": companion_path},
         f"companion app {method.name!r} paired for {user.username}: {companion_path}")


@enrol.command("app-password")
@user_option
@click.option("--name", required=True, help="What it is for, e.g. 'ward printer'.")
@click.option("--length", type=click.IntRange(8, 64), default=16, show_default=True)
@json_option
@pass_ctx
def enrol_app_password(ctx: Context, username: str, name: str, length: int, as_json: bool) -> None:
    """Create an app password for a legacy application (shown once; revoke with
    `methods remove --user U app-password --name NAME`)."""
    from ..factors import apppasswords
    from ..store import CredentialExists

    user = _user(ctx, username)
    require_login(ctx, user)
    agent = ctx.agent()
    if not agent.policy.legacy.app_passwords:
        say("warning: the policy does not allow legacy access ([legacy] app_passwords = true): "
            "this app password will not work until it does")
    try:
        method, password = apppasswords.create(agent.factors(), user.id, name, length=length)
    except CredentialExists as e:
        fail(str(e), exitcodes.CONFLICT)
    emit(as_json, {"user": user.username, "name": method.name, "app_password": password},
         f"app password {method.name!r} for {user.username} (shown once, never again):\n"
         f"  {password}")


@enrol.command("backup-codes")
@user_option
@json_option
@pass_ctx
def enrol_backup_codes(ctx: Context, username: str, as_json: bool) -> None:
    """Generate ten backup codes (shown once; replaces any earlier set)."""
    from ..factors import backup

    user = _user(ctx, username)
    require_login(ctx, user)
    _, codes = backup.generate(ctx.agent().factors(), user.id)
    emit(as_json, {"user": user.username, "backup_codes": codes},
         f"backup codes for {user.username} (each works once; keep them somewhere safe):\n"
         + "\n".join(f"  {c}" for c in codes))


# --------------------------------------------------------------------------- send, verify


@main.command("send-code")
@click.argument("channel", type=click.Choice(CHANNELS))
@user_option
@name_option
@json_option
@pass_ctx
def send_code(ctx: Context, channel: str, username: str, name: str | None, as_json: bool) -> None:
    """Send a one-time login code by CHANNEL (then: token-agent verify CHANNEL --code C)."""
    from ..factors import FactorError, codes

    user = _user(ctx, username)
    method = ctx.store().find_method(user.id, channel, name)
    if method is None or not method.confirmed:
        fail(f"{user.username} has no confirmed {channel} method", exitcodes.NOT_FOUND)
    try:
        receipt = codes.send_code(ctx.agent().factors(), method, purpose="login")
    except FactorError as e:
        _factor_error(e)
    emit(as_json, {"user": user.username, "channel": channel, "sent_via": receipt.channel,
                   "fell_back_from": receipt.fell_back_from, "to": receipt.destination_hint},
         codes.prompt_for(method, receipt))


@main.command("verify")
@click.argument("kind", type=click.Choice(VERIFY_KINDS))
@user_option
@name_option
@with_code
@json_option
@pass_ctx
def verify(ctx: Context, kind: str, username: str, name: str | None, code: str | None,
           code_stdin: bool, as_json: bool) -> None:
    """Check one factor: exit 0 when it is accepted, non-zero otherwise (3 wrong, 6 locked).

    The code comes from --code, --code-stdin or a prompt; a password (`verify password`,
    `verify app-password`) only from --code-stdin or the prompt, never from the command
    line (exit 2)."""
    from ..factors import FactorError, apppasswords, backup, codes, password, totp

    user = _user(ctx, username)
    agent = ctx.agent()
    fctx = agent.factors()
    prompt = kinds.by_cli(kind).label.capitalize() if kind in SECRET_KINDS else "Code"
    if code is not None and kind in SECRET_KINDS:
        # like PINs: never in argv (other users' `ps`, /proc/PID/cmdline, shell history)
        fail(f"a {prompt.lower()} is never taken on the command line (--code): other "
             "processes and the shell history would see it; type it at the prompt or give "
             "it on standard input with --code-stdin", exitcodes.USAGE)
    value = _code_arg(code, code_stdin, prompt)
    try:
        if kind == "password":
            result = password.verify(fctx, user.id, value)
        elif kind == "totp":
            result = totp.verify(fctx, user.id, value, name=name)
        elif kind == "backup":
            result = backup.verify(fctx, user.id, value)
        elif kind == "app-password":
            result = apppasswords.verify(fctx, user.id, value,
                                         legacy_allowed=agent.policy.legacy.app_passwords)
        else:
            method = ctx.store().find_method(user.id, kinds.by_cli(kind).store, name)
            if method is None or not method.confirmed:
                fail(f"{user.username} has no confirmed {kind} method", exitcodes.NOT_FOUND)
            result = codes.verify_code(fctx, method, value, purpose="login")
    except FactorError as e:
        _factor_error(e)
    _finish(result, as_json)


# --------------------------------------------------------------------------- methods


@main.group()
def methods() -> None:
    """A user's authentication methods: list, choose the preferred one, remove."""


@methods.command("list")
@user_option
@json_option
@pass_ctx
def methods_list(ctx: Context, username: str, as_json: bool) -> None:
    """List the user's methods."""
    user = _user(ctx, username)
    data = admin_ops.list_methods(ctx.store(), user)

    def text() -> str:
        lines = []
        for d in data:
            flags = [f for f, on in (("preferred", d["preferred"]), ("not confirmed", not d["confirmed"]),
                                     (f"suspended: {d['flag_reason']}", d["flagged"]),
                                     ("locked", bool(d["locked_until"]))) if on]
            lines.append(f"{d['kind']:<13} {d['name']!r:<32} {', '.join(flags)}")
        return "\n".join(lines) or f"{user.username} has no methods"

    emit(as_json, {"user": user.username, "methods": data}, text)


def _find(ctx: Context, user, kind: str, name: str | None):
    method = admin_ops.find_method(ctx.store(), user, kind, name)
    if method is None:
        fail(admin_ops.missing_method(user, kind, name), exitcodes.NOT_FOUND)
    return method


@methods.command("prefer")
@user_option
@click.argument("kind", type=click.Choice(admin_ops.METHOD_KINDS))
@name_option
@json_option
@pass_ctx
def methods_prefer(ctx: Context, username: str, kind: str, name: str | None, as_json: bool) -> None:
    """Make a method the user's preferred one (the default at sign-in)."""
    from ..store import InvalidValue

    user = _user(ctx, username)
    require_login(ctx, user)
    method = _find(ctx, user, kind, name)
    try:
        admin_ops.prefer_method(ctx.store(), user, method, None)
    except InvalidValue as e:
        fail(str(e), exitcodes.USAGE)
    emit(as_json, {"user": user.username, "preferred": kind, "name": method.name},
         f"{user.username} now signs in with {kind} {method.name!r} by default")


@methods.command("remove")
@user_option
@click.argument("kind", type=click.Choice(admin_ops.METHOD_KINDS))
@name_option
@json_option
@pass_ctx
def methods_remove(ctx: Context, username: str, kind: str, name: str | None, as_json: bool) -> None:
    """Remove one of the user's methods (an app password: revoke it)."""
    user = _user(ctx, username)
    require_login(ctx, user)
    method = _find(ctx, user, kind, name)
    try:
        admin_ops.remove_method(ctx.agent(), user, method, None)
    except admin_ops.RemovalRefused as e:
        fail(f"{method.name!r} was not removed: {e}", exitcodes.CONFLICT)
    emit(as_json, {"user": user.username, "removed": kind, "name": method.name},
         f"removed {kind} {method.name!r} of {user.username}")


# --------------------------------------------------------------------------- the companion


@main.command("approve")
@click.option("--companion", "companion_path", required=True, type=click.Path(dir_okay=False),
              help="The companion app's file (from `enrol push`).")
@click.option("--number", type=int, help="The number shown on the login screen (else asked).")
@click.option("--deny", is_flag=True, help="Deny the sign-in instead.")
@click.option("--wait", "wait_seconds", type=click.FloatRange(0, 300), default=0.0,
              help="Wait up to this many seconds for a request to arrive.")
@json_option
@pass_ctx
def approve(ctx: Context, companion_path: str, number: int | None, deny: bool,
            wait_seconds: float, as_json: bool) -> None:
    """The companion app: show the sign-in waiting for approval, and approve it by entering
    the number the login screen shows (or deny it)."""
    import time

    from ..factors import FactorError, push

    try:
        companion = push.load_companion(companion_path)
    except (FactorError, ValueError, OSError) as e:
        fail(getattr(e, "message", None) or str(e), exitcodes.USAGE)
    fctx = ctx.agent().factors()
    deadline = time.monotonic() + wait_seconds
    while True:
        pending = push.pending_for(fctx, companion)
        if pending or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if not pending:
        fail("no sign-in is waiting for approval", exitcodes.NOT_FOUND)
    request = pending[-1]
    say(f"Sign-in request for {companion.username}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(request.context.items())))
    if not deny and number is None:
        typed = read_line("Enter the number shown on the login screen (or 'deny')", hidden=False)
        if typed is None:
            fail("no answer", exitcodes.TIMEOUT)
        if typed.strip().lower() == "deny":
            deny = True
        else:
            try:
                number = int(typed.strip())
            except ValueError:
                fail("that is not a number", exitcodes.USAGE)
    signed = push.answer(companion, request.id, approve=not deny, number=number)
    try:
        state = push.submit(fctx, signed)
    except FactorError as e:
        _factor_error(e)
    said = {"approved": "approved", "denied": "denied: the sign-in is refused",
            "wrong-number": "wrong number: the sign-in is refused",
            "expired": "too late: the request had expired"}.get(state, state)
    if state not in ("approved", "denied"):
        fail(said, exitcodes.AUTH_FAILED, reason=state,
             data={"request": request.id, "state": state})
    emit(as_json, {"request": request.id, "state": state}, said)
