"""The promotion gate's operational limits (alert burden): upper bounds at the boundary, "not judged" when
there is nothing to judge (never a pass), the words of the reasons, and old decision records."""

import math

import numpy as np
import pytest

from clinical_ml.core import gate
from clinical_ml.core.evaluation import AlertBurden, MetricWithCI
from clinical_ml.core.usecase import ReadmissionOutcome, outcome_words

READMISSION = outcome_words(ReadmissionOutcome(type="readmission", within_days=30, description="r"))
LIMITS = {
    "alerts_per_100_patient_days_max": 5.0,
    "alerts_per_unit_day_max": 2.0,
    "number_needed_to_evaluate_max": 4.0,
}


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
        alerts_per_100_patient_days=MetricWithCI(4.0, 3.2, 5.0),
        alerts_per_unit_day=MetricWithCI(0.5, 0.41, 0.62),
        number_needed_to_evaluate=MetricWithCI(3.0, 2.3, 4.1),
        n_bootstrap=200,
    )
    return AlertBurden(**{**base, **changes})


def _by_name(criteria: list[gate.GateCriterion]) -> dict[str, gate.GateCriterion]:
    return {c.name: c for c in criteria}


def test_a_maximum_is_met_when_the_upper_bound_is_at_it_and_missed_just_above():
    crit = _by_name(gate.operational_criteria(_burden(), LIMITS, words=READMISSION))
    at = crit["alerts_per_100_patient_days_upper_bound"]
    assert at.passed and at.judged and at.group == "minimums"
    assert at.reason == "alerts per 100 patient-days upper 95% bound 5.00 at or below the maximum 5"
    assert crit["alerts_per_unit_day_upper_bound"].passed
    nne = crit["number_needed_to_evaluate_upper_bound"]
    assert not nne.passed
    assert nne.reason == (
        "number needed to evaluate (patients flagged per readmission found) upper 95% bound 4.10 above the "
        "maximum 4"
    )
    # just above the maximum: the bound is written with the digits that show it is above
    above = gate.operational_criteria(
        _burden(alerts_per_100_patient_days=MetricWithCI(4.0, 3.2, 5.0004)),
        {"alerts_per_100_patient_days_max": 5.0},
    )[0]
    assert not above.passed
    assert "upper 95% bound 5.0004 above the maximum 5" in above.reason
    # the point estimate below the maximum does not save an upper bound above it
    assert not gate.evaluate_gate(gate.operational_criteria(_burden(), LIMITS)).passed


def test_only_the_limits_a_use_case_sets_are_judged():
    assert gate.operational_criteria(_burden(), {}) == []
    only = gate.operational_criteria(_burden(), {"alerts_per_unit_day_max": 1.0, "auroc_min": 0.7})
    assert [c.name for c in only] == ["alerts_per_unit_day_upper_bound"]
    assert only[0].passed


@pytest.mark.parametrize(
    ("burden", "why"),
    [
        (
            _burden(
                alerts=0,
                true_alerts=0,
                alerts_per_100_patient_days=MetricWithCI(0.0, 0.0, 0.0),
                alerts_per_unit_day=MetricWithCI(0.0, 0.0, 0.0),
                number_needed_to_evaluate=None,
            ),
            "no prediction of the validation cohort was flagged",
        ),
        (None, "the alert burden was not measured"),
        (
            _burden(alerts_per_100_patient_days=MetricWithCI(4.0, math.nan, math.nan)),
            "could not be computed",
        ),
    ],
)
def test_nothing_to_judge_is_not_judged_never_a_pass(burden, why):
    crit = gate.operational_criteria(burden, {"alerts_per_100_patient_days_max": 5.0})
    assert len(crit) == 1
    c = crit[0]
    assert not c.judged and c.passed  # does not block the gate ...
    assert "not judged" in c.reason and why in c.reason
    assert "pass" not in c.reason and "at or below" not in c.reason
    # ... and every place that shows a result says "not judged", not "pass"
    assert gate.criterion_result(c.as_dict()) == "not judged"
    md = gate.gate_markdown(
        {"promoted": True, "challenger": "v1", "champion_before": None, "criteria": [c.as_dict()]},
        champion_now="v1",
    )
    assert "| minimums | not judged |" in md and "| pass |" not in md


def test_an_infinite_upper_bound_fails_and_says_why():
    never = _burden(true_alerts=0, number_needed_to_evaluate=MetricWithCI(math.inf, math.inf, math.inf))
    c = gate.operational_criteria(never, {"number_needed_to_evaluate_max": 10.0}, words=READMISSION)[0]
    assert not c.passed and c.judged
    assert (
        "upper 95% bound infinite (no flagged prediction was followed by the outcome, readmission)"
        in c.reason
    )
    some = _burden(prediction_rows=900, number_needed_to_evaluate=MetricWithCI(6.0, 3.0, math.inf))
    c = gate.operational_criteria(some, {"number_needed_to_evaluate_max": 10.0}, words=READMISSION)[0]
    assert not c.passed
    assert c.reason.startswith(
        "number needed to evaluate (alerts per readmission found) upper 95% bound infinite"
    )
    assert "in some resamples of the patients" in c.reason


def test_the_burden_is_read_from_its_stored_form_and_old_records_read_as_judged():
    from_dict = gate.operational_criteria(_burden().as_dict(), LIMITS)
    assert from_dict == gate.operational_criteria(_burden(), LIMITS)
    old = {"group": "minimums", "name": "auroc_lower_bound", "passed": True, "reason": "r"}
    assert gate.GateResult.from_dict({"criteria": [old]}).criteria[0].judged
    assert gate.criterion_result(old) == "pass"
    assert gate.criterion_result({**old, "passed": False}) == "**FAIL**"


def test_a_model_that_gives_everyone_the_same_risk_is_refused_for_that_reason():
    from clinical_ml.core.gate import ranking_criterion

    y = np.array([0, 0, 1, 0, 1])
    flat = ranking_criterion(np.full(5, 0.2), y, best_iteration=1, words="readmissions")
    assert len(flat) == 1 and not flat[0].passed
    assert "same risk" in flat[0].reason and "the 2 readmissions in validation" in flat[0].reason
    assert "(it stopped after 1 boosting round)" in flat[0].reason
    assert ranking_criterion(np.array([0.1, 0.2, 0.3, 0.2, 0.5]), y, best_iteration=40, words="deaths") == []


def test_a_limit_per_unit_day_is_not_judged_when_the_ward_days_are_not_known():
    crit = _by_name(
        gate.operational_criteria(
            _burden(alerts_per_unit_day=None, undated_rows=400), LIMITS, words=READMISSION
        )
    )["alerts_per_unit_day_upper_bound"]
    assert not crit.judged and crit.passed
    assert crit.reason == (
        "alerts per unit per day: not judged (the day on the ward of 400 of the 400 prediction rows is not "
        "known: their batch is not a dated delivery); the maximum is 2"
    )


def test_the_number_needed_to_evaluate_is_not_judged_with_too_few_outcomes_the_rates_still_are():
    """MIMIC demo: 3 readmissions in validation; the NNE's infinite upper bound was judged and failed while
    every other measure of the outcome read "not judged (too few outcomes to judge)"."""
    burden = _burden(number_needed_to_evaluate=MetricWithCI(7.0, 3.0, math.inf), true_alerts=3)
    crit = _by_name(gate.operational_criteria(burden, LIMITS, words=READMISSION, evaluable=False))
    nne = crit["number_needed_to_evaluate_upper_bound"]
    assert nne.passed and not nne.judged
    assert nne.reason == (
        "number needed to evaluate (patients flagged per readmission found): not judged (too few outcomes to "
        "judge); the maximum is 4"
    )
    # alerts do not count outcomes: judged as ever
    assert crit["alerts_per_100_patient_days_upper_bound"].judged
    judged = _by_name(gate.operational_criteria(burden, LIMITS, words=READMISSION))
    assert not judged["number_needed_to_evaluate_upper_bound"].passed
