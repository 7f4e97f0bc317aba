from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from clinical_ml.core.clinical_sources import DESCRIPTIONS
from clinical_ml.core.delivery import (
    UPSTREAM,
    FileOutcome,
    ZonePaths,
    batch_context,
    batch_site_mapping,
    process_file,
    read_ledger_entry,
    rejects_path,
    replacement_entries,
)
from clinical_ml.core.ingestion import SOURCE_COLUMNS, schema_for
from clinical_ml.core.landing import (
    IMAGING_SOURCE,
    OPTIONAL_SOURCES,
    fingerprint,
    read_batch,
    read_unmarked_batch,
)
from clinical_ml.core.ledger import record_batch
from clinical_ml.core.safety import Limits
from clinical_ml.core.site_mapping import CODED_FIELDS, SiteMapping, unmapped_shares
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, batch_partitions, tags
from clinical_ml.defs.ingestion.imaging import raw_imaging
from clinical_ml.defs.ingestion.ranges import BATCH_BACKFILL_POLICY, BatchOutcome, batch_result, log_batches
from clinical_ml.resources.zones import DataZones

SOURCE_DESCRIPTIONS = {
    "patients": "EHR demographics as delivered (identifiers included), validated.",
    "encounters": "EHR admissions, discharges and transfers as delivered, validated against the batch's patients.",
    "labs": "Lab system results with LOINC codes, units harmonized (delivered value and unit kept), validated "
    "against the batch's encounters (no result before birth or after death/discharge).",
    "vitals": "ICU monitoring in long format, units harmonized (delivered value and unit kept), validated against "
    "the batch's encounters.",
    "labels": "Hospital-supplied labels (e.g. from chart review), optional: a coded label name and a yes/no value "
    "per encounter, validated against the encounters of the batch and of earlier batches; the latest review of "
    "an encounter and label wins.",
} | DESCRIPTIONS
# outcome statuses that need no attention: an optional source may be left out of a batch
FINE = ("accepted", "not_delivered")
LEDGER_POOL = "landing_ledger"


def zone_paths(zones: DataZones) -> ZonePaths:
    return ZonePaths(landing=zones.landing, archive=zones.archive, quarantine=zones.quarantine, phi=zones.phi)


def limits_of(zones: DataZones) -> Limits:
    return Limits(
        max_file_bytes=zones.max_file_bytes,
        max_uncompressed_bytes=zones.max_zip_uncompressed_bytes,
        max_zip_ratio=zones.max_zip_ratio,
    )


def _column_schema(df: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in df.schema.items()])


def _coded_values_check(outcome: FileOutcome, max_share: float) -> dg.AssetCheckResult:
    """WARN when the mapping left more than ``max_share`` of a coded field ``unmapped`` or sent it to
    Other/Unknown: counts per field only; the values themselves are in the phi zone's list."""
    shares = unmapped_shares(outcome.warnings, outcome.rows_accepted)
    over = sorted(f for f, share in shares.items() if share > max_share)
    counts = {k: v for k, v in outcome.warnings.items() if k.startswith(("unmapped:", "mapped_to_other:"))}
    return dg.AssetCheckResult(
        check_name="coded_values_mapped",
        passed=not over,
        severity=dg.AssetCheckSeverity.WARN,
        description=None
        if not over
        else f"the site mapping '{outcome.site_mapping}' leaves more than {max_share:.0%} of {', '.join(over)} "
        "unmapped or sends it to Other/Unknown; the delivered values are listed for the data steward in the "
        f"phi zone (phi/{outcome.unmapped_values_path or 'unmapped'}). Extend the site mapping.",
        metadata={
            "site_mapping": outcome.site_mapping,
            "max_share": max_share,
            "share_by_field": dg.MetadataValue.json({f: round(v, 4) for f, v in sorted(shares.items())}),
            "rows_by_field": dg.MetadataValue.json(counts),
            "unmapped_values_path": outcome.unmapped_values_path,
        },
    )


def _checks(
    source: str, outcome: FileOutcome, accepted: pl.DataFrame, mapping: SiteMapping, max_unmapped_share: float
) -> list[dg.AssetCheckResult]:
    schema_ok = True
    try:
        schema_for(source, mapping).validate(accepted.select(*SOURCE_COLUMNS[source]), lazy=True)
    except Exception:
        schema_ok = False
    coded = [_coded_values_check(outcome, max_unmapped_share)] if source in CODED_FIELDS else []
    return [
        *coded,
        dg.AssetCheckResult(
            check_name="matches_source_schema",
            passed=schema_ok and outcome.accounted,
            metadata={
                "schema_valid": schema_ok,
                "rows_accounted": outcome.accounted,
                "rows_in": outcome.rows_in,
                "rows_accepted": outcome.rows_accepted,
                "rows_rejected": outcome.rows_rejected,
            },
        ),
        dg.AssetCheckResult(
            check_name="delivered_file_accepted",
            passed=outcome.status in FINE,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if outcome.status in FINE
            else f"{source} file of batch {outcome.batch_id} {outcome.status} ({outcome.reason_code}): "
            f"{outcome.detail}",
            metadata={
                "status": outcome.status,
                "reason_code": outcome.reason_code or "",
                "line": outcome.line if outcome.line is not None else -1,
                "byte_offset": outcome.byte_offset if outcome.byte_offset is not None else -1,
                "quarantined_as": outcome.quarantined_as or "",
            },
        ),
    ]


def build_raw_asset(source: str) -> dg.AssetsDefinition:
    key = dg.AssetKey(f"raw_{source}")

    @dg.asset(
        key=key,
        deps=[f"raw_{u}" for u in UPSTREAM[source]],
        group_name=Stage.INGESTION,
        partitions_def=batch_partitions,
        backfill_policy=BATCH_BACKFILL_POLICY,
        kinds={"polars", "parquet"},
        owners=ML_OWNERS,
        tags=tags(DataClass.PHI),
        description=SOURCE_DESCRIPTIONS[source],
        check_specs=[
            dg.AssetCheckSpec(
                "matches_source_schema",
                asset=key,
                description="Accepted rows re-validate against the pandera schema and rows in = accepted + rejected.",
            ),
            dg.AssetCheckSpec(
                "delivered_file_accepted",
                asset=key,
                description="The batch delivered this source and the file was accepted (not quarantined, missing "
                "or a duplicate). Not blocking: the other sources of the batch proceed; this one is empty."
                + (" Optional source: a batch without it passes." if source in OPTIONAL_SOURCES else ""),
            ),
            *(
                [
                    dg.AssetCheckSpec(
                        "coded_values_mapped",
                        asset=key,
                        description="The site mapping maps the coded fields (sex, race, ethnicity, admission "
                        "type, unit, site, discharge disposition): WARN when more than max_unmapped_share of a "
                        "field is unmapped or sent to Other/Unknown by the mapping. Counts only; the unmapped "
                        "values are listed in the phi zone (phi/unmapped/<source>/<batch>.parquet).",
                    )
                ]
                if source in CODED_FIELDS
                else []
            ),
        ],
    )
    def _raw(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        lines: list[str] = []
        outcomes = {b: _ingest(context, zones, b, lines) for b in context.partition_keys}
        log_batches(context, lines)
        return batch_result(context, outcomes)

    def _ingest(
        context: dg.AssetExecutionContext, zones: DataZones, batch_id: str, lines: list[str]
    ) -> BatchOutcome:
        paths = zone_paths(zones)
        mapping = batch_site_mapping(paths, batch_id, folder=zones.site_mappings_dir)
        batch, upstream_versions = batch_context(paths, source, batch_id)
        outcome, accepted = process_file(
            zones=paths,
            batch_id=batch_id,
            source=source,
            batch=batch,
            upstream_versions=upstream_versions,
            limits=limits_of(zones),
            mapping=mapping,
        )
        if outcome.status == "accepted":
            lines.append(
                f"{source} batch {batch_id}: {outcome.rows_in} rows in, {outcome.rows_accepted} accepted, "
                f"{outcome.rows_rejected} rejected (site mapping {mapping.name})"
            )
        elif outcome.status == "not_delivered":
            lines.append(f"{source} batch {batch_id}: not delivered (optional)")
        else:
            context.log.error(
                f"{source} file of batch {batch_id} {outcome.status} ({outcome.reason_code}): {outcome.detail}"
                + (f"; line {outcome.line}" if outcome.line is not None else "")
                + (f"; byte offset {outcome.byte_offset}" if outcome.byte_offset is not None else "")
                + ". The other sources of the batch proceed; this source is empty for the batch."
            )
        metadata: dict[str, Any] = {
            "dagster/row_count": outcome.rows_accepted,
            "dagster/column_schema": _column_schema(accepted.head(0)),
            "status": outcome.status,
            "rows_in": outcome.rows_in,
            "rows_rejected": outcome.rows_rejected,
            "rejected_by_reason": dg.MetadataValue.json(outcome.rejected_by_reason),
            "warnings": dg.MetadataValue.json(outcome.warnings),
            "sha256": outcome.sha256 or "",
            "path": outcome.accepted_path,
            "site_mapping": outcome.site_mapping,
        }
        # where the data steward finds the unmapped values; the page itself shows counts only
        if outcome.unmapped_values_path:
            metadata["unmapped_values_path"] = outcome.unmapped_values_path
        if outcome.archived_as:
            metadata["archived_as"] = outcome.archived_as
        if outcome.reason_code:
            metadata["reason_code"] = outcome.reason_code
        if outcome.quarantined_as:
            metadata["quarantined_as"] = outcome.quarantined_as
        return BatchOutcome(
            metadata=metadata,
            checks=_checks(source, outcome, accepted, mapping, zones.max_unmapped_share),
            data_version=outcome.data_version,
        )

    return _raw


raw_assets = [build_raw_asset(s) for s in SOURCE_COLUMNS] + [raw_imaging]


def _batch_problems(zones: DataZones, batch_id: str) -> list[dict]:
    """Ledger entries for folder entries that were never read (odd names, symlinks, unlisted files)."""
    batch_dir = Path(zones.landing) / batch_id
    b = read_batch(batch_dir)
    if b is None:
        b, _ = read_unmarked_batch(batch_dir, previous_fingerprint=fingerprint(batch_dir)[0], quiet_seconds=0)
    problems = b.problems if b is not None else ()
    return [
        {
            "batch_id": batch_id,
            "source": "unrecognized",
            "sha256": f"entry-{i}",
            "status": "rejected",
            "reason_code": code,
            "rows_in": 0,
            "rows_accepted": 0,
            "rows_rejected": 0,
        }
        for i, code in enumerate(problems)
    ]


@dg.asset(
    deps=[a.key for a in raw_assets],
    group_name=Stage.INGESTION,
    partitions_def=batch_partitions,
    backfill_policy=BATCH_BACKFILL_POLICY,
    kinds={"duckdb"},
    owners=ML_OWNERS,
    tags=tags(DataClass.AGGREGATE),
    pool=LEDGER_POOL,
    description="The landing ledger in DuckDB (archive/ledger.duckdb): one row per delivered file (source, batch, "
    "sha256, size, rows in/accepted/rejected by reason, status; the imaging folder is one row whose rows are "
    "its files) and the row-level rejects with reasons. No values. One writer at a time (pool landing_ledger).",
    check_specs=[
        dg.AssetCheckSpec(
            "every_row_accounted_for",
            asset="landing_ledger",
            description="For every file of the batch: rows in = rows accepted + rows rejected with a reason.",
        )
    ],
)
def landing_ledger(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
    return batch_result(context, {b: _ledger_batch(zones, b) for b in context.partition_keys})


def _ledger_batch(zones: DataZones, batch_id: str) -> BatchOutcome:
    paths = zone_paths(zones)
    sources = [*SOURCE_COLUMNS, IMAGING_SOURCE]
    entries = [e for s in sources if (e := read_ledger_entry(paths, batch_id, s)) is not None]
    rejects = {}
    for e in entries:
        p = rejects_path(paths, e["source"], batch_id)
        if p.exists():
            rejects[(e["source"], e.get("sha256") or "")] = pl.read_parquet(p)
    problems = _batch_problems(zones, batch_id)
    refused = replacement_entries(paths, batch_id)  # replacements that would have dropped accepted rows
    record_batch(paths.archive / "ledger.duckdb", entries + problems + refused, rejects)
    unaccounted = [e["source"] for e in entries if e["rows_in"] != e["rows_accepted"] + e["rows_rejected"]]
    statuses = {e["source"]: e["status"] for e in entries}
    return BatchOutcome(
        metadata={
            "files": len(entries),
            "statuses": dg.MetadataValue.json(statuses),
            "entries_not_read": len(problems),
            "replacements_refused": len(refused),
            "rows_in": sum(e["rows_in"] for e in entries),
            "rows_accepted": sum(e["rows_accepted"] for e in entries),
            "rows_rejected": sum(e["rows_rejected"] for e in entries),
            "path": "ledger.duckdb",
        },
        checks=[
            dg.AssetCheckResult(
                check_name="every_row_accounted_for",
                passed=not unaccounted,
                metadata={"sources_unaccounted": dg.MetadataValue.json(unaccounted)},
            )
        ],
    )


# build.py (not owned by ingestion) registers `raw_assets`; the ledger travels with them.
raw_assets = [*raw_assets, landing_ledger]
