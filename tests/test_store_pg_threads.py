"""A Store on PostgreSQL shared by threads (the organisation server's worker threads): each
thread's calls and transactions run on a connection of their own, side by side; one
thread's transaction is never joined by another's calls, and concurrent read-then-writes
still come out right (the database's row locks, as between processes)."""

from __future__ import annotations

import threading
import time

from token_agent.store import Store


class Boom(Exception):
    pass


def test_threads_run_side_by_side_and_never_join_another_threads_transaction(pg_url):
    store = Store.open(pg_url)
    try:
        assert store.engine.concurrent
        store.engine.size_pool(8)
        inside, release = threading.Event(), threading.Event()
        errors: list = []

        def ceremony():
            try:
                with store.transaction():
                    store.add_user("alice")
                    inside.set()
                    release.wait(10)
                    raise Boom
            except Boom:
                pass
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        a = threading.Thread(target=ceremony)
        a.start()
        assert inside.wait(10)
        # another thread: not inside alice's transaction (does not see her), not waiting
        # for it either (the old single lock made every thread wait for the transaction)
        seen: dict = {}

        def admin():
            try:
                seen["users"] = [u.username for u in store.list_users()]
                store.add_user("bob")
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        started = time.monotonic()
        b = threading.Thread(target=admin)
        b.start()
        b.join(5)
        assert not b.is_alive(), "the second thread waited for the first one's transaction"
        assert time.monotonic() - started < 5
        assert seen["users"] == []  # alice is not committed: not seen outside
        release.set()
        a.join(10)
        assert not errors
        assert [u.username for u in store.list_users()] == ["bob"]
    finally:
        store.close()


def test_concurrent_read_then_writes_on_one_store_lose_nothing(pg_url):
    store = Store.open(pg_url)
    try:
        store.engine.size_pool(4)
        store.set_setting("counter", 0)
        errors: list = []

        def increment():
            try:
                for _ in range(25):
                    with store.transaction():
                        with store.connection("lock the counter") as conn:
                            conn.execute("SELECT value FROM settings WHERE key = 'counter'"
                                         + store.engine.for_update)
                        n = store.get_setting("counter", 0)
                        time.sleep(0)
                        store.set_setting("counter", n + 1)
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=increment) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        assert store.get_setting("counter") == 100
    finally:
        store.close()
