"""The security keys the service owns: opened once and kept open while they are plugged in.

A workstation's key stays plugged in between logins, so the service keeps it open (one
CTAPHID channel, its getInfo read once) instead of opening it for every ceremony: that is
what a USB host does, and it keeps the key's own state honest (three wrong PINs in a row
block the key until it is re-plugged, whatever number of logins they were spread over; a
simulator counts a new connection as a plug-in).

* The pool is (re)scanned when it is asked for a key and its last scan is older than
  ``rescan_seconds``, or when it holds none: new keys are opened, keys that died (removed
  mid-ceremony, or an I/O error) are dropped. A key already held open is never probed again.
* ``acquire(credential_ids=...)`` (a login for a user with keys enrolled) gives the key that
  holds one of the user's credentials: remembered from an earlier answer, or asked silently
  (getAssertion up=false) once; it waits while that key serves another ceremony. Without
  credentials (tap-and-go, enrolment) it gives the only free key, or the one the person
  touches among several.
* Each key serves one ceremony at a time (its lock, held until the ceremony ends); a
  ceremony's wait for a busy key ends at its timeout or when it is cancelled.
* Other programs may use a key the pool holds (a browser, ``token-agent keys info``): the
  driver's device (``drivers/fido/channel.py``) ignores their reports, which hidraw delivers
  to every handle, and gets a new channel when the key forgot the pool's (a power cycle); a
  key whose connection fell out of step is closed by the driver, dropped here, and reopened
  at the next scan.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Callable

log = logging.getLogger("token_agent.service.keys")

POLL = 0.02


class Busy(Exception):
    """Every key that could serve the ceremony stayed busy until its timeout."""


class _Entry:
    def __init__(self, key) -> None:
        self.key = key
        self.lock = threading.Lock()


class PooledKey:
    """A key lent to one ceremony (``with`` gives the ``FidoKey``); released at the end, and
    dropped from the pool if it died meanwhile."""

    def __init__(self, pool: "KeyPool", path: str, entry: _Entry) -> None:
        self._pool, self._path, self._entry = pool, path, entry

    @property
    def key(self):
        return self._entry.key

    def __enter__(self):
        return self._entry.key

    def __exit__(self, *exc) -> None:
        try:
            if self._entry.key.closed:
                self._pool._drop(self._path, self._entry)
        finally:
            self._entry.lock.release()


class KeyPool:
    def __init__(self, environ: Mapping[str, str] | None, *, rescan_seconds: float = 2.0) -> None:
        self.environ = environ
        self.rescan_seconds = rescan_seconds
        self._guard = threading.Lock()
        self._scan_lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        # a user's credential ids -> the paths of the keys found holding one of them
        self._holder: dict[tuple[bytes, ...], tuple[str, ...]] = {}
        self._scanned = float("-inf")

    # -- the keys ------------------------------------------------------------------------------

    def paths(self) -> list[str]:
        with self._guard:
            return list(self._entries)

    def scan(self, *, force: bool = False) -> None:
        """Open keys that appeared, drop keys that died (see the module docstring)."""
        from drivers.fido import discovery
        from drivers.fido.errors import FidoKeyError
        from drivers.fido.keys import FidoKey
        from drivers.fido.sim import list_sim_descriptors, sim_descriptor

        # One scan at a time, and never a wait for one: a key that is slow to open (a
        # simulator that accepts but does not answer, a USB key mid-enumeration) must not
        # stall the ceremonies of the keys already open. A caller that finds a scan running
        # goes on with the keys there are (``force``: it waits, having none).
        if not self._scan_lock.acquire(blocking=force):
            return
        try:
            if not force and time.monotonic() - self._scanned < self.rescan_seconds:
                return
            with self._guard:
                for path, entry in list(self._entries.items()):
                    if entry.key.closed and entry.lock.acquire(blocking=False):
                        self._entries.pop(path, None)
                        entry.lock.release()
                held = set(self._entries)
            found = list(discovery.list_usb_descriptors())
            usb_paths = {str(d.path) for d in found}
            sims = [a for a in discovery.sim_addresses(self.environ)
                    if str(sim_descriptor(*a).path) not in held]
            found += list_sim_descriptors(sims)
            opened: dict[str, object] = {}
            for d in found:
                path = str(d.path)
                if path in held or path in opened:
                    continue
                try:
                    opened[path] = FidoKey.open(d)
                except FidoKeyError as e:
                    log.warning("FIDO key %s left out: %s", path, e)
            with self._guard:
                for path, key in opened.items():
                    self._entries[path] = _Entry(key)
                # a USB key no longer listed was unplugged (a simulator's death shows as closed)
                for path, entry in list(self._entries.items()):
                    if (not path.startswith("sim:") and path not in usb_paths
                            and entry.lock.acquire(blocking=False)):
                        self._entries.pop(path, None)
                        entry.key.close()
                        entry.lock.release()
                self._forget_missing()
            self._scanned = time.monotonic()
        finally:
            self._scan_lock.release()

    def _forget_missing(self) -> None:
        """(guard held) Forget which keys hold what for keys that are gone."""
        self._holder = {ids: paths for ids, paths in self._holder.items()
                        if all(p in self._entries for p in paths)}

    def _drop(self, path: str, entry: _Entry) -> None:
        with self._guard:
            if self._entries.get(path) is entry:
                del self._entries[path]
                self._forget_missing()
        self._scanned = float("-inf")  # look again at the next request

    def close(self) -> None:
        with self._guard:
            entries, self._entries = list(self._entries.values()), {}
            self._holder = {}
        for entry in entries:
            try:
                entry.key.close()
            except Exception:  # noqa: BLE001 (closing whatever state a key is in)
                pass

    # -- lending them --------------------------------------------------------------------------

    def _wait(self, entries: Sequence[tuple[str, _Entry]], deadline: float,
              cancel: threading.Event | None) -> tuple[str, _Entry]:
        """The first of ``entries`` to be free, its lock taken."""
        from drivers.fido.errors import Cancelled

        while True:
            for path, entry in entries:
                if entry.lock.acquire(blocking=False):
                    if entry.key.closed:
                        entry.lock.release()
                        self._drop(path, entry)
                        continue
                    return path, entry
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if time.monotonic() > deadline:
                raise Busy()
            time.sleep(POLL)

    def acquire(self, *, rp_id: str | None = None, credential_ids: Sequence[bytes] = (),
                timeout: float = 30.0, cancel: threading.Event | None = None,
                on_touch: Callable[[], None] | None = None) -> PooledKey:
        """A key for one ceremony (see the module docstring). ``NoKeyFound`` with no key
        (``KeyNotPermitted`` when one is plugged in that the service may not open),
        ``NoCredentials`` when no key holds the credentials, :class:`Busy` at the timeout."""
        from drivers.fido.errors import NoCredentials
        from drivers.fido.keys import select_key

        from ..ceremonies.keyfinding import no_key_found

        deadline = time.monotonic() + timeout
        self.scan()
        with self._guard:
            entries = list(self._entries.items())
        if not entries:
            self.scan(force=True)
            with self._guard:
                entries = list(self._entries.items())
            if not entries:
                raise no_key_found()
        ids = tuple(sorted(bytes(c) for c in credential_ids))
        if ids and rp_id is not None:
            with self._guard:
                known = self._holder.get(ids, ())
            candidates = [(p, e) for p, e in entries if p in known]
            if not candidates:
                candidates = self._find_holders(entries, rp_id, list(ids), deadline, cancel)
                with self._guard:
                    if candidates:
                        self._holder[ids] = tuple(p for p, _ in candidates)
            if not candidates:
                raise NoCredentials("None of the security keys here holds a credential for "
                                    "this sign-in.")
            path, entry = self._wait(candidates, deadline, cancel)
            return PooledKey(self, path, entry)
        # no credentials to look for: a free key, or the one the person touches
        path, entry = self._wait(entries, deadline, cancel)
        taken = [(path, entry)]
        for other_path, other in entries:
            if other is not entry and other.lock.acquire(blocking=False):
                taken.append((other_path, other))
        if len(taken) == 1:
            return PooledKey(self, path, entry)
        chosen = None
        try:
            key = select_key([e.key for _, e in taken], on_touch=on_touch,
                             timeout=max(1.0, deadline - time.monotonic()), cancel=cancel)
            chosen = next((p, e) for p, e in taken if e.key is key)
            return PooledKey(self, *chosen)
        finally:
            for p, e in taken:
                if chosen is None or e is not chosen[1]:
                    e.lock.release()

    def _find_holders(self, entries: Sequence[tuple[str, _Entry]], rp_id: str,
                      ids: list[bytes], deadline: float,
                      cancel: threading.Event | None) -> list[tuple[str, _Entry]]:
        """Ask the keys (each when it is free) whether they hold one of ``ids``: the keys free
        now first, the busy ones as they come free, until one does (a key busy with another
        person's ceremony is not waited for while a free one may answer). Keys still busy
        at the deadline are left out."""
        from drivers.fido.errors import Cancelled

        holders: list[tuple[str, _Entry]] = []
        pending = list(entries)
        while pending and not holders:
            asked = False
            for path, entry in list(pending):
                if not entry.lock.acquire(blocking=False):
                    continue
                pending.remove((path, entry))
                asked = True
                try:
                    if entry.key.closed:
                        continue
                    if entry.key.holds_credential(rp_id, ids):
                        holders.append((path, entry))
                        break
                finally:
                    entry.lock.release()
                    if entry.key.closed:
                        self._drop(path, entry)
            if holders or not pending or asked:
                continue
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if time.monotonic() > deadline:
                break
            time.sleep(POLL)
        return holders
