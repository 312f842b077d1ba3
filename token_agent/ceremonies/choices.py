"""The second-factor menu of a login: one choice per method a person can tell apart.

A user may hold several contacts of one channel (a mobile and an "alternate phone", two
email addresses): each is its own choice, labelled with its name and its masked destination
("text message code: alternate phone (+44•••••456)"), so that the code goes where the
person expects. Other kinds (an authenticator app, backup codes, push, a key, a card) are one
choice each, as the policy names them.

Keys of the choices (what ``--second``, ``login.start``'s ``second`` and a "choose" answer
give):

* the policy's method name (``totp``, ``backup``, ``sms``, ``email`` ...). For a contact
  channel it means the channel's default contact: the preferred method when it is of that
  channel, else the first one enrolled;
* ``CHANNEL:NAME`` (``sms:alternate phone``): that contact, by name (case-insensitive).
  When a user has several contacts of a channel, the menu's keys are of this form.

* ``call:KEY`` (``call:voice``, ``call:sms:mobile``): phone call approval ("press #") to
  the phone contact ``KEY`` names, offered when the voice gateway can make approval calls
  (``factors/voicecall.py``). For a ``voice`` contact it comes before the choice that reads
  a code aloud (which stays as the fallback); for an ``sms`` one, after the text message.

The default choice is the user's preferred method (``methods prefer``, a contact by its
name), unless it is locked and another is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import kinds

#: second factors a login may be asked for by name
SECOND_METHODS = tuple(k.policy for k in kinds.ALL if k.second or k.fallback)
#: the second factors that are contacts (a destination each; several per user)
CONTACT_METHODS = tuple(k.policy for k in kinds.CONTACTS)
#: the prefix of a phone call approval's key, and the contacts a call can go to
CALL = "call"
CALL_METHODS = ("voice", "sms")


def split_call(value: str) -> tuple[bool, str]:
    """``"call:sms:mobile"`` -> ``(True, "sms:mobile")``; anything else -> ``(False,
    value)``. ``ValueError`` when the call names no phone contact."""
    base, sep, rest = value.partition(":")
    if base.strip() != CALL:
        return False, value
    if not sep or rest.partition(":")[0].strip() not in CALL_METHODS:
        raise ValueError(f"{value!r}: a phone call goes to a phone contact: call:voice or "
                         "call:sms (or call:CHANNEL:NAME)")
    return True, rest.strip()


def parse_second(value: str) -> tuple[str, str | None]:
    """``"sms"`` -> ``("sms", None)``; ``"sms:alternate phone"`` -> ``("sms",
    "alternate phone")``. ``ValueError`` (a message for people) for anything else."""
    base, sep, name = value.partition(":")
    base = base.strip()
    if base not in SECOND_METHODS:
        raise ValueError(f"unknown second factor {value!r}: one of "
                         f"{', '.join(SECOND_METHODS)}, or CHANNEL:NAME for one contact "
                         f"({', '.join(CONTACT_METHODS)})")
    if not sep:
        return base, None
    if base not in CONTACT_METHODS:
        raise ValueError(f"only a contact is chosen by name ({', '.join(CONTACT_METHODS)}): "
                         f"{base}:NAME")
    if not name.strip():
        raise ValueError(f"{value!r}: give the contact's name after the colon")
    return base, name.strip()


@dataclass(frozen=True)
class Choice:
    """One entry of the menu: its ``key``, what people read (``label``), the policy's name
    and the user's method behind it."""

    key: str
    label: str
    name: str
    method: object  # store.Method
    #: phone call approval ("press #") rather than a code
    call: bool = False


def _label(method, hint: str | None) -> str:
    label = kinds.by_store(method.kind).label
    if hint is None:
        return label
    if hint in method.name:  # the default name ("sms +44•••••123") already shows it
        return f"{label}: {method.name}"
    return f"{label}: {method.name} ({hint})"


def _call_choice(choice: Choice, hint: str | None) -> Choice:
    where = f" ({hint})" if hint else ""
    return Choice(f"{CALL}:{choice.key}", f"phone call: press #{where}", choice.name,
                  choice.method, call=True)


def menu(ctx, user_methods: list, usable: list[str]) -> list[Choice]:
    """The choices for a user holding ``user_methods`` (usable ones, in order of
    enrolment) of which the policy accepts ``usable`` (policy names, in its order)."""
    from ..factors import codes, voicecall

    hints = {c.method.id: c.hint for c in codes.list_contacts(ctx, user_methods[0].user_id)} \
        if user_methods else {}
    calls = voicecall.available(ctx)
    out: list[Choice] = []
    for name in usable:
        held = [m for m in user_methods if kinds.by_store(m.kind).policy == name]
        if not held:
            continue
        if name not in CONTACT_METHODS:
            out.append(Choice(name, kinds.by_policy(name).label, name, held[0]))
            continue
        several = len(held) > 1
        for m in held:
            choice = Choice(f"{name}:{m.name}" if several else name,
                            _label(m, hints.get(m.id)), name, m)
            call = _call_choice(choice, hints.get(m.id)) if calls and name in CALL_METHODS \
                else None
            out.extend([call, choice] if call and name == "voice" else
                       [choice, call] if call else [choice])
    return out


def find(choices: list[Choice], key: str, preferred=None) -> Choice | None:
    """The choice ``key`` means (see the module docstring), or None."""
    try:
        call, key = split_call(key)
        name, contact = parse_second(key)
    except ValueError:
        return None
    mine = [c for c in choices if c.name == name and c.call == call]
    if contact is not None:
        wanted = contact.casefold()
        return next((c for c in mine if c.method.name.casefold() == wanted), None)
    if preferred is not None:
        for c in mine:
            if c.method.id == preferred.id:
                return c
    return mine[0] if mine else None


def default(choices: list[Choice], preferred, locked: set[int]) -> Choice:
    """The preferred method's choice unless it is locked and another is not; else the
    first open one."""
    open_ = [c for c in choices if c.method.id not in locked] or choices
    if preferred is not None:
        for c in open_:
            if c.method.id == preferred.id:
                return c
    return open_[0]


def locked(ctx, choices: list[Choice]) -> set[int]:
    """The ids of the choices' methods locked now for this login (``ctx.familiar``: failures
    from an unfamiliar device or network count apart)."""
    from ..factors import lockout

    now = ctx.now()
    out = set()
    for c in choices:
        scope = lockout.scope_for(lockout.method_scope(c.method.id), ctx.familiar)
        if lockout.state(ctx.store, scope).locked(now):
            out.add(c.method.id)
    return out
