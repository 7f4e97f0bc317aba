"""Command line: ``clinical-ml run`` (alias ``demo``) runs the lifecycle of any use case in the use-case folder
on the landing zone (a synthetic hospital when it is empty) or a real database and prints where the reports
are; ``clinical-ml usecase check FILE`` validates a use-case file and says how much data there is for its
question; ``clinical-ml synth`` writes a synthetic hospital into the landing zone; ``clinical-ml replay`` runs a
synthetic month day by day through the jobs the sensors start (see :mod:`clinical_ml.replay`)."""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from clinical_ml.core.landing import find_complete_batches
from clinical_ml.core.locations import monitoring_config_file, resolve_data_root, resolve_usecases_dir
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml.core.usecase import UseCase, UseCaseError, load_use_case, load_use_cases
from clinical_ml.serve.command import add_serve_parser, cmd_serve

if TYPE_CHECKING:  # dagster is imported by the commands that run jobs, so `clinical-ml synth` starts fast
    import dagster as dg
    import polars as pl

    from clinical_ml.core.artifacts import DeidStore
    from clinical_ml.core.feasibility import Feasibility

DATA_SOURCES = ("synthetic", "eicu", "mimic")


class CommandError(Exception):
    """Bad input to a command: printed as one line, exit status 2, no traceback."""


def _synth_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(
        n_patients=args.patients,
        n_batches=args.batches,
        n_sites=args.sites,
        seed=args.seed,
        scenario=args.scenario,
        start_date=date.fromisoformat(args.start_date),
        drift_from_batch=args.drift_from_batch,
        days_per_batch=args.days_per_batch,
        # every source a hospital may deliver: medications, diagnoses, procedures, minute-level device vitals
        more_sources=True,
        imaging=True,  # and DICOM headers from a PACS
    )


def cmd_synth(args: argparse.Namespace) -> int:
    landing = resolve_data_root(args.data_root) / "landing"
    hospital = generate_hospital(landing, _synth_config(args))
    print(f"wrote {len(hospital.batch_ids)} batches to {landing} (scenario {args.scenario})")
    return 0


def _adapt_real_source(data: str, source: str | None, root: Path, *, seed: int) -> None:
    """Map an already de-identified database (eICU, MIMIC-III) straight into the de-identified layer.

    Surrogate ids are seeded so a demo run is reproducible: the source is public and already de-identified,
    so the surrogates serve uniformity (one id scheme downstream), not secrecy."""
    import importlib

    import numpy as np

    from clinical_ml.core.adapters.common import write_deid_layer

    module = importlib.import_module(f"clinical_ml.core.adapters.{data}")
    path = Path(source) if source else module.default_source()
    if not path.exists():
        path = module.committed_subset()
        print(f"{data}: full database not found, using the committed subset {path}")
    adapted = module.adapt(path, rng=np.random.default_rng(seed))
    write_deid_layer(adapted, data_root=root)
    print(f"{data}: {adapted.counts['encounters']} encounters mapped into {root / 'deid'}")


def _with_instance(run: Callable[["dg.DagsterInstance"], int]) -> int:
    """``run`` on the instance of ``$DAGSTER_HOME``; without it, on a throw-away instance whose files are
    removed on the way out."""
    import dagster as dg

    if os.environ.get("DAGSTER_HOME"):
        return run(dg.DagsterInstance.get())
    with tempfile.TemporaryDirectory(prefix="clinical_ml_dagster_") as tmp:
        return run(dg.DagsterInstance.ephemeral(tempdir=tmp))


def use_case_files(usecases_dir: Path) -> dict[str, Path]:
    """Every use case of the folder by name, with its file (validated: a bad file names itself and the field)."""
    if not usecases_dir.is_dir():
        raise CommandError(f"use case folder {usecases_dir} not found")
    load_use_cases(usecases_dir)  # unique names
    return {load_use_case(p).name: p for p in sorted(usecases_dir.glob("*.yaml"))}


def select_use_cases(use_cases: list[UseCase], *, names: list[str] | None, data: str) -> list[UseCase]:
    """The use cases named (in the order given), else those written for ``data`` (``datasets`` empty or
    naming it): a use case's codes and gates only make sense on the data it was written for."""
    by_name = {uc.name: uc for uc in use_cases}
    if names:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise CommandError(
                f"no use case named {', '.join(unknown)}; available: {', '.join(sorted(by_name)) or 'none'}"
            )
        return [by_name[n] for n in dict.fromkeys(names)]
    chosen = [uc for uc in use_cases if not uc.datasets or data in uc.datasets]
    if not chosen:
        raise CommandError(
            f"no use case is written for --data {data} (their `datasets` field); name one with --usecase "
            f"(available: {', '.join(sorted(by_name)) or 'none'})"
        )
    return chosen


def cmd_run(args: argparse.Namespace) -> int:
    return _with_instance(lambda instance: _demo(args, instance))


def cmd_approve(args: argparse.Namespace) -> int:
    """The panel's sign-off from a terminal (the same as the use case's panel sign-off job in the UI)."""
    from clinical_ml.core.approval import SignOffError, sign_off
    from clinical_ml.core.artifacts import DeidStore
    from clinical_ml.core.registry import Registry

    root = resolve_data_root(args.data_root)
    registry = Registry(root / "registry", args.usecase)
    store = DeidStore(root / "deid", root / "reports").use_case(args.usecase)
    try:
        decision = sign_off(
            registry,
            store,
            by=args.by,
            approve=args.approve,
            note=args.note,
            version=args.version,
            group_thresholds_for=args.group_thresholds,
        )
    except SignOffError as exc:
        raise CommandError(str(exc)) from exc
    print(f"{args.usecase}: model {decision.challenger} {decision.reasons[0]}")
    champion = registry.champion()
    print(f"champion: {champion or 'none yet'}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from clinical_ml.replay import replay

    root = resolve_data_root(args.data_root)
    if not find_complete_batches(root / "landing"):
        generate_hospital(root / "landing", _synth_config(args))

    def run(instance: "dg.DagsterInstance") -> int:
        replay(
            root,
            instance,
            warmup=args.warmup,
            usecases_dir=resolve_usecases_dir(args.usecases_dir),
            approve_first_model=args.approve_first_model,
        )
        return 0

    return _with_instance(run)


def _demo(args: argparse.Namespace, instance: "dg.DagsterInstance") -> int:
    from clinical_ml.core.artifacts import DeidStore
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
    from clinical_ml.resources.pseudonym_secret import anonymization_settings_from_env

    root = resolve_data_root(args.data_root)
    usecases_dir = resolve_usecases_dir(args.usecases_dir)
    files = use_case_files(usecases_dir)
    chosen = select_use_cases([load_use_case(f) for f in files.values()], names=args.usecase, data=args.data)
    for uc in chosen:
        if uc.datasets and args.data not in uc.datasets:
            print(f"{uc.name}: written for {', '.join(uc.datasets)}; run on {args.data} as asked")
    started = time.perf_counter()
    if args.data != "synthetic":
        # A real source gets its own data root (data/<source>) unless one is given: never mix sources.
        root = root if args.data_root else root / args.data
        _adapt_real_source(args.data, args.source, root, seed=args.seed)
    elif not find_complete_batches(root / "landing"):
        generate_hospital(root / "landing", _synth_config(args))
        print(f"synthetic hospital written to {root / 'landing'}")
    # The demo's hospital is synthetic (or a public de-identified database): its vault surrogates and date
    # shifts are seeded from --seed, so every fresh `make demo` gives the same cohorts, split, model and
    # numbers. A hospital's deployment leaves the seed unset (surrogates from OS entropy, see README).
    anonymization = anonymization_settings_from_env(pseudonym_seed=args.seed)
    defs = build_definitions(data_root=root, usecases_dir=usecases_dir, anonymization=anonymization)
    batches = find_complete_batches(root / "landing")
    drift_demo = args.scenario == "drift" and args.data == "synthetic"
    onset = _drift_onset(root, batches) if drift_demo else None
    if onset is not None:
        print(
            f"drift scenario: the model is derived on the {onset} batches before the injected drift "
            f"({batches[0].batch_id} to {batches[onset - 1].batch_id}); each later batch is then scored and "
            "checked as it lands"
        )
    known = set(instance.get_dynamic_partitions(BATCH_PARTITIONS_NAME))
    instance.add_dynamic_partitions(
        BATCH_PARTITIONS_NAME, [b.batch_id for b in batches if b.batch_id not in known]
    )
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    ingest = defs.resolve_job_def("batch_ingestion_job")
    for i, b in enumerate(batches[:onset], start=1):
        result = ingest.execute_in_process(
            instance=instance,
            partition_key=b.batch_id,
            raise_on_error=False,
            run_config=quiet,
            tags={"batch_id": b.batch_id, "content_sha256": b.content_hash},
        )
        from clinical_ml.core.delivery import ZonePaths  # pandera: imported by the commands that ingest
        from clinical_ml.core.row_accounting import batch_account

        account = batch_account(
            ZonePaths(root / "landing", root / "archive", root / "quarantine", root / "phi"),
            root / "deid",
            b.batch_id,
        )
        if not result.success:
            verdict = "FAILED (open the UI, make dev, for the run's logs)"
        elif account.clean:
            verdict = "every row accepted and released"
        else:
            verdict = "ingested and anonymized, with rows rejected or withheld"
        # never "succeeded" alone: where every delivered row went, in counts and reason codes
        print(
            f"[{time.perf_counter() - started:5.0f} s] batch {i}/{len(batches)} {b.batch_id}: {verdict}",
            flush=True,
        )
        for line in account.lines():
            print(line)
        if not result.success:
            return 1
    deid = DeidStore(root / "deid", root / "reports")
    # A use case the data cannot serve (no eligible stay, no outcome event) ends here with its reason, before
    # a training step fails on it; the others run.
    not_run = _unservable(deid, chosen)
    for name, reason in not_run.items():
        print(f"{name}: not run: {reason}; `clinical-ml usecase check {files[name]}` shows the counts")
    names = [uc.name for uc in chosen if uc.name not in not_run]
    if not names:
        print("no use case to run on these data", file=sys.stderr)
        return 1
    print(
        f"[{time.perf_counter() - started:5.0f} s] lifecycle of {', '.join(names)}: cohorts, features, training, "
        "evaluation, fairness, reports (a few minutes)",
        flush=True,
    )
    lifecycle = defs.resolve_job_def("lifecycle_job")
    selection = [
        k
        for k in lifecycle.asset_layer.executable_asset_keys
        if k.path[0] in names or k.path == ["meds_dataset"]
    ]
    result = lifecycle.execute_in_process(
        instance=instance, raise_on_error=False, run_config=quiet, asset_selection=selection
    )
    failures = _failures_by_use_case(result, names)
    if "" in failures:  # a step shared by every use case (the MEDS export)
        print(
            f"lifecycle run failed: {failures['']}; open the UI (make dev) for the run's logs",
            file=sys.stderr,
        )
        return 1
    for name, reason in failures.items():
        print(f"{name}: lifecycle run failed: {reason}; open the UI (make dev) for the run's logs")
    not_run |= failures
    summary = {}
    # Only the use cases this run trained: another's folder may hold features from `make dev`'s refresh.
    for name in sorted(n for n in names if n not in failures):
        store = deid.use_case(name)
        if not store.evaluation.exists():
            continue
        ev, decision = store.evaluation.read(), store.decision.read()
        auroc = summary[name] = ev.metric("auroc")
        print(f"\n== {name} ==")
        print(
            f"validation AUROC {auroc.value:.3f} (95% CI {auroc.lower:.3f} to {auroc.upper:.3f}), "
            f"{ev.n_validation} admissions, {ev.events_validation} "
            f"{next(uc.words.events for uc in chosen if uc.name == name)}"
        )
        print(
            f"operating point: risk >= {ev.threshold:.3f} -> sensitivity {ev.metric('sensitivity').value:.2f}, "
            f"specificity {ev.metric('specificity').value:.2f}, PPV {ev.metric('ppv').value:.2f}"
        )
        print(f"model file sha256 {store.challenger.model_sha256()[:16]}... (the same on every fresh demo)")
        if decision.promoted:
            print("promotion: promoted to champion")
        elif decision.awaiting_sign_off:
            print(
                "promotion: passed the gate, awaiting the clinical panel's sign-off (read the report card, then "
                f'clinical-ml approve {name} --by "NAME" --approve|--reject --note "...")'
            )
        else:
            print("promotion: not promoted (the gate refused it)")
        for reason in decision.reasons:
            print(f"  - {reason}")
        for report in (
            "performance_report",
            "subcohort_fairness_report",
            "feature_drift_report",
            "monitoring_report",
        ):
            path = store.reports.report(report)
            if path.exists():
                print(f"{report.replace('_', ' ')}: {path}")
        cards = store.reports.report_cards()
        if cards:
            print(f"report card: {cards[-1]}")
    story = None
    trained = [n for n in names if n not in failures]
    if onset is not None and trained:
        story = _drift_story(root, instance, defs, trained, batches, onset, started=started)
    print(f"\ndone in {time.perf_counter() - started:.0f} s; open the UI with `make dev`")
    if args.json:
        print(json.dumps({k: v.as_dict() for k, v in summary.items()} | ({"drift": story} if story else {})))
    if story is not None:
        # the derivation window before the drift may be too short for a use case (e.g. 30-day readmission):
        # said above; the demo failed only where a run failed or nothing could be monitored
        return 1 if failures or not any(story["levels"].values()) else 0
    return 1 if not_run else 0


def _drift_onset(root: Path, batches: list) -> int:
    """How many landed batches come before the drift the synthetic generator injected (from its manifest), on
    a data root whose de-identified layer holds none of the later ones (a model must not be derived on them)."""
    from clinical_ml.core.artifacts import DeidStore
    from clinical_ml.core.synthetic import MANIFEST_NAME

    landing = root / "landing"
    path = landing / MANIFEST_NAME
    drift = json.loads(path.read_text()).get("drift") if path.is_file() else None
    if not drift:
        raise CommandError(
            f"--scenario drift: the landing zone {landing} was not written by the drift scenario (no drift in "
            f"its {MANIFEST_NAME}); empty it first (make clean-data)"
        )
    ids = [b.batch_id for b in batches]
    first = drift.get("first_batch_id")
    if first not in ids or ids.index(first) == 0:
        raise CommandError(
            f"--scenario drift: the drift begins {'with the first batch' if first in ids else 'after the last'} "
            "batch, so no model can be derived before it and checked after it; choose --drift-from-batch "
            f"between 1 and {len(ids) - 1} (on an empty landing zone)"
        )
    onset = ids.index(first)
    ingested = set(DeidStore(root / "deid", root / "reports").encounters.batch_ids()) & set(ids[onset:])
    if ingested:
        raise CommandError(
            f"--scenario drift: the de-identified layer already holds batches from the drift on "
            f"({', '.join(sorted(ingested))}, a previous run), so the model would be derived on them; empty the "
            "data root first (make clean-data)"
        )
    return onset


def _drift_story(
    root: Path,
    instance: "dg.DagsterInstance",
    defs: "dg.Definitions",
    names: list[str],
    batches: list,
    onset: int,
    *,
    started: float,
) -> dict:
    """After the derivation batches trained the first models: the demo's stand-in for the panel where a use
    case has no champion, then every batch checked in order (:mod:`clinical_ml.replay`), and the story told."""
    from clinical_ml.core.artifacts import DeidStore
    from clinical_ml.core.synthetic import MANIFEST_NAME
    from clinical_ml.replay import BatchReplay, decisions_in_words, drift_story, record_manual_approvals

    for name in record_manual_approvals(root / "registry", names):
        print(f"{name}: {decisions_in_words(root / 'registry', [name])[name]}")
    run = BatchReplay(root, instance, defs, names)
    run.started = started
    print(
        f"\n[{time.perf_counter() - started:5.0f} s] monitoring: each batch scored by the champion and checked for drift"
    )
    days = run.monitor(batches[:onset], batches[onset:])
    drift = json.loads((root / "landing" / MANIFEST_NAME).read_text())["drift"]
    injected = drift["first_batch_id"]
    print(
        f"\n== drift ==\ninjected from batch {injected}: "
        + "; ".join(_change_words(c) for c in drift["changes"])
    )
    for line in drift_story(days, injected_from=injected):
        print(line)
    deid = DeidStore(root / "deid", root / "reports")
    for name in names:
        path = deid.use_case(name).reports.report("monitoring_report")
        if path.exists():
            print(f"{name} monitoring report (every batch's check, the decisions): {path}")
    found = next((d.batch_id for d in days if d.level == "error"), None)
    return {
        "injected_from": injected,
        "first_error": found,
        "levels": {d.batch_id: d.level for d in days},
        "retrained": {
            d.batch_id: {n: {"reason": r.reason, "decision": r.decision} for n, r in d.retraining.items()}
            for d in days
            if d.retraining
        },
    }


def _change_words(change: dict) -> str:
    """One injected change of the drift scenario in words (from the generator's manifest)."""
    kind = change.get("kind")
    if kind == "assay_change":
        return f"{change['name']} assay reads {change['shift']:g} {change['unit']} higher"
    if kind == "age_shift":
        return f"patients first admitted from then on are {change['age_years']:g} years older"
    if kind == "severity_shift":
        return f"every admission is sicker (severity +{change['severity_sd']:g} SD)"
    return str(kind)


def _deid_tables(deid: "DeidStore") -> tuple["pl.DataFrame", "pl.DataFrame", "pl.LazyFrame | None"]:
    """Encounters and patients of every batch, and the events as one lazy scan (read only for the codes a
    use case needs)."""
    import polars as pl

    files = deid.events.files()
    events = pl.scan_parquet(files) if files else None
    return deid.encounters.read_all(relaxed=True), deid.patients.read_all(), events


def _unservable(deid: "DeidStore", use_cases: list[UseCase]) -> dict[str, str]:
    """Why each use case the de-identified data cannot serve cannot be trained on them (counts only)."""
    from clinical_ml.core.feasibility import why_not_servable

    encounters, patients, events = _deid_tables(deid)
    if encounters.height == 0:
        return {uc.name: f"no de-identified data under {deid.root}" for uc in use_cases}
    reasons = {uc.name: why_not_servable(encounters, patients, events, uc) for uc in use_cases}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def _failures_by_use_case(result: "dg.ExecuteInProcessResult", names: list[str]) -> dict[str, str]:
    """The first failed step of each use case's part of the run and why ("" for a step of no use case); a
    promotion gate refusing a challenger is a decision, not a failure. Only our own ``ValueError`` messages
    are repeated (they name counts); another error is named by its class, the UI has the rest."""
    from clinical_ml.defs.usecase.training import GATE_CHECKS

    gates = tuple(f"__promotion_decision_{g}" for g in GATE_CHECKS.values())
    failures: dict[str, str] = {}
    for event in result.all_events:
        step = event.step_key
        if not (event.is_step_failure and step) or step.endswith(gates):
            continue
        owner = next((n for n in names if step.startswith(f"{n}__")), "")
        error = event.step_failure_data.error
        while error is not None and error.cause is not None:
            error = error.cause
        if error is None:
            why = "a blocking check failed"
        elif error.cls_name == "ValueError":
            why = error.message.strip().removeprefix("ValueError: ").splitlines()[0]
        else:
            why = error.cls_name or "error"
        # a use case's step key is <name>__<name>__<stage>: name the stage
        stage = step.removeprefix(f"{owner}__").removeprefix(f"{owner}__") if owner else step
        failures.setdefault(owner, f"step {stage} failed ({why})")
    return failures


def cmd_usecase_check(args: argparse.Namespace) -> int:
    """Validate one use-case file (and its monitoring levels beside it); with de-identified data under the
    data root, say how much data there is for its question."""
    from clinical_ml.core.artifacts import DeidStore
    from clinical_ml.core.feasibility import assess_feasibility
    from clinical_ml.core.monitoring_config import load_monitoring_config

    path = Path(args.file)
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    try:
        uc = load_use_case(path)
        load_monitoring_config(monitoring_config_file(path.parent, uc.name))
    except (UseCaseError, ValueError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    root = resolve_data_root(args.data_root)
    deid = DeidStore(root / "deid", root / "reports")
    found = bool(deid.encounters.files())
    feasibility = assess_feasibility(*_deid_tables(deid), uc) if found else None
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "valid": True,
                    "use_case": uc.name,
                    "data": str(deid.root),
                    "feasibility": feasibility.as_dict() if feasibility else None,
                }
            )
        )
        return 0
    print(f"{path}: valid use case {uc.name}: {uc.outcome.window}, predicted {uc.prediction_time.describe()}")
    if feasibility is None:
        print(
            f"no de-identified data found under {deid.root} (no encounters/*.parquet): run `clinical-ml run` "
            "first, or give --data-root (e.g. data/eicu after `clinical-ml run --data eicu`)"
        )
        return 0
    print(f"data: {deid.root} ({len(deid.encounters.files())} batches)\n")
    _print_feasibility(feasibility)
    return 0


def _print_feasibility(f: "Feasibility") -> None:
    from clinical_ml.core.feasibility import EVENTS_PER_FEATURE_MIN
    from clinical_ml.core.units import plain_name

    c, k = f.counts, f.min_cell_size

    def pct(share: float | None) -> str:
        return "-" if share is None else f"{100 * share:.1f}%"

    print("participant flow")
    for label, n in f.flow.rows():
        print(f"  {label:<58} {n:>9,}")
    print(f"\neligible stays {c.eligible_stays:,}; prediction rows {c.prediction_rows:,}")
    print(
        f"outcome known for {c.labelled_rows:,} rows; {c.label_unknown_rows:,} not yet known (outcome window "
        "still open at the end of the data)"
    )
    print(f"{f.events_word}: {c.events:,} in {c.event_stays:,} stays; prevalence {pct(c.prevalence)}")
    epf = f.events_per_feature
    print(
        f"candidate features: {f.candidate_features:,} (one-hot categories estimated on the whole cohort); "
        f"{'-' if epf is None else f'{epf:.1f}'} stays with {f.event_word} per candidate feature"
        + (
            f": thin (rule of thumb: fewer than {EVENTS_PER_FEATURE_MIN} events per candidate feature "
            "risks overfitting)"
            if f.thin
            else f" (rule of thumb: at least {EVENTS_PER_FEATURE_MIN})"
        )
    )
    print(f'\nby site and period (cells under {k} shown as "< {k}")')
    print(f"  {'':<8} {'':<24} {'stays':>9} {f.events_word:>14} {'prevalence':>11}")
    for g in f.groups:
        print(
            f"  {g.attribute:<8} {g.value:<24} {g.stays.text:>9} {g.events.text:>14} {pct(g.prevalence):>11}"
        )
    print(
        f"\nfeature codes: share of eligible stays with a value in the {f.longest_window_hours:g} h before the "
        "(first) prediction time"
    )
    for a in f.codes:
        note = "  absent from the data" if a.events_in_data == 0 else ""
        print(f"  {a.code:<24} {plain_name(a.code):<28} {pct(a.share_of_stays):>7}{note}")
    others = [(field, v) for field, v in f.absent if field != "features.codes"]
    if others:
        print("\nnamed in the file, never in the data:")
        for field, v in others:
            print(f"  {field}: {v}")
    reason = f.cannot_serve()
    print(f"\n{'cannot be trained on these data: ' + reason if reason else 'can be trained on these data'}")


def _hospital_options(
    p: argparse.ArgumentParser, *, scenario: str, patients: int, batches: int, drift_from_batch: int | None
) -> None:
    """The data root and the synthetic hospital written into its landing zone when that is empty."""
    p.add_argument("--data-root", help="data root (default: $CLINICAL_ML_DATA_ROOT or <project>/data)")
    p.add_argument("--patients", type=int, default=patients)
    p.add_argument("--batches", type=int, default=batches)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--scenario", choices=["default", "drift", "bias"], default=scenario)
    p.add_argument("--start-date", default="2026-01-05")
    p.add_argument("--drift-from-batch", type=int, default=drift_from_batch)
    p.add_argument(
        "--days-per-batch",
        type=int,
        default=1,
        help="days of admissions per batch (30-day readmissions need a span of weeks: e.g. 14)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clinical-ml", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a synthetic hospital into the landing zone")
    p = sub.add_parser(
        "run",
        aliases=["demo"],
        help="run the lifecycle of use cases on the landing zone (a synthetic hospital if empty) or a real "
        "database, and print where the reports are",
    )
    for each in (synth, p):
        _hospital_options(each, scenario="default", patients=3000, batches=5, drift_from_batch=None)
    p.add_argument(
        "--usecase",
        action="append",
        metavar="NAME",
        help="a use case of the folder to run (repeatable; default: every one whose `datasets` is empty or "
        "names --data)",
    )
    p.add_argument(
        "--usecases-dir", help="use case folder (default: $CLINICAL_ML_USECASES or <project>/usecases)"
    )
    p.add_argument("--json", action="store_true", help="also print the AUROCs as JSON")
    p.add_argument(
        "--data",
        choices=DATA_SOURCES,
        default="synthetic",
        help="synthetic hospital through the landing zone, or a real de-identified database "
        "(eICU-CRD, MIMIC-III) mapped by its adapter into <data root>/<data>",
    )
    p.add_argument("--source", help="folder of the real database's Parquet tables (default: ../shared/data)")
    usecase = sub.add_parser("usecase", help="work with a use-case file").add_subparsers(
        dest="usecase_command", required=True
    )
    p = usecase.add_parser(
        "check",
        help="validate a use-case file and, on the de-identified data present, say how much data there is "
        "for its question (eligible stays, outcome events, prevalence, per site and period, feature codes)",
    )
    p.add_argument("file", help="the use case YAML")
    p.add_argument("--data-root", help="data root (default: $CLINICAL_ML_DATA_ROOT or <project>/data)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser(
        "replay",
        help="replay the landing zone's batches day by day through the sensors' jobs into the instance "
        "($DAGSTER_HOME); a synthetic drift month when the landing zone is empty",
    )
    _hospital_options(p, scenario="drift", patients=6000, batches=30, drift_from_batch=20)
    p.add_argument("--warmup", type=int, default=7, help="days before the first champion is trained")
    p.add_argument(
        "--approve-first-model",
        action="store_true",
        help="demo only: if the gate refuses the first model, approve it manually (recorded as a decision)",
    )
    p.add_argument(
        "--usecases-dir",
        help="use case folder (default: $CLINICAL_ML_USECASES or <project>/usecases); e.g. one holding only "
        "the synthetic hospital's icu_mortality_24h.yaml",
    )
    p = sub.add_parser(
        "approve",
        help="record the clinical panel's sign-off of a model awaiting it (who, decision, note; the sha256 of "
        "its report card), and on approval make it champion",
    )
    p.add_argument("usecase", help="the use case's name")
    p.add_argument("--by", required=True, help="who signs off (name and role)")
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--approve", action="store_true", help="approve: the model becomes champion")
    verdict.add_argument("--reject", action="store_true", help="reject: the champion stays")
    p.add_argument("--note", default="", help="the panel's note (conditions, thresholds approved, ...)")
    p.add_argument("--version", help="the model version (default: the one awaiting sign-off)")
    p.add_argument(
        "--group-thresholds",
        metavar="ATTRIBUTE",
        help="with --approve: also approve the fairness report's per-group thresholds of this audited attribute "
        "(e.g. sex); scoring then flags each group at its own threshold",
    )
    p.add_argument("--data-root", help="data root (default: $CLINICAL_ML_DATA_ROOT or <project>/data)")
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "synth": cmd_synth,
        "run": cmd_run,
        "demo": cmd_run,
        "usecase": cmd_usecase_check,
        "replay": cmd_replay,
        "serve": cmd_serve,
        "approve": cmd_approve,
    }
    try:
        return commands[args.command](args)
    except (CommandError, UseCaseError) as exc:
        print(f"clinical-ml: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
