"""The repository's instance (dagster.yaml): event log with kept-open connections, same files and behaviour;
the Dagster release and the private members it relies on (docs/instance-storage.md). And the PostgreSQL
profiles' event log (dagster_postgres.yaml, deploy/celery/dagster.yaml): the dagster-postgres release and the
members its pool-slot lock relies on; its behaviour on a server is in test_instance_storage_pools.py."""

import hashlib
import inspect
import os
import subprocess
import sys
import textwrap
import threading
import tomllib

import dagster as dg
import dagster_postgres
import pytest
import yaml
from dagster._core.instance.config import dagster_instance_config
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from dagster._core.storage.event_log.sqlite import sqlite_event_log
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster_postgres import PostgresEventLogStorage

from clinical_ml import instance_storage
from clinical_ml.instance_storage import (
    MAX_OPEN_SHARDS,
    TESTED_DAGSTER_VERSION,
    PooledSqliteEventLogStorage,
    instance_yaml_for,
)
from clinical_ml.instance_storage_postgres import (
    TESTED_DAGSTER_POSTGRES_VERSION,
    PooledPostgresRunStorage,
    PooledPostgresScheduleStorage,
    PoolLockedPostgresEventLogStorage,
)
from clinical_ml_tests.conftest import PROJECT_ROOT

# Dagster's pool-slot operations that both storages run as one transaction each (test_instance_storage_pools.py),
# with their parameters after self.
SLOT_METHODS = {
    "claim_concurrency_slot": ["concurrency_key", "run_id", "step_key", "priority"],
    "free_concurrency_slot_for_step": ["run_id", "step_key"],
    "free_concurrency_slots_for_run": ["run_id"],
    "assign_pending_steps": ["concurrency_keys"],
    "set_concurrency_slots": ["concurrency_key", "num"],
    "delete_concurrency_limit": ["concurrency_key"],
    "initialize_concurrency_limit_to_default": ["concurrency_key"],
}

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


def _assert_tested_release(package: str, *, tested: str, installed: str, fall_back: str) -> None:
    """``package`` is pinned to and installed at the release the storage was tested against."""
    pins = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"{package}=={tested}" in pins, fall_back.format(
        tested=tested, found=f"pyproject.toml pins {[d for d in pins if d.startswith(package)]}"
    )
    assert installed == tested, fall_back.format(tested=tested, found=f"{package} {installed} is installed")


def test_the_installed_and_pinned_dagster_is_the_release_the_storage_was_tested_against():
    _assert_tested_release(
        "dagster", tested=TESTED_DAGSTER_VERSION, installed=dg.__version__, fall_back=FALL_BACK
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
    # RemembersSchemaFound (both storages): store_asset_event asks through this one
    assert _params(SqliteEventLogStorage._has_asset_key_col_on_connection) == [
        ("self", empty),
        ("conn", empty),
        ("column_name", empty),
    ]
    assert "self._has_asset_key_index_cols_on_connection(conn)" in inspect.getsource(
        SqliteEventLogStorage._store_asset_event
    )
    assert isinstance(sqlite_event_log.SQLITE_BUSY_TIMEOUT_SECONDS, int)
    assert sqlite_event_log.INDEX_SHARD_NAME == "index"
    # the pool-slot methods it runs in one transaction each (test_instance_storage_pools.py)
    for name, params in SLOT_METHODS.items():
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


PG_FALL_BACK = (
    "clinical_ml/instance_storage_postgres.py runs dagster-postgres's pool-slot methods under an advisory lock and "
    "was tested against dagster-postgres {tested}; {found}. Read the new release's event_log.py and Dagster's "
    'slot methods against docs/instance-storage.md ("Pool slots on PostgreSQL"), run '
    "clinical_ml_tests/defs/test_instance_storage_pools.py on a server (`source .ci/postgres.sh`), then set "
    "TESTED_DAGSTER_POSTGRES_VERSION; or fall back to the stock storage: put the `storage: postgres:` block back "
    "in dagster_postgres.yaml and deploy/celery/dagster.yaml (and run one pool-writing run at a time)."
)


def test_the_installed_and_pinned_dagster_postgres_is_the_release_the_pool_lock_was_tested_against():
    _assert_tested_release(
        "dagster-postgres",
        tested=TESTED_DAGSTER_POSTGRES_VERSION,
        installed=dagster_postgres.__version__,
        fall_back=PG_FALL_BACK,
    )


# What the slot methods call on the index (Dagster 1.13.27): they must reach it only through index_connection
# or index_transaction, which the lock's transaction replaces; a direct connection would run outside it.
SLOT_HELPERS = (
    "_claim_concurrency_slot",
    "_free_concurrency_slots",
    "_remove_pending_steps",
    "add_pending_step",
    "has_pending_step",
    "has_unassigned_slots",
    "check_concurrency_claim",
    "_allocate_concurrency_slots",
    "_upsert_and_lock_limit_row",
    "_reconcile_concurrency_limits_from_slots",
    "_has_rows",
)


# sha256 of the pinned dagster-postgres's PostgresEventLogStorage.store_event source, which
# PoolLockedPostgresEventLogStorage.store_event repeats without its NOTIFY: re-read both when this changes
STOCK_STORE_EVENT_SHA256 = "4a2e37e5871bf2c87789192abc185ecfefa37938a9e0c3d2f915c2348a77641e"


def test_the_postgres_store_event_it_repeats_is_the_one_it_was_read_against():
    source = inspect.getsource(PostgresEventLogStorage.store_event)
    assert hashlib.sha256(source.encode()).hexdigest() == STOCK_STORE_EVENT_SHA256, PG_FALL_BACK.format(
        tested=TESTED_DAGSTER_POSTGRES_VERSION, found="another PostgresEventLogStorage.store_event"
    )
    assert "no longer used for pg event watch" in source


def test_the_postgres_slot_methods_are_dagsters_own_and_reach_the_index_only_through_index_connection():
    for name in [*SLOT_METHODS, *SLOT_HELPERS]:
        stock = getattr(PostgresEventLogStorage, name)
        # dagster-postgres does not override them (an override could open its connections its own way)
        assert stock is getattr(SqlEventLogStorage, name), PG_FALL_BACK.format(
            tested=TESTED_DAGSTER_POSTGRES_VERSION, found=f"PostgresEventLogStorage overrides {name}"
        )
        source = inspect.getsource(stock)
        direct = [c for c in ("_connect(", "run_connection(", "_engine", "create_engine") if c in source]
        assert direct == [], f"{name} reaches the database through {direct}, outside the lock's transaction"
    for name, params in SLOT_METHODS.items():
        assert [n for n, _ in _params(getattr(PostgresEventLogStorage, name))] == ["self", *params], name
    # index_transaction joins a connection already in a transaction (the lock's) instead of beginning another
    transaction = inspect.getsource(PostgresEventLogStorage.index_transaction)
    assert "self.index_connection()" in transaction and "in_transaction()" in transaction
    empty = inspect.Parameter.empty
    assert _params(PostgresEventLogStorage.index_connection) == [("self", empty)]
    assert _params(PostgresEventLogStorage.__init__) == [
        ("self", empty),
        ("postgres_url", empty),
        ("should_autocreate_tables", True),
        ("inst_data", None),
        ("token_provider", None),
    ]


@pytest.mark.parametrize(
    "profile", ["dagster_postgres.yaml", "deploy/celery/dagster.yaml", "deploy/k8s/dagster.yaml"]
)
def test_the_postgres_profiles_use_the_pool_locked_event_log_beside_dagster_postgres_storages(
    profile, tmp_path
):
    (tmp_path / "dagster.yaml").write_text((PROJECT_ROOT / profile).read_text())
    config, _ = dagster_instance_config(str(tmp_path))  # validated as Dagster validates it (no server needed)
    assert "storage" not in config
    assert (config["event_log_storage"]["module"], config["event_log_storage"]["class"]) == (
        PoolLockedPostgresEventLogStorage.__module__,
        PoolLockedPostgresEventLogStorage.__name__,
    )
    assert (config["run_storage"]["module"], config["run_storage"]["class"]) == (
        PooledPostgresRunStorage.__module__,
        PooledPostgresRunStorage.__name__,
    )
    assert (config["schedule_storage"]["module"], config["schedule_storage"]["class"]) == (
        PooledPostgresScheduleStorage.__module__,
        PooledPostgresScheduleStorage.__name__,
    )
    connection = config["event_log_storage"]["config"]
    assert config["run_storage"]["config"] == config["schedule_storage"]["config"] == connection
    assert connection["postgres_db"]["db_name"] == {"env": "DAGSTER_PG_DB"}
    assert connection["postgres_db"]["scheme"] == "postgresql+psycopg2"
