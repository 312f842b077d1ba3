"""Enrolment at the first login: the policy requires a second factor and the user has none,
so the login asks them to choose one (or takes ``--second``/``second``: a method, or
``CHANNEL:NAME`` naming the new contact) and sets it up there, confirmed with its first code;
left unanswered, nothing stays half-enrolled. Used by ``login.py``'s flow alone."""

from __future__ import annotations

from .. import kinds
from ..factors import FactorError, Verification
from ..outcome import Reason
from .login import _ask, _Cancelled

#: second factors that can be set up at the login prompt, strongest first
ENROLLABLE_AT_LOGIN = tuple(k.policy for k in kinds.ENROL_AT_LOGIN)


def enrol_at_login(agent, user, interaction, decision, second=None) -> Verification:
    """First login after enforcement with no second factor: choose one (``second`` when
    given: a method, or ``CHANNEL:NAME`` naming the new contact) and set it up now. Left
    unanswered, nothing stays half-enrolled and the login ends as enrolment-required."""
    store = agent.store
    before = {m.id for m in store.list_methods(user.id)}
    try:
        return _enrol_now(agent, user, interaction, decision, second)
    except _Cancelled:
        for m in store.list_methods(user.id):
            if m.id not in before and not m.confirmed:
                store.remove_method(m.id)
        return Verification(False, "totp", None, Reason.ENROLMENT_REQUIRED,
                            "your organisation requires a second factor and none was set up: "
                            "run token-agent enrol totp (or sms, email, key) or log in at a "
                            "terminal to set one up")


def _enrol_now(agent, user, interaction, decision, second) -> Verification:
    from ..factors import codes, totp
    from .choices import parse_second

    ctx = agent.factors()
    options = [m for m in ENROLLABLE_AT_LOGIN if m in decision.allowed_methods
               and (m == "totp" or (agent.delivery is not None
                                    and m in agent.delivery.configured_channels()))]
    if not options:
        return Verification(False, "totp", None, Reason.ENROLMENT_REQUIRED,
                            "your organisation requires a second factor and none can be set up "
                            "here: ask your administrator")
    name = None
    if second is not None:  # scripts: `login --second sms`
        try:
            chosen, name = parse_second(second)
        except ValueError as e:
            return Verification(False, "totp", None, Reason.METHOD_NOT_ALLOWED, str(e))
        if chosen in options:
            interaction.info(f"Your organisation requires a second factor: setting up "
                             f"{kinds.by_policy(chosen).label} now.")
    else:
        interaction.info("Your organisation requires a second factor. Choose one and set it "
                         "up now.")
        chosen = _ask(interaction.choose("Second factor to set up",
                                         [(m, kinds.by_policy(m).label) for m in options], options[0]))
    if chosen not in options:
        return Verification(False, kinds.store_of_policy(chosen), None, Reason.METHOD_NOT_ALLOWED,
                            f"{chosen} cannot be set up here (choose from {', '.join(options)})")
    if chosen == "totp":
        pending = totp.begin_enrol(ctx, user.id)
        interaction.info("Scan this QR code with your authenticator app "
                         f"(or type the key {pending.secret}):")
        interaction.show_qr(pending.uri)

        def code(previous: Verification | None) -> str | None:
            if previous is None:
                return _ask(interaction.secret("Code shown by your authenticator app"))
            interaction.info(f"{previous.message}: type the code the app shows now")
            return interaction.secret("Code shown by your authenticator app")  # None: stop

        return totp.confirm_enrol_asking(ctx, user.id, code, name=pending.method.name)
    destination = _ask(interaction.text("Email address" if chosen == "email" else "Phone number"))
    try:
        method, receipt = codes.add_contact(ctx, user.id, chosen, destination, name=name)
    except (FactorError, ValueError) as e:
        return Verification(False, chosen, None, getattr(e, "reason", Reason.DELIVERY_FAILED),
                            getattr(e, "message", str(e)))
    typed = _ask(interaction.secret(codes.prompt_for(method, receipt)))
    return codes.confirm_contact(ctx, user.id, chosen, typed, name=method.name)
