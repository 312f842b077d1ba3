"""The second factor of a login (``ceremonies/login.py``'s step 5): the method chosen (or the
preferred one, with "use a different method" offered) and its challenge: a code from the
authenticator app, a backup code, a code sent to a contact, a phone call answered with #, a
push approval with number matching, or a security key or card. Split from ``login.py``, which
calls it; the person is reached through the login's ``Interaction`` only."""

from __future__ import annotations

from .. import kinds
from ..factors import FactorError, Verification, usable_methods
from ..outcome import LoginOutcome, Reason


def second_factor(agent, user, interaction, decision, *, second, key_login, card_login,
                   push_timeout, cancel, device, ctx) -> Verification | LoginOutcome:
    """The second factor: ``second`` when given (``choices``: a method, or one contact by
    name), else the preferred one, with the others offered as "use a different method" (one
    choice per contact); a locked one is not the default when another is not locked."""
    from ..factors import backup, codes, push, totp, voicecall
    from . import choices
    from .login import _ask, _no_reader

    store = agent.store
    held = usable_methods(store, user.id)
    menu = choices.menu(ctx, held, decision.usable_methods)
    preferred = store.preferred_method(user.id)
    if second is None and not menu:
        return Verification(False, "totp", None, Reason.ENROLMENT_REQUIRED,
                            f"none of {user.username}'s methods is acceptable here (acceptable: "
                            f"{', '.join(decision.allowed_methods) or 'none'}): set one up")
    if second is None:
        first = choices.default(menu, preferred, choices.locked(ctx, menu))
        key = first.key if len(menu) == 1 else _ask(interaction.choose(
            "Second factor (or use a different method)",
            [(c.key, c.label) for c in menu], first.key))
    else:
        key = second
    try:
        call, plain = choices.split_call(key)
        chosen, contact = choices.parse_second(plain)
    except ValueError as e:
        return Verification(False, "totp", None, Reason.METHOD_NOT_ALLOWED, str(e))
    if chosen not in decision.allowed_methods:
        return Verification(False, kinds.store_of_policy(chosen), None, Reason.METHOD_NOT_ALLOWED,
                            f"{chosen} is not allowed as a second factor for {user.username} "
                            f"(allowed: {', '.join(decision.allowed_methods) or 'none'})")
    everything = choices.menu(ctx, held, [chosen])  # held, even where the policy says no
    picked = choices.find(menu, key, preferred) or choices.find(everything, key, preferred)
    if picked is None and call and not voicecall.available(ctx):
        return Verification(False, kinds.store_of_policy(chosen), None,
                            Reason.METHOD_NOT_ALLOWED, "phone call approval is not available "
                            "here: choose a code instead")
    if picked is None:
        return Verification(False, kinds.store_of_policy(chosen), None, Reason.NO_CREDENTIAL,
                            f"{user.username} has no {chosen} method set up"
                            + (f" named {contact!r}" if contact else ""))
    method = picked.method
    if call:  # phone call approval: "we are calling ...: answer and press #"
        return voicecall.call_and_wait(ctx, method, interaction.info, timeout=push_timeout,
                                       cancel=cancel)
    if chosen == "totp":
        return totp.verify(ctx, user.id, _ask(interaction.secret("Code from your authenticator app")))
    if chosen == "backup":
        return backup.verify(ctx, user.id, _ask(interaction.secret("Backup code")))
    if kinds.by_policy(chosen).contact:
        try:
            receipt = codes.send_code(ctx, method, purpose="login")
        except FactorError as e:
            return Verification(False, method.kind, method, e.reason, e.message)
        sent = store.get_method(method.id)
        typed = _ask(interaction.secret(codes.prompt_for(sent, receipt)))
        return codes.verify_code(ctx, method, typed, purpose="login")
    if chosen == "push":
        try:
            request = push.start(ctx, user.id, method=method,
                                 context={"username": user.username, "device": device.kind,
                                          "network": device.network or "unknown"})
        except FactorError as e:
            return Verification(False, method.kind, method, e.reason, e.message)
        interaction.info(f"Open the sign-in approval page on your phone (or your companion "
                         f"app) and enter the number {request.number:02d}")
        return push.wait(ctx, request.id, timeout=push_timeout, cancel=cancel)
    if chosen in ("key", "card"):
        runner = key_login if chosen == "key" else card_login
        if runner is None:
            return Verification(False, kinds.by_policy(chosen).store, method, Reason.NO_DEVICE,
                                _no_reader(chosen))
        return runner(user.username)
    return Verification(False, kinds.store_of_policy(chosen), method, Reason.METHOD_NOT_ALLOWED,
                        f"{chosen} cannot be used as a second factor here")

