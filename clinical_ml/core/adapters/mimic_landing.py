"""MIMIC-III delivered as a hospital's raw export through the landing zone (issue 16 item 8).

The adapter (:mod:`clinical_ml.core.adapters.mimic`) writes MIMIC straight into the de-identified layer; this
module instead writes what BIDMC's export would look like: CSV files per batch in MIMIC's own terms (upper-case
MIMIC column names, ``ITEMID`` codes, ``VALUEUOM`` units, ``GENDER`` ``M``/``F``, ``ETHNICITY`` such as
``WHITE - RUSSIAN``, ``ADMISSION_TYPE``, ``DISCHARGE_LOCATION``, ``INSURANCE``, care units such as
``TSICU``), each batch with its ``_SUCCESS`` marker naming the site mapping ``mimic_iii``
(``site_mappings/mimic_iii.yaml``), which maps them onto the contract. :func:`site_mapping_document` builds
that mapping from the adapter's own tables, so the two paths map MIMIC alike.

What the export does that a raw dump would not, and why (each is counted in :class:`ExportCounts`):

* **Re-dated per patient.** MIMIC's dates are shifted per patient into 2100-2210; the landing zone rejects
  timestamps after the day of ingestion (``future_date``) and birth dates more than 120 years back, as it
  should for a hospital. Each patient's times move back by one whole number of weeks (intervals, weekdays and
  times of day unchanged), so that the patient's first admission falls at the same relative place in
  2001-2012 (MIMIC-III's real years) as it does in 2100-2210.
* **Ages over 89.** MIMIC writes them as a date of birth about 300 years before admission; the export gives
  such a patient the birth date 90 years before the first admission (the adapter caps them at 90 alike).
* **Result time.** ``labevents`` has no result time, which the contract requires: ``RESULTTIME`` is
  ``CHARTTIME`` plus the adapter's assumed turnaround (60 minutes).
* **Race and ethnicity.** MIMIC has one ``ETHNICITY`` field per admission; the patient's first one is
  delivered under both ``RACE`` and ``ETHNICITY``, and the mapping reads each as the adapter does.
* **The extract.** Lab rows of admissions (outpatient labs have no encounter) whose ``ITEMID`` the mapping
  names; vital rows of the adapter's chart items without ``ERROR = 1``; the name, address and contact
  columns the contract requires are delivered empty (MIMIC has none).

Everything else (units, value spellings, care units, store times before chart times, values that are not
numbers) is delivered as MIMIC holds it, for the landing zone to accept or reject. The site mapping declares
what a hospital would declare for this export, each a class of MIMIC's rows, not a list of them:

* **Blood pressure by method.** An arterial line and a cuff are charted at the same minute (two
  measurements): the items go to the vocabulary's ``*_bp_invasive`` and ``*_bp_noninvasive`` codes
  (:data:`BP_METHODS`), where the adapter folds both into ``systolic_bp`` etc.
* **Unit spellings.** MetaVision's temperature units are ``°F``/``°C``, written ``?F``/``?C`` in MIMIC
  (:data:`MEASUREMENT_UNITS`).
* **Clock skew.** Vitals are charted on an hourly flowsheet grid, and a value is often stored against the
  next slot: about one vital in eight is stored 1 to 59 minutes before its chart time (most charted on the
  hour). The mapping declares one charting interval (:data:`CLOCK_SKEW_MINUTES`); such a row's stored time
  becomes its chart time, as the adapter's availability time does, and an earlier one is still rejected.
"""

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
import yaml

from clinical_ml.core.adapters.common import read_table
from clinical_ml.core.adapters.mimic import (
    ADMISSION_TYPES,
    CHART_ITEMS,
    DISCHARGE_DISPOSITIONS,
    ICU_SYSTEMS,
    NO_ICU_STAY,
    PAYERS,
    UNIT_CODES,
    UNITS,
    _icu_system,
    _lab_item_codes,
    _race_ethnicity,
)
from clinical_ml.core.landing import COMPLETION_MARKER
from clinical_ml.core.storage import sha256_file

SITE_MAPPING_NAME = "mimic_iii"
LAB_RESULT_DELAY_MINUTES = 60  # as the adapter assumes (mimic.adapt's lab_result_delay_minutes)
# The shifted years MIMIC's first admissions fall in, and the real years of MIMIC-III they are moved back to.
SHIFTED_START, SHIFTED_YEARS = datetime(2100, 1, 1), 110
REAL_START, REAL_YEARS = datetime(2001, 1, 1), 11
# A shifted age above this is MIMIC's way of writing "over 89"; such a patient is delivered as 90.
SHIFTED_AGE_YEARS = 150
AGE_OVER_89 = 90
# Every ETHNICITY value of MIMIC-III 1.4 (admissions table), so the mapping is complete beyond the demo.
ETHNICITY_VALUES: tuple[str, ...] = (
    "AMERICAN INDIAN/ALASKA NATIVE",
    "AMERICAN INDIAN/ALASKA NATIVE FEDERALLY RECOGNIZED TRIBE",
    "ASIAN",
    "ASIAN - ASIAN INDIAN",
    "ASIAN - CAMBODIAN",
    "ASIAN - CHINESE",
    "ASIAN - FILIPINO",
    "ASIAN - JAPANESE",
    "ASIAN - KOREAN",
    "ASIAN - OTHER",
    "ASIAN - THAI",
    "ASIAN - VIETNAMESE",
    "BLACK/AFRICAN",
    "BLACK/AFRICAN AMERICAN",
    "BLACK/CAPE VERDEAN",
    "BLACK/HAITIAN",
    "CARIBBEAN ISLAND",
    "HISPANIC OR LATINO",
    "HISPANIC/LATINO - CENTRAL AMERICAN (OTHER)",
    "HISPANIC/LATINO - COLOMBIAN",
    "HISPANIC/LATINO - CUBAN",
    "HISPANIC/LATINO - DOMINICAN",
    "HISPANIC/LATINO - GUATEMALAN",
    "HISPANIC/LATINO - HONDURAN",
    "HISPANIC/LATINO - MEXICAN",
    "HISPANIC/LATINO - PUERTO RICAN",
    "HISPANIC/LATINO - SALVADORAN",
    "MIDDLE EASTERN",
    "MULTI RACE ETHNICITY",
    "NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER",
    "OTHER",
    "PATIENT DECLINED TO ANSWER",
    "PORTUGUESE",
    "SOUTH AMERICAN",
    "UNABLE TO OBTAIN",
    "UNKNOWN/NOT SPECIFIED",
    "WHITE",
    "WHITE - BRAZILIAN",
    "WHITE - EASTERN EUROPEAN",
    "WHITE - OTHER EUROPEAN",
    "WHITE - RUSSIAN",
)
# Blood pressure items of CareVue and MetaVision by method (d_items labels in the comments): the suffix of
# their vocabulary code after the adapter's code (``systolic_bp`` -> ``systolic_bp_invasive``).
BP_METHODS: dict[int, str] = {
    **dict.fromkeys((51, 8368, 52), "invasive"),  # Arterial BP [Systolic], [Diastolic], Mean
    **dict.fromkeys((6701, 8555, 6702), "invasive"),  # Arterial BP #2 [Systolic], [Diastolic], Mean #2
    **dict.fromkeys((220050, 220051, 220052), "invasive"),  # Arterial Blood Pressure systolic, ...
    225312: "invasive",  # ART BP mean
    **dict.fromkeys((442, 8440, 443), "noninvasive"),  # Manual BP [Systolic], [Diastolic], Mean(calc)
    **dict.fromkeys((455, 8441, 456), "noninvasive"),  # NBP [Systolic], [Diastolic], NBP Mean
    **dict.fromkeys((220179, 220180, 220181), "noninvasive"),  # Non Invasive Blood Pressure systolic, ...
}
# MIMIC's spellings of units the vocabulary knows under another (the degree sign became "?").
MEASUREMENT_UNITS: dict[str, dict[str, str]] = {"vitals": {"?F": "[degF]", "?C": "Cel"}}
# One charting interval of the hourly flowsheet: how long before its chart time a vital may be stored.
CLOCK_SKEW_MINUTES: dict[str, int] = {"stored_before_charted": 60}
# Export header -> contract column, per file (the ``columns`` section of the mapping).
COLUMNS: dict[str, dict[str, str]] = {
    "patients": {
        "SUBJECT_ID": "mrn",
        "GENDER": "sex",
        "DOB": "birth_date",
        "RACE": "race",
        "ETHNICITY": "ethnicity",
        "FIRST_NAME": "first_name",
        "LAST_NAME": "last_name",
        "ADDRESS": "address",
        "ZIP": "zip",
        "PHONE": "phone",
        "EMAIL": "email",
    },
    "encounters": {
        "HADM_ID": "encounter_id",
        "SUBJECT_ID": "mrn",
        "ADMITTIME": "admit_time",
        "DISCHTIME": "discharge_time",
        "DEATHTIME": "death_time",
        "ADMISSION_TYPE": "admission_type",
        "FIRST_CAREUNIT": "unit",
        "DBSOURCE": "site",
        "DISCHARGE_LOCATION": "discharge_disposition",
        "INSURANCE": "payer",
    },
    "labs": {
        "HADM_ID": "encounter_id",
        "ITEMID": "loinc_code",
        "VALUENUM": "value",
        "VALUEUOM": "unit",
        "CHARTTIME": "specimen_time",
        "RESULTTIME": "result_time",
    },
    "vitals": {
        "HADM_ID": "encounter_id",
        "ITEMID": "code",
        "VALUENUM": "value",
        "VALUEUOM": "unit",
        "CHARTTIME": "charted_time",
        "STORETIME": "stored_time",
    },
}
TS_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class ExportCounts:
    """What the export wrote and what it left out (counts only)."""

    batches: int
    patients: int
    admissions: int
    lab_rows: int
    vital_rows: int
    lab_rows_without_admission: int
    lab_rows_of_unmapped_items: int
    vital_rows_flagged_error: int
    ages_over_89: int


def _mapping_values() -> dict[str, dict[str, str]]:
    frame = pl.DataFrame({"e": list(ETHNICITY_VALUES)})
    race, ethnicity = _race_ethnicity(pl.col("e"))
    coded = frame.with_columns(race.alias("race"), ethnicity.alias("ethnicity"))
    return {
        "sex": {"M": "M", "F": "F"},
        "race": dict(coded.select("e", "race").iter_rows()),
        "ethnicity": dict(coded.select("e", "ethnicity").iter_rows()),
        "admission_type": dict(ADMISSION_TYPES),
        "discharge_disposition": dict(DISCHARGE_DISPOSITIONS),
        "payer": dict(PAYERS),
    }


def vital_item_codes() -> dict[int, str]:
    """Chart item id -> vocabulary code: the adapter's code, by method for blood pressure items."""
    return {
        item: f"{code}_{BP_METHODS[item]}" if item in BP_METHODS else code
        for item, (code, _) in sorted(CHART_ITEMS.items())
    }


def site_mapping_document(d_labitems: pl.DataFrame) -> dict:
    """The ``mimic_iii`` site mapping, built from the adapter's tables (item ids, units, value tables) and
    MIMIC's ``d_labitems`` (the lab items whose LOINC the vocabulary holds)."""
    units: dict[str, dict[str, str]] = {
        local: {"code": code, "type": UNIT_CODES[code]} for local, code in sorted(UNITS.items())
    }
    units[NO_ICU_STAY] = {"type": UNIT_CODES[NO_ICU_STAY]}
    labs = {str(i): c.removeprefix("LAB//") for i, c in sorted(_lab_item_codes(d_labitems).items())}
    return {
        "description": "MIMIC-III 1.4 (BIDMC) export in its own terms: item ids, units and value spellings.",
        "columns": COLUMNS,
        "codes": {
            "labs": labs,
            "vitals": {str(i): code for i, code in vital_item_codes().items()},
        },
        "values": _mapping_values(),
        "units": units,
        "sites": {s: f"BIDMC/{s}" for s in (*ICU_SYSTEMS.values(), "unknown")},
        "id_patterns": {"mrn": r"^[0-9]{1,12}$", "encounter_id": r"^[0-9]{1,12}$"},
        "measurement_units": MEASUREMENT_UNITS,
        "clock_skew_minutes": CLOCK_SKEW_MINUTES,
    }


def site_mapping_yaml(d_labitems: pl.DataFrame) -> str:
    """The mapping file's text: a header saying where it comes from, then :func:`site_mapping_document`."""
    header = (
        "# Site mapping of the MIMIC-III export (clinical_ml/core/adapters/mimic_landing.py writes the export).\n"
        "# Generated from the adapter's tables (clinical_ml/core/adapters/mimic.py) and MIMIC's d_labitems by\n"
        "#   python -m clinical_ml.core.adapters.mimic_landing --mapping site_mappings/mimic_iii.yaml\n"
        "# A test fails when this file and the adapter disagree. Lab codes: ITEMID -> LOINC of the vocabulary;\n"
        "# vitals: CareVue and MetaVision ITEMIDs -> vital codes, blood pressure by method (arterial line:\n"
        "# *_invasive, cuff: *_noninvasive; both are charted at the same minute). Unit spellings common in US\n"
        "# exports (mEq/L, K/uL, IU/L, BPM, mmHg, Deg. F ...) are variants in clinical_ml/core/vocabulary.yaml;\n"
        "# measurement_units maps MIMIC's own (?F and ?C: the degree sign of MetaVision's units was lost).\n"
        "# clock_skew_minutes: vitals are charted on an hourly flowsheet and often stored against the next\n"
        "# slot, up to one interval before their chart time; such a row is accepted with its stored time\n"
        "# raised to the chart time (counted as stored_before_charted_tolerated), an earlier one rejected.\n"
    )
    return header + yaml.safe_dump(site_mapping_document(d_labitems), sort_keys=False, allow_unicode=False)


def _redated(frame: pl.DataFrame, offsets: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    out = frame.join(offsets, on="subject_id", how="left")
    return out.with_columns([(pl.col(c) - pl.col("_offset")).alias(c) for c in columns]).drop("_offset")


def _ts(col: str) -> pl.Expr:
    return pl.col(col).dt.strftime(TS_FORMAT)


def export_tables(source: Path | str) -> tuple[dict[str, pl.DataFrame], ExportCounts]:
    """The MIMIC export's four files (one frame each, all batches), with ``_batch_time`` on encounters.

    Parameters
    ----------
    source
        Folder holding MIMIC-III's Parquet tables (``tables/<name>.parquet``), as the adapter reads them.
    """
    source = Path(source)
    patients = read_table(source, "patients", columns=["subject_id", "gender", "dob"])
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
            "admission_location",
            "discharge_location",
            "insurance",
            "ethnicity",
            "hospital_expire_flag",
        ],
    )
    icustays = read_table(
        source, "icustays", columns=["subject_id", "hadm_id", "intime", "first_careunit", "dbsource"]
    )
    d_labitems = read_table(source, "d_labitems", columns=["itemid", "loinc_code"])
    labs = read_table(
        source,
        "labevents",
        columns=["subject_id", "hadm_id", "itemid", "charttime", "value", "valuenum", "valueuom"],
    )
    chart = (
        pl.scan_parquet(source / "tables" / "chartevents.parquet")
        if (source / "tables").is_dir()
        else pl.scan_parquet(source / "chartevents.parquet")
    )
    vitals_all = (
        chart.filter(pl.col("itemid").is_in(list(CHART_ITEMS)))
        .select(
            "subject_id",
            "hadm_id",
            "itemid",
            "charttime",
            "storetime",
            "value",
            "valuenum",
            "valueuom",
            "error",
        )
        .collect()
    )
    # one whole number of weeks per patient, from the patient's first admission
    first = admissions.group_by("subject_id").agg(pl.col("admittime").min().alias("_first"))
    target = pl.lit(REAL_START) + (pl.col("_first") - pl.lit(SHIFTED_START)) * REAL_YEARS / SHIFTED_YEARS
    week_us = 7 * 24 * 3600 * 1_000_000
    offsets = first.with_columns(
        (((pl.col("_first") - target).dt.total_microseconds() // week_us) * week_us)
        .cast(pl.Duration("us"))
        .alias("_offset")
    )
    over_89 = (pl.col("_first") - pl.col("dob")).dt.total_days() / 365.25 > SHIFTED_AGE_YEARS
    # an age "over 89" becomes 90 on the re-dated calendar (a day-count shift would move a birthday)
    pts = patients.join(offsets, on="subject_id", how="inner").with_columns(
        pl.when(over_89)
        .then((pl.col("_first") - pl.col("_offset")).dt.offset_by(f"-{AGE_OVER_89}y"))
        .otherwise(pl.col("dob") - pl.col("_offset"))
        .alias("dob"),
        over_89.alias("_over_89"),
    )
    n_over_89 = int(pts["_over_89"].sum())
    pts = pts.drop("_first", "_offset", "_over_89")
    offsets = offsets.drop("_first")
    first_ethnicity = (
        admissions.sort("admittime").unique("subject_id", keep="first").select("subject_id", "ethnicity")
    )
    icu = icustays.join(admissions.select("hadm_id"), on="hadm_id", how="semi")
    first_unit = icu.sort("intime").unique("hadm_id", keep="first").select("hadm_id", "first_careunit")
    adm = (
        _redated(admissions, offsets, ["admittime", "dischtime", "deathtime"])
        .join(first_unit, on="hadm_id", how="left")
        .join(_icu_system(admissions, icu), on="hadm_id", how="left")
    )
    encounters = adm.sort("admittime", "hadm_id").select(
        pl.col("hadm_id").alias("HADM_ID"),
        pl.col("subject_id").alias("SUBJECT_ID"),
        _ts("admittime").alias("ADMITTIME"),
        _ts("dischtime").alias("DISCHTIME"),
        _ts("deathtime").alias("DEATHTIME"),
        pl.col("admission_type").alias("ADMISSION_TYPE"),
        pl.col("admission_location").alias("ADMISSION_LOCATION"),
        pl.col("discharge_location").alias("DISCHARGE_LOCATION"),
        pl.col("insurance").alias("INSURANCE"),
        pl.col("first_careunit").fill_null(NO_ICU_STAY).alias("FIRST_CAREUNIT"),
        pl.col("dbsource").fill_null("unknown").alias("DBSOURCE"),
        pl.col("hospital_expire_flag").alias("HOSPITAL_EXPIRE_FLAG"),
        pl.col("admittime").alias("_batch_time"),
    )
    empty = pl.lit(None, dtype=pl.String)
    patients_out = (
        pts.join(first_ethnicity, on="subject_id", how="left")
        .sort("subject_id")
        .select(
            pl.col("subject_id").alias("SUBJECT_ID"),
            pl.col("gender").alias("GENDER"),
            pl.col("dob").dt.strftime("%Y-%m-%d").alias("DOB"),
            pl.col("ethnicity").alias("RACE"),
            pl.col("ethnicity").alias("ETHNICITY"),
            *[empty.alias(c) for c in ("FIRST_NAME", "LAST_NAME", "ADDRESS", "ZIP", "PHONE", "EMAIL")],
        )
    )
    lab_items = _lab_item_codes(d_labitems)
    with_admission = labs.filter(pl.col("hadm_id").is_not_null())
    lab_rows = _redated(
        with_admission.filter(pl.col("itemid").is_in(list(lab_items))), offsets, ["charttime"]
    ).select(
        pl.col("subject_id").alias("SUBJECT_ID"),
        pl.col("hadm_id").alias("HADM_ID"),
        pl.col("itemid").alias("ITEMID"),
        _ts("charttime").alias("CHARTTIME"),
        (pl.col("charttime") + pl.duration(minutes=LAB_RESULT_DELAY_MINUTES))
        .dt.strftime(TS_FORMAT)
        .alias("RESULTTIME"),
        pl.col("value").alias("VALUE"),
        pl.col("valuenum").alias("VALUENUM"),
        pl.col("valueuom").alias("VALUEUOM"),
    )
    ok = vitals_all.filter(pl.col("error").fill_null(0) != 1)
    vital_rows = _redated(ok, offsets, ["charttime", "storetime"]).select(
        pl.col("subject_id").alias("SUBJECT_ID"),
        pl.col("hadm_id").alias("HADM_ID"),
        pl.col("itemid").alias("ITEMID"),
        _ts("charttime").alias("CHARTTIME"),
        _ts("storetime").alias("STORETIME"),
        pl.col("value").alias("VALUE"),
        pl.col("valuenum").alias("VALUENUM"),
        pl.col("valueuom").alias("VALUEUOM"),
    )
    counts = ExportCounts(
        batches=0,
        patients=patients_out.height,
        admissions=encounters.height,
        lab_rows=lab_rows.height,
        vital_rows=vital_rows.height,
        lab_rows_without_admission=labs.height - with_admission.height,
        lab_rows_of_unmapped_items=with_admission.height - lab_rows.height,
        vital_rows_flagged_error=vitals_all.height - ok.height,
        ages_over_89=n_over_89,
    )
    return {
        "patients": patients_out,
        "encounters": encounters,
        "labs": lab_rows,
        "vitals": vital_rows,
    }, counts


def _write_marker(batch_dir: Path) -> None:
    files = sorted(p for p in batch_dir.iterdir() if p.is_file() and p.name != COMPLETION_MARKER)
    listing = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    marker = {"site_mapping": SITE_MAPPING_NAME, "files": listing}
    (batch_dir / COMPLETION_MARKER).write_text(json.dumps(marker, indent=2))


def write_landing_batches(source: Path | str, landing: Path | str, *, n_batches: int = 4) -> ExportCounts:
    """Write the MIMIC export into ``landing`` as ``n_batches`` batches split by admission time.

    Each batch holds the admissions of its time slice, their patients and their lab and vital rows (batches
    are self-contained: the landing zone checks events against the batch's own encounters), and a
    ``_SUCCESS`` marker, written last, naming the ``mimic_iii`` site mapping. Batch ids are
    ``mimic_iii_<nn>``; existing folders of those names are overwritten.
    """
    if n_batches < 1:
        raise ValueError("n_batches must be at least 1")
    tables, counts = export_tables(source)
    enc = tables["encounters"]
    order = pl.int_range(pl.len()) * n_batches // pl.len()
    enc = enc.sort("_batch_time", "HADM_ID").with_columns(order.alias("_batch"))
    landing = Path(landing)
    written = 0
    for b in range(n_batches):
        part = enc.filter(pl.col("_batch") == b).drop("_batch_time", "_batch")
        if part.height == 0:
            continue
        batch_dir = landing / f"{SITE_MAPPING_NAME}_{b + 1:02d}"
        batch_dir.mkdir(parents=True, exist_ok=True)
        hadm = part["HADM_ID"].implode()
        frames = {
            "patients": tables["patients"].filter(pl.col("SUBJECT_ID").is_in(part["SUBJECT_ID"].implode())),
            "encounters": part,
            "labs": tables["labs"].filter(pl.col("HADM_ID").is_in(hadm)),
            "vitals": tables["vitals"].filter(pl.col("HADM_ID").is_in(hadm)),
        }
        for name, frame in frames.items():
            frame.write_csv(batch_dir / f"{name}.csv")
        _write_marker(batch_dir)
        written += 1
    return ExportCounts(**{**counts.__dict__, "batches": written})


if __name__ == "__main__":
    import argparse

    from clinical_ml.core.adapters.mimic import default_source

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=None, help="MIMIC-III Parquet folder")
    parser.add_argument("--landing", type=Path, help="write the export's batches into this landing zone")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--mapping", type=Path, help="write the site mapping file here")
    args = parser.parse_args()
    src = args.source or default_source()
    if args.mapping:
        args.mapping.write_text(
            site_mapping_yaml(read_table(src, "d_labitems", columns=["itemid", "loinc_code"]))
        )
    if args.landing:
        print(write_landing_batches(src, args.landing, n_batches=args.batches))
