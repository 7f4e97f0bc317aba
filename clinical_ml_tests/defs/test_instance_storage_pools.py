"""Pool slots on the repository's event logs, SQLite (``dagster.yaml``) and PostgreSQL (``dagster_postgres.yaml``):
a pool of 1 (``pseudonym_vault``, ``landing_ledger``) has one holder at a time across processes, so a
read-modify-write done while holding it never loses an update.

Dagster's claim reads (is a slot left? which slot is free?) and then writes in separate statements that nothing
locks together: on SQLite the Python driver starts a transaction only at the first write and SQLite ignores
``SELECT ... FOR UPDATE``; on PostgreSQL dagster-postgres runs each statement in autocommit, so ``FOR UPDATE SKIP
LOCKED`` holds the slot's row for that one statement. Two runs claiming at the same moment both got the slot, and
two anonymizations each wrote a vault that lacked the other's patients (docs/instance-storage.md, "Pool slots").

The PostgreSQL cases need a server (``source .ci/postgres.sh``, as CI does); without DAGSTER_PG_* they skip.
"""

import importlib
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from clinical_ml_tests.postgres import fresh_database

POOL = "pseudonym_vault"
STEP = "anonymized_cohort"
SQLITE = "clinical_ml.instance_storage:PooledSqliteEventLogStorage"
POSTGRES = "clinical_ml.instance_storage_postgres:PoolLockedPostgresEventLogStorage"
# Processes x rounds of the process test. On PostgreSQL a claim's gap between reading and writing is shorter (a
# round trip on one connection): 3 x 8 lost an update in 6 of 8 runs of the stock storage, 4 x 12 in 5 of 5.
CONTENTION = {SQLITE: (3, 8), POSTGRES: (4, 12)}


class Slots(NamedTuple):
    """Where the pool's slots live: the storage class (``module:Class``, importable in a spawned process) and
    its one argument (a $DAGSTER_HOME, or a PostgreSQL URL)."""

    storage_class: str
    where: str

    def open(self) -> SqlEventLogStorage:
        module, name = self.storage_class.split(":")
        return getattr(importlib.import_module(module), name)(self.where)


@pytest.fixture
def postgres_db() -> Iterator[str]:
    """A fresh database on the configured server (dropped afterwards): its name."""
    with fresh_database("slots_", else_the_configured_one=False) as name:
        yield name


@pytest.fixture
def postgres_url(postgres_db: str) -> str:
    """The fresh database as a dagster-postgres URL, built as dagster_postgres.yaml's block builds it."""
    from dagster_postgres.utils import pg_url_from_config

    db = {
        "hostname": os.environ["DAGSTER_PG_HOST"],
        "port": int(os.environ["DAGSTER_PG_PORT"]),
        "username": os.environ["DAGSTER_PG_USERNAME"],
        "password": os.environ["DAGSTER_PG_PASSWORD"],
        "db_name": postgres_db,
        "scheme": "postgresql+psycopg2",
    }
    return pg_url_from_config({"postgres_db": db})


@pytest.fixture(params=["sqlite", "postgres"])
def slots(request: pytest.FixtureRequest, tmp_path: Path) -> Slots:
    if request.param == "sqlite":
        return Slots(SQLITE, str(tmp_path))
    return Slots(POSTGRES, request.getfixturevalue("postgres_url"))


def _one(statement: str) -> str:
    return " ".join(statement.split())


def test_two_claims_interleaved_between_their_reads_and_writes_never_both_hold_the_slot(slots):
    """The interleaving that lost the vault update, forced: run A reads that no step is assigned the slot, then
    stops; run B claims up to its choice of the free slot, then stops; A finishes its claim; then B."""
    a, b = slots.open(), slots.open()  # two processes' storages: own connections, own locks
    a.set_concurrency_slots(POOL, 1)
    a_read, b_progressed, a_done = threading.Event(), threading.Event(), threading.Event()

    def pause(conn, cursor, statement, params, context, executemany) -> None:
        sql, who = _one(statement), threading.current_thread().name
        # A: just read how many steps are assigned the pool (none yet); wait until B has gone as far as it can
        if (
            who == "A"
            and not a_read.is_set()
            and "FROM pending_steps" in sql
            and "assigned_timestamp IS NOT NULL" in sql
        ):
            a_read.set()
            b_progressed.wait(2)
        # B: just picked the free slot; wait until A has finished its claim
        if (
            who == "B"
            and not b_progressed.is_set()
            and sql.startswith("SELECT concurrency_slots.id")
            and "step_key IS NULL" in sql
        ):
            b_progressed.set()
            a_done.wait(2)

    claimed: dict[str, bool] = {}

    def claim(storage: SqlEventLogStorage, who: str) -> None:
        try:
            claimed[who] = storage.claim_concurrency_slot(POOL, f"run_{who}", STEP).is_claimed
        finally:
            (a_done if who == "A" else b_progressed).set()

    event.listen(Engine, "after_cursor_execute", pause)
    try:
        first = threading.Thread(target=claim, args=(a, "A"), name="A")
        first.start()
        assert a_read.wait(10), "run A never read the pool's holders: Dagster's claim queries changed"
        second = threading.Thread(target=claim, args=(b, "B"), name="B")
        second.start()
        first.join(30)
        second.join(30)
    finally:
        event.remove(Engine, "after_cursor_execute", pause)

    assert sorted(claimed) == ["A", "B"], "a claim did not finish"
    holders = [who for who, ok in claimed.items() if ok]
    assert len(holders) == 1, f"both runs were told they hold the pool of 1: {claimed}"
    info = a.get_concurrency_info(POOL)
    assert [s.run_id for s in info.claimed_slots] == [f"run_{holders[0]}"]
    assert info.assigned_step_count == 1  # the loser waits in the queue, not assigned a slot it cannot take

    # the loser gets the slot once the holder frees it
    b.free_concurrency_slot_for_step(f"run_{holders[0]}", STEP)
    loser = "B" if holders == ["A"] else "A"
    assert (a if loser == "A" else b).claim_concurrency_slot(POOL, f"run_{loser}", STEP).is_claimed
    a.dispose()
    b.dispose()


def _vault_writer(slots: Slots, ledger: str, who: int, rounds: int, start) -> None:
    """One run process: each round, claim the pool's slot (polling, as a run's executor does), read the ledger,
    add this round's entry, write it back (through a rename, as the vault is written), free the slot."""
    storage = slots.open()
    path = Path(ledger)
    for r in range(rounds):
        start.wait(60)  # every process claims at the same moment
        run_id = f"run_{who}_{r}"
        while not storage.claim_concurrency_slot(POOL, run_id, STEP).is_claimed:
            time.sleep(0.002)
        entries = json.loads(path.read_text())
        time.sleep(0.005)  # the anonymization between reading the vault and writing it
        tmp = path.with_name(f".{path.name}.{who}")
        tmp.write_text(json.dumps([*entries, run_id]))
        os.replace(tmp, path)
        storage.free_concurrency_slot_for_step(run_id, STEP)
    storage.dispose()


def lost_updates(slots: Slots, folder: Path, *, n_processes: int, rounds: int) -> tuple[int, int, list[str]]:
    """``n_processes`` run processes x ``rounds`` claims of the pool at the same moment, each updating one file
    while it holds the slot: (updates lost, updates made, what the file holds)."""
    slots.open().set_concurrency_slots(POOL, 1)
    ledger = folder / "vault.json"
    ledger.write_text("[]")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(n_processes)
    workers = [
        ctx.Process(target=_vault_writer, args=(slots, str(ledger), i, rounds, start))
        for i in range(n_processes)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0] * n_processes
    written = json.loads(ledger.read_text())
    return n_processes * rounds - len(written), n_processes * rounds, written


def test_concurrent_run_processes_holding_the_vault_slot_never_lose_an_update(slots, tmp_path):
    """As the partition runs do: several processes, each with its own storage on one instance, claim the pool at
    the same moment and update one file while they hold it; every update lands."""
    n_processes, rounds = CONTENTION[slots.storage_class]
    lost, made, written = lost_updates(slots, tmp_path, n_processes=n_processes, rounds=rounds)
    assert lost == 0, f"{lost} of {made} updates were lost"
    assert set(written) == {f"run_{i}_{r}" for i in range(n_processes) for r in range(rounds)}
    info = slots.open().get_concurrency_info(POOL)
    assert info.claimed_slots == [] and info.pending_steps == []


def test_a_blocked_claim_is_asked_again_within_a_tick_not_after_dagsters_growing_back_off(slots):
    """A step blocked on a pool asks again after the interval its claim returns; without one Dagster waits
    1.1^n s (n: how often it asked), 2.6 s by the tenth ask, while the slot freed meanwhile is already
    assigned to it (freeing assigns the next queued step) and held by nobody running."""
    from dagster._core.execution.plan.instance_concurrency_context import _calculate_timeout_interval

    from clinical_ml.instance_storage import POOL_CLAIM_RETRY_SECONDS

    a, b = slots.open(), slots.open()
    a.set_concurrency_slots(POOL, 1)
    held = a.claim_concurrency_slot(POOL, "run_a", STEP)
    assert held.is_claimed
    for ask in range(12):
        blocked = b.claim_concurrency_slot(POOL, "run_b", STEP)
        assert not blocked.is_claimed
        assert _calculate_timeout_interval(blocked.sleep_interval, ask) == POOL_CLAIM_RETRY_SECONDS
    a.free_concurrency_slot_for_step("run_a", STEP)
    assert b.claim_concurrency_slot(POOL, "run_b", STEP).is_claimed  # the freed slot was assigned to b


def test_tables_and_columns_once_found_are_not_asked_about_again(slots):
    """Asked before each partition lookup and asset event (RemembersSchemaFound); a table not there is asked
    about again, since another process's migration may add it."""
    storage = slots.open()
    statements: list[str] = []

    def count(conn, cursor, statement, params, context, executemany) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        assert storage.has_table("dynamic_partitions") and storage.has_asset_key_index_cols()
        asked = len(statements)
        assert asked > 0
        for _ in range(3):
            assert storage.has_table("dynamic_partitions") and storage.has_asset_key_index_cols()
        assert len(statements) == asked
        assert not storage.has_table("no_such_table") and not storage.has_table("no_such_table")
        assert len(statements) > asked
    finally:
        event.remove(Engine, "before_cursor_execute", count)


def test_each_postgres_slot_operation_runs_on_one_connection_that_first_takes_the_advisory_lock(postgres_url):
    """What the lock relies on in Dagster's code (test_instance_storage.py checks it statically too): every
    statement of a claim and of a free joins the one transaction that took the lock, none runs beside it."""
    storage = Slots(POSTGRES, postgres_url).open()
    storage.set_concurrency_slots(POOL, 1)
    ran: list[tuple[int, str]] = []

    def record(conn, cursor, statement, params, context, executemany) -> None:
        ran.append((id(conn.connection.dbapi_connection), _one(statement)))

    event.listen(Engine, "after_cursor_execute", record)
    try:
        operations = []
        for operation in (
            lambda: storage.claim_concurrency_slot(POOL, "run_a", STEP),
            lambda: storage.free_concurrency_slot_for_step("run_a", STEP),
        ):
            ran.clear()
            operation()
            operations.append(list(ran))
    finally:
        event.remove(Engine, "after_cursor_execute", record)
        storage.dispose()
    claim, free = operations
    for statements in (claim, free):
        assert len({conn for conn, _ in statements}) == 1, (
            "a slot statement ran outside the lock's transaction"
        )
        assert statements[1][1].startswith("SELECT pg_advisory_xact_lock"), statements[:2]
    assert any("UPDATE concurrency_slots SET run_id" in sql for _, sql in claim)  # the claim did write
    assert any("DELETE FROM pending_steps" in sql for _, sql in free)


def test_the_postgres_profile_gives_every_process_the_pool_locked_event_log(
    postgres_db, tmp_path, monkeypatch
):
    """dagster_postgres.yaml builds it, and so does the instance reference that run and step processes
    (and Celery workers) rebuild their instance from."""
    import dagster as dg
    from dagster_postgres import PostgresRunStorage, PostgresScheduleStorage

    from clinical_ml.instance_storage_postgres import (
        PooledPostgresRunStorage,
        PooledPostgresScheduleStorage,
        PoolLockedPostgresEventLogStorage,
    )

    monkeypatch.setenv("DAGSTER_PG_DB", postgres_db)
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "dagster.yaml").write_text((root / "dagster_postgres.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert isinstance(instance.event_log_storage, PoolLockedPostgresEventLogStorage)
        assert isinstance(instance.run_storage, PooledPostgresRunStorage)
        assert isinstance(instance.run_storage, PostgresRunStorage)
        # one engine for the process and database: the run storage's statements on the event log's kept connection
        assert instance.run_storage._engine is instance.event_log_storage._engine
        assert isinstance(instance.schedule_storage, PooledPostgresScheduleStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert instance.schedule_storage._engine is instance.event_log_storage._engine
        with dg.DagsterInstance.from_ref(instance.get_ref()) as rebuilt:
            assert isinstance(rebuilt.event_log_storage, PoolLockedPostgresEventLogStorage)
            instance.event_log_storage.set_concurrency_slots(POOL, 1)
            assert rebuilt.event_log_storage.claim_concurrency_slot(POOL, "run_a", STEP).is_claimed
            assert not instance.event_log_storage.claim_concurrency_slot(POOL, "run_b", STEP).is_claimed


def test_instances_built_again_in_a_process_open_no_new_server_connection(postgres_db, tmp_path, monkeypatch):
    """A run process builds an instance per run, and dagster-postgres's storages each checked their tables on a
    new connection every time (three per instance): now the first instance of the process checks them."""
    import dagster as dg
    from sqlalchemy.pool import Pool

    monkeypatch.setenv("DAGSTER_PG_DB", postgres_db)
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "dagster.yaml").write_text((root / "dagster_postgres.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as first:
        assert first.get_runs() == []  # tables made, kept connection open
    opened: list[object] = []

    def count(dbapi_connection, connection_record) -> None:
        opened.append(dbapi_connection)

    event.listen(Pool, "connect", count)
    try:
        for _ in range(3):
            with dg.DagsterInstance.from_config(str(tmp_path)) as again:
                assert again.get_runs() == []
                assert again.schedule_storage.all_instigator_state() == []
    finally:
        event.remove(Pool, "connect", count)
    assert opened == []


def test_events_are_stored_and_indexed_without_a_notify_each(postgres_db, tmp_path, monkeypatch):
    """dagster-postgres sent ``NOTIFY run_events`` after every event, for webservers of older releases; the
    asset, its partition and its check are stored and indexed as before."""
    import dagster as dg

    monkeypatch.setenv("DAGSTER_PG_DB", postgres_db)
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "dagster.yaml").write_text((root / "dagster_postgres.yaml").read_text())
    statements: list[str] = []

    def count(conn, cursor, statement, params, context, executemany) -> None:
        statements.append(statement)

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        event.listen(Engine, "before_cursor_execute", count)
        try:
            instance.report_runless_asset_event(
                dg.AssetMaterialization("cohort", partition="2025-01-06", metadata={"rows": 3})
            )
        finally:
            event.remove(Engine, "before_cursor_execute", count)
        assert any("INSERT INTO event_logs" in s for s in statements)
        assert not any("NOTIFY" in s for s in statements)
        latest = instance.get_latest_materialization_event(dg.AssetKey("cohort"))
        assert latest is not None and latest.asset_materialization.partition == "2025-01-06"
        assert instance.get_materialized_partitions(dg.AssetKey("cohort")) == {"2025-01-06"}


def _backend_of(storage: SqlEventLogStorage) -> int:
    with storage.index_connection() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _backend_in_child(storage: SqlEventLogStorage, answer: "multiprocessing.Queue[int]") -> None:
    answer.put(_backend_of(storage))


def test_postgres_storages_of_a_process_reuse_one_connection_and_a_forked_child_never_shares_it(postgres_url):
    """Statements one after another run on one server process (not a new connection each, as dagster-postgres
    does), shared by every storage of the process on the database (a Celery worker makes one per step); a
    process forked meanwhile gets connections of its own and leaves the parent's working."""
    first, second = Slots(POSTGRES, postgres_url).open(), Slots(POSTGRES, postgres_url).open()
    backend = _backend_of(first)
    assert _backend_of(first) == backend
    assert _backend_of(second) == backend
    answer: multiprocessing.Queue[int] = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_backend_in_child, args=(first, answer))
    child.start()
    child_backend = answer.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert child_backend != backend
    assert _backend_of(first) == backend  # the parent's connection was neither used nor closed by the child
    first.set_concurrency_slots(POOL, 1)  # and the slot methods' transactions run on the shared engine too
    assert first.claim_concurrency_slot(POOL, "run_a", STEP).is_claimed
    assert not second.claim_concurrency_slot(POOL, "run_b", STEP).is_claimed
    kept = _backend_of(second)  # the one kept may be another (a slot method can use two at once)
    assert _backend_of(first) == kept


def test_a_pooled_connection_the_server_closed_is_replaced_not_failed_on(postgres_url):
    """A restart or an idle timeout on the server ends the connection kept between statements: the next
    statement runs on a new one instead of failing."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    storage = Slots(POSTGRES, postgres_url).open()
    backend = _backend_of(storage)
    admin = create_engine(postgres_url, poolclass=NullPool)  # a connection of its own, not the pool's
    try:
        with admin.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend}).scalar_one()
            gone = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            deadline = time.monotonic() + 10
            while conn.execute(gone, {"pid": backend}).scalar_one() and time.monotonic() < deadline:
                time.sleep(0.05)  # the server ends it a moment after saying yes
    finally:
        admin.dispose()
    replaced = _backend_of(storage)
    assert replaced != backend
    assert _backend_of(storage) == replaced
