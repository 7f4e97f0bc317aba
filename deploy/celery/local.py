"""Celery workers of deploy/celery/worker.py started as local processes, and partition runs of the Celery code
location orchestrated in the calling process: what clinical_ml_tests/e2e/test_celery.py and
benchmarks/bench_celery.py use. A deployment starts its workers with the `celery` command instead (README.md).

Every worker inherits the caller's environment: ``DAGSTER_HOME`` (with deploy/celery/dagster.yaml),
``DAGSTER_PG_*``, ``CLINICAL_ML_DATA_ROOT``, ``CLINICAL_ML_USECASES`` and the broker variables.
"""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import IO

import dagster as dg
import psutil

from deploy.celery.settings import READY_DIR_ENV

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def celery_ingestion_job() -> dg.JobDefinition:
    """batch_ingestion_job of the Celery code location, built from the environment in every process."""
    from deploy.celery.definitions import defs

    return defs.resolve_job_def("batch_ingestion_job")


def run_partition(batch_id: str, run_config: dict | None = None) -> tuple[str, str, bool]:
    """One partition run of batch_ingestion_job orchestrated in this process, its steps run by the workers:
    (batch id, run id, success)."""
    from celery.exceptions import DuplicateTaskNameWarning

    # dagster-celery re-creates its one task on every submission: harmless, and said once per step
    warnings.filterwarnings("ignore", category=DuplicateTaskNameWarning)
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(
            dg.reconstructable(celery_ingestion_job),
            instance,
            run_config=run_config or {},
            tags={"dagster/partition": batch_id},
            raise_on_error=False,
        )
        return batch_id, result.run_id, result.success


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(folder: Path) -> tuple[subprocess.Popen, str] | None:
    """A redis-server of our own on 127.0.0.1 (free port, no persistence, files in ``folder``) and its URL, or
    None when redis-server is not on PATH. The caller terminates the process."""
    server = shutil.which("redis-server")
    if server is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.terminate()
            raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{port}")
        time.sleep(0.1)
    return proc, url


def deid_digests(data_root: Path, pattern: str = "*/*") -> dict[str, str]:
    """What the de-identified files matching ``pattern`` under ``<data root>/deid`` hold, by path: a table's rows
    in any order (the same run can write a Parquet table's rows in another order), any other file's bytes."""
    import polars as pl

    deid = data_root / "deid"
    out = {}
    for path in sorted(p for p in deid.glob(pattern) if p.is_file()):
        if path.suffix == ".parquet":
            frame = pl.read_parquet(path)
            rows = frame.sort(frame.columns).hash_rows().to_list() if frame.height else []
            blob = repr((frame.schema, rows)).encode()
        else:
            blob = path.read_bytes()
        out[str(path.relative_to(deid))] = hashlib.sha256(blob).hexdigest()
    return out


def polars_threads(cores: int, processes: int) -> int:
    """Polars threads for each of ``processes`` step-running processes sharing ``cores``: their share, at
    least one. Each polars pool starts a thread per core, and with several pools the threads waiting for work
    spin on the cores the other processes need (deploy/celery/README.md, "Threads")."""
    return max(1, cores // max(1, processes))


class LocalWorkers:
    """Worker processes on this machine, each a `celery worker` with ``concurrency`` pool processes, in their own
    process groups (stopped with SIGTERM, then SIGKILL), logs in ``log_dir``. ``workers``: how many will be
    started here; each pool process gets its share of the cores as polars threads (:func:`polars_threads`),
    unless ``POLARS_MAX_THREADS`` is set already."""

    def __init__(self, log_dir: Path, concurrency: int = 1, *, workers: int = 1) -> None:
        self.log_dir = log_dir
        self.concurrency = concurrency
        self.threads = os.environ.get("POLARS_MAX_THREADS") or str(
            polars_threads(os.cpu_count() or 1, workers * concurrency)
        )
        self.ready_dir = log_dir / "ready"
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen_pids: set[int] = set()
        self._logs: list[IO[str]] = []

    def start(self, name: str) -> None:
        log = (self.log_dir / f"{name}.log").open("w")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(
            [
                str(BIN / "celery"),
                *("-A", "deploy.celery.worker", "worker", "-Q", "dagster"),
                *("--concurrency", str(self.concurrency), "-n", f"{name}@%h", "-l", "WARNING"),
                *("--without-gossip", "--without-mingle"),
            ],
            cwd=PROJECT_ROOT,
            env={
                **os.environ,
                "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                "PYTHONPATH": str(PROJECT_ROOT),
                "POLARS_MAX_THREADS": self.threads,
                READY_DIR_ENV: str(self.ready_dir),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def children(self, name: str) -> list[int]:
        """The pool processes (which run the steps) of worker ``name`` now; remembered in ``seen_pids``."""
        try:
            pids = [p.pid for p in psutil.Process(self.procs[name].pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(pids)
        return pids

    def ready(self) -> bool:
        """Every worker has its pool processes, each with the code location loaded (deploy/celery/worker.py)."""
        for name in self.procs:
            children = self.children(name)
            if len(children) < self.concurrency:
                return False
            if not all((self.ready_dir / str(pid)).exists() for pid in children):
                return False
        return True

    def all_pids(self) -> set[int]:
        """Every process of every worker seen so far, main processes included."""
        for name in self.procs:
            self.children(name)
        return self.seen_pids | {p.pid for p in self.procs.values()}

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        for log in self._logs:
            log.close()
        self._logs.clear()
