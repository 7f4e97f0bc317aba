"""The rules of the champion in service: which reference a batch is judged against, when a batch is held,
when drift or realised performance requests retraining, and when the nightly retraining runs."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.artifacts import DeidStore, DriftRecord
from clinical_ml.core.champion_monitoring import (
    Champion,
    drift_reference,
    drift_retraining_decision,
    hold_reason,
    nightly_retraining_reason,
    periods_to_retrain,
)
from clinical_ml.core.modeling import train_model
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.registry import Lineage, ModelCard, Registry
from clinical_ml.core.scoring import Scorer


def _card(version="v1", batches=("b1", "b2"), drift_from=None) -> ModelCard:
    return ModelCard(
        "uc", version, lineage=Lineage(batch_ids=tuple(batches)), drift_reference_from=drift_from
    )


def test_drift_requests_retraining_unless_already_trained_on_the_batch_or_refused_for_this_episode():
    champion = _card()
    assert drift_retraining_decision(requested=False, batch_id="b3", champion=champion, refused=None) == (
        False,
        "",
    )
    assert drift_retraining_decision(requested=True, batch_id="b3", champion=champion, refused=None) == (
        True,
        "",
    )
    wanted, note = drift_retraining_decision(requested=True, batch_id="b2", champion=champion, refused=None)
    assert not wanted and "already trained on this batch" in note and "v1" in note
    refused = _card("v2", drift_from="b3")
    wanted, note = drift_retraining_decision(
        requested=True, batch_id="b4", champion=champion, refused=refused
    )
    assert not wanted and "v2" in note and "b3" in note and "refused by the promotion gate" in note


@pytest.mark.parametrize(
    ("level", "held"), [(None, True), ("ok", False), ("warn", False), ("error", True), ("unknown", True)]
)
def test_a_batch_is_released_only_after_its_drift_check_passed(level, held):
    record = None if level is None else DriftRecord("b1", level, False, "", "ref", "v1", {})
    reason = hold_reason(record, batch_id="b1", what="FHIR export")
    assert (reason is not None) is held
    if held:
        assert reason.startswith("FHIR export of batch b1 held")
        assert ("has not run" in reason) is (level is None)


def test_drift_record_keeps_the_check_beside_its_decision():
    record = DriftRecord(
        "b1", "error", True, "", "the derivation cohort", "v1", {"psi_error": 0.25}, {"n_current": 7}
    )
    assert DriftRecord.from_dict(record.as_dict()) == record and record.as_dict()["n_current"] == 7


def test_realised_performance_requests_retraining_once_per_failed_period_the_champion_scored():
    rows = [
        {"period": "2026Q1", "level": "error", "model_versions": ["v1"]},
        {"period": "2026Q2", "level": "error", "model_versions": ["v1"]},
        {"period": "2026Q3", "level": "warn", "model_versions": ["v1"]},
        {"period": "2026Q4", "level": "error", "model_versions": ["v0"]},  # scored by another model
    ]
    assert periods_to_retrain(rows, champion="v1", newest=None) == ["2026Q1", "2026Q2"]
    # the newest model (promoted or refused) already learnt from 2026Q1: only 2026Q2 is asked for
    assert periods_to_retrain(rows, champion="v1", newest=_card("v2", batches=("2026Q1",))) == ["2026Q2"]


def test_nightly_retraining_reason(tmp_path):
    store = DeidStore(tmp_path / "deid", tmp_path / "reports").use_case("uc")
    registry = Registry(tmp_path / "registry", "uc")
    night = datetime(2026, 1, 10, 2)
    assert nightly_retraining_reason(store, registry, as_of=night) is None  # no cohort: nothing to learn
    admit = datetime(2020, 3, 1)
    store.cohort.write(
        pl.DataFrame(
            {
                "batch_id": ["2026-01-05", "2026-01-08", "2026-01-09"],
                "admit_time": [admit] * 3,
                # the last admission's outcome is not known yet on the night of the 10th
                "discharge_time": [admit + timedelta(days=1)] * 2 + [admit + timedelta(days=5)],
                "death_time": [None, None, None],
            }
        )
    )
    assert "no champion yet" in (nightly_retraining_reason(store, registry, as_of=night) or "")
    registry.register(_card("v1", batches=("2026-01-05",)), model_text="t\n")
    registry.set_champion("v1")
    assert "1 newly labelled admissions" in (nightly_retraining_reason(store, registry, as_of=night) or "")


def _champion(drift_from=None) -> Champion:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] + rng.normal(size=400) > 1).astype(int)
    model = train_model(x[:300], y[:300], x[300:], y[300:], feature_names=["a__last", "b__last"], seed=0)
    card = _card(batches=("b1", "b2", "b3"), drift_from=drift_from)
    return Champion(card, Scorer(model=model, threshold=0.5, training_ranges={}))


def _frame(rows_per_batch: dict[str, int]) -> pl.DataFrame:
    rng = np.random.default_rng(1)
    batches = [b for b, n in rows_per_batch.items() for _ in range(n)]
    n = len(batches)
    return pl.DataFrame(
        {
            "hadm_id": np.arange(n),
            "batch_id": batches,
            "split": ["train"] * n,
            "a__last": rng.normal(size=n),
            "b__last": rng.normal(size=n),
            "label": rng.random(n) < 0.2,
            "sex": ["F"] * n,
            "age_band": ["45-64"] * n,
            "race_ethnicity": ["White"] * n,
        }
    )


def test_the_reference_is_the_derivation_cohort_without_the_batch_judged():
    frame = _frame({"b1": 50, "b2": 60, "b3": 70, "b4": 80})  # b4: not in the champion's lineage
    reference, described = drift_reference(frame, _champion(), MonitoringConfig(), exclude_batch="b3")
    assert reference.profile.n_rows == 110 and "110 admissions" in described


@pytest.mark.parametrize(("min_rows", "expected"), [(100, 130), (200, 180)])
def test_after_a_drift_retraining_the_reference_starts_where_the_drift_began_when_large_enough(
    min_rows, expected
):
    frame = _frame({"b1": 50, "b2": 60, "b3": 70})
    config = MonitoringConfig(min_reference_rows=min_rows)
    reference, described = drift_reference(frame, _champion(drift_from="b2"), config, exclude_batch="b9")
    assert reference.profile.n_rows == expected
    assert ("accepted new normal" in described) is (expected == 130)
    assert ("so the whole cohort is the reference" in described) is (expected == 180)


def test_realised_performance_leaves_out_the_patients_the_champion_was_derived_on(tmp_path):
    from clinical_ml.core.champion_monitoring import realised_performance, score_batch

    store = DeidStore(tmp_path / "deid", tmp_path / "reports").use_case("uc")
    trained, new = "2026-01-05", "2026-02-02"
    frame = _frame({trained: 120, new: 120}).with_columns(
        subject_id=pl.col("hadm_id") + 1000,
        prediction_time=pl.lit(datetime(2020, 3, 1)),
        admit_time=pl.lit(datetime(2020, 3, 1)),
        discharge_time=pl.lit(datetime(2020, 3, 2)),
        death_time=pl.lit(None, dtype=pl.Datetime("us")),
        # the first 80 admissions of each batch are derivation patients
        split=pl.when(pl.col("hadm_id") % 120 < 80).then(pl.lit("train")).otherwise(pl.lit("held_out")),
    )
    # the champion was trained on the first batch only
    champion = Champion(_card(batches=(trained,)), _champion().scorer)
    for batch in (trained, new):
        part = frame.filter(pl.col("batch_id") == batch)
        store.batch_predictions.part(batch).write(score_batch(part, champion))
    rows = realised_performance(store, champion, frame, MonitoringConfig(min_matured_share=0.0))
    overall = {r["period"]: r for r in rows if r["attribute"] == "all"}
    assert overall[trained]["n"] == 40  # the 80 admissions it was fitted to are not counted
    assert overall[new]["n"] == 120  # a batch it was not trained on counts whole, derivation split or not


def test_batches_not_named_by_date_have_no_matured_outcomes_instead_of_crashing():
    from datetime import datetime

    import polars as pl

    from clinical_ml.core.champion_monitoring import day_after, known_by, matured_labels

    assert day_after("2026-01-05") == datetime(2026, 1, 6)
    assert day_after("delivery_017") is None and day_after("eicu_2015") is None
    # the newest batch named by its date decides; other names say nothing about time
    assert known_by(["2026-01-05", "zz_resend", "2026-02-02", "delivery_017"]) == datetime(2026, 2, 3)
    assert known_by(["delivery_017"]) is None
    current = pl.DataFrame(
        {
            "batch_id": ["delivery_017"],
            "admit_time": [datetime(2026, 1, 1)],
            "discharge_time": [datetime(2026, 1, 3)],
            "label": [True],
        }
    )
    assert matured_labels(current, batch_id="delivery_017") is None
