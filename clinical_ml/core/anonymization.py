"""The anonymization boundary: raw (phi) cohorts in, de-identified cohorts and MEDS events out.

Mechanisms (see DESIGN.md):

* allowlist: only the columns named in ``DEID_COLUMNS`` leave; everything else is dropped and counted;
* pseudonyms: random surrogate ids (not derived from any identifier), the mapping kept in a vault that
  lives in the phi zone; the same MRN always maps to the same ``subject_id``;
* dates: one random shift per patient, a whole number of weeks (weekday kept), intervals preserved
  exactly; the real year-quarter of admission is kept as ``period`` for temporal validation and drift;
* ages 90 and over become 90 (read "90+"), and no birth date implies an older age;
* ZIP codes cut to 3 digits, ``000`` for the sparsely populated prefixes of ``RESTRICTED_ZIP3``.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

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
        "site",
        "discharge_disposition",
        "age_years",
        "period",
        "batch_id",
    ),
    "events": ("subject_id", "time", "code", "numeric_value", "hadm_id", "available_time", "implausible"),
}

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
    """One batch after anonymization, plus the counts a privacy officer reads."""

    patients: pl.DataFrame
    encounters: pl.DataFrame
    events: pl.DataFrame
    vault: Vault
    dropped_columns: dict[str, list[str]] = field(default_factory=dict)
    ages_capped: int = 0
    zip3_restricted: int = 0
    new_pseudonyms: int = 0


def _fresh_ids(n: int, taken: set[int], rng: np.random.Generator) -> np.ndarray:
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        cand = np.unique(rng.integers(10**9, 2**53, size=(n - out.size) * 2, dtype=np.int64))
        cand = cand[~np.isin(cand, np.fromiter(taken, dtype=np.int64, count=len(taken)))]
        out = np.unique(np.concatenate([out, cand]))
    return rng.permutation(out)[:n]


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
        Keys seen in this batch.
    max_shift_weeks
        Shifts are drawn uniformly from ``[-max_shift_weeks, max_shift_weeks]`` weeks, zero excluded.
    rng
        Source of randomness; fresh OS entropy when not given (surrogates must not be reproducible from
        anything outside the vault).
    """
    rng = rng or np.random.default_rng()
    seen_mrn = mrns.drop_nulls().unique()
    new_mrn = seen_mrn.filter(~seen_mrn.is_in(vault.patients["mrn"].implode()))
    seen_enc = encounter_ids.drop_nulls().unique()
    new_enc = seen_enc.filter(~seen_enc.is_in(vault.encounters["encounter_id"].implode()))
    weeks = rng.integers(1, max_shift_weeks + 1, new_mrn.len()) * rng.choice([-1, 1], new_mrn.len())
    patients = pl.concat(
        [
            vault.patients,
            pl.DataFrame(
                {
                    "mrn": new_mrn.sort(),
                    "subject_id": _fresh_ids(new_mrn.len(), set(vault.patients["subject_id"].to_list()), rng),
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
                    "encounter_id": new_enc.sort(),
                    "hadm_id": _fresh_ids(new_enc.len(), set(vault.encounters["hadm_id"].to_list()), rng),
                },
                schema=VAULT_ENCOUNTER_SCHEMA,
            ),
        ]
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


def anonymize_batch(
    *,
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
    labs: pl.DataFrame,
    vitals: pl.DataFrame,
    vault: Vault,
    batch_id: str,
    max_shift_weeks: int = 52,
    rng: np.random.Generator | None = None,
) -> DeidBatch:
    """De-identify one batch of raw cohorts.

    Returns a :class:`DeidBatch` whose frames contain only ``DEID_COLUMNS``; events are in MEDS form
    (``subject_id``, ``time``, ``code``, ``numeric_value``) with ``hadm_id`` and ``available_time`` (when
    the value could first be seen by a clinician or a model) as extension columns.
    """
    known_before = vault.patients.height
    vault = extend_vault(
        vault,
        mrns=pl.concat([patients["mrn"], encounters["mrn"]]),
        encounter_ids=pl.concat([encounters["encounter_id"], labs["encounter_id"], vitals["encounter_id"]]),
        max_shift_weeks=max_shift_weeks,
        rng=rng,
    )
    dropped = {
        "patients": sorted(set(patients.columns) - set(DEID_COLUMNS["patients"]) - {"row_number"}),
        "encounters": sorted(set(encounters.columns) - set(DEID_COLUMNS["encounters"]) - {"row_number"}),
    }
    pseud = vault.patients
    births = patients.select("mrn", "birth_date").unique("mrn", keep="first")
    enc = (
        encounters.join(pseud, on="mrn", how="left")
        .join(vault.encounters, on="encounter_id", how="left")
        .join(births, on="mrn", how="left")
        .with_columns(
            age_in_years(pl.col("birth_date"), pl.col("admit_time")).alias("age_years"),
            year_quarter(pl.col("admit_time")).alias("period"),
            pl.lit(batch_id).alias("batch_id"),
            _shift("admit_time").alias("admit_time"),
            _shift("discharge_time").alias("discharge_time"),
            _shift("death_time").alias("death_time"),
        )
    )
    ages_capped = int((enc["age_years"] >= AGE_CAP).sum())
    deid_enc = enc.select(DEID_COLUMNS["encounters"])

    pat = patients.unique("mrn", keep="first").join(pseud, on="mrn", how="left")
    pat = pat.with_columns(generalize_zip(pl.col("zip")).alias("zip3"))
    zip_restricted = int((pat["zip3"] == "000").sum())
    deid_pat = pat.select(DEID_COLUMNS["patients"])

    enc_keys = enc.select("encounter_id", "subject_id", "hadm_id", "shift_days")
    lab_events = labs.join(enc_keys, on="encounter_id", how="inner").select(
        "subject_id",
        _shift("specimen_time").alias("time"),
        pl.format("LAB//{}", pl.col("loinc_code")).alias("code"),
        pl.col("value").cast(pl.Float32).alias("numeric_value"),
        "hadm_id",
        _shift("result_time").alias("available_time"),
        "implausible",
    )
    vital_events = vitals.join(enc_keys, on="encounter_id", how="inner").select(
        "subject_id",
        _shift("charted_time").alias("time"),
        pl.format("VITAL//{}", pl.col("code")).alias("code"),
        pl.col("value").cast(pl.Float32).alias("numeric_value"),
        "hadm_id",
        _shift("stored_time").alias("available_time"),
        "implausible",
    )
    stay = enc.select(
        "subject_id",
        "hadm_id",
        "admit_time",
        "discharge_time",
        "death_time",
        "admission_type",
        "unit",
        "discharge_disposition",
        "age_years",
        "birth_date",
        "shift_days",
    )

    def _stay_event(time_col: str, code: pl.Expr) -> pl.DataFrame:
        return stay.filter(pl.col(time_col).is_not_null()).select(
            "subject_id",
            pl.col(time_col).alias("time"),
            code.alias("code"),
            pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
            "hadm_id",
            pl.col(time_col).alias("available_time"),
            pl.lit(False).alias("implausible"),
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
    events = pl.concat(
        [
            birth,
            _stay_event("admit_time", pl.format("ADMISSION//{}", pl.col("admission_type"))),
            _stay_event("admit_time", pl.format("ICU_UNIT//{}", pl.col("unit"))),
            lab_events,
            vital_events,
            _stay_event(
                "discharge_time", pl.format("HOSPITAL_DISCHARGE//{}", pl.col("discharge_disposition"))
            ),
            _stay_event("death_time", pl.lit("MEDS_DEATH")),
        ],
        how="vertical_relaxed",
    ).sort("subject_id", "time", "code", nulls_last=False)
    return DeidBatch(
        patients=deid_pat,
        encounters=deid_enc,
        events=events.select(DEID_COLUMNS["events"]),
        vault=vault,
        dropped_columns=dropped,
        ages_capped=ages_capped,
        zip3_restricted=zip_restricted,
        new_pseudonyms=vault.patients.height - known_before,
    )


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


def shift_interval_preserved(a: pl.Series, b: pl.Series, shifted_a: pl.Series, shifted_b: pl.Series) -> bool:
    """True when every interval b - a equals the shifted interval (used by tests and checks)."""
    return bool(((b - a) == (shifted_b - shifted_a)).fill_null(True).all())
