import dagster as dg

from clinical_ml.defs.conventions import Stage

lifecycle_job = dg.define_asset_job(
    "lifecycle_job",
    selection=dg.AssetSelection.assets("meds_dataset")
    | dg.AssetSelection.groups(Stage.FEATURES, Stage.TRAINING, Stage.EVALUATION, Stage.MONITORING),
    description="Rebuild the MEDS layer, features, retrain, evaluate, gate promotion, and report drift.",
)

nightly_retraining_schedule = dg.ScheduleDefinition(
    name="nightly_retraining_schedule",
    job=lifecycle_job,
    cron_schedule="0 2 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night at 02:00 UTC: retrain on every anonymized batch and refresh the reports.",
)
