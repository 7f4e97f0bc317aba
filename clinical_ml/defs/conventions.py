"""Stages, groups, owners and data-class tags, defined once and used on every asset."""

from enum import StrEnum
from typing import Final

import dagster as dg


class Stage:
    """Lifecycle stages. Each asset is declared in its stage's group; :func:`in_use_case_groups` then moves a
    use case's assets into a group named after the use case (the lineage shows one box per question) and keeps
    the stage as the ``stage`` tag, which is what the jobs select on.

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
STAGE_TAG = "stage"
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


def stage_selection(*stages: str) -> dg.AssetSelection:
    """The assets of these lifecycle stages, every use case's and the shared ones (by their ``stage`` tag)."""
    selection = dg.AssetSelection.tag(STAGE_TAG, stages[0])
    for stage in stages[1:]:
        selection = selection | dg.AssetSelection.tag(STAGE_TAG, stage)
    return selection


def in_use_case_groups(
    assets: list[dg.AssetsDefinition], use_case: str | None = None
) -> list[dg.AssetsDefinition]:
    """``assets`` with their stage (the group they were declared in) kept as the ``stage`` tag and, for a
    ``use_case``'s assets, the use case's name as their group: in the UI's lineage each question is one box
    beside the shared ingestion and anonymization, rather than a part of every stage's box."""

    def regroup(spec: dg.AssetSpec) -> dg.AssetSpec:
        stage = spec.group_name or "default"
        return spec.merge_attributes(tags={STAGE_TAG: stage}).replace_attributes(group_name=use_case or stage)

    return [a.map_asset_specs(regroup) for a in assets]
