import dagster as dg

from clinical_ml.defs.conventions import Stage

batch_ingestion_job = dg.define_asset_job(
    "batch_ingestion_job",
    selection=dg.AssetSelection.groups(Stage.INGESTION, Stage.ANONYMIZATION)
    - dg.AssetSelection.assets("meds_dataset"),
    description="Ingest one delivered batch and anonymize it (one partition per batch).",
)
