"""Reading and validating landing-zone exports, one source at a time.

Whole-file problems (unreadable, wrong encoding, missing columns, truncated) raise :class:`FileRejected`
with a reason code, counts and a line number or byte offset; the caller quarantines the file. Row problems
never raise: each bad row goes to the rejects table with one reason, so that for every file
``rows_in == rows_accepted + rows_rejected``. No message ever carries a delivered value.

Row reasons (first matching wins, in this order): ``wrong_field_count``, ``repeated_header``,
``missing_value_sentinel:<col>``, ``ambiguous_date:<col>``, ``unparseable_<col>``,
``id_scientific_notation:<col>``, ``id_decimal_suffix:<col>``, ``id_leading_zeros_lost:<col>``,
``future_date:<col>``, ``implausible_birth_date`` (more than :data:`MAX_AGE_YEARS` before ingestion), source rules
(``discharge_before_admission``, ``death_before_admission``, ``unknown_unit``, ``result_before_specimen``,
``stored_before_charted``, ``recorded_before_event``), cross-file rules against the batch (``unknown_patient``, ``unknown_encounter``,
``event_before_birth``, ``event_after_death``, ``event_after_discharge``), pandera schema reasons
(``missing_value:<col>``, ``not_allowed:<col>``, ``bad_format:<col>``), ``superseded`` (labels only: a
later ``recorded_time`` of the same encounter and label is in the file), ``conflicting_case_variant:<id>``
(patients and encounters: an MRN or encounter id repeated in another letter case with other facts),
``conflicting_duplicate``,
``duplicate_row`` and ``undeclared_unit_switch``.

The optional ``labels`` source (hospital-supplied labels, e.g. from chart review) may name an encounter
delivered in an earlier batch: it is looked up in the batch's encounters, then in the encounters accepted in
the earlier batches (:attr:`BatchContext.earlier_encounters`), and the patient found is kept with the accepted
row (``mrn``) for the anonymizer.

A site mapping (:mod:`clinical_ml.core.site_mapping`) is applied on the way in: delivered headers renamed onto
the contract's columns, local lab and vital codes onto vocabulary codes, the site's spellings of measurement
units onto units of the vocabulary (``measurement_units``), and the coded fields (sex, race,
ethnicity, admission type, unit, site, discharge disposition) recoded onto controlled values; a value no
mapping names becomes ``unmapped`` (the row is kept, the delivered text stays beside it in
``<field>_delivered``, phi zone only) and is counted (``unmapped:<field>`` among the warnings). A delivered
column the contract does not know is kept under its position (``extra_<n>``), never under its header, which
can hold anything (a patient's name); only the few names of :data:`KNOWN_EXTRA_COLUMNS` are kept as they are.
A mapping may declare the site's clock skew for ``stored_before_charted`` and ``result_before_specimen``
(``clock_skew_minutes``, default 0): a row whose availability time precedes its event time by no more is
accepted with the event time as its availability time and counted (``<rule>_tolerated`` among the warnings).
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandera.polars as pa
import polars as pl

from clinical_ml.core import clinical_sources
from clinical_ml.core.pseudonyms import normalize_identifier
from clinical_ml.core.safety import (
    FORMULA_START,
    PARQUET_MAGIC,
    BackgroundScan,
    FileRejected,
    Limits,
    check_size,
    field_count_problems,
    first_invalid_utf8,
    first_malformed_line,
    header_names,
    safe_column_label,
    sniff_text,
)
from clinical_ml.core.site_mapping import (
    CODED_FIELDS,
    SiteMapping,
    delivered,
    load_site_mapping,
    map_coded_values,
    site_mappings_dir,
    unmapped_counts,
)
from clinical_ml.core.storage import sha256_file
from clinical_ml.core.units import (
    LAB_CODES,
    MISSING_NUMERIC_SENTINELS,
    MISSING_TEXT_SENTINELS,
    PLAUSIBLE_RANGES,
    TYPICAL_MEDIAN_RANGES,
    UNIT_CONVERSIONS,
    VITAL_CODES,
    canonical_unit,
)

__all__ = ["SCHEMAS", "SOURCE_COLUMNS", "BatchContext", "FileRejected", "IngestResult", "ingest_file"]

TS = pl.Datetime("us")
TS_FORMAT = "%Y-%m-%d %H:%M:%S"
DATE_FORMAT = "%Y-%m-%d"
# Bumped whenever a rule changes what is accepted, so data versions change with it.
RULES_VERSION = "6"

# source -> column -> polars dtype after parsing. Every column listed is required but OPTIONAL_COLUMNS.
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
        "payer": pl.String(),
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
    # Optional: a hospital-supplied label of an encounter (this batch's or an earlier one's).
    "labels": {
        "encounter_id": pl.String(),
        "label": pl.String(),
        "value": pl.Boolean(),
        "event_time": TS,
        "recorded_time": TS,
    },
}
# A label's name is a code of the hospital's own vocabulary, never free text (it crosses the boundary as
# ``LABEL//<name>``): anything else rejects the row.
LABEL_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
# Delivered text of a boolean column (compared in lower case).
BOOLEAN_TEXT = {"1": True, "0": False, "true": True, "false": False}
# The patient of a label's encounter, resolved at validation and kept with the accepted row (phi zone only).
LABEL_PATIENT = "mrn"
# Columns a file may leave out (they are then read as empty): fields many exports do not have.
OPTIONAL_COLUMNS: dict[str, frozenset[str]] = {"encounters": frozenset({"payer"})}
# Columns that may be empty in a valid row.
NULLABLE = {
    "event_time",
    "death_time",
    "payer",
    "race",
    "ethnicity",
    "address",
    "zip",
    "phone",
    "email",
    "first_name",
    "last_name",
}
# Identifier columns: checked for spreadsheet mangling.
ID_COLUMNS = {"mrn", "encounter_id"}
# Free-text columns of the contract (no allowed-values check): checked for formulas and markup, as are extras.
FREE_TEXT = {
    "first_name",
    "last_name",
    "race",
    "ethnicity",
    "address",
    "zip",
    "phone",
    "email",
    "unit",
    "site",
    "discharge_disposition",
    "payer",
}
# Rows sharing these keys are duplicates (identical) or conflicting duplicates (differing).
DUPLICATE_KEYS = {
    "patients": ["mrn"],
    "encounters": ["encounter_id"],
    "labs": ["encounter_id", "loinc_code", "specimen_time"],
    "vitals": ["encounter_id", "code", "charted_time"],
    "labels": ["encounter_id", "label"],
}
# Sources whose keys may be delivered again with a later revision: of the rows of a key, those before the
# latest value of this column are ``superseded``; only rows at the latest one are compared as duplicates.
REVISION_COLUMN = {"labels": "recorded_time"}
# The time of an event used for the temporal checks against its encounter.
EVENT_TIME = {"labs": "specimen_time", "vitals": "charted_time"}
CODE_COLUMN = {"labs": "loinc_code", "vitals": "code"}
# Medications, diagnoses, procedures and device vitals: their tables and rules live in their own module.
clinical_sources.register(
    source_columns=SOURCE_COLUMNS,
    nullable=NULLABLE,
    duplicate_keys=DUPLICATE_KEYS,
    event_time=EVENT_TIME,
    code_column=CODE_COLUMN,
)
DERIVED_COLUMNS: dict[str, pl.DataType] = {
    "value_raw": pl.Float64(),
    "unit_raw": pl.String(),
    "unit_known": pl.Boolean(),
    "implausible": pl.Boolean(),
}

# Extra column names that say nothing about a patient and name what they hold in the privacy report; any
# other extra header is replaced by its position (``extra_<n>``).
KNOWN_EXTRA_COLUMNS = frozenset({"note", "notes", "comment", "comments", "free_text", "ssn"})
DEFAULT_ID_PATTERNS = {"mrn": r"^[0-9A-Za-z]{4,20}$", "encounter_id": r"^[0-9A-Za-z\-]{4,32}$"}
# pandera check name -> reason code in the rejects table
_CHECK_REASONS = {
    "isin": "not_allowed",
    "not_nullable": "missing_value",
    "str_matches": "bad_format",
    "in_range": "out_of_range",
    "dtype": "wrong_type",
}
_MARKUP = r"(?i)<\s*/?\s*(script|iframe|img|svg|a|object|embed|style|html|body|meta|link)\b|javascript:|\bon[a-z]+\s*="
_AMBIGUOUS_DATE = r"^\s*\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}"
# Events may be charted a little after the recorded discharge or death (documentation lag).
EVENT_GRACE = timedelta(hours=1)
MIN_ROWS_FOR_MEDIAN_CHECK = 10
# A birth date more than this many years before ingestion is not plausible (the oldest people live ~120 y).
MAX_AGE_YEARS = 120


def _schema(source: str, mapping: SiteMapping) -> pa.DataFrameSchema:
    cols = SOURCE_COLUMNS[source]
    ids = DEFAULT_ID_PATTERNS | dict(mapping.id_patterns)
    checks: dict[str, list[pa.Check]] = {
        "mrn": [pa.Check.str_matches(ids["mrn"])],
        "encounter_id": [pa.Check.str_matches(ids["encounter_id"])],
        "loinc_code": [pa.Check.isin(list(LAB_CODES))],
        "code": [pa.Check.isin(list(VITAL_CODES))],
        "label": [pa.Check.str_matches(LABEL_NAME_PATTERN)],
    } | clinical_sources.column_checks()
    for coded in CODED_FIELDS.get(source, ()):
        # the mapping's controlled values, or unmapped: never delivered text
        checks[coded] = [pa.Check.isin([*sorted(mapping.allowed(coded)), "unmapped"])]
    return pa.DataFrameSchema(
        {
            name: pa.Column(dtype, checks=checks.get(name, []), nullable=name in NULLABLE)
            for name, dtype in cols.items()
        },
        strict=False,
        name=f"raw_{source}",
    )


_DEFAULT_MAPPINGS: dict[Path, SiteMapping] = {}
_SCHEMAS: dict[tuple[str, str], pa.DataFrameSchema] = {}


def default_site_mapping() -> SiteMapping:
    """The ``default`` mapping of the configured mapping folder (read once per folder)."""
    folder = site_mappings_dir()
    if folder not in _DEFAULT_MAPPINGS:
        _DEFAULT_MAPPINGS[folder] = load_site_mapping(folder=folder)
    return _DEFAULT_MAPPINGS[folder]


def schema_for(source: str, mapping: SiteMapping | None = None) -> pa.DataFrameSchema:
    """The pandera schema of ``source`` under a site mapping (its controlled values and id patterns)."""
    mapping = mapping or default_site_mapping()
    key = (source, mapping.digest())
    if key not in _SCHEMAS:
        _SCHEMAS[key] = _schema(source, mapping)
    return _SCHEMAS[key]


SCHEMAS: dict[str, pa.DataFrameSchema] = {s: schema_for(s) for s in SOURCE_COLUMNS}


@dataclass(frozen=True)
class BatchContext:
    """Accepted rows of the batch that other sources are checked against.

    Parameters
    ----------
    patients
        At least ``mrn`` and ``birth_date`` of the batch's accepted patients, or ``None`` when not checked.
    encounters
        At least ``encounter_id``, ``mrn``, ``admit_time``, ``discharge_time``, ``death_time`` and ``site`` of
        the batch's accepted encounters, or ``None`` when not checked.
    earlier_encounters
        ``encounter_id`` and ``mrn`` of the encounters accepted in earlier batches, newest delivery first:
        the encounters a label may name besides the batch's own. ``None`` when not looked up.
    """

    patients: pl.DataFrame | None = None
    encounters: pl.DataFrame | None = None
    earlier_encounters: pl.DataFrame | None = None


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
    warnings: dict[str, int] = field(default_factory=dict)
    unmapped_values: pl.DataFrame | None = None
    """``field``, ``value`` (as delivered: may be PHI, phi zone only), ``rows`` of the coded values no mapping
    names."""

    @property
    def rows_accepted(self) -> int:
        return self.accepted.height

    @property
    def rows_rejected(self) -> int:
        return self.rejects.height


def empty_accepted(source: str) -> pl.DataFrame:
    """The accepted-rows frame of ``source`` with no rows: the contract of ``phi/raw/<source>/*.parquet``
    when a file was quarantined or not delivered."""
    schema: dict[str, pl.DataType] = {}
    for name, dtype in SOURCE_COLUMNS[source].items():
        if source in CODE_COLUMN and name in ("value", "unit"):
            continue
        schema[name] = dtype
    schema["row_number"] = pl.Int64()
    if source in CODE_COLUMN:
        schema["value_raw"] = pl.Float64()
        schema["unit_raw"] = pl.String()
        schema["unit"] = pl.String()
        schema["unit_known"] = pl.Boolean()
        schema["value"] = pl.Float64()
        schema["implausible"] = pl.Boolean()
    if source == "labels":
        schema[LABEL_PATIENT] = pl.String()
    for coded in CODED_FIELDS.get(source, ()):
        schema[delivered(coded)] = pl.String()
    if source == "encounters":
        schema["unit_type"] = pl.String()
    return pl.DataFrame(schema=schema)


def empty_rejects() -> pl.DataFrame:
    return pl.DataFrame(schema={"row_number": pl.Int64, "reason": pl.String})


def _check_columns(columns: list[str], source: str, *, header: list[str] | None = None) -> dict[str, int]:
    """Duplicate, missing and extra columns of ``columns`` (the contract's names of the delivered ``header``)."""
    header = columns if header is None else header
    seen: set[str] = set()
    # Positions, not names: a file without a header has patient values where the names should be.
    dup_positions = [i + 1 for i, c in enumerate(columns) if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    seen = set()
    dup_positions += [i + 1 for i, c in enumerate(header) if c in seen or seen.add(c)]  # type: ignore[func-returns-value]
    dup_positions = sorted(set(dup_positions))
    if dup_positions:
        raise FileRejected(
            "duplicate_columns",
            f"{len(dup_positions)} header field(s) repeat an earlier name, at positions {dup_positions[:20]}",
            line=1,
        )
    missing = [
        c for c in SOURCE_COLUMNS[source] if c not in columns and c not in OPTIONAL_COLUMNS.get(source, ())
    ]
    if missing:
        if len(header) == 1 and any(s in header[0] for s in (";", "\t", "|")):
            raise FileRejected(
                "wrong_delimiter",
                "the header is one field holding ';', tab or '|': not comma-separated",
                line=1,
            )
        raise FileRejected("missing_columns", f"required columns absent: {missing}", line=1)
    extra = [c for c in columns if c not in SOURCE_COLUMNS[source]]
    return {"extra_columns": len(extra)} if extra else {}


def contract_header(columns: list[str], source: str, mapping: SiteMapping) -> list[str]:
    """Delivered headers as the contract names them: renamed by the site mapping (exact, or ignoring case and
    surrounding blanks), contract columns as they are, a known extra name as it is, any other header as its
    position ``extra_<n>`` (1-based): a header can hold anything, and it is never repeated."""
    renames = dict(mapping.columns.get(source, {}))  # type: ignore[call-overload]
    loose = {k.strip().lower(): v for k, v in renames.items()}
    out = []
    for i, name in enumerate(columns):
        target = renames.get(name) or loose.get(name.strip().lower()) or name
        if target not in SOURCE_COLUMNS[source] and target not in KNOWN_EXTRA_COLUMNS:
            target = f"extra_{i + 1}"
        out.append(target)
    return out


# Parquet column types read as text (then parsed like a CSV's); anything else (lists, structs, binary,
# durations, objects) is not a value of the contract.
_TEXT_LIKE = (
    pl.String,
    pl.Categorical,
    pl.Enum,
    pl.Boolean,
    pl.Null,
    pl.Decimal,
    pl.Date,
    pl.Datetime,
    pl.Time,
)
# Text columns whose leading zeros matter: typed as numbers in Parquet, they are gone.
_ZERO_SENSITIVE = ID_COLUMNS | {"zip"}


def _type_name(dtype: pl.DataType) -> str:
    """A dtype's base name (``List``, ``Struct``, ``Int64``), without inner fields (they can be named anything)."""
    return type(dtype).__name__


def _parquet_text(df: pl.DataFrame, source: str, mapping: SiteMapping) -> tuple[pl.DataFrame, dict[str, int]]:
    """A Parquet file's columns (already under contract names) as text, like a CSV's.

    Contract columns of a type that is not a value (lists, structs, binary) refuse the file, as do identifier
    and zip columns typed as numbers (leading zeros lost) and zoned timestamps without the site's time zone.
    Extra columns of such types are emptied with a warning (the original file is archived)."""
    warnings: dict[str, int] = {}
    exprs = []
    for name, dtype in df.schema.items():
        contract = SOURCE_COLUMNS[source].get(name)
        if not (dtype.is_numeric() or isinstance(dtype, _TEXT_LIKE)):
            if contract is None:
                warnings["extra_column_unreadable_type"] = warnings.get("extra_column_unreadable_type", 0) + 1
                exprs.append(pl.lit(None, dtype=pl.String).alias(name))
                continue
            raise FileRejected(
                "wrong_column_type",
                f"column {name} holds {_type_name(dtype)} values; the contract expects {_type_name(contract)}",
            )
        if name in _ZERO_SENSITIVE and contract is not None and dtype.is_numeric():
            raise FileRejected(
                "numeric_identifier",
                f"column {name} is typed {_type_name(dtype)}: leading zeros are lost; deliver it as text",
            )
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
            if mapping.time_zone is None:
                raise FileRejected(
                    "time_zone_undeclared",
                    f"column {name} holds timestamps with a time zone, and the site mapping "
                    f"'{mapping.name}' declares no time_zone to convert them to",
                )
            warnings[f"time_zone_converted:{name}"] = df.height
            col = pl.col(name).dt.convert_time_zone(mapping.time_zone).dt.replace_time_zone(None)
            exprs.append(col.dt.strftime(TS_FORMAT).alias(name))
        elif isinstance(dtype, pl.Datetime):
            exprs.append(pl.col(name).dt.strftime(TS_FORMAT))
        elif isinstance(dtype, pl.Date):
            exprs.append(pl.col(name).dt.strftime(DATE_FORMAT))
        else:
            text = pl.col(name).cast(pl.String)
            exprs.append(pl.when(text == "").then(None).otherwise(text).alias(name))
    return df.select(exprs), warnings


def _read_parquet(path: Path) -> tuple[pl.DataFrame, str]:
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(path.stat().st_size - 4, 0))
        tail = f.read(4)
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise FileRejected(
            "truncated_parquet" if head == PARQUET_MAGIC else "wrong_file_type",
            "the Parquet footer is missing: the file is cut short"
            if head == PARQUET_MAGIC
            else "not a Parquet file",
            byte_offset=path.stat().st_size if head == PARQUET_MAGIC else 0,
        )
    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, ValueError, pl.exceptions.PanicException) as exc:
        # PanicException is a BaseException: a malformed footer can make the decoder panic
        raise FileRejected(
            "unreadable_parquet", f"Parquet could not be decoded ({type(exc).__name__})"
        ) from None
    return df, sha256_file(path)


def _read_csv(
    path: Path, source: str, mapping: SiteMapping
) -> tuple[pl.DataFrame, str, list[int], dict[str, int]]:
    """Text columns of a CSV (under the contract's column names), its sha256, the rows with a wrong field
    count, and warnings."""
    sniff_text(path)
    header = header_names(path)
    columns = contract_header(header, source, mapping)
    warnings = _check_columns(columns, source, header=header)
    with path.open("rb") as f:
        if f.read(3) == b"\xef\xbb\xbf":
            warnings["utf8_bom"] = 1
    scan = BackgroundScan(path)
    try:
        raw = pl.read_csv(path, infer_schema=False, encoding="utf8", truncate_ragged_lines=True)
    except pl.exceptions.NoDataError:
        scan.result()
        raise FileRejected("empty_file", "no header and no rows") from None
    except (pl.exceptions.PolarsError, OSError) as exc:
        scan.result()
        if "utf-8" in str(exc).lower() or "utf8" in str(exc).lower():
            raise FileRejected(
                "not_utf8", "bytes that are not UTF-8", byte_offset=first_invalid_utf8(path)
            ) from None
        raise FileRejected(
            "malformed_csv",
            "unbalanced quotes or fields that do not split",
            line=first_malformed_line(path, n_columns=len(columns)),
        ) from None
    result = scan.result()
    if len(raw.columns) == len(columns):
        raw.columns = columns
    if not result.ends_with_newline:
        raise FileRejected(
            "truncated_file",
            "the last line has no line end: the file is cut short",
            byte_offset=result.n_bytes,
        )
    # One chunk for the text columns kept as delivered (ids, codes, units): the parallel reader leaves
    # hundreds, and every enum cast, lookup and gather on them pays per chunk (2x on the unit harmonization
    # at 10M rows). Typed columns are parsed into new arrays anyway.
    kept_text = [c for c, t in SOURCE_COLUMNS[source].items() if t == pl.String() and c in raw.columns]
    raw = raw.with_columns(raw.select(kept_text).rechunk())
    records = raw.height + 1
    bad_rows: list[int] = []
    if result.n_newlines != records or result.n_separators != (len(columns) - 1) * records:
        # Quoted separators, embedded line breaks, or rows with a wrong number of fields: count properly.
        bad_rows, n_records = field_count_problems(path, n_columns=len(columns))
        if n_records != raw.height:
            raise FileRejected(
                "malformed_csv",
                f"{n_records} records by the standard reader vs {raw.height} parsed: quoting is broken",
                line=first_malformed_line(path, n_columns=len(columns)),
            )
    return raw, result.sha256, bad_rows, warnings


def _read(
    path: Path, source: str, limits: Limits, mapping: SiteMapping
) -> tuple[pl.DataFrame, str, list[int], dict[str, int]]:
    check_size(path, limits=limits)
    if path.suffix == ".parquet":
        raw, sha = _read_parquet(path)
        # as a CSV header's: surrounding blanks and a byte-order mark are not part of a name
        header = [c.strip().lstrip("\ufeff").strip() for c in raw.columns]
        columns = contract_header(header, source, mapping)
        warnings = _check_columns(columns, source, header=header)
        raw.columns = columns
        raw, type_warnings = _parquet_text(raw, source, mapping)
        return raw, sha, [], warnings | type_warnings
    if path.suffix == ".csv":
        return _read_csv(path, source, mapping)
    raise FileRejected(
        "unsupported_file_type", "only .csv and .parquet files (or one of them zipped) are read"
    )


def _txt(name: str) -> str:
    """Column holding the delivered text of a typed column, kept beside its parsed value."""
    return f"_txt_{name}"


def _text_of(source: str, name: str) -> pl.Expr:
    """The delivered text of a contract column at rule time (after parsing and unit harmonization)."""
    if source in CODE_COLUMN and name == "unit":
        return pl.col("unit_raw")
    if name in CODED_FIELDS.get(source, ()):
        return pl.col(delivered(name))
    return pl.col(name) if SOURCE_COLUMNS[source][name] == pl.String() else pl.col(_txt(name))


def _clean(raw: pl.DataFrame, source: str) -> pl.DataFrame:
    """Text with empties as null, surrounding spaces trimmed in text columns that have any (trimming copies
    every string; typed columns are re-parsed trimmed only where parsing failed), and missing-value sentinels
    emptied in nullable columns."""
    cols = SOURCE_COLUMNS[source]
    text_cols = [n for n in raw.columns if n in cols and cols[n] == pl.String()]
    padded = set()
    if text_cols:
        flags = raw.select(
            (pl.col(n).str.starts_with(" ") | pl.col(n).str.ends_with(" ") | pl.col(n).str.ends_with("\t"))
            .any()
            .alias(n)
            for n in text_cols
        ).row(0)
        padded = {n for n, f in zip(text_cols, flags, strict=True) if f}
    sentinels = list(MISSING_TEXT_SENTINELS)
    exprs = []
    for name in raw.columns:
        col = pl.col(name)
        if name in padded:
            col = col.str.strip_chars()
            col = pl.when(col == "").then(None).otherwise(col)
        if name in NULLABLE and name in cols:
            col = pl.when(col.is_in(sentinels)).then(None).otherwise(col)
        exprs.append(col.alias(name))
    return raw.select(exprs)


def _parse_one(text: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    if dtype == TS:
        return text.str.strptime(TS, TS_FORMAT, strict=False, cache=False)
    if dtype == pl.Date():
        return text.str.strptime(pl.Date, DATE_FORMAT, strict=False, cache=False)
    if dtype == pl.Boolean():
        return text.str.to_lowercase().replace_strict(BOOLEAN_TEXT, default=None, return_dtype=pl.Boolean)
    return text.cast(pl.Float64, strict=False)


def _parse_exprs(source: str) -> list[pl.Expr]:
    """Typed columns parsed in place, their delivered text kept under :func:`_txt`."""
    exprs = []
    for name, dtype in SOURCE_COLUMNS[source].items():
        if dtype != pl.String():
            exprs += [pl.col(name).alias(_txt(name)), _parse_one(pl.col(name), dtype).alias(name)]
    return exprs


def _retry_trimmed(parsed: pl.DataFrame, source: str) -> pl.DataFrame:
    """Typed columns that failed to parse somewhere are parsed again from trimmed text."""
    exprs = []
    for name, dtype in SOURCE_COLUMNS[source].items():
        if dtype == pl.String():
            continue
        if parsed.select((pl.col(_txt(name)).is_not_null() & pl.col(name).is_null()).any()).item():
            text = pl.col(_txt(name)).str.strip_chars()
            text = pl.when(text == "").then(None).otherwise(text)
            exprs += [text.alias(_txt(name)), _parse_one(text, dtype).alias(name)]
    return parsed.with_columns(exprs) if exprs else parsed


def _sentinel_flag(source: str, name: str, dtype: pl.DataType) -> pl.Expr | None:
    """An expression cheaper than comparing every row's text with the sentinels and true wherever the text of
    ``name`` is one (and on some other rows), or ``None`` where only the text tells.

    A typed column's value is null where its text is a sentinel (a number ``NaN`` where it is ``NaN``), as
    the sentinels are parsed here to show; a code or unit that harmonization indexes has no index there,
    as no sentinel is a code or unit of the vocabulary."""
    sentinels = pl.Series(MISSING_TEXT_SENTINELS, dtype=pl.String)
    if dtype != pl.String():
        parsed = pl.select(_parse_one(pl.lit(sentinels), dtype)).to_series()
        if parsed.is_null().all():
            return pl.col(name).is_null()
        if dtype == pl.Float64() and (parsed.is_null() | parsed.is_nan()).all():
            return pl.col(name).is_null() | pl.col(name).is_nan()
        return None
    codes, units = _harmonized_codes_and_units()
    if source in CODE_COLUMN and name == CODE_COLUMN[source] and not sentinels.is_in(codes).any():
        return pl.col("_code_idx").is_null()
    if source in CODE_COLUMN and name == "unit" and not sentinels.is_in(units).any():
        return pl.col("_unit_idx").is_null()
    return None


def _parse_rules(
    source: str,
) -> tuple[list[tuple[pl.Expr, str]], list[tuple[pl.Expr, str, bool]], list[pl.Expr]]:
    """(detail-only rules, rules, flags) for delivered text that did not parse and for missing-value sentinels.

    Detail-only rules name a more precise reason for rows that another rule already catches; they are
    evaluated only on rejected rows. A rule marked detail only in ``rules`` keeps its place among them (the
    first matching rule names a row's reason) and is caught by one of ``flags``, cheaper expressions evaluated
    on every row (see :func:`_sentinel_flag`)."""
    detail: list[tuple[pl.Expr, str]] = []
    rules: list[tuple[pl.Expr, str, bool]] = []
    flags: list[pl.Expr] = []
    sentinels = list(MISSING_TEXT_SENTINELS)
    for name, dtype in SOURCE_COLUMNS[source].items():
        text = _text_of(source, name)
        if name not in NULLABLE:
            flag = _sentinel_flag(source, name, dtype)
            rules.append((text.is_in(sentinels), f"missing_value_sentinel:{name}", flag is not None))
            if flag is not None:
                flags.append(flag)
        if dtype == pl.String():
            continue
        failed = text.is_not_null() & pl.col(name).is_null()
        if dtype in (TS, pl.Date()):
            detail.append((failed & text.str.contains(_AMBIGUOUS_DATE), f"ambiguous_date:{name}"))
        rules.append((failed, f"unparseable_{name}", False))
    return detail, rules, flags


def _id_detail_rules(source: str) -> list[tuple[pl.Expr, str]]:
    """Spreadsheet-mangled ids; such ids also fail the id format check, so these only name the reason."""
    rules: list[tuple[pl.Expr, str]] = []
    for name in sorted(ID_COLUMNS & set(SOURCE_COLUMNS[source])):
        col = pl.col(name)
        rules.append((col.str.contains(r"^\d+(\.\d+)?[eE][+-]?\d+$"), f"id_scientific_notation:{name}"))
        rules.append((col.str.contains(r"^\d+\.0+$"), f"id_decimal_suffix:{name}"))
    return rules


def _id_rules(text: pl.DataFrame, source: str) -> list[tuple[pl.Expr, str]]:
    """Zero-padded fixed-width ids of which some got shorter. Only for the files that own the ids: event
    files are matched against the batch's encounters instead (see :func:`_zero_padded_match`)."""
    rules: list[tuple[pl.Expr, str]] = []
    if source in EVENT_TIME or source == "labels":
        return rules
    for name in sorted(ID_COLUMNS & set(SOURCE_COLUMNS[source])):
        col = pl.col(name)
        ids = text[name].drop_nulls()
        if ids.len() < 20:
            continue
        digits = ids.filter(ids.str.contains(r"^\d+$"))
        if digits.len() < 0.95 * ids.len() or not digits.str.starts_with("0").any():
            continue
        lengths = digits.str.len_chars()
        width = int(lengths.mode().max())  # type: ignore[arg-type]
        if (lengths == width).mean() >= 0.95:  # type: ignore[operator]
            # Zero-padded fixed-width ids: a shorter all-digit id lost its leading zeros in a spreadsheet.
            rules.append(
                (col.str.contains(r"^\d+$") & (col.str.len_chars() < width), f"id_leading_zeros_lost:{name}")
            )
    return rules


def _text_checks(columns: list[str], source: str) -> list[tuple[pl.Expr, str]]:
    """Spreadsheet formulas and markup in free-text columns (constrained columns cannot hold them), as
    warnings: no delivered free text crosses the boundary (coded fields are mapped onto controlled values or
    ``unmapped``, the other text columns are dropped or generalized by the anonymizer), so such text costs no
    row; an export that a spreadsheet may open neutralises it (:func:`clinical_ml.core.safety.neutralize_formula`).
    A phone number ``+1 617 ...`` or a note starting ``- `` is data, not an attack."""
    checks: list[tuple[pl.Expr, str]] = []
    coded = CODED_FIELDS.get(source, ())
    for name in columns:
        if name in SOURCE_COLUMNS[source] and (
            name not in FREE_TEXT or (source in CODE_COLUMN and name == "unit")
        ):
            continue
        if name in {delivered(f) for f in coded} or (source == "encounters" and name == "unit_type"):
            continue  # the delivered text of a coded field: checked under the field's name
        if name == "row_number" or name in DERIVED_COLUMNS:
            continue
        col = pl.col(delivered(name)) if name in coded else pl.col(name)
        label = safe_column_label(name)
        checks.append((col.str.contains(FORMULA_START), f"formula_text:{label}"))
        checks.append((col.str.contains(_MARKUP), f"markup_text:{label}"))
    return checks


def _text_warnings(accepted: pl.DataFrame, source: str) -> dict[str, int]:
    """Accepted rows per free-text column holding formula-looking text or markup (kept, counted)."""
    checks = _text_checks(accepted.columns, source)
    if not checks or accepted.height == 0:
        return {}
    counts = accepted.select(c.fill_null(False).sum().alias(str(i)) for i, (c, _) in enumerate(checks)).row(0)
    return {code: int(n) for (_, code), n in zip(checks, counts, strict=True) if n}


def _future_rules(source: str, now: datetime) -> list[tuple[pl.Expr, str]]:
    limit = now + timedelta(days=1)
    rules = []
    if source == "patients":
        # 1870 or year 1 is a default or a typing error, not a patient of 150: kept, it would be "90+"
        oldest = now.date().replace(year=now.year - MAX_AGE_YEARS, day=min(now.day, 28))
        rules.append((pl.col("birth_date") < oldest, "implausible_birth_date"))
    for name, dtype in SOURCE_COLUMNS[source].items():
        if dtype == TS:
            rules.append((pl.col(name) > limit, f"future_date:{name}"))
        elif dtype == pl.Date():
            rules.append((pl.col(name) > limit.date(), f"future_date:{name}"))
    return rules


# Per source with an availability time: (event time, availability time, the rule comparing them).
AVAILABILITY = {
    "labs": ("specimen_time", "result_time", "result_before_specimen"),
    "vitals": ("charted_time", "stored_time", "stored_before_charted"),
}


def _available_before_event(source: str, mapping: SiteMapping) -> pl.Expr:
    """Availability before the event by more than the site's declared clock skew (default: at all)."""
    at, available, rule = AVAILABILITY[source]
    skew = mapping.clock_skew_minutes.get(rule, 0)  # type: ignore[call-overload]
    return (
        pl.col(available) < pl.col(at) - timedelta(minutes=skew) if skew else pl.col(available) < pl.col(at)
    )


def _within_clock_skew(accepted: pl.DataFrame, source: str, mapping: SiteMapping) -> tuple[pl.DataFrame, int]:
    """Accepted rows available before their event (within the site's tolerance) get the event time as their
    availability time: a value is not seen before it is measured. Returns the rows and how many moved."""
    if source not in AVAILABILITY or not mapping.clock_skew_minutes.get(AVAILABILITY[source][2]):  # type: ignore[call-overload]
        return accepted, 0
    at, available, _ = AVAILABILITY[source]
    early = pl.col(available) < pl.col(at)
    n = int(accepted.select(early.fill_null(False).sum()).item())
    if n:
        accepted = accepted.with_columns(
            pl.when(early).then(pl.col(at)).otherwise(pl.col(available)).alias(available)
        )
    return accepted, n


def _source_rules(source: str, mapping: SiteMapping) -> list[tuple[pl.Expr, str]]:
    if source == "encounters":
        return [
            (pl.col("discharge_time") < pl.col("admit_time"), "discharge_before_admission"),
            (pl.col("death_time") < pl.col("admit_time"), "death_before_admission"),
        ]
    if source in CODE_COLUMN:
        # the code's position in the harmonization's enum of lab then vital codes (_harmonize_units): an exact
        # match of the text, as is_in, without hashing every row's code again
        idx = pl.col("_code_idx")
        known_code = idx < len(LAB_CODES) if source == "labs" else idx >= len(LAB_CODES)
    if source == "labs":
        return [
            (~pl.col("unit_known") & known_code & pl.col("value_raw").is_not_null(), "unknown_unit"),
            (_available_before_event(source, mapping), "result_before_specimen"),
        ]
    if source == "vitals":
        return [
            (~pl.col("unit_known") & known_code & pl.col("value_raw").is_not_null(), "unknown_unit"),
            (_available_before_event(source, mapping), "stored_before_charted"),
        ]
    if source == "labels":
        return [(pl.col("recorded_time") < pl.col("event_time"), "recorded_before_event")]
    return clinical_sources.source_rules(source)


def _zero_padded_match(column: str, known: pl.Series) -> pl.Expr:
    """An unknown all-digit id that matches a known id once zero-padded: a spreadsheet dropped its zeros."""
    known = known.drop_nulls()
    if known.len() == 0:
        return pl.lit(False)
    width = int(known.str.len_chars().max())  # type: ignore[arg-type]
    col = pl.col(column)
    return (
        col.str.contains(r"^\d+$")
        & (col.str.len_chars() < width)
        & col.str.zfill(width).is_in(known.implode())
    )


# Slot values of the lookup table of :func:`_row_index_in` that are not a key's position.
_EMPTY_SLOT = 0xFFFFFFFF
_SHARED_SLOT = 0xFFFFFFFE


def _row_index_in(values: pl.Series, keys: pl.Series) -> pl.Series:
    """Position of each value in ``keys`` (distinct, no null), null where absent or null (``UInt32``).

    Each value's 64-bit hash picks a slot of a table of the keys' positions (32 times as many slots as keys,
    with the hash seed, of a few tried, whose slots the fewest keys share), and the value is then compared
    with the one key in its slot: a value equal to a key has that key's slot, so any other value finds a key
    it differs from and no position. Values whose slot holds several keys are looked up by a join of the
    strings themselves. At 10M rows and 50k keys it takes ~0.2-0.3 CPU-s, against ~0.4 for a join on the
    hashes (keeping the row order costs it a sort) and ~0.35-0.5 for an enum cast; for a few keys (codes,
    units) the enum cast is as cheap or cheaper, the gather and comparison of the strings dominating. The
    keys are made one chunk first: a gather from keys in several chunks costs ~10x more.
    """
    keys = keys.rechunk()
    n = keys.len()
    bits = max(10, n.bit_length() + 5)
    mask = (1 << bits) - 1
    best: tuple[int, int, np.ndarray, np.ndarray] | None = None
    for seed in range(4):
        slots = (keys.hash(seed) & mask).to_numpy().astype(np.int64)
        counts = np.bincount(slots, minlength=1 << bits)
        shared = int(np.count_nonzero(counts > 1))
        if best is None or shared < best[0]:
            best = (shared, seed, slots, counts)
        if shared == 0:
            break
    assert best is not None
    _, seed, slots, counts = best
    table = np.full(1 << bits, _EMPTY_SLOT, dtype=np.uint32)
    table[slots] = np.arange(n, dtype=np.uint32)
    table[counts > 1] = _SHARED_SLOT
    in_slot = pl.Series(table).gather((values.hash(seed) & mask).cast(pl.UInt32))
    cand = pl.when(pl.col("c") < _SHARED_SLOT).then(pl.col("c"))
    out = pl.DataFrame({"v": values, "c": in_slot}).select(
        pl.when(pl.lit(keys).gather(cand) == pl.col("v")).then(cand).alias("found"),
        (pl.col("c") == _SHARED_SLOT).alias("shared"),
    )
    found = out["found"]
    if counts.max(initial=0) > 1 and out["shared"].any():
        rows = out["shared"].arg_true()
        index = pl.DataFrame({"v": keys, "i": pl.int_range(n, dtype=pl.UInt32, eager=True)})
        looked_up = values.gather(rows).to_frame("v").join(index, on="v", how="left", maintain_order="left")
        found = found.scatter(rows, looked_up["i"])
    return found


def _with_batch(
    parsed: pl.DataFrame, source: str, batch: BatchContext
) -> tuple[pl.DataFrame, list[tuple[pl.Expr, str, bool]], list[pl.Expr]]:
    """Join what the batch knows about each row's patient/encounter; rules comparing against it, each with
    whether it is detail only (it names the reason of rows that another rule or a flag catches), and flags:
    cheaper expressions true wherever a detail-only rule is (evaluated on every row where the rules are
    evaluated on flagged rows only)."""
    rules: list[tuple[pl.Expr, str]] = []
    flags: list[pl.Expr] = []
    # a zero-padded match is an unknown patient/encounter too (the next rule): naming it is detail only
    detail_only = {"id_leading_zeros_lost:mrn", "id_leading_zeros_lost:encounter_id"}
    if source == "encounters" and batch.patients is not None:
        pts = batch.patients.select(
            "mrn", pl.col("birth_date").alias("_birth"), pl.lit(True).alias("_known_patient")
        )
        parsed = parsed.join(pts.unique("mrn"), on="mrn", how="left", maintain_order="left")
        rules += [
            (
                pl.col("_known_patient").is_null() & _zero_padded_match("mrn", batch.patients["mrn"]),
                "id_leading_zeros_lost:mrn",
            ),
            (pl.col("_known_patient").is_null() & pl.col("mrn").is_not_null(), "unknown_patient"),
            (pl.col("admit_time").dt.date() < pl.col("_birth"), "event_before_birth"),
        ]
    if source in EVENT_TIME and batch.encounters is not None:
        enc = batch.encounters.select(
            "encounter_id",
            pl.col("discharge_time").alias("_discharge"),
            pl.col("death_time").alias("_death"),
            pl.col("mrn").alias("_mrn"),
            pl.col("site").alias("_site"),
            pl.lit(True).alias("_known_encounter"),
        ).unique("encounter_id")
        if batch.patients is not None:
            enc = enc.join(
                batch.patients.select(
                    pl.col("mrn").alias("_mrn"), pl.col("birth_date").alias("_birth")
                ).unique("_mrn"),
                on="_mrn",
                how="left",
            )
        else:
            enc = enc.with_columns(pl.lit(None, dtype=pl.Date).alias("_birth"))
        # Look the encounter up by its row index in the batch's encounters and gather its facts (a left join
        # carrying every column that keeps row order is several times slower at 10M rows).
        enc = (
            enc.filter(pl.col("encounter_id").is_not_null())
            .with_columns(pl.col("_site").rank("dense").alias("_site"))
            .rechunk()  # gathered from below, once per row: one chunk is ~10x faster than several
        )
        idx = _row_index_in(parsed["encounter_id"], enc["encounter_id"])
        # The limits are computed once per encounter, not once per row: the latest time an event may have
        # (death or discharge plus the grace), and the birth as a time (an event's date is before the birth
        # date exactly when its time is before midnight of that date).
        enc = enc.with_columns(
            pl.col("_discharge") + EVENT_GRACE, pl.col("_death") + EVENT_GRACE, pl.col("_birth").cast(TS)
        ).with_columns(pl.min_horizontal("_death", "_discharge").alias("_latest"))
        # Only the site is gathered into a column (the unit-switch check groups on it); the limits are gathered
        # inside the rules, so no 10M-row column of each stays alive to the end. An event after the earlier
        # of death and discharge is after one of them: one gather flags both rules, which name the reason on
        # the flagged rows only.
        parsed = parsed.with_columns(idx.alias("_enc_idx"), enc["_site"].gather(idx).alias("_site"))

        def limit(column: str) -> pl.Expr:
            return pl.lit(enc[column]).gather(pl.col("_enc_idx"))

        t = pl.col(EVENT_TIME[source])
        unknown = pl.col("_enc_idx").is_null()
        rules += [
            (
                unknown & _zero_padded_match("encounter_id", batch.encounters["encounter_id"]),
                "id_leading_zeros_lost:encounter_id",
            ),
            (unknown & pl.col("encounter_id").is_not_null(), "unknown_encounter"),
            (t < limit("_birth"), "event_before_birth"),
            (t > limit("_death"), "event_after_death"),
            (t > limit("_discharge"), "event_after_discharge"),
        ]
        detail_only |= {"event_after_death", "event_after_discharge"}
        flags.append(t > limit("_latest"))
    if source == "labels":
        parsed, rules = _with_labelled_encounters(parsed, batch)
    return parsed, [(c, r, r in detail_only) for c, r in rules], flags


def _with_labelled_encounters(
    parsed: pl.DataFrame, batch: BatchContext
) -> tuple[pl.DataFrame, list[tuple[pl.Expr, str]]]:
    """Each label's encounter looked up (trimmed, upper case, as pseudonyms are keyed) in the batch's
    encounters, then in those of the earlier batches; its patient is gathered into ``_mrn``."""
    frames = [
        f.select(pl.col("encounter_id").cast(pl.String), pl.col("mrn").cast(pl.String))
        for f in (batch.encounters, batch.earlier_encounters)
        if f is not None
    ]
    known = (
        pl.concat(frames) if frames else pl.DataFrame(schema={"encounter_id": pl.String, "mrn": pl.String})
    )
    known = (
        known.with_columns(normalize_identifier(pl.col("encounter_id")).alias("_key"))
        .filter(pl.col("_key").is_not_null())
        .unique("_key", keep="first", maintain_order=True)  # the batch's own, then the newest delivery
    )
    if known.height:
        keys = parsed.select(normalize_identifier(pl.col("encounter_id")))[:, 0]
        parsed = parsed.with_columns(_row_index_in(keys, known["_key"]).alias("_label_idx"))
        parsed = parsed.with_columns(pl.lit(known["mrn"]).gather(pl.col("_label_idx")).alias("_mrn"))
    else:
        parsed = parsed.with_columns(pl.lit(None, dtype=pl.String).alias("_mrn"))
    parsed = parsed.with_columns(pl.col("_mrn").is_not_null().alias("_known_encounter"))
    rules = [
        (
            ~pl.col("_known_encounter") & _zero_padded_match("encounter_id", known["encounter_id"]),
            "id_leading_zeros_lost:encounter_id",
        ),
        (~pl.col("_known_encounter") & pl.col("encounter_id").is_not_null(), "unknown_encounter"),
    ]
    return parsed, rules


def _harmonized_codes_and_units() -> tuple[list[str], list[str]]:
    """The categories of the enums that :func:`_harmonize_units` indexes codes (lab then vital) and units by."""
    codes = [*LAB_CODES, *VITAL_CODES]
    return codes, sorted({canonical_unit(c) for c in codes} | {u for _, u in UNIT_CONVERSIONS})


def _harmonize_units(df: pl.DataFrame, code_col: str) -> pl.DataFrame:
    """Convert known unit variants into canonical units, keeping the delivered value and unit; flag values
    outside the plausible range (kept, never used as features). Per-code constants are gathered by the
    code's index in an enum, and per-(code, unit) constants by the pair's index into small tables (the
    conversion's scale and offset, whether the unit is known): several times faster than a join, a string
    mapping or one when/then per conversion."""
    codes, units = _harmonized_codes_and_units()
    # The conversions are affine: value * scale + offset, read off the function; a pair without one is kept.
    scale, offset = [1.0] * (len(codes) * len(units)), [0.0] * (len(codes) * len(units))
    converted = [False] * len(scale)
    for (code, unit), fn in UNIT_CONVERSIONS.items():
        i = codes.index(code) * len(units) + units.index(unit)
        scale[i], offset[i], converted[i] = fn(1.0) - fn(0.0), fn(0.0), True
    as_canonical = [False] * len(scale)
    for i, code in enumerate(codes):
        as_canonical[i * len(units) + units.index(canonical_unit(code))] = True
    known = [a or b for a, b in zip(converted, as_canonical, strict=True)]

    def per_code(values: list) -> pl.Expr:
        return pl.lit(pl.Series(values)).gather(pl.col("_code_idx"))

    # the (code, unit) pair's index into the tables
    pair = pl.col("_code_idx").cast(pl.UInt32) * len(units) + pl.col("_unit_idx").cast(pl.UInt32)

    def per_pair(values: list) -> pl.Expr:
        return pl.lit(pl.Series(values)).gather(pair)

    out = df.rename({"value": "value_raw", "unit": "unit_raw"}).with_columns(
        pl.col(code_col).cast(pl.Enum(codes), strict=False).to_physical().alias("_code_idx"),
        pl.col("unit_raw").cast(pl.Enum(units), strict=False).to_physical().alias("_unit_idx"),
    )
    value = (
        pl.when(per_pair(converted))
        .then(pl.col("value_raw") * per_pair(scale) + per_pair(offset))
        .otherwise(pl.col("value_raw"))
    )
    canonical_units = per_code([canonical_unit(c) for c in codes])
    # A file with no row converted, or with every unit its code's canonical one, keeps the delivered column as
    # it is: the same numbers or text, without computing a new column per row. The checks over every row are
    # taken by the streaming engine, a morsel of rows at a time: no 10M-row column of the pair's index or of
    # a gathered limit is materialized (their fresh memory's page faults cost more than the gathers).
    any_converted, all_canonical = (
        out.lazy()
        .select(
            per_pair(converted).any().alias("converted"),
            per_pair(as_canonical).fill_null(False).all().alias("all"),
        )
        .collect(engine="streaming")
        .row(0)
    )
    out = out.with_columns(
        (pl.col("unit_raw") if all_canonical else canonical_units).alias("unit"),
        (value if any_converted else pl.col("value_raw")).alias("value"),
    )
    lo = per_code([float(PLAUSIBLE_RANGES[c][0]) for c in codes])
    hi = per_code([float(PLAUSIBLE_RANGES[c][1]) for c in codes])
    flags = (
        out.lazy()
        .select(
            per_pair(known).fill_null(False).alias("unit_known"),
            ((pl.col("value") < lo) | (pl.col("value") > hi)).fill_null(False).alias("implausible"),
        )
        .collect(engine="streaming")
        .rechunk()  # two bitmaps: one chunk, as an eager column would be
    )
    return out.hstack(flags)


def _pandera_rejects(parsed: pl.DataFrame, source: str, mapping: SiteMapping) -> pl.DataFrame:
    try:
        schema_for(source, mapping).validate(parsed, lazy=True)
    except pa.errors.SchemaErrors as exc:
        fc = exc.failure_cases.filter(pl.col("index").is_not_null())
        return fc.select(
            (pl.col("index").cast(pl.Int64) + 1).alias("row_number"),
            pl.format(
                "{}:{}",
                pl.col("check").str.replace(r"\(.*", "").replace_strict(_CHECK_REASONS, default="invalid"),
                pl.col("column"),
            ).alias("reason"),
        )
    return empty_rejects()


def _key_col(source: str, k: str) -> pl.Expr:
    """A duplicate key column of ``source``. The file that owns an identifier compares it as pseudonyms are
    keyed (trimmed, upper case): 'ab12' and 'AB12' are one patient downstream, so they are one key here."""
    owned = {"patients": "mrn", "encounters": "encounter_id"}.get(source)
    return normalize_identifier(pl.col(k)).alias(k) if k == owned else pl.col(k)


def _key_hashes(parsed: pl.DataFrame, source: str) -> tuple[pl.Series, pl.Series]:
    """Each row's hash of its duplicate key, and the hashes that more than one row has.

    Over every row, not only those that pass the other checks: it can run beside them (in a thread of its
    own), and a hash repeated only through a rejected row costs a closer look at a key of one row, which
    rejects nothing."""
    # Per-column hashes combined: several times faster than hashing a struct; a collision only costs a
    # closer look in _duplicate_rejects, where rows are grouped by their real key values.
    combined = pl.lit(0, dtype=pl.UInt64)
    for i, k in enumerate(DUPLICATE_KEYS[source]):
        combined = combined ^ (
            _key_col(source, k).hash(seed=i + 1) * pl.lit(0x9E3779B97F4A7C15 >> i, dtype=pl.UInt64)
        )
    # by the streaming engine, a morsel of rows at a time: no 10M-row column of each key's hash is materialized
    h = parsed.lazy().select(combined).collect(engine="streaming")[:, 0]
    ordered = h.sort(multithreaded=False)  # ~40% less CPU than the parallel sort at 10M rows
    # Sorting beats a hash table here (~4x at 10M rows). Neighbours are compared, not subtracted: diff()
    # of a UInt64 goes through Int64 and gives null above 2**63, which missed half of all duplicate keys.
    return h, ordered.filter(ordered == ordered.shift(1))


def _duplicate_rejects(
    parsed: pl.DataFrame,
    source: str,
    candidates: pl.Series,
    hashes: tuple[pl.Series, pl.Series] | None = None,
) -> pl.DataFrame:
    """Identical repeats of a key after its first row -> ``duplicate_row``; rows of a key with differing
    content -> ``conflicting_duplicate`` (all of them: which one is right is unknown). For a source with a
    revision column, rows of a key before its latest revision -> ``superseded``, and the duplicate rules
    apply to the rows of the latest revision (conflicting ones there leave the key without a row: an older
    revision was replaced, whatever the newer one says). Only ``candidates`` rows count; ``hashes`` are
    :func:`_key_hashes` of ``parsed`` when already computed."""
    key = DUPLICATE_KEYS[source]
    revision = REVISION_COLUMN.get(source)
    owned = {"patients": "mrn", "encounters": "encounter_id"}.get(source)

    def key_col(k: str) -> pl.Expr:
        return _key_col(source, k)

    h, repeated = hashes if hashes is not None else _key_hashes(parsed, source)
    if repeated.len() == 0:
        return empty_rejects()
    dup = h.is_in(repeated.unique().implode()) & candidates
    if not dup.any():
        return empty_rejects()
    content = [c for c in SOURCE_COLUMNS[source] if c in parsed.columns]
    if source in CODE_COLUMN:
        content = [c for c in content if c not in ("value", "unit")] + ["value_raw", "unit_raw"]
    sub = parsed.filter(dup).select(
        "row_number",
        *[key_col(k) for k in key],
        *([revision] if revision else []),
        pl.struct([key_col(c) for c in content]).hash().alias("_content"),
        (pl.col(owned) if owned else pl.lit(None)).alias("_spelling"),
    )
    group = [*key, revision] if revision else key
    superseded = pl.col(revision) < pl.col(revision).max().over(key) if revision else pl.lit(False)
    sub = sub.with_columns(
        superseded.alias("_superseded"),
        (pl.col("_content").n_unique().over(group) > 1).alias("_conflict"),
        (pl.col("_spelling").n_unique().over(group) > 1).alias("_case_variant"),
        pl.int_range(pl.len()).over(group).alias("_nth"),
    )
    return sub.filter(pl.col("_superseded") | pl.col("_conflict") | (pl.col("_nth") > 0)).select(
        "row_number",
        pl.when(pl.col("_superseded"))
        .then(pl.lit("superseded"))
        .when(pl.col("_conflict") & pl.col("_case_variant"))
        # the same identifier written in another case, with other facts (sex, birth date, times): which
        # one is right is unknown, and downstream they would be one patient or stay
        .then(pl.lit(f"conflicting_case_variant:{owned}"))
        .when(pl.col("_conflict"))
        .then(pl.lit("conflicting_duplicate"))
        .otherwise(pl.lit("duplicate_row"))
        .alias("reason"),
    )


def _median_bands() -> pl.DataFrame:
    codes = [*LAB_CODES, *VITAL_CODES]
    return pl.DataFrame(
        {
            "_code_idx": pl.Series(range(len(codes)), dtype=pl.UInt32),
            "_med_lo": [float(TYPICAL_MEDIAN_RANGES[c][0]) for c in codes],
            "_med_hi": [float(TYPICAL_MEDIAN_RANGES[c][1]) for c in codes],
        }
    )


def _unit_switch_rejects(parsed: pl.DataFrame, source: str, candidates: pl.Series) -> pl.DataFrame:
    """Per code, delivered unit and site: a median far outside the typical band means an undeclared unit.

    The three are packed into one integer, as grouping on one integer column is about twice as fast as on
    three: the enum indices of code and unit (16 bits at most) and the site's rank among the batch's sites
    (controlled values of the site mapping: far fewer than 2**30), each plus one so that null is a value of
    its own. A median is computed only for a group that can have one outside the band: a median below the
    band's low end has at least half the group's numbers below it, one above the high end at least half above
    it (or not a number, which may sort last), and counting is cheaper than a median per group."""

    def part(column: pl.Expr) -> pl.Expr:
        return (column.cast(pl.UInt64) + 1).fill_null(0)

    site = pl.col("_site") if "_site" in parsed.columns else pl.lit(None, dtype=pl.Int64)
    key = part(pl.col("_code_idx")) * 2**47 + part(pl.col("_unit_idx")) * 2**30 + part(pl.col("_site"))
    bands = _median_bands()
    value = pl.col("value")
    # Every row is counted with the candidates as a mask (a candidate's flag as it is, any other row's false)
    # rather than the candidates filtered out first: the filter copied each column of ~every row. The counts
    # are taken by the streaming engine, a morsel of rows at a time: the key and the masks of 10M rows are
    # never materialized (~40% less CPU, most of it the page faults of fresh 10M-row columns).
    rows = (
        parsed.select("row_number", "_code_idx", "_unit_idx", "value", site.alias("_site"))
        .with_columns(candidates.alias("_candidate"))
        .lazy()
        .with_columns(key.alias("_key"))
    )
    candidate = pl.col("_candidate")
    counts = (
        rows.select(
            "_key",
            candidate.alias("_n"),
            (candidate & value.is_not_nan()).alias("_numbers"),
            (candidate & (value < pl.lit(bands["_med_lo"]).gather(pl.col("_code_idx")))).alias("_below"),
            (
                candidate & ((value > pl.lit(bands["_med_hi"]).gather(pl.col("_code_idx"))) | value.is_nan())
            ).alias("_above"),
        )
        .group_by("_key")
        .agg(pl.col("_n", "_numbers", "_below", "_above").sum())
        .collect(engine="streaming")
    )
    suspect = counts.filter(
        (pl.col("_n") >= MIN_ROWS_FOR_MEDIAN_CHECK)
        & (
            (2 * pl.col("_below") >= pl.col("_numbers") - 1)
            | (2 * pl.col("_above") >= pl.col("_numbers") - 1)
        )
    )["_key"]
    if suspect.len() == 0:
        return empty_rejects()
    stats = (
        rows.filter(candidate & pl.col("_key").is_in(suspect.implode()))
        .group_by("_key")
        .agg(
            pl.col("_code_idx").first(),
            pl.col("value").median().alias("_median"),
            pl.len().alias("_n"),
        )
        .join(bands.lazy(), on="_code_idx", how="left")
        .filter(
            (pl.col("_n") >= MIN_ROWS_FOR_MEDIAN_CHECK)
            & ((pl.col("_median") < pl.col("_med_lo")) | (pl.col("_median") > pl.col("_med_hi")))
        )
        .collect()
    )
    if stats.height == 0:
        return empty_rejects()
    bad = (
        rows.filter(candidate & pl.col("_key").is_in(stats["_key"].implode())).select("row_number").collect()
    )
    return bad.select("row_number", pl.lit("undeclared_unit_switch").alias("reason"))


def _without_rows(frame: pl.DataFrame, row_numbers: pl.Series, *, max_slices: int = 1_000) -> pl.DataFrame:
    """``frame`` without the rows whose ``row_number`` (1-based position) is listed, in order.

    A few rejects out of millions are cut out as zero-copy slices around them (a filter or anti join copies
    every column of every kept row: about 1 s at 10M rows); many rejects are filtered.
    """
    drop = row_numbers.unique().sort().cast(pl.Int64)
    if drop.len() == 0:
        return frame
    in_order = frame.select(
        (pl.col("row_number") == pl.int_range(1, pl.len() + 1, dtype=pl.Int64)).all()
    ).item()
    if drop.len() > max_slices or not in_order:
        return frame.filter(~pl.col("row_number").is_in(drop.implode()))
    parts, start = [], 0
    for r in drop.to_list():
        if r - 1 > start:
            parts.append(frame.slice(start, r - 1 - start))
        start = r
    if start < frame.height:
        parts.append(frame.slice(start))
    return pl.concat(parts, rechunk=False) if parts else frame.head(0)


def ingest_file(
    path: Path | str,
    source: str,
    *,
    batch: BatchContext | None = None,
    now: datetime | None = None,
    limits: Limits | None = None,
    mapping: SiteMapping | None = None,
) -> IngestResult:
    """Read, parse, validate and harmonize one delivered file of ``source``.

    Parameters
    ----------
    path
        A CSV or Parquet file in the landing contract.
    source
        One of ``patients``, ``encounters``, ``labs``, ``vitals``, ``labels``.
    batch
        Accepted patients/encounters of the same batch for cross-file checks (unknown patient or encounter,
        events before birth or after death/discharge, unit switches per site), and for labels the encounters
        of the earlier batches. ``None`` skips them.
    now
        Time of ingestion for the future-date check (defaults to the current UTC time).
    limits
        File size limits (defaults to :class:`~clinical_ml.core.safety.Limits` ()).
    mapping
        The site's mapping (defaults to :func:`default_site_mapping`).

    Returns
    -------
    IngestResult
        Accepted rows (with ``row_number`` of the delivered file) and rejects with reasons.

    Raises
    ------
    FileRejected
        When the file as a whole cannot be used; the reason code and detail never contain values.
    """
    p = Path(path)
    if source not in SOURCE_COLUMNS:
        raise ValueError(f"unknown source {source!r}")
    now = now or datetime.now(UTC).replace(tzinfo=None)
    mapping = mapping or default_site_mapping()
    raw, sha, ragged, warnings = _read(p, source, limits or Limits(), mapping)
    absent = [c for c in sorted(OPTIONAL_COLUMNS.get(source, ())) if c not in raw.columns]
    raw = raw.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in absent)
    if raw.height == 0:
        raise FileRejected("no_data_rows", "the file has a header and no rows", line=1)
    text = _clean(raw, source)
    del raw
    local_codes = mapping.codes.get(source, {})  # type: ignore[call-overload]
    if local_codes:
        text = text.with_columns(pl.col(CODE_COLUMN[source]).replace(dict(local_codes)))
    local_units = mapping.measurement_units.get(source, {})  # type: ignore[call-overload]
    if local_units:
        text = text.with_columns(pl.col("unit").replace(dict(local_units)))
    text = map_coded_values(text, source, mapping, keep_delivered=True)
    parsed = text.with_columns(*_parse_exprs(source)).with_columns(
        pl.int_range(1, text.height + 1, dtype=pl.Int64).alias("row_number")
    )
    parsed = _retry_trimmed(parsed, source)
    is_header = pl.lit(True)
    for name in (c for c in SOURCE_COLUMNS[source] if c not in absent):
        is_header = is_header & (_text_of(source, name) == name)
    parse_detail, parse_rules, flags = _parse_rules(source)
    # Detail-only rules name the reason of rows that a later rule or the schema rejects anyway; they are
    # evaluated on rejected rows only, which keeps a clean 10M-row file from paying for every regex.
    rules: list[tuple[pl.Expr, str, bool]] = []
    if ragged:
        rules.append((pl.col("row_number").is_in(ragged), "wrong_field_count", False))
    rules.append((is_header, "repeated_header", True))
    rules += [(c, r, True) for c, r in parse_detail]
    rules += parse_rules
    rules += [(c, r, True) for c, r in _id_detail_rules(source)]
    rules += [(c, r, False) for c, r in _id_rules(text, source)]
    del text
    if source in CODE_COLUMN:
        parsed = _harmonize_units(parsed, CODE_COLUMN[source])
        rules.append(
            (
                pl.col("value_raw").is_in(list(MISSING_NUMERIC_SENTINELS)),
                "missing_value_sentinel:value",
                False,
            )
        )
    needs = "patients" if source == "encounters" else "encounters" if source in EVENT_TIME else None
    if needs is not None and (batch is None or getattr(batch, needs) is None):
        warnings["cross_file_checks_skipped"] = parsed.height
    if source == "labels" and batch is None:
        warnings["cross_file_checks_skipped"] = parsed.height
    # The schema and the duplicate keys' hashes run in threads of their own beside the batch lookups and the
    # rules (pandera checks one column after another, each on one core; the hashes are sorted on one core);
    # the lookups add columns only, so both see the same rows and values.
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest")
    schema_job = pool.submit(_pandera_rejects, parsed.select(*SOURCE_COLUMNS[source]), source, mapping)
    hashes_job = pool.submit(_key_hashes, parsed, source)
    pool.shutdown(wait=False)
    extra_rules: list[tuple[pl.Expr, str, bool]] = []
    if batch is not None:
        parsed, extra_rules, batch_flags = _with_batch(parsed, source, batch)
        flags += batch_flags
    rules += [(c, r, False) for c, r in _future_rules(source, now) + _source_rules(source, mapping)]
    rules += extra_rules

    # while the schema thread runs; by the streaming engine, a morsel of rows at a time, so that no 10M-row
    # column of a rule (or of a limit gathered from the encounters) is materialized
    flagged = (
        parsed.lazy()
        .select(
            pl.any_horizontal(
                [c.fill_null(False) for c, _, detail_only in rules if not detail_only]
                + [c.fill_null(False) for c in flags]
            )
        )
        .collect(engine="streaming")
        .to_series()
    )
    schema_rejects = schema_job.result()
    if schema_rejects.height:
        flagged = flagged | parsed["row_number"].is_in(schema_rejects["row_number"].implode())
    subset = parsed.filter(flagged)
    reason = pl.coalesce([pl.when(c.fill_null(False)).then(pl.lit(r)) for c, r, _ in rules])
    # a flag is wider than the rule it stands for: a flagged row that no rule names gets no reason here
    rule_rejects = subset.select("row_number", reason.alias("reason")).filter(pl.col("reason").is_not_null())
    first = pl.concat(
        [rule_rejects, schema_rejects.select(pl.col("row_number").cast(pl.Int64), "reason")]
    ).unique("row_number", keep="first", maintain_order=True)
    candidates = ~parsed["row_number"].is_in(first["row_number"].implode())
    parts = [first, _duplicate_rejects(parsed, source, candidates, hashes_job.result())]
    if source in CODE_COLUMN:
        candidates = ~parsed["row_number"].is_in(parts[1]["row_number"].implode()) & candidates
        parts.append(_unit_switch_rejects(parsed, source, candidates))
    rejects = pl.concat(parts).sort("row_number")
    if source == "labels":  # the patient found for the label's encounter, not a delivered column
        mrn = pl.col("_mrn") if "_mrn" in parsed.columns else pl.lit(None, dtype=pl.String)
        parsed = parsed.drop(LABEL_PATIENT, strict=False).with_columns(mrn.alias(LABEL_PATIENT))
    helper = [c for c in parsed.columns if c.startswith("_")]
    accepted = _without_rows(parsed.drop(helper), rejects["row_number"])
    accepted, n_skewed = _within_clock_skew(accepted, source, mapping)
    if n_skewed:
        warnings[f"{AVAILABILITY[source][2]}_tolerated"] = n_skewed
    by_reason = dict(rejects.group_by("reason").len().sort("reason").iter_rows())
    unmapped, unmapped_values = unmapped_counts(accepted, source)
    warnings |= unmapped | _text_warnings(accepted, source)
    if source in CODE_COLUMN:
        n_implausible = int(accepted["implausible"].sum())
        if n_implausible:
            warnings["implausible_flagged"] = n_implausible
    return IngestResult(
        source=source,
        accepted=accepted,
        rejects=rejects,
        rows_in=parsed.height,
        sha256=sha,
        n_bytes=p.stat().st_size,
        rejected_by_reason={str(k): int(v) for k, v in by_reason.items()},
        warnings=warnings,
        unmapped_values=unmapped_values,
    )
