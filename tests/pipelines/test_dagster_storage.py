"""The embedded default's Dagster instance: the event log with its engines kept, and the
assets' values kept as files without a log event per read and write."""

from __future__ import annotations

import pickle
import sqlite3
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from tests.conftest import SITES
from twin_pipelines import dagster_storage
from twin_pipelines.assets import ROUND_ASSETS
from twin_pipelines.campaign import run_round
from twin_pipelines.config import RoundConfig
from twin_pipelines.dagster_storage import PooledSqliteEventLogStorage
from twin_pipelines.home import TwinHome
from twin_pipelines.resources import InProcessFleet
from twin_pipelines.resources.outputs import AssetValueFiles

ROUND_ASSET_NAMES = [a.key.to_user_string() for a in ROUND_ASSETS]


@pytest.fixture(scope="module")
def handlers(request):
    make = request.getfixturevalue("make_handler")
    return {s: make(s) for s in SITES}


@pytest.fixture
def home_instance(tmp_path: Path):
    home = TwinHome(tmp_path / "twin").ensure_dagster_home()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield home, instance


def _events(storage, run_id: str) -> list:
    return storage.get_records_for_run(run_id, limit=10_000).records


@dg.asset
def number() -> int:
    return 41


@dg.asset
def next_number(number: int) -> int:
    return number + 1


def test_new_home_uses_the_pooled_event_log_in_the_default_layout(home_instance):
    home, instance = home_instance
    storage = instance.event_log_storage
    assert isinstance(storage, PooledSqliteEventLogStorage)
    assert Path(storage._base_dir) == home / "history" / "runs"
    assert (home / "history" / "runs" / "index.db").exists()


def test_a_config_an_earlier_version_wrote_is_updated_an_edited_one_kept(tmp_path: Path):
    from twin_pipelines.home import _EARLIER_INSTANCE_CONFIGS

    earlier = TwinHome(tmp_path / "earlier")
    earlier.dagster_home.mkdir(parents=True)
    (earlier.dagster_home / "dagster.yaml").write_text(_EARLIER_INSTANCE_CONFIGS[-1])
    text = (earlier.ensure_dagster_home() / "dagster.yaml").read_text()
    assert "PooledSqliteEventLogStorage" in text and "DefaultRunCoordinator" in text

    edited = TwinHome(tmp_path / "edited")
    edited.dagster_home.mkdir(parents=True)
    mine = _EARLIER_INSTANCE_CONFIGS[-1] + "retention:\n  schedule:\n    purge_after_days: 7\n"
    (edited.dagster_home / "dagster.yaml").write_text(mine)
    assert (edited.ensure_dagster_home() / "dagster.yaml").read_text() == mine


def test_round_on_the_pooled_log_reads_back_through_dagsters_own_storage(
    handlers, round_env, home_instance
):
    home, instance = home_instance
    env = round_env(InProcessFleet(handlers))
    result = run_round(env.defs, instance, RoundConfig(min_sites=3), log_level="WARNING")
    assert result.success, result.error

    # the same files, read by Dagster's own SQLite event log (another reader, as the
    # webserver is), while this instance keeps its connections open
    plain = SqliteEventLogStorage(str(home / "history" / "runs"))
    ours = _events(instance.event_log_storage, result.run_id)
    theirs = _events(plain, result.run_id)
    assert len(ours) == len(theirs) > 50
    assert [r.storage_id for r in ours] == [r.storage_id for r in theirs]
    with dg.DagsterInstance.from_config(str(home)) as fresh:
        for name in ROUND_ASSET_NAMES:
            event = fresh.get_latest_materialization_event(dg.AssetKey(name))
            assert event is not None and event.run_id == result.run_id, name
            assert event.dagster_event.partition == result.round_key

    # no IO manager debug messages in the run's log; each value kept as a file per round
    messages = [
        r.event_log_entry.user_message for r in ours if not r.event_log_entry.is_dagster_event
    ]
    assert not [m for m in messages if "Loading partition" in m or "Writing file at" in m]
    storage_dir = Path(instance.storage_directory())
    for name in ROUND_ASSET_NAMES:
        assert (storage_dir / name / result.round_key).is_file(), name
    plan = pickle.loads((storage_dir / "round_plan" / result.round_key).read_bytes())
    assert plan.round_key == result.round_key


def test_engines_stay_bounded_and_every_run_stays_readable(home_instance):
    home, instance = home_instance
    storage = instance.event_log_storage
    runs = []
    for _ in range(dagster_storage.KEPT_ENGINES + 4):
        result = dg.materialize([number, next_number], instance=instance)
        assert result.success
        runs.append(result.run_id)
        assert len(storage._engines) <= dagster_storage.KEPT_ENGINES
    for run_id in runs:  # the oldest runs' engines were disposed: their files open again
        assert len(_events(storage, run_id)) > 5
    assert instance.get_latest_materialization_event(dg.AssetKey("next_number")).run_id == runs[-1]


def test_connections_relax_sync_for_wal_and_wipe_starts_afresh(home_instance):
    home, instance = home_instance
    storage = instance.event_log_storage
    first = dg.materialize([number], instance=instance)
    with storage.index_connection() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    run_file = Path(storage.path_for_shard(first.run_id))
    assert run_file.exists()

    storage.wipe()
    assert not run_file.exists()
    assert first.run_id not in storage._engines  # no connection keeps the deleted file
    second = dg.materialize([number], instance=instance)
    assert second.success and len(_events(storage, second.run_id)) > 5
    with sqlite3.connect(storage.path_for_shard(second.run_id)) as db:
        assert db.execute("SELECT count(*) FROM event_logs").fetchone()[0] > 5


def test_a_value_not_yet_made_fails_the_step_clearly(tmp_path: Path):
    defs = dg.Definitions(
        assets=[number, next_number],
        resources={"io_manager": AssetValueFiles(base_dir=str(tmp_path / "values"))},
    )
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey("next_number")],
            raise_on_error=False,
        )
    assert not result.success
    failure = result.get_step_failure_events()[0]
    assert "no stored value at" in failure.event_specific_data.error.message
    assert str(tmp_path / "values" / "number") in failure.event_specific_data.error.message

    with dg.instance_for_test() as instance:
        made = job.execute_in_process(instance=instance)
        assert made.success and made.output_for_node("next_number") == 42
    assert pickle.loads((tmp_path / "values" / "next_number").read_bytes()) == 42


def test_a_webserver_watching_a_run_sees_each_event_as_it_is_written(home_instance):
    """The webserver learns of a run's new events by watching the run's database file; a
    connection kept open would keep them in the WAL, unseen, until the run ended."""
    from dagster._core.events.log import EventLogEntry

    home, instance = home_instance
    writer = instance.event_log_storage
    watcher = SqliteEventLogStorage(str(home / "history" / "runs"))  # the webserver's
    run_id = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"

    def entry(message: str) -> EventLogEntry:
        return EventLogEntry(
            error_info=None,
            level="INFO",
            user_message=message,
            run_id=run_id,
            timestamp=time.time(),
        )

    writer.store_event(entry("first"))  # creates the run's file
    seen: list[str] = []
    arrived = threading.Event()

    def on_event(event, cursor) -> None:
        seen.append(event.user_message)
        arrived.set()

    watcher.watch(run_id, None, on_event)
    try:
        for message in ("second", "third"):
            arrived.clear()
            writer.store_event(entry(message))
            assert arrived.wait(10), f"the watcher did not see {message!r}: saw {seen}"
    finally:
        watcher.end_watch(run_id, on_event)
        watcher.dispose()
    assert seen[-1] == "third"


def test_a_new_run_file_is_the_database_dagster_would_create(home_instance, tmp_path: Path):
    home, instance = home_instance
    ours = dg.materialize([number], instance=instance)
    plain_dir = tmp_path / "plain"
    plain = SqliteEventLogStorage(str(plain_dir))
    with plain.run_connection(ours.run_id):  # Dagster builds the run's file table by table
        pass

    def schema(path: str) -> tuple:
        with sqlite3.connect(path) as db:
            return (
                sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")),
                db.execute("SELECT version_num FROM alembic_version").fetchall(),
                db.execute("PRAGMA journal_mode").fetchone(),
            )

    mine = schema(instance.event_log_storage.path_for_shard(ours.run_id))
    assert mine == schema(plain.path_for_shard(ours.run_id))
    assert mine[2] == ("wal",) and len(mine[0]) > 5
    # and no scratch file left beside it
    assert not list((home / "history" / "runs").glob("*.new"))


def test_without_hard_links_a_run_file_is_built_as_dagster_does(home_instance, monkeypatch):
    home, instance = home_instance

    def no_links(source, target):
        raise PermissionError(1, "hard links not supported here")

    monkeypatch.setattr(dagster_storage.os, "link", no_links)
    result = dg.materialize([number, next_number], instance=instance)
    assert result.success
    assert len(_events(instance.event_log_storage, result.run_id)) > 5
    assert not list((home / "history" / "runs").glob("*.new"))
