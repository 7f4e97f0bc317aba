import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from clinical_ml.core.ingestion import SCHEMAS, SOURCE_COLUMNS, FileRejected, IngestResult, ingest_file
from clinical_ml.core.storage import write_json, write_parquet
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, batch_partitions, tags
from clinical_ml.resources.zones import DataZones

SOURCE_DESCRIPTIONS = {
    "patients": "EHR demographics as delivered (identifiers included), validated.",
    "encounters": "EHR admissions, discharges and transfers as delivered, validated.",
    "labs": "Lab system results with LOINC codes, units harmonized (delivered value and unit kept).",
    "vitals": "ICU monitoring in long format, units harmonized (delivered value and unit kept).",
}


def landing_file(zones: DataZones, batch_id: str, source: str) -> Path:
    for ext in (".csv", ".parquet"):
        p = zones.landing / batch_id / f"{source}{ext}"
        if p.exists():
            return p
    raise FileNotFoundError(f"batch {batch_id} has no {source} file (.csv or .parquet)")


def _quarantine(zones: DataZones, path: Path, batch_id: str, source: str, exc: FileRejected) -> Path:
    dest = zones.quarantine / batch_id / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, dest)
    write_json(
        {
            "batch_id": batch_id,
            "source": source,
            "file": path.name,
            "reason_code": exc.reason_code,
            "detail": exc.detail,
        },
        dest.with_name(dest.name + ".reason.json"),
    )
    return dest


def _archive(zones: DataZones, path: Path, sha256: str) -> Path:
    dest = zones.archive / "files" / f"{sha256}{path.suffix}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        dest.chmod(0o444)
    return dest


def _column_schema(df: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in df.schema.items()])


def _schema_check(source: str, result: IngestResult, written: Path) -> dg.AssetCheckResult:
    reread = pl.read_parquet(written)
    schema_ok = True
    try:
        SCHEMAS[source].validate(reread, lazy=True)
    except Exception:
        schema_ok = False
    accounted = result.rows_in == result.rows_accepted + result.rows_rejected
    return dg.AssetCheckResult(
        check_name="matches_source_schema",
        passed=schema_ok and accounted,
        metadata={
            "schema_valid": schema_ok,
            "rows_accounted": accounted,
            "rows_in": result.rows_in,
            "rows_accepted": result.rows_accepted,
            "rows_rejected": result.rows_rejected,
        },
    )


def build_raw_asset(source: str) -> dg.AssetsDefinition:
    key = dg.AssetKey(f"raw_{source}")

    @dg.asset(
        key=key,
        group_name=Stage.INGESTION,
        partitions_def=batch_partitions,
        kinds={"polars", "parquet"},
        owners=ML_OWNERS,
        tags=tags(DataClass.PHI),
        description=SOURCE_DESCRIPTIONS[source],
        check_specs=[
            dg.AssetCheckSpec(
                "matches_source_schema",
                asset=key,
                description="Accepted rows re-validate against the pandera schema and rows in = accepted + rejected.",
            )
        ],
    )
    def _raw(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        batch_id = context.partition_key
        path = landing_file(zones, batch_id, source)
        try:
            result = ingest_file(path, source)
        except FileRejected as exc:
            dest = _quarantine(zones, path, batch_id, source, exc)
            raise dg.Failure(
                description=f"The {source} file of batch {batch_id} was quarantined ({exc.reason_code}): {exc.detail}",
                metadata={
                    "reason_code": exc.reason_code,
                    "quarantined_as": str(dest.relative_to(zones.quarantine)),
                },
            ) from None
        out = write_parquet(result.accepted, zones.phi / "raw" / source / f"{batch_id}.parquet")
        write_parquet(result.rejects, zones.phi / "rejects" / source / f"{batch_id}.parquet")
        archived = _archive(zones, path, result.sha256)
        ledger = {
            "source": source,
            "batch_id": batch_id,
            "file": path.name,
            "sha256": result.sha256,
            "bytes": result.n_bytes,
            "rows_in": result.rows_in,
            "rows_accepted": result.rows_accepted,
            "rows_rejected": result.rows_rejected,
            "rejected_by_reason": result.rejected_by_reason,
            "status": "accepted",
        }
        write_json(ledger, zones.archive / "ledger" / batch_id / f"{source}.json")
        context.log.info(
            f"{source} batch {batch_id}: {result.rows_in} rows in, {result.rows_accepted} accepted, "
            f"{result.rows_rejected} rejected"
        )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.rows_accepted,
                "dagster/column_schema": _column_schema(result.accepted.head(0)),
                "rows_in": result.rows_in,
                "rows_rejected": result.rows_rejected,
                "rejected_by_reason": dg.MetadataValue.json(result.rejected_by_reason),
                "sha256": result.sha256,
                "archived_as": str(archived.relative_to(zones.archive)),
                "path": str(out.relative_to(zones.phi)),
            },
            data_version=dg.DataVersion(result.sha256),
            check_results=[_schema_check(source, result, out)],
        )

    return _raw


raw_assets = [build_raw_asset(s) for s in SOURCE_COLUMNS]
