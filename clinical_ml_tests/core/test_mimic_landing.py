"""The MIMIC-III export writer (core/adapters/mimic_landing.py) on a tiny MIMIC-shaped folder.

The end-to-end run on the real demo (ingestion, anonymization, cohort) is clinical_ml_tests/e2e/
test_mimic_landing.py; these checks need no shared data.
"""

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from clinical_ml.core.adapters import mimic_landing
from clinical_ml.core.ingestion import BatchContext, ingest_file
from clinical_ml.core.landing import marker_site_mapping, read_batch
from clinical_ml.core.site_mapping import load_site_mapping

T = datetime
NOW = datetime(2026, 12, 1)


def _write(folder: Path, name: str, frame: pl.DataFrame) -> None:
    (folder / "tables").mkdir(parents=True, exist_ok=True)
    frame.write_parquet(folder / "tables" / f"{name}.parquet")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Two patients, three admissions (one patient "over 89"), labs and vitals, MIMIC's column names."""
    src = tmp_path / "mimic"
    _write(
        src,
        "patients",
        pl.DataFrame(
            {
                "subject_id": [101, 202],
                "gender": ["F", "M"],
                # 202 is "over 89": MIMIC shifts the birth date ~300 years before the admission
                "dob": [T(2080, 5, 17), T(1850, 1, 1)],
            }
        ),
    )
    _write(
        src,
        "admissions",
        pl.DataFrame(
            {
                "subject_id": [101, 101, 202],
                "hadm_id": [1001, 1002, 2001],
                "admittime": [T(2150, 3, 1, 8, 30), T(2150, 3, 20, 22, 5), T(2190, 7, 4, 12)],
                "dischtime": [T(2150, 3, 9, 14), T(2150, 3, 30, 10), T(2190, 7, 10, 9)],
                "deathtime": [None, None, T(2190, 7, 10, 9)],
                "admission_type": ["EMERGENCY", "URGENT", "EMERGENCY"],
                "admission_location": ["EMERGENCY ROOM ADMIT"] * 3,
                "discharge_location": ["HOME", "SNF", "DEAD/EXPIRED"],
                "insurance": ["Medicare"] * 3,
                "ethnicity": ["WHITE - RUSSIAN", "WHITE - RUSSIAN", "HISPANIC/LATINO - PUERTO RICAN"],
                "hospital_expire_flag": [0, 0, 1],
            },
            schema_overrides={"deathtime": pl.Datetime("us")},
        ),
    )
    _write(
        src,
        "icustays",
        pl.DataFrame(
            {
                "subject_id": [101, 101, 202],
                "hadm_id": [1001, 1002, 2001],
                "intime": [T(2150, 3, 1, 10), T(2150, 3, 21), T(2190, 7, 4, 13)],
                "first_careunit": ["TSICU", "MICU", "CSRU"],
                "dbsource": ["carevue", "carevue", "metavision"],
            }
        ),
    )
    _write(
        src,
        "d_labitems",
        pl.DataFrame({"itemid": [50912, 50983, 99999], "loinc_code": ["2160-0", "2951-2", "0000-0"]}),
    )
    _write(
        src,
        "labevents",
        pl.DataFrame(
            {
                "subject_id": [101, 101, 101, 202],
                "hadm_id": [1001, None, 1001, 2001],
                "itemid": [50912, 50912, 99999, 50983],
                "charttime": [T(2150, 3, 2, 6), T(2150, 1, 1), T(2150, 3, 2, 6), T(2190, 7, 5, 4, 10)],
                "value": ["1.1", "0.9", "x", "139"],
                "valuenum": [1.1, 0.9, None, 139.0],
                "valueuom": ["mg/dL", "mg/dL", None, "mEq/L"],
            }
        ),
    )
    _write(
        src,
        "chartevents",
        pl.DataFrame(
            {
                "subject_id": [101, 101, 202, 202, 202, 202, 202],
                "hadm_id": [1001, 1001, 2001, 2001, 2001, 2001, 2001],
                # heart rate; an error row; an item not extracted; arterial and cuff systolic pressure at
                # the same minute; a temperature in MetaVision's "?F", stored 40 minutes before its chart time
                "itemid": [211, 211, 220045, 1234, 220050, 220179, 223761],
                "charttime": [T(2150, 3, 1, 11), T(2150, 3, 1, 12)]
                + [T(2190, 7, 4, 14)] * 4
                + [T(2190, 7, 4, 16)],
                "storetime": [
                    T(2150, 3, 1, 11, 5),
                    T(2150, 3, 1, 12, 5),
                    T(2190, 7, 4, 14, 1),
                    T(2190, 7, 4, 14),
                    T(2190, 7, 4, 14, 2),
                    T(2190, 7, 4, 14, 2),
                    T(2190, 7, 4, 15, 20),
                ],
                "value": ["88", "90", "101", "x", "121", "109", "98.6"],
                "valuenum": [88.0, 90.0, 101.0, None, 121.0, 109.0, 98.6],
                "valueuom": ["BPM", "BPM", "bpm", None, "mmHg", "mmHg", "?F"],
                "error": [0, 1, 0, 0, 0, 0, 0],
            }
        ),
    )
    return src


def _read(batch_dir: Path, name: str) -> pl.DataFrame:
    return pl.read_csv(batch_dir / f"{name}.csv", infer_schema=False)


def _ts(col: str) -> pl.Expr:
    return pl.col(col).str.strptime(pl.Datetime("us"), mimic_landing.TS_FORMAT)


def test_the_export_is_in_mimic_terms_re_dated_with_intervals_kept(source: Path):
    tables, counts = mimic_landing.export_tables(source)
    enc = tables["encounters"]
    assert set(mimic_landing.COLUMNS["encounters"]) <= set(enc.columns)
    assert enc["ADMISSION_TYPE"].to_list() == ["EMERGENCY", "URGENT", "EMERGENCY"]
    assert enc["FIRST_CAREUNIT"].to_list() == [
        "TSICU",
        "MICU",
        "CSRU",
    ]  # MIMIC's names, the mapping codes them
    assert tables["patients"]["RACE"].to_list() == ["WHITE - RUSSIAN", "HISPANIC/LATINO - PUERTO RICAN"]
    admit, disch = enc.select(_ts("ADMITTIME")).to_series(), enc.select(_ts("DISCHTIME")).to_series()
    # in MIMIC-III's real years, never after ingestion; every interval and weekday as in the source
    assert admit.dt.year().is_between(2001, 2012).all() and (disch < NOW).all()
    assert (disch - admit).to_list() == [
        timedelta(days=8, hours=5, minutes=30),
        timedelta(days=9, hours=11, minutes=55),
        timedelta(days=5, hours=21),
    ]
    assert admit.dt.weekday().to_list() == [
        T(2150, 3, 1).isoweekday(),
        T(2150, 3, 20).isoweekday(),
        T(2190, 7, 4).isoweekday(),
    ]
    assert admit[1] - admit[0] == timedelta(days=19, hours=13, minutes=35)
    # the patient "over 89" is delivered as 90 at the first admission; the other keeps the interval
    dob = tables["patients"].select(pl.col("DOB").str.to_date()).to_series()
    assert (admit[2].date().year - dob[1].year, admit[2].date().replace(year=dob[1].year)) == (90, dob[1])
    assert admit[0].date() - dob[0] == T(2150, 3, 1).date() - T(2080, 5, 17).date()
    assert counts.ages_over_89 == 1
    # lab result time: the adapter's assumed turnaround after the chart time
    labs = tables["labs"]
    assert (labs.select(_ts("RESULTTIME") - _ts("CHARTTIME")).to_series() == timedelta(minutes=60)).all()
    # the extract: labs of admissions and of mapped items, vitals of the chart items without ERROR = 1
    assert labs["ITEMID"].to_list() == [50912, 50983]
    assert labs["VALUEUOM"].to_list() == ["mg/dL", "mEq/L"]
    assert (counts.lab_rows_without_admission, counts.lab_rows_of_unmapped_items) == (1, 1)
    assert tables["vitals"]["ITEMID"].to_list() == [211, 220045, 220050, 220179, 223761]
    assert counts.vital_rows_flagged_error == 1
    assert tables["vitals"]["VALUEUOM"].to_list()[-1] == "?F"  # as MIMIC holds it: the mapping reads it


def test_batches_are_split_by_admission_time_self_contained_and_marked(source: Path, tmp_path: Path):
    landing = tmp_path / "landing"
    counts = mimic_landing.write_landing_batches(source, landing, n_batches=2)
    dirs = sorted(landing.iterdir())
    assert counts.batches == len(dirs) == 2
    first_admits = []
    for d in dirs:
        batch = read_batch(d)
        assert batch is not None and set(batch.files) == {f"{s}.csv" for s in mimic_landing.COLUMNS}
        assert marker_site_mapping(d) == mimic_landing.SITE_MAPPING_NAME
        enc = _read(d, "encounters")
        assert set(enc["SUBJECT_ID"]) <= set(_read(d, "patients")["SUBJECT_ID"])
        for events in ("labs", "vitals"):
            assert set(_read(d, events)["HADM_ID"]) <= set(enc["HADM_ID"])
        first_admits.append(enc.select(_ts("ADMITTIME").min()).item())
    assert first_admits == sorted(first_admits)
    with pytest.raises(ValueError):
        mimic_landing.write_landing_batches(source, landing, n_batches=0)


def test_the_site_mapping_maps_every_delivered_file(source: Path, tmp_path: Path):
    landing = tmp_path / "landing"
    mimic_landing.write_landing_batches(source, landing, n_batches=1)
    (batch_dir,) = landing.iterdir()
    mapping = load_site_mapping(mimic_landing.SITE_MAPPING_NAME)
    results = {}
    context = BatchContext()
    for name in ("patients", "encounters", "labs", "vitals"):
        results[name] = ingest_file(batch_dir / f"{name}.csv", name, batch=context, now=NOW, mapping=mapping)
        if name == "patients":
            context = BatchContext(patients=results[name].accepted)
        if name == "encounters":
            context = BatchContext(patients=context.patients, encounters=results[name].accepted)
    for name, r in results.items():
        assert r.rows_rejected == 0, (name, r.rejected_by_reason)
    pts, enc = results["patients"].accepted, results["encounters"].accepted
    assert pts.sort("mrn")["race"].to_list() == ["White", "Unknown"]
    assert pts.sort("mrn")["ethnicity"].to_list() == ["Not Hispanic or Latino", "Hispanic or Latino"]
    assert enc["unit"].to_list() == ["SICU", "MICU", "CTICU"] and set(enc["unit_type"]) == {"ICU"}
    assert enc["site"].to_list() == ["BIDMC/carevue", "BIDMC/carevue", "BIDMC/metavision"]
    assert enc["discharge_disposition"].to_list() == ["HOME", "SKILLED_NURSING_FACILITY", "EXPIRED"]
    assert results["labs"].accepted["loinc_code"].to_list() == ["2160-0", "2951-2"]
    vitals = results["vitals"].accepted.sort("row_number")
    # arterial line and cuff at the same minute: two measurements under their own codes, not a duplicate
    assert vitals["code"].to_list() == [
        "heart_rate",
        "heart_rate",
        "systolic_bp_invasive",
        "systolic_bp_noninvasive",
        "temperature",
    ]
    assert vitals["unit"].to_list() == ["/min", "/min", "mm[Hg]", "mm[Hg]", "Cel"]
    assert vitals["value"][-1] == pytest.approx(37.0)
    # stored 40 minutes before its chart time, within the declared interval: available when charted
    assert results["vitals"].warnings["stored_before_charted_tolerated"] == 1
    assert vitals["stored_time"][-1] == vitals["charted_time"][-1]
