"""Medications, diagnoses, procedures and device vitals: validation at landing, events at the boundary,
synthetic exports with gaps, and the codes a use case may name."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.clinical_sources import MORE_SOURCES, aggregate_device_vitals, source_events
from clinical_ml.core.deid_release import release_batch
from clinical_ml.core.delivery import ZonePaths, accepted_path, process_batch
from clinical_ml.core.ingestion import BatchContext, ingest_file
from clinical_ml.core.landing import OPTIONAL_SOURCES
from clinical_ml.core.reidentification import RiskPolicy
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml.core.units import VocabularyError, is_known_code, load_vocabulary, measurement_codes

T0 = datetime(2026, 1, 5, 8)
ENCOUNTERS = pl.DataFrame(
    {
        "encounter_id": ["E0001"],
        "mrn": ["M0001"],
        "admit_time": [T0],
        "discharge_time": [T0 + timedelta(days=5)],
        "death_time": [None],
        "site": ["SITE_A"],
    },
    schema_overrides={"death_time": pl.Datetime("us")},
)
BATCH = BatchContext(
    patients=pl.DataFrame({"mrn": ["M0001"], "birth_date": [datetime(1960, 1, 1).date()]}),
    encounters=ENCOUNTERS,
)


def _ingest(tmp_path, source: str, text: str):
    p = tmp_path / f"{source}.csv"
    p.write_text(text)
    return ingest_file(p, source, batch=BATCH, now=datetime(2026, 6, 1))


def _reasons(result) -> dict[int, str]:
    return dict(zip(result.rejects["row_number"], result.rejects["reason"], strict=True))


def test_every_further_source_is_optional_in_a_batch():
    assert set(MORE_SOURCES) <= set(OPTIONAL_SOURCES)


def test_medication_rows_are_validated_by_code_unit_route_and_encounter(tmp_path):
    r = _ingest(
        tmp_path,
        "medications",
        "encounter_id,atc_code,dose,dose_unit,route,admin_time,recorded_time\n"
        "E0001,J01DD04,2,g,IV,2026-01-05 10:00:00,2026-01-05 10:10:00\n"
        "E0001,J01DD04,2,mL,IV,2026-01-05 11:00:00,2026-01-05 11:10:00\n"
        "E0001,X99XX99,2,mg,IV,2026-01-05 12:00:00,2026-01-05 12:10:00\n"
        "E0001,N02BE01,1000,mg,XX,2026-01-05 13:00:00,2026-01-05 13:10:00\n"
        "E0001,N02BE01,-5,mg,PO,2026-01-05 14:00:00,2026-01-05 14:10:00\n"
        "E0009,N02BE01,1000,mg,PO,2026-01-05 15:00:00,2026-01-05 15:10:00\n"
        "E0001,N02BE01,1000,mg,PO,2026-01-05 16:00:00,2026-01-05 15:10:00\n",
    )
    assert r.rows_accepted == 1 and r.rows_accepted + r.rows_rejected == r.rows_in == 7
    reasons = _reasons(r)
    assert reasons[2] == "unknown_unit"
    assert reasons[3] == "not_allowed:atc_code"
    assert reasons[4] == "not_allowed:route"
    assert reasons[5].endswith(":dose")
    assert reasons[6] == "unknown_encounter"
    assert reasons[7] == "recorded_before_event"


def test_diagnoses_take_icd10cm_codes_by_pattern_and_a_type(tmp_path):
    r = _ingest(
        tmp_path,
        "diagnoses",
        "encounter_id,icd10_code,diagnosis_type,recorded_time\n"
        "E0001,E11.9,primary,2026-01-12 09:00:00\n"
        "E0001,N186,secondary,2026-01-12 09:00:00\n"
        "E0001,11E.9,secondary,2026-01-12 09:00:00\n"
        "E0001,e11.9,secondary,2026-01-12 09:00:00\n"
        "E0001,I10,main,2026-01-12 09:00:00\n",
    )
    assert r.rows_accepted == 2
    assert _reasons(r) == {
        3: "bad_format:icd10_code",
        4: "bad_format:icd10_code",
        5: "not_allowed:diagnosis_type",
    }


def test_procedures_take_vocabulary_codes_and_an_optional_end(tmp_path):
    r = _ingest(
        tmp_path,
        "procedures",
        "encounter_id,procedure_code,start_time,end_time,recorded_time\n"
        "E0001,5A1945Z,2026-01-05 10:00:00,2026-01-06 20:00:00,2026-01-06 21:00:00\n"
        "E0001,02HV33Z,2026-01-05 11:00:00,,2026-01-05 11:30:00\n"
        "E0001,0000000,2026-01-05 12:00:00,,2026-01-05 12:30:00\n"
        "E0001,5A1935Z,2026-01-05 12:00:00,2026-01-05 11:00:00,2026-01-05 13:00:00\n",
    )
    assert r.rows_accepted == 2
    assert _reasons(r) == {3: "not_allowed:procedure_code", 4: "end_before_start"}


def test_device_vitals_are_harmonized_like_vitals(tmp_path):
    r = _ingest(
        tmp_path,
        "device_vitals",
        "encounter_id,code,value,unit,charted_time\n"
        "E0001,temperature,98.6,[degF],2026-01-05 10:00:00\n"
        "E0001,heart_rate,80,/min,2026-01-05 10:01:00\n"
        "E0001,heart_rate,80,beats/h,2026-01-05 10:02:00\n"
        "E0001,heart_rate,80,/min,2026-01-12 10:02:00\n",
    )
    assert r.rows_accepted == 2
    assert r.accepted["value"][0] == pytest.approx(37.0)
    assert _reasons(r) == {3: "unknown_unit", 4: "event_after_discharge"}


def _mapping(shift: int = -14) -> tuple[pl.DataFrame, pl.DataFrame]:
    return (
        pl.DataFrame(
            {"mrn": ["M0001"], "subject_id": [77], "shift_days": [shift]},
            schema_overrides={"shift_days": pl.Int32},
        ),
        pl.DataFrame({"encounter_id": ["E0001"], "hadm_id": [99]}),
    )


def test_events_carry_the_pseudonyms_the_shift_and_canonical_doses():
    meds = pl.DataFrame(
        {
            "encounter_id": ["E0001", "e0001 ", "E0002"],
            "atc_code": ["J01DD04", "C01CA03", "N02BE01"],
            "dose": [2.0, 9.0, 1000.0],
            "dose_unit": ["g", "ug/kg/min", "mg"],
            "route": ["IV", "IV", "PO"],
            "admin_time": [T0, T0, T0],
            "recorded_time": [T0 + timedelta(minutes=10)] * 3,
        }
    )
    dx = pl.DataFrame(
        {
            "encounter_id": ["E0001", "E0001"],
            "icd10_code": ["E119", "I10"],
            "diagnosis_type": ["primary", "secondary"],
            "recorded_time": [T0 + timedelta(days=7)] * 2,
        }
    )
    proc = pl.DataFrame(
        {
            "encounter_id": ["E0001", "E0001"],
            "procedure_code": ["5A1945Z", "02HV33Z"],
            "start_time": [T0, T0],
            "end_time": [T0 + timedelta(hours=30), None],
            "recorded_time": [T0 + timedelta(hours=31)] * 2,
        }
    )
    patients, encounters = _mapping()
    out = source_events(
        {"encounters": ENCOUNTERS, "medications": meds, "diagnoses": dx, "procedures": proc},
        patients=patients,
        encounters=encounters,
    )
    ev = out.events
    assert set(ev["subject_id"]) == {77} and set(ev["hadm_id"]) == {99}
    med = ev.filter(pl.col("code").str.starts_with("MED//")).sort("code")
    assert med["code"].to_list() == ["MED//C01CA03", "MED//J01DD04"]
    assert med["numeric_value"].to_list() == pytest.approx([9.0, 2000.0])
    assert med["implausible"].to_list() == [True, False]  # 9 ug/kg/min of norepinephrine
    assert med["time"].to_list() == [T0 - timedelta(days=14)] * 2
    assert med["available_time"].to_list() == [T0 - timedelta(days=14) + timedelta(minutes=10)] * 2
    assert sorted(ev.filter(pl.col("code").str.starts_with("DX//"))["code"]) == ["DX//E11.9", "DX//I10"]
    procs = ev.filter(pl.col("code").str.starts_with("PROC//")).sort("code")
    assert procs["numeric_value"].to_list() == [None, pytest.approx(30.0)]
    assert out.orphans_by_source == {"medications": 1} and out.implausible_doses == 1


def test_device_vitals_are_aggregated_per_hour_with_their_sampling_frequency():
    minutes = list(range(0, 60)) + list(range(60, 120, 2))  # one device per minute, then every other minute
    rows = pl.DataFrame(
        {
            "encounter_id": ["E0001"] * len(minutes),
            "code": ["heart_rate"] * len(minutes),
            "value": [80.0] * 60 + [100.0] * 29 + [900.0],
            "implausible": [False] * 89 + [True],
            "charted_time": [T0 + timedelta(minutes=m) for m in minutes],
        }
    )
    hourly = aggregate_device_vitals(rows)
    assert hourly["samples"].to_list() == [60, 30]
    assert hourly["mean"].to_list() == pytest.approx(
        [80.0, 100.0]
    )  # the implausible sample is counted, not averaged
    assert hourly["hour_end"].to_list() == [T0 + timedelta(hours=1), T0 + timedelta(hours=2)]
    patients, encounters = _mapping(shift=7)
    ev = source_events(
        {"encounters": ENCOUNTERS, "device_vitals": rows}, patients=patients, encounters=encounters
    ).events.sort("code", "time")
    assert ev["code"].to_list() == ["DEVICE//heart_rate"] * 2 + ["DEVICE_RATE//heart_rate"] * 2
    assert ev["numeric_value"].to_list() == pytest.approx([80.0, 100.0, 60.0, 30.0])
    assert ev["time"][0] == T0 + timedelta(days=7, hours=1) == ev["available_time"][0]


@pytest.fixture(scope="module")
def landed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    cfg = SyntheticConfig(n_patients=300, n_batches=1, days_per_batch=7, seed=3, more_sources=True)
    generate_hospital(root / "landing", cfg)
    return root, cfg


def test_the_synthetic_hospital_writes_each_source_with_gaps(landed):
    root, _ = landed
    (batch,) = [p for p in (root / "landing").iterdir() if p.is_dir()]
    enc = pl.read_csv(batch / "encounters.csv")
    frames = {s: pl.read_csv(batch / f"{s}.csv", infer_schema=False) for s in MORE_SOURCES}
    for source, frame in frames.items():
        assert frame.height > 0, source
        covered = frame["encounter_id"].n_unique()
        assert covered < enc.height, f"{source}: every stay has rows, no gap"
    dx = frames["diagnoses"]["icd10_code"]
    assert dx.str.contains(r"\.").any() and (~dx.str.contains(r"\.") & (dx.str.len_chars() > 3)).any()
    assert (frames["medications"]["dose_unit"] == "g").any()
    assert frames["procedures"]["end_time"].is_null().any()
    dev = frames["device_vitals"].with_columns(pl.col("charted_time").str.to_datetime())
    steps = (
        dev.sort("charted_time").group_by("encounter_id", "code").agg(pl.col("charted_time").diff().median())
    )
    assert set(steps["charted_time"].dt.total_seconds().to_list()) == {60, 120}


def test_the_further_sources_leave_the_other_files_of_a_seed_unchanged(tmp_path):
    generate_hospital(
        tmp_path / "with", SyntheticConfig(n_patients=60, n_batches=1, seed=5, more_sources=True)
    )
    generate_hospital(tmp_path / "without", SyntheticConfig(n_patients=60, n_batches=1, seed=5))
    (a,) = [p for p in (tmp_path / "with").iterdir() if p.is_dir()]
    b = tmp_path / "without" / a.name
    for name in ("patients.csv", "encounters.csv", "labs.csv", "vitals.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not (b / "medications.csv").exists()


def test_a_synthetic_batch_lands_and_crosses_the_boundary_with_every_source(landed):
    root, _ = landed
    (batch,) = [p.name for p in (root / "landing").iterdir() if p.is_dir()]
    zones = ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "q", phi=root / "phi"
    )
    outcomes = process_batch(zones=zones, batch_id=batch, now=datetime(2026, 6, 1))
    for source in MORE_SOURCES:
        assert outcomes[source].status == "accepted"
        assert outcomes[source].rows_rejected == 0, outcomes[source].rejected_by_reason
    raw = {s: pl.read_parquet(accepted_path(zones, s, batch)) for s in outcomes}
    release = release_batch(
        raw,
        vault=Vault.empty(),
        batch_id=batch,
        policy=RiskPolicy(k=1),
        max_shift_weeks=4,
        rng=np.random.default_rng(0),
        hmac_key=None,
    )
    codes = release.frames["events"]["code"]
    for prefix in ("MED//", "DX//", "PROC//", "DEVICE//", "DEVICE_RATE//"):
        assert codes.str.starts_with(prefix).sum() > 0, prefix
    assert all(not leaks for leaks in release.leaks.values())
    assert release.deid.orphan_events == 0


@pytest.mark.parametrize(
    ("code", "measurement", "known"),
    [
        ("MED//C01CA03", True, True),
        ("DEVICE//heart_rate", True, True),
        ("DEVICE_RATE//spo2", True, True),
        ("DX//N18.6", False, True),
        ("DX//I10", False, True),
        ("DX//N18.", False, False),
        ("DX//n18.6", False, False),
        ("PROC//5A1955Z", False, True),
        ("PROC//ZZZZZZZ", False, False),
        ("IMAGING//CT//HEAD", False, True),
        ("IMAGING//XX//HEAD", False, False),
        ("IMAGING_FINDING//SCT:233604007", False, True),
        ("MED//Z99ZZ99", False, False),
    ],
)
def test_the_codes_of_the_further_sources_are_in_the_vocabulary(code, measurement, known):
    assert is_known_code(code) is known
    assert (code in measurement_codes()) is measurement


def test_a_hospital_adds_medications_procedures_and_findings_by_configuration(tmp_path):
    ext = tmp_path / "site.yaml"
    ext.write_text(
        "medications:\n  J01MA02: {name: ciprofloxacin, unit: mg, plausible: [0, 1200]}\n"
        "procedures:\n  0DJ08ZZ: {name: upper endoscopy}\n"
        "imaging:\n  findings:\n    'SCT:56786000': {name: pulmonary embolism (other code)}\n"
    )
    vocab = load_vocabulary([ext])
    assert {"J01MA02", "J01CA04"} <= set(vocab.medications)  # merged over the shipped codes
    assert {"0DJ08ZZ", "5A1955Z"} <= set(vocab.procedures)
    assert {"SCT:56786000", "SCT:233604007"} <= set(vocab.imaging.findings)
    assert set(vocab.imaging.modalities) == set(load_vocabulary().imaging.modalities)


@pytest.mark.parametrize(
    "text",
    [
        "medications:\n  amoxicillin: {name: amoxicillin, unit: mg, plausible: [0, 1]}\n",
        "procedures:\n  '12': {name: too short}\n",
        "routes:\n  intravenous: {name: iv}\n",
    ],
)
def test_codes_of_the_wrong_system_are_refused_with_the_file_named(tmp_path, text):
    ext = tmp_path / "bad.yaml"
    ext.write_text(text)
    with pytest.raises(VocabularyError, match=r"bad\.yaml"):
        load_vocabulary([ext])
