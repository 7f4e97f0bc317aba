"""Dagster's PostgreSQL event log, with each pool-slot operation made one transaction under one advisory lock.

``PostgresEventLogStorage`` (dagster-postgres) runs Dagster's pool-slot methods with a new autocommit connection
for every statement: a claim asks "is a slot left?" then queues the step as assigned, later "which slot has no
step?" (``SELECT ... FOR UPDATE SKIP LOCKED``, whose row lock ends with that statement) then gives that slot, by
id, to the step. Nothing holds a read to the write that depends on it, and the final UPDATE does not check that
the slot is still free: two runs claiming a pool of 1 at the same moment were both told they hold it (measured in
``clinical_ml_tests/defs/test_instance_storage_pools.py``), as on SQLite (``clinical_ml/instance_storage.py``).

:class:`PoolLockedPostgresEventLogStorage` changes only that: each pool-slot operation (claim, free, set a limit,
delete a limit, initialize a limit to the default, assign queued steps) runs as one READ COMMITTED transaction on
one connection that first takes a transaction-level advisory lock (``pg_advisory_xact_lock``), the same key for
every pool, so the operations of every process using this class on the database run one at a time; the lock ends
with the commit or rollback (or with the session, if the process dies). Everything else is dagster-postgres's.

It overrides ``index_connection`` (public, but only Dagster's storages call it) and relies on the slot methods
reaching the index only through ``index_connection`` / ``index_transaction``; ``clinical_ml_tests/defs/
test_instance_storage.py`` fails when the installed dagster-postgres is not :data:`TESTED_DAGSTER_POSTGRES_VERSION`
or those methods changed. Configured in ``dagster_postgres.yaml`` and ``deploy/celery/dagster.yaml``
(docs/instance-storage.md, "Pool slots on PostgreSQL").
"""

import os
import select
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ContextManager  # noqa: UP035

import dagster._check as check
from dagster._core.events import ASSET_CHECK_EVENTS, ASSET_EVENTS
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log import SqlEventLogStorageTable
from dagster._serdes import ConfigurableClassData
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import QueuePool

from clinical_ml.instance_storage import RemembersSchemaFound, SlotMethodsInOneTransaction

if TYPE_CHECKING:
    from dagster_postgres.auth import PgTokenProvider

# The dagster-postgres release whose PostgresEventLogStorage this subclass was read against and tested on (the
# pair of TESTED_DAGSTER_VERSION in clinical_ml/instance_storage.py; pyproject.toml pins it exactly).
TESTED_DAGSTER_POSTGRES_VERSION = "0.29.27"
# The advisory lock's key, one for all pools (a free can release slots of several pools, an assignment reads
# several). Advisory locks are per database; nothing else in a Dagster database takes advisory locks.
POOL_SLOTS_LOCK_KEY = int.from_bytes(b"cml_slot", "big")
# How long an operation waits for the lock (or a row lock) before failing, as SQLite's 30 s busy timeout does.
POOL_SLOTS_LOCK_TIMEOUT = "30s"
# A pooled connection unused this long is opened again rather than reused (a server or proxy may have closed it).
POOLED_CONNECTION_RECYCLE_SECONDS = 600

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def shared_engine(postgres_url: str) -> Engine:
    """This process's one engine for ``postgres_url``, keeping one idle connection for the next statement.

    dagster-postgres opens a new connection for every statement (``NullPool``): a TCP connection, a server
    process forked for it and a password exchange (SCRAM), a few milliseconds of CPU on both sides each time. A
    Celery worker rebuilds its instance for every step and stores each of the step's events on a connection of
    its own, so connecting was most of a worker's time outside the steps' code. Every storage of the process on
    this URL shares the engine: the instances a worker makes per step keep no connection each. Statements at
    the same moment (threads) still get one connection each, as before; only one is kept between them.

    Fork-safe as SQLAlchemy documents it: a forked child never uses the parent's connections (its engines are
    forgotten without closing theirs, :func:`_forget_engines_in_child`)."""
    with _engines_lock:
        engine = _engines.get(postgres_url)
        if engine is None:
            engine = create_engine(
                postgres_url,
                isolation_level="AUTOCOMMIT",
                poolclass=QueuePool,
                pool_size=1,
                max_overflow=-1,  # as many at once as asked, as NullPool allowed; one kept
                pool_recycle=POOLED_CONNECTION_RECYCLE_SECONDS,
            )
            # a connection the server dropped is replaced, not failed on; found without the round trip of
            # SQLAlchemy's pool_pre_ping (a worker spent as long pinging as running its statements)
            event.listen(engine, "checkout", _replace_if_closed_by_server)
            _engines[postgres_url] = engine
        return engine


def _replace_if_closed_by_server(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """On checkout: an idle connection that the server closed (restart, idle timeout, ``pg_terminate_backend``)
    has its goodbye or end-of-file waiting on its socket, with nothing asked. SQLAlchemy then discards it and
    opens another (:class:`DisconnectionError`), as after a failed ping."""
    if dbapi_connection.closed:
        raise DisconnectionError("the pooled connection is closed")
    waiting = select.poll()
    waiting.register(dbapi_connection.fileno(), select.POLLIN)
    if waiting.poll(0):
        raise DisconnectionError("the server closed the pooled connection")


def _forget_engines_in_child() -> None:
    global _engines_lock
    _engines_lock = threading.Lock()  # a thread of the parent may have held it at the fork
    for engine in _engines.values():
        engine.dispose(close=False)  # the parent's connections stay open for the parent
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)


# (storage class, database URL) pairs whose tables this process has checked (and created if missing) once
_tables_checked: set[tuple[str, str]] = set()


class OnSharedEngine:
    """A dagster-postgres storage on :func:`shared_engine` once it is built, built from ``dagster.yaml`` as this
    class, not dagster-postgres's (whose ``from_config_value`` names its own class).

    dagster-postgres's own ``__init__`` checks its tables (and creates them if missing) on a new connection of
    its own, every time a storage is built: three server connections (a server process forked, a password
    exchange) for every instance a run process, the daemon or a worker builds. Built from ``dagster.yaml``, the
    check is done by the first storage of each class and database in a process; later ones skip it (tables are
    created, never dropped, by Dagster)."""

    postgres_url: str
    _engine: Engine
    should_autocreate_tables: bool

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: "PgTokenProvider | None" = None,
    ) -> None:
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)  # type: ignore[call-arg]
        if (
            token_provider is None
        ):  # a token provider's connections are made with its tokens: left as they are
            self._engine = shared_engine(self.postgres_url)

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> Any:
        build: Any = cls  # a storage class below this one in the MRO takes these
        url = pg_url_from_config(config_value)
        autocreate = config_value.get("should_autocreate_tables", True)
        checked = (cls.__qualname__, url)
        storage = build(
            inst_data=inst_data,
            postgres_url=url,
            should_autocreate_tables=autocreate and checked not in _tables_checked,
            token_provider=get_token_provider_from_config(config_value),
        )
        storage.should_autocreate_tables = autocreate
        if autocreate:
            _tables_checked.add(checked)
        return storage


class PoolLockedPostgresEventLogStorage(
    SlotMethodsInOneTransaction, RemembersSchemaFound, OnSharedEngine, PostgresEventLogStorage
):
    """``dagster.yaml`` (with :class:`PooledPostgresRunStorage` and :class:`PooledPostgresScheduleStorage`
    beside it)::

    event_log_storage:
      module: clinical_ml.instance_storage_postgres
      class: PoolLockedPostgresEventLogStorage
      config:
        postgres_db: {...}  # as under storage: postgres:
    """

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: "PgTokenProvider | None" = None,
    ) -> None:
        # the connection of this thread's open pool-slot transaction, which every index statement until it
        # ends joins (nested slot methods included)
        self._slot_transaction_of = threading.local()
        super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)

    def store_event(self, event: EventLogEntry) -> None:
        """dagster-postgres's ``store_event`` without its ``NOTIFY run_events`` after every insert: "no longer
        used for pg event watch - preserved here to support version skew" (its own comment). Nothing listens in
        the pinned release (its webserver polls), and every process of a deployment runs the same pinned
        release; the statement was a fifth of all statements of a Celery batch run (1,028 of 5,254), each a
        round trip. Everything else is as dagster-postgres does it (test_instance_storage.py compares the
        source)."""
        check.inst_param(event, "event", EventLogEntry)
        insert_event_statement = self.prepare_insert_event(event)
        with self._connect() as conn:
            result = conn.execute(
                insert_event_statement.returning(
                    SqlEventLogStorageTable.c.run_id, SqlEventLogStorageTable.c.id
                )
            )
            res = result.fetchone()
            result.close()
            event_id = int(res[1])  # type: ignore[index]

        dagster_event = event.dagster_event
        if event.is_dagster_event and event.dagster_event_type in ASSET_EVENTS and dagster_event.asset_key:  # type: ignore[union-attr]
            with self.index_transaction() as conn:
                self._store_asset_event_tags(conn, [event], [event_id])
                self._store_asset_event(conn, event, event_id)

        if event.is_dagster_event and event.dagster_event_type in ASSET_CHECK_EVENTS:
            self.store_asset_check_event(event, event_id)

    def index_connection(self) -> ContextManager[Connection]:
        held: Connection | None = getattr(self._slot_transaction_of, "conn", None)
        if held is not None:
            # inside a pool-slot transaction; index_transaction sees it in a transaction and joins it too
            return nullcontext(held)
        return super().index_connection()

    @contextmanager
    def _slot_transaction(self) -> Iterator[None]:
        """One transaction holding the pool-slot advisory lock from its first statement to its end; every index
        statement of this thread until then runs in it. READ COMMITTED: each statement sees what the lock's
        previous holders committed (a snapshot taken before the lock was granted would not)."""
        if getattr(self._slot_transaction_of, "conn", None) is not None:
            yield  # already inside one (a slot method calling another)
            return
        with super().index_connection() as conn:
            conn.execution_options(isolation_level="READ COMMITTED")
            with conn.begin():
                conn.execute(text(f"SET LOCAL lock_timeout = '{POOL_SLOTS_LOCK_TIMEOUT}'"))
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": POOL_SLOTS_LOCK_KEY})
                self._slot_transaction_of.conn = conn
                try:
                    yield
                finally:
                    self._slot_transaction_of.conn = None


class PooledPostgresRunStorage(OnSharedEngine, PostgresRunStorage):
    """dagster-postgres's run storage on this process's :func:`shared_engine` (one kept connection, shared with
    the event log) instead of a new connection per statement: every step reads its run, and run processes
    write their runs' status. ``dagster.yaml``::

    run_storage:
      module: clinical_ml.instance_storage_postgres
      class: PooledPostgresRunStorage
      config:
        postgres_db: {...}  # as under storage: postgres:
    """


class PooledPostgresScheduleStorage(OnSharedEngine, PostgresScheduleStorage):
    """dagster-postgres's schedule storage on this process's :func:`shared_engine`: the daemon's sensors and
    schedules read and write their ticks on the kept connection instead of a new connection per statement.
    ``dagster.yaml``::

    schedule_storage:
      module: clinical_ml.instance_storage_postgres
      class: PooledPostgresScheduleStorage
      config:
        postgres_db: {...}  # as under storage: postgres:
    """
