"""The anonymization boundary: raw (phi) cohorts in, de-identified cohorts and MEDS events out.

Mechanisms (see DESIGN.md):

* allowlist: only the columns named in ``DEID_COLUMNS`` leave; everything else is dropped and counted (a
  dropped column is named only when its name is one of the contract's or a known extra, else by position:
  a delivered header can hold anything);
* controlled values: the coded columns (sex, race, ethnicity, admission type, unit, unit type, site,
  discharge disposition, payer) leave only as values of their vocabularies or the site's declared codes
  (:mod:`clinical_ml.core.site_mapping`, applied again here whatever ingestion did); anything else becomes
  ``unmapped`` and is counted;
* pseudonyms, two modes: random surrogate ids (not derived from any identifier), the mapping kept in a
  vault that lives in the phi zone (the default, HIPAA Safe Harbor); or keyed HMAC-SHA256 under a secret
  (GDPR pseudonymisation, :mod:`clinical_ml.core.pseudonyms`). Either way the same MRN (trimmed, upper
  case) always maps to the same ``subject_id``, whichever batch or source it arrives in;
* free text (``note``, ``comment``) is never on the allowlist: dropped, counted, never scrubbed and passed;
* dates: one random shift per patient, a whole number of weeks (weekday kept), intervals preserved
  exactly; the real year-quarter of admission is kept as ``period`` for temporal validation and drift;
* ages 90 and over become 90 (read "90+"), and no birth date implies an older age;
* ZIP codes cut to 3 digits, ``000`` for the sparsely populated prefixes of ``RESTRICTED_ZIP3``;
* hospital-supplied labels become events ``LABEL//<name>`` of their stay (the name a code of the hospital's
  vocabulary, checked again here), at the shifted event time (or review time) and available at the shifted
  review time; their encounter may be one of an earlier batch, tied to its patient at validation.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl

from clinical_ml.core.ingestion import (
    KNOWN_EXTRA_COLUMNS,
    LABEL_NAME_PATTERN,
    LABEL_PATIENT,
    SOURCE_COLUMNS,
    default_site_mapping,
)
from clinical_ml.core.pseudonyms import HmacKey, hmac_ids, hmac_shift_days, normalize_identifier
from clinical_ml.core.site_mapping import (
    CODED_FIELDS,
    UNMAPPED,
    SiteMapping,
    delivered,
    enforce_controlled_values,
)

AGE_CAP = 90
RESTRICTED_ZIP3_FILE = Path(__file__).with_name("restricted_zip3.json")
RESTRICTED_ZIP3: frozenset[str] = frozenset(json.loads(RESTRICTED_ZIP3_FILE.read_text())["prefixes"])

# The allowlist: the only columns that may exist in the de-identified zone, per table.
DEID_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients": ("subject_id", "sex", "race", "ethnicity", "zip3"),
    "encounters": (
        "subject_id",
        "hadm_id",
        "admit_time",
        "discharge_time",
        "death_time",
        "admission_type",
        "unit",
        "unit_type",
        "site",
        "discharge_disposition",
        "payer",
        "age_years",
        "period",
        "batch_id",
    ),
    "events": ("subject_id", "time", "code", "numeric_value", "hadm_id", "available_time", "implausible"),
}

# Columns holding free text in some exports: never allowlisted, reported apart so a reviewer sees them go.
FREE_TEXT_COLUMNS = frozenset({"note", "notes", "comment", "comments", "free_text"})

VAULT_PATIENT_SCHEMA = {"mrn": pl.String, "subject_id": pl.Int64, "shift_days": pl.Int32}
VAULT_ENCOUNTER_SCHEMA = {"encounter_id": pl.String, "hadm_id": pl.Int64}


@dataclass(frozen=True)
class Vault:
    """Pseudonym mappings; phi-zone only."""

    patients: pl.DataFrame
    encounters: pl.DataFrame

    @classmethod
    def empty(cls) -> "Vault":
        return cls(pl.DataFrame(schema=VAULT_PATIENT_SCHEMA), pl.DataFrame(schema=VAULT_ENCOUNTER_SCHEMA))


@dataclass(frozen=True)
class DeidBatch:
    """One batch after anonymization, plus the counts a privacy officer reads.

    ``vault`` is what must be persisted in the phi zone when ``persist_vault`` is true (vault mode); in
    HMAC mode it holds this batch's keyed mapping only, for tests, and nothing needs storing.
    """

    patients: pl.DataFrame
    encounters: pl.DataFrame
    events: pl.DataFrame
    vault: Vault
    dropped_columns: dict[str, list[str]] = field(default_factory=dict)
    free_text_dropped: dict[str, list[str]] = field(default_factory=dict)
    ages_capped: int = 0
    zip3_restricted: int = 0
    new_pseudonyms: int = 0
    pseudonym_mode: str = "vault"
    persist_vault: bool = True
    orphan_events: int = 0
    label_events: int = 0
    """Hospital-supplied labels released as ``LABEL//<name>`` events (before any suppression)."""
    orphan_labels: int = 0
    """Labels whose encounter could not be tied to a patient, or whose name is not a label code: not
    released."""
    unmapped_at_boundary: dict[str, int] = field(default_factory=dict)
    """Per coded field, values that were not controlled values when they reached the boundary and left as
    ``unmapped`` (ingestion maps them first, so this is zero unless a caller bypassed it)."""
    unmapped_released: dict[str, int] = field(default_factory=dict)
    """Per coded field, rows leaving with the value ``unmapped``."""
    events_plan: pl.LazyFrame | None = None
    """Streaming mode (labs and vitals given as LazyFrames): every event of the batch as a lazy plan, to be
    sunk (``sink_parquet``) rather than held; ``events`` is then empty. ``None`` otherwise."""


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of a 1-D array, by one sort (numpy 2.3's ``unique`` takes 3x as long on int64)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


def _fresh_ids(n: int, taken: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        cand = _sorted_unique(rng.integers(10**9, 2**53, size=(n - out.size) * 2, dtype=np.int64))
        cand = cand[~np.isin(cand, taken)]
        out = _sorted_unique(np.concatenate([out, cand]))
    return rng.permutation(out)[:n]


def _new_keys(seen: pl.Series, known: pl.Series) -> pl.Series:
    keys = seen.drop_nulls().unique()
    return keys.filter(~keys.is_in(known.implode())).sort()


def extend_vault(
    vault: Vault,
    *,
    mrns: pl.Series,
    encounter_ids: pl.Series,
    max_shift_weeks: int = 52,
    rng: np.random.Generator | None = None,
) -> Vault:
    """Give every new MRN a random ``subject_id`` and date shift, every new encounter a random ``hadm_id``.

    Parameters
    ----------
    vault
        Existing mappings; never changed for known keys.
    mrns, encounter_ids
        Keys seen in this batch, normalized with :func:`~clinical_ml.core.pseudonyms.normalize_identifier`.
    max_shift_weeks
        Shifts are drawn uniformly from ``[-max_shift_weeks, max_shift_weeks]`` weeks, zero excluded.
    rng
        Source of randomness; fresh OS entropy when not given (surrogates must not be reproducible from
        anything outside the vault).
    """
    rng = rng or np.random.default_rng()
    new_mrn = _new_keys(mrns, vault.patients["mrn"])
    new_enc = _new_keys(encounter_ids, vault.encounters["encounter_id"])
    weeks = rng.integers(1, max_shift_weeks + 1, new_mrn.len()) * rng.choice([-1, 1], new_mrn.len())
    patients = pl.concat(
        [
            vault.patients,
            pl.DataFrame(
                {
                    "mrn": new_mrn,
                    "subject_id": _fresh_ids(new_mrn.len(), vault.patients["subject_id"].to_numpy(), rng),
                    "shift_days": (weeks * 7).astype(np.int32),
                },
                schema=VAULT_PATIENT_SCHEMA,
            ),
        ]
    )
    encounters = pl.concat(
        [
            vault.encounters,
            pl.DataFrame(
                {
                    "encounter_id": new_enc,
                    "hadm_id": _fresh_ids(new_enc.len(), vault.encounters["hadm_id"].to_numpy(), rng),
                },
                schema=VAULT_ENCOUNTER_SCHEMA,
            ),
        ]
    )
    return Vault(patients, encounters)


def keyed_mapping(
    *, mrns: pl.Series, encounter_ids: pl.Series, key: HmacKey, max_shift_weeks: int = 52
) -> Vault:
    """The HMAC-mode mapping of this batch's keys, in the vault's shape (recomputable, never stored).

    Parameters
    ----------
    mrns, encounter_ids
        Normalized keys seen in this batch.
    key
        The secret; the same key gives the same pseudonyms and shifts in every batch.
    max_shift_weeks
        Shift range in whole weeks, zero excluded.
    """
    mrn = mrns.drop_nulls().unique().sort()
    enc = encounter_ids.drop_nulls().unique().sort()
    patients = pl.DataFrame(
        {
            "mrn": mrn,
            "subject_id": hmac_ids(mrn, key=key, kind="subject"),
            "shift_days": hmac_shift_days(mrn, key=key, max_shift_weeks=max_shift_weeks),
        },
        schema=VAULT_PATIENT_SCHEMA,
    )
    encounters = pl.DataFrame(
        {"encounter_id": enc, "hadm_id": hmac_ids(enc, key=key, kind="hadm")}, schema=VAULT_ENCOUNTER_SCHEMA
    )
    return Vault(patients, encounters)


def generalize_zip(zip_col: pl.Expr) -> pl.Expr:
    """First three digits of a US ZIP code, ``000`` for restricted prefixes, null when not a ZIP."""
    z3 = zip_col.str.strip_chars().str.extract(r"^(\d{3})\d{2}(?:-\d{4})?$", 1)
    return pl.when(z3.is_in(list(RESTRICTED_ZIP3))).then(pl.lit("000")).otherwise(z3)


def age_in_years(birth: pl.Expr, at: pl.Expr) -> pl.Expr:
    """Completed years between a birth date and a time, capped at ``AGE_CAP`` (90 means 90 or over)."""
    years = at.dt.year() - birth.dt.year()
    had_birthday = (at.dt.month() > birth.dt.month()) | (
        (at.dt.month() == birth.dt.month()) & (at.dt.day() >= birth.dt.day())
    )
    age = years - pl.when(had_birthday).then(0).otherwise(1)
    return pl.min_horizontal(age, pl.lit(AGE_CAP)).cast(pl.Int32)


def year_quarter(ts: pl.Expr) -> pl.Expr:
    return pl.format("{}Q{}", ts.dt.year(), ts.dt.quarter())


def _shift(col: str) -> pl.Expr:
    return pl.col(col) + pl.duration(days=pl.col("shift_days"))


# (code column, event time, availability time, MEDS code prefix) of each measurement source
_LAB = ("loinc_code", "specimen_time", "result_time", "LAB//")
_VITAL = ("code", "charted_time", "stored_time", "VITAL//")


def _measurements(
    events: pl.DataFrame | pl.LazyFrame, keys: pl.DataFrame, spec: tuple[str, ...], *, on: str
) -> pl.LazyFrame:
    """Lab or vital rows joined to their admission's pseudonyms and shift, in MEDS form, in one lazy pass.

    Row order follows the parallel hash join (not the delivery): the MEDS writer sorts each shard.
    """
    code, at, available, prefix = spec
    right = keys.filter(pl.col(on).is_not_null()).select(on, "subject_id", "hadm_id", "shift_days")
    return (
        events.lazy()
        .join(right.lazy(), left_on="encounter_id", right_on=on, how="inner")
        .select(
            "subject_id",
            _shift(at).alias("time"),
            _meds_code(events, code, prefix).alias("code"),
            pl.col("value").cast(pl.Float32).alias("numeric_value"),
            "hadm_id",
            _shift(available).alias("available_time"),
            "implausible",
        )
    )


def _meds_code(events: pl.DataFrame | pl.LazyFrame, code: str, prefix: str) -> pl.Expr:
    """The MEDS code, ``prefix`` + the delivered code.

    In memory it is gathered from the few distinct prefixed codes instead of concatenated row by row: a code
    longer than 12 bytes would otherwise cost one string allocation per event. Streaming (Parquet in and
    out), it is concatenated: finding the distinct codes first would be one more pass over the source, and
    at 50M events the sink took as long either way (the Parquet writer's encoding dominates).
    """
    if isinstance(events, pl.LazyFrame):
        return pl.lit(prefix) + pl.col(code)
    distinct = events[code].drop_nulls().unique().sort()
    return pl.lit(prefix + distinct).gather(pl.col(code).cast(pl.Enum(distinct.to_list())).to_physical())


def _streamed_measurements(
    sources: tuple[tuple[pl.LazyFrame, tuple[str, ...]], ...], keys: pl.DataFrame
) -> tuple[list[pl.LazyFrame], int]:
    """The streaming form of the event join: lazy plans that never hold the events, and the orphan count.

    One pass per source over its encounter numbers finds the few spellings that are not the delivered
    ``_raw`` ones (with their row counts); those that normalize to an admission of the batch are added to
    the lookup table, so that a single hash join per source gives exactly the rows of the in-memory path
    (delivered spelling, then normalized spelling); the others, and null encounter numbers, are orphans.
    """
    raw_keys = keys["_raw"].drop_nulls().implode()
    odd = pl.concat(
        [
            f.select("encounter_id")
            .filter(pl.col("encounter_id").is_null() | ~pl.col("encounter_id").is_in(raw_keys))
            .group_by("encounter_id")
            .len()
            for f, _ in sources
        ]
    ).collect(engine="streaming")
    by_norm = keys.unique("encounter_id", keep="first", maintain_order=True).select(
        "encounter_id", "subject_id", "hadm_id", "shift_days"
    )
    respelled = (
        odd.filter(pl.col("encounter_id").is_not_null())
        .with_columns(normalize_identifier(pl.col("encounter_id")).alias("_norm"))
        .join(by_norm.filter(pl.col("encounter_id").is_not_null()), left_on="_norm", right_on="encounter_id")
    )
    orphans = int(odd["len"].sum()) - int(respelled["len"].sum())
    lookup = pl.concat(
        [
            keys.select("_raw", "subject_id", "hadm_id", "shift_days"),
            respelled.select(pl.col("encounter_id").alias("_raw"), "subject_id", "hadm_id", "shift_days"),
        ]
    )
    plans = [_measurements(f, lookup, spec, on="_raw") for f, spec in sources]
    return plans, orphans


LABEL_CODE_PREFIX = "LABEL//"


def _label_rows(labels: pl.DataFrame | None, encounters: pl.DataFrame) -> pl.DataFrame:
    """Label rows keyed as pseudonyms are: ``encounter_id`` normalized and ``_key`` the normalized MRN of its
    patient (found at validation, else the batch's admission with that number; null when neither)."""
    columns: dict[str, pl.DataType | type[pl.DataType]] = {
        "encounter_id": pl.String,
        "label": pl.String,
        "value": pl.Boolean,
        "event_time": pl.Datetime("us"),
        "recorded_time": pl.Datetime("us"),
    }
    if labels is None:
        return pl.DataFrame(schema={**columns, "_key": pl.String})
    mrn = pl.col(LABEL_PATIENT) if LABEL_PATIENT in labels.columns else pl.lit(None, dtype=pl.String)
    rows = labels.select(
        normalize_identifier(pl.col("encounter_id")).alias("encounter_id"),
        pl.col("label").cast(pl.String),
        pl.col("value").cast(pl.Boolean),
        pl.col("event_time").cast(pl.Datetime("us")),
        pl.col("recorded_time").cast(pl.Datetime("us")),
        normalize_identifier(mrn).alias("_key"),
    )
    in_batch = encounters.select("encounter_id", pl.col("_key").alias("_batch_key")).unique("encounter_id")
    return (
        rows.join(in_batch, on="encounter_id", how="left", maintain_order="left")
        .with_columns(pl.coalesce("_key", "_batch_key").alias("_key"))
        .drop("_batch_key")
    )


def _label_events(rows: pl.DataFrame, patients: pl.DataFrame, encounters: pl.DataFrame) -> pl.DataFrame:
    """Labels in MEDS form: the patient's pseudonym and shift, the stay's ``hadm_id``; only names that are
    label codes (any other text is treated as PHI and never crosses)."""
    return (
        rows.filter(pl.col("label").str.contains(LABEL_NAME_PATTERN) & pl.col("value").is_not_null())
        .join(patients, on="_key", how="inner")
        .join(encounters, on="encounter_id", how="inner")
        .select(
            "subject_id",
            (pl.coalesce("event_time", "recorded_time") + pl.duration(days=pl.col("shift_days"))).alias(
                "time"
            ),
            (pl.lit(LABEL_CODE_PREFIX) + pl.col("label")).alias("code"),
            pl.col("value").cast(pl.Float32).alias("numeric_value"),
            "hadm_id",
            _shift("recorded_time").alias("available_time"),
            pl.lit(False).alias("implausible"),
        )
    )


# Column names that may be repeated in the privacy record: the contract's, ingestion's own and known extras.
_NAMEABLE = (
    {c for cols in SOURCE_COLUMNS.values() for c in cols}
    | KNOWN_EXTRA_COLUMNS
    | {delivered(f) for fields in CODED_FIELDS.values() for f in fields}
    | {"unit_type", "value_raw", "unit_raw", "unit_known", "implausible", LABEL_PATIENT}
)


def _dropped(frame: pl.DataFrame, table: str) -> list[str]:
    """The columns the allowlist drops: by name when the name is a known one, else ``column_<position>``."""
    out = []
    for i, name in enumerate(frame.columns):
        if name in DEID_COLUMNS[table] or name in ("row_number", "_key", "_raw"):
            continue
        out.append(name if name in _NAMEABLE or re.fullmatch(r"extra_\d{1,4}", name) else f"column_{i + 1}")
    return sorted(out)


Frame = TypeVar("Frame", pl.DataFrame, pl.LazyFrame)


def encounter_events(stays: Frame) -> Frame:
    """Admission, ICU unit, discharge and death events of each stay (``subject_id``, ``hadm_id``, the stay's
    times and coded columns), as MEDS rows: available when they happen, never implausible. Shared by the
    anonymizer and the real-data adapters.

    With a ``unit_type`` column (the site mapping's type of each unit), only a stay in an ICU gets its
    ``ICU_UNIT//<unit>`` event: a ward or emergency-department stay has no ICU admission to anchor on.
    """
    in_icu = pl.col("unit_type") == "ICU" if "unit_type" in stays.collect_schema().names() else pl.lit(True)

    def one(time_col: str, code: pl.Expr, where: pl.Expr | None = None) -> Frame:
        kept = pl.col(time_col).is_not_null() & (True if where is None else where.fill_null(False))
        return stays.filter(kept).select(
            "subject_id",
            pl.col(time_col).alias("time"),
            code.alias("code"),
            pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
            "hadm_id",
            pl.col(time_col).alias("available_time"),
            pl.lit(False).alias("implausible"),
        )

    return pl.concat(
        [
            one("admit_time", pl.format("ADMISSION//{}", pl.col("admission_type"))),
            one("admit_time", pl.format("ICU_UNIT//{}", pl.col("unit")), in_icu),
            one("discharge_time", pl.format("HOSPITAL_DISCHARGE//{}", pl.col("discharge_disposition"))),
            one("death_time", pl.lit("MEDS_DEATH")),
        ]
    )


def anonymize_batch(
    *,
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
    labs: pl.DataFrame | pl.LazyFrame,
    vitals: pl.DataFrame | pl.LazyFrame,
    vault: Vault,
    batch_id: str,
    labels: pl.DataFrame | None = None,
    max_shift_weeks: int = 52,
    rng: np.random.Generator | None = None,
    hmac_key: HmacKey | None = None,
    site_mapping: SiteMapping | None = None,
) -> DeidBatch:
    """De-identify one batch of raw cohorts.

    Parameters
    ----------
    patients, encounters, labs, vitals
        Validated raw frames of one batch (any of them may have zero rows). ``labs`` and ``vitals`` may
        be LazyFrames (e.g. ``pl.scan_parquet`` of the raw zone): the events are then returned as a lazy
        plan in ``events_plan``, never held in memory (``events`` is empty), with the same rows and the
        same ``orphan_events`` as the in-memory path.
    vault
        Random-surrogate mappings so far (vault mode); unused and returned unchanged in HMAC mode.
    batch_id
        Kept as a column so every row can be traced to its delivery.
    labels
        Validated hospital-supplied labels of the batch (``encounter_id``, ``label``, ``value``,
        ``event_time``, ``recorded_time`` and the ``mrn`` of the encounter's patient found at validation), or
        ``None``. The encounter may be one of an earlier batch: the patient's pseudonym and shift are then
        the ones it got there.
    max_shift_weeks
        Per-patient date shifts are whole weeks in ``[-max, -1] U [1, max]``.
    rng
        Randomness of new surrogates and shifts (vault mode); OS entropy when not given.
    hmac_key
        When given, pseudonyms and shifts are keyed HMAC-SHA256 instead of random.
    site_mapping
        The batch's site mapping (its unit and site codes, unit types and value tables); the default
        mapping when not given. Coded values are recoded by it again here: only controlled values and
        ``unmapped`` leave.

    Returns
    -------
    DeidBatch
        Frames containing only ``DEID_COLUMNS``; events in MEDS form (``subject_id``, ``time``, ``code``,
        ``numeric_value``) with ``hadm_id`` and ``available_time`` (when the value could first be seen by a
        clinician or a model) as extension columns. Events are not sorted: the MEDS writer sorts each shard.
    """
    site = site_mapping or default_site_mapping()
    dropped = {"patients": _dropped(patients, "patients"), "encounters": _dropped(encounters, "encounters")}
    if "payer" not in encounters.columns:  # ingested before the contract had it: not delivered
        encounters = encounters.with_columns(pl.lit(None, dtype=pl.String).alias("payer"))
    patients, unmapped_pat = enforce_controlled_values(patients, "patients", site)
    encounters, unmapped_enc = enforce_controlled_values(encounters, "encounters", site)
    patients = patients.with_columns(normalize_identifier(pl.col("mrn")).alias("_key"))
    encounters = encounters.with_columns(
        normalize_identifier(pl.col("mrn")).alias("_key"),
        pl.col("encounter_id").alias("_raw"),
        normalize_identifier(pl.col("encounter_id")).alias("encounter_id"),
    )
    label_rows = _label_rows(labels, encounters)
    tied = label_rows.filter(pl.col("_key").is_not_null())
    mrns = pl.concat([patients["_key"], encounters["_key"], tied["_key"]])
    # Events of an encounter not delivered in this batch cannot be tied to a patient: they get no hadm_id
    # here and are counted as orphans below. Labels can: validation found their patient.
    enc_ids = pl.concat([encounters["encounter_id"], tied["encounter_id"]])
    if hmac_key is None:
        known_before = vault.patients.height
        vault = extend_vault(
            vault, mrns=mrns, encounter_ids=enc_ids, max_shift_weeks=max_shift_weeks, rng=rng
        )
        mapping, new_pseudonyms = vault, vault.patients.height - known_before
    else:
        mapping = keyed_mapping(
            mrns=mrns, encounter_ids=enc_ids, key=hmac_key, max_shift_weeks=max_shift_weeks
        )
        new_pseudonyms = 0
    free_text = {t: [c for c in cols if c in FREE_TEXT_COLUMNS] for t, cols in dropped.items()}
    pseud = mapping.patients.rename({"mrn": "_key"})
    births = patients.select("_key", "birth_date").unique("_key", keep="first", maintain_order=True)
    enc = (
        encounters.drop("mrn")
        .join(pseud, on="_key", how="left")
        .join(mapping.encounters, on="encounter_id", how="left")
        .join(births, on="_key", how="left")
        .with_columns(
            age_in_years(pl.col("birth_date"), pl.col("admit_time")).alias("age_years"),
            year_quarter(pl.col("admit_time")).alias("period"),
            pl.lit(batch_id, dtype=pl.String).alias("batch_id"),
            _shift("admit_time").alias("admit_time"),
            _shift("discharge_time").alias("discharge_time"),
            _shift("death_time").alias("death_time"),
        )
    )
    ages_capped = int((enc["age_years"] >= AGE_CAP).sum())
    deid_enc = enc.select(DEID_COLUMNS["encounters"])

    pat = patients.unique("_key", keep="first", maintain_order=True).join(pseud, on="_key", how="left")
    pat = pat.with_columns(generalize_zip(pl.col("zip")).alias("zip3"))
    zip_restricted = int((pat["zip3"] == "000").sum())
    deid_pat = pat.select(DEID_COLUMNS["patients"])

    keys = enc.select("_raw", "encounter_id", "subject_id", "hadm_id", "shift_days").unique("_raw")
    streaming = isinstance(labs, pl.LazyFrame) or isinstance(vitals, pl.LazyFrame)
    stay = enc.lazy().select(
        "subject_id",
        "hadm_id",
        "admit_time",
        "discharge_time",
        "death_time",
        "admission_type",
        "unit",
        *(["unit_type"] if "unit_type" in enc.columns else []),
        "discharge_disposition",
        "age_years",
        "birth_date",
        "shift_days",
    )

    # Birth: the shifted birth date, except at 90+ where it is set so that it implies exactly 90.
    birth = stay.filter(pl.col("birth_date").is_not_null()).select(
        "subject_id",
        pl.when(pl.col("age_years") >= AGE_CAP)
        .then(pl.col("admit_time").dt.offset_by(f"-{AGE_CAP}y").dt.date())
        .otherwise(pl.col("birth_date") + pl.duration(days=pl.col("shift_days")))
        .cast(pl.Datetime("us"))
        .alias("time"),
        pl.lit("MEDS_BIRTH").alias("code"),
        pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
        pl.lit(None, dtype=pl.Int64).alias("hadm_id"),
        pl.lit(None, dtype=pl.Datetime("us")).alias("available_time"),
        pl.lit(False).alias("implausible"),
    )
    labelled = _label_events(label_rows, pseud, mapping.encounters)
    stay_events = pl.concat(
        [birth, encounter_events(stay), labelled.lazy()], how="vertical_relaxed"
    ).collect()
    if streaming:
        lazy_sources = ((labs.lazy(), _LAB), (vitals.lazy(), _VITAL))
        plans, unmatched = _streamed_measurements(lazy_sources, keys)
        events_plan: pl.LazyFrame | None = pl.concat(
            [stay_events.lazy(), *plans], how="vertical_relaxed"
        ).select(DEID_COLUMNS["events"])
        events = stay_events.select(DEID_COLUMNS["events"]).head(0)
    else:
        assert isinstance(labs, pl.DataFrame) and isinstance(vitals, pl.DataFrame)
        events, unmatched = _measured_in_memory(((labs, _LAB), (vitals, _VITAL)), keys, stay_events)
        events_plan = None
    return DeidBatch(
        patients=deid_pat,
        encounters=deid_enc,
        events=events,
        vault=mapping,
        dropped_columns=dropped,
        free_text_dropped=free_text,
        ages_capped=ages_capped,
        zip3_restricted=zip_restricted,
        new_pseudonyms=new_pseudonyms,
        pseudonym_mode="vault" if hmac_key is None else "hmac",
        orphan_events=unmatched,
        label_events=labelled.height,
        orphan_labels=label_rows.height - labelled.height,
        persist_vault=hmac_key is None,
        unmapped_at_boundary=unmapped_pat | unmapped_enc,
        unmapped_released=_unmapped_rows(deid_pat) | _unmapped_rows(deid_enc),
        events_plan=events_plan,
    )


def _unmapped_rows(frame: pl.DataFrame) -> dict[str, int]:
    coded = [c for c in frame.columns if frame[c].dtype == pl.String and c not in ("period", "batch_id")]
    counts = frame.select((pl.col(c) == UNMAPPED).sum() for c in coded).row(0, named=True) if coded else {}
    return {c: int(n) for c, n in counts.items() if n}


def _measured_in_memory(
    sources: tuple[tuple[pl.DataFrame, tuple[str, ...]], ...], keys: pl.DataFrame, stay_events: pl.DataFrame
) -> tuple[pl.DataFrame, int]:
    """Stay and measurement events in one frame, and how many measurements found no admission."""
    # The common case looks up the encounter number as delivered: no string work on the event rows.
    measured = [_measurements(f, keys, spec, on="_raw") for f, spec in sources]
    events = (
        pl.concat([stay_events.lazy(), *measured], how="vertical_relaxed")
        .select(DEID_COLUMNS["events"])
        .collect()
    )
    unmatched = sum(f.height for f, _ in sources) - (events.height - stay_events.height)
    if unmatched:
        # Another spelling of the encounter number (case, spaces), or an admission not in this batch.
        respelled = [
            _measurements(
                f.filter(~pl.col("encounter_id").is_in(keys["_raw"].implode())).with_columns(
                    normalize_identifier(pl.col("encounter_id")).alias("encounter_id")
                ),
                keys.unique("encounter_id", keep="first", maintain_order=True),
                spec,
                on="encounter_id",
            )
            for f, spec in sources
        ]
        extra = pl.concat(respelled, how="vertical_relaxed").select(DEID_COLUMNS["events"]).collect()
        events = pl.concat([events, extra], how="vertical_relaxed")
        unmatched -= extra.height
    return events, unmatched


def k_anonymity(frame: pl.DataFrame, quasi_identifiers: list[str], *, k: int = 5) -> dict[str, float]:
    """Smallest equivalence class, share of records in classes below ``k``, and max prosecutor risk."""
    if frame.height == 0:
        return {"k_min": 0, "share_below_k": 0.0, "max_prosecutor_risk": 0.0, "n_classes": 0}
    sizes = frame.group_by(quasi_identifiers).len()["len"]
    below = int(sizes.filter(sizes < k).sum())
    return {
        "k_min": int(sizes.min()),  # type: ignore[arg-type]
        "share_below_k": below / frame.height,
        "max_prosecutor_risk": 1.0 / int(sizes.min()),  # type: ignore[arg-type]
        "n_classes": sizes.len(),
    }
