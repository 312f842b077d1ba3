"""The settings area: the organisation's settings, JSON values by name (``settings``).
Settings are configuration, not secrets."""

from __future__ import annotations

import json
from typing import Any

from .errors import InvalidValue
from .records import SETTING_KEY_RE


class SettingsArea:
    """Settings (a mixin of ``Store``)."""

    @staticmethod
    def _check_setting_key(key: str) -> str:
        if not isinstance(key, str) or not SETTING_KEY_RE.fullmatch(key):
            raise InvalidValue(f"invalid setting name {key!r}: lowercase letters, digits and . _ -")
        return key

    def get_setting(self, key: str, default: Any = None) -> Any:
        """The setting's value (decoded JSON), or ``default`` when it is not set."""
        self._check_setting_key(key)
        with self._using("read a setting") as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row["value"])

    def set_setting(self, key: str, value: Any) -> None:
        """Set a setting to a JSON value (``InvalidValue`` if it is not one). Settings are
        configuration, not secrets: never store a secret here."""
        self._check_setting_key(key)
        try:
            text = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidValue(f"setting {key!r}: value is not JSON: {exc}") from None
        with self.transaction(), self._using("write a setting") as conn:
            conn.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, text, self._now()))

    def delete_setting(self, key: str) -> bool:
        """Remove a setting; whether it was set."""
        self._check_setting_key(key)
        with self.transaction(), self._using("delete a setting") as conn:
            return conn.execute("DELETE FROM settings WHERE key = ?", (key,)).rowcount > 0

    def list_settings(self) -> dict[str, Any]:
        """All settings, by name."""
        with self._using("list settings") as conn:
            rows = conn.execute("SELECT key, value FROM settings ORDER BY key").fetchall()
        return {r["key"]: json.loads(r["value"]) for r in rows}
