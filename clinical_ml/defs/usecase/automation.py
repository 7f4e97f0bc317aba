import dagster as dg

from clinical_ml.defs.conventions import Stage

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
    selection=dg.AssetSelection.assets("meds_dataset") | dg.AssetSelection.groups(Stage.FEATURES),
    description="Rebuild the MEDS layer and every use case's cohort, labels and features after a new batch.",
)

batch_monitoring_job = dg.define_asset_job(
    "batch_monitoring_job",
    selection=PER_BATCH,
    description="Score one batch with the champion, check it for drift, export FHIR RiskAssessments.",
)

nightly_retraining_schedule = dg.ScheduleDefinition(
    name="nightly_retraining_schedule",
    job=lifecycle_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night at 02:00 UTC: retrain on every anonymized batch (new labels included) and refresh "
    "the reports; promotion still goes through the gate.",
)
