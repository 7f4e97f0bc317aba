from datetime import UTC, datetime

import dagster as dg

from clinical_ml.core.champion_monitoring import nightly_retraining_reason
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import RETRAIN_REASON_TAG, Stage, stage_selection
from clinical_ml.defs.usecase.panel_actions import RECALIBRATION_TAG
from clinical_ml.resources.zones import DataZones

PER_BATCH = dg.AssetSelection.tag("monitoring", "per_batch")
# the point-of-care service's feedback, pseudonymised (anonymization group) for the monitoring that reads it
CLINICIAN_FEEDBACK = dg.AssetSelection.tag("source", "clinician_feedback")
# a recalibrated champion is offered after monitoring, never in the run that retrains: one decision per run
RECALIBRATION = dg.AssetSelection.tag(*RECALIBRATION_TAG)

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=(
        dg.AssetSelection.assets("meds_dataset")
        | stage_selection(Stage.FEATURES, Stage.TRAINING, Stage.EVALUATION, Stage.MONITORING)
        | CLINICIAN_FEEDBACK
    )
    - PER_BATCH
    - RECALIBRATION,
    description="Rebuild the MEDS layer, features, retrain, evaluate, gate promotion, and report monitoring.",
)

feature_refresh_job = dg.define_asset_job(
    "feature_refresh_job",
    selection=stage_selection(Stage.FEATURES),
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
    selection=(stage_selection(Stage.MONITORING) | CLINICIAN_FEEDBACK) - PER_BATCH,
    description="Refresh each use case's monitoring report (trends, performance over time, decisions) and "
    "newest-batch drift report after a batch has been checked, and the clinicians' feedback.",
)


def nightly_retraining_reasons(zones: DataZones, use_cases: list[UseCase], as_of: datetime) -> list[str]:
    """Why tonight's retraining should run, one line per use case with something new to learn from."""
    reasons = (
        nightly_retraining_reason(zones.use_case(uc.name), zones.model_registry(uc.name), as_of=as_of)
        for uc in use_cases
    )
    return [r for r in reasons if r]


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
