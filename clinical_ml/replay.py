"""Replay a synthetic month day by day through the real jobs, as the sensors would run them, recorded in the
Dagster instance (``$DAGSTER_HOME``) so ``make dev`` shows each day's drift check, the retraining runs and the
promotion decisions::

    DAGSTER_HOME=$PWD/.dagster_home .venv/bin/clinical-ml replay \
        --scenario drift --batches 30 --drift-from-batch 20 --warmup 7

Day by day: ingest the batch; rebuild features; score and check the batch (``batch_monitoring_job``) and
refresh the monitoring reports (``monitoring_report_job``); if the drift check or the report requested
retraining, run ``lifecycle_job`` (the promotion gate decides). The first ``--warmup``
days train the first champion.

A command-line driver of the Dagster jobs, not wiring: it lives beside ``cli.py`` (``clinical-ml replay``)
rather than in ``defs/``, which nothing of the package imports upwards.
"""

from pathlib import Path
from typing import Any

import dagster as dg

from clinical_ml.core.artifacts import DeidStore
from clinical_ml.core.drift import worst_level
from clinical_ml.core.landing import find_complete_batches
from clinical_ml.core.registry import PromotionDecision, Registry
from clinical_ml.core.usecase import load_use_cases
from clinical_ml.defs.build import build_definitions
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
from clinical_ml.defs.monitoring.sensors import retraining_requests
from clinical_ml.defs.usecase.paths import stage_of

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
JOBS = (
    "batch_ingestion_job",
    "feature_refresh_job",
    "batch_monitoring_job",
    "monitoring_report_job",
    "lifecycle_job",
)
MANUAL_APPROVAL = "manual approval for the demo; the gate had refused it"


def record_manual_approvals(registry_root: Path, use_cases: list[str]) -> list[str]:
    """Demo only (``--approve-first-model``): for each use case without a champion whose last decision refused
    a model, record a manual approval of that model as a decision of its own (the gate's refusal stays in the
    log beside it). Returns the use cases approved."""
    approved = []
    for name in use_cases:
        models = Registry(registry_root, name)
        history = models.decisions()
        if models.champion() is not None or not history:
            continue
        models.record_decision(PromotionDecision(True, history[-1].challenger, None, (MANUAL_APPROVAL,)))
        approved.append(name)
    return approved


def batch_drift_level(deid: DeidStore, use_cases: list[str], batch_id: str) -> str | None:
    """The worst drift level the use cases' checks recorded for ``batch_id``; None when none did (no
    champion yet, or the run failed)."""
    parts = [deid.use_case(name).drift_records.part(batch_id) for name in use_cases]
    levels = [p.read().level for p in parts if p.exists()]
    return worst_level(levels) if levels else None


def replay(
    root: Path,
    instance: dg.DagsterInstance,
    *,
    warmup: int,
    usecases_dir: Path,
    approve_first_model: bool = False,
) -> list[dict[str, Any]]:
    """Run every landed batch under ``root`` in order; returns one line per day (batch, drift level,
    retrained)."""
    defs = build_definitions(data_root=root, usecases_dir=usecases_dir)
    use_cases = [uc.name for uc in load_use_cases(usecases_dir)]
    batches = find_complete_batches(root / "landing")
    known = set(instance.get_dynamic_partitions(BATCH_PARTITIONS_NAME))
    instance.add_dynamic_partitions(
        BATCH_PARTITIONS_NAME, [b.batch_id for b in batches if b.batch_id not in known]
    )
    jobs = {n: defs.resolve_job_def(n) for n in JOBS}
    keys = [
        k
        for k in defs.resolve_asset_graph().get_all_asset_keys()
        if stage_of(k) in ("batch_drift", "monitoring_report")
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
                record_manual_approvals(root / "registry", use_cases)
        if i + 1 <= warmup:
            days.append({"batch_id": b.batch_id, "level": "warmup", "retrained": i + 1 == warmup})
            continue
        jobs["feature_refresh_job"].execute_in_process(tags={"batch_id": b.batch_id}, **run)
        jobs["batch_monitoring_job"].execute_in_process(partition_key=b.batch_id, **run)
        jobs["monitoring_report_job"].execute_in_process(**run)
        requests, cursor = retraining_requests(instance, keys, cursor)
        for req in requests:
            jobs["lifecycle_job"].execute_in_process(tags=req.tags, **run)
        level = batch_drift_level(DeidStore(root / "deid", root / "reports"), use_cases, b.batch_id)
        days.append({"batch_id": b.batch_id, "level": level or "not monitored", "retrained": bool(requests)})
        print(
            f"{b.batch_id}: drift {level or 'not monitored'}"
            + (" -> retraining requested, lifecycle_job run (promotion gate)" if requests else "")
            + ("" if level else " (no champion yet, or the run failed: see the UI)")
        )
    return days
