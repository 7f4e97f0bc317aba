"""Metrics, CIs, calibration and decision curves behave as their definitions say."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from clinical_ml.core.evaluation import (
    auprc,
    auroc,
    bootstrap_metrics,
    calibration_curve,
    calibration_slope_intercept,
    choose_threshold,
    decision_curve,
    paired_comparison,
    point_metrics,
)


def _data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.2, 1.2, n)
    p = 1 / (1 + np.exp(-lp))
    y = (rng.random(n) < p).astype(int)
    return y, p


def test_auroc_and_auprc_match_scikit_learn():
    y, p = _data()
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p))


def test_well_calibrated_model_has_slope_near_one_intercept_near_zero():
    y, p = _data(n=20000)
    slope, intercept = calibration_slope_intercept(y, p)
    assert slope == pytest.approx(1, abs=0.06)
    assert intercept == pytest.approx(0, abs=0.06)
    m = point_metrics(y, p, 0.3)
    assert m["observed_expected_ratio"] == pytest.approx(1, abs=0.05)


def test_overconfident_predictions_have_slope_below_one():
    y, p = _data(n=20000)
    lp = np.log(p / (1 - p))
    slope, _ = calibration_slope_intercept(y, 1 / (1 + np.exp(-2 * lp)))
    assert slope == pytest.approx(0.5, abs=0.05)


def test_bootstrap_is_seeded_and_brackets_the_point():
    y, p = _data(n=800)
    a = bootstrap_metrics(y, p, 0.3, n_boot=60, seed=3)
    b = bootstrap_metrics(y, p, 0.3, n_boot=60, seed=3)
    assert a == b
    for m in a.values():
        assert m.lower <= m.upper
    assert a["auroc"].lower <= a["auroc"].value <= a["auroc"].upper


def test_ci_narrows_with_more_patients():
    small = bootstrap_metrics(*_data(n=300), 0.3, n_boot=80, seed=1)["auroc"]
    large = bootstrap_metrics(*_data(n=3000), 0.3, n_boot=80, seed=1)["auroc"]
    assert (large.upper - large.lower) < (small.upper - small.lower)


def test_sensitivity_policy_reaches_its_target_on_the_tuning_rows():
    y, p = _data()
    t = choose_threshold(y, p, policy="min_sensitivity", target=0.8)
    assert point_metrics(y, p, t)["sensitivity"] >= 0.8


def test_calibration_curve_bins_cover_every_row():
    y, p = _data()
    rows = calibration_curve(y, p, n_bins=10)
    assert sum(r["n"] for r in rows) == len(y)
    assert all(r["lower"] <= r["observed"] <= r["upper"] for r in rows)


def test_decision_curve_treat_all_and_none():
    y, p = _data()
    rows = decision_curve(y, p)
    first = rows[0]
    assert first["treat_none"] == 0.0
    assert first["treat_all"] == pytest.approx(
        y.mean() - (1 - y.mean()) * first["threshold"] / (1 - first["threshold"])
    )
    # a useful model beats both strategies somewhere in the clinical range
    assert any(r["model"] > max(r["treat_all"], 0) for r in rows)


def test_paired_comparison_of_a_model_with_itself_is_zero():
    y, p = _data(n=500)
    comp = paired_comparison(y, p, p, n_boot=30, seed=0)
    assert comp["auroc_difference"].value == 0 and comp["auroc_difference"].upper == 0
