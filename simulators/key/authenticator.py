"""The virtual FIDO2 authenticator: CTAP 2.1 over CBOR and CTAP1/U2F over APDUs.

Section numbers refer to the CTAP 2.1 Proposed Standard. What this key claims in getInfo it
implements; what it does not implement it does not claim (no built-in UV, no large blobs,
no credBlob, no enterprise attestation, no bio enrolment).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from enum import IntFlag

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.ctap import CtapError

from .attestation import DEFAULT_MODEL, MODELS, load_identity
from .base import CtapApp, Presence, Request, UserPresence
from .credentials import ALGORITHMS, ID_LENGTH, Credential, KeyWrapper
from .params import (
    CtapFailure,
    check_descriptor_list,
    check_entity,
    choose_algorithm,
    need,
    need_client_data_hash,
)
from .pinproto import PROTOCOLS, AuthenticatorPinProtocol, PinProtocolError
from .state import DEFAULT_CAPACITY, PIN_RETRIES, PersistentState, StateStore

log = logging.getLogger("simulators.key")
ERR = CtapError.ERR

MAX_PIN_LENGTH = 63  # bytes of UTF-8, per the spec's 64-byte padded PIN block
MAX_MSG_SIZE = 7609
MAX_CREDS_IN_LIST = 8
MAX_RPIDS_FOR_MIN_PIN = 8
MAX_LARGE_BLOB_ARRAY = 2048  # maxSerializedLargeBlobArray (the spec's minimum is 1024)
MAX_LARGE_BLOB_FRAGMENT = MAX_MSG_SIZE - 64  # maxFragmentLength (section 6.10)
RESET_WINDOW = 10.0  # seconds after power-up in which Reset is allowed (section 6.6)
NEXT_ASSERTION_TIMEOUT = 30.0
TOKEN_INITIAL_USAGE = 30.0  # a token unused this long after issue expires (section 6.5.2.1)
TOKEN_MAX_USAGE = 600.0
CONSECUTIVE_PIN_FAILURES = 3

# CBOR command bytes (section 6)
CMD_MAKE_CREDENTIAL = 0x01
CMD_GET_ASSERTION = 0x02
CMD_GET_INFO = 0x04
CMD_CLIENT_PIN = 0x06
CMD_RESET = 0x07
CMD_GET_NEXT_ASSERTION = 0x08
CMD_CREDENTIAL_MGMT = 0x0A
CMD_SELECTION = 0x0B
CMD_LARGE_BLOBS = 0x0C
CMD_CONFIG = 0x0D

# authenticator data flags
FLAG_UP, FLAG_UV, FLAG_AT, FLAG_ED = 0x01, 0x04, 0x40, 0x80

# U2F status words
SW_NO_ERROR = b"\x90\x00"
SW_CONDITIONS_NOT_SATISFIED = b"\x69\x85"
SW_WRONG_DATA = b"\x6a\x80"
SW_WRONG_LENGTH = b"\x67\x00"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"
SW_CLA_NOT_SUPPORTED = b"\x6e\x00"


class Permission(IntFlag):
    MC = 0x01
    GA = 0x02
    CM = 0x04
    BE = 0x08
    LBW = 0x10
    ACFG = 0x20


# be is refused: no built-in UV, so no bioEnroll (section 6.5.5.7.2).
SUPPORTED_PERMISSIONS = (
    Permission.MC | Permission.GA | Permission.CM | Permission.LBW | Permission.ACFG
)


@dataclass
class _Token:
    """The pinUvAuthToken and its state (section 6.5.2.1)."""

    value: bytes = field(default_factory=lambda: os.urandom(32))
    permissions: int = 0
    rp_id: str | None = None
    issued: float = 0.0
    used: bool = False
    in_use: bool = False

    def valid(self, now: float) -> bool:
        if not self.in_use:
            return False
        age = now - self.issued
        if age > TOKEN_MAX_USAGE or (not self.used and age > TOKEN_INITIAL_USAGE):
            self.in_use = False
        return self.in_use


@dataclass
class _AssertionBatch:
    """What getNextAssertion needs from the getAssertion that started it."""

    channel: int  # the CTAPHID channel of that getAssertion: the only one that may continue
    remaining: list[Credential]
    rp_id: str
    client_data_hash: bytes
    flags: int
    uv: bool
    hmac_input: dict | None
    started: float
    blob_key: bool = False


class VirtualAuthenticator(CtapApp):
    """A CTAP 2.1 roaming authenticator in software (USB transport)."""

    capabilities = 0x01 | 0x04  # WINK | CBOR; MSG (U2F) is implemented, so NMSG is not set
    device_version = (1, 0, 0)

    def __init__(
        self,
        state_file: str | os.PathLike | None = None,
        presence: UserPresence | None = None,
        *,
        model: str = DEFAULT_MODEL,
        capacity: int = DEFAULT_CAPACITY,
        clock=time.monotonic,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown simulator model {model!r}")
        self.store = StateStore(state_file, model=model, capacity=capacity)
        self.model = MODELS[self.store.state.model]
        self.presence = presence or UserPresence()
        self.clock = clock
        self.winks = 0
        self._lock = threading.RLock()
        self.power_up()

    # ------------------------------------------------------------------ lifecycle
    @property
    def state(self) -> PersistentState:
        return self.store.state

    def power_up(self) -> None:
        """Volatile state starts afresh (section 6.5.5.1 initialize)."""
        with self._lock:
            self._powered_at = self.clock()
            self._protocols: dict[int, AuthenticatorPinProtocol] = {
                v: cls() for v, cls in PROTOCOLS.items()
            }
            self._token = _Token()
            self._consecutive_pin_failures = 0
            self._pin_auth_blocked = False
            self._next: _AssertionBatch | None = None
            # credentialManagement enumerations in progress: (CTAPHID channel, what is left)
            self._credman_rps: tuple[int, list[bytes]] | None = None
            self._credman_creds: tuple[int, list[Credential]] | None = None
            self._blob_upload: bytearray | None = None  # a largeBlobs write in progress
            self._blob_expected = 0
            self._wrapper = KeyWrapper(self.state.wrap_key)

    def wink(self) -> None:
        self.winks += 1
        log.info("virtual key winks (#%d)", self.winks)

    # ------------------------------------------------------------------ dispatch
    def cbor(self, data: bytes, request: Request) -> bytes:
        if not data:
            return bytes([ERR.INVALID_LENGTH])
        cmd = data[0]
        with self._lock:
            try:
                params = self._decode(data[1:])
                if cmd != CMD_GET_NEXT_ASSERTION:
                    self._next = None
                if cmd != CMD_CREDENTIAL_MGMT:
                    self._credman_rps = self._credman_creds = None
                handler = self._HANDLERS.get(cmd)
                if handler is None:
                    raise CtapFailure(ERR.INVALID_COMMAND, f"command 0x{cmd:02x}")
                result = handler(self, params, request)
            except CtapFailure as e:
                log.info("command 0x%02x failed: %s", cmd, e)
                return bytes([e.status])
            return b"\x00" + (cbor.encode(result) if result is not None else b"")

    @staticmethod
    def _decode(payload: bytes) -> dict:
        if not payload:
            return {}
        try:
            params = cbor.decode(payload)
        except Exception as e:  # fido2.cbor raises ValueError and friends on bad input
            raise CtapFailure(ERR.INVALID_CBOR, f"undecodable CBOR: {e}") from None
        if not isinstance(params, dict):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "parameters are not a map")
        return params

    # ------------------------------------------------------------------ helpers
    def _collect_presence(self, request: Request) -> None:
        outcome = self.presence.wait(request)
        if outcome is Presence.APPROVED:
            return
        raise CtapFailure(
            {
                Presence.DENIED: ERR.OPERATION_DENIED,
                Presence.TIMEOUT: ERR.USER_ACTION_TIMEOUT,
                Presence.CANCELLED: ERR.KEEPALIVE_CANCEL,
            }[outcome],
            f"user presence {outcome.value}",
        )

    def _protocol(self, version: object) -> AuthenticatorPinProtocol:
        if version is None:
            raise CtapFailure(ERR.MISSING_PARAMETER, "pinUvAuthProtocol missing")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "pinUvAuthProtocol not an integer")
        if version not in self._protocols:
            raise CtapFailure(ERR.INVALID_PARAMETER, f"PIN protocol {version} unsupported")
        return self._protocols[version]

    def _pin_set(self) -> bool:
        return self.state.pin_hash is not None

    def _bump_counter(self) -> int:
        self.state.counter += 1
        self.store.save()
        return self.state.counter

    def _verify_token(
        self, protocol_version: object, auth_param: object, message: bytes, permission: int,
        rp_id: str | None = None,
    ) -> None:
        """Check a pinUvAuthParam made with the pinUvAuthToken (section 6.5.5.8)."""
        proto = self._protocol(protocol_version)
        if not isinstance(auth_param, bytes):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "pinUvAuthParam not a byte string")
        token = self._token
        now = self.clock()
        if not token.valid(now) or not proto.verify(token.value, message, auth_param):
            raise CtapFailure(ERR.PIN_AUTH_INVALID, "pinUvAuthParam does not verify")
        if not token.permissions & permission:
            raise CtapFailure(ERR.PIN_AUTH_INVALID, "token lacks the permission")
        if rp_id is not None:
            if token.rp_id is None:
                token.rp_id = rp_id
            elif token.rp_id != rp_id:
                raise CtapFailure(ERR.PIN_AUTH_INVALID, "token bound to another RP")
        token.used = True

    def _after_uv_use(self) -> None:
        """After makeCredential/getAssertion: clear all permissions but lbw (section 6.1.2)."""
        self._token.permissions &= Permission.LBW

    def _auth_data(self, rp_id: str, flags: int, counter: int, attested: bytes = b"",
                   extensions: dict | None = None) -> bytes:
        if extensions:
            flags |= FLAG_ED
        data = hashlib.sha256(rp_id.encode()).digest() + struct.pack(">BI", flags, counter)
        data += attested
        if extensions:
            data += cbor.encode(extensions)
        return data

    def _pin_uv_auth_prelude(self, auth_param: object, protocol: object, request: Request):
        """First steps of makeCredential and getAssertion with a pinUvAuthParam: a zero-length
        one asks for a touch, then says whether a PIN is set (platforms use it to pick a key);
        any other needs a supported pinUvAuthProtocol. Returns the pinUvAuthParam."""
        if isinstance(auth_param, bytes) and len(auth_param) == 0:
            self._collect_presence(request)
            raise CtapFailure(ERR.PIN_INVALID if self._pin_set() else ERR.PIN_NOT_SET, "probe")
        if auth_param is not None:
            self._protocol(protocol)
        return auth_param

    def _find_credential(self, descriptor: dict, rp_id_hash: bytes) -> Credential | None:
        if descriptor.get("type") != "public-key":
            return None
        cred = self._wrapper.open(descriptor["id"], rp_id_hash)
        if cred is None or not cred.discoverable:
            return cred
        for stored in self.state.credentials:  # deleted discoverable credentials stay deleted
            if hmac.compare_digest(stored.id, cred.id):
                return stored
        return None

    # ------------------------------------------------------------------ getInfo
    def info(self) -> dict:
        st = self.state
        options = {
            "plat": False,
            "rk": True,
            "up": True,
            "clientPin": self._pin_set(),
            "credMgmt": True,
            "authnrCfg": True,
            "setMinPINLength": True,
            "makeCredUvNotRqd": not st.always_uv,
            "pinUvAuthToken": True,
            "alwaysUv": st.always_uv,
            "largeBlobs": True,
        }
        return {
            0x01: ["U2F_V2", "FIDO_2_0", "FIDO_2_1"],
            0x02: ["credProtect", "hmac-secret", "largeBlobKey", "minPinLength"],
            0x03: self.model.aaguid.bytes,
            0x04: options,
            0x05: MAX_MSG_SIZE,
            0x06: sorted(self._protocols, reverse=True),
            0x07: MAX_CREDS_IN_LIST,
            0x08: ID_LENGTH,
            0x09: ["usb"],
            0x0A: [{"alg": alg, "type": "public-key"} for alg in ALGORITHMS],
            0x0B: MAX_LARGE_BLOB_ARRAY,
            0x0C: st.force_pin_change,
            0x0D: st.min_pin_length,
            0x0E: self.model.firmware_version,
            0x10: MAX_RPIDS_FOR_MIN_PIN,
            0x14: st.capacity - len(st.credentials),
        }

    def _get_info(self, params: dict, request: Request) -> dict:
        return self.info()

    # ------------------------------------------------------------------ makeCredential
    def _make_credential(self, params: dict, request: Request) -> dict:
        st = self.state
        auth_param = self._pin_uv_auth_prelude(params.get(0x08), params.get(0x09), request)
        client_data_hash = need_client_data_hash(params, 0x01)
        rp = need(params, 0x02, dict)
        user = need(params, 0x03, dict)
        cred_params = need(params, 0x04, list)
        exclude = check_descriptor_list(params.get(0x05) or [])
        extensions = need(params, 0x06, dict, required=False) or {}
        options = need(params, 0x07, dict, required=False) or {}
        check_entity(rp, "rp", str, ("name",))
        check_entity(user, "user", bytes, ("name", "displayName"))
        rp_id = rp["id"]
        if len(user["id"]) > 64:
            raise CtapFailure(ERR.INVALID_LENGTH, "user.id longer than 64 bytes")
        if params.get(0x0A) is not None:
            raise CtapFailure(ERR.INVALID_PARAMETER, "enterprise attestation not supported")

        alg = choose_algorithm(cred_params, ALGORITHMS)

        for name in ("rk", "up", "uv"):
            if name in options and not isinstance(options[name], bool):
                raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, f"option {name} not a boolean")
        rk = options.get("rk", False)
        if options.get("up") is False:
            raise CtapFailure(ERR.INVALID_OPTION, "makeCredential always needs user presence")
        if options.get("uv"):
            raise CtapFailure(ERR.INVALID_OPTION, "no built-in user verification")

        uv = False
        if auth_param is not None:
            self._verify_token(params.get(0x09), auth_param, client_data_hash, Permission.MC, rp_id)
            uv = True
        elif st.always_uv:
            raise CtapFailure(ERR.PUAT_REQUIRED if self._pin_set() else ERR.PIN_NOT_SET, "alwaysUv")
        elif self._pin_set() and rk:
            # makeCredUvNotRqd covers non-discoverable credentials only
            raise CtapFailure(ERR.PUAT_REQUIRED, "discoverable credential needs the PIN")

        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        for descriptor in exclude:
            cred = self._find_credential(descriptor, rp_id_hash)
            if cred is not None and (cred.cred_protect != 3 or uv):
                self._collect_presence(request)
                raise CtapFailure(ERR.CREDENTIAL_EXCLUDED, "credential excluded")

        cred_protect = extensions.get("credProtect", 1)
        if not isinstance(cred_protect, int) or cred_protect not in (1, 2, 3):
            raise CtapFailure(ERR.INVALID_PARAMETER, "credProtect must be 1, 2 or 3")
        want_hmac = extensions.get("hmac-secret") is True
        want_blob_key = extensions.get("largeBlobKey")
        if want_blob_key is not None and want_blob_key is not True:
            raise CtapFailure(ERR.INVALID_OPTION, "largeBlobKey input must be true")
        if want_blob_key and not rk:
            raise CtapFailure(ERR.INVALID_OPTION, "largeBlobKey needs a discoverable credential")
        ext_out: dict = {}
        if "credProtect" in extensions:
            ext_out["credProtect"] = cred_protect
        if want_hmac:
            ext_out["hmac-secret"] = True
        if extensions.get("minPinLength") is True and rp_id in st.min_pin_rp_ids:
            ext_out["minPinLength"] = st.min_pin_length

        self._collect_presence(request)

        cred = self._wrapper.new_credential(
            rp_id_hash, alg, cred_protect=cred_protect, hmac_secret=want_hmac, discoverable=rk
        )
        if rk:
            kept = [
                c for c in st.credentials
                if not (c.rp_id_hash == rp_id_hash and c.user.get("id") == user["id"])
            ]
            if len(kept) >= st.capacity:
                raise CtapFailure(ERR.KEY_STORE_FULL, "no room for another discoverable credential")
            st.creation_seq += 1
            cred.rp = {k: rp[k] for k in ("id", "name") if isinstance(rp.get(k), str)}
            cred.user = {
                k: user[k] for k in ("id", "name", "displayName") if k in user
            }
            cred.created = st.creation_seq
            cred.large_blob_key = bool(want_blob_key)
            st.credentials = kept + [cred]
        counter = self._bump_counter()  # also saves a new discoverable credential

        attested = (
            self.model.aaguid.bytes
            + struct.pack(">H", len(cred.id))
            + cred.id
            + cbor.encode(cred.cose_public_key())
        )
        flags = FLAG_UP | FLAG_AT | (FLAG_UV if uv else 0)
        auth_data = self._auth_data(rp_id, flags, counter, attested, ext_out)
        identity = load_identity(self.model.name)
        sig = identity.private_key.sign(auth_data + client_data_hash, ec.ECDSA(hashes.SHA256()))
        if uv:
            self._after_uv_use()
        log.info("made a %s credential for %s", "discoverable" if rk else "server-side", rp_id)
        response = {
            0x01: "packed",
            0x02: auth_data,
            0x03: {"alg": -7, "sig": sig, "x5c": list(identity.chain)},
        }
        if want_blob_key:
            response[0x05] = cred.large_blob_secret()
        return response

    # ------------------------------------------------------------------ getAssertion
    def _get_assertion(self, params: dict, request: Request) -> dict:
        st = self.state
        auth_param = self._pin_uv_auth_prelude(params.get(0x06), params.get(0x07), request)
        rp_id = need(params, 0x01, str)
        client_data_hash = need_client_data_hash(params, 0x02)
        allow = check_descriptor_list(params.get(0x03) or [])
        extensions = need(params, 0x04, dict, required=False) or {}
        options = need(params, 0x05, dict, required=False) or {}
        for name in ("up", "uv", "rk"):
            if name in options and not isinstance(options[name], bool):
                raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, f"option {name} not a boolean")
        if "rk" in options:
            raise CtapFailure(ERR.UNSUPPORTED_OPTION, "rk is not a getAssertion option")
        if options.get("uv"):
            raise CtapFailure(ERR.INVALID_OPTION, "no built-in user verification")
        up = options.get("up", True)

        uv = False
        if auth_param is not None:
            self._verify_token(params.get(0x07), auth_param, client_data_hash, Permission.GA, rp_id)
            uv = True
        elif st.always_uv and up:
            raise CtapFailure(ERR.PUAT_REQUIRED if self._pin_set() else ERR.PIN_NOT_SET, "alwaysUv")

        rp_id_hash = hashlib.sha256(rp_id.encode()).digest()
        if allow:
            found = None
            for descriptor in allow:
                cred = self._find_credential(descriptor, rp_id_hash)
                if cred is not None and (cred.cred_protect != 3 or uv):
                    found = cred
                    break
            creds = [found] if found else []
        else:
            creds = [
                c for c in st.credentials
                if c.rp_id_hash == rp_id_hash and (c.cred_protect == 1 or uv)
            ]
            creds.sort(key=lambda c: c.created, reverse=True)
        if not creds:
            raise CtapFailure(ERR.NO_CREDENTIALS, f"no credential for {rp_id}")

        hmac_input = extensions.get("hmac-secret")
        if hmac_input is not None and not isinstance(hmac_input, dict):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "hmac-secret input not a map")
        want_blob_key = extensions.get("largeBlobKey")
        if want_blob_key is not None and want_blob_key is not True:
            raise CtapFailure(ERR.INVALID_OPTION, "largeBlobKey input must be true")

        if up:
            self._collect_presence(request)
        flags = (FLAG_UP if up else 0) | (FLAG_UV if uv else 0)
        if uv and up:  # a silent (up=false) pre-flight leaves the token usable
            self._after_uv_use()

        first, rest = creds[0], creds[1:]
        response = self._assertion(first, rp_id, client_data_hash, flags, uv, hmac_input,
                                   include_user_details=uv and len(creds) > 1,
                                   blob_key=bool(want_blob_key))
        if not allow and rest:
            response[0x05] = len(creds)
            self._next = _AssertionBatch(
                request.channel, rest, rp_id, client_data_hash, flags, uv, hmac_input,
                self.clock(), bool(want_blob_key),
            )
        return response

    def _assertion(self, cred: Credential, rp_id: str, client_data_hash: bytes, flags: int,
                   uv: bool, hmac_input: dict | None, include_user_details: bool,
                   blob_key: bool = False) -> dict:
        ext_out = {}
        if hmac_input is not None and cred.hmac_secret:
            ext_out["hmac-secret"] = self._hmac_secret(cred, hmac_input, uv)
        auth_data = self._auth_data(rp_id, flags, self._bump_counter(), extensions=ext_out)
        response = {
            0x01: cred.descriptor(),
            0x02: auth_data,
            0x03: cred.sign(auth_data + client_data_hash),
        }
        if cred.discoverable:
            user = {"id": cred.user["id"]}
            if include_user_details:
                user.update({k: v for k, v in cred.user.items() if k != "id"})
            response[0x04] = user
        if blob_key and cred.large_blob_key:
            response[0x07] = cred.large_blob_secret()
        return response

    def _hmac_secret(self, cred: Credential, ext: dict, uv: bool) -> bytes:
        """hmac-secret in getAssertion (section 12.5)."""
        proto = self._protocol(ext.get(4, 1))
        salt_enc, salt_auth = ext.get(2), ext.get(3)
        if not isinstance(salt_enc, bytes) or not isinstance(salt_auth, bytes):
            raise CtapFailure(ERR.MISSING_PARAMETER, "hmac-secret saltEnc/saltAuth missing")
        try:
            shared = proto.decapsulate(ext.get(1))
        except PinProtocolError as e:
            raise CtapFailure(ERR.INVALID_PARAMETER, str(e)) from None
        if not proto.verify(shared, salt_enc, salt_auth):
            raise CtapFailure(ERR.PIN_AUTH_INVALID, "saltAuth does not verify")
        try:
            salts = proto.decrypt(shared, salt_enc)
        except PinProtocolError as e:
            raise CtapFailure(ERR.INVALID_LENGTH, str(e)) from None
        if len(salts) not in (32, 64):
            raise CtapFailure(ERR.INVALID_LENGTH, "salts must be 32 or 64 bytes")
        key = cred.cred_random(uv)
        output = b"".join(
            hmac.new(key, salts[i:i + 32], hashlib.sha256).digest() for i in range(0, len(salts), 32)
        )
        return proto.encrypt(shared, output)

    def _get_next_assertion(self, params: dict, request: Request) -> dict:
        batch = self._next
        if batch is None or not batch.remaining:
            raise CtapFailure(ERR.NOT_ALLOWED, "no assertion pending")
        if batch.channel != request.channel:
            raise CtapFailure(ERR.NOT_ALLOWED, "getAssertion was sent on another channel")
        if self.clock() - batch.started > NEXT_ASSERTION_TIMEOUT:
            self._next = None
            raise CtapFailure(ERR.NOT_ALLOWED, "getNextAssertion timed out")
        cred = batch.remaining.pop(0)
        return self._assertion(cred, batch.rp_id, batch.client_data_hash, batch.flags, batch.uv,
                               batch.hmac_input, include_user_details=batch.uv,
                               blob_key=batch.blob_key)

    # ------------------------------------------------------------------ clientPIN
    def _client_pin(self, params: dict, request: Request) -> dict | None:
        sub = need(params, 0x02, int)
        if sub == 0x01:  # getPINRetries
            if not self._pin_set():
                raise CtapFailure(ERR.PIN_NOT_SET, "no PIN set")
            return {0x03: self.state.pin_retries, 0x04: self._pin_auth_blocked}
        if sub in (0x06, 0x07):  # UV token / UV retries: no built-in UV
            raise CtapFailure(ERR.INVALID_SUBCOMMAND, "no built-in user verification")
        if sub not in (0x02, 0x03, 0x04, 0x05, 0x09):
            raise CtapFailure(ERR.INVALID_SUBCOMMAND, f"clientPIN subcommand 0x{sub:02x}")
        proto = self._protocol(params.get(0x01))
        if sub == 0x02:  # getKeyAgreement
            return {0x01: proto.key_agreement()}
        peer = need(params, 0x03, dict)
        try:
            shared = proto.decapsulate(peer)
        except PinProtocolError as e:
            raise CtapFailure(ERR.INVALID_PARAMETER, str(e)) from None
        if sub == 0x03:
            return self._set_pin(proto, shared, params)
        if sub == 0x04:
            return self._change_pin(proto, shared, params)
        return self._get_pin_token(proto, shared, params, with_permissions=sub == 0x09)

    def _decrypt_new_pin(self, proto, shared: bytes, new_pin_enc: bytes) -> tuple[bytes, str]:
        try:
            padded = proto.decrypt(shared, new_pin_enc)
        except PinProtocolError as e:
            raise CtapFailure(ERR.INVALID_PARAMETER, str(e)) from None
        if len(padded) != 64:
            raise CtapFailure(ERR.PIN_POLICY_VIOLATION, "padded PIN must be 64 bytes")
        pin_bytes = padded.rstrip(b"\0")
        if len(pin_bytes) > MAX_PIN_LENGTH:
            raise CtapFailure(ERR.PIN_POLICY_VIOLATION, "PIN longer than 63 bytes")
        try:
            pin = pin_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise CtapFailure(ERR.PIN_POLICY_VIOLATION, "PIN is not UTF-8") from None
        if len(pin) < self.state.min_pin_length:
            raise CtapFailure(ERR.PIN_POLICY_VIOLATION, "PIN shorter than the minimum")
        return pin_bytes, pin

    def _set_pin(self, proto, shared: bytes, params: dict) -> None:
        auth = need(params, 0x04, bytes)
        new_pin_enc = need(params, 0x05, bytes)
        if self._pin_set():
            raise CtapFailure(ERR.NOT_ALLOWED, "a PIN is already set")
        if not proto.verify(shared, new_pin_enc, auth):
            raise CtapFailure(ERR.PIN_AUTH_INVALID, "pinUvAuthParam does not verify")
        pin_bytes, pin = self._decrypt_new_pin(proto, shared, new_pin_enc)
        st = self.state
        st.pin_hash = hashlib.sha256(pin_bytes).digest()[:16]
        st.pin_length = len(pin)
        st.pin_retries = PIN_RETRIES
        st.force_pin_change = False
        self.store.save()
        log.info("PIN set")
        return None

    def _check_pin(self, proto, shared: bytes, pin_hash_enc: bytes) -> None:
        """Verify pinHashEnc; count retries and consecutive failures (section 6.5.5.5)."""
        st = self.state
        if st.pin_retries <= 0:
            raise CtapFailure(ERR.PIN_BLOCKED, "PIN blocked: only a reset helps")
        if self._pin_auth_blocked:
            raise CtapFailure(ERR.PIN_AUTH_BLOCKED, "3 wrong PINs: power-cycle the key")
        st.pin_retries -= 1
        self.store.save()
        try:
            pin_hash = proto.decrypt(shared, pin_hash_enc)
        except PinProtocolError as e:
            raise CtapFailure(ERR.PIN_AUTH_INVALID, str(e)) from None
        if not hmac.compare_digest(pin_hash[:16], st.pin_hash or b""):
            proto.regenerate()
            self._consecutive_pin_failures += 1
            if st.pin_retries <= 0:
                raise CtapFailure(ERR.PIN_BLOCKED, "wrong PIN; now blocked")
            if self._consecutive_pin_failures >= CONSECUTIVE_PIN_FAILURES:
                self._pin_auth_blocked = True
                raise CtapFailure(ERR.PIN_AUTH_BLOCKED, "wrong PIN, third in a row")
            raise CtapFailure(ERR.PIN_INVALID, f"wrong PIN; {st.pin_retries} retries left")
        self._consecutive_pin_failures = 0
        st.pin_retries = PIN_RETRIES
        self.store.save()

    def _change_pin(self, proto, shared: bytes, params: dict) -> None:
        auth = need(params, 0x04, bytes)
        new_pin_enc = need(params, 0x05, bytes)
        pin_hash_enc = need(params, 0x06, bytes)
        if not self._pin_set():
            raise CtapFailure(ERR.PIN_NOT_SET, "no PIN to change")
        if self.state.pin_retries <= 0:
            raise CtapFailure(ERR.PIN_BLOCKED, "PIN blocked")
        if not proto.verify(shared, new_pin_enc + pin_hash_enc, auth):
            raise CtapFailure(ERR.PIN_AUTH_INVALID, "pinUvAuthParam does not verify")
        self._check_pin(proto, shared, pin_hash_enc)
        pin_bytes, pin = self._decrypt_new_pin(proto, shared, new_pin_enc)
        st = self.state
        new_hash = hashlib.sha256(pin_bytes).digest()[:16]
        if st.force_pin_change and hmac.compare_digest(new_hash, st.pin_hash or b""):
            raise CtapFailure(ERR.PIN_POLICY_VIOLATION, "the new PIN must differ")
        st.pin_hash = new_hash
        st.pin_length = len(pin)
        st.force_pin_change = False
        self.store.save()
        self._token = _Token()  # resetPinUvAuthToken
        log.info("PIN changed")
        return None

    def _get_pin_token(self, proto, shared: bytes, params: dict, with_permissions: bool) -> dict:
        pin_hash_enc = need(params, 0x06, bytes)
        if with_permissions:
            permissions = need(params, 0x09, int)
            rp_id = need(params, 0x0A, str, required=False)
            if permissions == 0:
                raise CtapFailure(ERR.INVALID_PARAMETER, "no permissions asked for")
            if permissions & ~SUPPORTED_PERMISSIONS:
                raise CtapFailure(ERR.UNAUTHORIZED_PERMISSION, "permission not supported")
        else:
            if 0x09 in params or 0x0A in params:
                raise CtapFailure(ERR.INVALID_PARAMETER, "getPinToken takes no permissions")
            permissions, rp_id = Permission.MC | Permission.GA, None
        if not self._pin_set():
            raise CtapFailure(ERR.PIN_NOT_SET, "no PIN set")
        self._check_pin(proto, shared, pin_hash_enc)
        if self.state.force_pin_change:
            raise CtapFailure(ERR.PIN_INVALID, "the PIN must be changed first")
        self._token = _Token(
            permissions=permissions, rp_id=rp_id, issued=self.clock(), in_use=True
        )
        return {0x02: proto.encrypt(shared, self._token.value)}

    # ------------------------------------------------------------------ reset, selection
    def _reset(self, params: dict, request: Request) -> None:
        if self.clock() - self._powered_at > RESET_WINDOW:
            raise CtapFailure(ERR.NOT_ALLOWED, "reset only within 10 s of power-up")
        self._collect_presence(request)
        st = self.state
        self.store.state = PersistentState(
            model=st.model, capacity=st.capacity, counter=st.counter
        )
        self.store.save()
        powered_at = self._powered_at
        self.power_up()
        self._powered_at = powered_at
        log.info("factory reset: PIN, credentials and configuration erased")
        return None

    def _selection(self, params: dict, request: Request) -> None:
        self._collect_presence(request)
        return None

    # ------------------------------------------------------------------ credential management
    def _cred_mgmt(self, params: dict, request: Request) -> dict | None:
        sub = need(params, 0x01, int)
        sub_params = need(params, 0x02, dict, required=False)
        st = self.state
        if sub in (0x01, 0x02, 0x04, 0x06, 0x07):
            message = bytes([sub]) + (cbor.encode(sub_params) if sub_params is not None else b"")
            auth = params.get(0x04)
            if auth is None:
                raise CtapFailure(ERR.PUAT_REQUIRED, "credential management needs a token")
            self._verify_token(params.get(0x03), auth, message, Permission.CM)
        token_rp = self._token.rp_id

        if sub == 0x01:  # getCredsMetadata
            if token_rp is not None:
                raise CtapFailure(ERR.PIN_AUTH_INVALID, "token bound to an RP")
            return {0x01: len(st.credentials), 0x02: st.capacity - len(st.credentials)}
        if sub == 0x02:  # enumerateRPsBegin
            if token_rp is not None:
                raise CtapFailure(ERR.PIN_AUTH_INVALID, "token bound to an RP")
            rps: list[bytes] = []
            for c in st.credentials:
                if c.rp_id_hash not in rps:
                    rps.append(c.rp_id_hash)
            if not rps:
                raise CtapFailure(ERR.NO_CREDENTIALS, "no discoverable credentials")
            self._credman_rps = (request.channel, rps[1:])
            return {**self._rp_entry(rps[0]), 0x05: len(rps)}
        if sub == 0x03:  # enumerateRPsGetNextRP
            rps = self._continuation(self._credman_rps, request, "RP enumeration")
            return self._rp_entry(rps.pop(0))
        if sub == 0x04:  # enumerateCredentialsBegin
            sp = sub_params or {}
            rp_hash = sp.get(0x01)
            if not isinstance(rp_hash, bytes):
                raise CtapFailure(ERR.MISSING_PARAMETER, "rpIDHash missing")
            if token_rp is not None and hashlib.sha256(token_rp.encode()).digest() != rp_hash:
                raise CtapFailure(ERR.PIN_AUTH_INVALID, "token bound to another RP")
            creds = sorted(
                (c for c in st.credentials if c.rp_id_hash == rp_hash), key=lambda c: c.created
            )
            if not creds:
                raise CtapFailure(ERR.NO_CREDENTIALS, "no credentials for that RP")
            self._credman_creds = (request.channel, creds[1:])
            return {**self._cred_entry(creds[0]), 0x09: len(creds)}
        if sub == 0x05:  # enumerateCredentialsGetNextCredential
            creds = self._continuation(self._credman_creds, request, "credential enumeration")
            return self._cred_entry(creds.pop(0))
        if sub in (0x06, 0x07):  # deleteCredential, updateUserInformation
            sp = sub_params or {}
            descriptor = sp.get(0x02)
            if not isinstance(descriptor, dict) or not isinstance(descriptor.get("id"), bytes):
                raise CtapFailure(ERR.MISSING_PARAMETER, "credentialID missing")
            target = next((c for c in st.credentials if c.id == descriptor["id"]), None)
            if target is None:
                raise CtapFailure(ERR.NO_CREDENTIALS, "no such credential")
            if token_rp is not None and target.rp.get("id") != token_rp:
                raise CtapFailure(ERR.PIN_AUTH_INVALID, "token bound to another RP")
            if sub == 0x06:
                st.credentials = [c for c in st.credentials if c is not target]
                self.store.save()
                return None
            user = sp.get(0x03)
            if not isinstance(user, dict):
                raise CtapFailure(ERR.MISSING_PARAMETER, "user missing")
            if user.get("id") != target.user.get("id"):
                raise CtapFailure(ERR.INVALID_PARAMETER, "user.id does not match")
            target.user = {k: user[k] for k in ("id", "name", "displayName") if k in user}
            self.store.save()
            return None
        raise CtapFailure(ERR.INVALID_SUBCOMMAND, f"credentialManagement 0x{sub:02x}")

    @staticmethod
    def _continuation(pending: tuple[int, list] | None, request: Request, what: str) -> list:
        """What is left of an enumeration, for its next item: only on the CTAPHID channel
        that began it (else, or when nothing is left, CTAP2_ERR_NOT_ALLOWED)."""
        if pending is None or not pending[1]:
            raise CtapFailure(ERR.NOT_ALLOWED, f"no {what} pending")
        channel, left = pending
        if channel != request.channel:
            raise CtapFailure(ERR.NOT_ALLOWED, f"{what} was begun on another channel")
        return left

    def _rp_entry(self, rp_hash: bytes) -> dict:
        cred = next(c for c in self.state.credentials if c.rp_id_hash == rp_hash)
        return {0x03: dict(cred.rp), 0x04: rp_hash}

    @staticmethod
    def _cred_entry(cred: Credential) -> dict:
        entry = {
            0x06: dict(cred.user),
            0x07: cred.descriptor(),
            0x08: cred.cose_public_key(),
            0x0A: cred.cred_protect,
        }
        if cred.large_blob_key:
            entry[0x0B] = cred.large_blob_secret()
        return entry

    # ------------------------------------------------------------------ largeBlobs
    def _large_blobs(self, params: dict, request: Request) -> dict | None:
        """authenticatorLargeBlobs (section 6.10): a serialized array, read and written in
        fragments, whose last 16 bytes are LEFT(SHA-256(the rest), 16)."""
        get = need(params, 0x01, int, required=False)
        fragment = need(params, 0x02, bytes, required=False)
        offset = need(params, 0x03, int)
        length = need(params, 0x04, int, required=False)
        st = self.state
        if (get is None) == (fragment is None):
            raise CtapFailure(ERR.INVALID_PARAMETER, "exactly one of get and set")
        if get is not None:
            if length is not None:
                raise CtapFailure(ERR.INVALID_PARAMETER, "length is for writes")
            if get > MAX_LARGE_BLOB_FRAGMENT:
                raise CtapFailure(ERR.INVALID_LENGTH, "fragment too long")
            if offset > len(st.large_blob_array):
                raise CtapFailure(ERR.INVALID_PARAMETER, "offset beyond the array")
            return {0x01: st.large_blob_array[offset:offset + get]}
        if len(fragment) > MAX_LARGE_BLOB_FRAGMENT:
            raise CtapFailure(ERR.INVALID_LENGTH, "fragment too long")
        if offset == 0:
            if length is None:
                raise CtapFailure(ERR.INVALID_PARAMETER, "length required at offset 0")
            if length > MAX_LARGE_BLOB_ARRAY:
                raise CtapFailure(ERR.LARGE_BLOB_STORAGE_FULL, "array larger than the store")
            if length < 17:
                raise CtapFailure(ERR.INVALID_PARAMETER, "array shorter than its checksum")
            self._blob_upload, self._blob_expected = bytearray(), length
        elif length is not None:
            raise CtapFailure(ERR.INVALID_PARAMETER, "length only at offset 0")
        if self._blob_upload is None or offset != len(self._blob_upload):
            raise CtapFailure(ERR.INVALID_SEQ, "fragment out of sequence")
        if self._pin_set() or st.always_uv:
            auth = params.get(0x05)
            if auth is None:
                raise CtapFailure(ERR.PUAT_REQUIRED, "writing large blobs needs a token")
            message = (
                b"\xff" * 32 + b"\x0c\x00" + struct.pack("<I", offset)
                + hashlib.sha256(fragment).digest()
            )
            self._verify_token(params.get(0x06), auth, message, Permission.LBW)
        if offset + len(fragment) > self._blob_expected:
            raise CtapFailure(ERR.INVALID_PARAMETER, "more data than announced")
        self._blob_upload += fragment
        if len(self._blob_upload) == self._blob_expected:
            data, self._blob_upload = bytes(self._blob_upload), None
            if not hmac.compare_digest(hashlib.sha256(data[:-16]).digest()[:16], data[-16:]):
                raise CtapFailure(ERR.INTEGRITY_FAILURE, "large-blob array checksum wrong")
            st.large_blob_array = data
            self.store.save()
        return None

    # ------------------------------------------------------------------ authenticatorConfig
    def _config(self, params: dict, request: Request) -> None:
        sub = need(params, 0x01, int)
        sub_params = need(params, 0x02, dict, required=False)
        st = self.state
        auth = params.get(0x04)
        if self._pin_set() or st.always_uv:
            if auth is None:
                raise CtapFailure(ERR.PUAT_REQUIRED, "authenticatorConfig needs a token")
            message = b"\xff" * 32 + bytes([CMD_CONFIG, sub])
            if sub_params is not None:
                message += cbor.encode(sub_params)
            self._verify_token(params.get(0x03), auth, message, Permission.ACFG)
        if sub == 0x01:  # enableEnterpriseAttestation
            raise CtapFailure(ERR.INVALID_PARAMETER, "enterprise attestation not supported")
        if sub == 0x02:  # toggleAlwaysUv
            st.always_uv = not st.always_uv
            self.store.save()
            return None
        if sub == 0x03:  # setMinPINLength
            sp = sub_params or {}
            new_len = sp.get(0x01, st.min_pin_length)
            rp_ids = sp.get(0x02)
            force = sp.get(0x03, False)
            if not isinstance(new_len, int) or isinstance(new_len, bool) or not isinstance(force, bool):
                raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "setMinPINLength parameters")
            if new_len < st.min_pin_length or new_len > MAX_PIN_LENGTH:
                raise CtapFailure(ERR.PIN_POLICY_VIOLATION, "minimum PIN length cannot go down")
            if rp_ids is not None:
                if not isinstance(rp_ids, list) or not all(isinstance(r, str) for r in rp_ids):
                    raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "minPinLengthRPIDs")
                if len(rp_ids) > MAX_RPIDS_FOR_MIN_PIN:  # maxRPIDsForSetMinPINLength
                    raise CtapFailure(ERR.KEY_STORE_FULL, "too many RP IDs")
            if force and not self._pin_set():
                raise CtapFailure(ERR.PIN_NOT_SET, "forceChangePin without a PIN")
            st.min_pin_length = new_len
            if rp_ids is not None:
                st.min_pin_rp_ids = list(rp_ids)
            if force or (self._pin_set() and st.pin_length < new_len):
                st.force_pin_change = True
            self.store.save()
            return None
        raise CtapFailure(ERR.INVALID_SUBCOMMAND, f"authenticatorConfig 0x{sub:02x}")

    _HANDLERS = {
        CMD_MAKE_CREDENTIAL: _make_credential,
        CMD_GET_ASSERTION: _get_assertion,
        CMD_GET_INFO: _get_info,
        CMD_CLIENT_PIN: _client_pin,
        CMD_RESET: _reset,
        CMD_GET_NEXT_ASSERTION: _get_next_assertion,
        CMD_CREDENTIAL_MGMT: _cred_mgmt,
        CMD_SELECTION: _selection,
        CMD_CONFIG: _config,
        CMD_LARGE_BLOBS: _large_blobs,
    }

    # ------------------------------------------------------------------ CTAP1 / U2F
    def msg(self, apdu: bytes, request: Request) -> bytes:
        """U2F raw messages (FIDO U2F Raw Message Formats v1.2), extended or short APDUs."""
        if len(apdu) < 4:
            return SW_WRONG_LENGTH
        cla, ins, p1, _p2 = apdu[:4]
        body = apdu[4:]
        if not body:
            data = b""
        elif body[0] == 0 and len(body) >= 3:  # extended length
            lc = int.from_bytes(body[1:3], "big")
            data = body[3:3 + lc]
            if len(data) != lc or len(body) - 3 - lc not in (0, 2):
                return SW_WRONG_LENGTH
        elif len(body) == 1:  # Le only
            data = b""
        else:
            lc = body[0]
            data = body[1:1 + lc]
            if len(data) != lc or len(body) - 1 - lc not in (0, 1):
                return SW_WRONG_LENGTH
        if cla != 0:
            return SW_CLA_NOT_SUPPORTED
        with self._lock:
            self._next = None
            if ins == 0x03:  # VERSION
                return b"U2F_V2" + SW_NO_ERROR if not data else SW_WRONG_LENGTH
            if ins == 0x01:
                return self._u2f_register(data, request)
            if ins == 0x02:
                return self._u2f_authenticate(p1, data, request)
        return SW_INS_NOT_SUPPORTED

    def _u2f_touched(self, request: Request) -> bool:
        # U2F is polled: no touch now means "try again" (0x6985), not a wait.
        return self.presence.wait(request, timeout=0.0) is Presence.APPROVED

    def _u2f_register(self, data: bytes, request: Request) -> bytes:
        if len(data) != 64:
            return SW_WRONG_LENGTH
        challenge, app_param = data[:32], data[32:]
        if not self._u2f_touched(request):
            return SW_CONDITIONS_NOT_SATISFIED
        cred = self._wrapper.new_credential(app_param, -7)
        self._bump_counter()
        cose = cred.cose_public_key()
        public = b"\x04" + cose[-2] + cose[-3]
        identity = load_identity(self.model.name)
        signed = b"\x00" + app_param + challenge + cred.id + public
        sig = identity.private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
        return (
            b"\x05" + public + bytes([len(cred.id)]) + cred.id + identity.chain[0] + sig
            + SW_NO_ERROR
        )

    def _u2f_authenticate(self, control: int, data: bytes, request: Request) -> bytes:
        if len(data) < 65 or len(data) != 65 + data[64]:
            return SW_WRONG_LENGTH
        challenge, app_param, handle = data[:32], data[32:64], data[65:]
        cred = self._find_credential({"type": "public-key", "id": handle}, app_param)
        if cred is None or cred.alg != -7 or cred.cred_protect == 3:
            return SW_WRONG_DATA
        if control == 0x07:  # check-only
            return SW_CONDITIONS_NOT_SATISFIED
        if control == 0x03:
            if not self._u2f_touched(request):
                return SW_CONDITIONS_NOT_SATISFIED
            flags = FLAG_UP
        elif control == 0x08:
            flags = 0
        else:
            return SW_WRONG_DATA
        counter = struct.pack(">I", self._bump_counter())
        sig = cred.sign(app_param + bytes([flags]) + counter + challenge)
        return bytes([flags]) + counter + sig + SW_NO_ERROR
