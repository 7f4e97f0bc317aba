"""Dagster's SQLite event log, with connections kept open instead of one engine per statement.

``SqliteEventLogStorage`` builds a SQLAlchemy engine, opens a SQLite connection, runs one statement and closes
both, for every event and every lookup (an asset event alone takes several: the run's shard, the index shard,
the dynamic-partition checks behind ``context.partition_keys`` and per-partition metadata). A ranged backfill
of 30 daily batches through the 8 per-batch assets made about 3,200 such round trips; at the default benchmark
scale they were half of what Dagster added to the bare computation (`make bench`, `benchmarks/bench_graph.py`).

:class:`PooledSqliteEventLogStorage` keeps one connection per shard open (the index and the most recently used
run shards, at most :data:`MAX_OPEN_SHARDS`; the least recently used is closed first), remembers which index
tables exist once it has seen them (``has_table``, asked before each partition lookup), and otherwise leaves
the storage as it is: same files, same schema, same transactions (one per use, committed before the lock
is released), same busy timeout, the same lock serializing this process's threads. Several processes (daemon,
webserver, run workers) still share the files through SQLite's own locking, as before. A forked child never
reuses its parent's connections, and shards are closed before ``wipe`` deletes their files.

One change of behaviour, on purpose: each operation on pool slots (claim, free, set, assign, initialize to the
default limit) runs as one ``BEGIN IMMEDIATE`` transaction of the index shard, all its statements on one
connection. Dagster's SQLite implementation reads and then writes in separate statements that nothing locks
together (the sqlite3 driver opens a transaction only at the first write, and SQLite ignores ``SELECT ... FOR
UPDATE``), so two runs claiming a pool of 1 at the same moment were both given it: two anonymizations then each
wrote a pseudonym vault without the other's patients. The stock storage has the same race.

Configured in ``dagster.yaml``; PostgreSQL (``dagster_postgres.yaml``) is the storage for shared deployments, where
dagster-postgres has the same race and ``clinical_ml/instance_storage_postgres.py`` the same kind of fix.
It overrides private members of Dagster's storage (``_connect``, ``_db_lock``, ``_initialized_dbs``,
``_initdb``): docs/instance-storage.md says what it buys (measured), the risks, and the one-step fallback to
the stock storage; ``clinical_ml_tests/defs/test_instance_storage.py`` fails when the installed Dagster is not
:data:`TESTED_DAGSTER_VERSION` or those members changed.
"""

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import Any

from dagster import StringSource
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._serdes import ConfigurableClassData
from dagster._utils.concurrency import ConcurrencyClaimStatus
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

MAX_OPEN_SHARDS = 16
# The Dagster release whose SqliteEventLogStorage internals this subclass was read against, tested and measured
# on (pyproject.toml pins it exactly). Change it only after the tests of test_instance_storage.py pass on the
# new release and benchmarks/bench_instance_storage.py still shows the gain.
TESTED_DAGSTER_VERSION = "1.13.27"
# How soon a step whose pool claim was blocked asks again. Dagster waits 1 s, then 1.1 s, 1.21 s, ... up to 15 s
# (`_calculate_timeout_interval`), unless the storage names an interval: a step that had waited behind a few
# others asked every 2 to 3 s, while the slot it was given on release (freeing a slot assigns it to the next
# queued step at once) sat held by nobody running. Each retry is one short pool-slot transaction.
POOL_CLAIM_RETRY_SECONDS = 0.2


class SlotMethodsInOneTransaction:
    """Dagster's pool-slot operations, each run inside the storage's ``_slot_transaction()``: claim (queue the
    step, assign it a slot if one is left, take a free slot), free (release the slot, dequeue, assign the
    next), and the limit changes that add or remove slots and assign queued steps to new ones. Put before the
    Dagster storage class in the bases; the storage says what one transaction is (SQLite: ``BEGIN
    IMMEDIATE`` on the index; PostgreSQL: an advisory lock, :mod:`clinical_ml.instance_storage_postgres`).
    A blocked claim tells the step to ask again after :data:`POOL_CLAIM_RETRY_SECONDS`."""

    def _slot_transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def claim_concurrency_slot(
        self, concurrency_key: str, run_id: str, step_key: str, priority: int | None = None
    ) -> ConcurrencyClaimStatus:
        with self._slot_transaction():
            status = super().claim_concurrency_slot(concurrency_key, run_id, step_key, priority)  # type: ignore[misc]
        if status.is_claimed or status.sleep_interval is not None:
            return status
        return status.with_sleep_interval(POOL_CLAIM_RETRY_SECONDS)

    def free_concurrency_slot_for_step(self, run_id: str, step_key: str) -> None:
        with self._slot_transaction():
            super().free_concurrency_slot_for_step(run_id, step_key)  # type: ignore[misc]

    def free_concurrency_slots_for_run(self, run_id: str) -> None:
        with self._slot_transaction():
            super().free_concurrency_slots_for_run(run_id)  # type: ignore[misc]

    def assign_pending_steps(self, concurrency_keys: Sequence[str]) -> None:
        with self._slot_transaction():
            super().assign_pending_steps(concurrency_keys)  # type: ignore[misc]

    def set_concurrency_slots(self, concurrency_key: str, num: int) -> None:
        with self._slot_transaction():
            super().set_concurrency_slots(concurrency_key, num)  # type: ignore[misc]

    def delete_concurrency_limit(self, concurrency_key: str) -> None:
        with self._slot_transaction():
            super().delete_concurrency_limit(concurrency_key)  # type: ignore[misc]

    def initialize_concurrency_limit_to_default(self, concurrency_key: str) -> bool:
        with self._slot_transaction():
            return super().initialize_concurrency_limit_to_default(concurrency_key)  # type: ignore[misc]


class RemembersSchemaFound:
    """Tables and asset-key columns of the event log remembered once found. Dagster asks the database before
    every dynamic-partition lookup, asset event and check evaluation whether a table exists, and reflects the
    asset-key table's columns before storing each asset event: on PostgreSQL 1,185 of the 6,149 statements of
    four Celery batch runs were these catalog queries (``pg_class``, ``pg_attribute``), each also a reflection
    in Python. A table or column once there stays (migrations add them, ``wipe`` deletes rows): remember those
    found; ask again about the others, which another process's migration may still add. Put before the
    Dagster storage class in the bases."""

    def _once_found(self, memo: str, name: str, ask: Callable[[], bool]) -> bool:
        found: set[str] = self.__dict__.setdefault(memo, set())
        if name not in found and ask():
            found.add(name)
        return name in found

    def has_table(self, table_name: str) -> bool:
        ask = partial(super().has_table, table_name)  # type: ignore[misc]
        return self._once_found("_tables_found", table_name, ask)

    def _has_asset_key_col_on_connection(self, conn: Connection, column_name: str) -> bool:
        ask = partial(super()._has_asset_key_col_on_connection, conn, column_name)  # type: ignore[misc]
        return self._once_found("_asset_key_columns_found", column_name, ask)


class PooledSqliteEventLogStorage(SlotMethodsInOneTransaction, RemembersSchemaFound, SqliteEventLogStorage):
    """``dagster.yaml``::

    event_log_storage:
      module: clinical_ml.instance_storage
      class: PooledSqliteEventLogStorage
      config:
        dagster_home:
          env: DAGSTER_HOME

    Event logs are kept where Dagster's default SQLite storage keeps them: ``<dagster_home>/history/runs``.
    """

    def __init__(self, dagster_home: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, Engine] = OrderedDict()
        self._engines_pid = os.getpid()
        self._engines_lock = threading.Lock()
        # the index connection of this thread's open pool-slot transaction, which nested uses share
        self._slot_transaction_of = threading.local()
        super().__init__(os.path.join(dagster_home, "history", "runs"), inst_data=inst_data)
        # re-entrant: a run shard opened inside a pool-slot transaction (which holds it) must not deadlock
        self._db_lock = threading.RLock()  # type: ignore[assignment]

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"dagster_home": StringSource}

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: dict[str, str]
    ) -> "PooledSqliteEventLogStorage":
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> Engine:
        with self._engines_lock:
            if os.getpid() != self._engines_pid:  # forked: the parent's connections are the parent's
                self._engines = OrderedDict()
                self._engines_pid = os.getpid()
            engine = self._engines.get(shard)
            if engine is not None:
                self._engines.move_to_end(shard)
                return engine
            engine = create_engine(
                self.conn_string_for_shard(shard),
                poolclass=StaticPool,  # one connection, reused; the storage's lock serializes its use
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
            self._engines[shard] = engine
            while len(self._engines) > MAX_OPEN_SHARDS:
                _, oldest = self._engines.popitem(last=False)
                oldest.dispose()
            return engine

    def _close_all(self) -> None:
        with self._engines_lock:
            for engine in self._engines.values():
                engine.dispose()
            self._engines = OrderedDict()

    def _ready_engine(self, shard: str) -> Engine:
        engine = self._engine(shard)
        if shard not in self._initialized_dbs:
            self._initdb(engine)
            self._initialized_dbs.add(shard)
        return engine

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        held: Connection | None = getattr(self._slot_transaction_of, "conn", None)
        if held is not None and shard == INDEX_SHARD_NAME:
            yield held  # inside a pool-slot transaction: its statements join it, committed when it ends
            return
        with self._db_lock:
            engine = self._ready_engine(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    @contextmanager
    def _slot_transaction(self) -> Iterator[None]:
        """One transaction of the index shard that holds SQLite's write lock from its first statement
        (``BEGIN IMMEDIATE``: another process's waits, up to the busy timeout) to its commit; every index
        statement of this thread until then runs in it. What Dagster's pool-slot methods read (free slots,
        steps assigned) then cannot change before what they write from it is committed."""
        if getattr(self._slot_transaction_of, "conn", None) is not None:
            yield  # already inside one (a slot method calling another)
            return
        with self._db_lock:
            engine = self._ready_engine(INDEX_SHARD_NAME)
            with engine.connect() as conn, conn.begin():
                # the sqlite3 driver would begin only at the first write, after the reads it depends on
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                self._slot_transaction_of.conn = conn
                try:
                    yield
                finally:
                    self._slot_transaction_of.conn = None

    def wipe(self) -> None:
        with self._db_lock:
            self._close_all()
        super().wipe()

    def dispose(self) -> None:
        self._close_all()
        super().dispose()


def instance_yaml_for(template: str, dagster_home: str) -> str:
    """``template`` (the text of a ``dagster.yaml``) with the event log's ``dagster_home`` set to a path, for an
    instance opened by directory (``DagsterInstance.local_temp``, ``from_config``) rather than through
    ``$DAGSTER_HOME``."""
    import yaml

    config = yaml.safe_load(template)
    storage = config.get("event_log_storage")
    if storage and storage.get("class") == PooledSqliteEventLogStorage.__name__:
        storage["config"]["dagster_home"] = dagster_home
    return yaml.safe_dump(config, sort_keys=False)
