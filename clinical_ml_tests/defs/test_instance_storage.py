"""The repository's instance (dagster.yaml): event log with kept-open connections, same files and behaviour;
the Dagster release and the private members it relies on (docs/instance-storage.md)."""

import inspect
import os
import subprocess
import sys
import textwrap
import threading
import tomllib

import dagster as dg
import yaml
from dagster._core.storage.event_log.sqlite import sqlite_event_log
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage

from clinical_ml import instance_storage
from clinical_ml.instance_storage import (
    MAX_OPEN_SHARDS,
    TESTED_DAGSTER_VERSION,
    PooledSqliteEventLogStorage,
    instance_yaml_for,
)
from clinical_ml_tests.conftest import PROJECT_ROOT

days = dg.DynamicPartitionsDefinition(name="days")


@dg.asset(partitions_def=days)
def counted(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    context.log.info(f"partition {context.partition_key}")
    return dg.MaterializeResult(metadata={"partition": context.partition_key})


def _home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    text = instance_yaml_for((PROJECT_ROOT / "dagster.yaml").read_text(), str(home))
    (home / "dagster.yaml").write_text(text)
    return home


def test_many_runs_beyond_the_open_shards_keep_every_event_in_dagsters_layout(tmp_path):
    home = _home(tmp_path)
    keys = [f"2026-01-{d:02d}" for d in range(1, MAX_OPEN_SHARDS + 6)]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        instance.add_dynamic_partitions("days", keys)
        run_ids = []
        for k in keys:
            res = dg.materialize([counted], instance=instance, partition_key=k)
            assert res.success
            run_ids.append(res.run_id)
        # every run's own shard, including those whose connection was closed to stay within the bound
        for run_id, k in zip(run_ids, keys, strict=True):
            logs = instance.all_logs(run_id)
            assert any(e.user_message == f"partition {k}" for e in logs)
            assert (home / "history" / "runs" / f"{run_id}.db").exists()
        mats = instance.fetch_materializations(counted.key, limit=100).records
        assert sorted(str(m.partition_key) for m in mats) == keys
        assert len(instance.event_log_storage._engines) <= MAX_OPEN_SHARDS

        instance.wipe()  # closes the shards before deleting their files
        assert not instance.fetch_materializations(counted.key, limit=100).records
        instance.add_dynamic_partitions("days", keys[:1])
        assert dg.materialize([counted], instance=instance, partition_key=keys[0]).success


def test_another_process_writes_are_seen_through_the_open_connections(tmp_path):
    home = _home(tmp_path)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("days", ["a", "b"])
        assert dg.materialize([counted], instance=instance, partition_key="a").success
        first = instance.get_latest_materialization_event(counted.key)
        assert first is not None and first.asset_materialization is not None
        assert first.asset_materialization.partition == "a"
        script = textwrap.dedent(
            f"""
            import dagster as dg
            from clinical_ml_tests.defs.test_instance_storage import counted
            with dg.DagsterInstance.from_config({str(home)!r}) as instance:
                assert dg.materialize([counted], instance=instance, partition_key="b").success
            """
        )
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT_ROOT, env=env, timeout=300)
        latest = instance.get_latest_materialization_event(counted.key)
        assert latest is not None and latest.asset_materialization is not None
        assert latest.asset_materialization.partition == "b"
        assert len(instance.get_run_records(dg.RunsFilter(), limit=10)) == 2


FALL_BACK = (
    "clinical_ml/instance_storage.py overrides private members of Dagster's SqliteEventLogStorage and was tested "
    "against dagster {tested}; {found}. Check the members it relies on (docs/instance-storage.md), rerun "
    "benchmarks/bench_instance_storage.py, then set TESTED_DAGSTER_VERSION; or fall back to the stock storage: "
    "delete the event_log_storage block from dagster.yaml."
)


def test_the_installed_and_pinned_dagster_is_the_release_the_storage_was_tested_against():
    pins = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "dagster==" + TESTED_DAGSTER_VERSION in pins, FALL_BACK.format(
        tested=TESTED_DAGSTER_VERSION,
        found=f"pyproject.toml pins {[d for d in pins if d.startswith('dagster')]}",
    )
    assert dg.__version__ == TESTED_DAGSTER_VERSION, FALL_BACK.format(
        tested=TESTED_DAGSTER_VERSION, found=f"dagster {dg.__version__} is installed"
    )


def _params(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_private_members_it_overrides_keep_their_signatures(tmp_path):
    empty = inspect.Parameter.empty
    assert _params(SqliteEventLogStorage._connect) == [("self", empty), ("shard", empty)]
    assert _params(SqliteEventLogStorage._initdb) == [
        ("self", empty),
        ("engine", empty),
        ("for_index_shard", False),
    ]
    assert _params(SqliteEventLogStorage.conn_string_for_shard) == [("self", empty), ("shard_name", empty)]
    assert _params(SqliteEventLogStorage.__init__) == [
        ("self", empty),
        ("base_dir", empty),
        ("inst_data", None),
    ]
    assert _params(SqliteEventLogStorage.wipe) == _params(SqliteEventLogStorage.dispose) == [("self", empty)]
    assert _params(SqliteEventLogStorage.has_table) == [("self", empty), ("table_name", empty)]
    assert isinstance(sqlite_event_log.SQLITE_BUSY_TIMEOUT_SECONDS, int)
    assert sqlite_event_log.INDEX_SHARD_NAME == "index"
    # the pool-slot methods it runs in one transaction each (test_instance_storage_pools.py)
    slot_methods = {
        "claim_concurrency_slot": ["concurrency_key", "run_id", "step_key", "priority"],
        "free_concurrency_slot_for_step": ["run_id", "step_key"],
        "free_concurrency_slots_for_run": ["run_id"],
        "assign_pending_steps": ["concurrency_keys"],
        "set_concurrency_slots": ["concurrency_key", "num"],
        "delete_concurrency_limit": ["concurrency_key"],
        "initialize_concurrency_limit_to_default": ["concurrency_key"],
    }
    for name, params in slot_methods.items():
        assert [n for n, _ in _params(getattr(SqliteEventLogStorage, name))] == ["self", *params], name
    storage = SqliteEventLogStorage(str(tmp_path))
    assert isinstance(storage._db_lock, type(threading.Lock()))
    assert isinstance(storage._initialized_dbs, set)


def test_a_runs_events_open_one_engine_per_shard_not_one_per_statement(tmp_path, monkeypatch):
    """Dagster's own code paths (run and index connections, table checks) still reach the overridden members:
    once the index is open and its tables seen, a run opens its own shard's engine and nothing else."""
    home = _home(tmp_path)
    opened: list[str] = []
    stock: list[str] = []

    def spy(create, urls: list[str]):
        def create_engine(url: str, **kwargs):
            urls.append(url)
            return create(url, **kwargs)

        return create_engine

    monkeypatch.setattr(instance_storage, "create_engine", spy(instance_storage.create_engine, opened))
    monkeypatch.setattr(sqlite_event_log, "create_engine", spy(sqlite_event_log.create_engine, stock))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("days", ["a", "b"])
        assert dg.materialize([counted], instance=instance, partition_key="a").success
        opened.clear()
        stock.clear()
        result = dg.materialize([counted], instance=instance, partition_key="b")
        assert result.success
        assert len(instance.all_logs(result.run_id)) > 10
    assert [u.rsplit("/", 1)[-1] for u in opened] == [f"{result.run_id}.db"]
    assert stock == []


def test_falling_back_to_the_stock_storage_reads_the_same_history(tmp_path):
    home = _home(tmp_path)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("days", ["a"])
        run_id = dg.materialize([counted], instance=instance, partition_key="a").run_id
    config = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text())
    del config["event_log_storage"]  # the fallback docs/instance-storage.md gives
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.event_log_storage) is SqliteEventLogStorage
        assert any(e.user_message == "partition a" for e in instance.all_logs(run_id))
        latest = instance.get_latest_materialization_event(counted.key)
        assert latest is not None and latest.asset_materialization is not None
        assert latest.asset_materialization.partition == "a"
