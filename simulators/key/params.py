"""Checks of CTAP2 command parameters, as CTAP 2.1 asks an authenticator to make them.

A failed check raises :class:`CtapFailure` with the status the specification names:
CTAP2_ERR_MISSING_PARAMETER for a required parameter or member that is absent,
CTAP2_ERR_CBOR_UNEXPECTED_TYPE for one of the wrong CBOR type, and the specific codes noted
below (clientDataHash length, pubKeyCredParams elements).
"""

from __future__ import annotations

from fido2.ctap import CtapError

ERR = CtapError.ERR

CLIENT_DATA_HASH_LENGTH = 32  # SHA-256 (section 6.1, clientDataHash)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CtapFailure(Exception):
    """Ends a command with a CTAP status code."""

    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(f"{ERR(status).name if status in ERR._value2member_map_ else status}: {why}")
        self.status = status


def need(params: dict, key: int, typ: type | tuple[type, ...], required: bool = True):
    value = params.get(key)
    if value is None:
        if required:
            raise CtapFailure(ERR.MISSING_PARAMETER, f"parameter 0x{key:02x} missing")
        return None
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, f"parameter 0x{key:02x} has the wrong type")
    return value


def need_client_data_hash(params: dict, key: int) -> bytes:
    """The clientDataHash parameter: a byte string of 32 bytes, else CTAP1_ERR_INVALID_LENGTH."""
    value = need(params, key, bytes)
    if len(value) != CLIENT_DATA_HASH_LENGTH:
        raise CtapFailure(ERR.INVALID_LENGTH, f"clientDataHash of {len(value)} bytes, not 32")
    return value


def check_entity(entity: dict, what: str, id_type: type, text_members: tuple[str, ...]) -> None:
    """A PublicKeyCredentialRpEntity or ...UserEntity (section 6.1, rp and user): ``id`` is
    required and of ``id_type``; the members in ``text_members``, when present, are text
    strings. A missing id is CTAP2_ERR_MISSING_PARAMETER, a wrong type
    CTAP2_ERR_CBOR_UNEXPECTED_TYPE."""
    if "id" not in entity:
        raise CtapFailure(ERR.MISSING_PARAMETER, f"{what}.id missing")
    if not isinstance(entity["id"], id_type):
        raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, f"{what}.id has the wrong type")
    for name in text_members:
        if name in entity and not isinstance(entity[name], str):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, f"{what}.{name} is not a text string")


def choose_algorithm(cred_params: list, supported: tuple[int, ...]) -> int:
    """makeCredential step 3 (section 6.1.2): every element of pubKeyCredParams is checked,
    then the first supported algorithm is chosen. An element lacking ``type`` or ``alg`` is
    CTAP2_ERR_INVALID_CBOR, one whose members have the wrong type
    CTAP2_ERR_CBOR_UNEXPECTED_TYPE; no supported algorithm is CTAP2_ERR_UNSUPPORTED_ALGORITHM."""
    chosen = None
    for p in cred_params:
        if not isinstance(p, dict):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "pubKeyCredParams element is not a map")
        if "type" not in p or "alg" not in p:
            raise CtapFailure(ERR.INVALID_CBOR, "pubKeyCredParams element lacks type or alg")
        if not isinstance(p["type"], str) or not _is_int(p["alg"]):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "pubKeyCredParams element malformed")
        if chosen is None and p["type"] == "public-key" and p["alg"] in supported:
            chosen = p["alg"]
    if chosen is None:
        raise CtapFailure(ERR.UNSUPPORTED_ALGORITHM, "no supported algorithm offered")
    return chosen


def check_descriptor_list(value: object) -> list[dict]:
    if not isinstance(value, list):
        raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "credential list is not an array")
    for d in value:
        if not isinstance(d, dict):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "credential descriptor is not a map")
        if "type" not in d or "id" not in d:
            raise CtapFailure(ERR.MISSING_PARAMETER, "credential descriptor incomplete")
        if not isinstance(d["type"], str) or not isinstance(d["id"], bytes):
            raise CtapFailure(ERR.CBOR_UNEXPECTED_TYPE, "credential descriptor malformed")
    return value
