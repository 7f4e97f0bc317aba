"""The alert burden at the operating point: hand-computed counts and rates, the patient bootstrap, the stored
record, and the sentences the reports print about it."""

import json
import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.evaluation import AlertBurden, MetricWithCI, alert_burden
from clinical_ml.core.reports import alert_burden_headline, alert_burden_rows, alert_burden_sentences
from clinical_ml.core.usecase import DeathOutcome, ReadmissionOutcome, outcome_words
from clinical_ml.core.validation import (
    Evaluation,
    OperatingThreshold,
    evaluate_validation,
    validation_alert_burden,
)

T0 = datetime(2026, 1, 5, 8)
DEATH = outcome_words(DeathOutcome(type="death", description="d"))
READMISSION = outcome_words(ReadmissionOutcome(type="readmission", within_days=30, description="r"))


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def _frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Three patients, four stays, five prediction rows (risk >= 0.5 is an alert):

    * patient 1, stay 10 (MICU): predicted at 0 h and 4 h (day 1), discharged at 48 h -> 2.0 days at risk;
      both rows alerts, the first one true.
    * patient 2, stay 20 (MICU): predicted at 2 h (day 1), died at 14 h, discharged at 15 h -> 0.5 day; no alert.
    * patient 3, stay 30 (SICU): predicted at 25 h (day 2), discharged 36 h later -> 1.5 days; a false alert.
    * patient 3, stay 31 (SICU): predicted at 49 h (day 3), discharged 24 h later -> 1.0 day; no alert.

    Alerts 3, true alerts 1, patient-days 5.0, unit-days 3 ((MICU, day 1), (SICU, day 2), (SICU, day 3)).
    """
    times = [h(0), h(4), h(2), h(25), h(49)]
    rows = pl.DataFrame(
        {
            "subject_id": [1, 1, 2, 3, 3],
            "hadm_id": [10, 10, 20, 30, 31],
            "prediction_time": times,
            "split": ["held_out"] * 5,
            "label": [True, False, True, False, False],
            "risk": [0.9, 0.8, 0.2, 0.7, 0.1],
        }
    )
    stays = pl.DataFrame(
        {
            "hadm_id": [10, 10, 20, 30, 31],
            "prediction_time": times,
            "discharge_time": [h(48), h(48), h(15), h(61), h(73)],
            "death_time": [None, None, h(14), None, None],
            "unit": ["MICU", "MICU", "MICU", "SICU", "SICU"],
        }
    )
    return rows, stays


def test_counts_and_rates_match_the_hand_computation():
    rows, stays = _frames()
    b = validation_alert_burden(rows, stays, threshold=0.5, one_day_per_stay=False, n_boot=0, seed=0)
    assert (b.prediction_rows, b.stays, b.patients, b.alerts, b.true_alerts) == (5, 4, 3, 3, 1)
    assert b.patient_days == pytest.approx(5.0)
    assert b.unit_days == 3
    assert b.stays_ending_in_death == 1
    assert b.alerts_per_100_patient_days.value == pytest.approx(60.0)  # 3 / 5.0 days x 100
    assert b.alerts_per_unit_day.value == pytest.approx(1.0)  # 3 alerts / 3 unit-days
    assert b.number_needed_to_evaluate.value == pytest.approx(3.0)  # 3 alerts / 1 true alert
    assert not b.one_row_per_stay and b.judged


def test_a_question_asked_at_discharge_counts_one_day_per_stay():
    rows, stays = _frames()
    b = validation_alert_burden(rows, stays, threshold=0.5, one_day_per_stay=True, n_boot=0, seed=0)
    assert b.patient_days == 4.0 and b.one_day_per_stay
    assert b.alerts_per_100_patient_days.value == pytest.approx(75.0)
    assert b.stays_ending_in_death == 0


def test_the_bootstrap_resamples_patients_with_their_rows_and_unit_day_shares():
    """Replicates equal a plain loop over resampled patients (the stream of core.bootstrap): sums of each patient's alerts, true alerts, days
    and unit-day shares (patient 1 holds 2/3 of (MICU, day 1), patient 2 1/3, patient 3 two whole days)."""
    alerts, true, days, shares = (
        np.array([2.0, 0, 1]),
        np.array([1.0, 0, 0]),
        np.array([2.0, 0.5, 2.5]),
        np.array([2 / 3, 1 / 3, 2.0]),
    )
    b = alert_burden(
        alerts=alerts,
        true_alerts=true,
        patient_days=days,
        unit_day_shares=shares,
        prediction_rows=5,
        stays=4,
        unit_days=3,
        one_day_per_stay=False,
        n_boot=400,
        seed=11,
    )
    rng = np.random.default_rng(11)
    reps = []
    for _ in range(400):
        idx = rng.integers(0, 3, 3)
        with np.errstate(divide="ignore", invalid="ignore"):
            reps.append(
                (
                    100 * alerts[idx].sum() / days[idx].sum(),
                    alerts[idx].sum() / shares[idx].sum(),
                    true[idx].sum() / alerts[idx].sum(),
                )
            )
    arr = np.array(reps)
    for j, m in enumerate((b.alerts_per_100_patient_days, b.alerts_per_unit_day)):
        finite = arr[np.isfinite(arr[:, j]), j]
        assert (m.lower, m.upper) == pytest.approx(tuple(np.quantile(finite, [0.025, 0.975])))
    ppv = arr[np.isfinite(arr[:, 2]), 2]
    lo, hi = np.quantile(ppv, [0.025, 0.975])
    nne = b.number_needed_to_evaluate
    assert nne.lower == pytest.approx(1 / hi)
    assert nne.upper == (math.inf if lo == 0 else pytest.approx(1 / lo))


def test_one_patient_gives_a_degenerate_interval_at_the_point():
    b = alert_burden(
        alerts=np.array([2]),
        true_alerts=np.array([1]),
        patient_days=np.array([4.0]),
        unit_day_shares=np.array([2.0]),
        prediction_rows=3,
        stays=1,
        unit_days=2,
        one_day_per_stay=False,
        n_boot=50,
        seed=0,
    )
    assert b.alerts_per_100_patient_days == MetricWithCI(50.0, 50.0, 50.0)
    assert b.alerts_per_unit_day == MetricWithCI(1.0, 1.0, 1.0)
    assert b.number_needed_to_evaluate == MetricWithCI(2.0, 2.0, 2.0)


def test_no_alert_leaves_nothing_to_judge_and_no_true_alert_an_infinite_nne():
    rows, stays = _frames()
    none = validation_alert_burden(rows, stays, threshold=0.95, one_day_per_stay=False, n_boot=20, seed=0)
    assert not none.judged and none.alerts == 0
    assert none.number_needed_to_evaluate is None
    assert none.alerts_per_100_patient_days.value == 0.0
    false_only = validation_alert_burden(
        rows.with_columns(pl.lit(False).alias("label")),
        stays,
        threshold=0.5,
        one_day_per_stay=False,
        n_boot=20,
        seed=0,
    )
    assert false_only.true_alerts == 0
    assert math.isinf(false_only.number_needed_to_evaluate.value)
    assert math.isinf(false_only.number_needed_to_evaluate.upper)


def test_the_evaluation_stores_the_burden_and_still_reads_files_written_before_it(tmp_path):
    rows, stays = _frames()
    ev = evaluate_validation(
        rows, OperatingThreshold(0.5, "v1"), n_boot=30, seed=1, stays=stays, one_day_per_stay=False
    )
    assert ev.alert_burden is not None and ev.alert_burden.alerts == 3
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(ev.as_dict()))
    assert Evaluation.from_dict(json.loads(path.read_text())) == ev
    old = ev.as_dict()
    del old["alert_burden"]
    assert Evaluation.from_dict(old).alert_burden is None
    assert (
        "alert_burden"
        not in evaluate_validation(rows, OperatingThreshold(0.5, "v1"), n_boot=5, seed=1).as_dict()
    )
    # an infinite NNE survives the JSON file (Python's json writes and reads Infinity)
    false_only = validation_alert_burden(
        rows.with_columns(pl.lit(False).alias("label")),
        stays,
        threshold=0.5,
        one_day_per_stay=False,
        n_boot=5,
        seed=0,
    )
    assert AlertBurden.from_dict(json.loads(json.dumps(false_only.as_dict()))) == false_only


def _burden(**changes) -> AlertBurden:
    base = dict(
        prediction_rows=400,
        stays=400,
        patients=380,
        alerts=60,
        true_alerts=20,
        patient_days=1500.0,
        unit_days=120,
        one_day_per_stay=False,
        alerts_per_100_patient_days=MetricWithCI(4.0, 3.2, 4.9),
        alerts_per_unit_day=MetricWithCI(0.5, 0.41, 0.62),
        number_needed_to_evaluate=MetricWithCI(3.0, 2.3, 4.1),
        n_bootstrap=200,
        stays_ending_in_death=0,
    )
    return AlertBurden(**{**base, **changes})


def test_sentences_say_what_the_numbers_beside_them_are():
    s = alert_burden_sentences(_burden(), READMISSION)
    assert s == [
        "About 4 alerts per 100 patient-days (95% CI 3.2 to 4.9): 60 alerts over 1500 patient-days at risk.",
        "Patient-days at risk: for each of the 400 stays, the time from its first prediction to the end of the "
        "stay (discharge).",
        "About 0.5 alerts per unit per day (95% CI 0.41 to 0.62): 60 alerts over 120 unit-days.",
        s[3],
        "For every 3 patients flagged, one is among the patients who were readmitted (number needed to "
        "evaluate 3.0, 95% CI 2.3 to 4.1; 20 of 60 patients flagged).",
    ]
    assert s[3].startswith("A unit-day is one unit") and "shifted per patient" in s[3]
    # the figures a sentence rests on give the rate it states: 60 / 1500 x 100 = 4 and 60 / 20 = 3
    b = _burden()
    assert b.alerts_per_100_patient_days.value == pytest.approx(100 * b.alerts / b.patient_days)
    assert b.number_needed_to_evaluate.value == pytest.approx(b.alerts / b.true_alerts)
    assert alert_burden_headline(_burden(), READMISSION) == f"{s[0]} {s[4]}"


def test_sentences_for_deaths_at_discharge_repeated_predictions_and_edge_cases():
    died = alert_burden_sentences(_burden(stays_ending_in_death=7), DEATH)
    assert "(discharge, or death for 7 of them)" in died[1]
    assert "one is among the patients who died" in died[-1]
    at_discharge = alert_burden_sentences(_burden(one_day_per_stay=True), READMISSION)
    assert at_discharge[1] == (
        "Patient-days at risk: one day per stay (400 stays), since the prediction is made at hospital discharge, "
        "with no time in hospital after it."
    )
    repeated = alert_burden_sentences(_burden(prediction_rows=900), READMISSION)
    assert repeated[-1].startswith(
        "For every 3 alerts, one is followed by the outcome (readmission) in its window"
    )
    nothing = alert_burden_sentences(
        _burden(
            alerts=0,
            true_alerts=0,
            alerts_per_100_patient_days=MetricWithCI(0, 0, 0),
            number_needed_to_evaluate=None,
        ),
        READMISSION,
    )
    assert nothing[0] == (
        "No prediction of the validation cohort was flagged at the operating point: 0 alerts over 1500 "
        "patient-days at risk, so there is no alert burden to judge."
    )
    assert not any("number needed" in x or "unit per day" in x for x in nothing)
    all_false = alert_burden_sentences(
        _burden(true_alerts=0, number_needed_to_evaluate=MetricWithCI(math.inf, math.inf, math.inf)),
        READMISSION,
    )
    assert all_false[-1] == (
        "None of the 60 patients flagged is among the patients who were readmitted: the number needed to "
        "evaluate has no finite value."
    )
    open_ended = alert_burden_sentences(
        _burden(number_needed_to_evaluate=MetricWithCI(8.0, 3.1, math.inf)), READMISSION
    )
    assert "95% CI 3.1 to no upper limit" in open_ended[-1]
    assert alert_burden_sentences(None, READMISSION) == [
        "The alert burden was not measured for this evaluation."
    ]


def test_unit_days_are_counted_on_the_ward_calendar_not_the_shifted_one():
    """Two patients of one daily batch, shifted a year apart by de-identification, were scored on the same
    ward day: one unit-day, not two."""
    from datetime import datetime, timedelta

    import polars as pl

    from clinical_ml.core.validation import validation_alert_burden

    admits = [datetime(2026, 6, 1, 8), datetime(2025, 6, 3, 8)]  # shifted dates of the same real day
    rows = pl.DataFrame(
        {
            "subject_id": [1, 2],
            "hadm_id": [11, 12],
            "prediction_time": [a + timedelta(hours=24) for a in admits],
            "label": [True, False],
            "risk": [0.9, 0.8],
        }
    )
    stays = rows.select("hadm_id", "prediction_time").with_columns(
        pl.Series("admit_time", admits),
        pl.Series("discharge_time", [a + timedelta(days=3) for a in admits]),
        pl.lit(None, dtype=pl.Datetime("us")).alias("death_time"),
        pl.lit("MICU").alias("unit"),
        pl.lit("2026-01-05").alias("batch_id"),
    )
    burden = validation_alert_burden(rows, stays, threshold=0.5, one_day_per_stay=False, n_boot=20, seed=1)
    assert burden.alerts_per_unit_day.value == 2.0
    shifted = validation_alert_burden(
        rows, stays.drop("batch_id"), threshold=0.5, one_day_per_stay=False, n_boot=20, seed=1
    )
    assert shifted.alerts_per_unit_day.value == 1.0


def test_batches_not_named_by_date_have_no_ward_day_so_no_rate_per_unit_day():
    """A research export (eICU's synthetic calendar puts every stay's ICU admission on 1 July; MIMIC's dates
    are shifted per patient into another century): the day of a prediction on the ward is not known, so
    alerts per unit per day are not computed, and the report and the gate say why. One undated batch is
    enough: its rows' days cannot be counted with the others'."""
    rows, stays = _frames()
    admit = stays["prediction_time"] - timedelta(hours=1)
    dated = stays.with_columns(admit.alias("admit_time"), pl.lit("2026-01-05").alias("batch_id"))
    ok = validation_alert_burden(rows, dated, threshold=0.5, one_day_per_stay=False, n_boot=20, seed=0)
    assert ok.undated_rows == 0 and ok.alerts_per_unit_day is not None and ok.unit_days > 0
    one_undated = dated.with_columns(
        pl.when(pl.col("hadm_id") == 31).then(pl.lit("eicu_2015")).otherwise("batch_id").alias("batch_id")
    )
    for frame, undated in ((one_undated, 1), (dated.with_columns(pl.lit("eicu_2014").alias("batch_id")), 5)):
        b = validation_alert_burden(rows, frame, threshold=0.5, one_day_per_stay=False, n_boot=20, seed=0)
        assert b.undated_rows == undated and b.alerts_per_unit_day is None
        # everything else is measured as before
        assert b.alerts_per_100_patient_days == ok.alerts_per_100_patient_days
        assert b.number_needed_to_evaluate == ok.number_needed_to_evaluate
        again = AlertBurden.from_dict(json.loads(json.dumps(b.as_dict())))
        assert again == b
        s = alert_burden_sentences(b, DEATH)
        assert s[2] == (
            f"Alerts per unit per day are not computed: for {undated} of the 5 prediction rows the day on the "
            "ward is not known (their batch is not a dated delivery, and the dates in these data are shifted "
            "or synthetic)."
        )
        assert not any("unit-days" in x for x in s)
        from clinical_ml.core.usecase import load_use_case
        from clinical_ml_tests.conftest import PROJECT_ROOT

        table = alert_burden_rows(b, load_use_case(PROJECT_ROOT / "usecases" / "eicu_mortality_24h.yaml"))
        per_unit = next(r for r in table if r["name"] == "Alerts per unit per day")
        assert per_unit["value"] == "n/a (the days on the ward are not known)"
