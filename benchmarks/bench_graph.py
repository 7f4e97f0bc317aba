"""Full graph vs a bare script doing the same computation, and the cost of one new daily batch.

Every repetition starts from empty zones on the same landing batches (symlinked, read-only) and a fresh
SQLite-backed Dagster instance on disk, as `make demo` uses:

* full build, graph: one `batch_ingestion_job` run per batch (all batches but the newest), then `lifecycle_job`;
* full build, bare: `benchmarks/bare_pipeline.py`, the same core calls and files in the same order;
* incremental, graph: the newest batch lands; its partition is added and ingested, and every asset that is then
  stale is brought up to date, measured as a share of the full build it follows.
"""

import os
import shutil
import time
from pathlib import Path

import dagster as dg
import polars as pl

from benchmarks import bare_pipeline
from benchmarks.hospital import SCALES, batch_ids, write_hospital
from clinical_ml.core.storage import read_json

PROJECT_ROOT = Path(__file__).resolve().parents[1]
USECASES = PROJECT_ROOT / "usecases"
PSEUDONYM_SEED = 1
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def _landing(workdir: Path, scale: str) -> Path:
    shared = os.environ.get("CLINICAL_ML_BENCH_LANDING")
    if shared:
        return Path(shared)
    landing = workdir / "hospital" / "landing"
    write_hospital(landing, SCALES[scale])
    return landing


def _zones_root(base: Path, landing: Path, batches: list[str]) -> Path:
    if base.exists():
        shutil.rmtree(base)
    (base / "landing").mkdir(parents=True)
    for b in batches:
        _land(base, landing, b)
    return base


def _land(root: Path, landing: Path, batch_id: str) -> None:
    (root / "landing" / batch_id).symlink_to(landing / batch_id, target_is_directory=True)


def _defs(root: Path) -> dg.Definitions:
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.resources.settings import AnonymizationSettings

    return build_definitions(
        data_root=root,
        usecases_dir=USECASES,
        anonymization=AnonymizationSettings(pseudonym_seed=PSEUDONYM_SEED),
    )


def _ingest(defs: dg.Definitions, instance: dg.DagsterInstance, batches: list[str]) -> int:
    from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

    instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
    job = defs.resolve_job_def("batch_ingestion_job")
    n = 0
    for b in batches:
        res = job.execute_in_process(instance=instance, partition_key=b, run_config=QUIET)
        if not res.success:
            raise RuntimeError(f"batch_ingestion_job failed for a batch of the benchmark ({b})")
        n += len(res.get_asset_materialization_events())
    return n


def _lifecycle(defs: dg.Definitions, instance: dg.DagsterInstance) -> int:
    res = defs.resolve_job_def("lifecycle_job").execute_in_process(instance=instance, run_config=QUIET)
    if not res.success:
        raise RuntimeError("lifecycle_job failed in the benchmark")
    return len(res.get_asset_materialization_events())


def _outputs(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for d in sorted((root / "deid" / "usecases").iterdir()):
        out[f"{d.name}/features"] = pl.read_parquet(d / "features.parquet")
        out[f"{d.name}/auroc"] = read_json(d / "evaluation.json")["metrics"]["auroc"]["value"]
    return out


def _same(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, pl.DataFrame):
            if not isinstance(w, pl.DataFrame) or not v.equals(w):
                return False
        elif v != w:
            return False
    return True


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    landing = _landing(workdir, scale)
    batches = batch_ids(landing)
    history, newest = batches[:-1], batches[-1]
    t: dict[str, list[float]] = {k: [] for k in ("g_ing", "g_life", "g_inc", "b_ing", "b_life", "b_inc")}
    cpu: dict[str, list[float]] = {k: [] for k in t}
    extra: dict[str, object] = {}
    for rep in range(repetitions):
        # graph
        root = _zones_root(workdir / "graph", landing, history)
        home = workdir / "graph_instance"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")  # the instance `make demo` uses
        with dg.DagsterInstance.local_temp(str(home)) as instance:
            defs = _defs(root)
            t0, c0 = time.perf_counter(), time.process_time()
            n_ing = _ingest(defs, instance, history)
            t1, c1 = time.perf_counter(), time.process_time()
            n_life = _lifecycle(defs, instance)
            t2, c2 = time.perf_counter(), time.process_time()
            _land(root, landing, newest)
            n_new = _ingest(defs, instance, [newest])
            n_new += _lifecycle(defs, instance)
            t3, c3 = time.perf_counter(), time.process_time()
        shutil.rmtree(home, ignore_errors=True)
        t["g_ing"].append(t1 - t0)
        t["g_life"].append(t2 - t1)
        t["g_inc"].append(t3 - t2)
        cpu["g_ing"].append(c1 - c0)
        cpu["g_life"].append(c2 - c1)
        cpu["g_inc"].append(c3 - c2)
        graph_out = _outputs(root) if rep == 0 else None

        # bare script
        broot = _zones_root(workdir / "bare", landing, history)
        t0, c0 = time.perf_counter(), time.process_time()
        bare_pipeline.ingest_and_anonymize(broot, history, pseudonym_seed=PSEUDONYM_SEED)
        t1, c1 = time.perf_counter(), time.process_time()
        bare_pipeline.lifecycle(broot, USECASES, n_bootstrap=500)
        t2, c2 = time.perf_counter(), time.process_time()
        _land(broot, landing, newest)
        bare_pipeline.ingest_and_anonymize(broot, [newest], pseudonym_seed=PSEUDONYM_SEED)
        bare_pipeline.lifecycle(broot, USECASES, n_bootstrap=500)
        t3, c3 = time.perf_counter(), time.process_time()
        t["b_ing"].append(t1 - t0)
        t["b_life"].append(t2 - t1)
        t["b_inc"].append(t3 - t2)
        cpu["b_ing"].append(c1 - c0)
        cpu["b_life"].append(c2 - c1)
        cpu["b_inc"].append(c3 - c2)
        if graph_out is not None:
            extra = {
                "outputs_match_bare_script": _same(graph_out, _outputs(broot)),
                "batches_full_build": len(history),
                "asset_materializations_full_build": n_ing + n_life,
                "asset_materializations_incremental": n_new,
            }
        shutil.rmtree(broot, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    full_g = [a + b for a, b in zip(t["g_ing"], t["g_life"], strict=True)]
    full_b = [a + b for a, b in zip(t["b_ing"], t["b_life"], strict=True)]
    cpu_g = [a + b for a, b in zip(cpu["g_ing"], cpu["g_life"], strict=True)]
    cpu_b = [a + b for a, b in zip(cpu["b_ing"], cpu["b_life"], strict=True)]
    n = len(history)
    return [
        {
            "name": f"full graph: {n} batches ingested + lifecycle",
            "ours": "Dagster graph (in process, SQLite instance)",
            "ours_s": full_g,
            "ours_cpu_s": cpu_g,
            "baseline": "bare script, same core calls",
            "baseline_s": full_b,
            "baseline_cpu_s": cpu_b,
            "goal": "<= 1.25x bare script",
            "goal_ratio": 1.25,
            "extra": extra,
        },
        {
            "name": f"graph: batch_ingestion_job x {n} (ingest + anonymize)",
            "ours": "one Dagster run per batch",
            "ours_s": t["g_ing"],
            "ours_cpu_s": cpu["g_ing"],
            "baseline": "bare script",
            "baseline_s": t["b_ing"],
            "baseline_cpu_s": cpu["b_ing"],
            "goal": "<= 1.25x bare script",
            "goal_ratio": 1.25,
        },
        {
            "name": "graph: lifecycle_job (MEDS, features, training, evaluation, reports)",
            "ours": "one Dagster run",
            "ours_s": t["g_life"],
            "ours_cpu_s": cpu["g_life"],
            "baseline": "bare script",
            "baseline_s": t["b_life"],
            "baseline_cpu_s": cpu["b_life"],
            "goal": "<= 1.25x bare script",
            "goal_ratio": 1.25,
        },
        {
            "name": "incremental: one new daily batch, every asset brought up to date",
            "ours": "graph: new partition + stale assets",
            "ours_s": t["g_inc"],
            "ours_cpu_s": cpu["g_inc"],
            "baseline": "graph: full build",
            "baseline_s": full_g,
            "baseline_cpu_s": cpu_g,
            "goal": "<= 5% of the full build",
            "goal_ratio": 0.05,
            "extra": {"bare_script_incremental_s": t["b_inc"]},
        },
    ]
