"""Per-site mapping onto the landing contract, and the controlled values that may cross the boundary.

Every coded field of the contract (``sex``, ``race``, ``ethnicity``, ``admission_type``,
``discharge_disposition``, ``payer``, ``unit``, ``site``, and the ``unit_type`` derived from the unit) holds a
value of a controlled vocabulary or :data:`UNMAPPED`, never delivered text: any text outside a vocabulary is
treated as PHI. The fixed vocabularies are data (``contract_vocabulary.yaml`` beside this module); unit and site codes are
declared per site, each unit with its type, in the site's mapping file.

A mapping file (``site_mappings/<name>.yaml``, the folder set by ``CLINICAL_ML_SITE_MAPPINGS`` or the data
zones resource) says how a site's export reaches the contract: column renames per source, local lab and vital
codes onto vocabulary codes, local values onto contract values, units (code and type), sites, and optionally
the site's identifier patterns, its spellings of measurement units and its clock skew per time rule. A batch
names its mapping in its ``_SUCCESS`` marker (``"site_mapping": "<name>"``), else the ``default`` mapping
applies. Values are compared without regard to case, surrounding blanks or runs of spaces; a contract value
(or a declared code) always maps to itself.

Ingestion applies the mapping on the phi side and keeps the delivered text beside the coded value
(``<field>_delivered``, phi zone only); the anonymizer applies the same mapping again at the boundary
(idempotent), so whatever reaches it, only vocabulary values and ``unmapped`` leave.
"""

import hashlib
import json
import os
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clinical_ml.core.locations import PROJECT_ROOT
from clinical_ml.core.units import LAB_CODES, UNIT_CONVERSIONS, VITAL_CODES, canonical_unit

UNMAPPED = "unmapped"
CONTRACT_VOCABULARY_FILE = Path(__file__).with_name("contract_vocabulary.yaml")
SITE_MAPPINGS_ENV = "CLINICAL_ML_SITE_MAPPINGS"
DEFAULT_MAPPING = "default"
MAPPING_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")
# A unit or site code a site declares: plain, short, no markup; it crosses the boundary as it is written.
CODE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_./ \-]{0,63}$"
# Fields with a fixed contract vocabulary, and the coded fields of each source.
FIXED_FIELDS = ("sex", "race", "ethnicity", "admission_type", "discharge_disposition", "payer")
CODED_FIELDS: dict[str, tuple[str, ...]] = {
    "patients": ("sex", "race", "ethnicity"),
    "encounters": ("admission_type", "unit", "site", "discharge_disposition", "payer"),
}
# A mapping that sends values here hides them as surely as ``unmapped`` does: the warning check counts both.
CATCH_ALL = frozenset({"OTHER", "UNKNOWN"})
DELIVERED_SUFFIX = "_delivered"
ID_FIELDS = ("mrn", "encounter_id")
# The time rules a site may relax by a declared clock skew (minutes): a value's availability time (stored,
# resulted) before its event time (charted, specimen). Beyond the tolerance the row is rejected as before.
SKEW_RULES: dict[str, str] = {"stored_before_charted": "vitals", "result_before_specimen": "labs"}
MAX_CLOCK_SKEW_MINUTES = 24 * 60


class SiteMappingError(ValueError):
    """A site mapping or vocabulary file that cannot be used, naming the file and the field."""


def delivered(field: str) -> str:
    """The phi-zone column holding the delivered text of a coded field."""
    return f"{field}{DELIVERED_SUFFIX}"


def _key(value: str) -> str:
    return " ".join(str(value).split()).upper()


def normalized(col: pl.Expr) -> pl.Expr:
    """Case, blanks and runs of spaces do not make a different value (exports differ in them)."""
    return col.str.strip_chars().str.replace_all(r"\s+", " ").str.to_uppercase()


class ContractVocabulary(BaseModel):
    """The fixed vocabularies of the coded fields (``contract_vocabulary.yaml``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    sex: tuple[str, ...] = Field(min_length=1)
    race: tuple[str, ...] = Field(min_length=1)
    ethnicity: tuple[str, ...] = Field(min_length=1)
    admission_type: tuple[str, ...] = Field(min_length=1)
    discharge_disposition: tuple[str, ...] = Field(min_length=1)
    payer: tuple[str, ...] = Field(min_length=1)
    unit_type: tuple[str, ...] = Field(min_length=1)


def _errors(path: Path | str, exc: ValidationError) -> str:
    # location and message only: pydantic's own text would repeat the input value
    return f"{path}: " + "; ".join(".".join(map(str, e["loc"])) + f": {e['msg']}" for e in exc.errors())


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SiteMappingError(f"{path}: cannot be read ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise SiteMappingError(f"{path}: expected a mapping of sections")
    return raw


def load_contract_vocabulary(path: Path | str = CONTRACT_VOCABULARY_FILE) -> ContractVocabulary:
    try:
        return ContractVocabulary.model_validate(_read_yaml(Path(path)))
    except ValidationError as exc:
        raise SiteMappingError(_errors(path, exc)) from None


CONTRACT = load_contract_vocabulary()


class UnitEntry(BaseModel):
    """A local unit: its code (the local name when left out) and its type."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    code: str | None = Field(None, pattern=CODE_PATTERN)
    type: str

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in CONTRACT.unit_type:
            raise ValueError(f"unit type must be one of {list(CONTRACT.unit_type)}")
        return v


class SiteMapping(BaseModel):
    """How one site's export reaches the landing contract (see the module docstring and the README)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = DEFAULT_MAPPING
    description: str = ""
    columns: dict[Literal["patients", "encounters", "labs", "vitals", "labels"], dict[str, str]] = {}
    codes: dict[Literal["labs", "vitals"], dict[str, str]] = {}
    values: dict[
        Literal["sex", "race", "ethnicity", "admission_type", "discharge_disposition", "payer"],
        dict[str, str],
    ] = {}
    units: dict[str, UnitEntry] = {}
    sites: dict[str, str] = {}
    id_patterns: dict[Literal["mrn", "encounter_id"], str] = {}
    measurement_units: dict[Literal["labs", "vitals"], dict[str, str]] = {}
    """Per source, the site's spellings of measurement units -> a unit the vocabulary knows for that source
    (a canonical unit or a listed variant), e.g. ``{vitals: {"?F": "[degF]"}}``; applied before the units are
    harmonized. A spelling not named here and not in the vocabulary is still rejected (``unknown_unit``)."""
    clock_skew_minutes: dict[Literal["stored_before_charted", "result_before_specimen"], int] = {}
    """Per time rule (:data:`SKEW_RULES`), how many minutes the site's availability time may precede the event
    time (an information system that stores a value against the next charting slot, a clock that runs
    ahead): such a row is accepted with its availability time raised to the event time, never earlier, and
    counted (``<rule>_tolerated``). Default 0: the strict rule."""
    time_zone: str | None = None
    """The site's IANA time zone (``Europe/Paris``): Parquet timestamps that carry a zone are converted to its
    wall-clock time, the time CSV exports and naive timestamps are in. Without it such a file is refused."""

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                zoneinfo.ZoneInfo(v)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError("not an IANA time zone name (e.g. America/New_York)") from None
        return v

    @field_validator("values")
    @classmethod
    def _contract_values(cls, v: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for field, table in v.items():
            bad = sorted({t for t in table.values() if t not in getattr(CONTRACT, field)})
            if bad:
                raise ValueError(f"{field}: {bad[:5]} not in the contract's {list(getattr(CONTRACT, field))}")
        return v

    @field_validator("codes")
    @classmethod
    def _vocabulary_codes(cls, v: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for source, table in v.items():
            known = LAB_CODES if source == "labs" else VITAL_CODES
            bad = sorted({t for t in table.values() if t not in known})
            if bad:
                raise ValueError(
                    f"{source}: {bad[:5]} not in the vocabulary (CLINICAL_ML_VOCABULARY extends it)"
                )
        return v

    @field_validator("measurement_units")
    @classmethod
    def _measurement_units(cls, v: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for source, table in v.items():
            codes = LAB_CODES if source == "labs" else VITAL_CODES
            known = {canonical_unit(c) for c in codes} | {u for c, u in UNIT_CONVERSIONS if c in codes}
            bad = sorted({t for t in table.values() if t not in known})
            if bad:
                raise ValueError(
                    f"{source}: {bad[:5]} are not units of the vocabulary's {source} (canonical or variant)"
                )
        return v

    @field_validator("clock_skew_minutes")
    @classmethod
    def _skew(cls, v: dict[str, int]) -> dict[str, int]:
        bad = sorted(rule for rule, minutes in v.items() if not 0 <= minutes <= MAX_CLOCK_SKEW_MINUTES)
        if bad:
            raise ValueError(f"{bad}: a clock skew is 0 to {MAX_CLOCK_SKEW_MINUTES} minutes")
        return v

    @field_validator("sites")
    @classmethod
    def _site_codes(cls, v: dict[str, str]) -> dict[str, str]:
        bad = sorted({t for t in v.values() if not re.fullmatch(CODE_PATTERN, t)})
        if bad:
            raise ValueError(f"site codes must match {CODE_PATTERN}: {bad[:5]}")
        return v

    @field_validator("id_patterns")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        for field, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{field}: not a regular expression ({exc.msg})") from None
            if not (pattern.startswith("^") and pattern.endswith("$")):
                raise ValueError(f"{field}: the pattern must be anchored (^...$)")
            if re.search(pattern, "a b") or re.search(pattern, ""):
                raise ValueError(f"{field}: an identifier pattern must not match blanks or empty text")
        return v

    @model_validator(mode="after")
    def _columns_and_collisions(self) -> "SiteMapping":
        from clinical_ml.core.ingestion import SOURCE_COLUMNS  # ingestion imports this module

        for source, renames in self.columns.items():
            bad = sorted({t for t in renames.values() if t not in SOURCE_COLUMNS[source]})
            if bad:
                raise ValueError(f"columns.{source}: {bad[:5]} are not columns of the {source} contract")
            targets = list(renames.values())
            if len(set(targets)) != len(targets):
                raise ValueError(
                    f"columns.{source}: two delivered columns renamed to the same contract column"
                )
        for field in (*FIXED_FIELDS, "unit", "site"):
            keys = self._local(field)
            clash = sorted({_key(k) for k in keys if sum(_key(o) == _key(k) for o in keys) > 1})
            conflicting = [k for k in clash if len({keys[o] for o in keys if _key(o) == k}) > 1]
            if conflicting:
                raise ValueError(f"{field}: local values that differ only in case or blanks map differently")
        return self

    def _local(self, field: str) -> dict[str, str]:
        if field == "unit":
            return {k: e.code or k for k, e in self.units.items()}
        if field == "site":
            return dict(self.sites)
        return dict(self.values.get(field, {}))  # type: ignore[call-overload]

    def allowed(self, field: str) -> frozenset[str]:
        """The values of ``field`` that may cross the boundary (besides ``unmapped``)."""
        if field == "unit_type":
            return frozenset(CONTRACT.unit_type)
        if field in FIXED_FIELDS:
            return frozenset(getattr(CONTRACT, field))
        return frozenset(self._local(field).values())

    def table(self, field: str) -> dict[str, str]:
        """Normalized local value -> coded value: every allowed value to itself, then the site's own."""
        out = {_key(v): v for v in self.allowed(field)} | {_key(UNMAPPED): UNMAPPED}
        return out | {_key(k): v for k, v in self._local(field).items()}

    def unit_types(self) -> dict[str, str]:
        """Unit code -> unit type."""
        return {e.code or k: e.type for k, e in self.units.items()}

    def digest(self) -> str:
        """A short hash of the mapping's content (folded into the data version of what it maps)."""
        content = self.model_dump()
        for optional in ("time_zone", "measurement_units", "clock_skew_minutes"):
            if not content[optional]:  # mappings written before the field hash as they did
                del content[optional]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def site_mappings_dir(explicit: str | Path | None = None) -> Path:
    """The mapping folder: ``explicit``, else ``$CLINICAL_ML_SITE_MAPPINGS``, else ``<project>/site_mappings``."""
    return Path(explicit or os.environ.get(SITE_MAPPINGS_ENV) or PROJECT_ROOT / "site_mappings").resolve()


def load_site_mapping(name: str = DEFAULT_MAPPING, *, folder: str | Path | None = None) -> SiteMapping:
    """The mapping ``<folder>/<name>.yaml``, validated.

    Raises
    ------
    SiteMappingError
        Naming the file and the field; a name that is not a plain mapping name is not repeated (it comes from
        a delivered marker).
    """
    if not MAPPING_NAME.match(name):
        raise SiteMappingError(
            "a site mapping name is 1-64 lower-case letters, digits, '_' or '-' (the batch's marker names "
            "another)"
        )
    path = site_mappings_dir(folder) / f"{name}.yaml"
    if not path.is_file():
        raise SiteMappingError(f"{path}: no such site mapping")
    raw = _read_yaml(path)
    try:
        return SiteMapping.model_validate({"name": name, **raw})
    except ValidationError as exc:
        raise SiteMappingError(_errors(path, exc)) from None


def coded_expr(col: pl.Expr, table: Mapping[str, str]) -> pl.Expr:
    """``col`` recoded by a normalized ``table``: missing stays missing, anything the table does not name
    becomes :data:`UNMAPPED`, never the delivered text."""
    norm = normalized(col.cast(pl.String))
    return (
        pl.when(norm.is_null() | (norm == ""))
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(norm.replace_strict(dict(table), default=UNMAPPED, return_dtype=pl.String))
    )


def map_coded_values(
    frame: pl.DataFrame, source: str, mapping: SiteMapping, *, keep_delivered: bool
) -> pl.DataFrame:
    """The coded fields of ``source`` recoded by ``mapping`` (and ``unit_type`` from the unit) in place.

    Parameters
    ----------
    frame
        Patients or encounters (any other source is returned unchanged).
    source
        ``patients`` or ``encounters``.
    mapping
        The site's mapping.
    keep_delivered
        Keep the delivered text beside each field as ``<field>_delivered`` (phi zone only).
    """
    return _mapped(frame, source, mapping, keep_delivered=keep_delivered)[0]


def _distinct_recoding(frame: pl.DataFrame, fields: list[str], mapping: SiteMapping) -> pl.DataFrame:
    """Each distinct value (``value``, null included) of each coded field (``field``) with its rows
    (``rows``) and its recoding (``to``).

    A coded field has few distinct values over many rows: the text work (trim, collapse blanks, upper case)
    is done once per value, not once per row, and for every field in the same few calls, so that a one-row
    frame (a hook call's stay) costs no more than row-by-row recoding did.
    """
    long = frame.select(pl.col(fields).cast(pl.String)).unpivot(variable_name="field", value_name="value")
    to = pl.coalesce(
        pl.when(pl.col("field") == f).then(coded_expr(pl.col("value"), mapping.table(f))) for f in fields
    )
    return long.group_by("field", "value").len("rows").with_columns(to.alias("to"))


def _mapped(
    frame: pl.DataFrame, source: str, mapping: SiteMapping, *, keep_delivered: bool
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """:func:`map_coded_values` and its :func:`_distinct_recoding` (``None`` when no coded field)."""
    fields = [f for f in CODED_FIELDS.get(source, ()) if f in frame.columns]
    if not fields:
        return frame, None
    distinct = _distinct_recoding(frame, fields, mapping)
    by_field = distinct.filter(pl.col("value").is_not_null()).partition_by("field", as_dict=True)
    exprs = [pl.col(f).alias(delivered(f)) for f in fields] if keep_delivered else []
    for f in fields:  # each row takes its value's recoding; null stays null
        known = by_field.get((f,), distinct.clear())
        exprs.append(pl.col(f).cast(pl.String).replace_strict(known["value"], known["to"], default=None))
    out = frame.with_columns(exprs)
    if "unit" in fields:
        types = mapping.unit_types()
        out = out.with_columns(
            pl.when(pl.col("unit").is_null())
            .then(pl.lit(None, dtype=pl.String))
            .otherwise(pl.col("unit").replace_strict(types, default=UNMAPPED, return_dtype=pl.String))
            .alias("unit_type")
        )
    return out, distinct


def unmapped_counts(mapped: pl.DataFrame, source: str) -> tuple[dict[str, int], pl.DataFrame]:
    """Per field, the rows whose delivered value no mapping names (``unmapped:<field>``) and those a mapping
    sent to a catch-all (``Other``/``Unknown``) from another value (``mapped_to_other:<field>``); and the
    delivered values that went unmapped (``field``, ``value``, ``rows``), which may be PHI: phi zone only.

    ``mapped`` is the output of :func:`map_coded_values` with ``keep_delivered=True``.
    """
    counts: dict[str, int] = {}
    frames = []
    for f in CODED_FIELDS.get(source, ()):
        if f not in mapped.columns or delivered(f) not in mapped.columns:
            continue
        is_unmapped = pl.col(f) == UNMAPPED
        to_other = normalized(pl.col(f)).is_in(list(CATCH_ALL)) & (
            normalized(pl.col(delivered(f))) != normalized(pl.col(f))
        )
        n_unmapped, n_other = mapped.select(
            is_unmapped.fill_null(False).sum().alias("u"), to_other.fill_null(False).sum().alias("o")
        ).row(0)
        if n_unmapped:
            counts[f"unmapped:{f}"] = int(n_unmapped)
            frames.append(
                mapped.filter(is_unmapped)
                .group_by(pl.col(delivered(f)).alias("value"))
                .len("rows")
                .select(pl.lit(f).alias("field"), "value", pl.col("rows").cast(pl.Int64))
            )
        if n_other:
            counts[f"mapped_to_other:{f}"] = int(n_other)
    values = (
        pl.concat(frames).sort("field", "rows", "value", descending=[False, True, False])
        if frames
        else pl.DataFrame(schema={"field": pl.String, "value": pl.String, "rows": pl.Int64})
    )
    return counts, values


def enforce_controlled_values(
    frame: pl.DataFrame, source: str, mapping: SiteMapping
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The boundary's value allowlist: coded fields recoded by ``mapping`` (idempotent on mapped values), and
    per field how many present values were not vocabulary values and became ``unmapped`` here."""
    if source == "encounters" and "unit_type" in frame.columns:
        frame = frame.drop("unit_type")  # derived again from the unit
    out, distinct = _mapped(frame, source, mapping, keep_delivered=False)
    if distinct is None:
        return out, {}
    became = dict(
        distinct.filter((pl.col("to") == UNMAPPED) & (normalized(pl.col("value")) != _key(UNMAPPED)))
        .group_by("field")
        .agg(pl.col("rows").sum())
        .iter_rows()
    )
    return out, {f: int(became[f]) for f in CODED_FIELDS[source] if became.get(f)}


def unmapped_shares(warnings: Mapping[str, int], rows: int) -> dict[str, float]:
    """Per coded field, the share of ``rows`` that went to ``unmapped`` or that a mapping sent to Other/Unknown
    (from the counts of :func:`unmapped_counts`)."""
    shares: dict[str, float] = {}
    for key, n in warnings.items():
        kind, _, field = key.partition(":")
        if kind in ("unmapped", "mapped_to_other") and rows:
            shares[field] = shares.get(field, 0.0) + n / rows
    return shares


def mapping_markdown() -> str:
    """The fixed vocabularies as Markdown (part of the generated landing contract)."""
    lines = ["| field | values |", "|---|---|"]
    for field in (*FIXED_FIELDS, "unit_type"):
        lines.append(f"| `{field}` | {', '.join(f'`{v}`' for v in getattr(CONTRACT, field))} |")
    return "\n".join(lines)
