"""The tested Celery configuration (deploy/celery): a partitioned backfill of 20 small batches of
`batch_ingestion_job`, every step a Celery task on a Redis broker, run by two worker processes of
deploy/celery/worker.py on the PostgreSQL instance of deploy/celery/dagster.yaml, with the code location of
deploy/celery/definitions.py and a data root outside the repository, read and written by the workers.

Mid-backfill one worker process is stopped while it runs a step and killed with SIGKILL. The step's task goes
back on the queue (task_acks_late + task_reject_on_worker_lost, deploy/celery/settings.py) and runs again in a
worker; a run that failed instead is rerun. Then: every step ran in a worker, never in the process that
orchestrated its run; both workers ran steps; every batch is in the ledger once per delivered file with every
delivered row counted, each admission released or withheld once, its de-identified outputs exist once; the
pseudonym vault holds every delivered patient and admission once; the single-writer pools held; a rerun of
the killed batch completes with the same outputs (the same rows in every table, the same bytes elsewhere).

Needs redis-server (`.ci/redis.sh` exports CLINICAL_ML_REDIS_URL; without it the test starts its own when
redis-server is on PATH) and PostgreSQL (`.ci/postgres.sh`); it skips and says why when either is missing.
Locally: `source .ci/postgres.sh && source .ci/redis.sh && .venv/bin/pytest -p no:logging <this file>`.
"""

import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg
import polars as pl
import psutil
import pytest

from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml_tests.e2e.test_postgres_instance import _home_with, _step_windows
from clinical_ml_tests.e2e.test_postgres_instance import postgres_db as postgres_db  # the fixture
from deploy.celery.local import (
    LocalWorkers,
    celery_ingestion_job,
    deid_digests,
    polars_threads,
    redis_answers,
    run_partition,
    start_redis,
)

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
N_BATCHES = 20
N_WORKERS = 2
# Runs orchestrated at once (each in its own process); their steps queue for the two workers.
N_RUN_PROCESSES = 3
# Tiny daily batches (~10 admissions each): the test is about where steps run and what they leave behind.
HOSPITAL = SyntheticConfig(n_patients=200, n_batches=N_BATCHES, n_sites=2, seed=21, days_per_batch=1)
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
STEP_EVENTS = {
    dg.DagsterEventType.STEP_START,
    dg.DagsterEventType.STEP_SUCCESS,
    dg.DagsterEventType.STEP_FAILURE,
}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """CLINICAL_ML_REDIS_URL (set by .ci/redis.sh), else a redis-server of our own on loopback."""
    url = os.environ.get("CLINICAL_ML_REDIS_URL")
    if url:
        if not redis_answers(url):
            if os.environ.get("CI"):
                raise AssertionError("CLINICAL_ML_REDIS_URL is set but Redis does not answer")
            pytest.skip("Redis at CLINICAL_ML_REDIS_URL does not answer")
        yield url
        return
    started = start_redis(tmp_path)
    if started is None:
        pytest.skip(
            "no Redis (CLINICAL_ML_REDIS_URL unset and no redis-server on PATH): CI installs Debian's "
            "redis-server and starts it with .ci/redis.sh"
        )
    server, url = started
    try:
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _wait(predicate: Callable[[], bool], seconds: float, message: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.2)


def _quiet_run(batch_id: str) -> tuple[str, str, bool]:
    return run_partition(batch_id, QUIET)


def _step_log(instance: dg.DagsterInstance, run_ids: list[str]) -> list[tuple[float, int, str, str, str]]:
    """(time, pid, event type, run id, step key) of every step start and end, in time order."""
    out = []
    for run_id in run_ids:
        for e in instance.all_logs(run_id):
            event = e.dagster_event
            if event is not None and event.event_type in STEP_EVENTS:
                assert event.pid is not None and e.step_key is not None
                out.append((e.timestamp, event.pid, event.event_type.value, run_id, e.step_key))
    return sorted(out)


def _running_steps(instance: dg.DagsterInstance) -> dict[int, tuple[str, str]]:
    """The step each process is in the middle of right now: pid -> (run id, step key)."""
    busy: dict[int, tuple[str, str]] = {}
    run_ids = [r.run_id for r in instance.get_runs()]
    for _, pid, kind, run_id, step in _step_log(instance, run_ids):
        if kind == dg.DagsterEventType.STEP_START.value:
            busy[pid] = (run_id, step)
        elif busy.get(pid) == (run_id, step):
            del busy[pid]
    return busy


def _kill_a_worker_mid_step(
    instance: dg.DagsterInstance, workers: LocalWorkers, name: str
) -> tuple[int, str, str]:
    """SIGKILL the process of worker ``name`` while it is inside a step: stopped first (SIGSTOP), so that the
    step it was seen starting cannot finish before the kill."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for pid in workers.children(name):
            if pid not in _running_steps(instance):
                continue
            os.kill(pid, signal.SIGSTOP)
            running = _running_steps(instance).get(pid)
            if running is None:
                os.kill(pid, signal.SIGCONT)
                continue
            os.kill(pid, signal.SIGKILL)
            return pid, *running
        time.sleep(0.5)
    raise AssertionError(f"worker {name} was never seen inside a step")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_backfill_on_celery_workers_survives_a_killed_worker(
    tmp_path: Path, postgres_db: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duckdb

    from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

    monkeypatch.setenv("DAGSTER_PG_DB", postgres_db)
    monkeypatch.setenv("CLINICAL_ML_CELERY_BROKER", f"{redis_url}/0")
    monkeypatch.setenv("CLINICAL_ML_CELERY_BACKEND", f"{redis_url}/1")
    data_root = _home_with(tmp_path, monkeypatch, "deploy/celery/dagster.yaml")
    assert not data_root.is_relative_to(PROJECT_ROOT)
    import redis

    for db in (0, 1):
        redis.Redis.from_url(f"{redis_url}/{db}").flushdb()

    hospital = generate_hospital(data_root / "landing", HOSPITAL)
    batches = list(hospital.batch_ids)
    assert len(batches) == N_BATCHES
    # rows delivered, by file content (the ledger records each file under its sha256)
    delivered = {
        _sha256(f): pl.read_csv(f, infer_schema=False).height for f in (data_root / "landing").glob("*/*.csv")
    }
    landing_ids = {
        table: pl.concat(
            [
                pl.read_csv(f, infer_schema=False, columns=[column])
                for f in (data_root / "landing").glob(f"*/{table}.csv")
            ]
        ).get_column(column)
        for table, column in (("patients", "mrn"), ("encounters", "encounter_id"))
    }
    encounters_delivered = {
        b: pl.read_csv(data_root / "landing" / b / "encounters.csv", infer_schema=False).height
        for b in batches
    }

    workers = LocalWorkers(tmp_path, workers=N_WORKERS)
    with dg.DagsterInstance.get() as instance:
        pools: set[str] = {
            getattr(n.definition, "pool", None) or "" for n in celery_ingestion_job().graph.nodes
        }
        pools.discard("")
        assert {"landing_ledger", "pseudonym_vault"} <= pools
        for (
            pool
        ) in pools:  # set once before runs start (dagster-io/dagster#33552, see test_postgres_instance)
            instance.event_log_storage.set_concurrency_slots(pool, 1)
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
        try:
            names = [f"w{i}" for i in range(1, N_WORKERS + 1)]
            for name in names:
                workers.start(name)
            _wait(workers.ready, 120, "the workers did not start")
            # each step process has its share of the cores as polars threads (deploy/celery/README.md)
            share = os.environ.get("POLARS_MAX_THREADS") or str(
                polars_threads(os.cpu_count() or 1, N_WORKERS)
            )
            for name in names:
                for pid in workers.children(name):
                    assert psutil.Process(pid).environ()["POLARS_MAX_THREADS"] == share

            with ProcessPoolExecutor(
                N_RUN_PROCESSES, mp_context=multiprocessing.get_context("spawn")
            ) as runner:
                futures = [runner.submit(_quiet_run, b) for b in batches]
                killed_pid, killed_run, killed_step = _kill_a_worker_mid_step(instance, workers, "w1")
                outcomes = [f.result(timeout=900) for f in futures]
            # The killed step's task went back on the queue and ran again; a run that failed instead (cleanly:
            # it ended, it did not hang) is rerun, and must then succeed.
            failed = [b for b, _, ok in outcomes if not ok]
            assert len(failed) <= 1, f"{len(failed)} runs failed, only one step was killed"
            reruns = [_quiet_run(b) for b in failed]
            assert all(ok for _, _, ok in reruns), "the rerun of the killed batch failed"
            run_ids = [r for _, r, _ in outcomes + reruns]

            # Every step ran in one of the workers' processes, none in a process that orchestrated a run or in
            # this one; both workers ran steps; the killed step started again in another process.
            worker_pids = workers.all_pids()
            log = _step_log(instance, run_ids)
            starts = [(pid, run, step) for _, pid, kind, run, step in log if kind == "STEP_START"]
            assert len(starts) >= 12 * N_BATCHES
            orchestrators = {
                e.dagster_event.pid
                for r in run_ids
                for e in instance.all_logs(r, of_type=dg.DagsterEventType.RUN_START)
                if e.dagster_event is not None
            }
            assert orchestrators and os.getpid() not in worker_pids
            assert {pid for pid, _, _ in starts} <= worker_pids - orchestrators - {os.getpid()}
            hosts = {
                str(e.dagster_event.engine_event_data.metadata["Celery worker"].value).split("@")[0]
                for r in run_ids
                for e in instance.all_logs(r, of_type=dg.DagsterEventType.ENGINE_EVENT)
                if e.dagster_event is not None
                and "Celery worker" in e.dagster_event.engine_event_data.metadata
            }
            assert hosts == set(names)
            again = [pid for pid, run, step in starts if step == killed_step and pid != killed_pid]
            assert killed_run in {r for _, r, _ in outcomes} and again, "the killed step never ran again"

            # Each single-writer step ran alone across the concurrent runs.
            succeeded = [r for _, r, ok in outcomes + reruns if ok]
            for step in ("landing_ledger", "anonymized_cohort"):
                windows = _step_windows(instance, succeeded, step)
                assert all(b[0] >= a[1] for a, b in itertools.pairwise(windows)), (
                    f"two {step} steps overlapped"
                )

            # Every batch asset is materialized for every batch.
            from deploy.celery.definitions import defs

            keys = list(celery_ingestion_job().asset_layer.executable_asset_keys)
            batch_keys = [k for k in keys if defs.resolve_assets_def(k).partitions_def is not None]
            assert len(batch_keys) >= 12
            for key in batch_keys:
                assert instance.get_materialized_partitions(key) == set(batches), key.to_user_string()

            # Nothing lost, nothing duplicated: one ledger entry per delivered file, every delivered row counted;
            # one de-identified file of each table per batch.
            with duckdb.connect(str(data_root / "archive" / "ledger.duckdb"), read_only=True) as con:
                ledger = con.sql("SELECT batch_id, sha256, rows_in FROM ledger").pl()
            assert ledger.get_column("batch_id").n_unique() == N_BATCHES
            assert ledger.height == ledger.select("batch_id", "sha256").n_unique()
            assert dict(zip(ledger["sha256"], ledger["rows_in"], strict=True)) == delivered
            deid = data_root / "deid"
            for table in ("patients", "encounters", "events"):
                assert sorted(p.stem for p in (deid / table).glob("*.parquet")) == sorted(batches), table
            # Each batch's admissions are released or held back (too few to release yet), none lost, none
            # twice; a batch's part also holds the admissions of earlier batches it released from their hold.
            for b in batches:
                accounting = json.loads((deid / "accounting" / f"{b}.json").read_text())
                released = accounting["admissions_released"]
                assert released + accounting["admissions_withheld"] == encounters_delivered[b], b
                later = sum(accounting["released_from"].values())
                assert pl.read_parquet(deid / "encounters" / f"{b}.parquet").height == released + later, b
            encounters = pl.read_parquet(deid / "encounters" / "*.parquet")
            assert encounters.height == encounters.get_column("hadm_id").n_unique()
            # The pseudonym vault (one writer at a time) holds every delivered patient and admission exactly
            # once, each with its own pseudonym: two writers at once would have lost one side's new entries.
            for table, column, pseudonym in (
                ("patients", "mrn", "subject_id"),
                ("encounters", "encounter_id", "hadm_id"),
            ):
                vault = pl.read_parquet(data_root / "phi" / "vault" / f"{table}.parquet")
                delivered_ids = landing_ids[table].unique()
                assert (
                    vault.height
                    == vault.get_column(column).n_unique()
                    == vault.get_column(pseudonym).n_unique()
                )
                missing = delivered_ids.is_in(vault.get_column(column).implode()).not_().sum()
                assert missing == 0 and vault.height == delivered_ids.len(), (
                    f"vault {table}: {missing} of {delivered_ids.len()} delivered missing, {vault.height} held"
                )

            # A rerun of the killed batch completes and leaves the same outputs.
            killed_batch = next(b for b, r, _ in outcomes if r == killed_run)
            before = deid_digests(data_root, f"*/{killed_batch}.*")
            assert before
            _, _, ok = _quiet_run(killed_batch)
            assert ok
            assert deid_digests(data_root, f"*/{killed_batch}.*") == before
        finally:
            workers.stop()
