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

Configured in ``dagster.yaml``; PostgreSQL (``dagster_postgres.yaml``) is the storage for shared deployments.
It overrides private members of Dagster's storage (``_connect``, ``_db_lock``, ``_initialized_dbs``,
``_initdb``): docs/instance-storage.md says what it buys (measured), the risks, and the one-step fallback to
the stock storage; ``clinical_ml_tests/defs/test_instance_storage.py`` fails when the installed Dagster is not
:data:`TESTED_DAGSTER_VERSION` or those members changed.
"""

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dagster import StringSource
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SQLITE_BUSY_TIMEOUT_SECONDS,
    SqliteEventLogStorage,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

MAX_OPEN_SHARDS = 16
# The Dagster release whose SqliteEventLogStorage internals this subclass was read against, tested and measured
# on (pyproject.toml pins it exactly). Change it only after the tests of test_instance_storage.py pass on the
# new release and benchmarks/bench_instance_storage.py still shows the gain.
TESTED_DAGSTER_VERSION = "1.13.27"


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
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
        self._tables_found: set[str] = set()
        super().__init__(os.path.join(dagster_home, "history", "runs"), inst_data=inst_data)

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

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def has_table(self, table_name: str) -> bool:
        # Asked before every dynamic-partition lookup and every asset event, each time through a new engine
        # and connection (about 19 per batch of a ranged run). A table of the index shard, once there, stays
        # (migrations add tables, wipe empties them): remember those found; ask again about the others,
        # which another process's migration may still add.
        if table_name in self._tables_found:
            return True
        found = super().has_table(table_name)
        if found:
            self._tables_found.add(table_name)
        return found

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
