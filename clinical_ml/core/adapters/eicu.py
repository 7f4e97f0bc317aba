"""eICU Collaborative Research Database (demo 2.0.1 or full 2.0) -> the de-identified MEDS layer.

Mapping (the tables in ``docs/adapters.md`` say the same in full):

* **Units of analysis.** ``uniquepid`` (patient) -> ``subject_id``; ``patienthealthsystemstayid``
  (hospital stay) -> ``hadm_id``; both replaced by random surrogates. The *index ICU stay* of a hospital
  stay is its first unit stay (earliest unit admission, then lowest ``unitvisitnumber``); its ICU admission
  is the encounter's ``admit_time``. Every unit stay is an ``ICU_UNIT//<unit type>`` event at its own unit
  admission (``anchor: icu_admission`` predicts from the first).
* **Coded values.** ``hospitaldischargelocation`` is recoded by :data:`DISCHARGE_DISPOSITIONS` (anything else
  ``OTHER``, missing ``UNKNOWN``; never the source's text); the admission type is ``ELECTIVE``,
  ``EMERGENCY`` or ``OTHER`` (below).
* **Time.** eICU gives minute offsets from each unit admission and only the hospital discharge *year*. Each
  hospital stay is placed on a synthetic calendar: the index unit admission is on 1 July of the discharge
  year at its real clock time (``unitadmittime24``); every other time is that anchor plus its offset, the
  other unit stays of the same hospital stay placed through their ``hospitaladmitoffset``. Intervals are
  exact; the year (``period`` = ``<year>Q3``) supports temporal validation 2014 vs 2015; the date is not real.
  A patient's hospital stays are therefore not ordered in time: no readmission or history question on eICU.
* **Outcome.** ``hospitaldischargestatus == "Expired"`` -> ``death_time`` = hospital discharge time. Stays
  without a discharge status are dropped (outcome unknown), never counted as survivors.
* **Ages.** ``"> 89"`` -> 90 (read "90+"); other non-numeric or empty ages -> null.
* **Features (first 24 h).** The demo lacks ``lab`` and ``vitalPeriodic``. Used: ``apacheApsVar`` (worst
  value of the first APACHE day per unit stay; ``-1`` means *not recorded* and becomes no event), stamped
  at ICU admission + 24 h, the moment the day-1 worst value is final (``time`` = ``available_time``); and
  ``vitalAperiodic`` non-invasive blood pressure at its ``observationoffset``.
* **Leakage, excluded by design.** ``apachePatientResult`` (APACHE predictions and actual outcomes, LOS),
  ``apachePredVar.diedinhospital`` / ``dischargelocation`` / ``saps3*``, and every discharge column of
  ``patient`` except the outcome itself (see :data:`LEAKAGE_COLUMNS`).
"""

from pathlib import Path

import numpy as np
import polars as pl

from clinical_ml.core.adapters.common import (
    UNKNOWN,
    AdaptedSource,
    AdapterError,
    adapter_mapping,
    cap_age,
    coded,
    count_unmapped,
    finish_encounters,
    finish_events,
    finish_patients,
    read_table,
    stay_events,
    surrogate_ids,
)

SOURCE = "eicu"
ANCHOR_MONTH_DAY = (7, 1)
APACHE_DAY_MINUTES = 24 * 60
NOT_RECORDED = -1

# apacheApsVar column -> MEDS code. LOINC where one exists; vital names of core/units.py otherwise.
# ``meanbp`` is left out on purpose: the non-invasive MAP time series (VITAL//mean_bp) covers it, and a
# "worst of day 1" value under the same code would corrupt its last/min/max.
APACHE_CODES: dict[str, str] = {
    "creatinine": "LAB//2160-0",
    "bun": "LAB//3094-0",
    "sodium": "LAB//2951-2",
    "glucose": "LAB//2345-7",
    "wbc": "LAB//6690-2",
    "bilirubin": "LAB//1975-2",
    "hematocrit": "LAB//4544-3",
    "albumin": "LAB//1751-7",
    "ph": "LAB//2744-1",
    "pao2": "LAB//2703-7",
    "pco2": "LAB//2019-8",
    "fio2": "LAB//3150-0",
    "heartrate": "VITAL//heart_rate",
    "respiratoryrate": "VITAL//resp_rate",
    "temperature": "VITAL//temperature",
    "urine": "VITAL//urine_output_24h",
    "intubated": "VITAL//intubated",
    "vent": "VITAL//mechanical_ventilation",
    "dialysis": "VITAL//dialysis",
}
GCS_COMPONENTS = ("eyes", "motor", "verbal")
GCS_CODE = "VITAL//gcs_total"

VITAL_APERIODIC_CODES: dict[str, str] = {
    "noninvasivesystolic": "VITAL//systolic_bp",
    "noninvasivediastolic": "VITAL//diastolic_bp",
    "noninvasivemean": "VITAL//mean_bp",
}

# Columns never read because they are known only after the outcome (or are the outcome in disguise).
LEAKAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient": (
        "hospitaldischargelocation (used only as the discharge disposition, never as a feature)",
        "hospitaldischargetime24",
        "unitdischargeoffset",
        "unitdischargetime24",
        "unitdischargelocation",
        "unitdischargestatus",
        "dischargeweight",
    ),
    "apachepatientresult": ("every column: APACHE predicted and actual mortality, LOS, ventilation days",),
    "apachepredvar": ("diedinhospital", "dischargelocation", "saps3today", "saps3yesterday", "saps3day1"),
}

UNIT_TYPES: dict[str, str] = {
    "Med-Surg ICU": "MED_SURG_ICU",
    "MICU": "MICU",
    "SICU": "SICU",
    "Neuro ICU": "NEURO_ICU",
    "Cardiac ICU": "CCU",
    "CCU-CTICU": "CCU",
    "CSICU": "CTICU",
    "CTICU": "CTICU",
}
# patient.hospitaldischargelocation -> coded discharge disposition (adapters/common.py:
# DISCHARGE_DISPOSITIONS; anything else: OTHER). "Other Hospital" is a transfer to another hospital.
DISCHARGE_DISPOSITIONS: dict[str, str] = {
    "Home": "HOME",
    "Skilled Nursing Facility": "SKILLED_NURSING_FACILITY",
    "Nursing Home": "NURSING_HOME",
    "Rehabilitation": "REHABILITATION",
    "Other Hospital": "ACUTE_CARE_TRANSFER",
    "Other External": "OTHER_FACILITY",
    "Other": "OTHER",
    "Death": "EXPIRED",
}
# Every eICU unit is an intensive care unit.
UNIT_CODES: dict[str, str] = {code: "ICU" for code in (*UNIT_TYPES.values(), "OTHER_ICU")}
# hospital.region -> the region part of the site code (anything else: OTHER; missing: Unknown region).
REGIONS: dict[str, str] = {r: r for r in ("Midwest", "Northeast", "South", "West")}
SEX = {"Male": "M", "Female": "F"}
# eICU records one "ethnicity" field mixing race and ethnicity.
RACE = {
    "Caucasian": "White",
    "African American": "Black or African American",
    "Asian": "Asian",
    "Native American": "American Indian or Alaska Native",
    "Hispanic": "Unknown",
    "Other/Unknown": "Unknown",
}

PATIENT_COLUMNS = [
    "patientunitstayid",
    "patienthealthsystemstayid",
    "uniquepid",
    "gender",
    "age",
    "ethnicity",
    "hospitalid",
    "unittype",
    "unitadmittime24",
    "unitadmitsource",
    "unitvisitnumber",
    "hospitaladmitoffset",
    "hospitaldischargeoffset",
    "hospitaldischargeyear",
    "hospitaldischargestatus",
    "hospitaldischargelocation",
]


def default_source() -> Path:
    """``../shared/data/eicu-crd-demo`` next to the project root."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "eicu-crd-demo"


def committed_subset() -> Path:
    """The small ODbL-licensed subset committed with the tests (used when the full demo is absent)."""
    return Path(__file__).resolve().parents[3] / "clinical_ml_tests" / "fixtures" / "eicu_demo_subset"


def _unit_stays(patient: pl.DataFrame, hospital: pl.DataFrame, elective: pl.DataFrame) -> pl.DataFrame:
    """Every unit stay on the synthetic calendar, with its hospital stay's attributes."""
    clock = pl.col("unitadmittime24").str.to_time("%H:%M:%S", strict=False)
    stays = (
        patient.join(hospital, on="hospitalid", how="left")
        .join(elective, on="patientunitstayid", how="left")
        .with_columns(
            # minutes from hospital admission to this unit's admission
            (-pl.col("hospitaladmitoffset")).alias("unit_from_hosp_min"),
        )
        .sort("patienthealthsystemstayid", "unit_from_hosp_min", "unitvisitnumber", "patientunitstayid")
        .with_columns(
            (pl.col("patientunitstayid") == pl.col("patientunitstayid").first())
            .over("patienthealthsystemstayid")
            .alias("is_index")
        )
    )
    anchor = pl.datetime(
        pl.col("hospitaldischargeyear"), ANCHOR_MONTH_DAY[0], ANCHOR_MONTH_DAY[1]
    ) + pl.duration(
        hours=clock.dt.hour().fill_null(0).cast(pl.Int64),
        minutes=clock.dt.minute().fill_null(0).cast(pl.Int64),
    )
    index = stays.filter("is_index").select(
        "patienthealthsystemstayid",
        anchor.cast(pl.Datetime("us")).alias("index_admit"),
        pl.col("unit_from_hosp_min").alias("index_from_hosp_min"),
    )
    return stays.join(index, on="patienthealthsystemstayid", how="left").with_columns(
        (
            pl.col("index_admit")
            + pl.duration(minutes=pl.col("unit_from_hosp_min") - pl.col("index_from_hosp_min"))
        ).alias("unit_admit"),
    )


def _offset_time(offset_col: str) -> pl.Expr:
    return pl.col("unit_admit") + pl.duration(minutes=pl.col(offset_col))


def _race_ethnicity(col: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    race = col.replace_strict(RACE, default="Unknown", return_dtype=pl.String)
    ethnicity = (
        pl.when(col == "Hispanic")
        .then(pl.lit("Hispanic or Latino"))
        .when(col.is_in(["Caucasian", "African American", "Asian", "Native American"]))
        .then(pl.lit("Not Hispanic or Latino"))
        .otherwise(pl.lit("Unknown"))
    )
    return race, ethnicity


def _age(col: pl.Expr) -> pl.Expr:
    text = col.str.strip_chars()
    return cap_age(
        pl.when(text == "> 89").then(pl.lit(90)).otherwise(text.cast(pl.Int64, strict=False)).cast(pl.Int64)
    )


def _apache_events(aps: pl.DataFrame, stays: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """APACHE day-1 worst values of the index unit stays as events at ICU admission + 24 h."""
    keyed = aps.join(
        stays.filter("is_index").select("patientunitstayid", "subject_id", "hadm_id", "unit_admit"),
        on="patientunitstayid",
        how="inner",
    )
    at = pl.col("unit_admit") + pl.duration(minutes=APACHE_DAY_MINUTES)
    cols = list(APACHE_CODES)
    long = keyed.select(
        "subject_id", "hadm_id", at.alias("time"), *[pl.col(c).cast(pl.Float64) for c in cols]
    ).unpivot(index=["subject_id", "hadm_id", "time"], on=cols, variable_name="column", value_name="value")
    not_recorded = int((long["value"] == NOT_RECORDED).sum())
    long = long.filter((pl.col("value") != NOT_RECORDED) & pl.col("value").is_not_null())
    gcs_ok = pl.all_horizontal([pl.col(c) >= 1 for c in GCS_COMPONENTS]) & (pl.col("meds") != 1)
    gcs = keyed.filter(gcs_ok).select(
        "subject_id",
        "hadm_id",
        at.alias("time"),
        pl.lit(GCS_CODE).alias("code"),
        pl.sum_horizontal(GCS_COMPONENTS).cast(pl.Float64).alias("numeric_value"),
    )
    events = pl.concat(
        [
            long.select(
                "subject_id",
                "hadm_id",
                "time",
                pl.col("column").replace_strict(APACHE_CODES, return_dtype=pl.String).alias("code"),
                pl.col("value").alias("numeric_value"),
            ),
            gcs,
        ]
    ).with_columns(pl.col("time").alias("available_time"))
    counts = {
        "apache_values_not_recorded": not_recorded,
        "gcs_not_scored_sedated_or_missing": keyed.height - gcs.height,
    }
    return events, counts


def _vital_events(vitals: pl.DataFrame, stays: pl.DataFrame) -> pl.DataFrame:
    """Non-invasive blood pressure of every unit stay, placed on its hospital stay's calendar."""
    cols = list(VITAL_APERIODIC_CODES)
    keyed = vitals.join(
        stays.select("patientunitstayid", "subject_id", "hadm_id", "unit_admit"),
        on="patientunitstayid",
        how="inner",
    )
    return (
        keyed.select("subject_id", "hadm_id", _offset_time("observationoffset").alias("time"), *cols)
        .unpivot(index=["subject_id", "hadm_id", "time"], on=cols, variable_name="column", value_name="value")
        .filter(pl.col("value").is_not_null())
        .select(
            "subject_id",
            "hadm_id",
            "time",
            pl.col("column").replace_strict(VITAL_APERIODIC_CODES, return_dtype=pl.String).alias("code"),
            pl.col("value").alias("numeric_value"),
            # vitalAperiodic has no entry time: the charted time is taken as the time it was known.
            pl.col("time").alias("available_time"),
        )
    )


def adapt(source: Path | str, *, rng: np.random.Generator | None = None) -> AdaptedSource:
    """Map an eICU export (Parquet tables, lower-case names) onto the de-identified layer.

    Parameters
    ----------
    source
        Folder holding ``tables/patient.parquet``, ``hospital``, ``apacheapsvar``, ``apachepredvar`` and
        ``vitalaperiodic`` (or the same files directly in the folder).
    rng
        Source of the surrogate ids; fresh OS entropy when not given.

    Returns
    -------
    AdaptedSource
        One encounter per hospital stay with a known outcome, batch ``eicu_<discharge year>``.
    """
    rng = rng or np.random.default_rng()
    source = Path(source)
    patient = read_table(source, "patient", columns=PATIENT_COLUMNS)
    hospital = read_table(source, "hospital", columns=["hospitalid", "region"])
    elective = read_table(source, "apachepredvar", columns=["patientunitstayid", "electivesurgery"])
    aps = read_table(
        source, "apacheapsvar", columns=["patientunitstayid", *APACHE_CODES, *GCS_COMPONENTS, "meds"]
    )
    vitals = read_table(
        source, "vitalaperiodic", columns=["patientunitstayid", "observationoffset", *VITAL_APERIODIC_CODES]
    )
    if patient.height == 0:
        raise AdapterError("patient table is empty")

    subjects = surrogate_ids(patient["uniquepid"], rng=rng)
    hadms = surrogate_ids(patient["patienthealthsystemstayid"], rng=rng)
    stays = (
        _unit_stays(patient, hospital, elective.unique("patientunitstayid"))
        .join(
            subjects.rename({"source_key": "uniquepid", "surrogate_id": "subject_id"}),
            on="uniquepid",
            how="left",
        )
        .join(
            hadms.rename({"surrogate_id": "hadm_id"}),
            left_on=pl.col("patienthealthsystemstayid").cast(pl.String),
            right_on="source_key",
            how="left",
        )
    )
    index = stays.filter("is_index")
    known_outcome = index["hospitaldischargestatus"].is_in(["Alive", "Expired"]).fill_null(False)
    race, ethnicity = _race_ethnicity(pl.col("ethnicity"))
    discharge = _offset_time("hospitaldischargeoffset")
    admit_source = pl.col("unitadmitsource")
    stays_known = index.filter(known_outcome).with_columns(
        pl.format(
            "{}/hospital-{}", coded(pl.col("region"), REGIONS, missing="Unknown region"), pl.col("hospitalid")
        ).alias("_site")
    )
    # the site codes are made of a coded region and the hospital's number: declared, not delivered text
    mapping = adapter_mapping(SOURCE, units=UNIT_CODES, sites=stays_known["_site"].drop_nulls().unique())
    encounters = finish_encounters(
        stays_known.select(
            "subject_id",
            "hadm_id",
            pl.col("unit_admit").alias("admit_time"),
            discharge.alias("discharge_time"),
            pl.when(pl.col("hospitaldischargestatus") == "Expired").then(discharge).alias("death_time"),
            pl.when(pl.col("electivesurgery") == 1)
            .then(pl.lit("ELECTIVE"))
            .when(admit_source == "Emergency Department")
            .then(pl.lit("EMERGENCY"))
            .otherwise(pl.lit("OTHER"))
            .alias("admission_type"),
            pl.col("unittype").replace_strict(UNIT_TYPES, default="OTHER_ICU").alias("unit"),
            pl.col("_site").alias("site"),
            coded(pl.col("hospitaldischargelocation"), DISCHARGE_DISPOSITIONS).alias("discharge_disposition"),
            _age(pl.col("age")).alias("age_years"),
            pl.format("{}_{}", pl.lit(SOURCE), pl.col("hospitaldischargeyear")).alias("batch_id"),
        ),
        mapping=mapping,
    )
    kept_hadm = encounters["hadm_id"].implode()
    stays = stays.filter(pl.col("hadm_id").is_in(kept_hadm))
    patients = finish_patients(
        index.filter(known_outcome)
        .sort("hospitaldischargeyear", "unit_admit")
        .unique("subject_id", keep="first", maintain_order=True)
        .select(
            "subject_id",
            pl.col("gender").replace_strict(SEX, default=None, return_dtype=pl.String).alias("sex"),
            race.alias("race"),
            ethnicity.alias("ethnicity"),
            pl.lit(None, dtype=pl.String).alias("zip3"),
        ),
        mapping=mapping,
    )
    apache, apache_counts = _apache_events(aps, stays)
    # every unit stay of the hospital stay is an ICU admission (a later one too), at its own admission
    icu_admissions = stays.select(
        "subject_id",
        "hadm_id",
        pl.col("unit_admit").alias("time"),
        pl.col("unittype")
        .replace_strict(UNIT_TYPES, default="OTHER_ICU", return_dtype=pl.String)
        .alias("unit"),
    )
    events = finish_events(
        pl.concat(
            [stay_events(encounters, icu_admissions), apache, _vital_events(vitals, stays)],
            how="diagonal_relaxed",
        )
    )
    id_map = pl.concat(
        [
            subjects.with_columns(pl.lit("subject").alias("kind")),
            hadms.with_columns(pl.lit("hadm").alias("kind")),
        ]
    ).select("source_key", "kind", "surrogate_id")
    counts = {
        "unit_stays": patient.height,
        "hospital_stays": index.height,
        "hospital_stays_dropped_unknown_outcome": int((~known_outcome).sum()),
        "encounters": encounters.height,
        "deaths": int(encounters["death_time"].is_not_null().sum()),
        "ages_90_or_over": int((encounters["age_years"] >= 90).sum()),
        "ages_missing": int(encounters["age_years"].is_null().sum()),
        "unit_stays_mapped": icu_admissions.height,
        "discharge_locations_unmapped": count_unmapped(
            index.filter(known_outcome)["hospitaldischargelocation"], DISCHARGE_DISPOSITIONS
        ),
        "discharge_locations_missing": int((encounters["discharge_disposition"] == UNKNOWN).sum()),
        "events": events.height,
        "events_implausible": int(events["implausible"].sum()),
        **apache_counts,
    }
    return AdaptedSource(SOURCE, patients, encounters, events, id_map, counts)
