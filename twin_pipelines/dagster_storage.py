"""Dagster's SQLite event log with its database engines kept, for the embedded default.

Dagster's `SqliteEventLogStorage` (a database file per run, and a cross-run index) builds a new
SQLAlchemy engine for every connection it opens and disposes of it at once: about 400 per
round here (each event is written to the run's file, asset events to the index as well, and
every dynamic-partition lookup first checks that the partitions table exists, through one
more engine). A new engine also starts with an empty statement cache, so every insert and
query is compiled again each time. Measured on benchmark 3 (docs/benchmarks.md), that was
most of what the on-disk instance costs a round beyond an in-memory one.

`PooledSqliteEventLogStorage` is the same storage (same files, same schema, same locking:
every access still holds the storage's lock, as Dagster's does) with one engine per database
file kept for the index and the most recent runs (so each statement is compiled once), the
index's connection kept open, and the table checks remembered once a table is found. A run's
file still gets a connection per use, closed after it: the last close checkpoints the WAL into
the file, and that is how a webserver watching the run live learns of each new event. A new
run's file is a copy of an empty one made once per process, not built table by table. Its
connections use SQLite's recommended setting for WAL databases, `synchronous=NORMAL`: no
corruption on a crash; a power cut may lose the last events written (see also
`twin_pipelines.sqlite_sync`).

`TwinHome.ensure_dagster_home` names it in a new embedded-default instance's dagster.yaml;
the webserver and the daemon load it from there as well.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SqliteEventLogStorage,
)
from dagster._core.storage.sql import create_engine
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool, QueuePool

from twin_pipelines.sqlite_sync import relax_wal_sync

# the index and a few runs' files: a round writes to its own run's file and the index; the
# webserver reads a handful of runs at a time. Older engines are disposed (only the index's
# keeps a connection open).
KEPT_ENGINES = 6


def _relaxed_sync(dbapi_connection, connection_record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        relax_wal_sync(cursor)
    finally:
        cursor.close()


def _empty_run_database(storage: SqliteEventLogStorage) -> bytes:
    """The bytes of a run's database file as Dagster creates it, before any event."""
    with tempfile.TemporaryDirectory(prefix="twin-run-db-") as folder:
        path = os.path.join(folder, "empty.db")
        engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
        try:
            storage._initdb(engine)  # noqa: SLF001 - Dagster's own schema and stamp
        finally:
            engine.dispose()
        db = sqlite3.connect(path)
        try:  # the WAL folded into the file (WAL mode itself is kept in the file's header)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
        with open(path, "rb") as file:
            return file.read()


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """`SqliteEventLogStorage` with its engines kept (see the module's docstring)."""

    def __init__(self, base_dir: str, inst_data=None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._engines_pid = os.getpid()
        self._tables: set[str] = set()
        self._tables_lock = threading.Lock()
        self._empty_run_file: bytes | None = None
        super().__init__(base_dir, inst_data)

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> PooledSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> Engine:
        """The kept engine of a database file (called with the storage's lock held)."""
        if self._engines_pid != os.getpid():  # a forked child: its parent's connections stay its
            for engine in self._engines.values():
                engine.dispose(close=False)
            self._engines.clear()
            self._engines_pid = os.getpid()
        engine = self._engines.pop(shard, None)
        if engine is None:
            # a run's file: a connection per use, as Dagster's; when the last one closes, SQLite
            # checkpoints its WAL into the file, which is what a webserver watching the run
            # live is told of (it watches the file). The index: its connection kept.
            if shard == INDEX_SHARD_NAME:
                pool = {"poolclass": QueuePool, "pool_size": 1, "max_overflow": 2}
            else:
                pool = {"poolclass": NullPool}
            engine = create_engine(
                self.conn_string_for_shard(shard),
                **pool,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
            event.listen(engine, "connect", _relaxed_sync)
            if shard not in self._initialized_dbs:
                if shard == INDEX_SHARD_NAME or not self._copy_empty_run_file(shard):
                    self._initdb(engine)
                self._initialized_dbs.add(shard)
        self._engines[shard] = engine  # the most recently used last
        while len(self._engines) > KEPT_ENGINES:
            _, oldest = self._engines.popitem(last=False)
            oldest.dispose()
        return engine

    def _copy_empty_run_file(self, shard: str) -> bool:
        """Create a new run's database file as a copy of an empty one made once per process
        (the schema and its migration stamp, in WAL mode) instead of creating its tables and
        indexes one by one; False if the file exists already, or this file system has no hard
        links (Dagster then checks or builds it its own way)."""
        path = self.path_for_shard(shard)
        if os.path.exists(path):
            return False
        if self._empty_run_file is None:
            self._empty_run_file = _empty_run_database(self)
        scratch = f"{path}.{os.getpid()}.{threading.get_ident()}.new"
        with open(scratch, "wb") as file:
            file.write(self._empty_run_file)
        try:
            os.link(scratch, path)  # never over a file another process has just created
        except OSError:  # it has (FileExistsError), or no hard links here: Dagster's way
            return False
        finally:
            os.unlink(scratch)
        return True

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock, self._engine(shard).connect() as conn, conn.begin():
            yield conn

    def has_table(self, table_name: str) -> bool:
        """Whether the index holds `table_name`; a table found is not looked up again."""
        with self._tables_lock:
            if table_name in self._tables:
                return True
        engine = create_engine(
            self.conn_string_for_shard(INDEX_SHARD_NAME),
            poolclass=NullPool,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
        try:
            with engine.connect() as conn:
                found = bool(engine.dialect.has_table(conn, table_name))
        finally:
            engine.dispose()
        if found:
            with self._tables_lock:
                self._tables.add(table_name)
        return found

    def _dispose_engines(self) -> None:
        with self._db_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines.clear()

    def wipe(self) -> None:
        self._dispose_engines()  # the run files are deleted: no connection may keep them
        with self._tables_lock:
            self._tables.clear()
        super().wipe()

    def upgrade(self) -> None:
        self._dispose_engines()
        super().upgrade()
        self._dispose_engines()

    def dispose(self) -> None:
        self._dispose_engines()
        super().dispose()
