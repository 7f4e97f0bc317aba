"""Replay a synthetic month day by day through the real jobs, as the sensors would run them, recorded in the
Dagster instance (``$DAGSTER_HOME``) so ``make dev`` shows each day's drift check, the retraining runs and the
promotion decisions::

    DAGSTER_HOME=$PWD/.dagster_home .venv/bin/python -m clinical_ml.defs.monitoring.replay \
        --scenario drift --batches 30 --drift-from-batch 20 --warmup 7

Day by day: ingest the batch; rebuild features; score and check the batch (``batch_monitoring_job``) and
refresh the monitoring reports (``monitoring_report_job``); if the drift check or the report requested
retraining, run ``lifecycle_job`` (the promotion gate decides). The first ``--warmup``
days train the first champion.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from clinical_ml.core import registry
from clinical_ml.core.drift import worst_level
from clinical_ml.core.landing import find_complete_batches
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml.defs.build import build_definitions
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
from clinical_ml.defs.monitoring.sensors import retraining_requests

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _approve_first_model(root: Path) -> None:
    """Demo only (``--approve-first-model``): when the gate refused the first model, record a manual approval
    as its own decision, with the gate's refusal kept in the log beside it."""
    for uc_dir in sorted((root / "registry").glob("*")):
        log = uc_dir / "decisions.jsonl"
        if registry.champion(root / "registry", uc_dir.name) is None and log.exists():
            last = json.loads(log.read_text().splitlines()[-1])
            registry.record_decision(
                root / "registry",
                uc_dir.name,
                registry.PromotionDecision(
                    True, last["challenger"], None, ("manual approval for the demo; the gate had refused it",)
                ),
            )


def replay(
    root: Path,
    instance: dg.DagsterInstance,
    *,
    warmup: int,
    usecases_dir: Path | None = None,
    approve_first_model: bool = False,
) -> list[dict]:
    """Run every landed batch in order; returns one line per day (batch, drift level, retrained)."""
    defs = build_definitions(data_root=root, usecases_dir=usecases_dir)
    batches = find_complete_batches(root / "landing")
    known = set(instance.get_dynamic_partitions(BATCH_PARTITIONS_NAME))
    instance.add_dynamic_partitions(
        BATCH_PARTITIONS_NAME, [b.batch_id for b in batches if b.batch_id not in known]
    )
    jobs = {
        n: defs.resolve_job_def(n)
        for n in (
            "batch_ingestion_job",
            "feature_refresh_job",
            "batch_monitoring_job",
            "monitoring_report_job",
            "lifecycle_job",
        )
    }
    keys = [
        k
        for k in defs.resolve_asset_graph().get_all_asset_keys()
        if k.path[-1] in ("batch_drift", "monitoring_report")
    ]
    cursor, days = 0, []
    for i, b in enumerate(batches):
        run: dict[str, Any] = {"instance": instance, "raise_on_error": False, "run_config": QUIET}
        jobs["batch_ingestion_job"].execute_in_process(
            partition_key=b.batch_id, tags={"batch_id": b.batch_id, "content_sha256": b.content_hash}, **run
        )
        if i + 1 == warmup:
            jobs["lifecycle_job"].execute_in_process(
                tags={"clinical_ml/retraining_reason": "first champion"}, **run
            )
            if approve_first_model:
                _approve_first_model(root)
        if i + 1 <= warmup:
            days.append({"batch_id": b.batch_id, "level": "warmup", "retrained": i + 1 == warmup})
            continue
        jobs["feature_refresh_job"].execute_in_process(tags={"batch_id": b.batch_id}, **run)
        jobs["batch_monitoring_job"].execute_in_process(partition_key=b.batch_id, **run)
        jobs["monitoring_report_job"].execute_in_process(**run)
        requests, cursor = retraining_requests(instance, keys, cursor)
        for req in requests:
            jobs["lifecycle_job"].execute_in_process(tags=req.tags, **run)
        files = sorted((root / "deid" / "usecases").glob(f"*/monitoring/{b.batch_id}.json"))
        level = worst_level([json.loads(f.read_text())["level"] for f in files]) if files else "not monitored"
        days.append({"batch_id": b.batch_id, "level": level, "retrained": bool(requests)})
        print(
            f"{b.batch_id}: drift {level}"
            + (" -> retraining requested, lifecycle_job run (promotion gate)" if requests else "")
            + ("" if files else " (no champion yet, or the run failed: see the UI)")
        )
    return days


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("CLINICAL_ML_DATA_ROOT", "data"))
    p.add_argument("--scenario", choices=["default", "drift", "bias"], default="drift")
    p.add_argument("--patients", type=int, default=6000)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--drift-from-batch", type=int, default=20)
    p.add_argument("--warmup", type=int, default=7)
    p.add_argument(
        "--approve-first-model",
        action="store_true",
        help="demo only: if the gate refuses the first model, approve it manually (recorded as a decision)",
    )
    p.add_argument(
        "--usecases-dir",
        help="use case folder (default: ./usecases); e.g. one holding only the "
        "synthetic hospital's icu_mortality_24h.yaml",
    )
    args = p.parse_args(argv)
    root = Path(args.data_root).resolve()
    if not find_complete_batches(root / "landing"):
        generate_hospital(
            root / "landing",
            SyntheticConfig(
                n_patients=args.patients,
                n_batches=args.batches,
                scenario=args.scenario,
                drift_from_batch=args.drift_from_batch,
            ),
        )
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    replay(
        root,
        instance,
        warmup=args.warmup,
        usecases_dir=Path(args.usecases_dir) if args.usecases_dir else None,
        approve_first_model=args.approve_first_model,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
