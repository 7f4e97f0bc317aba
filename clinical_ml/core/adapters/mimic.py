"""MIMIC-III Clinical Database (demo 1.4 or full 1.4) -> the de-identified MEDS layer.

Mapping (``docs/adapters.md`` has the full tables):

* **Units of analysis.** ``subject_id`` -> ``subject_id``, ``hadm_id`` -> ``hadm_id``, both replaced by
  random surrogates. One encounter per hospital admission, **every** admission of a patient (a readmission
  is an admission, whether or not it reached an ICU): ``admit_time`` is the hospital ``admittime``,
  ``discharge_time`` the ``dischtime``. Each ICU stay (``icustays.intime``) is an ``ICU_UNIT//<unit>`` event
  at its ICU admission, so a prediction anchored at ICU admission (``anchor: icu_admission``) finds it.
  The encounter's ``unit`` is the first care unit of its first ICU stay (``NO_ICU_STAY`` without one), its
  ``site`` ``BIDMC/<ICU information system>`` (CareVue 2001-2008, MetaVision 2008-2012) and its batch
  ``mimic_carevue`` or ``mimic_metavision``: the two systems are MIMIC's real "sources" (an admission
  without an ICU stay takes the system of its patient's ICU stay nearest in time).
* **Coded values.** ``admission_type``, ``discharge_location`` and ``insurance`` (the stay's payer) are
  recoded by the explicit tables :data:`ADMISSION_TYPES`, :data:`DISCHARGE_DISPOSITIONS` and :data:`PAYERS`;
  a value they do not name becomes ``OTHER`` (counted), a missing one ``UNKNOWN``: never the source's text.
* **Time.** MIMIC dates are already shifted per patient into 2100-2200; they are kept as they are
  (intervals are real). ``period`` is therefore the *shifted* year-quarter: no temporal validation on MIMIC.
* **Ages.** ``admittime - dob`` in completed years; patients over 89 have a shifted ``dob`` giving about
  300 years: every age of 90 or more becomes 90 (read "90+").
* **Outcome.** ``hospital_expire_flag == 1`` -> ``death_time`` = ``deathtime`` (or ``dischtime`` when it is
  missing), never after ``dischtime``.
* **Labs** (``labevents``, the whole admission): items whose ``d_labitems.loinc_code`` is a LOINC of the
  shared vocabulary (``core/units.py``), plus :data:`LAB_ITEM_LOINC` for items without it; ``labevents``
  has no result time, so ``available_time`` is ``charttime`` plus an assumed turnaround
  (``lab_result_delay_minutes``, 60 by default). Labs without an admission (outpatient) are left out.
* **Vitals** (``chartevents``): CareVue and MetaVision item ids in :data:`CHART_ITEMS`; rows flagged
  ``error == 1`` are dropped; Fahrenheit converted to Celsius; ``available_time`` = ``storetime``
  (``charttime`` when stored before it was charted).
* **Leakage, excluded by design**: ``admissions.discharge_location`` / ``deathtime`` / ``dischtime`` /
  ``hospital_expire_flag`` are used only for the outcome, the stay end and the discharge event;
  ``patients.dod*`` and ``expire_flag`` are never read; ``diagnoses_icd``, ``procedures_icd``, ``drgcodes``
  (coded at discharge) and ``callout`` are not read.
"""

from pathlib import Path

import numpy as np
import polars as pl

from clinical_ml.core.adapters.common import (
    UNKNOWN,
    AdaptedSource,
    AdapterError,
    adapter_mapping,
    coded,
    count_unmapped,
    finish_encounters,
    finish_events,
    finish_patients,
    read_table,
    stay_events,
    surrogate_ids,
)
from clinical_ml.core.anonymization import age_in_years
from clinical_ml.core.units import UNIT_CONVERSIONS, measurement_codes

SOURCE = "mimic"

# Lab items that carry no (or another) LOINC in d_labitems but measure one of the shared codes.
LAB_ITEM_LOINC: dict[int, str] = {
    51300: "6690-2",  # WBC count
    51301: "6690-2",  # white blood cells
    50813: "2524-7",  # lactate
}
LAB_ITEMS_EXCLUDED = (50855,)  # "absolute hemoglobin": no unit recorded

# chartevents item id -> (code, unit as delivered). CareVue ids are small, MetaVision ids start at 220000.
CHART_ITEMS: dict[int, tuple[str, str]] = {
    211: ("heart_rate", "/min"),
    220045: ("heart_rate", "/min"),
    51: ("systolic_bp", "mm[Hg]"),
    442: ("systolic_bp", "mm[Hg]"),
    455: ("systolic_bp", "mm[Hg]"),
    6701: ("systolic_bp", "mm[Hg]"),
    220050: ("systolic_bp", "mm[Hg]"),
    220179: ("systolic_bp", "mm[Hg]"),
    8368: ("diastolic_bp", "mm[Hg]"),
    8440: ("diastolic_bp", "mm[Hg]"),
    8441: ("diastolic_bp", "mm[Hg]"),
    8555: ("diastolic_bp", "mm[Hg]"),
    220051: ("diastolic_bp", "mm[Hg]"),
    220180: ("diastolic_bp", "mm[Hg]"),
    52: ("mean_bp", "mm[Hg]"),
    443: ("mean_bp", "mm[Hg]"),
    456: ("mean_bp", "mm[Hg]"),
    6702: ("mean_bp", "mm[Hg]"),
    220052: ("mean_bp", "mm[Hg]"),
    220181: ("mean_bp", "mm[Hg]"),
    225312: ("mean_bp", "mm[Hg]"),
    615: ("resp_rate", "/min"),
    618: ("resp_rate", "/min"),
    220210: ("resp_rate", "/min"),
    224690: ("resp_rate", "/min"),
    646: ("spo2", "%"),
    220277: ("spo2", "%"),
    676: ("temperature", "Cel"),
    223762: ("temperature", "Cel"),
    678: ("temperature", "[degF]"),
    223761: ("temperature", "[degF]"),
    198: ("gcs_total", "{score}"),
}
# MetaVision charts the GCS components separately: eye, verbal, motor.
GCS_COMPONENT_ITEMS = (220739, 223900, 223901)

UNITS: dict[str, str] = {"MICU": "MICU", "SICU": "SICU", "TSICU": "SICU", "CCU": "CCU", "CSRU": "CTICU"}
NO_ICU_STAY = "NO_ICU_STAY"
# Unit codes with their types: an admission without an ICU stay was a ward stay.
UNIT_CODES: dict[str, str] = {code: "ICU" for code in (*UNITS.values(), "OTHER_ICU")} | {NO_ICU_STAY: "WARD"}
# icustays.dbsource -> the ICU information system part of the site code (anything else: OTHER).
ICU_SYSTEMS: dict[str, str] = {s: s for s in ("carevue", "metavision", "both")}
MAPPING = adapter_mapping(
    SOURCE, units=UNIT_CODES, sites=[f"BIDMC/{s}" for s in (*ICU_SYSTEMS.values(), "OTHER", "unknown")]
)

# admissions.admission_type -> coded admission type (anything else: OTHER).
ADMISSION_TYPES: dict[str, str] = {
    "EMERGENCY": "EMERGENCY",
    "URGENT": "URGENT",
    "ELECTIVE": "ELECTIVE",
    "NEWBORN": "NEWBORN",
}
# admissions.discharge_location (every value of MIMIC-III 1.4) -> coded discharge disposition
# (adapters/common.py: DISCHARGE_DISPOSITIONS; anything else: OTHER). Transfers to another inpatient
# hospital are *_TRANSFER: the patient's hospital care goes on elsewhere, so a readmission question
# excludes them (``transfer_dispositions``); long-term care hospitals, rehabilitation and nursing
# facilities are discharges to post-acute care, not transfers.
DISCHARGE_DISPOSITIONS: dict[str, str] = {
    "HOME": "HOME",
    "HOME HEALTH CARE": "HOME_HEALTH_CARE",
    "HOME WITH HOME IV PROVIDR": "HOME_HEALTH_CARE",
    "SNF": "SKILLED_NURSING_FACILITY",
    "SNF-MEDICAID ONLY CERTIF": "SKILLED_NURSING_FACILITY",
    "ICF": "INTERMEDIATE_CARE_FACILITY",
    "REHAB/DISTINCT PART HOSP": "REHABILITATION",
    "LONG TERM CARE HOSPITAL": "LONG_TERM_CARE_HOSPITAL",
    "HOSPICE-HOME": "HOSPICE",
    "HOSPICE-MEDICAL FACILITY": "HOSPICE",
    "SHORT TERM HOSPITAL": "ACUTE_CARE_TRANSFER",
    "DISC-TRAN CANCER/CHLDRN H": "ACUTE_CARE_TRANSFER",
    "DISC-TRAN TO FEDERAL HC": "ACUTE_CARE_TRANSFER",
    "DISCH-TRAN TO PSYCH HOSP": "PSYCHIATRIC_HOSPITAL_TRANSFER",
    "LEFT AGAINST MEDICAL ADVI": "LEFT_AGAINST_MEDICAL_ADVICE",
    "OTHER FACILITY": "OTHER_FACILITY",
    "DEAD/EXPIRED": "EXPIRED",
}
# admissions.insurance (every value of MIMIC-III 1.4) -> the contract's payer (anything else: Other).
PAYERS: dict[str, str] = {
    "Medicare": "Medicare",
    "Medicaid": "Medicaid",
    "Private": "Private",
    "Government": "Other government",
    "Self Pay": "Self-pay",
}
# The dispositions above that are transfers to another inpatient hospital (for transfer_dispositions).
TRANSFER_DISPOSITIONS: tuple[str, ...] = ("ACUTE_CARE_TRANSFER", "PSYCHIATRIC_HOSPITAL_TRANSFER")


def default_source() -> Path:
    """``../shared/data/mimic-iii-demo`` next to the project root."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "mimic-iii-demo"


def committed_subset() -> Path:
    """The small ODbL-licensed subset committed with the tests (used when the full demo is absent)."""
    return Path(__file__).resolve().parents[3] / "clinical_ml_tests" / "fixtures" / "mimic_demo_subset"


def _race_ethnicity(col: pl.Expr) -> tuple[pl.Expr, pl.Expr]:
    race = (
        pl.when(col.str.starts_with("WHITE"))
        .then(pl.lit("White"))
        .when(col.str.starts_with("BLACK"))
        .then(pl.lit("Black or African American"))
        .when(col.str.starts_with("ASIAN"))
        .then(pl.lit("Asian"))
        .when(col.str.starts_with("AMERICAN INDIAN"))
        .then(pl.lit("American Indian or Alaska Native"))
        .when(col.str.starts_with("NATIVE HAWAIIAN"))
        .then(pl.lit("Native Hawaiian or Other Pacific Islander"))
        .when(col.str.starts_with("OTHER") | col.str.starts_with("MULTI"))
        .then(pl.lit("Other"))
        .otherwise(pl.lit("Unknown"))
    )
    unknown = col.str.contains("UNKNOWN|UNABLE|DECLINED") | col.is_null()
    ethnicity = (
        pl.when(col.str.contains("HISPANIC"))
        .then(pl.lit("Hispanic or Latino"))
        .when(unknown)
        .then(pl.lit("Unknown"))
        .otherwise(pl.lit("Not Hispanic or Latino"))
    )
    return race, ethnicity


def _lab_item_codes(d_labitems: pl.DataFrame) -> dict[int, str]:
    """Item id -> ``LAB//<LOINC>`` for every item whose LOINC is a lab code of the shared vocabulary."""
    vocabulary = {c for c in measurement_codes() if c.startswith("LAB//")}
    by_loinc = {
        int(i): f"LAB//{c}"
        for i, c in d_labitems.select("itemid", "loinc_code").iter_rows()
        if f"LAB//{c}" in vocabulary and i not in LAB_ITEMS_EXCLUDED
    }
    return {**by_loinc, **{i: f"LAB//{c}" for i, c in LAB_ITEM_LOINC.items()}}


def _convert(code: str, unit: str, value: pl.Expr) -> pl.Expr:
    conv = UNIT_CONVERSIONS.get((code, unit))
    return value if conv is None else conv(value)  # type: ignore[arg-type,return-value]


def _icu_system(admissions: pl.DataFrame, icu: pl.DataFrame) -> pl.DataFrame:
    """``hadm_id`` -> the ICU information system of the admission's first ICU stay; for an admission without
    one, that of its patient's ICU stay nearest in time (the systems replaced each other in 2008)."""
    own = icu.sort("intime").unique("hadm_id", keep="first").select("hadm_id", "dbsource")
    without = admissions.join(own, on="hadm_id", how="anti").select("subject_id", "hadm_id", "admittime")
    if without.height == 0:
        return own
    nearest = (
        without.join(icu.select("subject_id", "intime", "dbsource"), on="subject_id", how="inner")
        .with_columns((pl.col("intime") - pl.col("admittime")).abs().alias("_gap"))
        .sort("hadm_id", "_gap", "intime")
        .unique("hadm_id", keep="first")
    )
    return pl.concat([own, nearest.select("hadm_id", "dbsource")])


def adapt(
    source: Path | str, *, rng: np.random.Generator | None = None, lab_result_delay_minutes: int = 60
) -> AdaptedSource:
    """Map a MIMIC-III export (Parquet tables, lower-case names) onto the de-identified layer.

    Parameters
    ----------
    source
        Folder holding ``tables/patients.parquet``, ``admissions``, ``icustays``, ``d_labitems``,
        ``labevents`` and ``chartevents`` (or the same files directly in the folder).
    rng
        Source of the surrogate ids; fresh OS entropy when not given.
    lab_result_delay_minutes
        Assumed time from specimen to result, since ``labevents`` records only the chart time.

    Returns
    -------
    AdaptedSource
        One encounter per hospital admission (with or without an ICU stay); one ``ICU_UNIT//<unit>``
        event per ICU stay at its ICU admission.
    """
    rng = rng or np.random.default_rng()
    source = Path(source)
    patients_raw = read_table(source, "patients", columns=["subject_id", "gender", "dob"])
    admissions = read_table(
        source,
        "admissions",
        columns=[
            "subject_id",
            "hadm_id",
            "admittime",
            "dischtime",
            "deathtime",
            "admission_type",
            "discharge_location",
            "ethnicity",
            "hospital_expire_flag",
        ],
        optional=["insurance"],
    )
    icustays = read_table(source, "icustays", columns=["hadm_id", "intime", "first_careunit", "dbsource"])
    d_labitems = read_table(source, "d_labitems", columns=["itemid", "loinc_code"])
    labs = read_table(source, "labevents", columns=["hadm_id", "itemid", "charttime", "valuenum"])
    chart = read_table(
        source,
        "chartevents",
        columns=["hadm_id", "itemid", "charttime", "storetime", "valuenum", "error"],
    )
    if admissions.height == 0:
        raise AdapterError("admissions table is empty")

    subjects = surrogate_ids(admissions["subject_id"], rng=rng)
    hadms = surrogate_ids(admissions["hadm_id"], rng=rng)
    # ICU stays of admissions that are not in the admissions table have no stay to belong to
    icu = icustays.join(admissions.select("hadm_id", "subject_id"), on="hadm_id", how="inner").with_columns(
        pl.col("first_careunit")
        .replace_strict(UNITS, default="OTHER_ICU", return_dtype=pl.String)
        .alias("unit")
    )
    first_unit = icu.sort("intime").unique("hadm_id", keep="first").select("hadm_id", "unit")
    adm = (
        admissions.join(first_unit, on="hadm_id", how="left")
        .join(_icu_system(admissions, icu), on="hadm_id", how="left")
        .join(patients_raw, on="subject_id", how="left")
        .with_columns(
            pl.col("subject_id").cast(pl.String).alias("subject_key"),
            pl.col("hadm_id").cast(pl.String).alias("hadm_key"),
        )
        .drop("subject_id", "hadm_id")
        .join(
            subjects.rename({"source_key": "subject_key", "surrogate_id": "subject_id"}),
            on="subject_key",
            how="left",
        )
        .join(hadms.rename({"source_key": "hadm_key", "surrogate_id": "hadm_id"}), on="hadm_key", how="left")
    )
    died = pl.col("hospital_expire_flag") == 1
    encounters = finish_encounters(
        adm.select(
            "subject_id",
            "hadm_id",
            pl.col("admittime").alias("admit_time"),
            pl.col("dischtime").alias("discharge_time"),
            pl.when(died)
            .then(pl.min_horizontal(pl.col("deathtime").fill_null(pl.col("dischtime")), pl.col("dischtime")))
            .alias("death_time"),
            coded(pl.col("admission_type"), ADMISSION_TYPES).alias("admission_type"),
            pl.col("unit").fill_null(NO_ICU_STAY),
            pl.format("BIDMC/{}", coded(pl.col("dbsource"), ICU_SYSTEMS, missing="unknown")).alias("site"),
            coded(pl.col("discharge_location"), DISCHARGE_DISPOSITIONS).alias("discharge_disposition"),
            coded(pl.col("insurance"), PAYERS).alias("payer"),
            age_in_years(pl.col("dob"), pl.col("admittime")).alias("age_years"),
            pl.format("{}_{}", pl.lit(SOURCE), pl.col("dbsource").fill_null("unknown")).alias("batch_id"),
        ),
        mapping=MAPPING,
    )
    race, ethnicity = _race_ethnicity(pl.col("ethnicity"))
    patients = finish_patients(
        adm.sort("admittime")
        .unique("subject_id", keep="first", maintain_order=True)
        .select(
            "subject_id",
            pl.col("gender").replace_strict({"M": "M", "F": "F"}, default=None).alias("sex"),
            race.alias("race"),
            ethnicity.alias("ethnicity"),
            pl.lit(None, dtype=pl.String).alias("zip3"),
        ),
        mapping=MAPPING,
    )
    keys = adm.select(pl.col("hadm_key").cast(pl.Int64).alias("source_hadm"), "subject_id", "hadm_id")
    icu_events = icu.join(keys, left_on="hadm_id", right_on="source_hadm", how="inner", suffix="_new").select(
        pl.col("subject_id_new").alias("subject_id"),
        pl.col("hadm_id_new").alias("hadm_id"),
        pl.col("intime").alias("time"),
        "unit",
    )

    lab_codes = _lab_item_codes(d_labitems)
    lab_events = (
        labs.filter(pl.col("itemid").is_in(list(lab_codes)) & pl.col("valuenum").is_not_null())
        .join(keys, left_on="hadm_id", right_on="source_hadm", how="inner", suffix="_new")
        .select(
            "subject_id",
            pl.col("hadm_id_new").alias("hadm_id"),
            pl.col("charttime").alias("time"),
            pl.col("itemid").replace_strict(lab_codes, return_dtype=pl.String).alias("code"),
            pl.col("valuenum").alias("numeric_value"),
            (pl.col("charttime") + pl.duration(minutes=lab_result_delay_minutes)).alias("available_time"),
        )
    )
    items = pl.DataFrame(
        {
            "itemid": list(CHART_ITEMS),
            "vital": [c for c, _ in CHART_ITEMS.values()],
            "unit": [u for _, u in CHART_ITEMS.values()],
        }
    )
    chart_ok = chart.filter((pl.col("error").fill_null(0) != 1) & pl.col("valuenum").is_not_null()).join(
        keys, left_on="hadm_id", right_on="source_hadm", how="inner", suffix="_new"
    )
    vitals = chart_ok.join(items, on="itemid", how="inner")
    converted = pl.concat(
        [
            vitals.filter((pl.col("vital") == code) & (pl.col("unit") == unit)).with_columns(
                _convert(code, unit, pl.col("valuenum")).alias("valuenum")
            )
            for code, unit in sorted(set(CHART_ITEMS.values()))
        ]
    )
    vital_events = converted.select(
        "subject_id",
        pl.col("hadm_id_new").alias("hadm_id"),
        pl.col("charttime").alias("time"),
        pl.format("VITAL//{}", pl.col("vital")).alias("code"),
        pl.col("valuenum").alias("numeric_value"),
        # a value is known when stored, never before it was measured (some rows are stored "early")
        pl.max_horizontal("storetime", "charttime").alias("available_time"),
    )
    gcs_parts = chart_ok.filter(pl.col("itemid").is_in(list(GCS_COMPONENT_ITEMS)))
    gcs_events = (
        gcs_parts.group_by("subject_id", "hadm_id_new", "charttime")
        .agg(
            pl.col("itemid").n_unique().alias("parts"),
            pl.col("valuenum").sum().alias("numeric_value"),
            pl.col("storetime").max().alias("available_time"),
        )
        .filter(pl.col("parts") == len(GCS_COMPONENT_ITEMS))
        .select(
            "subject_id",
            pl.col("hadm_id_new").alias("hadm_id"),
            pl.col("charttime").alias("time"),
            pl.lit("VITAL//gcs_total").alias("code"),
            "numeric_value",
            pl.max_horizontal("available_time", "charttime").alias("available_time"),
        )
    )
    events = finish_events(
        pl.concat(
            [stay_events(encounters, icu_events), lab_events, vital_events, gcs_events],
            how="diagonal_relaxed",
        )
    )
    id_map = pl.concat(
        [
            subjects.with_columns(pl.lit("subject").alias("kind")),
            hadms.with_columns(pl.lit("hadm").alias("kind")),
        ]
    ).select("source_key", "kind", "surrogate_id")
    raw_age_years = adm.select(
        ((pl.col("admittime") - pl.col("dob")).dt.total_days() / 365.25).alias("years")
    )["years"]
    counts = {
        "admissions": admissions.height,
        "admissions_without_icu_stay": int((encounters["unit"] == NO_ICU_STAY).sum()),
        "icu_stays": icu_events.height,
        "encounters": encounters.height,
        "deaths": int(encounters["death_time"].is_not_null().sum()),
        "admission_types_unmapped": count_unmapped(admissions["admission_type"], ADMISSION_TYPES),
        "discharge_locations_unmapped": count_unmapped(
            admissions["discharge_location"], DISCHARGE_DISPOSITIONS
        ),
        "discharge_locations_missing": int((encounters["discharge_disposition"] == UNKNOWN).sum()),
        "insurance_unmapped": count_unmapped(admissions["insurance"], PAYERS),
        "ages_shifted_over_89": int((raw_age_years > 89).sum()),
        "ages_90_or_over": int((encounters["age_years"] >= 90).sum()),
        "chart_rows_flagged_error": int((chart["error"] == 1).sum()),
        "events": events.height,
        "events_implausible": int(events["implausible"].sum()),
    }
    return AdaptedSource(SOURCE, patients, encounters, events, id_map, counts)
