import json

import polars as pl
import pytest

from clinical_ml.core.synthetic import (
    COMPLETION_MARKER,
    LACTATE_ASSAY_BIAS,
    MANIFEST_NAME,
    SyntheticConfig,
    generate_hospital,
)


def _read(root, source):
    return pl.concat([pl.read_csv(p, infer_schema=False) for p in sorted(root.glob(f"*/{source}.csv"))])


def test_same_seed_gives_byte_identical_exports(tmp_path):
    cfg = SyntheticConfig(n_patients=80, n_batches=2, seed=5)
    a = generate_hospital(tmp_path / "a", cfg)
    b = generate_hospital(tmp_path / "b", cfg)
    for bid in a.batch_ids:
        for f in ("patients.csv", "encounters.csv", "labs.csv", "vitals.csv", COMPLETION_MARKER):
            assert (a.root / bid / f).read_bytes() == (b.root / bid / f).read_bytes()


def test_exports_follow_the_landing_contract(tmp_path):
    h = generate_hospital(tmp_path, SyntheticConfig(n_patients=600, n_batches=3, n_sites=3, seed=2))
    assert [p.name for p in sorted(tmp_path.iterdir()) if p.is_dir()] == list(h.batch_ids)
    marker = json.loads((tmp_path / h.batch_ids[0] / COMPLETION_MARKER).read_text())
    assert set(marker["files"]) == {"patients.csv", "encounters.csv", "labs.csv", "vitals.csv"}
    patients = _read(tmp_path, "patients")
    for col in ("mrn", "first_name", "last_name", "birth_date", "address", "zip", "phone", "email"):
        assert patients[col].null_count() == 0
    assert patients["mrn"].str.len_chars().min() == 8  # leading zeros kept as text
    labs = _read(tmp_path, "labs")
    creat = labs.filter(pl.col("loinc_code") == "2160-0")
    assert set(creat["unit"].unique()) == {"mg/dL", "umol/L"}
    assert (labs["result_time"] >= labs["specimen_time"]).all()
    vitals = _read(tmp_path, "vitals")
    assert "[degF]" in set(vitals["unit"].unique())
    enc = _read(tmp_path, "encounters")
    mortality = enc["death_time"].is_not_null().mean()
    assert 0.08 < mortality < 0.25


def test_ages_include_90_plus(tmp_path):
    generate_hospital(tmp_path, SyntheticConfig(n_patients=1000, n_batches=1, seed=4))
    births = _read(tmp_path, "patients")["birth_date"].str.to_date()
    assert (births.dt.year() <= 2026 - 91).sum() > 10


@pytest.mark.parametrize("scenario", ["drift", "bias"])
def test_scenarios_record_their_ground_truth(tmp_path, scenario):
    h = generate_hospital(tmp_path, SyntheticConfig(n_patients=300, n_batches=4, seed=1, scenario=scenario))
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest == json.loads(json.dumps(h.manifest))
    assert manifest[scenario] is not None
    assert manifest["drift" if scenario == "bias" else "bias"] is None


def test_drift_scenario_shifts_lactate_from_the_declared_batch(tmp_path):
    cfg = SyntheticConfig(n_patients=1500, n_batches=4, seed=9, scenario="drift", drift_from_batch=2)
    h = generate_hospital(tmp_path, cfg)
    assert h.manifest["drift"]["first_batch_id"] == h.batch_ids[2]
    means = [
        pl.read_csv(tmp_path / b / "labs.csv", infer_schema=False)
        .filter(pl.col("loinc_code") == "2524-7")["value"]
        .cast(pl.Float64)
        .mean()
        for b in h.batch_ids
    ]
    assert min(means[2:]) - max(means[:2]) > LACTATE_ASSAY_BIAS * 0.6
