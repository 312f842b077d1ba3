"""Smartcards through a PKCS#11 module (OpenSC's ``opensc-pkcs11.so`` by default, or the card
vendor's): the second card path next to :mod:`drivers.pcsc` (PIV spoken directly).

    from drivers.pkcs11 import Pkcs11CardSession

    with Pkcs11CardSession.open("Virtual PCD 00 00", module="opensc-pkcs11.so") as card:
        der = card.certificate("9a")          # the authentication certificate
        card.verify_pin("123456")              # C_Login
        signature = card.sign("9a", challenge, algorithm="RSA2048")

Built on python-pkcs11, which releases the GIL during module calls (PyKCS11 held it: with a
card served by a thread of the same process its load deadlocked). A driver: no policy.
"""

from .errors import NoToken, Pkcs11ModuleError, UnblockNotSupported
from .module import DEFAULT_MODULE, load_module
from .session import Pkcs11CardSession

__all__ = ["DEFAULT_MODULE", "NoToken", "Pkcs11CardSession", "Pkcs11ModuleError",
           "UnblockNotSupported", "load_module"]
