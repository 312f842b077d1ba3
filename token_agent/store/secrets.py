"""The secrets area: what the knowledge and possession factors keep, hashed or encrypted
(``token_agent.factors`` computes and checks them): passwords (``password_credentials``),
authenticator apps (``totp_credentials``), app passwords (``app_passwords``) and backup
codes (``backup_codes``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .core import as_dict


class SecretsArea:
    """Password hashes, TOTP secrets, app passwords and backup codes (a mixin of ``Store``)."""

    # ---------------------------------------------------------------- passwords

    def add_password_credential(self, method_id: int, hash: str, changed_at: float) -> None:
        """Store the password hash of a new password method."""
        with self.transaction(), self._using("set a password") as conn:
            conn.execute("INSERT INTO password_credentials (method_id, hash, changed_at) "
                         "VALUES (?, ?, ?)", (int(method_id), hash, float(changed_at)))

    def set_password_hash(self, method_id: int, hash: str, changed_at: float | None = None) -> None:
        """Replace a password's hash: a new password (``changed_at`` given) or the same
        password hashed again with newer parameters (``changed_at`` kept)."""
        with self.transaction(), self._using("set a password") as conn:
            if changed_at is None:
                conn.execute("UPDATE password_credentials SET hash = ? WHERE method_id = ?",
                             (hash, int(method_id)))
            else:
                conn.execute("UPDATE password_credentials SET hash = ?, changed_at = ? "
                             "WHERE method_id = ?", (hash, float(changed_at), int(method_id)))

    def password_hash(self, method_id: int) -> str | None:
        """The stored hash of a password method, or ``None``."""
        with self._using("read a password") as conn:
            row = conn.execute("SELECT hash FROM password_credentials WHERE method_id = ?",
                               (int(method_id),)).fetchone()
        return None if row is None else row["hash"]

    # ---------------------------------------------------------------- authenticator apps

    def add_totp_credential(self, method_id: int, *, secret_enc: bytes, digits: int, period: int,
                            algorithm: str) -> None:
        """Store the encrypted secret and parameters of an authenticator app."""
        with self.transaction(), self._using("start an authenticator-app enrolment") as conn:
            conn.execute("INSERT INTO totp_credentials (method_id, secret_enc, digits, period, "
                         "algorithm) VALUES (?, ?, ?, ?, ?)",
                         (int(method_id), bytes(secret_enc), int(digits), int(period), algorithm))

    def totp_credential(self, method_id: int) -> dict[str, Any] | None:
        """``secret_enc``, ``digits``, ``period``, ``algorithm`` and ``last_step`` of an
        authenticator app, or ``None``."""
        with self._using("read an authenticator app") as conn:
            return as_dict(conn.execute(
                "SELECT secret_enc, digits, period, algorithm, last_step FROM totp_credentials "
                "WHERE method_id = ?", (int(method_id),)).fetchone())

    def advance_totp_step(self, method_id: int, step: int) -> bool:
        """Accept time step ``step`` of an authenticator app once: one conditional UPDATE
        (``last_step < step``); False when that step or a later one was already accepted
        (a replay, or another process won the race)."""
        with self.transaction(), self._using("check an authenticator-app code") as conn:
            return conn.execute("UPDATE totp_credentials SET last_step = ? "
                                "WHERE method_id = ? AND last_step < ?",
                                (int(step), int(method_id), int(step))).rowcount == 1

    # ---------------------------------------------------------------- app passwords

    def add_app_password(self, method_id: int, hash: bytes) -> None:
        """Store the keyed hash of a new app password."""
        with self.transaction(), self._using("store an app password") as conn:
            conn.execute("INSERT INTO app_passwords (method_id, hash) VALUES (?, ?)",
                         (int(method_id), bytes(hash)))

    def app_password_hashes(self, user_id: str) -> list[tuple[int, bytes]]:
        """``(method_id, hash)`` of every app password of the user."""
        with self._using("read app passwords") as conn:
            rows = conn.execute(
                "SELECT a.method_id, a.hash FROM app_passwords a JOIN methods m ON m.id = a.method_id "
                "WHERE m.user_id = ?", (user_id,)).fetchall()
        return [(int(r["method_id"]), bytes(r["hash"])) for r in rows]

    # ---------------------------------------------------------------- backup codes

    def add_backup_codes(self, method_id: int, hashes: Sequence[bytes]) -> None:
        """Store the keyed hashes of a new set of backup codes."""
        with self.transaction(), self._using("store backup codes") as conn:
            conn.executemany("INSERT INTO backup_codes (method_id, code_hash) VALUES (?, ?)",
                             [(int(method_id), bytes(h)) for h in hashes])

    def unused_backup_codes(self, method_id: int) -> int:
        """How many backup codes of the method are left."""
        with self._using("count backup codes") as conn:
            return int(conn.execute("SELECT count(*) FROM backup_codes WHERE method_id = ? "
                                    "AND used_at IS NULL", (int(method_id),)).fetchone()[0])

    def backup_codes(self, method_id: int) -> list[dict[str, Any]]:
        """``id``, ``code_hash`` and ``used_at`` of every backup code of the method."""
        with self._using("use a backup code") as conn:
            rows = conn.execute("SELECT id, code_hash, used_at FROM backup_codes WHERE method_id = ? "
                                "ORDER BY id", (int(method_id),)).fetchall()
        return [as_dict(r) for r in rows]

    def use_backup_code(self, code_id: int, used_at: float) -> bool:
        """Consume a backup code once: one conditional UPDATE (``used_at IS NULL``); False
        when it was used already (a replay, or another process won the race)."""
        with self.transaction(), self._using("use a backup code") as conn:
            return conn.execute("UPDATE backup_codes SET used_at = ? WHERE id = ? AND used_at IS NULL",
                                (float(used_at), int(code_id))).rowcount == 1
