"""The questions beyond mortality, end to end on a synthetic hospital of several months: 30-day readmission
predicted at discharge and acute kidney injury within 48 h predicted 24 h after ICU admission, through the
real ingestion and lifecycle jobs."""

from dataclasses import replace

import dagster as dg
import polars as pl
import pytest

from clinical_ml.core.artifacts import DeidStore
from clinical_ml.core.labeling import data_end, label_known_at
from clinical_ml.core.synthetic import generate_hospital
from clinical_ml.core.usecase import load_use_case
from clinical_ml_tests.conftest import PROJECT_ROOT, SMALL, run_full_graph

pytestmark = pytest.mark.slow
QUESTIONS = ("readmission_30d", "aki_48h")


@pytest.fixture(scope="module")
def months(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("months")
    hospital = generate_hospital(
        root / "landing", replace(SMALL, n_patients=2000, n_batches=4, days_per_batch=21, seed=5)
    )
    with dg.instance_for_test() as instance:
        run_full_graph(root, instance, n_bootstrap=50, use_cases=QUESTIONS)
        yield root, hospital


def test_each_question_is_labelled_by_its_own_outcome(months):
    root, hospital = months
    deid = DeidStore(root / "deid", root / "reports")
    end = data_end(deid.encounters.read_all())
    for name in QUESTIONS:
        store = deid.use_case(name)
        cohort, labels = store.cohort.read(), store.labels.read()
        assert labels.height > 200, name
        prevalence = labels["boolean_value"].mean()
        assert 0.05 < prevalence < 0.35, (name, prevalence)
        # every label used for training is final by the end of the data
        known = cohort.join(labels.select("hadm_id", "prediction_time"), on=["hadm_id", "prediction_time"])
        assert (
            known.select(
                (label_known_at(known) <= end) | (pl.col("label_window_end") <= pl.col("discharge_time"))
            )
            .to_series()
            .all()
        )
    readmission = deid.use_case("readmission_30d")
    # stays discharged in the last 30 days wait for their outcome; none of the index stays died in hospital
    assert readmission.cohort.read().height > readmission.labels.read().height
    assert readmission.cohort.read()["death_time"].is_null().all()
    flow = readmission.cohort_flow.read()
    assert flow.excluded("died in hospital") > 0 and flow.excluded("transferred") > 0
    aki = deid.use_case("aki_48h")
    assert aki.cohort_flow.read().excluded("outcome already present") > 0
    uc = load_use_case(PROJECT_ROOT / "usecases" / "aki_48h.yaml")
    assert (
        aki.cohort.read()["prediction_time"] - aki.cohort.read()["admit_time"]
    ).dt.total_hours().min() >= (uc.prediction_time.offset_hours)
    assert hospital.manifest["n_encounters"] >= deid.encounters.read_all().height


def test_each_question_is_trained_evaluated_and_decided(months):
    root, _ = months
    deid = DeidStore(root / "deid", root / "reports")
    for name in QUESTIONS:
        store = deid.use_case(name)
        ev, decision = store.evaluation.read(), store.decision.read()
        assert ev.n_validation > 50 and ev.events_validation > 5, name
        # a model a clinician could use, learnable from the physiology the hospital records
        assert 0.6 < ev.metric("auroc").value < 0.95, (name, ev.metric("auroc"))
        assert decision.reasons, name
        assert store.reports.report("performance_report").exists()
