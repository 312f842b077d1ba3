"""The deliveries area: which audit events of an organisation's workstations were recorded
(``org_deliveries``, PK ``(workstation, seq)``).

A workstation numbers the events of its offline logins in its outbox (``seq``, increasing)
and delivers them in batches until the server acknowledges them. A batch can arrive twice
(the answer was lost, the workstation crashed before deleting what was acknowledged): the
server's ``claim_delivery`` inserts the row with ``ON CONFLICT DO NOTHING`` inside the
transaction that records the event, so an event is recorded exactly once, whatever the
retries and whichever replica receives them (``token_agent/organisation/ingest.py``).
"""

from __future__ import annotations


class DeliveriesArea:
    """Delivered workstation events (a mixin of ``Store``)."""

    def claim_delivery(self, workstation: str, seq: int, now: float) -> bool:
        """Claim event ``seq`` of ``workstation`` (inside the caller's transaction): True when
        it was not delivered before (the caller records it now), False when it was."""
        with self.transaction(), self._using("record a delivered event") as conn:
            cur = conn.execute(
                "INSERT INTO org_deliveries (workstation, seq, delivered_at) VALUES (?, ?, ?) "
                "ON CONFLICT (workstation, seq) DO NOTHING", (workstation, int(seq), float(now)))
            return cur.rowcount == 1

    def set_delivery_event(self, workstation: str, seq: int, event_id: int) -> None:
        """The audit event that recorded delivery ``seq`` of ``workstation``."""
        with self.transaction(), self._using("record a delivered event") as conn:
            conn.execute("UPDATE org_deliveries SET event_id = ? WHERE workstation = ? AND seq = ?",
                         (int(event_id), workstation, int(seq)))

    def delivered_seqs(self, workstation: str) -> list[int]:
        """Every event number of ``workstation`` recorded, in order."""
        with self._using("read delivered events") as conn:
            rows = conn.execute("SELECT seq FROM org_deliveries WHERE workstation = ? ORDER BY seq",
                                (workstation,)).fetchall()
        return [int(r["seq"]) for r in rows]

    def last_delivered_seq(self, workstation: str) -> int:
        """The highest event number of ``workstation`` recorded (0: none)."""
        with self._using("read delivered events") as conn:
            row = conn.execute("SELECT max(seq) AS m FROM org_deliveries WHERE workstation = ?",
                               (workstation,)).fetchone()
        return int(row["m"] or 0)
