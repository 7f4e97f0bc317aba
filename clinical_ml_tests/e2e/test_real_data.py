"""The whole graph on real de-identified ICU data through the real command (``clinical-ml run --data ...``):
eICU's two questions (in-hospital mortality, prolonged stay) and MIMIC-III's 30-day readmission on the
committed subsets always, eICU on its full demo when ``../shared/data`` is present."""

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest
import yaml

from clinical_ml.cli import main
from clinical_ml.core.adapters import eicu, mimic
from clinical_ml.core.adapters.common import DISCHARGE_DISPOSITIONS
from clinical_ml.core.labeling import CohortFlow
from clinical_ml.core.storage import read_json

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
USE_CASE = "eicu_mortality_24h"
PROLONGED_STAY = "eicu_prolonged_stay_24h"
READMISSION = "mimic_readmission_30d"


def _use_case_copy(directory: Path, name: str = USE_CASE, *, relax_minimums: bool) -> Path:
    """A use case file for a test run, in ``directory``. The scoring latency SLO is lifted in every copy:
    tests never assert timings (the 2-core test machine is shared), ``make bench`` does. With
    ``relax_minimums`` the clinical minimums are opened too: the committed eICU subset (about 200 validation
    stays, 15 deaths) is too small for the mortality minimums; the full demo keeps them."""
    spec = yaml.safe_load((PROJECT_ROOT / "usecases" / f"{name}.yaml").read_text())
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
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return directory


def _run(root: Path, data: str, source: Path, usecases: Path) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DAGSTER_HOME", raising=False)  # an ephemeral instance, not the project's
        return main(
            [
                "run",
                "--data",
                data,
                "--source",
                str(source),
                "--data-root",
                str(root),
                "--usecases-dir",
                str(usecases),
            ]
        )


def _use_case_dir(root: Path, name: str) -> Path:
    return root / "deid" / "usecases" / name


def _flow(root: Path, name: str) -> CohortFlow:
    return CohortFlow.from_dict(read_json(_use_case_dir(root, name) / "cohort_flow.json"))


def _assert_decision_recorded(root: Path, name: str) -> dict:
    """A decision exists and says why: promoted, or refused naming at least one minimum it missed."""
    decision = read_json(_use_case_dir(root, name) / "decision.json")
    assert decision["reasons"]
    if not decision["promoted"]:
        missed = [c for c in decision["criteria"] if c.get("judged", True) and not c["passed"]]
        assert missed, "a refusal names the criterion it failed"
        assert all(c["reason"] in decision["reasons"] for c in missed)
    return decision


@pytest.fixture(scope="session")
def eicu_subset_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eicu_subset")
    # Another use case's features folder, as `make dev`'s feature refresh leaves one for every use case of
    # the code location: the run summarises the use cases it trained and no other (it used to crash here).
    stray = root / "deid" / "usecases" / "icu_mortality_24h"
    stray.mkdir(parents=True)
    (stray / "cohort_flow.json").write_text("{}")
    usecases = _use_case_copy(tmp_path_factory.mktemp("usecases"), USE_CASE, relax_minimums=True)
    # the prolonged-stay question keeps its own minimums: its decision, promoted or refused, is the test
    _use_case_copy(usecases, PROLONGED_STAY, relax_minimums=False)
    assert _run(root, "eicu", eicu.committed_subset(), usecases) == 0
    return root


def test_subset_run_produces_the_report_card_with_subgroups(eicu_subset_run: Path):
    reports = eicu_subset_run / "reports" / USE_CASE
    for name in ("performance_report", "subcohort_fairness_report", "feature_drift_report"):
        assert (reports / f"{name}.html").stat().st_size > 1000
    assert list(reports.glob("report_card*.html"))
    fairness = (reports / "subcohort_fairness_report.html").read_text().lower()
    for attribute in ("sex", "age", "ethnicity"):
        assert attribute in fairness
    ev = read_json(_use_case_dir(eicu_subset_run, USE_CASE) / "evaluation.json")
    auroc = ev["metrics"]["auroc"]
    assert auroc["lower"] <= auroc["value"] <= auroc["upper"]
    assert ev["events_validation"] > 0


def test_subset_fairness_verdict_is_insufficient_data_not_pass(eicu_subset_run: Path):
    # about 15 deaths in validation: too few outcomes to judge, whatever the groups show
    fairness = read_json(_use_case_dir(eicu_subset_run, USE_CASE) / "fairness.json")
    overall = fairness["rows"][0]
    events, survivors = overall["events"], overall["n"] - overall["events"]
    assert events < 100
    assert fairness["verdict"] in ("insufficient data", "fail")
    assert (
        f"too few outcomes to judge: {events} deaths and {survivors} survivors in the validation cohort, and at "
        "least 100 deaths and 100 survivors are needed"
    ) in fairness["reasons"]
    decision = read_json(_use_case_dir(eicu_subset_run, USE_CASE) / "decision.json")
    assert not decision["promoted"]
    assert any(r.startswith("too few outcomes to judge: ") for r in decision["reasons"])


def test_subset_run_validates_2014_to_2015_and_drift_looks_at_the_newest_year(eicu_subset_run: Path):
    cohort = pl.read_parquet(_use_case_dir(eicu_subset_run, USE_CASE) / "cohort.parquet")
    assert set(cohort["period"].str.slice(0, 4)) == {"2014", "2015"}
    assert set(cohort["batch_id"]) == {"eicu_2014", "eicu_2015"}
    split = read_json(_use_case_dir(eicu_subset_run, USE_CASE) / "split_info.json")
    assert split["strategy"] == "temporal"
    assert split["validation_periods"] == ["2015Q3"]
    drift = read_json(_use_case_dir(eicu_subset_run, USE_CASE) / "feature_drift.json")
    assert drift["batch_id"] == "eicu_2015"


def test_subset_run_first_day_features_come_only_from_the_first_day(eicu_subset_run: Path):
    for name in (USE_CASE, PROLONGED_STAY):
        uc = _use_case_dir(eicu_subset_run, name)
        feats = pl.read_parquet(uc / "features.parquet")
        cohort = pl.read_parquet(uc / "cohort.parquet")
        assert (cohort["prediction_time"] - cohort["admit_time"]).dt.total_hours().unique().to_list() == [24]
        # APACHE day-1 values are one per stay: their count is 0 or 1, never more
        assert feats["creatinine__count_24h"].max() <= 1
        assert feats["mean_arterial_pressure__count_24h"].max() > 1


def test_subset_prolonged_stay_labels_come_from_the_recorded_discharge_time(eicu_subset_run: Path):
    uc = _use_case_dir(eicu_subset_run, PROLONGED_STAY)
    labels = pl.read_parquet(uc / "labels.parquet")
    assert labels.height > 300
    assert 0.10 <= labels["boolean_value"].mean() <= 0.40  # 22% on the full demo
    flow = _flow(eicu_subset_run, PROLONGED_STAY)
    assert flow.excluded("stay ended before the prediction time") > 0
    # the label is the stay's recorded end (discharge or death) more than 168 h after the prediction time
    encounters = pl.concat(
        pl.read_parquet(p) for p in (eicu_subset_run / "deid" / "encounters").glob("*.parquet")
    )
    stay_end = pl.min_horizontal("discharge_time", pl.col("death_time").fill_null(pl.col("discharge_time")))
    expected = labels.join(encounters, on="hadm_id").select(
        "boolean_value", (stay_end > pl.col("prediction_time") + timedelta(hours=168)).alias("expected")
    )
    assert expected["boolean_value"].to_list() == expected["expected"].to_list()
    died_early = labels.join(encounters, on="hadm_id").filter(
        pl.col("death_time") <= pl.col("prediction_time") + timedelta(hours=168)
    )
    assert died_early.height > 0
    assert not died_early["boolean_value"].any()  # a death before then is not a prolonged stay
    decision = _assert_decision_recorded(eicu_subset_run, PROLONGED_STAY)
    ev = read_json(uc / "evaluation.json")
    assert ev["events_validation"] > 30
    assert decision["challenger"] == ev["model_version"]


def test_no_source_identifier_reaches_deid_registry_or_reports(eicu_subset_run: Path):
    patient = pl.read_parquet(eicu.committed_subset() / "tables" / "patient.parquet")
    numeric_ids = set(patient["patientunitstayid"]) | set(patient["patienthealthsystemstayid"])
    text_ids = set(patient["uniquepid"])
    # the source's own wording of a disposition is free text: only the coded values may leave the adapter
    free_text = set(patient["hospitaldischargelocation"].drop_nulls()) - set(DISCHARGE_DISPOSITIONS)
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
            assert not strings & (text_ids | free_text), f.name
        elif f.suffix in (".json", ".html", ".md", ".txt"):
            text = f.read_text(errors="ignore")
            assert not any(pid in text for pid in text_ids), f.name


@pytest.fixture(scope="session")
def mimic_subset_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mimic_subset")
    usecases = _use_case_copy(tmp_path_factory.mktemp("mimic_usecases"), READMISSION, relax_minimums=False)
    assert _run(root, "mimic", mimic.committed_subset(), usecases) == 0
    return root


def test_mimic_readmission_runs_end_to_end_and_its_decision_says_why(mimic_subset_run: Path):
    uc = _use_case_dir(mimic_subset_run, READMISSION)
    labels = pl.read_parquet(uc / "labels.parquet")
    assert labels.height > 50  # 88 index stays discharged alive in the demo
    assert 0.03 <= labels["boolean_value"].mean() <= 0.40  # 12.5% in the demo
    cohort = pl.read_parquet(uc / "cohort.parquet")
    assert (cohort["prediction_time"] == cohort["discharge_time"]).all()
    assert cohort["death_time"].is_null().all()
    flow = _flow(mimic_subset_run, READMISSION)
    assert flow.excluded("died in hospital") > 0  # 40 admissions end in death
    assert flow.excluded("transferred to another hospital") > 0  # one to a psychiatric hospital
    _assert_decision_recorded(mimic_subset_run, READMISSION)
    assert list((mimic_subset_run / "reports" / READMISSION).glob("report_card*.html"))


def test_mimic_readmission_features_are_labs_before_discharge_and_earlier_admissions(mimic_subset_run: Path):
    feats = pl.read_parquet(_use_case_dir(mimic_subset_run, READMISSION) / "features.parquet")
    # most stays have a creatinine in the 48 h before discharge; the history counts earlier admissions
    assert (feats["creatinine__missing_48h"] == 0).mean() > 0.5
    assert feats["history__admissions_365d"].max() >= 1


def test_mimic_outputs_hold_no_source_identifier_or_free_text(mimic_subset_run: Path):
    admissions = pl.read_parquet(mimic.committed_subset() / "tables" / "admissions.parquet")
    ids = set(admissions["subject_id"]) | set(admissions["hadm_id"])
    free_text = (
        set(admissions["discharge_location"].drop_nulls()) | set(admissions["ethnicity"].drop_nulls())
    ) - set(DISCHARGE_DISPOSITIONS)
    for f in (p for z in ("deid", "registry", "reports") for p in (mimic_subset_run / z).rglob("*.parquet")):
        df = pl.read_parquet(f)
        for col in ("subject_id", "hadm_id"):
            if col in df.columns:
                assert not set(df[col].drop_nulls().to_list()) & ids, f.name
        strings = {v for c, t in df.schema.items() if t == pl.String for v in df[c].drop_nulls().to_list()}
        assert not {s.removeprefix("HOSPITAL_DISCHARGE//") for s in strings} & free_text, f.name


@pytest.mark.skipif(not eicu.default_source().exists(), reason="../shared/data/eicu-crd-demo absent")
def test_full_eicu_demo_runs_both_questions_and_decides_with_reasons(tmp_path: Path):
    usecases = _use_case_copy(tmp_path / "usecases", relax_minimums=False)
    _use_case_copy(usecases, PROLONGED_STAY, relax_minimums=False)
    root = tmp_path / "root"
    assert _run(root, "eicu", eicu.default_source(), usecases) == 0
    # the second question: about 1,870 stays, 22% still in hospital 7 days after the first ICU day
    stay = read_json(_use_case_dir(root, PROLONGED_STAY) / "evaluation.json")
    assert stay["n_validation"] > 400
    assert stay["events_validation"] > 100
    _assert_decision_recorded(root, PROLONGED_STAY)
    ev = read_json(_use_case_dir(root, USE_CASE) / "evaluation.json")
    auroc = ev["metrics"]["auroc"]
    assert auroc["lower"] <= auroc["value"] <= auroc["upper"]
    assert ev["n_validation"] > 400
    # discrimination is steady on the full demo; the gate's verdict is not: with 68 validation deaths the
    # calibration slope of the same model family moves between about 0.9 and 1.6 with the feature set and the
    # tuning rows early stopping sees (issue 18), so the test holds the decision to its reasons, not to a verdict
    assert auroc["lower"] > 0.7
    decision = read_json(_use_case_dir(root, USE_CASE) / "decision.json")
    assert decision["reasons"]
    if not decision["promoted"]:
        # a refusal names a criterion missed, or says the cohort holds too few outcomes to judge any (68 deaths
        # in the 2015 validation cohort is under the 100 the use case's success criteria ask for)
        missed = ("below", "outside", "above", "too few outcomes to judge")
        assert any(word in r for r in decision["reasons"] for word in missed), decision
    assert (root / "reports" / USE_CASE / "subcohort_fairness_report.html").exists()
    cohort = pl.read_parquet(_use_case_dir(root, USE_CASE) / "cohort.parquet")
    assert set(cohort["period"]) == {"2014Q3", "2015Q3"}
    # only the eICU use cases ran on eICU data
    assert not _use_case_dir(root, "icu_mortality_24h").exists()
