"""Throughput of the per-batch phase on Celery workers (deploy/celery): the same batches, one partition run of
`batch_ingestion_job` each, with one worker process and with two, side by side in one run (issue 21 item 3).

Each side gets a fresh data root (the scale's first ``BATCHES`` landing batches, linked), a fresh
``$DAGSTER_HOME``, its own workers (`celery -A deploy.celery.worker worker --concurrency 1`) and the same
``RUN_PROCESSES`` run processes orchestrating the runs; the wall time is from the first run submitted to the
last one done. Pseudonyms are HMAC under one key generated for this bench run, so both sides must write
the same rows in every de-identified table (else the row is an error).

The broker is a redis-server started here on loopback (``CLINICAL_ML_REDIS_URL`` if set). The instance is
deploy/celery/dagster.yaml when ``DAGSTER_PG_*`` are set (`source .ci/postgres.sh`), else the repository's
dagster.yaml (SQLite, one machine only); the row names which. Without redis-server the row says "not measured".

``.venv/bin/python -m benchmarks.bench_celery --scale small`` prints the row.
"""

import argparse
import multiprocessing
import os
import secrets
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg

from benchmarks.bench_graph import QUIET, _landing, _zones_root
from benchmarks.hospital import batch_ids
from clinical_ml.instance_storage import instance_yaml_for
from deploy.celery.local import (
    LocalWorkers,
    celery_ingestion_job,
    deid_digests,
    redis_answers,
    run_partition,
    start_redis,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BATCHES = {"small": 10, "default": 20}
RUN_PROCESSES = 3
SIDES = (1, 2)
GOAL_SPEEDUP = 1.6


# a repetition (both sides) takes some 90 s at the default scale; one moved 1.82x -> 1.38x between two full runs
MIN_REPETITIONS = {"default": 3}


def _quiet_run(batch_id: str) -> tuple[str, str, bool]:
    return run_partition(batch_id, QUIET)


_all_loaded = None


def _load_code_location(all_loaded) -> None:  # type: ignore[no-untyped-def]
    """A run process's start: the code location imported and the job built, as before the clock."""
    global _all_loaded
    _all_loaded = all_loaded
    celery_ingestion_job()


def _wait_for_every_run_process(_: int) -> None:
    assert _all_loaded is not None
    _all_loaded.wait(300)  # one call per run process: each returns only once all have loaded


def _side(
    workdir: Path, landing: Path, batches: list[str], n_workers: int, broker: str
) -> tuple[float, dict]:
    """Wall seconds for every batch's run with ``n_workers`` worker processes, and the outputs' hashes."""
    from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

    base = workdir / f"workers_{n_workers}"
    shutil.rmtree(base, ignore_errors=True)
    home = base / "dagster_home"
    home.mkdir(parents=True)
    on_postgres = bool(os.environ.get("DAGSTER_PG_HOST"))
    template = "deploy/celery/dagster.yaml" if on_postgres else "dagster.yaml"
    (home / "dagster.yaml").write_text(instance_yaml_for((PROJECT_ROOT / template).read_text(), str(home)))
    root = _zones_root(base / "zones", landing, batches)
    os.environ.update(
        DAGSTER_HOME=str(home),
        CLINICAL_ML_DATA_ROOT=str(root),
        CLINICAL_ML_CELERY_BROKER=f"{broker}/0",
        CLINICAL_ML_CELERY_BACKEND=f"{broker}/1",
    )
    import redis

    for db in (0, 1):
        redis.Redis.from_url(f"{broker}/{db}").flushdb()
    workers = LocalWorkers(base, workers=n_workers)
    try:
        with dg.DagsterInstance.get() as instance:
            pools = {getattr(n.definition, "pool", None) or "" for n in celery_ingestion_job().graph.nodes}
            for pool in pools - {""}:
                instance.event_log_storage.set_concurrency_slots(pool, 1)
            instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
        for i in range(n_workers):
            workers.start(f"w{i + 1}")
        deadline = time.monotonic() + 120
        while not workers.ready():
            if time.monotonic() > deadline:
                raise RuntimeError("the Celery workers did not start")
            time.sleep(0.2)
        spawn = multiprocessing.get_context("spawn")
        loaded = spawn.Barrier(RUN_PROCESSES)
        with ProcessPoolExecutor(
            RUN_PROCESSES, mp_context=spawn, initializer=_load_code_location, initargs=(loaded,)
        ) as runner:
            list(runner.map(_wait_for_every_run_process, range(RUN_PROCESSES)))
            started = time.perf_counter()
            outcomes = list(runner.map(_quiet_run, batches))
            wall = time.perf_counter() - started
    finally:
        workers.stop()
    failed = [b for b, _, ok in outcomes if not ok]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(batches)} runs failed with {n_workers} worker(s)")
    hashes = deid_digests(root, "*/*.parquet")
    shutil.rmtree(base, ignore_errors=True)
    return wall, hashes


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    landing = _landing(workdir, scale)
    batches = batch_ids(landing)[: BATCHES[scale]]
    instance = "PostgreSQL (deploy/celery/dagster.yaml)" if os.environ.get("DAGSTER_PG_HOST") else "SQLite"
    name = (
        f"per-batch phase on Celery workers: {len(batches)} {scale}-scale batches, one run each, "
        f"{RUN_PROCESSES} at once, {instance} instance, Redis broker"
    )
    url = os.environ.get("CLINICAL_ML_REDIS_URL")
    server = None
    if not (url and redis_answers(url)):
        started = start_redis(workdir)
        if started is None:
            return [{"name": name, "ours": "not measured (no redis-server: apt-get install redis-server)"}]
        server, url = started
    # one key for both sides, made for this run: HMAC pseudonyms make the outputs comparable row for row
    os.environ.update(CLINICAL_ML_PSEUDONYM_MODE="hmac", CLINICAL_ML_PSEUDONYM_KEY=secrets.token_hex(32))
    os.environ.setdefault("CLINICAL_ML_USECASES", str(PROJECT_ROOT / "usecases"))
    t: dict[int, list[float]] = {n: [] for n in SIDES}
    try:
        for rep in range(repetitions):
            hashes = {}
            for n in SIDES if rep % 2 == 0 else SIDES[::-1]:
                wall, hashes[n] = _side(workdir, landing, batches, n, url)
                t[n].append(wall)
                print(f"  {name} [{rep + 1}/{repetitions}] {n} worker(s): {wall:.2f} s wall", flush=True)
            if not hashes[1] or hashes[1] != hashes[2]:
                raise RuntimeError(
                    "one worker and two workers wrote different rows in the de-identified tables"
                )
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    return [
        {
            "name": name,
            "ours": "two worker processes",
            "ours_s": t[2],
            "baseline": "one worker process",
            "baseline_s": t[1],
            "goal": f">= {GOAL_SPEEDUP}x the throughput of one worker, same outputs",
            "goal_ratio": GOAL_SPEEDUP,
            "higher_is_better": True,
            "extra": {
                "same de-identified tables on both sides": True,  # checked above: else an error
                "batches per minute, 2 workers": round(60 * len(batches) / statistics.median(t[2]), 2),
            },
        }
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["small", "default"], default="small")
    p.add_argument("--repetitions", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "benchmarks" / ".work" / "celery")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    for row in run(args.workdir, scale=args.scale, repetitions=args.repetitions):
        print(row)


if __name__ == "__main__":
    main()
