"""`make bench`: every stage beside its baseline, on one synthetic hospital, in one run.

    python -m benchmarks.bench [--scale small|default] [--repetitions N] [--only graph,drift] [--workdir DIR]

1. Writes the synthetic hospital of the scale once (in chunks of batches, `benchmarks/hospital.py`) and passes
   its landing folder to every module in ``CLINICAL_ML_BENCH_LANDING``.
2. Runs each `benchmarks/bench_<stage>.py` that exists, each in its own Python process (so a module's peak RSS
   is its own and a crash or a timeout costs only its rows), with a scratch folder of its own.
3. Writes `benchmarks/results/latest.{md,json}` (and `<scale>.{md,json}`): medians and ranges over the
   repetitions, the ratio to the baseline measured in the same run, the goal and whether it is met, peak RSS.
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
DEFAULT_REPETITIONS = {"small": 3, "default": 1}
MODULE_TIMEOUT_S = {"small": 1800, "default": 3600}
RSS_BUDGET_MB = 4096


def _peak_rss_mb() -> float:
    """Largest resident set of this process or any child it waited for, in MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def discover() -> list[str]:
    """Stage names of the `bench_<stage>.py` modules present, in name order, the whole graph last (it takes
    longest, so a run stopped early still has every stage's rows)."""
    stages = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
    return sorted(stages, key=lambda s: s == "graph")


def _load(stage: str):
    path = BENCH_DIR / f"bench_{stage}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks.bench_{stage}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def child(stage: str, workdir: Path, scale: str, repetitions: int, out: Path) -> int:
    """Run one module in this process and write its rows (or its error) to ``out``."""
    started = time.perf_counter()
    report: dict = {"stage": stage}
    try:
        if stage == "hospital":
            from benchmarks.hospital import SCALES, write_hospital

            report["hospital"] = write_hospital(workdir, SCALES[scale])
            report["rows"] = []
        else:
            module = _load(stage)
            # a module whose one repetition is short and whose ratio the machine's noise moves across its goal
            # asks for more (MIN_REPETITIONS per scale): its row is then the median of them
            reps = max(repetitions, getattr(module, "MIN_REPETITIONS", {}).get(scale, 1))
            rows = module.run(workdir, scale=scale, repetitions=reps)
            report["rows"] = [dict(r) for r in rows]
    except BaseException as exc:  # the parent records it; other modules still run
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-4000:]
    report["wall_s"] = time.perf_counter() - started
    report["peak_rss_mb"] = _peak_rss_mb()
    # a module that runs a peer tool (Evidently, NannyML) in a child process reports its own peak before the
    # peer ran: the budget is ours, the peer's memory is the peer's (kept beside it)
    ours = [
        r["extra"]["peak_rss_mb_ours"]
        for r in report.get("rows", [])
        if "peak_rss_mb_ours" in (r.get("extra") or {})
    ]
    if ours:
        report["peak_rss_mb"] = max(ours)
        # the peak each peer tool or baseline process reported for itself (VmHWM: a child's ru_maxrss on
        # Linux starts from its parent's peak at fork, so it cannot tell the two apart)
        others = [
            float(v)
            for r in report.get("rows", [])
            for k, v in (r.get("extra") or {}).items()
            if isinstance(v, int | float)
            and k not in ("peak_rss_mb_ours",)
            and (k.endswith("_peak_rss_mb") or k.startswith("peak_rss_mb_"))
        ]
        if others:
            report["peak_rss_mb_peer_processes"] = max(others)
    out.write_text(json.dumps(report, default=str, indent=1))
    return 0 if "error" not in report else 1


def _spawn(stage: str, workdir: Path, scale: str, repetitions: int, logs: Path, timeout: float) -> dict:
    out = logs / f"{stage}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench",
        "--child",
        stage,
        "--workdir",
        str(workdir),
        "--scale",
        scale,
        "--repetitions",
        str(repetitions),
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    with (logs / f"{stage}.log").open("w") as log:
        try:
            subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"stage": stage, "rows": [], "error": f"timed out after {timeout:.0f} s"}
    if not out.exists():
        return {
            "stage": stage,
            "rows": [],
            "error": f"the module's process ended without a report (see {logs / (stage + '.log')})",
            "wall_s": time.perf_counter() - started,
        }
    return json.loads(out.read_text())


def summarize(row: dict) -> dict:
    """Medians, ranges, the ratio to the baseline and whether the goal is met."""

    def stats(xs: list[float] | None) -> dict | None:
        if not xs:
            return None
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}

    ours, base = stats(row.get("ours_s")), stats(row.get("baseline_s"))
    ours_cpu, base_cpu = stats(row.get("ours_cpu_s")), stats(row.get("baseline_cpu_s"))
    ratio = ours["median"] / base["median"] if ours and base and base["median"] > 0 else None
    cpu_ratio = (
        ours_cpu["median"] / base_cpu["median"] if ours_cpu and base_cpu and base_cpu["median"] > 0 else None
    )
    goal_ratio = row.get("goal_ratio")
    met = None
    if ratio is not None and goal_ratio is not None:
        met = (1 / ratio >= goal_ratio) if row.get("higher_is_better") else (ratio <= goal_ratio)
    return {
        **row,
        "ours_stats": ours,
        "baseline_stats": base,
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "goal_met": met,
    }


def _fmt_s(st: dict | None) -> str:
    if not st:
        return "-"
    if st["n"] == 1:
        return f"{st['median']:.3g} s"
    return f"{st['median']:.3g} s [{st['min']:.3g}-{st['max']:.3g}]"


def _fmt_ratio(r: dict) -> str:
    if r["ratio"] is None:
        return "-"
    if r.get("higher_is_better"):
        return f"{1 / r['ratio']:.3g}x faster" if r["ratio"] > 0 else "-"
    return f"{r['ratio']:.3g}"


def _fmt_extra(extra: dict) -> str:
    parts = []
    for k, v in extra.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list) and all(isinstance(x, float) for x in v):
            v = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
        parts.append(f"{k}={v}")
    return "; ".join(parts)


def render_markdown(report: dict) -> str:
    h = report["hospital"]
    lines = [
        f"# Benchmarks: scale `{report['scale']}`",
        "",
        f"{report['finished_utc']} on {report['machine']}; git {report['git']}; "
        f"{report['repetitions']} repetition(s) per module, more where a module asks for them (its rows' "
        f"[min-max]); whole run {report['wall_s'] / 60:.1f} min.",
        "",
        *(
            [f"**Partial run**: still running or not reached: {', '.join(report['pending'])}.", ""]
            if not report.get("complete", True)
            else []
        ),
        f"Synthetic hospital: {h.get('admissions', '?'):,} admissions, {h.get('events', '?'):,} lab and vital "
        f"events, {len(h.get('batch_ids', []))} daily batches, {h.get('bytes', 0) / 2**20:,.0f} MiB of CSV "
        f"(written in {report['hospital_wall_s']:.0f} s, peak RSS {report['hospital_peak_rss_mb']:.0f} MB).",
        "",
        "Times are wall-clock medians [min-max] over the repetitions; `ratio` = ours / baseline (medians). "
        "`cpu ratio` is the same on process CPU time where a module reports it: this machine is shared, and "
        "CPU time is less disturbed by other work than wall time. Peak RSS is the module's whole process (a peer "
        "tool run in a process of its own, e.g. Evidently, is shown apart).",
        "",
        "| stage | measurement | ours | time | baseline | time | ratio | cpu ratio | goal | met | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for m in report["modules"]:
        rss = f"{m.get('peak_rss_mb', 0):,.0f} MB" if m.get("peak_rss_mb") else "-"
        if m.get("peak_rss_mb_peer_processes"):
            rss += f" (peer tool or baseline in its own process: {m['peak_rss_mb_peer_processes']:,.0f} MB)"
        if m.get("error"):
            lines.append(f"| {m['stage']} | **did not finish**: {m['error'][:160]} | | | | | | | | | {rss} |")
            continue
        for r in m["rows"]:
            met = {True: "yes", False: "**no**", None: "-"}[r["goal_met"]]
            cpu = f"{r['cpu_ratio']:.3g}" if r.get("cpu_ratio") is not None else "-"
            lines.append(
                f"| {m['stage']} | {r['name']} | {r.get('ours', '')} | {_fmt_s(r['ours_stats'])} | "
                f"{r.get('baseline', '-')} | {_fmt_s(r['baseline_stats'])} | {_fmt_ratio(r)} | {cpu} | "
                f"{r.get('goal', '-')} | {met} | {rss} |"
            )
            if r.get("extra"):
                notes.append(f"- {m['stage']}, {r['name']}: {_fmt_extra(r['extra'])}")
    peak = max((m.get("peak_rss_mb") or 0 for m in report["modules"]), default=0)
    peak = max(peak, report["hospital_peak_rss_mb"])
    lines += [
        "",
        f"Largest peak RSS of any stage: {peak:,.0f} MB (budget {RSS_BUDGET_MB:,} MB at the default scale: "
        f"{'within' if peak <= RSS_BUDGET_MB else '**over**'}).",
    ]
    if notes:
        lines += ["", "## Other figures", "", *notes]
    lines += ["", f"Rerun: `make bench SCALE={report['scale']}`. Raw figures: `{report['json_name']}`.", ""]
    return "\n".join(lines)


def _git() -> str:
    """The code version the results belong to (the same string the model registry records)."""
    from clinical_ml.core.storage import code_version

    return code_version()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--scale", choices=["small", "default"], default="default")
    p.add_argument("--repetitions", type=int, default=None, help="per module (default: 3 small, 1 default)")
    p.add_argument("--only", default="", help="comma-separated stages to run (default: every module)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: benchmarks/.work/<scale>)")
    p.add_argument("--results", default=str(RESULTS), help="where latest.md and latest.json go")
    p.add_argument("--render", help="only rewrite the Markdown next to this results JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    reps = args.repetitions or DEFAULT_REPETITIONS[args.scale]
    if args.child:
        return child(args.child, Path(args.workdir), args.scale, reps, Path(args.out))
    if args.render:
        report = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(render_markdown(report))
        return 0

    started = time.perf_counter()
    work = Path(args.workdir or BENCH_DIR / ".work" / args.scale).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    landing = work / "hospital" / "landing"
    print(f"bench: scale {args.scale}, {reps} repetition(s), scratch {work}", flush=True)
    hosp = _spawn("hospital", landing, args.scale, reps, logs, MODULE_TIMEOUT_S[args.scale])
    if hosp.get("error"):
        print(f"bench: the synthetic hospital could not be written: {hosp['error']}", file=sys.stderr)
        return 1
    print(
        f"bench: hospital ready, {hosp['hospital']['admissions']:,} admissions, "
        f"{hosp['hospital']['events']:,} events ({hosp['wall_s']:.0f} s)",
        flush=True,
    )
    os.environ["CLINICAL_ML_BENCH_LANDING"] = str(landing)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    stages = [s for s in discover() if not only or s in only]
    modules: list[dict] = []

    def write(done: bool) -> dict:
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        report = {
            "scale": args.scale,
            "repetitions": reps,
            "finished_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average at end {os.getloadavg()[0]:.1f}",
            "git": _git(),
            "wall_s": time.perf_counter() - started,
            "hospital": hosp["hospital"],
            "hospital_wall_s": hosp["wall_s"],
            "hospital_peak_rss_mb": hosp["peak_rss_mb"],
            "modules": modules,
            "complete": done,
            "pending": [s for s in stages if s not in {m["stage"] for m in modules}],
            "json_name": f"{args.scale}.json",
        }
        for name in (args.scale, "latest"):
            (results / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
            (results / f"{name}.md").write_text(render_markdown(report))
        return report

    for stage in stages:
        print(f"bench: {stage} ...", flush=True)
        scratch = work / stage
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        result = _spawn(stage, scratch, args.scale, reps, logs, MODULE_TIMEOUT_S[args.scale])
        result["rows"] = [summarize(r) for r in result.get("rows", [])]
        modules.append(result)
        status = f"error: {result['error']}" if result.get("error") else f"{len(result['rows'])} rows"
        print(f"bench: {stage} done in {result.get('wall_s', 0):.0f} s ({status})", flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
        write(done=False)  # a partial table survives a run stopped early

    report = write(done=True)
    print(render_markdown(report))
    return 0 if not any(m.get("error") for m in modules) else 1


if __name__ == "__main__":
    raise SystemExit(main())
