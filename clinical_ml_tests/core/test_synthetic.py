import json
from datetime import datetime, timedelta

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


@pytest.mark.parametrize("days_per_batch", [1, 14])
def test_same_seed_gives_byte_identical_exports(tmp_path, days_per_batch):
    cfg = SyntheticConfig(n_patients=80, n_batches=2, seed=5, days_per_batch=days_per_batch)
    a = generate_hospital(tmp_path / "a", cfg)
    b = generate_hospital(tmp_path / "b", cfg)
    for bid in a.batch_ids:
        for f in ("patients.csv", "encounters.csv", "labs.csv", "vitals.csv", COMPLETION_MARKER):
            assert (a.root / bid / f).read_bytes() == (b.root / bid / f).read_bytes()
    assert (a.root / MANIFEST_NAME).read_bytes() == (b.root / MANIFEST_NAME).read_bytes()


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


def test_days_per_batch_must_be_positive():
    with pytest.raises(ValueError, match="days_per_batch"):
        SyntheticConfig(days_per_batch=0)


def _times(df: pl.DataFrame, *cols: str) -> pl.DataFrame:
    return df.with_columns(pl.col(c).str.to_datetime("%Y-%m-%d %H:%M:%S") for c in cols)


def test_a_batch_holds_the_admissions_of_its_days_with_their_measurements(tmp_path):
    cfg = SyntheticConfig(n_patients=300, n_batches=3, seed=3, days_per_batch=7)
    h = generate_hospital(tmp_path, cfg)
    assert h.batch_ids == ("2026-01-05", "2026-01-12", "2026-01-19")
    for bid in h.batch_ids:
        first = datetime.fromisoformat(bid)
        enc = _times(pl.read_csv(tmp_path / bid / "encounters.csv", infer_schema=False), "admit_time")
        assert enc["admit_time"].min() >= first
        assert enc["admit_time"].max() < first + timedelta(days=7)
        # admissions spread over the batch's days, not piled on its first
        assert enc["admit_time"].dt.date().n_unique() == 7
        ids = set(enc["encounter_id"])
        for source in ("labs", "vitals"):
            assert (
                set(pl.read_csv(tmp_path / bid / f"{source}.csv", infer_schema=False)["encounter_id"]) <= ids
            )


@pytest.fixture(scope="module")
def fortnightly(tmp_path_factory):
    """Four batches of 14 days: long enough for 30-day readmissions to show."""
    root = tmp_path_factory.mktemp("fortnightly")
    h = generate_hospital(root, SyntheticConfig(n_patients=700, n_batches=4, seed=13, days_per_batch=14))
    enc = _times(_read(root, "encounters"), "admit_time", "discharge_time", "death_time")
    labs = _times(_read(root, "labs"), "specimen_time", "result_time").with_columns(
        pl.col("value").cast(pl.Float64)
    )
    vitals = _times(_read(root, "vitals"), "charted_time")
    return h, enc, labs, vitals


def test_readmissions_follow_a_live_discharge_inside_the_span(fortnightly):
    h, enc, _, _ = fortnightly
    span_end = datetime(2026, 1, 5) + timedelta(days=4 * 14)
    assert enc["admit_time"].max() < span_end
    stays = enc.sort("mrn", "admit_time").with_columns(
        pl.col("discharge_time").shift(1).over("mrn").alias("previous_discharge"),
        pl.col("discharge_disposition").shift(1).over("mrn").alias("previous_disposition"),
    )
    readmissions = stays.filter(pl.col("previous_discharge").is_not_null())
    assert readmissions.height > 30
    assert (readmissions["admit_time"] > readmissions["previous_discharge"]).all()
    assert not readmissions["previous_disposition"].is_in(["EXPIRED", "TRANSFER"]).any()
    assert (
        enc.group_by("mrn").len()["len"].max() <= h.manifest["readmission_30d"]["max_encounters_per_patient"]
    )
    gap_days = (readmissions["admit_time"] - readmissions["previous_discharge"]).dt.total_seconds() / 86400
    assert ((gap_days > 25) & (gap_days <= 35)).sum() > 0  # the 30-day boundary is exercised
    assert "TRANSFER" in set(enc["discharge_disposition"])


def test_creatinine_is_drawn_at_least_every_12_hours_through_72_hours(fortnightly):
    _, enc, labs, _ = fortnightly
    long_stays = enc.filter(pl.col("discharge_time") - pl.col("admit_time") >= timedelta(hours=72))
    hours = (
        labs.filter(pl.col("loinc_code") == "2160-0")
        .join(long_stays.select("encounter_id", "admit_time"), on="encounter_id")
        .with_columns(((pl.col("specimen_time") - pl.col("admit_time")).dt.total_seconds() / 3600).alias("h"))
        .filter(pl.col("h") <= 72)
        .sort("encounter_id", "h")
        .group_by("encounter_id")
        .agg(
            pl.col("h").first().alias("first"),
            pl.col("h").last().alias("last"),
            pl.col("h").diff().max().alias("longest_gap"),
        )
    )
    assert hours.height == long_stays.height > 100
    assert hours["first"].max() <= 12
    assert hours["last"].min() >= 60
    assert hours["longest_gap"].max() <= 12


def test_the_last_day_before_discharge_is_measured(fortnightly):
    _, enc, labs, vitals = fortnightly
    stays = enc.filter(pl.col("discharge_time") - pl.col("admit_time") >= timedelta(hours=96))
    last_day = pl.col("t") > pl.col("discharge_time") - timedelta(hours=24)
    for events, time in (
        (labs.filter(pl.col("loinc_code") == "718-7"), "specimen_time"),
        (vitals, "charted_time"),
    ):
        seen = (
            events.join(stays.select("encounter_id", "discharge_time"), on="encounter_id")
            .rename({time: "t"})
            .filter(last_day)["encounter_id"]
            .n_unique()
        )
        assert seen / stays.height > 0.85


def test_manifest_rates_match_the_labels_found_in_the_exports(fortnightly):
    h, enc, labs, _ = fortnightly
    assert h.manifest["in_hospital_mortality"] == pytest.approx(
        enc["death_time"].is_not_null().mean(), abs=1e-4
    )

    # 30-day readmission at discharge, over index stays followed for their whole 30 days
    truth = h.manifest["readmission_30d"]
    span_end = datetime(2026, 1, 5) + timedelta(days=4 * 14)
    index = enc.filter(
        ~pl.col("discharge_disposition").is_in(["EXPIRED", "TRANSFER"])
        & (pl.col("discharge_time") + timedelta(days=30) <= span_end)
    )
    later = enc.select(
        "mrn", pl.col("admit_time").alias("next_admit"), pl.col("admission_type").alias("next_type")
    )
    unplanned = (
        index.join(later, on="mrn")
        .filter(
            (pl.col("next_admit") > pl.col("discharge_time"))
            & (pl.col("next_admit") <= pl.col("discharge_time") + timedelta(days=30))
            & (pl.col("next_type") != "ELECTIVE")
        )["encounter_id"]
        .n_unique()
    )
    assert truth["observed_index_stays"] == index.height
    assert truth["observed_unplanned_rate"] == pytest.approx(unplanned / index.height, abs=1e-4)
    assert 0.08 < unplanned / index.height < 0.22
    assert truth["unplanned_rate"] == pytest.approx(unplanned / index.height, abs=0.05)

    # KDIGO creatinine AKI in (24 h, 72 h], baseline the lowest value resulted by 24 h
    stays = enc.with_columns((pl.col("admit_time") + timedelta(hours=24)).alias("t0")).filter(
        (pl.col("discharge_time") > pl.col("t0"))
        & (pl.col("death_time").is_null() | (pl.col("death_time") > pl.col("t0")))
    )
    creat = labs.filter(pl.col("loinc_code") == "2160-0").join(
        stays.select("encounter_id", "t0"), on="encounter_id"
    )
    known = creat.filter(pl.col("result_time") <= pl.col("t0")).sort("encounter_id", "specimen_time")
    prevalent = known.filter(pl.col("value") >= 1.5 * pl.col("value").cum_min().shift(1).over("encounter_id"))
    cohort = (
        known.group_by("encounter_id")
        .agg(pl.col("value").min().alias("baseline"))
        .join(prevalent.select("encounter_id").unique(), on="encounter_id", how="anti")
    )
    events = (
        creat.join(cohort, on="encounter_id")
        .filter(
            (pl.col("specimen_time") > pl.col("t0"))
            & (pl.col("specimen_time") <= pl.col("t0") + timedelta(hours=48))
            & (pl.col("value") >= 1.5 * pl.col("baseline"))
        )["encounter_id"]
        .n_unique()
    )
    aki = h.manifest["acute_kidney_injury_48h"]
    assert aki["observed_cohort_stays"] == cohort.height
    assert aki["observed_rate"] == pytest.approx(events / cohort.height, abs=1e-4)
    assert 0.08 < events / cohort.height < 0.22
    assert aki["rate"] == pytest.approx(events / cohort.height, abs=0.03)
