"""Groups, owners and data-class tags, defined once and used on every asset."""

from enum import StrEnum

import dagster as dg


class Stage(StrEnum):
    INGESTION = "ingestion"
    ANONYMIZATION = "anonymization"
    FEATURES = "features"
    TRAINING = "training"
    EVALUATION = "evaluation"
    MONITORING = "monitoring"


class DataClass(StrEnum):
    PHI = "phi"
    DEIDENTIFIED = "deidentified"
    AGGREGATE = "aggregate"


DATA_CLASS_TAG = "data_class"
ML_OWNERS = ["team:clinical-ml"]
PRIVACY_OWNERS = ["team:privacy-office", "team:clinical-ml"]

BATCH_PARTITIONS_NAME = "batches"
batch_partitions = dg.DynamicPartitionsDefinition(name=BATCH_PARTITIONS_NAME)


def tags(data_class: DataClass) -> dict[str, str]:
    return {DATA_CLASS_TAG: data_class.value}
