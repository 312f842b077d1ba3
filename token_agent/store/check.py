"""``token-agent store check``: what a store is and whether it is sound.

``check_store(store)`` reports the engine and where the store is, its schema version (and
the one this code writes), connectivity (the time of one round trip), the engine's own
integrity checks, and the audit chain. ``ok`` is true when nothing is wrong. It reads only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .errors import AuditChainBroken, StoreError

if TYPE_CHECKING:
    from . import Store


def check_store(store: "Store") -> dict[str, Any]:
    """The report (module docstring); never raises for a problem it can describe."""
    from .migrations import SCHEMA_VERSION

    report: dict[str, Any] = {"engine": store.engine.name, "location": store.location,
                              "schema_version": None, "code_schema_version": SCHEMA_VERSION,
                              "round_trip_ms": None, "problems": [], "audit_events": None,
                              "details": {}}
    problems: list[str] = report["problems"]
    try:
        started = time.perf_counter()
        with store.connection("reach the store") as conn:
            conn.execute("SELECT 1").fetchone()
        report["round_trip_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
        report["details"] = store.info()
        report["schema_version"] = report["details"]["schema_version"]
        problems.extend(store.check_integrity())
    except StoreError as exc:
        problems.append(str(exc))
        report["ok"] = False
        return report
    if report["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema version {report['schema_version']}, this token-agent writes "
                        f"{SCHEMA_VERSION}")
    try:
        report["audit_events"] = store.verify_events()
    except AuditChainBroken as exc:
        problems.append(f"audit chain: {exc}")
    except StoreError as exc:
        problems.append(str(exc))
    report["ok"] = not problems
    return report
