"""Per-site mapping onto the landing contract and the value allowlist at the anonymization boundary."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.anonymization import Vault, anonymize_batch
from clinical_ml.core.deid_release import release_batch
from clinical_ml.core.delivery import ZonePaths, process_batch
from clinical_ml.core.ingestion import BatchContext, ingest_file
from clinical_ml.core.reidentification import RiskPolicy
from clinical_ml.core.safety import FileRejected
from clinical_ml.core.site_mapping import (
    CONTRACT,
    SiteMappingError,
    load_site_mapping,
    unmapped_shares,
)

PLANTED = "HOME with daughter Alice Smith"
HEADER = "Alice Smith"
MAPPING = """
description: a test site
columns:
  patients: {PatientID: mrn, Gender: sex}
  encounters: {Visit: encounter_id, PatientID: mrn}
codes:
  labs: {CREA: "2160-0"}
values:
  sex: {female: F, male: M}
  race: {white: White, black: Black or African American, asian: Asian, multiple: Other}
  ethnicity: {hispanic: Hispanic or Latino, non-hispanic: Not Hispanic or Latino}
  admission_type: {ER: EMERGENCY, planned: ELECTIVE}
  discharge_disposition: {home: HOME, died: EXPIRED}
units:
  4 West: {code: W4, type: WARD}
  Intensive Care: {code: ICU1, type: ICU}
sites:
  Main Campus: MAIN
id_patterns:
  mrn: "^[0-9]{2,20}$"
"""
PATIENTS = [
    # PatientID, Gender, race, ethnicity
    ("42", "female", "black", "hispanic"),
    ("4711", "Male", "WHITE ", "non-hispanic"),
    ("4712", "male", "multiple", "non-hispanic"),
    ("4713", "F", "Martian", "Not Hispanic or Latino"),
]
ENCOUNTERS = [
    # Visit, PatientID, admission type, unit, site, disposition
    ("E0001", "42", "ER", "4 West", "Main Campus", "home"),
    ("E0002", "4711", "planned", "Intensive Care", "Main Campus", PLANTED),
    ("E0003", "4712", "EMERGENCY", "ICU of Dr Who", "Main Campus", "died"),
    ("E0004", "4713", "URGENT", "4 west", "Old Town Annex", "HOME"),
]


def _write_mapping(folder: Path, text: str = MAPPING, name: str = "testsite") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return folder


def _write_batch(batch: Path, *, marker_mapping: str | None = "testsite") -> None:
    batch.mkdir(parents=True)
    patients = pl.DataFrame(
        {
            "PatientID": [p[0] for p in PATIENTS],
            "first_name": ["Ann", "Bob", "Cy", "Di"],
            "last_name": ["Lee", "Ray", "Fox", "Oak"],
            "birth_date": ["1950-01-01"] * 4,
            "Gender": [p[1] for p in PATIENTS],
            "race": [p[2] for p in PATIENTS],
            "ethnicity": [p[3] for p in PATIENTS],
            "address": ["1 Main St"] * 4,
            "zip": ["02115"] * 4,
            "phone": [None] * 4,
            "email": [None] * 4,
            HEADER: ["x"] * 4,
        }
    )
    patients.write_csv(batch / "patients.csv")
    encounters = pl.DataFrame(
        {
            "Visit": [e[0] for e in ENCOUNTERS],
            "PatientID": [e[1] for e in ENCOUNTERS],
            "admit_time": ["2024-01-01 08:00:00"] * 4,
            "discharge_time": ["2024-01-05 08:00:00"] * 4,
            "admission_type": [e[2] for e in ENCOUNTERS],
            "unit": [e[3] for e in ENCOUNTERS],
            "site": [e[4] for e in ENCOUNTERS],
            "discharge_disposition": [e[5] for e in ENCOUNTERS],
            "death_time": [None] * 4,
        }
    )
    encounters.write_csv(batch / "encounters.csv")
    labs = pl.DataFrame(
        {
            "encounter_id": ["E0001", "E0002"],
            "loinc_code": ["CREA", "2160-0"],
            "value": [1.1, 0.9],
            "unit": ["mg/dL", "mg/dL"],
            "specimen_time": ["2024-01-02 08:00:00"] * 2,
            "result_time": ["2024-01-02 09:00:00"] * 2,
        }
    )
    labs.write_csv(batch / "labs.csv")
    pl.DataFrame(
        {
            "encounter_id": ["E0003"],
            "code": ["heart_rate"],
            "value": [88.0],
            "unit": ["/min"],
            "charted_time": ["2024-01-02 08:00:00"],
            "stored_time": ["2024-01-02 08:05:00"],
        }
    ).write_csv(batch / "vitals.csv")
    files = {p.name: {"bytes": p.stat().st_size} for p in batch.iterdir()}
    marker = {"files": files} | ({"site_mapping": marker_mapping} if marker_mapping else {})
    (batch / "_SUCCESS").write_text(json.dumps(marker))


@pytest.fixture
def site(tmp_path: Path) -> tuple[ZonePaths, Path]:
    zones = ZonePaths(tmp_path / "landing", tmp_path / "archive", tmp_path / "quarantine", tmp_path / "phi")
    _write_batch(zones.landing / "2024-01-06")
    return zones, _write_mapping(tmp_path / "mappings")


def _accepted(zones: ZonePaths, source: str) -> pl.DataFrame:
    return pl.read_parquet(zones.phi / "raw" / source / "2024-01-06.parquet")


def test_the_mapping_renames_columns_recodes_values_and_codes_and_keeps_the_delivered_text(site):
    zones, folder = site
    outcomes = process_batch(zones=zones, batch_id="2024-01-06", mappings_dir=folder)
    assert {s: o.status for s, o in outcomes.items()} == dict.fromkeys(outcomes, "accepted")
    assert all(o.site_mapping == "testsite" for o in outcomes.values())
    pat = _accepted(zones, "patients").sort("mrn")
    assert pat["mrn"].to_list() == ["42", "4711", "4712", "4713"]  # the site's own MRN pattern
    assert pat["sex"].to_list() == ["F", "M", "M", "F"]
    assert pat["race"].to_list() == ["Black or African American", "White", "Other", "unmapped"]
    assert pat["ethnicity"].to_list() == ["Hispanic or Latino", *["Not Hispanic or Latino"] * 3]
    assert pat["race_delivered"].to_list() == ["black", "WHITE", "multiple", "Martian"]
    enc = _accepted(zones, "encounters").sort("encounter_id")
    assert enc["admission_type"].to_list() == ["EMERGENCY", "ELECTIVE", "EMERGENCY", "URGENT"]
    assert enc["unit"].to_list() == ["W4", "ICU1", "unmapped", "W4"]
    assert enc["unit_type"].to_list() == ["WARD", "ICU", "unmapped", "WARD"]
    assert enc["site"].to_list() == ["MAIN", "MAIN", "MAIN", "unmapped"]
    assert enc["discharge_disposition"].to_list() == ["HOME", "unmapped", "EXPIRED", "HOME"]
    assert enc["discharge_disposition_delivered"][1] == PLANTED  # phi zone only
    assert _accepted(zones, "labs")["loinc_code"].to_list() == ["2160-0", "2160-0"]
    assert outcomes["labs"].rows_accepted == 2


def test_unmapped_values_are_counted_and_listed_only_in_the_phi_zone(site):
    zones, folder = site
    outcomes = process_batch(zones=zones, batch_id="2024-01-06", mappings_dir=folder)
    warnings = outcomes["encounters"].warnings
    assert {k: warnings[k] for k in warnings if k.startswith("unmapped:")} == {
        "unmapped:unit": 1,
        "unmapped:site": 1,
        "unmapped:discharge_disposition": 1,
    }
    assert outcomes["patients"].warnings["unmapped:race"] == 1
    assert outcomes["patients"].warnings["mapped_to_other:race"] == 1  # 'multiple' sent to Other
    assert outcomes["patients"].rows_in == outcomes["patients"].rows_accepted == 4  # nothing lost
    listed = pl.read_parquet(zones.phi / outcomes["encounters"].unmapped_values_path)
    assert set(listed["value"]) == {PLANTED, "ICU of Dr Who", "Old Town Annex"}
    assert unmapped_shares(outcomes["encounters"].warnings, 4)["site"] == 0.25
    for path in zones.archive.rglob("*.json"):  # the ledger: counts, never a value or a delivered header
        text = path.read_text()
        assert PLANTED not in text and "Dr Who" not in text and HEADER not in text


def test_a_column_header_the_contract_does_not_know_is_kept_by_position_never_by_name(site):
    zones, folder = site
    process_batch(zones=zones, batch_id="2024-01-06", mappings_dir=folder)
    columns = _accepted(zones, "patients").columns
    assert HEADER not in columns and "extra_12" in columns


def test_without_the_site_mapping_short_mrns_and_local_codes_are_rejected_with_reasons(site):
    zones, _ = site
    batch = zones.landing / "2024-01-06"
    with pytest.raises(FileRejected, match="missing_columns"):  # the default mapping renames no column
        ingest_file(batch / "patients.csv", "patients")
    text = (batch / "patients.csv").read_text().replace("PatientID", "mrn").replace("Gender", "sex")
    (batch / "patients.csv").write_text(text)
    result = ingest_file(batch / "patients.csv", "patients")
    assert result.rejected_by_reason == {"bad_format:mrn": 1}
    labs = ingest_file(batch / "labs.csv", "labs", batch=BatchContext())
    assert labs.rejected_by_reason == {"not_allowed:loinc_code": 1}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("values: {sex: {female: X}}", "values"),
        ("units: {4 West: {type: BED}}", "units"),
        ("columns: {patients: {PatientID: patient_number}}", "columns"),
        ("codes: {labs: {CREA: '9999-9'}}", "codes"),
        ("id_patterns: {mrn: '.*'}", "id_patterns"),
        ("sites: {Main: '<b>Main</b>'}", "sites"),
        ("colums: {}", "colums"),
    ],
)
def test_a_bad_mapping_file_is_refused_naming_the_file_and_the_field(tmp_path, text, where):
    folder = _write_mapping(tmp_path, text, name="broken")
    with pytest.raises(SiteMappingError) as err:
        load_site_mapping("broken", folder=folder)
    assert "broken.yaml" in str(err.value) and where in str(err.value)


def test_a_marker_naming_an_odd_or_missing_mapping_stops_the_batch_without_repeating_the_name(tmp_path):
    with pytest.raises(SiteMappingError) as err:
        load_site_mapping("../Alice Smith", folder=tmp_path)
    assert "Alice" not in str(err.value)
    with pytest.raises(SiteMappingError, match="no such site mapping"):
        load_site_mapping("elsewhere", folder=tmp_path)


def test_only_controlled_values_and_unit_types_cross_the_boundary(site):
    zones, folder = site
    process_batch(zones=zones, batch_id="2024-01-06", mappings_dir=folder)
    mapping = load_site_mapping("testsite", folder=folder)
    raw = {s: _accepted(zones, s) for s in ("patients", "encounters", "labs", "vitals")}
    release = release_batch(
        raw, vault=Vault.empty(), batch_id="2024-01-06", policy=RiskPolicy(k=1), max_shift_weeks=4,
        rng=np.random.default_rng(0), hmac_key=None, mapping=mapping,
    )  # fmt: skip
    enc = release.frames["encounters"].sort("admit_time", "unit")
    assert sorted(enc["unit_type"].to_list()) == ["ICU", "WARD", "WARD", "unmapped"]
    assert set(enc["discharge_disposition"]) <= {*CONTRACT.discharge_disposition, "unmapped"}
    assert release.deid.unmapped_released["discharge_disposition"] == 1
    assert release.deid.unmapped_at_boundary == {}  # ingestion had mapped everything already
    everything = json.dumps(release.privacy_record()) + release.summary
    for frame in release.frames.values():
        everything += frame.write_csv()
    assert PLANTED not in everything and "Dr Who" not in everything and "Old Town" not in everything
    assert HEADER not in everything and "Martian" not in everything
    assert not any(release.leaks.values())


def test_the_boundary_recodes_free_text_that_bypassed_ingestion():
    from clinical_ml_tests.core.test_anonymization import _people, raw_frames

    people = _people(
        [{"age_days": 20000, "admit_min": 0, "stay_h": 30, "lab_offsets_h": [2.0], "died": False}]
    )
    raw = raw_frames(people)
    raw["encounters"] = raw["encounters"].with_columns(
        pl.lit(PLANTED).alias("discharge_disposition"), pl.lit("Room of Alice Smith").alias("unit")
    )
    raw["patients"] = raw["patients"].with_columns(
        pl.lit("x").alias(HEADER), pl.lit("Smith family").alias("race")
    )
    out = anonymize_batch(**raw, vault=Vault.empty(), batch_id="b1")
    assert out.encounters["discharge_disposition"].to_list() == ["unmapped"]
    assert out.encounters["unit"].to_list() == out.encounters["unit_type"].to_list() == ["unmapped"]
    assert out.patients["race"].to_list() == ["unmapped"]
    assert out.unmapped_at_boundary == {"race": 1, "unit": 1, "discharge_disposition": 1}
    assert HEADER not in json.dumps(out.dropped_columns)
    assert not (out.events["code"].str.contains("Alice")).any()


def test_the_shipped_default_mapping_covers_the_synthetic_hospital():
    from clinical_ml.core import synthetic

    mapping = load_site_mapping()
    units = [u for u, _ in synthetic.UNITS]
    assert set(units) <= set(mapping.unit_types())
    assert all(mapping.unit_types()[u] == "ICU" for u in units)
    dispositions = [d for d, _ in synthetic.ALIVE_DISPOSITIONS] + [synthetic.EXPIRED]
    assert all(mapping.table("discharge_disposition")[d.upper()] != "unmapped" for d in dispositions)
    assert {f"SITE_{c}" for c in "ABCDE"} <= mapping.allowed("site")
    assert {r for r, _ in synthetic.RACES} <= set(CONTRACT.race)


def test_unmapped_values_with_equal_counts_come_in_one_order_whatever_order_they_arrive_in():
    from clinical_ml.core.site_mapping import UNMAPPED, delivered, unmapped_counts

    values = ["zeta", "alpha", "mid", "alpha", "zeta", "mid"]  # three values, two rows each
    frames = [
        pl.DataFrame({"sex": [UNMAPPED] * len(v), delivered("sex"): v})
        for v in (values, values[::-1], sorted(values))
    ]
    outs = [unmapped_counts(f, "patients") for f in frames]
    assert all(o[0] == {"unmapped:sex": 6} for o in outs)
    assert [o[1]["value"].to_list() for o in outs] == [["alpha", "mid", "zeta"]] * 3


@pytest.mark.parametrize("source", ["patients", "encounters"])
def test_recoding_is_row_by_row_whatever_the_frame_holds(site, source):
    """Each distinct value is recoded once and spread back to its rows: every row must still get exactly what
    it gets alone, with nulls, blanks, case and spacing variants, ``unmapped`` as delivered and free text."""
    from clinical_ml.core.site_mapping import CODED_FIELDS, enforce_controlled_values

    mapping = load_site_mapping("testsite", folder=site[1])
    values = [" female ", "MALE", "f", None, "", "  ", "unmapped", " Unmapped ", PLANTED, "White", "ER",
              "planned", "4  West", "intensive care", "home", "DIED", "Other", "SITE_A"]  # fmt: skip
    fields = list(CODED_FIELDS[source])
    rng = np.random.default_rng(7)
    frame = pl.DataFrame(
        {f: pl.Series(rng.choice(np.array(values, dtype=object), 60), dtype=pl.String) for f in fields}
        | {"row": np.arange(60)}
    )
    frame = frame.with_columns(pl.col(fields[0]).cast(pl.Categorical))  # a coded column read as categorical
    out, counts = enforce_controlled_values(frame, source, mapping)
    alone = [enforce_controlled_values(frame.slice(i, 1), source, mapping) for i in range(frame.height)]
    assert out.equals(pl.concat([o for o, _ in alone]))
    summed = {f: sum(c.get(f, 0) for _, c in alone) for f in fields}
    assert counts == {f: n for f, n in summed.items() if n}
    assert list(counts) == [f for f in fields if f in counts]  # in the fields' order, whatever the data
    assert counts  # the planted text and unknown values did become unmapped somewhere
    assert PLANTED not in out.drop("row").write_csv()
