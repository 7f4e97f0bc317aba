from typing import Any

import dagster as dg

from clinical_ml.core.delivery import FileOutcome, ZonePaths
from clinical_ml.core.imaging import process_imaging
from clinical_ml.core.landing import IMAGING_SOURCE
from clinical_ml.core.safety import Limits
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, batch_partitions, tags
from clinical_ml.defs.ingestion.ranges import BATCH_BACKFILL_POLICY, BatchOutcome, batch_result, log_batches
from clinical_ml.resources.zones import DataZones

KEY = dg.AssetKey(f"raw_{IMAGING_SOURCE}")


def _checks(outcome: FileOutcome) -> list[dg.AssetCheckResult]:
    reasons = dg.MetadataValue.json(outcome.rejected_by_reason)
    return [
        dg.AssetCheckResult(
            check_name="every_imaging_file_accounted_for",
            passed=outcome.accounted,
            metadata={"files_in": outcome.rows_in, "files_accepted": outcome.rows_accepted},
        ),
        dg.AssetCheckResult(
            check_name="imaging_files_accepted",
            passed=outcome.rows_rejected == 0,
            severity=dg.AssetCheckSeverity.WARN,
            description=None
            if outcome.rows_rejected == 0
            else f"{outcome.rows_rejected} of {outcome.rows_in} imaging files of batch {outcome.batch_id} "
            "rejected (quarantine/<batch>/imaging/, a reason beside each); the other files and sources of the "
            "batch proceed",
            metadata={"files_rejected": outcome.rows_rejected, "rejected_by_reason": reasons},
        ),
    ]


def _batch(zones: DataZones, batch_id: str, lines: list[str]) -> BatchOutcome:
    paths = ZonePaths(
        landing=zones.landing, archive=zones.archive, quarantine=zones.quarantine, phi=zones.phi
    )
    limits = Limits(
        max_file_bytes=zones.max_file_bytes,
        max_uncompressed_bytes=zones.max_zip_uncompressed_bytes,
        max_zip_ratio=zones.max_zip_ratio,
    )
    outcome, _ = process_imaging(zones=paths, batch_id=batch_id, limits=limits)
    lines.append(
        f"imaging batch {batch_id}: not delivered (optional)"
        if outcome.status == "not_delivered"
        else f"imaging batch {batch_id}: {outcome.rows_in} files in, {outcome.rows_accepted} accepted, "
        f"{outcome.rows_rejected} rejected"
    )
    metadata: dict[str, Any] = {
        "dagster/row_count": outcome.rows_accepted,
        "status": outcome.status,
        "files_in": outcome.rows_in,
        "files_rejected": outcome.rows_rejected,
        "rejected_by_reason": dg.MetadataValue.json(outcome.rejected_by_reason),
        "warnings": dg.MetadataValue.json(outcome.warnings),
        "path": outcome.accepted_path,
    }
    return BatchOutcome(metadata=metadata, checks=_checks(outcome), data_version=outcome.data_version)


@dg.asset(
    key=KEY,
    deps=["raw_patients"],
    group_name=Stage.INGESTION,
    partitions_def=batch_partitions,
    backfill_policy=BATCH_BACKFILL_POLICY,
    kinds={"dicom", "parquet"},
    owners=ML_OWNERS,
    tags=tags(DataClass.PHI),
    description="PACS imaging as delivered (DICOM files in the batch's imaging/ folder, listed in its marker): "
    "each file checked on its own (listed size and sha256, readable DICOM, PatientID of a patient of the "
    "batch, no future study date, no repeated instance), accepted ones archived by sha256 and indexed in the "
    "phi zone, rejected ones quarantined with a reason; de-identified at the anonymization boundary.",
    check_specs=[
        dg.AssetCheckSpec(
            "every_imaging_file_accounted_for",
            asset=KEY,
            description="Imaging files in = accepted + rejected with a reason.",
        ),
        dg.AssetCheckSpec(
            "imaging_files_accepted",
            asset=KEY,
            description="No imaging file of the batch was rejected (WARN: a rejected file is quarantined with "
            "its reason; the batch's other files and sources proceed). Optional source: a batch without "
            "imaging passes.",
        ),
    ],
)
def raw_imaging(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
    lines: list[str] = []
    outcomes = {b: _batch(zones, b, lines) for b in context.partition_keys}
    log_batches(context, lines)
    return batch_result(context, outcomes)
