from datetime import UTC, datetime

import dagster as dg
import polars as pl

from clinical_ml.core import registry
from clinical_ml.core.monitoring import newly_labelled
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import RETRAIN_REASON_TAG, Stage
from clinical_ml.defs.usecase.paths import UseCasePaths
from clinical_ml.resources.zones import DataZones

PER_BATCH = dg.AssetSelection.tag("monitoring", "per_batch")

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=(
        dg.AssetSelection.assets("meds_dataset")
        | dg.AssetSelection.groups(Stage.FEATURES, Stage.TRAINING, Stage.EVALUATION, Stage.MONITORING)
    )
    - PER_BATCH,
    description="Rebuild the MEDS layer, features, retrain, evaluate, gate promotion, and report monitoring.",
)

feature_refresh_job = dg.define_asset_job(
    "feature_refresh_job",
    selection=dg.AssetSelection.groups(Stage.FEATURES),
    description="Bring every use case's cohort, labels and features up to date after a new batch (features "
    "compute only the batches whose inputs changed). The MEDS dataset export is rebuilt with the nightly "
    "lifecycle_job, not per batch: nothing downstream reads it.",
)

batch_monitoring_job = dg.define_asset_job(
    "batch_monitoring_job",
    selection=PER_BATCH,
    description="Score one batch with the champion, check it for drift, export FHIR RiskAssessments.",
)


monitoring_report_job = dg.define_asset_job(
    "monitoring_report_job",
    selection=dg.AssetSelection.groups(Stage.MONITORING) - PER_BATCH,
    description="Refresh each use case's monitoring report (trends, performance over time, decisions) and "
    "newest-batch drift report after a batch has been checked.",
)


def nightly_retraining_reasons(zones: DataZones, use_cases: list[UseCase], as_of: datetime) -> list[str]:
    """Why tonight's retraining should run, one line per use case with something new to learn from:
    no champion yet, or admissions whose outcome is now known from batches the champion never saw."""
    reasons = []
    for uc in use_cases:
        cohort_file = UseCasePaths(uc.name).deid(zones, "cohort.parquet")
        if not cohort_file.exists():
            continue
        version = registry.champion(zones.registry, uc.name)
        if version is None:
            reasons.append(f"{uc.name}: no champion yet")
            continue
        trained_on = (
            registry.read_card(zones.registry, uc.name, version).get("lineage", {}).get("batch_ids", [])
        )
        cohort = pl.read_parquet(
            cohort_file, columns=["batch_id", "admit_time", "discharge_time", "death_time"]
        )
        n = newly_labelled(cohort, trained_on=trained_on, as_of=as_of)
        if n:
            reasons.append(f"{uc.name}: {n} newly labelled admissions since model {version} was trained")
    return reasons


def build_nightly_retraining_schedule(use_cases: list[UseCase]) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="nightly_retraining_schedule",
        job=lifecycle_job,
        cron_schedule="0 2 * * *",
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Every night at 02:00 UTC, when newly labelled admissions exist (outcome known, batch not "
        "in the champion's training data) or no champion exists: retrain on every anonymized batch and refresh "
        "the reports; promotion still goes through the gate. Otherwise the night is skipped, with the reason.",
    )
    def nightly_retraining_schedule(context: dg.ScheduleEvaluationContext, zones: DataZones):
        as_of = context.scheduled_execution_time or datetime.now(UTC)
        reasons = nightly_retraining_reasons(zones, use_cases, as_of)
        if not reasons:
            return dg.SkipReason("no newly labelled admissions since the champions were trained")
        return dg.RunRequest(
            run_key=f"nightly-{as_of:%Y-%m-%d}",
            tags={RETRAIN_REASON_TAG: "nightly: " + "; ".join(reasons)[:400]},
        )

    return nightly_retraining_schedule
