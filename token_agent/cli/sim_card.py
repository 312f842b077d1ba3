"""`token-agent sim ca ...` (the simulated NHS-style PKI) and `token-agent sim card issue|show`
(virtual smartcard files). The logic lives in :mod:`simulators.card.pki` and
:mod:`simulators.card.issuance`; this module parses arguments and prints. Other modules add
commands to the ``card`` group (``insert``, ``remove``).

Exit codes: 0 done, 1 failure (missing or corrupt CA directory or card file), 2 bad arguments,
8 no such card, 9 it exists already (a CA in the directory, a card file, a revocation).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import click

from .. import exitcodes
from . import sim
from .common import emit, fail, json_option, say

F = TypeVar("F", bound=Callable[..., Any])

# Mirrors of the library's lists (the library is imported lazily; a test checks they agree).
ALGORITHMS = ("RSA2048", "ECCP256")
VARIANTS = ("expired", "revoked", "untrusted", "blocked", "expiring")
PROTOCOLS = ("t1", "t0")
REVOCATION_REASONS = ("unspecified", "keyCompromise", "cACompromise", "affiliationChanged",
                      "superseded", "cessationOfOperation", "certificateHold",
                      "privilegeWithdrawn", "aACompromise")  # fmt: skip


def _errors(func: F) -> F:
    """The library's errors as a message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from simulators.card import pki
        from simulators.card.cardfile import CardFileError

        try:
            return func(*args, **kwargs)
        except (pki.CaExists, pki.AlreadyRevoked, FileExistsError) as e:
            fail(str(e), exitcodes.CONFLICT)
        except pki.UnknownCard as e:
            fail(str(e), exitcodes.NOT_FOUND)
        except (pki.PkiError, CardFileError) as e:
            fail(str(e), exitcodes.ERROR)
        except ValueError as e:
            fail(str(e), exitcodes.USAGE)
        except OSError as e:
            fail(str(e), exitcodes.ERROR)

    return wrapper  # type: ignore[return-value]


dir_option = click.option("--dir", "directory", required=True,
                          type=click.Path(file_okay=False), help="The CA directory.")  # fmt: skip


@sim.group()
def ca() -> None:
    """The simulated NHS-style PKI: a root CA, an issuing CA, the registration authority's
    card records and the CRL, all in one directory (test material: never trust it in
    production)."""


@ca.command("init")
@dir_option
@click.option("--name", default="NHS-style Simulated Root CA", show_default=True,
              help="Common name of the root CA.")  # fmt: skip
@click.option("--issuing-name", default="NHS-style Simulated Issuing CA", show_default=True,
              help="Common name of the issuing CA.")  # fmt: skip
@click.option("--organisation", default="NHS-style Simulated Organisation", show_default=True,
              help="Organisation (O) of the CAs and of the cards' certificates.")  # fmt: skip
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="RSA2048",
              show_default=True, help="The CAs' key type.")  # fmt: skip
@json_option
@_errors
def ca_init(directory: str, name: str, issuing_name: str, organisation: str, algorithm: str,
            as_json: bool) -> None:  # fmt: skip
    """Create a root and an issuing CA in DIR (created 0700), and publish an empty CRL."""
    from simulators.card import pki

    pki.init_ca(directory, name=name, issuing_name=issuing_name, organisation=organisation,
                algorithm=algorithm)  # fmt: skip
    info = {"directory": directory, "trust_anchor": str(pki.root_cert_path(directory)),
            "issuing_ca": str(pki.issuing_cert_path(directory)),
            "crl": str(pki.crl_path(directory))}  # fmt: skip
    emit(as_json, info, lambda: (
        f"simulated CA created in {directory}\n"
        f"  trust anchor: {info['trust_anchor']}\n"
        f"  issuing CA:   {info['issuing_ca']}\n"
        f"  CRL:          {info['crl']}"))  # fmt: skip


@ca.command("revoke")
@dir_option
@click.option("--uuid", help="Revoke every unrevoked card of this holder (12-digit UUID).")
@click.option("--serial", help="Revoke this card (card serial), or one certificate (hex serial).")
@click.option("--reason", type=click.Choice(REVOCATION_REASONS), default="keyCompromise",
              show_default=True, help="RFC 5280 revocation reason.")  # fmt: skip
@click.option("--no-crl", is_flag=True, help="Do not publish a new CRL (the current one stays).")
@json_option
@_errors
def ca_revoke(directory: str, uuid: str | None, serial: str | None, reason: str, no_crl: bool,
              as_json: bool) -> None:  # fmt: skip
    """Revoke a card's certificates and publish a new CRL."""
    from dataclasses import asdict

    from simulators.card import pki

    if (uuid is None) == (serial is None):
        raise click.UsageError("give exactly one of --uuid and --serial")
    revoked = pki.revoke(directory, uuid=uuid, serial=serial, reason=reason,
                         publish_crl=not no_crl)  # fmt: skip
    emit(as_json, {"revoked": [asdict(r) for r in revoked]}, lambda: "\n".join(
        [f"revoked certificate {r.certificate_serial} (card {r.card_serial}, slot {r.slot}, "
         f"UUID {r.uuid}): {r.reason}" for r in revoked]
        + ([] if no_crl else [f"CRL published: {pki.crl_path(directory)}"])))  # fmt: skip


@ca.command("crl")
@dir_option
@click.option("--next-update-days", type=click.IntRange(-3650, 3650), default=7,
              show_default=True,
              help="Days until nextUpdate; 0 or negative makes a stale CRL (for tests).")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Write the CRL here (DER; PEM beside it) instead of DIR/crl.der.")
@json_option
@_errors
def ca_crl(directory: str, next_update_days: int, out: str | None, as_json: bool) -> None:
    """Publish a new CRL signed by the issuing CA (DER, and PEM beside it)."""
    from cryptography import x509

    from simulators.card import pki

    path = pki.crl(directory, next_update_days=next_update_days, out=out)
    published = pki.load_crl(path)
    number = published.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    info = {"path": str(path), "pem": str(path.with_suffix(".pem")), "number": number,
            "this_update": published.last_update_utc.isoformat(),
            "next_update": published.next_update_utc.isoformat(),
            "entries": len(published)}  # fmt: skip
    emit(as_json, info, lambda: (
        f"CRL {info['number']} written to {path} ({info['entries']} revoked certificates; "
        f"next update {info['next_update']}"
        f"{', already stale' if next_update_days <= 0 else ''})"))  # fmt: skip


@ca.command("show")
@dir_option
@json_option
@click.option("--show-admin-secrets", is_flag=True,
              help="Include each card's PUK and management key (the RA's copy).")
@_errors
def ca_show(directory: str, as_json: bool, show_admin_secrets: bool) -> None:
    """The CA, its CRL, the cards it issued and the revocations."""
    from simulators.card import pki

    info = pki.describe_ca(directory, admin_secrets=show_admin_secrets)
    emit(as_json, info, lambda: _ca_text(info, show_admin_secrets))


@ca.command("export-ra")
@dir_option
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace FILE when it exists.")
@json_option
@_errors
def ca_export_ra(directory: str, file: str, force: bool, as_json: bool) -> None:
    """Write the RA's card credentials (PUK, management key) of every unrevoked card this CA
    issued to FILE (mode 0600; TOML when it ends in .toml, else JSON), the file RA source of
    the agent: `token-agent card unlock --ra file:FILE` (test material only)."""
    import os

    from simulators.card import pki
    from token_agent import rasource

    if os.path.lexists(file) and not force:
        raise FileExistsError(f"{file} exists (--force replaces it)")
    ca_state = pki.load_ca(directory)
    revoked = {r.card_serial for r in ca_state.state.revoked}
    cards = {c.card_serial: {"uuid": c.uuid, "guid": c.guid, "puk": c.puk,
                             "management_key_algorithm": c.management_key_algorithm,
                             "management_key": c.management_key}
             for c in ca_state.state.cards if c.card_serial not in revoked}
    path = rasource.write_file(file, cards)
    info = {"file": str(path), "cards": sorted(cards)}
    emit(as_json, info, lambda: f"wrote the RA credentials of {len(cards)} card(s) to {path} "
                                "(mode 0600)")


def _ca_text(info: dict, secrets: bool) -> str:
    crl = info["crl"]
    lines = [
        f"CA directory:  {info['directory']} ({info['algorithm']}, {info['organisation']})",
        f"root CA:       {info['root']['subject']} (until {info['root']['not_after'][:10]})",
        f"  SHA-256:     {info['root']['sha256']}",
        f"issuing CA:    {info['issuing']['subject']} "
        f"(until {info['issuing']['not_after'][:10]})",
        f"trust anchor:  {info['trust_anchor']}",
        f"CRL:           {crl['path']}"
        + (f" ({crl['error']})" if "error" in crl else
           f" number {crl['number']}, {crl['entries']} entries, next update "
           f"{crl['next_update']}{' (STALE)' if crl['stale'] else ''}"),
        f"cards issued:  {len(info['cards'])}",
    ]  # fmt: skip
    for card in info["cards"]:
        line = (f"  {card['card_serial']}  {card['uuid']}  {card['holder_name']:<24} "
                f"{card['algorithm']:<8} {card['status']:<14} until {card['not_after'][:10]}"
                f"{'  [' + card['variant'] + ']' if card['variant'] else ''}")  # fmt: skip
        if secrets:
            line += (f"\n      PUK {card['puk']}  management key "
                     f"({card['management_key_algorithm']}) {card['management_key']}")
        lines.append(line)
    lines.append(f"revoked:       {len(info['revoked'])}")
    for entry in info["revoked"]:
        lines.append(f"  {entry['certificate_serial']}  card {entry['card_serial']} "
                     f"slot {entry['slot']}  {entry['revoked_at']}  {entry['reason']}")
    return "\n".join(lines)


@sim.group()
def card() -> None:
    """Virtual NHS-style smartcards: card files issued by the simulated PKI."""


@card.command("issue")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False),
              help="The CA directory (`token-agent sim ca init`).")  # fmt: skip
@click.option("--name", required=True, help='The holder\'s name, e.g. "Dr Alice Smith".')
@click.option("--uuid", required=True, help="The holder's 12-digit NHS user id.")
@click.option("--pin", help="The card PIN, 4-8 digits (simulated test cards only).")
@click.option("--pin-stdin", is_flag=True, help="Read the PIN from standard input instead.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="The card file to write (0600).")  # fmt: skip
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="RSA2048",
              show_default=True, help="Key type of the 9A and 9C keys.")  # fmt: skip
@click.option("--variant", type=click.Choice(VARIANTS),
              help="A faulty card for tests: expired, revoked, untrusted, blocked, expiring.")
@click.option("--validity-days", type=click.IntRange(1, 3650), default=730, show_default=True,
              help="Certificate lifetime (NHS cards: renewed every 2-3 years).")  # fmt: skip
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="t1", show_default=True,
              help="Transmission protocol the card's ATR announces and the card follows: t1 "
                   "answers with the data and 90 00 (as PIV cards); t0 hands response data "
                   "out with 61xx + GET RESPONSE.")  # fmt: skip
@click.option("--no-piv", "no_piv", is_flag=True,
              help="The card refuses SELECT of the PIV application (6A82), as a card with only "
                   "a proprietary applet does: only its vendor's PKCS#11 module reaches it.")
@click.option("--force", is_flag=True, help="Overwrite an existing card file.")
@json_option
@_errors
def card_issue(ca_dir: str, name: str, uuid: str, pin: str | None, pin_stdin: bool, out: str,
               algorithm: str, variant: str | None, validity_days: int, protocol: str,
               no_piv: bool, force: bool, as_json: bool) -> None:  # fmt: skip
    """Issue a card for a person: keys, certificates, PIV objects, PIN; the PUK and the
    management key stay with the registration authority (the CA directory)."""
    from simulators.card import issuance

    if (pin is None) == (not pin_stdin):
        raise click.UsageError("give the PIN with exactly one of --pin and --pin-stdin")
    if pin is not None:
        say("warning: a PIN on the command line is visible to other processes and kept in "
            "shell history: --pin is for simulated test cards only")
    else:
        pin = sys.stdin.readline().rstrip("\r\n")
    issuance.validate_name(name)
    issuance.validate_uuid(uuid)
    issuance.validate_pin(pin)
    if len(pin) < 6:
        say("note: NHS cards issued since July 2023 need a 6-8 digit passcode; a shorter one "
            "models an older card")
    issued = issuance.issue_card(ca_dir, name=name, uuid=uuid, pin=pin, out=out,
                                 algorithm=algorithm, variant=variant,
                                 validity_days=validity_days, overwrite=force,
                                 protocol=protocol, piv_enabled=not no_piv)  # fmt: skip
    info = issuance.describe_card(issued)
    info["file"] = out
    info["variant"] = variant
    cert = info["certificates"]["9a"]
    emit(as_json, info, lambda: (
        f"issued card {issued.serial} to {issued.holder_name} (UUID {issued.holder_uuid}): "
        f"{out}\n"
        f"  certificates ({algorithm}) valid {cert['not_before'][:10]} to "
        f"{cert['not_after'][:10]}{' [' + variant + ']' if variant else ''}\n"
        f"  PUK and management key kept by the RA: `token-agent sim ca show --dir {ca_dir} "
        f"--show-admin-secrets`"))  # fmt: skip


@card.command("show")
@click.argument("file", type=click.Path(dir_okay=False))
@json_option
@_errors
def card_show(file: str, as_json: bool) -> None:
    """What a card file holds: holder, UUID, serial, certificates, PIN tries left (never the
    PIN, PUK or keys)."""
    from simulators.card import issuance
    from simulators.card.cardfile import CardFile

    info = issuance.describe_card(CardFile.load(file))
    emit(as_json, info, lambda: _card_text(info))


def _card_text(info: dict) -> str:
    lines = [
        f"holder:       {info['holder_name']}",
        f"UUID:         {info['uuid']}",
        f"card serial:  {info['serial']}",
        f"GUID:         {info['guid']}",
        f"protocol:     T={info['protocol'][1]} (ATR {info['atr']})",
        f"PIN:          {'BLOCKED' if info['pin_blocked'] else 'ok'}, "
        f"{info['pin_retries_left']} of {info['pin_max_retries']} tries left",
    ]  # fmt: skip
    for slot, cert in info["certificates"].items():
        if "error" in cert:
            lines.append(f"{slot} certificate: {cert['error']}")
            continue
        lines.append(f"{slot} certificate: {cert['subject']}")
        lines.append(f"  issuer:     {cert['issuer']}")
        lines.append(f"  serial:     {cert['serial']}  ({cert['algorithm']})")
        lines.append(f"  valid:      {cert['not_before']} to {cert['not_after']} "
                     f"({cert['status']}, {cert['days_left']} days left)")
    return "\n".join(lines)
