"""Full graph vs the same computation with no orchestrator, and the cost of one new daily batch.

The assets split into three phases, read off the asset graph (so new assets join the right phase by
themselves): per-batch assets upstream of everything else (ingestion, anonymization), the unpartitioned assets
(MEDS layer, features, training, evaluation, reports), and per-batch assets that depend on those (scoring and
monitoring of a batch with the champion). Every repetition starts from empty zones on the same landing batches
(symlinked, read-only):

* full build, graph: the runs a backfill of every batch but the newest launches, read off each phase job's
  `BackfillPolicy` (`plan_runs`): phase 1 in ranged runs of up to `max_partitions_per_run` batches (tags
  `dagster/asset_partition_range_start/end`, as the backfill daemon sets them), phase 2 once, phase 3 one run
  per batch since its assets take one batch per run: on an evenly spaced sample of `MAX_SINGLE_BATCH_RUNS`
  batches, the whole phase extrapolated from it (reported apart, never mixed into the measured ratio). In
  process, on a fresh SQLite-backed instance with the repository's `dagster.yaml`, as `make demo` runs;
* full build, bare: the same functions over the same batches and ranges with no Dagster run
  (`benchmarks/bare_pipeline.py`);
* incremental, graph: the newest batch lands; its partition is added and phases 1, 2 and 3 run for that one
  batch (one run each, as the landing sensor starts them), measured as a share of the full build it follows.
"""

import os
import resource
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


RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")
# Per-batch phases whose assets take one batch per run (no ranged backfill policy: the scoring and monitoring
# assets) run on an evenly spaced sample of this many batches; the full build's cost of that phase is
# extrapolated from it and said so.
MAX_SINGLE_BATCH_RUNS = 10
# The same update without Dagster is reported beside the incremental row at the small scale only: at the
# default scale it is another whole lifecycle (minutes) and not part of any ratio.
BARE_INCREMENTAL = {"small": True, "default": False}


def _sample(batches: list[str], n: int) -> list[str]:
    if len(batches) <= n:
        return list(batches)
    return sorted({batches[round(i * (len(batches) - 1) / (n - 1))] for i in range(n)})


def plan_runs(job: dg.JobDefinition, batches: list[str]) -> tuple[list[list[str]], int]:
    """The runs a backfill of ``batches`` launches for ``job`` (its assets' BackfillPolicy: ranges of up to
    max_partitions_per_run batches, or one run per batch), and how many batches they stand for (a phase of
    one-batch runs is sampled, see MAX_SINGLE_BATCH_RUNS)."""
    per_run = job.backfill_policy.max_partitions_per_run
    if per_run is None:
        return [list(batches)], len(batches)
    if per_run > 1:
        return [batches[i : i + per_run] for i in range(0, len(batches), per_run)], len(batches)
    return [[b] for b in _sample(batches, MAX_SINGLE_BATCH_RUNS)], len(batches)


class _Graph:
    """Runs phases as Dagster runs on one instance."""

    def __init__(self, defs: dg.Definitions, phases: dict, instance: dg.DagsterInstance) -> None:
        self.defs, self.phases, self.instance = defs, phases, instance
        self.materializations, self.runs = 0, 0

    def add_batches(self, batches: list[str]) -> None:
        from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

        self.instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)

    def phase(self, name: str, keys: list[str] | None) -> None:
        """One run of the phase's job: unpartitioned, one batch, or a range of batches (as a backfill)."""
        tags = dict(zip(RANGE_TAGS, (keys[0], keys[-1]), strict=True)) if keys and len(keys) > 1 else None
        res = self.defs.resolve_job_def(f"bench_{name}").execute_in_process(
            instance=self.instance,
            partition_key=keys[0] if keys and len(keys) == 1 else None,
            tags=tags,
            run_config=QUIET,
            raise_on_error=False,
        )
        self.runs += 1
        if not res.success:
            failed = [e.step_key for e in res.all_events if e.is_step_failure]
            raise RuntimeError(f"phase {name} failed (steps {failed}) for partitions {keys}")
        self.materializations += len(res.get_asset_materialization_events())


class _Bare:
    """Runs the same phases as plain function calls."""

    def __init__(self, defs: dg.Definitions, phases: dict) -> None:
        self.defs, self.phases, self.materializations, self.runs = defs, phases, 0, 0

    def add_batches(self, batches: list[str]) -> None:
        pass

    def phase(self, name: str, keys: list[str] | None) -> None:
        job = self.defs.resolve_job_def(f"bench_{name}")
        self.materializations += bare_pipeline.run_job(job, self.defs.resources or {}, partition_keys=keys)
        self.runs += 1


Plan = dict[str, list[list[str] | None]]


def build_plan(defs: dg.Definitions, phases: dict, batches: list[str]) -> tuple[Plan, dict[str, int]]:
    """Runs per phase for ``batches``, and how many batches each phase's runs stand for."""
    plan: Plan = {}
    covers: dict[str, int] = {}
    for name in PHASES:
        if not phases[name]:
            plan[name], covers[name] = [], 0
        elif name == "whole":
            plan[name], covers[name] = [None], len(batches)
        else:
            runs, covers[name] = plan_runs(defs.resolve_job_def(f"bench_{name}"), batches)
            plan[name] = list(runs)
    return plan, covers


PEAK_RSS_AFTER: dict[str, float] = {}  # "<runner> <phase>" -> this process's peak RSS (MB) once it ended


def _build(runner, batches: list[str], plan: Plan, times: dict, cpu: dict) -> None:
    """Every phase's runs, timing each phase (wall and CPU) and noting the process's peak RSS after it (the
    peak only grows: the first phase after which it jumps is the one that needed the memory)."""
    runner.add_batches(batches)
    for name in PHASES:
        t, c = time.perf_counter(), time.process_time()
        for i, keys in enumerate(plan[name]):
            runner.phase(name, keys)
            if len(plan[name]) > 3:
                print(
                    f"    {name}: run {i + 1}/{len(plan[name])} ({len(keys or [])} batches), "
                    f"{time.perf_counter() - t:.0f} s",
                    flush=True,
                )
        times[name].append(time.perf_counter() - t)
        cpu[name].append(time.process_time() - c)
        label = f"{type(runner).__name__.strip('_').lower()} {name} ({len(batches)} batches)"
        PEAK_RSS_AFTER[label] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(workdir: Path, *, scale: str, repetitions: int) -> list[dict]:
    landing = _landing(workdir, scale)
    batches = batch_ids(landing)
    history, newest = batches[:-1], batches[-1]
    keys = [*(f"g_{p}" for p in PHASES), *(f"b_{p}" for p in PHASES), "g_inc", "b_inc"]
    t: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    extra: dict[str, object] = {}
    g_inc_by_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    for rep in range(repetitions):
        print(f"  repetition {rep + 1}/{repetitions}: graph", flush=True)
        root = _zones_root(workdir / "graph", landing, history)
        home = workdir / "graph_instance"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")  # the instance `make demo` uses
        with dg.DagsterInstance.local_temp(str(home)) as instance:
            defs, phases = phased_definitions(root)
            plan, covers = build_plan(defs, phases, history)
            graph = _Graph(defs, phases, instance)
            _build(graph, history, plan, {p: t[f"g_{p}"] for p in PHASES}, {p: cpu[f"g_{p}"] for p in PHASES})
            full_materializations, full_runs = graph.materializations, graph.runs
            _land(root, landing, newest)
            inc_plan, _ = build_plan(defs, phases, [newest])
            inc: dict[str, list[float]] = {p: [] for p in PHASES}
            incc: dict[str, list[float]] = {p: [] for p in PHASES}
            _build(graph, [newest], inc_plan, inc, incc)
            t["g_inc"].append(sum(v[0] for v in inc.values()))
            cpu["g_inc"].append(sum(v[0] for v in incc.values()))
            for p in PHASES:
                g_inc_by_phase[p] += inc[p]
            inc_materializations = graph.materializations - full_materializations
            inc_runs = graph.runs - full_runs
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

        print(f"  repetition {rep + 1}/{repetitions}: bare", flush=True)
        broot = _zones_root(workdir / "bare", landing, history)
        bdefs, bphases = phased_definitions(broot)
        bare = _Bare(bdefs, bphases)
        _build(bare, history, plan, {p: t[f"b_{p}"] for p in PHASES}, {p: cpu[f"b_{p}"] for p in PHASES})
        if BARE_INCREMENTAL[scale]:  # informational only; at the default scale it costs a whole lifecycle
            _land(broot, landing, newest)
            inc = {p: [] for p in PHASES}
            incc = {p: [] for p in PHASES}
            _build(bare, [newest], inc_plan, inc, incc)
            t["b_inc"].append(sum(v[0] for v in inc.values()))
            cpu["b_inc"].append(sum(v[0] for v in incc.values()))
        shutil.rmtree(broot, ignore_errors=True)
        if rep == 0:
            sampled = {
                p: len(plan[p])
                for p in PHASES
                if p != "whole" and plan[p] and covers[p] > sum(len(k or []) for k in plan[p])
            }
            extra = {
                "peak_rss_mb_after_phase": PEAK_RSS_AFTER,
                "batches_full_build": len(history),
                "assets_per_phase": {p: len(phases[p]) for p in PHASES},
                "runs_per_phase": {p: len(plan[p]) for p in PHASES},
                "batches_per_run": {p: max((len(k or []) for k in plan[p]), default=0) for p in PHASES},
                "sampled_phases": {p: f"{n} of {covers[p]} batches" for p, n in sampled.items()},
                "runs_full_build": full_runs,
                "runs_incremental": inc_runs,
                "asset_materializations_full_build": full_materializations,
                "asset_materializations_incremental": inc_materializations,
            }

    def total(prefix: str, d: dict[str, list[float]], scale: dict[str, float] | None = None) -> list[float]:
        f = scale or {}
        return [
            sum(x * f.get(p, 1.0) for p, x in zip(PHASES, xs, strict=True))
            for xs in zip(*(d[f"{prefix}_{p}"] for p in PHASES), strict=True)
        ]

    n = len(history)
    runs = extra.get("runs_per_phase", {})
    per_run = extra.get("batches_per_run", {})
    assert isinstance(runs, dict) and isinstance(per_run, dict)
    # a sampled phase scaled to every batch: what the full build would cost (extrapolated, not measured)
    to_all = {p: covers[p] / sum(len(k or []) for k in plan[p]) for p in PHASES if plan[p] and p != "whole"}

    def how(p: str) -> str:
        if runs.get(p, 0) and per_run.get(p, 1) > 1:
            return f"{runs[p]} ranged runs of up to {per_run[p]} batches (the assets' BackfillPolicy)"
        if runs.get(p, 0) < n:
            return f"one run per batch, sampled: {runs.get(p, 0)} of {n} batches"
        return f"one run per batch x {n}"

    labels = {
        "per_batch": f"per-batch assets upstream (ingestion, anonymization), {how('per_batch')}",
        "whole": "unpartitioned assets (MEDS, features, training, evaluation, reports), one run",
        "per_batch_after": f"per-batch assets downstream of the model (scoring, monitoring), {how('per_batch_after')}",
    }
    sampled_note = (
        f"; phase 3 on {runs.get('per_batch_after', 0)} sampled batches"
        if runs.get("per_batch_after", 0) < n
        else ""
    )
    rows = [
        {
            "name": f"full graph: {n} batches, every asset{sampled_note}",
            "ours": "Dagster graph (in process, SQLite instance)",
            "ours_s": total("g", t),
            "ours_cpu_s": total("g", cpu),
            "baseline": "same functions called directly, no Dagster run",
            "baseline_s": total("b", t),
            "baseline_cpu_s": total("b", cpu),
            "goal": "<= 1.25x baseline",
            "goal_ratio": 1.25,
            "extra": {
                **extra,
                "graph_full_build_extrapolated_s": total("g", t, to_all),
                "bare_full_build_extrapolated_s": total("b", t, to_all),
            },
        }
    ]
    for p in PHASES:
        if phases[p]:
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
    full_extrapolated = total("g", t, to_all)
    rows.append(
        {
            "name": "incremental: one new daily batch, every asset brought up to date",
            "ours": "graph: new partition + everything downstream",
            "ours_s": t["g_inc"],
            "ours_cpu_s": cpu["g_inc"],
            "baseline": f"graph: full build as measured{sampled_note}",
            "baseline_s": total("g", t),
            "baseline_cpu_s": total("g", cpu),
            "goal": "<= 5% of the full build",
            "goal_ratio": 0.05,
            "extra": {
                "direct_calls_incremental_s": t["b_inc"] or "not measured at this scale",
                "graph_incremental_by_phase_s": g_inc_by_phase,
                "share_of_extrapolated_full_build": [
                    i / f for i, f in zip(t["g_inc"], full_extrapolated, strict=True)
                ],
            },
        }
    )
    return rows
