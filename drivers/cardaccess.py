"""TEMPORARY SHIM (branch i17-wiring only; engineer A's drivers/cardaccess.py replaces it)."""

DRIVERS = ("piv", "pkcs11", "auto")
DEFAULT_PKCS11_MODULE = "opensc-pkcs11.so"


def open_card(reader=None, *, driver="piv", pkcs11_module=None):
    from drivers.pcsc.piv import open_card as open_piv

    if driver == "pkcs11":
        raise NotImplementedError("shim")
    s = open_piv(reader)
    s.driver = 'piv'
    return s
