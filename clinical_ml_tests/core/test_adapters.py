"""Source adapters (eICU, MIMIC-III): mapping rules on small inline tables, then on the committed subsets,
then on the full demo databases where ``../shared/data`` is present."""

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from clinical_ml.core.adapters import eicu, mimic
from clinical_ml.core.adapters.common import DISCHARGE_DISPOSITIONS, AdapterError, write_deid_layer
from clinical_ml.core.anonymization import DEID_COLUMNS
from clinical_ml.core.labeling import build_cohort, build_labels
from clinical_ml.core.meds_layout import check_meds_shard, to_meds_table
from clinical_ml.core.usecase import UseCase, parse_use_case

RNG_SEED = 3


def _write(root: Path, tables: dict[str, pl.DataFrame]) -> Path:
    (root / "tables").mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.write_parquet(root / "tables" / f"{name}.parquet")
    return root


def _eicu_patient(**over) -> dict:
    row = {
        "patientunitstayid": 11,
        "patienthealthsystemstayid": 101,
        "uniquepid": "002-1",
        "gender": "Female",
        "age": "> 89",
        "ethnicity": "Hispanic",
        "hospitalid": 7,
        "unittype": "MICU",
        "unitadmittime24": "13:30:00",
        "unitadmitsource": "Emergency Department",
        "unitvisitnumber": 1,
        "hospitaladmitoffset": -120,
        "hospitaldischargeoffset": 3000,
        "hospitaldischargeyear": 2014,
        "hospitaldischargestatus": "Expired",
        "hospitaldischargelocation": "Death",
        # leakage columns that the adapter must never read
        "unitdischargestatus": "Expired",
        "dischargeweight": 70.0,
    }
    row.update(over)
    return row


def _aps(stay: int, **over) -> dict:
    row = {c: -1.0 for c in eicu.APACHE_CODES} | {"eyes": 4, "motor": 6, "verbal": 5, "meds": 0}
    row.update({"patientunitstayid": stay, "creatinine": 2.5, "heartrate": 130.0, "intubated": 0, "vent": 1})
    row.update(over)
    return row


def _eicu_tables(patients: list[dict], aps: list[dict], vitals: list[dict]) -> dict[str, pl.DataFrame]:
    ints = {c: pl.Int64 for c in ("intubated", "vent", "dialysis", "eyes", "motor", "verbal", "meds")}
    return {
        "patient": pl.DataFrame(patients),
        "hospital": pl.DataFrame({"hospitalid": [7, 8], "region": ["South", None]}),
        "apachepredvar": pl.DataFrame(
            {
                "patientunitstayid": [p["patientunitstayid"] for p in patients],
                "electivesurgery": [None] * len(patients),
                "diedinhospital": [1] * len(patients),
            },
            schema_overrides={"electivesurgery": pl.Int64},
        ),
        "apacheapsvar": pl.DataFrame(aps).with_columns(pl.col(list(ints)).cast(pl.Int64)),
        "vitalaperiodic": pl.DataFrame(
            vitals,
            schema={
                "patientunitstayid": pl.Int64,
                "observationoffset": pl.Int64,
                "noninvasivesystolic": pl.Float64,
                "noninvasivediastolic": pl.Float64,
                "noninvasivemean": pl.Float64,
            },
        ),
    }


@pytest.fixture
def eicu_small(tmp_path: Path) -> Path:
    patients = [
        _eicu_patient(),
        # second unit stay of the same hospital stay, admitted 600 min after the first
        _eicu_patient(
            patientunitstayid=12, unitvisitnumber=2, hospitaladmitoffset=-720, hospitaldischargeoffset=2400
        ),
        _eicu_patient(
            patientunitstayid=21,
            patienthealthsystemstayid=201,
            uniquepid="002-2",
            gender="Male",
            age="64",
            ethnicity="Caucasian",
            hospitalid=8,
            hospitaldischargeyear=2015,
            hospitaldischargestatus="Alive",
            hospitaldischargelocation="Home",
        ),
        _eicu_patient(
            patientunitstayid=31,
            patienthealthsystemstayid=301,
            uniquepid="002-3",
            hospitaldischargestatus=None,
        ),
    ]
    aps = [_aps(11), _aps(21, creatinine=-1.0, eyes=-1), _aps(12, creatinine=9.0)]
    vitals = [
        {
            "patientunitstayid": 11,
            "observationoffset": 60,
            "noninvasivesystolic": 90.0,
            "noninvasivediastolic": None,
            "noninvasivemean": 65.0,
        },
        {
            "patientunitstayid": 12,
            "observationoffset": 30,
            "noninvasivesystolic": 100.0,
            "noninvasivediastolic": 50.0,
            "noninvasivemean": 70.0,
        },
    ]
    return _write(tmp_path / "eicu", _eicu_tables(patients, aps, vitals))


def test_eicu_frames_hold_only_allowlisted_columns_and_no_source_ids(eicu_small: Path):
    out = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    assert tuple(out.encounters.columns) == DEID_COLUMNS["encounters"]
    assert tuple(out.patients.columns) == DEID_COLUMNS["patients"]
    assert tuple(out.events.columns) == DEID_COLUMNS["events"]
    source_ids = {11, 12, 21, 31, 101, 201, 301}
    for frame in (out.encounters, out.patients, out.events):
        for col in ("subject_id", "hadm_id"):
            if col in frame.columns:
                assert not set(frame[col].drop_nulls().to_list()) & source_ids
    assert set(out.id_map["kind"].unique()) == {"subject", "hadm"}


def test_eicu_unknown_outcome_is_dropped_and_expired_sets_death_at_discharge(eicu_small: Path):
    out = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    assert out.encounters.height == 2  # hospital stays 101 and 201; 301 has no discharge status
    assert out.counts["hospital_stays_dropped_unknown_outcome"] == 1
    died = out.encounters.filter(pl.col("death_time").is_not_null())
    assert died.height == 1
    assert died["death_time"][0] == died["discharge_time"][0]


def test_eicu_offsets_become_timestamps_on_the_discharge_year_with_exact_intervals(eicu_small: Path):
    out = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    enc = out.encounters.sort("period")
    assert enc["period"].to_list() == ["2014Q3", "2015Q3"]
    assert enc["batch_id"].to_list() == ["eicu_2014", "eicu_2015"]
    first = enc.row(0, named=True)
    assert first["admit_time"] == datetime(2014, 7, 1, 13, 30)
    assert first["discharge_time"] - first["admit_time"] == timedelta(minutes=3000)
    ev = out.events.filter(pl.col("hadm_id") == first["hadm_id"])
    sbp = ev.filter(pl.col("code") == "VITAL//systolic_bp").sort("time")
    # stay 11 at +60 min; stay 12 admitted 600 min later, its value at +30 min of its own admission
    assert (sbp["time"] - first["admit_time"]).to_list() == [timedelta(minutes=60), timedelta(minutes=630)]


def test_eicu_ages_over_89_become_90_and_minus_one_is_not_recorded(eicu_small: Path):
    out = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    ages = sorted(out.encounters["age_years"].to_list())
    assert ages == [64, 90]
    alive = out.encounters.filter(pl.col("death_time").is_null())["hadm_id"][0]
    ev = out.events.filter(pl.col("hadm_id") == alive)
    assert ev.filter(pl.col("code") == "LAB//2160-0").height == 0  # creatinine -1: no event
    assert ev.filter(pl.col("code") == "VITAL//gcs_total").height == 0  # eyes -1: no total
    assert (ev["numeric_value"].drop_nulls() != -1).all()


def test_eicu_apache_values_of_the_index_stay_only_at_the_end_of_day_one(eicu_small: Path):
    out = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    died = out.encounters.filter(pl.col("death_time").is_not_null()).row(0, named=True)
    crea = out.events.filter((pl.col("hadm_id") == died["hadm_id"]) & (pl.col("code") == "LAB//2160-0"))
    assert crea["numeric_value"].to_list() == [2.5]  # stay 12's value (9.0) is not the index stay's
    assert crea["time"][0] == died["admit_time"] + timedelta(hours=24)
    assert crea["available_time"][0] == crea["time"][0]
    gcs = out.events.filter((pl.col("hadm_id") == died["hadm_id"]) & (pl.col("code") == "VITAL//gcs_total"))
    assert gcs["numeric_value"].to_list() == [15.0]


def test_eicu_output_does_not_depend_on_leakage_columns(eicu_small: Path, tmp_path: Path):
    base = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    tables = {p.stem: pl.read_parquet(p) for p in (eicu_small / "tables").glob("*.parquet")}
    tables["patient"] = tables["patient"].with_columns(
        pl.lit("Alive").alias("unitdischargestatus"), pl.lit(None, dtype=pl.Float64).alias("dischargeweight")
    )
    tables["apachepredvar"] = tables["apachepredvar"].with_columns(pl.lit(0).alias("diedinhospital"))
    tables["apachepatientresult"] = pl.DataFrame(
        {"patientunitstayid": [11], "actualhospitalmortality": ["EXPIRED"]}
    )
    changed = eicu.adapt(_write(tmp_path / "leaky", tables), rng=np.random.default_rng(RNG_SEED))
    assert changed.events.equals(base.events)
    assert changed.encounters.equals(base.encounters)


def test_eicu_every_unit_stay_is_an_icu_admission_event_at_its_own_admission(eicu_small: Path):
    out = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    died = out.encounters.filter(pl.col("death_time").is_not_null()).row(0, named=True)
    icu = out.events.filter(
        (pl.col("hadm_id") == died["hadm_id"]) & pl.col("code").str.starts_with("ICU_UNIT//")
    ).sort("time")
    # unit stays 11 (the index, the encounter's admission) and 12, admitted 600 min later
    assert (icu["time"] - died["admit_time"]).to_list() == [timedelta(0), timedelta(minutes=600)]
    assert icu["code"].to_list() == ["ICU_UNIT//MICU", "ICU_UNIT//MICU"]
    assert out.counts["unit_stays_mapped"] == 3  # stay 31's hospital stay has no known outcome


@pytest.mark.parametrize(
    ("location", "disposition"),
    [
        ("Other Hospital", "ACUTE_CARE_TRANSFER"),
        ("Skilled Nursing Facility", "SKILLED_NURSING_FACILITY"),
        ("HOME ", "HOME"),
        ("Grandma's house, Springfield", "OTHER"),  # a value the table does not name: never its text
        (None, "UNKNOWN"),
    ],
)
def test_eicu_discharge_dispositions_come_from_an_explicit_table(
    eicu_small: Path, location: str | None, disposition: str
):
    tables = {p.stem: pl.read_parquet(p) for p in (eicu_small / "tables").glob("*.parquet")}
    tables["patient"] = tables["patient"].with_columns(
        pl.when(pl.col("patienthealthsystemstayid") == 201)
        .then(pl.lit(location, dtype=pl.String))
        .otherwise(pl.col("hospitaldischargelocation"))
        .alias("hospitaldischargelocation")
    )
    out = eicu.adapt(_write(eicu_small.parent / "recoded", tables), rng=np.random.default_rng(RNG_SEED))
    by_death = dict(
        out.encounters.select(pl.col("death_time").is_not_null(), "discharge_disposition").iter_rows()
    )
    assert by_death == {True: "EXPIRED", False: disposition}
    assert out.counts["discharge_locations_unmapped"] == (disposition == "OTHER")


def test_eicu_race_and_ethnicity_are_split_from_one_field(eicu_small: Path):
    out = eicu.adapt(eicu_small, rng=np.random.default_rng(RNG_SEED))
    pairs = set(out.patients.select("race", "ethnicity").iter_rows())
    assert pairs == {("Unknown", "Hispanic or Latino"), ("White", "Not Hispanic or Latino")}


def test_missing_table_is_a_clear_error(tmp_path: Path):
    with pytest.raises(AdapterError, match="patient"):
        eicu.adapt(tmp_path)


# ----- MIMIC-III -----------------------------------------------------------------------------------------


@pytest.fixture
def mimic_small(tmp_path: Path) -> Path:
    intime = datetime(2150, 3, 1, 8, 0)
    tables = {
        "patients": pl.DataFrame(
            {"subject_id": [1, 2], "gender": ["F", "M"], "dob": [datetime(1850, 3, 1), datetime(2090, 1, 1)]}
        ),
        "admissions": pl.DataFrame(
            {
                "subject_id": [1, 2, 2],
                "hadm_id": [10, 20, 21],
                "admittime": [intime - timedelta(hours=5), intime, intime + timedelta(days=30)],
                "dischtime": [
                    intime + timedelta(days=3),
                    intime + timedelta(days=5),
                    intime + timedelta(days=31),
                ],
                "deathtime": [intime + timedelta(days=3, minutes=5), None, None],
                "admission_type": ["EMERGENCY", "ELECTIVE", "URGENT"],
                "discharge_location": ["DEAD/EXPIRED", "HOME", "HOME"],
                "ethnicity": ["HISPANIC/LATINO - PUERTO RICAN", "WHITE", "WHITE"],
                "hospital_expire_flag": [1, 0, 0],
            }
        ),
        "icustays": pl.DataFrame(
            {
                "hadm_id": [10, 20],
                "intime": [intime, intime + timedelta(hours=2)],
                "first_careunit": ["TSICU", "MICU"],
                "dbsource": ["carevue", "metavision"],
            }
        ),
        "d_labitems": pl.DataFrame({"itemid": [50912, 51301], "loinc_code": ["2160-0", "804-5"]}),
        "labevents": pl.DataFrame(
            {
                "hadm_id": [10, 20, None],
                "itemid": [50912, 51301, 50912],
                "charttime": [intime + timedelta(hours=1)] * 3,
                "valuenum": [1.4, 12.0, 3.0],
            },
            schema_overrides={"hadm_id": pl.Int64},
        ),
        "chartevents": pl.DataFrame(
            {
                "hadm_id": [10, 10, 20, 20, 20, 20],
                "itemid": [678, 211, 220739, 223900, 223901, 220045],
                "charttime": [intime + timedelta(hours=2)] * 6,
                "storetime": [intime + timedelta(hours=3)] * 6,
                "valuenum": [98.6, 80.0, 4.0, 5.0, 6.0, 400.0],
                "error": [None, 1, 0, 0, 0, 0],
            },
            schema_overrides={"error": pl.Int64},
        ),
    }
    return _write(tmp_path / "mimic", tables)


def test_mimic_every_admission_is_an_encounter_with_or_without_an_icu_stay(mimic_small: Path):
    out = mimic.adapt(mimic_small, rng=np.random.default_rng(RNG_SEED))
    assert out.encounters.height == 3  # hadm 21 never reached an ICU: a readmission all the same
    assert out.counts["admissions_without_icu_stay"] == 1
    assert out.counts["icu_stays"] == 2
    no_icu = out.encounters.filter(pl.col("unit") == mimic.NO_ICU_STAY).row(0, named=True)
    # the ICU information system of its patient's ICU stay nearest in time
    assert (no_icu["site"], no_icu["batch_id"]) == ("BIDMC/metavision", "mimic_metavision")
    assert sorted(out.encounters["age_years"].to_list()) == [60, 60, 90]  # dob 1850: ~300 years
    assert out.counts["ages_shifted_over_89"] == 1
    assert tuple(out.encounters.columns) == DEID_COLUMNS["encounters"]


def test_mimic_hospital_admission_is_admit_time_and_each_icu_stay_an_icu_event(mimic_small: Path):
    out = mimic.adapt(mimic_small, rng=np.random.default_rng(RNG_SEED))
    died = out.encounters.filter(pl.col("death_time").is_not_null()).row(0, named=True)
    assert died["death_time"] == died["discharge_time"]
    assert died["admit_time"] == datetime(2150, 3, 1, 3, 0)  # admittime, 5 h before the ICU
    assert died["unit"] == "SICU"
    icu = out.events.filter(pl.col("code").str.starts_with("ICU_UNIT//"))
    assert icu.height == 2  # one per ICU stay, none for the admission without one
    mine = icu.filter(pl.col("hadm_id") == died["hadm_id"])
    assert mine.select("time", "code").rows() == [(datetime(2150, 3, 1, 8, 0), "ICU_UNIT//SICU")]
    assert set(out.encounters["batch_id"]) == {"mimic_carevue", "mimic_metavision"}


@pytest.mark.parametrize(
    ("location", "admission_type", "disposition", "coded_type"),
    [
        ("SHORT TERM HOSPITAL", "EMERGENCY", "ACUTE_CARE_TRANSFER", "EMERGENCY"),
        ("DISCH-TRAN TO PSYCH HOSP", "URGENT", "PSYCHIATRIC_HOSPITAL_TRANSFER", "URGENT"),
        ("  snf ", "elective", "SKILLED_NURSING_FACILITY", "ELECTIVE"),  # case and blanks do not matter
        ("Mrs Smith's cottage by the sea", "WALK IN", "OTHER", "OTHER"),  # free text never passes
        (None, None, "UNKNOWN", "UNKNOWN"),
    ],
)
def test_mimic_dispositions_and_admission_types_come_from_explicit_tables(
    mimic_small: Path, location: str | None, admission_type: str | None, disposition: str, coded_type: str
):
    tables = {p.stem: pl.read_parquet(p) for p in (mimic_small / "tables").glob("*.parquet")}
    tables["admissions"] = tables["admissions"].with_columns(
        pl.when(pl.col("hadm_id") == 20)
        .then(pl.lit(location, dtype=pl.String))
        .otherwise(pl.col("discharge_location"))
        .alias("discharge_location"),
        pl.when(pl.col("hadm_id") == 20)
        .then(pl.lit(admission_type, dtype=pl.String))
        .otherwise(pl.col("admission_type"))
        .alias("admission_type"),
    )
    out = mimic.adapt(_write(mimic_small.parent / "recoded", tables), rng=np.random.default_rng(RNG_SEED))
    enc = out.encounters.sort("admit_time")
    assert enc.row(1, named=True)["discharge_disposition"] == disposition
    assert enc.row(1, named=True)["admission_type"] == coded_type
    assert set(enc["discharge_disposition"]) <= set(DISCHARGE_DISPOSITIONS)
    assert out.counts["discharge_locations_unmapped"] == (disposition == "OTHER")
    assert out.counts["admission_types_unmapped"] == (coded_type == "OTHER")
    discharged = out.events.filter(pl.col("code").str.starts_with("HOSPITAL_DISCHARGE//"))
    assert set(discharged["code"].str.strip_prefix("HOSPITAL_DISCHARGE//")) <= set(DISCHARGE_DISPOSITIONS)


def test_mimic_transfer_dispositions_are_the_transfers_of_the_table():
    assert set(mimic.TRANSFER_DISPOSITIONS) == {
        v for v in mimic.DISCHARGE_DISPOSITIONS.values() if v.endswith("_TRANSFER")
    }
    assert set(mimic.DISCHARGE_DISPOSITIONS.values()) <= set(DISCHARGE_DISPOSITIONS)
    assert set(eicu.DISCHARGE_DISPOSITIONS.values()) <= set(DISCHARGE_DISPOSITIONS)


def _readmission_use_case(**outcome) -> UseCase:
    return parse_use_case(
        yaml.safe_dump(
            {
                "name": "readmission",
                "title": "t",
                "clinical_question": "q",
                "owner": "o",
                "population": {"min_age_years": 18, "inclusion": "i", "exclusion": "e"},
                "prediction_time": {"anchor": "discharge"},
                "observation_window_hours": 48,
                "outcome": {"type": "readmission", "within_days": 30, "description": "d", **outcome},
                "features": {"window_hours": [48], "aggregations": ["last"], "codes": ["LAB//2160-0"]},
                "operating_point": {"policy": "min_sensitivity", "target": 0.8},
                "success_criteria": {"auroc_min": 0.5, "sensitivity_min": 0, "specificity_min": 0},
                "subgroups": {"attributes": ["sex"], "age_bands": [18, 65]},
            }
        )
    )


def test_mimic_readmission_labels_from_the_adapted_admissions(mimic_small: Path):
    out = mimic.adapt(mimic_small, rng=np.random.default_rng(RNG_SEED))
    uc = _readmission_use_case(unplanned_only=True, transfer_dispositions=list(mimic.TRANSFER_DISPOSITIONS))
    cohort, flow = build_cohort(out.encounters, out.patients, uc, out.events)
    # a year later every 30-day window has closed
    labels = build_labels(
        cohort, uc, encounters=out.encounters, events=out.events, known_by=datetime(2151, 3, 1)
    )
    assert flow.excluded("died in hospital") == 1  # hadm 10
    # hadm 20 (discharged home on day 5) -> hadm 21, URGENT, on day 30 without an ICU stay: readmitted
    first, second = (
        out.encounters.filter(pl.col("death_time").is_null()).sort("admit_time").iter_rows(named=True)
    )
    assert labels.sort("prediction_time")["boolean_value"].to_list() == [True, False]
    assert labels.sort("prediction_time")["hadm_id"].to_list() == [first["hadm_id"], second["hadm_id"]]
    assert cohort.filter(pl.col("hadm_id") == first["hadm_id"])["prediction_time"].to_list() == [
        first["discharge_time"]
    ]


def test_mimic_icu_anchor_predicts_from_the_icu_admission_not_the_hospital_admission(mimic_small: Path):
    out = mimic.adapt(mimic_small, rng=np.random.default_rng(RNG_SEED))
    spec = yaml.safe_load(yaml.safe_dump(_readmission_use_case().model_dump(exclude={"source_sha256"})))
    spec |= {
        "prediction_time": {"anchor": "icu_admission", "offset_hours": 24},
        "outcome": {"type": "death", "description": "d"},
        "observation_window_hours": 24,
        "features": {"window_hours": [24], "aggregations": ["last"], "codes": ["LAB//2160-0"]},
    }
    cohort, flow = build_cohort(
        out.encounters, out.patients, parse_use_case(yaml.safe_dump(spec)), out.events
    )
    assert flow.excluded("no anchor event") == 1  # the admission without an ICU stay
    died = out.encounters.filter(pl.col("death_time").is_not_null()).row(0, named=True)
    assert cohort.filter(pl.col("hadm_id") == died["hadm_id"])["prediction_time"].to_list() == [
        datetime(2150, 3, 2, 8, 0)
    ]


def test_mimic_units_loinc_error_rows_and_availability(mimic_small: Path):
    out = mimic.adapt(mimic_small, rng=np.random.default_rng(RNG_SEED), lab_result_delay_minutes=45)
    ev = out.events
    temp = ev.filter(pl.col("code") == "VITAL//temperature")
    assert temp["numeric_value"][0] == pytest.approx(37.0, abs=0.01)  # 98.6 F
    assert ev.filter(pl.col("code") == "VITAL//heart_rate")["implausible"].to_list() == [True]  # 400/min
    assert ev.filter(pl.col("code") == "VITAL//heart_rate").height == 1  # the error == 1 row is dropped
    assert ev.filter(pl.col("code") == "VITAL//gcs_total")["numeric_value"].to_list() == [15.0]
    labs = ev.filter(pl.col("code").str.starts_with("LAB//")).sort("code")
    assert labs["code"].to_list() == [
        "LAB//2160-0",
        "LAB//6690-2",
    ]  # the lab without an admission is left out
    assert ((labs["available_time"] - labs["time"]) == timedelta(minutes=45)).all()


def test_write_deid_layer_writes_per_batch_and_refuses_to_mix_sources(mimic_small: Path, tmp_path: Path):
    out = mimic.adapt(mimic_small, rng=np.random.default_rng(RNG_SEED))
    written = write_deid_layer(out, data_root=tmp_path / "root")
    assert sorted(p.name for p in written["encounters"]) == [
        "mimic_carevue.parquet",
        "mimic_metavision.parquet",
    ]
    assert (tmp_path / "root" / "phi" / "adapters" / "mimic" / "id_map.parquet").exists()
    events = pl.concat([pl.read_parquet(p) for p in written["events"]])
    assert events.height == out.events.height
    (tmp_path / "root2" / "deid" / "events").mkdir(parents=True)
    (tmp_path / "root2" / "deid" / "events" / "b1.parquet").write_bytes(b"")
    with pytest.raises(AdapterError, match="another source"):
        write_deid_layer(out, data_root=tmp_path / "root2")


# ----- committed subsets (always) and full demo databases (when ../shared/data is present) -------------


def _sources() -> list:
    params = [
        pytest.param(eicu, eicu.committed_subset(), id="eicu-subset"),
        pytest.param(mimic, mimic.committed_subset(), id="mimic-subset"),
    ]
    for module, name in ((eicu, "eicu-full"), (mimic, "mimic-full")):
        path = module.default_source()
        params.append(
            pytest.param(
                module,
                path,
                id=name,
                marks=pytest.mark.skipif(not path.exists(), reason=f"{path} absent (fresh clone)"),
            )
        )
    return params


@pytest.mark.parametrize(("module", "path"), _sources())
def test_real_source_maps_into_a_valid_meds_layer(module, path: Path):
    out = module.adapt(path, rng=np.random.default_rng(RNG_SEED))
    assert out.encounters.height > 50
    assert 0 < out.counts["deaths"] < out.encounters.height
    assert out.encounters["hadm_id"].is_unique().all()
    assert (out.encounters["discharge_time"] >= out.encounters["admit_time"]).all()
    assert out.encounters["age_years"].drop_nulls().max() <= 90
    assert out.encounters["age_years"].drop_nulls().min() >= 0
    assert set(out.encounters["subject_id"]) <= set(out.patients["subject_id"])
    assert set(out.events["hadm_id"].drop_nulls()) <= set(out.encounters["hadm_id"])
    check_meds_shard(out.events)
    to_meds_table(out.events)
    assert set(out.encounters["discharge_disposition"]) <= set(DISCHARGE_DISPOSITIONS)
    assert out.counts["discharge_locations_unmapped"] == 0  # every value of the real data is in the table
    icu = out.events.filter(pl.col("code").str.starts_with("ICU_UNIT//"))
    with_icu = out.encounters.filter(~pl.col("unit").is_in([mimic.NO_ICU_STAY]))
    assert set(icu["hadm_id"]) == set(with_icu["hadm_id"])
    measured = out.events.filter(pl.col("code").str.contains("^(LAB|VITAL)//"))
    assert measured["numeric_value"].is_not_null().all()
    assert (measured["available_time"] >= measured["time"]).all()
    assert measured["implausible"].mean() < 0.01


@pytest.mark.skipif(not eicu.default_source().exists(), reason="../shared/data/eicu-crd-demo absent")
def test_eicu_full_demo_spans_both_years_and_keeps_every_known_outcome():
    out = eicu.adapt(eicu.default_source(), rng=np.random.default_rng(RNG_SEED))
    raw = pl.read_parquet(eicu.default_source() / "tables" / "patient.parquet")
    assert set(out.encounters["period"].str.slice(0, 4)) == {"2014", "2015"}
    index_known = out.counts["hospital_stays"] - out.counts["hospital_stays_dropped_unknown_outcome"]
    assert out.encounters.height == index_known
    assert out.counts["ages_90_or_over"] <= int((raw["age"] == "> 89").sum())
