"""Reading and validating landing-zone exports, one source at a time.

Whole-file problems (unreadable, missing columns) raise :class:`FileRejected` with a reason code and a
PHI-free detail; the caller quarantines the file. Row problems never raise: each bad row goes to the rejects
table with a reason, so that for every file ``rows_in == rows_accepted + rows_rejected``.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pandera.polars as pa
import polars as pl

from clinical_ml.core.units import LAB_CODES, PLAUSIBLE_RANGES, UNIT_CONVERSIONS, VITAL_CODES, canonical_unit

TS = pl.Datetime("us")

# source -> column -> polars dtype after parsing. Every column listed is required.
SOURCE_COLUMNS: dict[str, dict[str, pl.DataType]] = {
    "patients": {
        "mrn": pl.String(),
        "first_name": pl.String(),
        "last_name": pl.String(),
        "birth_date": pl.Date(),
        "sex": pl.String(),
        "race": pl.String(),
        "ethnicity": pl.String(),
        "address": pl.String(),
        "zip": pl.String(),
        "phone": pl.String(),
        "email": pl.String(),
    },
    "encounters": {
        "encounter_id": pl.String(),
        "mrn": pl.String(),
        "admit_time": TS,
        "discharge_time": TS,
        "admission_type": pl.String(),
        "unit": pl.String(),
        "site": pl.String(),
        "discharge_disposition": pl.String(),
        "death_time": TS,
    },
    "labs": {
        "encounter_id": pl.String(),
        "loinc_code": pl.String(),
        "value": pl.Float64(),
        "unit": pl.String(),
        "specimen_time": TS,
        "result_time": TS,
    },
    "vitals": {
        "encounter_id": pl.String(),
        "code": pl.String(),
        "value": pl.Float64(),
        "unit": pl.String(),
        "charted_time": TS,
        "stored_time": TS,
    },
}
# Columns that may be empty in a valid row.
NULLABLE = {"death_time", "race", "ethnicity", "address", "zip", "phone", "email", "first_name", "last_name"}

SEXES = ["M", "F", "U"]
# pandera check name -> reason code in the rejects table
_CHECK_REASONS = {
    "isin": "not_allowed",
    "not_nullable": "missing_value",
    "str_matches": "bad_format",
    "in_range": "out_of_range",
    "dtype": "wrong_type",
}
ADMISSION_TYPES = ["EMERGENCY", "URGENT", "ELECTIVE"]


def _schema(source: str) -> pa.DataFrameSchema:
    cols = SOURCE_COLUMNS[source]
    checks: dict[str, list[pa.Check]] = {
        "sex": [pa.Check.isin(SEXES)],
        "admission_type": [pa.Check.isin(ADMISSION_TYPES)],
        "mrn": [pa.Check.str_matches(r"^[0-9A-Za-z]{4,20}$")],
        "encounter_id": [pa.Check.str_matches(r"^[0-9A-Za-z\-]{4,32}$")],
        "loinc_code": [pa.Check.isin(list(LAB_CODES))],
        "code": [pa.Check.isin(list(VITAL_CODES))],
    }
    return pa.DataFrameSchema(
        {
            name: pa.Column(dtype, checks=checks.get(name, []), nullable=name in NULLABLE)
            for name, dtype in cols.items()
        },
        strict=False,
        name=f"raw_{source}",
    )


SCHEMAS: dict[str, pa.DataFrameSchema] = {s: _schema(s) for s in SOURCE_COLUMNS}


class FileRejected(Exception):
    """A whole file cannot be read as its source; the detail never contains patient values."""

    def __init__(self, reason_code: str, detail: str) -> None:
        super().__init__(f"{reason_code}: {detail}")
        self.reason_code = reason_code
        self.detail = detail


@dataclass(frozen=True)
class IngestResult:
    """One source file after validation."""

    source: str
    accepted: pl.DataFrame
    rejects: pl.DataFrame  # row_number (1-based data row), reason: never a value
    rows_in: int
    sha256: str
    n_bytes: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rows_accepted(self) -> int:
        return self.accepted.height

    @property
    def rows_rejected(self) -> int:
        return self.rejects.height


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_text_table(path: Path) -> pl.DataFrame:
    try:
        if path.suffix == ".parquet":
            df = pl.read_parquet(path)
            return df.select(pl.all().cast(pl.String))
        return pl.read_csv(path, infer_schema=False, encoding="utf8", null_values=[""])
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError, OSError, UnicodeDecodeError) as exc:
        raise FileRejected(
            "unreadable", f"{path.suffix or 'file'} could not be parsed: {type(exc).__name__}"
        ) from None


def _parse(df: pl.DataFrame, source: str) -> pl.DataFrame:
    exprs = []
    for name, dtype in SOURCE_COLUMNS[source].items():
        col = pl.col(name).str.strip_chars()
        if dtype == TS:
            exprs.append(col.str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us").alias(name))
        elif dtype == pl.Date():
            exprs.append(col.str.to_date("%Y-%m-%d", strict=False).alias(name))
        elif dtype == pl.Float64():
            exprs.append(col.cast(pl.Float64, strict=False).alias(name))
        else:
            exprs.append(col.alias(name))
    extra = [c for c in df.columns if c not in SOURCE_COLUMNS[source]]
    return df.select(*exprs, *extra)


def _unparseable(raw: pl.DataFrame, parsed: pl.DataFrame, source: str) -> pl.DataFrame:
    """Rows where a non-empty delivered value did not parse into its type."""
    reasons = []
    for name, dtype in SOURCE_COLUMNS[source].items():
        if dtype == pl.String():
            continue
        bad = raw[name].is_not_null() & (raw[name].str.strip_chars() != "") & parsed[name].is_null()
        reasons.append(pl.when(pl.Series(bad)).then(pl.lit(f"unparseable_{name}")).otherwise(None))
    if not reasons:
        return pl.DataFrame(schema={"row_number": pl.Int64, "reason": pl.String})
    return (
        pl.DataFrame({"row_number": range(1, raw.height + 1)})
        .with_columns(pl.coalesce(reasons).alias("reason"))
        .filter(pl.col("reason").is_not_null())
    )


def _harmonize_units(df: pl.DataFrame, code_col: str) -> pl.DataFrame:
    """Convert known unit variants into canonical units, keeping the delivered value and unit."""
    canonical = {c: canonical_unit(c) for c in [*LAB_CODES, *VITAL_CODES]}
    value = pl.col("value_raw")
    for (code, unit), fn in UNIT_CONVERSIONS.items():
        # The conversions are affine, so mapping the column through fn on a polars expression is exact.
        value = (
            pl.when((pl.col(code_col) == code) & (pl.col("unit_raw") == unit))
            .then(fn(pl.col("value_raw")))  # type: ignore[arg-type]
            .otherwise(value)
        )
    out = df.rename({"value": "value_raw", "unit": "unit_raw"}).with_columns(
        pl.col(code_col).replace_strict(canonical, default=None).alias("unit")
    )
    known = pl.lit(False)
    for code, unit in UNIT_CONVERSIONS:
        known = known | ((pl.col(code_col) == code) & (pl.col("unit_raw") == unit))
    out = out.with_columns(
        (known | (pl.col("unit_raw") == pl.col("unit"))).alias("unit_known"),
        value.alias("value"),
    )
    lo = pl.col(code_col).replace_strict({k: v[0] for k, v in PLAUSIBLE_RANGES.items()}, default=None)
    hi = pl.col(code_col).replace_strict({k: v[1] for k, v in PLAUSIBLE_RANGES.items()}, default=None)
    return out.with_columns(
        ((pl.col("value") < lo) | (pl.col("value") > hi)).fill_null(False).alias("implausible")
    )


def _row_rules(df: pl.DataFrame, source: str) -> pl.Expr | None:
    """Row-level rules beyond the schema, as one reason expression (first failing rule wins)."""
    rules: list[tuple[pl.Expr, str]] = []
    if source == "encounters":
        rules = [
            (pl.col("discharge_time") < pl.col("admit_time"), "discharge_before_admission"),
            (pl.col("death_time") < pl.col("admit_time"), "death_before_admission"),
        ]
    elif source == "labs":
        rules = [
            (~pl.col("unit_known"), "unknown_unit"),
            (pl.col("result_time") < pl.col("specimen_time"), "result_before_specimen"),
        ]
    elif source == "vitals":
        rules = [
            (~pl.col("unit_known"), "unknown_unit"),
            (pl.col("stored_time") < pl.col("charted_time"), "stored_before_charted"),
        ]
    if not rules:
        return None
    expr = pl.lit(None, dtype=pl.String)
    for cond, reason in reversed(rules):
        expr = pl.when(cond.fill_null(False)).then(pl.lit(reason)).otherwise(expr)
    return expr


def ingest_file(path: Path | str, source: str) -> IngestResult:
    """Read, parse, validate and harmonize one delivered file of ``source``.

    Parameters
    ----------
    path
        A CSV or Parquet file in the landing contract.
    source
        One of ``patients``, ``encounters``, ``labs``, ``vitals``.

    Returns
    -------
    IngestResult
        Accepted rows (with ``row_number`` of the delivered file) and rejects with reasons.

    Raises
    ------
    FileRejected
        When the file as a whole cannot be used (unreadable, missing required columns, no rows).
    """
    p = Path(path)
    if source not in SOURCE_COLUMNS:
        raise ValueError(f"unknown source {source!r}")
    raw = _read_text_table(p)
    missing = [c for c in SOURCE_COLUMNS[source] if c not in raw.columns]
    if missing:
        raise FileRejected("missing_columns", f"required columns absent: {missing}")
    if raw.height == 0:
        raise FileRejected("empty_file", "the file has a header and no rows")
    parsed = _parse(raw, source).with_columns(pl.int_range(1, raw.height + 1).alias("row_number"))
    reject_parts = [_unparseable(raw, parsed, source)]

    if source in ("labs", "vitals"):
        parsed = _harmonize_units(parsed, "loinc_code" if source == "labs" else "code")
    try:
        SCHEMAS[source].validate(parsed, lazy=True)
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases.filter(pl.col("index").is_not_null())
        reject_parts.append(
            fc.select(
                (pl.col("index").cast(pl.Int64) + 1).alias("row_number"),
                pl.format(
                    "{}:{}",
                    pl.col("check")
                    .str.replace(r"\(.*", "")
                    .replace_strict(_CHECK_REASONS, default="invalid"),
                    pl.col("column"),
                ).alias("reason"),
            )
        )
    rule = _row_rules(parsed, source)
    if rule is not None:
        reject_parts.append(
            parsed.select("row_number", rule.alias("reason")).filter(pl.col("reason").is_not_null())
        )
    rejects = (
        pl.concat([r.select(pl.col("row_number").cast(pl.Int64), "reason") for r in reject_parts])
        .sort("row_number", maintain_order=True)
        .unique("row_number", keep="first", maintain_order=True)
    )
    accepted = parsed.join(rejects.select("row_number"), on="row_number", how="anti")
    by_reason = dict(rejects.group_by("reason").len().sort("reason").iter_rows())
    return IngestResult(
        source=source,
        accepted=accepted,
        rejects=rejects,
        rows_in=raw.height,
        sha256=file_sha256(p),
        n_bytes=p.stat().st_size,
        rejected_by_reason={str(k): int(v) for k, v in by_reason.items()},
    )
