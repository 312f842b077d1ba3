"""A smartcard session through a PKCS#11 module, with the card-session interface the
ceremonies use (the same as :class:`drivers.pcsc.piv.PivSession`): ``driver``, ``reader``,
``certificate("9a")``, ``pin_retries()``, ``verify_pin``, ``sign``, ``unblock_pin``,
``change_pin``, ``close``, and the context manager.

**Which certificate and key.** PKCS#11 has no PIV slots: "9a" (the authentication slot)
means the certificate whose CKA_ID has a private key, preferring, in this order, an
authentication certificate (extended key usage clientAuth or Microsoft smartcard logon, then
key usage digitalSignature), a key without CKA_ALWAYS_AUTHENTICATE (one that does not ask
the PIN again for every signature), and the lowest CKA_ID. A module that hides private keys
until the PIN is given: the certificates alone are ranked, the key is looked up by CKA_ID
after the login. With OpenSC's PIV driver that is "Certificate for PIV Authentication"
(CKA_ID 01).

**PIN state.** PKCS#11 gives no count, only the token flags: USER_PIN_LOCKED (0 tries),
USER_PIN_FINAL_TRY (1 try), otherwise "more than one" (:meth:`pin_retries` says None:
unknown). A wrong PIN is :class:`WrongPin` with ``retries_left`` 1 or None, read from the
flags after the failure.

**Signatures** use the mechanism the key allows (CKA_ALLOWED_MECHANISMS when the module
gives it, else the slot's mechanism list): RSA: CKM_SHA256_RSA_PKCS, else
CKM_SHA256_RSA_PKCS_PSS (MGF1-SHA256, 32-byte salt), else CKM_RSA_PKCS over the SHA-256
DigestInfo; EC: CKM_ECDSA_SHA256, else CKM_ECDSA over the SHA-256 hash; the raw r||s is
returned DER-encoded, as PIV cards answer.

**Unblocking** (a sponsor's, with the PUK): C_Login as the security officer with the PUK and
C_InitPIN; a module that refuses the SO login (OpenSC's PIV driver does) on a card whose
flags say USER_PIN_LOCKED: C_SetPIN(PUK, new PIN) in an unlogged read-write session, which
OpenSC turns into RESET RETRY COUNTER when configured with ``user_pin_unblock_style =
set_pin_in_unlogged_session``. That fallback is never tried on a card that is not locked
(there C_SetPIN would be a PIN change with the PUK as the old PIN, spending a PIN try).
Otherwise :class:`UnblockNotSupported`: the vendor's tool is needed.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from .errors import (
    CardRemoved,
    InvalidPin,
    ObjectNotFound,
    PcscError,
    PinBlocked,
    PukBlocked,
    UnblockNotSupported,
    WrongPin,
    WrongPuk,
    translate,
)
from .module import DEFAULT_MODULE, find_slot, load_module

__all__ = ["Pkcs11CardSession"]

# DigestInfo for SHA-256 (RFC 8017 9.2, note 1)
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
_SMARTCARD_LOGON = "1.3.6.1.4.1.311.20.2.2"
#: PINs longer than this are refused before the module sees them (python-pkcs11 does not
#: expose the token's ulMaxPinLen; the module's own CKR_PIN_LEN_RANGE covers the rest)
MAX_SECRET_LENGTH = 64
#: seconds a failed call waits for PC/SC to see a removal before calling it a card failure
REMOVAL_SETTLE = 1.5


def _pkcs11():
    import pkcs11

    return pkcs11



def _close_quietly(session: Any) -> None:
    """Close a PKCS#11 session (C_CloseSession; C_Logout first for a logged-in one): a card
    already removed, or a session already gone, is not an error when closing."""
    try:
        session.close()
    except _pkcs11().PKCS11Error:
        pass

class Pkcs11CardSession:
    """A card in ``reader`` through the PKCS#11 module ``module``; see the module docstring.
    Not thread-safe beyond one call at a time (a lock serialises them)."""

    driver = "pkcs11"

    def __init__(self, lib: Any, slot: Any, *, module: str, reader: str | None) -> None:
        self.lib = lib
        self.slot = slot
        self.module = module
        self.reader = reader
        self._lock = threading.RLock()
        self._closed = False
        self._user: Any = None  # the logged-in session, after verify_pin
        self._choice: tuple[bytes, bytes] | None = None  # (CKA_ID, certificate DER)
        #: the card's ATR when the session was opened, from PC/SC (None when it cannot say):
        #: what a session bound to the card compares (token_agent.cardsession)
        self.atr: bytes | None = _reader_atr(reader)
        try:
            self.token = slot.get_token()
            self._public = self.token.open()
        except _pkcs11().PKCS11Error as e:
            raise self._failure(e) from None

    @classmethod
    def open(cls, reader: str | None = None, *, module: str | None = None
             ) -> "Pkcs11CardSession":  # fmt: skip
        """A session on the token in ``reader`` (or the only token, when None)."""
        module = str(module or DEFAULT_MODULE)
        lib = load_module(module)
        slot, name = find_slot(lib, module, reader)
        return cls(lib, slot, module=module, reader=name)

    # -- errors ------------------------------------------------------------------------------

    def _token_flags(self) -> Any | None:
        """The token's flags now (None when the token cannot be read: removed)."""
        try:
            return self.slot.get_token().flags
        except _pkcs11().PKCS11Error:
            return None

    def _failure(self, exc: BaseException, *, what: str = "PIN") -> PcscError:
        """The :class:`PcscError` for ``exc``: a DeviceError (or anything) while the token is
        gone is the card's removal."""
        error = translate(exc, what=what)
        if not isinstance(error, CardRemoved) and isinstance(exc, _pkcs11().PKCS11Error):
            if self._removed():
                return CardRemoved()
        return error

    def _removed(self) -> bool:
        """Whether the card has left the reader (PC/SC says so; else the token is gone). A
        module may notice a removal later than PC/SC: OpenSC answers a C_Login on a pulled
        card CKR_GENERAL_ERROR while its token info still reads."""
        if self.reader:
            try:
                from drivers.pcsc.readers import card_present

                present = card_present(self.reader, settle=REMOVAL_SETTLE)
            except Exception:  # noqa: BLE001 - pyscard missing or PC/SC broken: ask the module
                present = None
            if present is False:
                return True
        return self._token_flags() is None

    def _wrong_pin(self) -> PcscError:
        from pkcs11.constants import TokenFlag

        flags = self._token_flags()
        if flags is None:
            return WrongPin(None)
        if flags & TokenFlag.USER_PIN_LOCKED:
            return PinBlocked()
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            return WrongPin(1)
        return WrongPin(None, several=True)

    def _wrong_puk(self) -> PcscError:
        from pkcs11.constants import TokenFlag

        flags = self._token_flags()
        if flags is not None and flags & TokenFlag.SO_PIN_LOCKED:
            return PukBlocked()
        if flags is not None and flags & TokenFlag.SO_PIN_FINAL_TRY:
            return WrongPuk(1)
        return WrongPuk(None)

    def _check_open(self) -> None:
        if self._closed:
            raise PcscError("The card session is closed.")

    @staticmethod
    def _secret(value: str | bytes, what: str = "PIN") -> str:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if not text or len(text) > MAX_SECRET_LENGTH:
            raise InvalidPin(f"The card does not take a {what} of that form (no try was spent).")
        return text

    # -- the certificate ---------------------------------------------------------------------

    def _choose(self) -> tuple[bytes, bytes]:
        """(CKA_ID, DER) of the authentication certificate (see the module docstring)."""
        if self._choice is not None:
            return self._choice
        from pkcs11.constants import Attribute, CertificateType, ObjectClass

        session = self._user or self._public
        certs: list[tuple[bytes, bytes]] = []
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.CERTIFICATE,
                                        Attribute.CERTIFICATE_TYPE: CertificateType.X_509}):
            try:
                cert_id, der = bytes(obj[Attribute.ID]), bytes(obj[Attribute.VALUE])
            except _pkcs11().PKCS11Error:
                continue
            if der:
                certs.append((cert_id, der))
        keys: dict[bytes, bool] = {}  # CKA_ID -> CKA_ALWAYS_AUTHENTICATE
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
            try:
                key_id = bytes(obj[Attribute.ID])
            except _pkcs11().PKCS11Error:
                continue
            keys[key_id] = _always_authenticate(obj)
        if keys:  # the certificates with a key (a module may hide keys until the login)
            certs = [c for c in certs if c[0] in keys]
        if not certs:
            raise ObjectNotFound("The card holds no certificate with a private key.")
        certs.sort(key=lambda c: (_auth_rank(c[1]), keys.get(c[0], False), c[0]))
        self._choice = certs[0]
        return self._choice

    def certificate(self, slot: str | int = "9a") -> bytes:
        """The DER authentication certificate (``slot`` "9a", the only one mapped)."""
        if str(slot).lower() != "9a":
            raise ObjectNotFound(f"Only the authentication certificate (9a) is read through "
                                 f"PKCS#11, not {slot!r}.")
        with self._lock:
            self._check_open()
            try:
                return self._choose()[1]
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None

    # -- PIN ---------------------------------------------------------------------------------

    def pin_retries(self) -> int | None:
        """0 (locked), 1 (final try), or None: more than one, the module does not say how many."""
        from pkcs11.constants import TokenFlag

        with self._lock:
            self._check_open()
            try:
                flags = self.slot.get_token().flags
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None
        if flags & TokenFlag.USER_PIN_LOCKED:
            return 0
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            return 1
        return None

    def _logout(self) -> None:
        user, self._user = self._user, None
        if user is not None:
            _close_quietly(user)  # C_Logout + C_CloseSession

    def verify_pin(self, pin: str | bytes) -> None:
        """C_Login with the PIN: :class:`WrongPin` (``retries_left`` 1 or None),
        :class:`PinBlocked`, :class:`InvalidPin` (refused for its form, no try spent),
        :class:`CardRemoved`."""
        E = _pkcs11().exceptions  # noqa: N806
        text = self._secret(pin)
        with self._lock:
            self._check_open()
            self._logout()
            try:
                self._user = self.token.open(user_pin=text)
            except E.PinIncorrect:
                raise self._wrong_pin() from None
            except E.UserAlreadyLoggedIn:
                raise PcscError("The card is logged in by another session of this program: "
                                "remove the card, insert it again, and retry.") from None
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None
            finally:
                text = None

    # -- signatures --------------------------------------------------------------------------

    def _private_key(self) -> Any:
        from pkcs11.constants import Attribute, ObjectClass

        if self._user is None:
            from .errors import SecurityStatusNotSatisfied

            raise SecurityStatusNotSatisfied()
        cert_id = self._choose()[0]
        for obj in self._user.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                           Attribute.ID: cert_id}):
            return obj
        raise ObjectNotFound("The card holds no private key for its authentication certificate.")

    def _mechanisms(self, key: Any) -> set:
        from pkcs11.constants import Attribute

        try:
            allowed = key[Attribute.ALLOWED_MECHANISMS]
        except _pkcs11().PKCS11Error:
            allowed = None
        if allowed:
            return set(allowed)
        return set(self.slot.get_mechanisms())

    def sign(self, slot: str | int, message: bytes, *, algorithm: str) -> bytes:
        """Sign ``message`` with the authentication key (after :meth:`verify_pin`): RSA
        PKCS#1 v1.5 or PSS over SHA-256, or a DER ECDSA-SHA256 signature."""
        if str(slot).lower() != "9a":
            raise ObjectNotFound(f"Only the authentication key (9a) is used through PKCS#11, "
                                 f"not {slot!r}.")
        from pkcs11 import MGF, KeyType, Mechanism

        with self._lock:
            self._check_open()
            try:
                key = self._private_key()
                mechanisms = self._mechanisms(key)
                digest = hashlib.sha256(message).digest()
                if key.key_type == KeyType.RSA:
                    if algorithm.upper().startswith("ECC"):
                        raise ValueError(f"the card's key is RSA, not {algorithm}")
                    if Mechanism.SHA256_RSA_PKCS in mechanisms:
                        return key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS)
                    if Mechanism.SHA256_RSA_PKCS_PSS in mechanisms:
                        return key.sign(message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                                        mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))
                    if Mechanism.RSA_PKCS in mechanisms:
                        return key.sign(_SHA256_DIGEST_INFO + digest,
                                        mechanism=Mechanism.RSA_PKCS)
                    raise PcscError("The card's RSA key allows no signature mechanism this "
                                    "program uses (SHA256-RSA-PKCS, PSS or RSA-PKCS).")
                if key.key_type == KeyType.EC:
                    if algorithm.upper().startswith("RSA"):
                        raise ValueError(f"the card's key is EC, not {algorithm}")
                    if Mechanism.ECDSA_SHA256 in mechanisms:
                        raw = key.sign(message, mechanism=Mechanism.ECDSA_SHA256)
                    elif Mechanism.ECDSA in mechanisms:
                        raw = key.sign(digest, mechanism=Mechanism.ECDSA)
                    else:
                        raise PcscError("The card's EC key allows no ECDSA mechanism.")
                    return _der_ecdsa(raw)
                raise PcscError(f"The card's key type ({key.key_type!r}) is not supported.")
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None

    # -- PIN management ----------------------------------------------------------------------

    def change_pin(self, old_pin: str | bytes, new_pin: str | bytes) -> None:
        """C_SetPIN in a user session (logged in with ``old_pin``, which spends a try when
        wrong): :class:`WrongPin`, :class:`PinBlocked`, :class:`InvalidPin`."""
        E = _pkcs11().exceptions  # noqa: N806
        old, new = self._secret(old_pin), self._secret(new_pin)
        with self._lock:
            self._check_open()
            self._logout()
            try:
                session = self.token.open(rw=True, user_pin=old)
            except E.PinIncorrect:
                raise self._wrong_pin() from None
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None
            try:
                session.set_pin(old, new)
            except E.PinIncorrect:
                raise self._wrong_pin() from None
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None
            finally:
                _close_quietly(session)

    def unblock_pin(self, puk: str | bytes, new_pin: str | bytes) -> None:
        """A new PIN with the PUK (see the module docstring): :class:`WrongPuk`,
        :class:`PukBlocked`, :class:`InvalidPin` (the new PIN's form),
        :class:`UnblockNotSupported` (the vendor's tool is needed)."""
        from pkcs11.constants import TokenFlag

        E = _pkcs11().exceptions  # noqa: N806
        puk_text, new = self._secret(puk, "PUK"), self._secret(new_pin)
        refused = (E.DataInvalid, E.FunctionNotSupported, E.UserTooManyTypes,
                   E.UserPinNotInitialized, E.ArgumentsBad, E.FunctionFailed, E.GeneralError)
        with self._lock:
            self._check_open()
            self._logout()
            # 1. C_Login(CKU_SO, PUK) + C_InitPIN
            try:
                session = self.token.open(rw=True, so_pin=puk_text)
            except E.PinIncorrect:
                raise self._wrong_puk() from None
            except E.PinLocked:
                raise PukBlocked() from None
            except (E.PinLenRange, E.PinInvalid):
                raise InvalidPin("The card does not take an unlock code (PUK) of that form "
                                 "(no try was spent).") from None
            except refused:
                session = None
            except _pkcs11().PKCS11Error as e:
                if type(e) is not _pkcs11().PKCS11Error:  # the bare class: "user type invalid"
                    raise self._failure(e, what="PUK") from None
                session = None
            if session is not None:
                try:
                    session.init_pin(new)
                    return
                except _pkcs11().PKCS11Error as e:
                    raise self._failure(e) from None
                finally:
                    _close_quietly(session)
            # 2. no SO login: C_SetPIN(PUK, new) unlogged, only on a locked card
            flags = self._token_flags()
            if flags is None:
                raise CardRemoved()
            if not flags & TokenFlag.USER_PIN_LOCKED:
                raise UnblockNotSupported(self.module, locked=False)
            try:
                session = self.token.open(rw=True)
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None
            try:
                session.set_pin(puk_text, new)
            except E.PinIncorrect:
                raise self._wrong_puk() from None
            except (E.PinLenRange, E.PinInvalid):
                raise InvalidPin("The card does not take that new PIN (OpenSC's PIV cards: 6 "
                                 "to 8 digits); no try was spent.") from None
            except (E.PinLocked, *refused):
                after = self._token_flags()
                if after is not None and after & TokenFlag.SO_PIN_LOCKED:
                    raise PukBlocked() from None
                raise UnblockNotSupported(self.module) from None
            except _pkcs11().PKCS11Error as e:
                raise self._failure(e) from None
            finally:
                puk_text = new = None
                _close_quietly(session)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Log out and close the sessions (idempotent; a removed card is not an error)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._logout()
            _close_quietly(self._public)

    def __enter__(self) -> "Pkcs11CardSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pkcs11CardSession(reader={self.reader!r}, module={self.module!r})"


def _reader_atr(reader: str | None) -> bytes | None:
    if not reader:
        return None
    try:
        from drivers.pcsc.readers import card_atr

        return card_atr(reader)
    except Exception:  # noqa: BLE001 - pyscard missing or PC/SC broken: the ATR is unknown
        return None


def _always_authenticate(key: Any) -> bool:
    from pkcs11.constants import Attribute

    try:
        return bool(key[Attribute.ALWAYS_AUTHENTICATE])
    except _pkcs11().PKCS11Error:
        return False


def _auth_rank(der: bytes) -> int:
    """0: an authentication certificate by its extended key usage (clientAuth, smartcard
    logon); 1: key usage digitalSignature; 2: anything else (or unreadable)."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return 2
    try:
        eku = {oid.dotted_string for oid in
               cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value}
        if eku & {_CLIENT_AUTH, _SMARTCARD_LOGON}:
            return 0
    except (x509.ExtensionNotFound, ValueError):
        pass
    try:
        if cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            return 1
    except (x509.ExtensionNotFound, ValueError):
        pass
    return 2


def _der_ecdsa(raw: bytes) -> bytes:
    """A raw r||s ECDSA signature (PKCS#11's form) as DER (X9.62, what PIV cards answer)."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if len(raw) % 2:
        raise PcscError("The card answered a malformed ECDSA signature.")
    half = len(raw) // 2
    return encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                int.from_bytes(raw[half:], "big"))
