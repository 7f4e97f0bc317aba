"""Command line: ``clinical-ml synth`` writes a synthetic hospital into the landing zone; ``clinical-ml demo``
runs the whole lifecycle on it and prints where the reports are; ``clinical-ml replay`` runs a synthetic month
day by day through the jobs the sensors start (see :mod:`clinical_ml.replay`)."""

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
from clinical_ml.core.locations import resolve_data_root, resolve_usecases_dir
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital

if TYPE_CHECKING:  # dagster is imported by the commands that run jobs, so `clinical-ml synth` starts fast
    import dagster as dg

# The use cases written for each kind of data: a use case's codes and gates only make sense on its own source.
USE_CASES_BY_SOURCE = {
    "synthetic": ("icu_mortality_24h",),
    "eicu": ("eicu_mortality_24h",),
    "mimic": ("icu_mortality_24h",),
}


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


def cmd_demo(args: argparse.Namespace) -> int:
    return _with_instance(lambda instance: _demo(args, instance))


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
    from clinical_ml.defs.usecase.training import refused_by_gate_only

    root = resolve_data_root(args.data_root)
    started = time.perf_counter()
    if args.data != "synthetic":
        # A real source gets its own data root (data/<source>) unless one is given: never mix sources.
        root = root if args.data_root else root / args.data
        _adapt_real_source(args.data, args.source, root, seed=args.seed)
    elif not find_complete_batches(root / "landing"):
        generate_hospital(root / "landing", _synth_config(args))
        print(f"synthetic hospital written to {root / 'landing'}")
    defs = build_definitions(data_root=root, usecases_dir=resolve_usecases_dir())
    batches = find_complete_batches(root / "landing")
    known = set(instance.get_dynamic_partitions(BATCH_PARTITIONS_NAME))
    instance.add_dynamic_partitions(
        BATCH_PARTITIONS_NAME, [b.batch_id for b in batches if b.batch_id not in known]
    )
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    ingest = defs.resolve_job_def("batch_ingestion_job")
    for b in batches:
        result = ingest.execute_in_process(
            instance=instance,
            partition_key=b.batch_id,
            raise_on_error=False,
            run_config=quiet,
            tags={"batch_id": b.batch_id, "content_sha256": b.content_hash},
        )
        print(
            f"batch {b.batch_id}: ingestion and anonymization {'succeeded' if result.success else 'FAILED'}"
        )
        if not result.success:
            return 1
    # Each source runs only the use cases written for it (another source's codes and gates are not its own).
    only = USE_CASES_BY_SOURCE[args.data]
    lifecycle = defs.resolve_job_def("lifecycle_job")
    selection = [
        k
        for k in lifecycle.asset_layer.executable_asset_keys
        if k.path[0] in only or k.path == ["meds_dataset"]
    ]
    result = lifecycle.execute_in_process(
        instance=instance, raise_on_error=False, run_config=quiet, asset_selection=selection
    )
    if not result.success and not refused_by_gate_only(result):
        print("lifecycle run failed; open the UI (make dev) for the run's logs", file=sys.stderr)
        return 1
    deid = DeidStore(root / "deid", root / "reports")
    summary = {}
    # Only the use cases this run trained: another's folder may hold features from `make dev`'s refresh.
    for name in sorted(only):
        store = deid.use_case(name)
        if not store.evaluation.exists():
            continue
        ev, decision = store.evaluation.read(), store.decision.read()
        auroc = summary[name] = ev.metric("auroc")
        print(f"\n== {name} ==")
        print(
            f"validation AUROC {auroc.value:.3f} (95% CI {auroc.lower:.3f} to {auroc.upper:.3f}), "
            f"{ev.n_validation} admissions, {ev.events_validation} deaths"
        )
        print(
            f"operating point: risk >= {ev.threshold:.3f} -> sensitivity {ev.metric('sensitivity').value:.2f}, "
            f"specificity {ev.metric('specificity').value:.2f}, PPV {ev.metric('ppv').value:.2f}"
        )
        print(
            f"promotion: {'promoted to champion' if decision.promoted else 'not promoted (the gate refused it)'}"
        )
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
    print(f"\ndone in {time.perf_counter() - started:.0f} s; open the UI with `make dev`")
    if args.json:
        print(json.dumps({k: v.as_dict() for k, v in summary.items()}))
    return 0


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
    p = sub.add_parser("demo", help="run the whole lifecycle on the landing zone (synthetic if empty)")
    for each in (synth, p):
        _hospital_options(each, scenario="default", patients=3000, batches=5, drift_from_batch=None)
    p.add_argument("--json", action="store_true", help="also print the AUROCs as JSON")
    p.add_argument(
        "--data",
        choices=["synthetic", "eicu", "mimic"],
        default="synthetic",
        help="synthetic hospital through the landing zone, or a real de-identified database "
        "(eICU-CRD, MIMIC-III) mapped by its adapter into <data root>/<data>",
    )
    p.add_argument("--source", help="folder of the real database's Parquet tables (default: ../shared/data)")
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
    args = parser.parse_args(argv)
    return {"synth": cmd_synth, "demo": cmd_demo, "replay": cmd_replay}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
