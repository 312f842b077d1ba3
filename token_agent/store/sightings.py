"""The sightings area: the devices and networks a user logged in from (``sightings``), and
when each device last completed a second factor (``verifications``);
``token_agent.sightings`` holds the rules."""

from __future__ import annotations


class SightingsArea:
    """Sightings and device verifications (a mixin of ``Store``)."""

    def has_sighting(self, user_id: str, kind: str, value: str) -> bool:
        """Whether the user logged in from that device or network (``kind``) before."""
        with self._using("read sightings") as conn:
            return conn.execute("SELECT 1 FROM sightings WHERE user_id = ? AND kind = ? AND value = ?",
                                (user_id, kind, value)).fetchone() is not None

    def has_sightings(self, user_id: str) -> bool:
        """Whether anything was recorded for the user."""
        with self._using("read sightings") as conn:
            return conn.execute("SELECT 1 FROM sightings WHERE user_id = ? LIMIT 1",
                                (user_id,)).fetchone() is not None

    def record_sighting(self, user_id: str, kind: str, value: str, now: float) -> None:
        """Remember a device or network (``kind``) of the user, seen ``now``."""
        with self.transaction(), self._using("record sightings") as conn:
            conn.execute(
                "INSERT INTO sightings (user_id, kind, value, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, kind, value) DO UPDATE SET "
                "last_seen = excluded.last_seen", (user_id, kind, value, float(now), float(now)))

    def device_verified_at(self, user_id: str, device_id: str) -> float | None:
        """When the user last completed a second factor on that device, or ``None``."""
        with self._using("read verifications") as conn:
            row = conn.execute("SELECT verified_at FROM verifications WHERE user_id = ? "
                               "AND device_id = ?", (user_id, device_id)).fetchone()
        return None if row is None else float(row["verified_at"])

    def record_device_verification(self, user_id: str, device_id: str, method: str,
                                   now: float) -> None:
        """Remember that the user completed a second factor (``method``) on that device."""
        with self.transaction(), self._using("record a verification") as conn:
            conn.execute(
                "INSERT INTO verifications (user_id, device_id, verified_at, method) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE SET "
                "verified_at = excluded.verified_at, method = excluded.method",
                (user_id, device_id, float(now), method))

    def forget_device_verifications(self, user_id: str) -> None:
        """Forget every device verification of the user."""
        with self.transaction(), self._using("forget verifications") as conn:
            conn.execute("DELETE FROM verifications WHERE user_id = ?", (user_id,))
