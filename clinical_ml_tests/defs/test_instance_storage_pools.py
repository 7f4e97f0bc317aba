"""Pool slots on the repository's SQLite event log: a pool of 1 (``pseudonym_vault``, ``landing_ledger``) has
one holder at a time across processes, so a read-modify-write done while holding it never loses an update.

Dagster's SQLite claim reads (is a slot left? which slot is free?) and then writes in separate statements that
SQLite does not lock together (the Python driver starts a transaction only at the first write, and SQLite ignores
``SELECT ... FOR UPDATE``); two runs claiming at the same moment both got the slot, and two anonymizations each
wrote a vault that lacked the other's patients (docs/instance-storage.md, "Pool slots").
"""

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from sqlalchemy import event
from sqlalchemy.engine import Engine

from clinical_ml.instance_storage import PooledSqliteEventLogStorage

POOL = "pseudonym_vault"
STEP = "anonymized_cohort"


def _storage(home: Path) -> SqliteEventLogStorage:
    return PooledSqliteEventLogStorage(str(home))


def _one(statement: str) -> str:
    return " ".join(statement.split())


def test_two_claims_interleaved_between_their_reads_and_writes_never_both_hold_the_slot(tmp_path):
    """The interleaving that lost the vault update, forced: run A reads that no step is assigned the slot, then
    stops; run B claims up to its choice of the free slot, then stops; A finishes its claim; then B."""
    a, b = _storage(tmp_path), _storage(tmp_path)  # two processes' storages: own connections, own locks
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

    def claim(storage: SqliteEventLogStorage, who: str) -> None:
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


def _vault_writer(home: str, ledger: str, who: int, rounds: int, start) -> None:
    """One run process: each round, claim the pool's slot (polling, as a run's executor does), read the ledger,
    add this round's entry, write it back (through a rename, as the vault is written), free the slot."""
    storage = PooledSqliteEventLogStorage(home)
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


def test_concurrent_run_processes_holding_the_vault_slot_never_lose_an_update(tmp_path):
    """As the partition runs do: several processes, each with its own storage on one $DAGSTER_HOME, claim the
    pool at the same moment and update one file while they hold it; every update lands."""
    n_processes, rounds = 3, 8
    _storage(tmp_path).set_concurrency_slots(POOL, 1)
    ledger = tmp_path / "vault.json"
    ledger.write_text("[]")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(n_processes)
    workers = [
        ctx.Process(target=_vault_writer, args=(str(tmp_path), str(ledger), i, rounds, start))
        for i in range(n_processes)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0] * n_processes
    written = json.loads(ledger.read_text())
    expected = {f"run_{i}_{r}" for i in range(n_processes) for r in range(rounds)}
    assert len(written) == len(expected), (
        f"{len(expected) - len(written)} of {len(expected)} updates were lost"
    )
    assert set(written) == expected
    info = _storage(tmp_path).get_concurrency_info(POOL)
    assert info.claimed_slots == [] and info.pending_steps == []
