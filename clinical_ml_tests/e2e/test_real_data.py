"""The whole graph on real de-identified ICU data through the real command (``clinical-ml demo --data eicu``):
on the committed eICU subset always, on the full eICU demo when ``../shared/data`` is present."""

from pathlib import Path

import polars as pl
import pytest
import yaml

from clinical_ml.cli import main
from clinical_ml.core.adapters import eicu
from clinical_ml.core.storage import read_json

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
USE_CASE = "eicu_mortality_24h"


def _use_case_copy(directory: Path, *, relax_minimums: bool) -> Path:
    """The eICU use case file for a test run. The scoring latency SLO is lifted in every copy: tests never
    assert timings (the 2-core test machine is shared), ``make bench`` does. With ``relax_minimums`` the
    clinical minimums are opened too: the committed subset (about 200 validation stays, 15 deaths) is too
    small for them; the full demo keeps them."""
    spec = yaml.safe_load((PROJECT_ROOT / "usecases" / f"{USE_CASE}.yaml").read_text())
    spec.setdefault("promotion", {})["latency_p99_ms_max"] = 60_000.0
    if relax_minimums:
        spec["success_criteria"] = {
            "auroc_min": 0.5,
            "sensitivity_min": 0.0,
            "specificity_min": 0.0,
            "calibration_slope_range": [0.0, 100.0],
            "brier_max": 1.0,
        }
        spec["subgroups"].update({"auroc_min": 0.5, "sensitivity_min": 0.0})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{USE_CASE}.yaml").write_text(yaml.safe_dump(spec))
    return directory


def _run_demo(root: Path, source: Path, usecases: Path) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DAGSTER_HOME", raising=False)  # an ephemeral instance, not the project's
        mp.setenv("CLINICAL_ML_USECASES", str(usecases))
        return main(["demo", "--data", "eicu", "--source", str(source), "--data-root", str(root)])


@pytest.fixture(scope="session")
def eicu_subset_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eicu_subset")
    # Another use case's features folder, as `make dev`'s feature refresh leaves one for every use case of
    # the code location: the demo summarises the use cases it trained and no other (it used to crash here).
    stray = root / "deid" / "usecases" / "icu_mortality_24h"
    stray.mkdir(parents=True)
    (stray / "cohort_flow.json").write_text("{}")
    usecases = _use_case_copy(tmp_path_factory.mktemp("usecases"), relax_minimums=True)
    assert _run_demo(root, eicu.committed_subset(), usecases) == 0
    return root


def test_subset_run_produces_the_report_card_with_subgroups(eicu_subset_run: Path):
    reports = eicu_subset_run / "reports" / USE_CASE
    for name in ("performance_report", "subcohort_fairness_report", "feature_drift_report"):
        assert (reports / f"{name}.html").stat().st_size > 1000
    assert list(reports.glob("report_card*.html"))
    fairness = (reports / "subcohort_fairness_report.html").read_text().lower()
    for attribute in ("sex", "age", "ethnicity"):
        assert attribute in fairness
    ev = read_json(eicu_subset_run / "deid" / "usecases" / USE_CASE / "evaluation.json")
    auroc = ev["metrics"]["auroc"]
    assert auroc["lower"] <= auroc["value"] <= auroc["upper"]
    assert ev["events_validation"] > 0


def test_subset_run_validates_2014_to_2015_and_drift_looks_at_the_newest_year(eicu_subset_run: Path):
    cohort = pl.read_parquet(eicu_subset_run / "deid" / "usecases" / USE_CASE / "cohort.parquet")
    assert set(cohort["period"].str.slice(0, 4)) == {"2014", "2015"}
    assert set(cohort["batch_id"]) == {"eicu_2014", "eicu_2015"}
    split = read_json(eicu_subset_run / "deid" / "usecases" / USE_CASE / "split_info.json")
    assert split["strategy"] == "temporal"
    assert split["validation_periods"] == ["2015Q3"]
    drift = read_json(eicu_subset_run / "deid" / "usecases" / USE_CASE / "feature_drift.json")
    assert drift["batch_id"] == "eicu_2015"


def test_subset_run_first_day_features_come_only_from_the_first_day(eicu_subset_run: Path):
    uc = eicu_subset_run / "deid" / "usecases" / USE_CASE
    feats = pl.read_parquet(uc / "features.parquet")
    cohort = pl.read_parquet(uc / "cohort.parquet")
    assert (cohort["prediction_time"] - cohort["admit_time"]).dt.total_hours().unique().to_list() == [24]
    # APACHE day-1 values are one per stay: their count is 0 or 1, never more
    assert feats["creatinine__count_24h"].max() <= 1
    assert feats["mean_arterial_pressure__count_24h"].max() > 1


def test_no_source_identifier_reaches_deid_registry_or_reports(eicu_subset_run: Path):
    patient = pl.read_parquet(eicu.committed_subset() / "tables" / "patient.parquet")
    numeric_ids = set(patient["patientunitstayid"]) | set(patient["patienthealthsystemstayid"])
    text_ids = set(patient["uniquepid"])
    files = [
        p for z in ("deid", "registry", "reports") for p in (eicu_subset_run / z).rglob("*") if p.is_file()
    ]
    assert len(files) > 10
    for f in files:
        if f.suffix == ".parquet":
            df = pl.read_parquet(f)
            for col in ("subject_id", "hadm_id"):
                if col in df.columns:
                    assert not set(df[col].drop_nulls().to_list()) & numeric_ids, f.name
            strings = {
                v for c, t in df.schema.items() if t == pl.String for v in df[c].drop_nulls().to_list()
            }
            assert not strings & text_ids, f.name
        elif f.suffix in (".json", ".html", ".md", ".txt"):
            text = f.read_text(errors="ignore")
            assert not any(pid in text for pid in text_ids), f.name


@pytest.mark.skipif(not eicu.default_source().exists(), reason="../shared/data/eicu-crd-demo absent")
def test_full_eicu_demo_meets_its_own_clinical_minimums(tmp_path: Path):
    usecases = _use_case_copy(tmp_path / "usecases", relax_minimums=False)
    root = tmp_path / "root"
    assert _run_demo(root, eicu.default_source(), usecases) == 0
    ev = read_json(root / "deid" / "usecases" / USE_CASE / "evaluation.json")
    auroc = ev["metrics"]["auroc"]
    assert auroc["lower"] <= auroc["value"] <= auroc["upper"]
    assert ev["n_validation"] > 400
    assert read_json(root / "deid" / "usecases" / USE_CASE / "decision.json")["promoted"]
    assert (root / "reports" / USE_CASE / "subcohort_fairness_report.html").exists()
    cohort = pl.read_parquet(root / "deid" / "usecases" / USE_CASE / "cohort.parquet")
    assert set(cohort["period"]) == {"2014Q3", "2015Q3"}
    # only the eICU use case ran on eICU data
    assert not (root / "deid" / "usecases" / "icu_mortality_24h").exists()
