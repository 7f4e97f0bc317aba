"""Subcohort analysis: fairlearn as the reference, suppression, intervals, flags, per-group thresholds."""

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import equalized_odds_difference
from sklearn.metrics import roc_auc_score

from clinical_ml.core.evaluation import calibration_slope_intercept, choose_threshold
from clinical_ml.core.fairness import (
    INTERSECTION_SEP,
    analysis_summary,
    bootstrap_auroc,
    delong_auroc,
    group_thresholds,
    reference_metric_frame,
    subgroup_table,
    threshold_recommendation,
    verdict,
)


def _cohort(n: int, seed: int, *, biased_group: str | None = None, shift: float = 0.0):
    """Calibrated risks for a fair model; ``biased_group`` gets risks shifted down on the logit scale for
    the patients who die (its deaths are under-estimated, like an under-measured group)."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["Female", "Male"], n)
    race = rng.choice(["White", "Black", "Asian", "Other"], n, p=[0.6, 0.2, 0.15, 0.05])
    age = rng.choice(["18-44", "45-64", "65-79", "80+"], n, p=[0.2, 0.3, 0.3, 0.2])
    logit = rng.normal(-2.0, 1.3, n)
    p = 1 / (1 + np.exp(-logit))
    y = rng.random(n) < p
    if biased_group is not None:
        hit = (race == biased_group) & y
        p = np.where(hit, 1 / (1 + np.exp(-(logit - shift))), p)
    return y.astype(int), p, {"sex": sex, "race_ethnicity": race, "age_band": age}


@pytest.fixture(scope="module")
def cohort():
    return _cohort(6000, seed=1)


@pytest.fixture(scope="module")
def analysis(cohort):
    y, p, attrs = cohort
    return subgroup_table(y, p, 0.15, attrs, min_cell_size=11, n_boot=300, seed=3)


def test_point_estimates_match_fairlearn_metricframe_for_attributes_and_intersections(cohort, analysis):
    y, p, attrs = cohort
    for name in attrs:
        mf = reference_metric_frame(y, p, 0.15, pd.Series(attrs[name], name=name))
        for r in analysis.rows_of(name):
            assert not r.suppressed
            for metric in ("sensitivity", "specificity", "ppv", "npv"):
                assert r.metrics[metric][0] == pytest.approx(mf.by_group.loc[r.group, metric], abs=1e-12)
    a, b = "sex", "race_ethnicity"
    mf = reference_metric_frame(y, p, 0.15, pd.DataFrame({a: attrs[a], b: attrs[b]}))
    rows = analysis.rows_of(f"{a}{INTERSECTION_SEP}{b}")
    assert len(rows) == len(mf.by_group)
    for r in rows:
        if r.suppressed:
            continue
        key = tuple(r.group.split(INTERSECTION_SEP))
        assert r.metrics["sensitivity"][0] == pytest.approx(mf.by_group.loc[key, "sensitivity"], abs=1e-12)
        assert r.metrics["specificity"][0] == pytest.approx(mf.by_group.loc[key, "specificity"], abs=1e-12)


def test_auroc_prevalence_and_calibration_match_direct_computation(cohort, analysis):
    y, p, attrs = cohort
    for r in analysis.rows_of("age_band"):
        m = attrs["age_band"] == r.group
        assert r.metrics["auroc"][0] == pytest.approx(roc_auc_score(y[m], p[m]), abs=1e-12)
        assert r.metrics["prevalence"][0] == pytest.approx(y[m].mean(), abs=1e-12)
        assert r.metrics["observed_expected_ratio"][0] == pytest.approx(y[m].sum() / p[m].sum(), rel=1e-9)
        slope, _ = calibration_slope_intercept(y[m], p[m])
        assert r.metrics["calibration_slope"][0] == pytest.approx(slope, abs=1e-6)
        for value, lower, upper in r.metrics.values():
            assert lower <= value <= upper


def test_equalized_odds_difference_matches_fairlearn(cohort, analysis):
    y, p, attrs = cohort
    for name in attrs:
        ref = equalized_odds_difference(y, (p >= 0.15).astype(int), sensitive_features=attrs[name])
        eod = analysis.summary_of(name).equalized_odds_difference
        assert eod[0] == pytest.approx(ref, abs=1e-12)
        assert eod[2] >= eod[0] >= 0


def test_disparities_are_relative_to_the_best_group_and_to_all_patients(analysis):
    overall = analysis.overall.metrics["sensitivity"][0]
    for summary in analysis.attributes:
        rows = {r.group: r for r in analysis.rows_of(summary.attribute) if not r.suppressed}
        best = rows[summary.best_group["sensitivity"]]
        assert best.metrics["sensitivity"][0] == max(r.metrics["sensitivity"][0] for r in rows.values())
        for r in rows.values():
            d = r.disparities["sensitivity"]
            assert d["difference_to_best"][0] == pytest.approx(
                r.metrics["sensitivity"][0] - best.metrics["sensitivity"][0]
            )
            assert d["ratio_to_overall"][0] == pytest.approx(r.metrics["sensitivity"][0] / overall)
            assert (
                d["difference_to_overall"][1]
                <= d["difference_to_overall"][0]
                <= d["difference_to_overall"][2]
            )


def test_small_cells_are_suppressed_and_listed_never_dropped():
    y, p, attrs = _cohort(2000, seed=2)
    attrs["race_ethnicity"] = attrs["race_ethnicity"].astype(object)
    attrs["race_ethnicity"][:6] = "Tiny group"
    a = subgroup_table(y, p, 0.15, attrs, min_cell_size=11, n_boot=50)
    for name, values in attrs.items():
        assert {r.group for r in a.rows_of(name)} == set(values.tolist())
    tiny = next(r for r in a.rows_of("race_ethnicity") if r.group == "Tiny group")
    assert tiny.suppressed and tiny.metrics == {} and tiny.flags == ()
    summary = analysis_summary(a, *verdict(a), [], [])
    stored = next(r for r in summary["rows"] if r["group"] == "Tiny group")
    assert stored["n"] is None and stored["events"] is None
    assert any("suppressed" in reason for reason in verdict(a)[1])


def test_multinomial_bootstrap_matches_a_row_bootstrap():
    y, p, attrs = _cohort(3000, seed=4)
    a = subgroup_table(y, p, 0.15, {"sex": attrs["sex"]}, n_boot=2000, seed=5, intersections=False)
    row = next(r for r in a.rows_of("sex") if r.group == "Female")
    m = attrs["sex"] == "Female"
    yg, fg = y[m].astype(bool), p[m] >= 0.15
    rng = np.random.default_rng(6)
    reps = []
    for _ in range(2000):
        idx = rng.integers(0, yg.size, yg.size)
        reps.append((fg[idx] & yg[idx]).sum() / yg[idx].sum())
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert row.metrics["sensitivity"][1] == pytest.approx(lo, abs=0.015)
    assert row.metrics["sensitivity"][2] == pytest.approx(hi, abs=0.015)


def test_bootstrap_auroc_is_the_auroc_of_each_resample_and_delong_matches_its_spread():
    y, p, _ = _cohort(800, seed=7)
    reps = bootstrap_auroc(y, p, n_boot=300, rng=np.random.default_rng(8))
    rng = np.random.default_rng(8)
    for b in range(5):
        idx = rng.integers(0, y.size, y.size)
        assert reps[b] == pytest.approx(roc_auc_score(y[idx], p[idx]), abs=1e-12)
    auc, var = delong_auroc(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.sqrt(var) == pytest.approx(np.std(reps, ddof=1), rel=0.2)


def test_bootstrap_auroc_option_gives_intervals_around_the_estimate(cohort):
    y, p, attrs = cohort
    a = subgroup_table(y, p, 0.15, {"sex": attrs["sex"]}, n_boot=100, auroc_ci="bootstrap")
    for r in a.rows:
        lo_hi = r.metrics["auroc"]
        assert lo_hi[1] < lo_hi[0] < lo_hi[2]


def test_group_with_under_estimated_deaths_is_flagged_with_a_ci_excluding_parity():
    y, p, attrs = _cohort(6000, seed=9, biased_group="Black", shift=1.2)
    a = subgroup_table(y, p, 0.15, attrs, n_boot=500, sensitivity_min=0.0, seed=1)
    black = next(r for r in a.rows_of("race_ethnicity") if r.group == "Black")
    assert black.flags
    d = black.disparities["sensitivity"]["difference_to_overall"]
    assert d[2] < 0  # the whole 95% CI is below parity
    assert black.disparities["sensitivity"]["ratio_to_best"][2] < 1
    flagged_single = {(r.attribute, r.group) for r in a.rows if r.flags and not r.intersection}
    assert flagged_single == {("race_ethnicity", "Black")}
    # its calibration fails too: the deaths' risks pushed down flatten its calibration slope, whose whole
    # interval lies below the acceptable range
    slope = black.metrics["calibration_slope"]
    assert slope[2] < a.calibration_slope_range[0]
    assert black.failures and all(f in black.flags for f in black.failures)
    v, reasons = verdict(a)
    assert v == "fail"
    assert any("Black" in reason and "beyond chance" in reason for reason in reasons)
    assert (
        f"race and ethnicity = Black: calibration slope {slope[0]:.2f} (95% CI {slope[1]:.2f} to {slope[2]:.2f}): "
        "predicted risks too extreme in this group, the whole interval below the acceptable range 0.70 to 1.30"
    ) in reasons


def test_fair_model_flags_no_group_beyond_chance():
    # Holm's correction keeps the chance of any false flag per analysis at about 5%: over 20 fair cohorts,
    # more than 4 with a flag would happen by chance with probability below 2%.
    runs_with_flags = 0
    for seed in range(20):
        y, p, attrs = _cohort(2500, seed=100 + seed)
        a = subgroup_table(y, p, 0.15, attrs, n_boot=100, seed=seed)
        runs_with_flags += any(r.flags for r in a.rows)
    assert runs_with_flags <= 4


def test_verdict_fails_when_a_group_misses_a_use_case_minimum():
    y, p, attrs = _cohort(6000, seed=9, biased_group="Black", shift=2.5)
    a = subgroup_table(y, p, 0.15, attrs, n_boot=200, sensitivity_min=0.6)
    v, reasons = verdict(a)
    assert v == "fail"
    assert any("subgroup minimum" in r for r in reasons)


def test_per_group_thresholds_meet_the_target_where_the_single_threshold_does_not():
    y, p, attrs = _cohort(8000, seed=10, biased_group="Black", shift=1.2)
    tune = np.arange(y.size) < 4000
    valid = ~tune
    single = choose_threshold(y[tune], p[tune], policy="min_sensitivity", target=0.8)
    kwargs = {"threshold": single, "policy": "min_sensitivity", "target": 0.8, "n_boot": 100, "seed": 1}
    rows = group_thresholds(
        y[tune],
        p[tune],
        {"race_ethnicity": attrs["race_ethnicity"][tune]},
        y[valid],
        p[valid],
        {"race_ethnicity": attrs["race_ethnicity"][valid]},
        **kwargs,
    )
    again = group_thresholds(
        y[tune],
        p[tune],
        {"race_ethnicity": attrs["race_ethnicity"][tune]},
        y[valid],
        p[valid],
        {"race_ethnicity": attrs["race_ethnicity"][valid]},
        **kwargs,
    )
    assert rows == again  # deterministic
    black = next(r for r in rows if r.group == "Black")
    assert not black.suppressed
    assert black.threshold < single
    assert black.threshold_range[0] <= black.threshold <= black.threshold_range[1]
    assert black.sensitivity_single[2] < 0.8
    assert black.sensitivity_group[0] > black.sensitivity_single[0]
    assert black.specificity_group[0] <= black.specificity_single[0]
    recs = threshold_recommendation(rows, policy="min_sensitivity", target=0.8)
    assert any(r.startswith("race and ethnicity = Black") for r in recs)
    assert not any("White" in r for r in recs)


def test_per_group_thresholds_suppress_small_groups():
    y, p, attrs = _cohort(600, seed=11)
    g = {"race_ethnicity": attrs["race_ethnicity"]}
    rows = group_thresholds(
        y, p, g, y, p, g, threshold=0.15, policy="min_specificity", target=0.8, n_boot=20, seed=0
    )
    other = next(r for r in rows if r.group == "Other")
    assert other.suppressed and np.isnan(other.threshold)
    assert {r.group for r in rows} == set(g["race_ethnicity"].tolist())


def test_rejects_an_unknown_auroc_interval_method(cohort):
    y, p, attrs = cohort
    with pytest.raises(ValueError, match="auroc_ci"):
        subgroup_table(y, p, 0.15, attrs, auroc_ci="wald")


def test_the_audit_judges_the_validation_cohort_and_chooses_group_thresholds_on_the_tuning_rows():
    import polars as pl

    from clinical_ml.core.fairness import audit_subcohorts
    from clinical_ml.core.usecase import OperatingPoint, Subgroups

    rng = np.random.default_rng(4)
    n = 1200
    risk = rng.random(n)
    frame = pl.DataFrame(
        {
            "split": np.where(np.arange(n) < 600, "tuning", "held_out"),
            "label": rng.random(n) < risk * 0.6,
            "risk": risk,
            "sex": rng.choice(["F", "M"], n),
        }
    )
    kwargs = {
        "threshold": 0.5,
        "subgroups": Subgroups(
            attributes=["sex"], age_bands=[0, 65], min_cell_size=11, auroc_min=0.6, sensitivity_min=0.5
        ),
        "operating_point": OperatingPoint(policy="min_sensitivity", target=0.8),
        "n_boot": 50,
        "seed": 1,
    }
    audit = audit_subcohorts(frame, **kwargs)
    assert audit.analysis.rows[0].n == 600  # all patients of the validation cohort, none of the tuning rows
    assert audit.counts()["groups_audited"] == len(audit.analysis.rows) - 1
    assert audit.summary()["verdict"] == audit.verdict
    # other tuning rows move the per-group thresholds, never the validation analysis
    tuned = frame.with_columns(
        pl.when(pl.col("split") == "tuning").then(pl.col("risk") ** 3).otherwise(pl.col("risk")).alias("risk")
    )
    other = audit_subcohorts(tuned, **kwargs)
    assert other.analysis == audit.analysis
    assert [t.threshold for t in other.thresholds] != [t.threshold for t in audit.thresholds]


def _threshold_row(group: str, sens: tuple[float, float, float], *, suppressed: bool = False):
    from clinical_ml.core.fairness import GroupThreshold

    return GroupThreshold(
        "sex",
        group,
        300,
        30,
        suppressed,
        0.06,
        (0.05, 0.07),
        sens,
        (0.6, 0.5, 0.7),
        sens,
        (0.6, 0.5, 0.7),
        sens[0] >= 0.8,
        sens[0] >= 0.8,
    )


def test_no_recommendation_says_which_groups_are_below_the_target_within_their_interval():
    """eICU: women's sensitivity 0.69 (0.53 to 0.84) at the single threshold, target 0.80. Not below beyond
    chance, so nothing is recommended; the sentence must not say the threshold meets the target there."""
    rows = [_threshold_row("F", (0.69, 0.53, 0.84)), _threshold_row("M", (0.82, 0.69, 0.93))]
    (rec,) = threshold_recommendation(rows, policy="min_sensitivity", target=0.8)
    assert rec == (
        "At the single threshold no group's sensitivity is below the target of 0.80 beyond chance, so no "
        "group-specific threshold is recommended; 1 group is below it within its 95% CI (sex = F 0.69 "
        "(95% CI 0.53 to 0.84)): too uncertain to act on, more data would tell."
    )
    assert "meets" not in rec
    rows = [_threshold_row("F", (0.81, 0.7, 0.9)), _threshold_row("M", (0.85, 0.75, 0.93))]
    rows.append(_threshold_row("X", (0.2, 0.0, 0.9), suppressed=True))  # too small: not judged
    (rec,) = threshold_recommendation(rows, policy="min_sensitivity", target=0.8)
    assert rec == (
        "At the single threshold the sensitivity of every group large enough to judge is at or above the "
        "target of 0.80: no group-specific threshold is recommended."
    )
    below = [_threshold_row("F", (0.5, 0.4, 0.6))]
    (rec,) = threshold_recommendation(below, policy="min_sensitivity", target=0.8)
    assert rec.startswith("sex = F: at the single threshold the sensitivity is 0.50")


def test_many_groups_below_the_target_within_their_interval_are_counted_and_the_lowest_named():
    from clinical_ml.core.fairness import THRESHOLD_GROUPS_NAMED

    sens = [(0.79, 0.6, 0.9), (0.63, 0.41, 0.81), (0.7995, 0.7, 0.87), (0.68, 0.47, 0.84), (0.75, 0.65, 0.82)]
    rows = [_threshold_row(f"G{i}", s) for i, s in enumerate(sens)]
    (rec,) = threshold_recommendation(rows, policy="min_sensitivity", target=0.8)
    assert THRESHOLD_GROUPS_NAMED == 3
    assert (
        "5 groups are below it within their 95% CI (the lowest: sex = G1 0.63 (95% CI 0.41 to 0.81); " in rec
    )
    assert "sex = G3 0.68 (95% CI 0.47 to 0.84); sex = G4 0.75 (95% CI 0.65 to 0.82))" in rec
    assert "G0" not in rec and "G2" not in rec
    # a value just under the target reads under it
    (one,) = threshold_recommendation([rows[2]], policy="min_sensitivity", target=0.8)
    assert "1 group is below it within its 95% CI (sex = G2 0.799 (95% CI 0.70 to 0.87))" in one
