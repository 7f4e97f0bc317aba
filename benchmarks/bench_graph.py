"""Full graph vs the same computation with no orchestrator, and the cost of one new daily batch.

The assets split into three phases, read off the asset graph (so new assets join the right phase by
themselves): per-batch assets upstream of everything else (ingestion, anonymization), the unpartitioned assets
(MEDS layer, features, training, evaluation, reports), and per-batch assets that depend on those (scoring and
monitoring of a batch with the champion). Every repetition starts from empty zones on the same landing batches
(symlinked, read-only):

* full build, graph: phase 1 for every batch but the newest (one run per batch, as the landing sensor
  starts them), phase 2 once, phase 3 for every batch; in process, on a fresh SQLite-backed instance with the
  repository's `dagster.yaml`, as `make demo` runs;
* full build, bare: the same functions in the same order with no Dagster run (`benchmarks/bare_pipeline.py`);
* incremental, graph: the newest batch lands; its partition is added and phases 1, 2 and 3 (for that batch)
  bring every asset up to date, measured as a share of the full build it follows.
"""

import os
import shutil
import time
from pathlib import Path

import dagster as dg

from benchmarks import bare_pipeline
from benchmarks.hospital import SCALES, batch_ids, write_hospital

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The synthetic hospital's use case; the others (e.g. eICU's) are written for their own data.
USECASE_FILE = PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml"
PSEUDONYM_SEED = 1
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
PHASES = ("per_batch", "whole", "per_batch_after")


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


def phased_definitions(root: Path) -> tuple[dg.Definitions, dict[str, set[dg.AssetKey]]]:
    """The code location (the synthetic hospital's use case only) plus one job per phase."""
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.resources.settings import AnonymizationSettings

    usecases = root.parent / f"{root.name}_usecases"
    usecases.mkdir(exist_ok=True)
    shutil.copy(USECASE_FILE, usecases / USECASE_FILE.name)
    defs = build_definitions(
        data_root=root,
        usecases_dir=usecases,
        anonymization=AnonymizationSettings(pseudonym_seed=PSEUDONYM_SEED),
    )
    graph = defs.resolve_asset_graph()
    keys = set(graph.materializable_asset_keys)
    partitioned = {k for k in keys if graph.get(k).is_partitioned}
    whole = keys - partitioned
    below = dg.AssetSelection.assets(*whole).downstream().resolve(graph) if whole else set()
    phases = {"per_batch": partitioned - below, "whole": whole, "per_batch_after": partitioned & below}
    jobs = [
        dg.define_asset_job(f"bench_{name}", selection=dg.AssetSelection.assets(*ks))
        for name, ks in phases.items()
        if ks
    ]
    return dg.Definitions.merge(defs, dg.Definitions(jobs=jobs)), phases


class _Graph:
    """Runs phases as Dagster runs on one instance."""

    def __init__(self, defs: dg.Definitions, phases: dict, instance: dg.DagsterInstance) -> None:
        self.defs, self.phases, self.instance, self.materializations = defs, phases, instance, 0

    def add_batches(self, batches: list[str]) -> None:
        from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

        self.instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)

    def phase(self, name: str, partition_key: str | None = None) -> None:
        if not self.phases[name]:
            return
        res = self.defs.resolve_job_def(f"bench_{name}").execute_in_process(
            instance=self.instance, partition_key=partition_key, run_config=QUIET, raise_on_error=False
        )
        if not res.success:
            failed = [e.step_key for e in res.all_events if e.is_step_failure]
            raise RuntimeError(f"phase {name} failed (steps {failed}) for partition {partition_key}")
        self.materializations += len(res.get_asset_materialization_events())


class _Bare:
    """Runs the same phases as plain function calls."""

    def __init__(self, defs: dg.Definitions, phases: dict) -> None:
        self.defs, self.phases, self.materializations = defs, phases, 0

    def add_batches(self, batches: list[str]) -> None:
        pass

    def phase(self, name: str, partition_key: str | None = None) -> None:
        if self.phases[name]:
            job = self.defs.resolve_job_def(f"bench_{name}")
            self.materializations += bare_pipeline.run_job(
                job, self.defs.resources, partition_key=partition_key
            )


def _build(runner, batches: list[str], times: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
    """Every phase for ``batches``, timing each phase (wall and CPU)."""
    runner.add_batches(batches)
    for name in PHASES:
        t, c = time.perf_counter(), time.process_time()
        for b in [None] if name == "whole" else batches:
            runner.phase(name, b)
            if name != "whole" and len(batches) > 20 and batches.index(b) % 25 == 0:
                done = batches.index(b) + 1
                print(
                    f"    {name}: {done}/{len(batches)} batches, {time.perf_counter() - t:.0f} s", flush=True
                )
        times[name].append(time.perf_counter() - t)
        cpu[name].append(time.process_time() - c)


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    landing = _landing(workdir, scale)
    batches = batch_ids(landing)
    history, newest = batches[:-1], batches[-1]
    keys = [*(f"g_{p}" for p in PHASES), *(f"b_{p}" for p in PHASES), "g_inc", "b_inc"]
    t: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    extra: dict[str, object] = {}
    for rep in range(repetitions):
        print(f"  repetition {rep + 1}/{repetitions}: graph", flush=True)
        root = _zones_root(workdir / "graph", landing, history)
        home = workdir / "graph_instance"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")  # the instance `make demo` uses
        with dg.DagsterInstance.local_temp(str(home)) as instance:
            defs, phases = phased_definitions(root)
            graph = _Graph(defs, phases, instance)
            g = {p: t[f"g_{p}"] for p in PHASES}
            gc = {p: cpu[f"g_{p}"] for p in PHASES}
            _build(graph, history, g, gc)
            full_materializations = graph.materializations
            _land(root, landing, newest)
            inc = {p: [] for p in PHASES}
            incc = {p: [] for p in PHASES}
            _build(graph, [newest], inc, incc)
            t["g_inc"].append(sum(v[0] for v in inc.values()))
            cpu["g_inc"].append(sum(v[0] for v in incc.values()))
            inc_materializations = graph.materializations - full_materializations
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

        print(f"  repetition {rep + 1}/{repetitions}: bare", flush=True)
        broot = _zones_root(workdir / "bare", landing, history)
        bdefs, bphases = phased_definitions(broot)
        bare = _Bare(bdefs, bphases)
        _build(bare, history, {p: t[f"b_{p}"] for p in PHASES}, {p: cpu[f"b_{p}"] for p in PHASES})
        _land(broot, landing, newest)
        inc = {p: [] for p in PHASES}
        incc = {p: [] for p in PHASES}
        _build(bare, [newest], inc, incc)
        t["b_inc"].append(sum(v[0] for v in inc.values()))
        cpu["b_inc"].append(sum(v[0] for v in incc.values()))
        shutil.rmtree(broot, ignore_errors=True)
        if rep == 0:
            extra = {
                "batches_full_build": len(history),
                "assets_per_phase": {p: len(phases[p]) for p in PHASES},
                "asset_materializations_full_build": full_materializations,
                "asset_materializations_incremental": inc_materializations,
            }

    def total(prefix: str, d: dict[str, list[float]]) -> list[float]:
        return [sum(x) for x in zip(*(d[f"{prefix}_{p}"] for p in PHASES), strict=True)]

    n = len(history)
    labels = {
        "per_batch": f"per-batch assets upstream (ingestion, anonymization), one run per batch x {n}",
        "whole": "unpartitioned assets (MEDS, features, training, evaluation, reports), one run",
        "per_batch_after": f"per-batch assets downstream of the model (scoring, monitoring) x {n}",
    }
    rows = [
        {
            "name": f"full graph: {n} batches, every asset",
            "ours": "Dagster graph (in process, SQLite instance)",
            "ours_s": total("g", t),
            "ours_cpu_s": total("g", cpu),
            "baseline": "same functions called directly, no Dagster run",
            "baseline_s": total("b", t),
            "baseline_cpu_s": total("b", cpu),
            "goal": "<= 1.25x baseline",
            "goal_ratio": 1.25,
            "extra": extra,
        }
    ]
    for p in PHASES:
        if extra.get("assets_per_phase", {}).get(p):
            rows.append(
                {
                    "name": f"graph phase: {labels[p]}",
                    "ours": "Dagster runs",
                    "ours_s": t[f"g_{p}"],
                    "ours_cpu_s": cpu[f"g_{p}"],
                    "baseline": "direct calls",
                    "baseline_s": t[f"b_{p}"],
                    "baseline_cpu_s": cpu[f"b_{p}"],
                    "goal": "<= 1.25x baseline",
                    "goal_ratio": 1.25,
                }
            )
    rows.append(
        {
            "name": "incremental: one new daily batch, every asset brought up to date",
            "ours": "graph: new partition + everything downstream",
            "ours_s": t["g_inc"],
            "ours_cpu_s": cpu["g_inc"],
            "baseline": "graph: full build",
            "baseline_s": total("g", t),
            "baseline_cpu_s": total("g", cpu),
            "goal": "<= 5% of the full build",
            "goal_ratio": 0.05,
            "extra": {"direct_calls_incremental_s": t["b_inc"]},
        }
    )
    return rows
