"""Metrics, CIs, calibration and decision curves behave as their definitions say."""

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from clinical_ml.core.evaluation import (
    auprc,
    auroc,
    bootstrap_metrics,
    calibration_curve,
    calibration_slope_intercept,
    calibration_slopes_weighted,
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


def _logit(p):
    pc = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(pc / (1 - pc))


def _reference_slope(y, p):
    """scikit-learn's unpenalized (C=inf) logistic regression of y on logit(p)."""
    fit = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000)
    return fit.fit(_logit(p)[:, None], y).coef_[0, 0]


def _reference_intercept(y, p):
    """Calibration-in-the-large by Brent's method on its score equation sum(y) = sum(expit(a + logit(p)))."""
    lp = _logit(p)
    return brentq(lambda a: y.sum() - expit(a + lp).sum(), -60, 60, xtol=1e-13)


def _recalibration_case(name):
    """(y, p): outcomes drawn from true risks, and predictions whose logits are the true ones scaled."""
    if name == "rare_event":  # ~20 events in 500 and logits doubled
        rng = np.random.default_rng(1)
        lp = rng.normal(-4, 1.5, 500)
        y = (rng.random(lp.size) < expit(lp)).astype(int)
        return y, expit(2 * lp)
    if name == "far_too_low":  # risks ~1e-4 where half the patients have the outcome
        rng = np.random.default_rng(1)
        y = (rng.random(300) < 0.5).astype(int)
        return y, expit(rng.normal(-10, 1, y.size) + 2 * y)
    scale = {"calibrated": 1.0, "overconfident_x2": 2.0, "overconfident_x3": 3.0, "underconfident": 0.5}[name]
    rng = np.random.default_rng(0)
    lp = rng.normal(-1.2, 1.2, 2000)
    y = (rng.random(lp.size) < expit(lp)).astype(int)
    return y, expit(scale * lp)


@pytest.mark.parametrize(
    "case",
    ["calibrated", "overconfident_x2", "overconfident_x3", "underconfident", "rare_event", "far_too_low"],
)
def test_calibration_slope_and_intercept_are_the_maximum_likelihood_fit(case):
    y, p = _recalibration_case(case)
    slope, intercept = calibration_slope_intercept(y, p)
    assert slope == pytest.approx(_reference_slope(y, p), abs=1e-4)
    assert intercept == pytest.approx(_reference_intercept(y, p), abs=1e-4)


def test_overconfidence_shows_as_the_slope_it_scales_by():
    y, p = _recalibration_case("calibrated")
    s1 = calibration_slope_intercept(y, p)[0]
    lp = np.log(p / (1 - p))
    for k in (2.0, 3.0, 4.0):  # not exact: risks are clipped to [1e-6, 1 - 1e-6] before the logit
        assert calibration_slope_intercept(y, expit(k * lp))[0] == pytest.approx(s1 / k, rel=0.01)


def _separated_cases():
    lp = np.linspace(-3, 2, 41)
    y = (lp > 0).astype(int)
    quasi_lp = np.r_[lp, 0.0, 0.0]  # an event and a non-event tie at the threshold
    quasi_y = np.r_[(lp > 0).astype(int), 1, 0]
    return {"complete": (y, expit(lp)), "quasi_complete": (quasi_y, expit(quasi_lp))}


@pytest.mark.parametrize("case", ["complete", "quasi_complete"])
def test_separated_outcomes_have_no_calibration_slope(case):
    y, p = _separated_cases()[case]
    slope, intercept = calibration_slope_intercept(y, p)
    assert np.isnan(slope)
    assert intercept == pytest.approx(_reference_intercept(y, p), abs=1e-4)  # the offset fit still exists
    assert np.isnan(calibration_slopes_weighted(y, p, np.ones((1, y.size)))[0])


def test_one_barely_overlapping_pair_gives_a_steep_but_finite_slope():
    y, p = _separated_cases()["complete"]
    y = y.copy()
    y[[24, 25]] = y[[25, 24]]  # swap the two rows next to the threshold: the classes now overlap
    slope = calibration_slope_intercept(y, p)[0]
    assert slope > 10
    assert slope == pytest.approx(_reference_slope(y, p), rel=1e-4)


def test_calibration_fit_is_undefined_with_one_class_or_one_risk():
    p = np.linspace(0.1, 0.6, 30)
    assert all(np.isnan(calibration_slope_intercept(np.zeros(30, dtype=int), p)))
    assert all(np.isnan(calibration_slope_intercept(np.ones(30, dtype=int), p)))
    y = (np.arange(30) % 3 == 0).astype(int)
    slope, intercept = calibration_slope_intercept(y, np.full(30, 0.2))
    assert np.isnan(slope)
    assert intercept == pytest.approx(np.log(10 / 20) - np.log(0.2 / 0.8))


@pytest.mark.parametrize("case", ["overconfident_x3", "rare_event", "underconfident"])
def test_batched_slopes_equal_the_fit_on_each_resample(case):
    y, p = _recalibration_case(case)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, y.size, (40, y.size))
    t = np.median(p[y == 1])  # non-events below t and events from t up: separated
    idx[0] = np.resize(np.flatnonzero(((y == 0) & (p < t)) | ((y == 1) & (p >= t))), y.size)
    idx[1] = np.resize(np.flatnonzero(y == 0), y.size)  # one class
    counts = np.stack([np.bincount(i, minlength=y.size) for i in idx])
    got = calibration_slopes_weighted(y, p, counts)
    want = np.array([calibration_slope_intercept(y[i], p[i])[0] for i in idx])
    assert np.isnan(got[:2]).all() and np.isnan(want[:2]).all()
    assert np.isfinite(got[2:]).all()
    np.testing.assert_allclose(got[2:], want[2:], rtol=0, atol=1e-6)


def test_bootstrap_is_seeded_and_brackets_the_point():
    y, p = _data(n=800)
    a = bootstrap_metrics(y, p, 0.3, n_boot=60, seed=3)
    b = bootstrap_metrics(y, p, 0.3, n_boot=60, seed=3)
    assert a == b
    for m in a.values():
        assert m.lower <= m.upper
    assert a["auroc"].lower <= a["auroc"].value <= a["auroc"].upper


def test_ci_narrows_with_more_patients():
    ys, ps = _data(n=300)
    yl, pl = _data(n=3000)
    small = bootstrap_metrics(ys, ps, 0.3, n_boot=80, seed=1)["auroc"]
    large = bootstrap_metrics(yl, pl, 0.3, n_boot=80, seed=1)["auroc"]
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
