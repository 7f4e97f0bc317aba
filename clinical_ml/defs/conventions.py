"""Groups, owners and data-class tags, defined once and used on every asset."""

from enum import StrEnum
from typing import Final

import dagster as dg


class Stage:
    """Lifecycle stages, one asset group each.

    Plain ``str`` constants rather than a ``StrEnum``: Dagster 1.13 serializes group names for the webserver
    and refuses Enum members ("Can only serialize whitelisted Enums"), which breaks the UI, not the tests.
    """

    INGESTION: Final = "ingestion"
    ANONYMIZATION: Final = "anonymization"
    FEATURES: Final = "features"
    TRAINING: Final = "training"
    EVALUATION: Final = "evaluation"
    MONITORING: Final = "monitoring"
    # opt-in re-identified delivery to the EHR (phi zone outbox), see build_ehr_delivery_asset
    DELIVERY: Final = "delivery"

    ALL: Final = (INGESTION, ANONYMIZATION, FEATURES, TRAINING, EVALUATION, MONITORING, DELIVERY)


class DataClass(StrEnum):
    PHI = "phi"
    DEIDENTIFIED = "deidentified"
    AGGREGATE = "aggregate"


DATA_CLASS_TAG = "data_class"
ML_OWNERS = ["team:clinical-ml"]
PRIVACY_OWNERS = ["team:privacy-office", "team:clinical-ml"]

# run tags of a retraining run: why it runs, and (drift) the batch where the drift began, which becomes the
# start of the new model's drift reference once the gate promotes it
RETRAIN_REASON_TAG = "clinical_ml/retraining_reason"
DRIFT_FROM_TAG = "clinical_ml/drift_from_batch"

BATCH_PARTITIONS_NAME = "batches"
batch_partitions = dg.DynamicPartitionsDefinition(name=BATCH_PARTITIONS_NAME)


def tags(data_class: DataClass) -> dict[str, str]:
    return {DATA_CLASS_TAG: data_class.value}
