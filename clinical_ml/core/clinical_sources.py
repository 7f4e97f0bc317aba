"""The further landing sources: medication administrations, diagnoses, procedures and high-frequency device
vitals from a PDMS; their contract (columns, keys, coded values, rules) and their MEDS events.

Ingestion (:mod:`clinical_ml.core.ingestion`) validates them like the other sources: it merges the tables
below into its own (:func:`register`) and asks :func:`source_rules` for their row rules. All four are optional
(a batch without them passes) and are validated against the batch's encounters.

Events (:func:`source_events`, at the anonymization boundary, with the batch's pseudonym mapping):

``MED//<ATC>``
    A medication administration, ``numeric_value`` the dose in the vocabulary's canonical unit (converted from
    a listed variant unit), at the administration time, available when recorded; a dose outside the plausible
    range is flagged ``implausible``. The route is validated and stays in the phi zone.
``DX//<ICD-10-CM>``
    A diagnosis (dotted form, e.g. ``E11.9``), at and available from the time it was recorded (discharge
    diagnoses are coded late: a model predicting earlier does not see them).
``PROC//<ICD-10-PCS>``
    A procedure, at its start, available when recorded; ``numeric_value`` its duration in hours when it ended.
``DEVICE//<vital>`` and ``DEVICE_RATE//<vital>``
    Minute-level device data aggregated per clock hour: the hour's mean of the plausible values and the number
    of samples in it (the sampling frequency, kept because a gap or a slower device changes what a mean
    means), both at and available from the end of the hour.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

import polars as pl

from clinical_ml.core.units import (
    DEVICE_PREFIX,
    DEVICE_RATE_PREFIX,
    DX_PREFIX,
    MED_PREFIX,
    MEDICATION_CODES,
    MEDICATION_CONVERSIONS,
    MEDICATION_PLAUSIBLE,
    PROC_PREFIX,
    PROCEDURE_CODES,
    ROUTES,
    VITAL_CODES,
)

TS = pl.Datetime("us")
MORE_SOURCES = ("medications", "diagnoses", "procedures", "device_vitals")
DIAGNOSIS_TYPES = ("admitting", "primary", "secondary")
# Delivered ICD-10-CM codes: dotted (E11.9) or not (E119), upper case.
ICD10CM_DELIVERED = r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$"

SOURCE_COLUMNS: dict[str, dict[str, pl.DataType]] = {
    "medications": {
        "encounter_id": pl.String(),
        "atc_code": pl.String(),
        "dose": pl.Float64(),
        "dose_unit": pl.String(),
        "route": pl.String(),
        "admin_time": TS,
        "recorded_time": TS,
    },
    "diagnoses": {
        "encounter_id": pl.String(),
        "icd10_code": pl.String(),
        "diagnosis_type": pl.String(),
        "recorded_time": TS,
    },
    "procedures": {
        "encounter_id": pl.String(),
        "procedure_code": pl.String(),
        "start_time": TS,
        "end_time": TS,
        "recorded_time": TS,
    },
    # One row per device sample (e.g. every minute); harmonized like vitals (same codes and units).
    "device_vitals": {
        "encounter_id": pl.String(),
        "code": pl.String(),
        "value": pl.Float64(),
        "unit": pl.String(),
        "charted_time": TS,
    },
}
NULLABLE = {"end_time"}
DUPLICATE_KEYS = {
    "medications": ["encounter_id", "atc_code", "admin_time"],
    "diagnoses": ["encounter_id", "icd10_code", "diagnosis_type"],
    "procedures": ["encounter_id", "procedure_code", "start_time"],
    "device_vitals": ["encounter_id", "code", "charted_time"],
}
# The time checked against the encounter (after admission and birth, before discharge and death + grace).
# Diagnoses are left out: they are often coded days after discharge; they are tied to their stay at the boundary.
EVENT_TIME = {"medications": "admin_time", "procedures": "start_time", "device_vitals": "charted_time"}
CODE_COLUMN = {"device_vitals": "code"}
DESCRIPTIONS = {
    "medications": "Medication administrations (ATC code, dose, dose unit, route) as delivered, validated against "
    "the batch's encounters.",
    "diagnoses": "Diagnoses (ICD-10-CM) of the batch's stays as delivered, validated.",
    "procedures": "Procedures (ICD-10-PCS) of the batch's stays as delivered, validated against its encounters.",
    "device_vitals": "High-frequency device vitals (PDMS, e.g. one sample a minute), units harmonized, validated "
    "against the batch's encounters; aggregated per hour with their sampling frequency at the boundary.",
}
PURPOSE = {
    "medications": "Medication administrations (eMAR/PDMS), one row per administration.",
    "diagnoses": "Diagnoses of a stay (ICD-10-CM), one row per code and type.",
    "procedures": "Procedures of a stay (ICD-10-PCS), one row per procedure.",
    "device_vitals": "High-frequency device data (PDMS), one row per sample; aggregated per hour.",
}


def column_checks() -> dict[str, list]:
    """pandera checks of the columns of these sources (by column name, as ingestion keys them)."""
    import pandera.polars as pa

    return {
        "atc_code": [pa.Check.isin(sorted(MEDICATION_CODES))],
        "route": [pa.Check.isin(sorted(ROUTES))],
        "dose": [pa.Check.ge(0)],
        "icd10_code": [pa.Check.str_matches(ICD10CM_DELIVERED)],
        "diagnosis_type": [pa.Check.isin(list(DIAGNOSIS_TYPES))],
        "procedure_code": [pa.Check.isin(sorted(PROCEDURE_CODES))],
    }


def register(
    *,
    source_columns: dict,
    nullable: set,
    duplicate_keys: dict,
    event_time: dict,
    code_column: dict,
) -> None:
    """Add these sources to ingestion's tables (called once by :mod:`clinical_ml.core.ingestion`)."""
    source_columns.update(SOURCE_COLUMNS)
    nullable.update(NULLABLE)
    duplicate_keys.update(DUPLICATE_KEYS)
    event_time.update(EVENT_TIME)
    code_column.update(CODE_COLUMN)


def _known_dose_unit() -> pl.Expr:
    pairs = [f"{c}|{u}" for c, (_, u) in MEDICATION_CODES.items()] + [
        f"{c}|{u}" for c, u in MEDICATION_CONVERSIONS
    ]
    return pl.concat_str("atc_code", "dose_unit", separator="|").is_in(pairs)


def source_rules(source: str) -> list[tuple[pl.Expr, str]]:
    """Row rules of these sources (reason codes as in :mod:`clinical_ml.core.ingestion`), for the parsed frame."""
    if source == "medications":
        return [
            (pl.col("atc_code").is_in(list(MEDICATION_CODES)) & ~_known_dose_unit(), "unknown_unit"),
            (pl.col("recorded_time") < pl.col("admin_time"), "recorded_before_event"),
        ]
    if source == "procedures":
        return [
            (pl.col("end_time") < pl.col("start_time"), "end_before_start"),
            (pl.col("recorded_time") < pl.col("start_time"), "recorded_before_event"),
        ]
    if source == "device_vitals":
        known = pl.col("code").is_in(list(VITAL_CODES))
        return [(~pl.col("unit_known") & known & pl.col("value_raw").is_not_null(), "unknown_unit")]
    return []


EVENT_SCHEMA = pl.Schema(
    {
        "subject_id": pl.Int64(),
        "time": TS,
        "code": pl.String(),
        "numeric_value": pl.Float32(),
        "hadm_id": pl.Int64(),
        "available_time": TS,
        "implausible": pl.Boolean(),
    }
)


@dataclass(frozen=True)
class SourceEvents:
    """The MEDS events of the further sources of one batch, and counts (no values)."""

    events: pl.DataFrame
    events_by_source: dict[str, int] = field(default_factory=dict)
    orphans_by_source: dict[str, int] = field(default_factory=dict)
    """Rows whose encounter is not an encounter of the batch with a pseudonym: not released."""
    implausible_doses: int = 0


def _norm(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.String).str.strip_chars().str.to_uppercase()


def dotted_icd10(code: pl.Expr) -> pl.Expr:
    """ICD-10-CM in its dotted form: ``E119`` -> ``E11.9``; ``I10`` stays."""
    plain = code.str.replace(".", "", literal=True)
    return (
        pl.when(plain.str.len_chars() > 3)
        .then(pl.concat_str(plain.str.slice(0, 3), pl.lit("."), plain.str.slice(3)))
        .otherwise(plain)
    )


def _dose(frame: pl.DataFrame) -> pl.Expr:
    value = pl.col("dose")
    for (code, unit), fn in MEDICATION_CONVERSIONS.items():
        hit = (pl.col("atc_code") == code) & (pl.col("dose_unit") == unit)
        value = pl.when(hit).then(pl.col("dose") * (fn(1.0) - fn(0.0)) + fn(0.0)).otherwise(value)
    return value


def _plausible_dose() -> pl.Expr:
    lo = pl.col("atc_code").replace_strict(
        {c: r[0] for c, r in MEDICATION_PLAUSIBLE.items()}, default=None, return_dtype=pl.Float64
    )
    hi = pl.col("atc_code").replace_strict(
        {c: r[1] for c, r in MEDICATION_PLAUSIBLE.items()}, default=None, return_dtype=pl.Float64
    )
    return (pl.col("_dose") >= lo) & (pl.col("_dose") <= hi)


def _shifted(col: str) -> pl.Expr:
    return pl.col(col) + pl.duration(days=pl.col("shift_days"))


def _meds(rows: pl.DataFrame) -> pl.DataFrame:
    rows = rows.with_columns(_dose(rows).alias("_dose"))
    return rows.select(
        "subject_id",
        _shifted("admin_time").alias("time"),
        (pl.lit(MED_PREFIX) + pl.col("atc_code")).alias("code"),
        pl.col("_dose").cast(pl.Float32).alias("numeric_value"),
        "hadm_id",
        _shifted("recorded_time").alias("available_time"),
        (~_plausible_dose()).fill_null(True).alias("implausible"),
    )


def _diagnoses(rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select(
        "subject_id",
        _shifted("recorded_time").alias("time"),
        (pl.lit(DX_PREFIX) + dotted_icd10(pl.col("icd10_code"))).alias("code"),
        pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
        "hadm_id",
        _shifted("recorded_time").alias("available_time"),
        pl.lit(False).alias("implausible"),
    )


def _procedures(rows: pl.DataFrame) -> pl.DataFrame:
    hours = (pl.col("end_time") - pl.col("start_time")).dt.total_seconds() / 3600
    return rows.select(
        "subject_id",
        _shifted("start_time").alias("time"),
        (pl.lit(PROC_PREFIX) + pl.col("procedure_code")).alias("code"),
        hours.cast(pl.Float32).alias("numeric_value"),
        "hadm_id",
        _shifted("recorded_time").alias("available_time"),
        pl.lit(False).alias("implausible"),
    )


def aggregate_device_vitals(rows: pl.DataFrame) -> pl.DataFrame:
    """Per encounter, code and clock hour of ``charted_time``: the mean of the plausible values (``mean``, null
    when none was), the number of samples (``samples``, all of them: the sampling frequency) and the hour's end
    (``hour_end``)."""
    ok = pl.col("value").filter(~pl.col("implausible"))
    return (
        rows.with_columns((pl.col("charted_time").dt.truncate("1h") + pl.duration(hours=1)).alias("hour_end"))
        .group_by("encounter_id", "code", "hour_end")
        .agg(ok.mean().alias("mean"), pl.len().cast(pl.Int64).alias("samples"))
        .sort("encounter_id", "code", "hour_end")
    )


def _device(rows: pl.DataFrame) -> pl.DataFrame:
    keys = rows.select("encounter_id", "subject_id", "hadm_id", "shift_days").unique("encounter_id")
    hourly = aggregate_device_vitals(rows).join(keys, on="encounter_id")
    common: list[pl.Expr] = [pl.col("subject_id"), _shifted("hour_end").alias("time")]
    mean = hourly.filter(pl.col("mean").is_not_null()).select(
        *common,
        (pl.lit(DEVICE_PREFIX) + pl.col("code")).alias("code"),
        pl.col("mean").cast(pl.Float32).alias("numeric_value"),
        "hadm_id",
        _shifted("hour_end").alias("available_time"),
        pl.lit(False).alias("implausible"),
    )
    rate = hourly.select(
        *common,
        (pl.lit(DEVICE_RATE_PREFIX) + pl.col("code")).alias("code"),
        pl.col("samples").cast(pl.Float32).alias("numeric_value"),
        "hadm_id",
        _shifted("hour_end").alias("available_time"),
        pl.lit(False).alias("implausible"),
    )
    return pl.concat([mean, rate])


_BUILDERS = {
    "medications": _meds,
    "diagnoses": _diagnoses,
    "procedures": _procedures,
    "device_vitals": _device,
}


def source_events(
    raw: Mapping[str, pl.DataFrame],
    *,
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
) -> SourceEvents:
    """MEDS events of the further sources of one batch.

    Parameters
    ----------
    raw
        The batch's accepted rows by source (``encounters`` and any of :data:`MORE_SOURCES`; a missing or empty
        source gives no events).
    patients, encounters
        The pseudonym mapping of the batch as the anonymizer returns it (``DeidBatch.vault``, vault or HMAC
        mode): normalized ``mrn`` -> ``subject_id``, ``shift_days``; normalized ``encounter_id`` -> ``hadm_id``.
    """
    stays = (
        raw["encounters"]
        .select(_norm("encounter_id").alias("_enc"), _norm("mrn").alias("mrn"))
        .unique("_enc")
    )
    keys = (
        stays.join(patients.select("mrn", "subject_id", "shift_days"), on="mrn")
        .join(encounters.select(pl.col("encounter_id").alias("_enc"), "hadm_id"), on="_enc")
        .drop("mrn")
    )
    parts, made, orphans = [], {}, {}
    implausible = 0
    for source, build in _BUILDERS.items():
        frame = raw.get(source)
        if frame is None or frame.height == 0:
            continue
        rows = frame.with_columns(_norm("encounter_id").alias("_enc")).join(keys, on="_enc", how="inner")
        orphans[source] = frame.height - rows.height
        ev = build(rows.drop("encounter_id").rename({"_enc": "encounter_id"})).select(list(EVENT_SCHEMA))
        if source == "medications":
            implausible = int(ev["implausible"].sum())
        made[source] = ev.height
        parts.append(ev.cast(dict(EVENT_SCHEMA)))  # type: ignore[arg-type]
    events = pl.concat(parts) if parts else pl.DataFrame(schema=EVENT_SCHEMA)
    return SourceEvents(events, made, {k: v for k, v in orphans.items() if v}, implausible_doses=implausible)


def contract_notes(source: str) -> list[str]:
    """Sentences of the landing contract about a source of this module."""
    notes = {
        "medications": "`dose_unit` must be the canonical unit of the `atc_code` or a listed variant (the medications table under *Codes and units*); "
        "a dose is converted into the canonical unit at the boundary and flagged when outside the plausible range.",
        "diagnoses": f"`icd10_code` is ICD-10-CM in upper case, dotted or not (`E11.9`, `E119`); `diagnosis_type` one "
        f"of {', '.join(f'`{t}`' for t in DIAGNOSIS_TYPES)}. A diagnosis is tied to its stay at the boundary (its "
        "`recorded_time` may fall after discharge: codes are assigned late); one of an encounter not in the batch is "
        "counted and not released.",
        "procedures": "`end_time` may be empty (a procedure without a duration).",
        "device_vitals": "Codes and units as for `vitals`. Samples are aggregated per clock hour at the boundary: "
        "`DEVICE//<code>` (mean of the plausible values) and `DEVICE_RATE//<code>` (samples in the hour).",
    }
    return [notes[source]] if source in notes else []
