"""Fewer fsyncs while a round runs in this process on the embedded default's SQLite instance.

Dagster's SQLite storage writes each event of a run (about 110 per round) in its own
transaction on a new connection that it closes at once. In WAL mode with SQLite's default
`synchronous=FULL` every commit is an fsync, and every close, being the last connection to the
file, checkpoints the WAL into the database (another fsync): with 10 sites, Dagster's part of
a round measured 4.7 s on disk against 0.3-0.5 s in memory on a busy 2-core machine
(docs/benchmarks.md, benchmark 3).

While `fewer_fsyncs()` is active, every new SQLite connection in this process to a database in
WAL mode gets `synchronous=NORMAL` (SQLite's recommended setting for WAL: the database cannot
be corrupted; a power cut may lose the last transactions, here a run's last log events), and
one idle connection per such file is kept open, so closing the others does not checkpoint. On
exit the kept connections close: one checkpoint per file per round. Databases not in WAL mode
(MLflow's SQLite store) and other backends (PostgreSQL) are left as they are.

A UI watching the run live sees its events when the round ends rather than as they happen (the
webserver watches the database file, which the checkpoint updates).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_lock = threading.Lock()


def relax_wal_sync(cursor: sqlite3.Cursor) -> bool:
    """`synchronous=NORMAL` for a connection to a database in WAL mode (SQLite's recommended
    setting for WAL: no corruption; a power cut may lose the last transactions); whether it was."""
    (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() != "wal":
        return False
    cursor.execute("PRAGMA synchronous=NORMAL")
    return True


class _Relaxed:
    def __init__(self) -> None:
        self.kept: dict[str, sqlite3.Connection] = {}

    def on_connect(self, dbapi_connection, connection_record) -> None:
        if not isinstance(dbapi_connection, sqlite3.Connection):
            return
        cursor = dbapi_connection.cursor()
        try:
            if not relax_wal_sync(cursor):
                return
            path = cursor.execute("PRAGMA database_list").fetchone()[2]
        except sqlite3.Error:
            return  # a database being created or locked: SQLite's defaults stay
        finally:
            cursor.close()
        if not path:
            return
        with _lock:
            if path in self.kept:
                return
            try:
                keeper = sqlite3.connect(path, check_same_thread=False)
                # a read maps the WAL index: from now on this is a connection to the file
                keeper.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.Error:
                return
            self.kept[path] = keeper

    def close(self) -> None:
        with _lock:
            for keeper in self.kept.values():
                with suppress(sqlite3.Error):
                    keeper.close()
            self.kept.clear()


@contextmanager
def fewer_fsyncs() -> Iterator[None]:
    """Relax SQLite's syncing for the connections this process opens inside the block."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    relaxed = _Relaxed()
    event.listen(Engine, "connect", relaxed.on_connect)
    try:
        yield
    finally:
        event.remove(Engine, "connect", relaxed.on_connect)
        relaxed.close()
