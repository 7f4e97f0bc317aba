import dagster as dg

from clinical_ml.defs.conventions import Stage, stage_selection

ONE_HOUR = 3600

batch_ingestion_job = dg.define_asset_job(
    "batch_ingestion_job",
    selection=stage_selection(Stage.INGESTION, Stage.ANONYMIZATION)
    - dg.AssetSelection.assets("meds_dataset")
    # the clinicians' feedback is not a batch's: it is pseudonymised by the monitoring_report_job that follows
    # each batch's monitoring and by the nightly lifecycle_job. In every batch's run it held the vault pool
    # once per use case (6 of the 7 vault steps of a batch) for feedback unchanged by the batch.
    - dg.AssetSelection.tag("source", "clinician_feedback"),
    description="Ingest one delivered batch and anonymize it (one partition per batch).",
    # A batch takes minutes; a run killed mid-way stays STARTED holding the vault and ledger pools until run
    # monitoring (dagster.yaml) fails it after this long and frees their slots.
    tags={"dagster/max_runtime": str(ONE_HOUR)},
)
