"""The repository's event log (``PooledSqliteEventLogStorage``, kept-open connections) against Dagster's stock
``SqliteEventLogStorage`` (one engine and connection per statement), the same runs on the same machine.

Both instances are the repository's ``dagster.yaml`` in a fresh home: as it is, and with its
``event_log_storage`` block removed, which is the documented fallback (Dagster's default: the stock storage over
the same files). Each repetition runs both, in alternating order, so a busy machine hurts neither side more.

* **event log only**: a chain of ``N_ASSETS`` dynamic-partitioned assets that compute nothing, over ``batches``
  batches in ranged runs of 30 (the per-batch assets' ``BackfillPolicy``) and then one run per batch for the
  last ``SINGLE_RUNS`` batches (what the landing sensor launches): what the instance costs per batch and asset;
* **phase 1 of the product**: the real per-batch assets (ingestion, anonymization) of
  :mod:`benchmarks.bench_graph` over the scale's landing batches (the first 30 at the default scale) in the
  ranged runs their ``BackfillPolicy`` plans.

``.venv/bin/python -m benchmarks.bench_instance_storage --scale small --repetitions 5`` prints the medians.
"""

import argparse
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import yaml

from benchmarks.bench_graph import QUIET, RANGE_TAGS, _landing, _zones_root, phased_definitions, plan_runs
from benchmarks.hospital import batch_ids
from clinical_ml.instance_storage import instance_yaml_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STORAGES = ("stock", "pooled")
N_ASSETS = 8
PER_RUN = 30
BATCHES = {"small": 60, "default": 180}
SINGLE_RUNS = {"small": 10, "default": 30}
# Phase 1 on the first batches only at the default scale: one ranged run of 30, as measured when the storage
# was introduced (the whole graph's phase 1 is bench_graph's).
PHASE1_BATCHES = {"small": None, "default": 30}

DAYS = "bench_days"
days = dg.DynamicPartitionsDefinition(name=DAYS)


# a repetition takes some 150 s at the default scale; one moved 0.77x -> 0.82x between two full runs
MIN_REPETITIONS = {"default": 3}


def _chain(n: int) -> list[dg.AssetsDefinition]:
    """``n`` per-batch assets, each on the previous one, each logging a line and adding metadata per run."""
    chain: list[dg.AssetsDefinition] = []
    for i in range(n):

        @dg.asset(
            name=f"step_{i}",
            partitions_def=days,
            deps=chain[-1:],
            backfill_policy=dg.BackfillPolicy.multi_run(PER_RUN),
        )
        def step(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
            keys = context.partition_keys
            context.log.info(f"{len(keys)} batches")
            return dg.MaterializeResult(metadata={"batches": len(keys), "dagster/row_count": len(keys)})

        chain.append(step)
    return chain


def instance_yaml(storage: str, home: Path) -> str:
    """The repository's ``dagster.yaml`` for ``home``: ``pooled`` as it is, ``stock`` with its event log block
    removed (the fallback docs/instance-storage.md gives)."""
    template = (PROJECT_ROOT / "dagster.yaml").read_text()
    if storage == "pooled":
        return instance_yaml_for(template, str(home))
    config = yaml.safe_load(template)
    config.pop("event_log_storage")
    return yaml.safe_dump(config, sort_keys=False)


def _timed(storage: str, home: Path, work: Callable[[dg.DagsterInstance], None]) -> tuple[float, float]:
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(instance_yaml(storage, home))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        t, c = time.perf_counter(), time.process_time()
        work(instance)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
    shutil.rmtree(home, ignore_errors=True)
    return wall, cpu


def _event_log_only(n_batches: int, n_single: int) -> Callable[[dg.DagsterInstance], None]:
    job = dg.Definitions(
        assets=_chain(N_ASSETS), jobs=[dg.define_asset_job("chain", selection="*")]
    ).resolve_job_def("chain")
    keys = [f"b{i:04d}" for i in range(n_batches)]

    def work(instance: dg.DagsterInstance) -> None:
        instance.add_dynamic_partitions(DAYS, keys)
        for i in range(0, n_batches - n_single, PER_RUN):
            rng = keys[i : min(i + PER_RUN, n_batches - n_single)]
            tags = dict(zip(RANGE_TAGS, (rng[0], rng[-1]), strict=True))
            assert job.execute_in_process(instance=instance, tags=tags, run_config=QUIET).success
        for k in keys[n_batches - n_single :]:
            assert job.execute_in_process(instance=instance, partition_key=k, run_config=QUIET).success

    return work


def _phase1(workdir: Path, landing: Path, batches: list[str]) -> Callable[[dg.DagsterInstance], None]:
    def work(instance: dg.DagsterInstance) -> None:
        from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

        root = _zones_root(workdir / "zones", landing, batches)
        defs, _ = phased_definitions(root)
        job = defs.resolve_job_def("bench_per_batch")
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
        for rng in plan_runs(job, batches)[0]:
            tags = dict(zip(RANGE_TAGS, (rng[0], rng[-1]), strict=True)) if len(rng) > 1 else None
            pk = rng[0] if len(rng) == 1 else None
            res = job.execute_in_process(instance=instance, partition_key=pk, tags=tags, run_config=QUIET)
            assert res.success, f"phase 1 failed for {rng}"
        shutil.rmtree(root, ignore_errors=True)

    return work


def _compare(name: str, workdir: Path, work: Callable[[dg.DagsterInstance], None], repetitions: int) -> dict:
    t: dict[str, list[float]] = {s: [] for s in STORAGES}
    cpu: dict[str, list[float]] = {s: [] for s in STORAGES}
    for rep in range(repetitions):
        for storage in STORAGES if rep % 2 == 0 else STORAGES[::-1]:
            wall, c = _timed(storage, workdir / f"home_{storage}", work)
            t[storage].append(wall)
            cpu[storage].append(c)
            print(
                f"  {name} [{rep + 1}/{repetitions}] {storage}: {wall:.2f} s wall, {c:.2f} s CPU", flush=True
            )
    return {
        "name": name,
        "ours": "PooledSqliteEventLogStorage (dagster.yaml)",
        "ours_s": t["pooled"],
        "ours_cpu_s": cpu["pooled"],
        "baseline": "Dagster's stock SqliteEventLogStorage (event_log_storage block removed)",
        "baseline_s": t["stock"],
        "baseline_cpu_s": cpu["stock"],
        "goal": "<= 0.8x baseline (else go back to the stock storage)",
        "goal_ratio": 0.8,
    }


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    n, single = BATCHES[scale], SINGLE_RUNS[scale]
    rows = [
        _compare(
            f"event log only: {N_ASSETS} per-batch assets that compute nothing, {n} batches "
            f"({n - single} in ranged runs of {PER_RUN}, {single} one run each)",
            workdir,
            _event_log_only(n, single),
            repetitions,
        )
    ]
    landing = _landing(workdir, scale)
    batches = batch_ids(landing)[: PHASE1_BATCHES[scale]]
    rows.append(
        _compare(
            f"graph phase 1 (ingestion, anonymization) of {len(batches)} {scale}-scale batches, ranged runs",
            workdir,
            _phase1(workdir, landing, batches),
            repetitions,
        )
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["small", "default"], default="small")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--workdir", default=str(PROJECT_ROOT / "benchmarks" / ".work" / "instance_storage"))
    args = p.parse_args()
    for row in run(Path(args.workdir), scale=args.scale, repetitions=args.repetitions):
        stock, pooled = statistics.median(row["baseline_s"]), statistics.median(row["ours_s"])
        stock_cpu, pooled_cpu = statistics.median(row["baseline_cpu_s"]), statistics.median(row["ours_cpu_s"])
        print(
            f"{row['name']}\n  median wall: stock {stock:.2f} s, pooled {pooled:.2f} s, "
            f"pooled/stock {pooled / stock:.2f} (CPU: {stock_cpu:.2f} s, {pooled_cpu:.2f} s, "
            f"{pooled_cpu / stock_cpu:.2f}); {len(row['ours_s'])} repetitions each"
        )


if __name__ == "__main__":
    main()
