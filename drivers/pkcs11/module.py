"""Loading a PKCS#11 module, and finding the slot of a reader, with clear errors.

:func:`load_module` loads (and C_Initializes, once per process and library) the module
named by a path or a bare file name (``dlopen``'s search path: ``opensc-pkcs11.so`` is found
in the system's library directory). A library already loaded under another name (a symbolic
link such as ``.../pkcs11/opensc-pkcs11.so``, or a bare name the loader matches to a loaded
library's soname) is the same library to ``dlopen``, and a second C_Initialize of it fails
(CKR_CRYPTOKI_ALREADY_INITIALIZED): so the loaded libraries are kept by ``dlopen``'s handle,
and every name of one library gets its one initialised instance. What can go wrong becomes a
:class:`~drivers.pkcs11.errors.Pkcs11ModuleError` naming the module.

:func:`find_slot` binds a reader to its slot: the slot whose description is the reader's
name. OpenSC pads slot descriptions to 64 characters and truncates longer names, so the
names are compared without trailing spaces, a 64-character description as a prefix. A
PKCS#11 session opened on that slot is bound to that reader.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

from .errors import NoCard, NoReader, NoToken, PcscError, Pkcs11ModuleError

__all__ = ["DEFAULT_MODULE", "find_slot", "load_module", "reader_matches"]

DEFAULT_MODULE = "opensc-pkcs11.so"
#: CK_SLOT_INFO.slotDescription is 64 bytes (padded with spaces, longer names truncated)
DESCRIPTION_LENGTH = 64

_lock = threading.Lock()
#: dlopen's handle of a loaded module -> its initialised ``pkcs11.lib``
_by_handle: dict[int, Any] = {}


def _loaded_handle(path: str) -> int | None:
    """``dlopen``'s handle for ``path`` when that library is loaded in this process already
    (under this name or another), else None (RTLD_NOLOAD: nothing is loaded here)."""
    try:
        return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)._handle
    except OSError:
        return None


def load_module(module: str | os.PathLike | None = None) -> Any:
    """The loaded ``pkcs11.lib`` for ``module`` (:data:`DEFAULT_MODULE` when None)."""
    path = os.fspath(module) if module else DEFAULT_MODULE
    if "/" in path and not os.path.exists(path):
        raise Pkcs11ModuleError(path, "the file does not exist")
    if "/" in path and os.path.isdir(path):
        raise Pkcs11ModuleError(path, "it is a directory, not a module")
    try:
        import pkcs11
    except ImportError:  # pragma: no cover - a dependency of the package
        raise Pkcs11ModuleError(path, "the Python package python-pkcs11 is not installed") from None
    with _lock:
        handle = _loaded_handle(path)
        if handle is not None and handle in _by_handle:
            return _by_handle[handle]
        try:
            lib = pkcs11.lib(path)
        except pkcs11.PKCS11Error as e:
            raise Pkcs11ModuleError(path, _load_problem(str(e))) from None
        handle = _loaded_handle(path)
        if handle is not None:
            _by_handle[handle] = lib
        return lib


def _load_problem(text: str) -> str:
    lower = text.lower()
    if "no such file" in lower or "cannot open shared object" in lower:
        return "no such module was found"
    if "c_getfunctionlist" in lower or "invalid elf" in lower or "file too short" in lower:
        return "it is not a PKCS#11 module"
    if "loading" in lower:
        return "it cannot be loaded"
    return f"its initialisation (C_Initialize) failed ({text})"


def reader_matches(description: str, reader: str) -> bool:
    """Whether a slot's description names ``reader`` (see the module docstring)."""
    d, r = description.rstrip(), reader.rstrip()
    if not d:
        return False
    return d == r or (len(description) >= DESCRIPTION_LENGTH - 1 and r.startswith(d))


def find_slot(lib: Any, module: str, reader: str | None) -> tuple[Any, str]:
    """(slot, reader name) of the token to use: the slot of ``reader``, or, when no reader is
    given, the only slot with a token. :class:`NoReader` (no such reader), :class:`NoCard`
    (the reader is empty), :class:`NoToken` (a card the module does not recognise),
    :class:`PcscError` (several cards and no reader named)."""
    import pkcs11

    try:
        slots = lib.get_slots(token_present=False)
    except pkcs11.PKCS11Error as e:
        raise PcscError(f"The smartcard module {module} cannot list the readers "
                        f"({type(e).__name__}).") from None
    if reader:
        mine = [s for s in slots if reader_matches(s.slot_description, reader)]
        if not mine:
            known = ", ".join(sorted({s.slot_description.strip() for s in slots})) or "none"
            raise NoReader(f"The smartcard module {module} has no reader named {reader!r} "
                           f"(its readers: {known}).")
        for slot in mine:
            if _has_token(slot):
                return slot, reader
        if any(_card_present(s) for s in mine):
            raise NoToken(module, reader)
        raise NoCard()
    with_token = [s for s in slots if _has_token(s)]
    if len(with_token) == 1:
        return with_token[0], with_token[0].slot_description.strip()
    if with_token:
        names = ", ".join(s.slot_description.strip() for s in with_token)
        raise PcscError(f"Several smartcards are inserted ({names}): say which reader to use.")
    if not slots:
        raise NoReader()
    present = [s for s in slots if _card_present(s)]
    if present:
        raise NoToken(module, present[0].slot_description.strip() if len(present) == 1 else None)
    raise NoCard()


def _has_token(slot: Any) -> bool:
    import pkcs11

    try:
        slot.get_token()
    except pkcs11.PKCS11Error:
        return False
    return True


def _card_present(slot: Any) -> bool:
    """Whether the reader of ``slot`` holds a card (a token the module may not recognise)."""
    import pkcs11
    from pkcs11.constants import SlotFlag

    try:
        if slot.flags & SlotFlag.TOKEN_PRESENT:
            return True
    except pkcs11.PKCS11Error:
        pass
    try:
        slot.get_token()
    except pkcs11.exceptions.TokenNotRecognised:
        return True
    except pkcs11.PKCS11Error:
        return False
    return True
