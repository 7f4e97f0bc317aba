"""The subcohort verdict: calibration by group on patient-bootstrap intervals, point estimates below a
minimum, and "insufficient data" instead of a pass that judged nothing."""

import numpy as np
import pytest

from clinical_ml.core import bootstrap
from clinical_ml.core.fairness import (
    calibration_interval,
    calibration_replicates,
    subgroup_table,
    verdict,
)


def _cohort(n: int, seed: int):
    rng = np.random.default_rng(seed)
    sex = rng.choice(["Female", "Male"], n)
    race = rng.choice(["White", "Black", "Asian"], n, p=[0.6, 0.25, 0.15])
    p = 1 / (1 + np.exp(-rng.normal(-1.8, 1.2, n)))
    y = (rng.random(n) < p).astype(int)
    return y, p, {"sex": sex, "race_ethnicity": race}


def test_observed_expected_replicates_are_those_of_the_patient_bootstrap():
    # one row per patient: the O/E of each replicate is sum(y) / sum(p) over the row bootstrap's resample
    y, p, attrs = _cohort(400, seed=1)
    codes = (attrs["sex"] == "Male").astype(np.int64)
    ((oe, _slope),) = calibration_replicates(
        y.astype(bool), p, [(codes, 2)], clusters=None, n_boot=50, rng=np.random.default_rng(3)
    )
    expected = bootstrap.replicates(
        lambda idx: tuple(y[idx][codes[idx] == g].sum() / p[idx][codes[idx] == g].sum() for g in (0, 1)),
        len(y),
        n_boot=50,
        rng=np.random.default_rng(3),
    )
    np.testing.assert_allclose(oe, expected, rtol=1e-12)


def test_few_calibration_replicates_give_a_normal_interval_with_the_bootstrap_standard_error():
    rng = np.random.default_rng(0)
    reps = np.exp(rng.normal(0.1, 0.05, (50, 2)))  # O/E replicates, log-normal
    value = np.array([1.1, 1.2])
    lo, hi = calibration_interval(reps, value, level=0.95, log=True)
    sd = np.log(reps).std(axis=0, ddof=1)
    np.testing.assert_allclose(lo, value * np.exp(-1.959964 * sd), rtol=1e-6)
    np.testing.assert_allclose(hi, value * np.exp(1.959964 * sd), rtol=1e-6)
    many = np.exp(rng.normal(0.1, 0.05, (400, 2)))
    np.testing.assert_array_equal(
        calibration_interval(many, value, level=0.95, log=True),
        bootstrap.percentile_interval(many, level=0.95),
    )


def test_calibration_intervals_resample_patients_not_rows():
    # six copies of each patient's row: with the patients given, the interval keeps the single-row width
    y, p, attrs = _cohort(1500, seed=2)
    single = subgroup_table(y, p, 0.2, attrs, intersections=False, n_boot=400, seed=1)
    rep = np.repeat(np.arange(len(y)), 6)
    copies = {k: v[rep] for k, v in attrs.items()}
    clustered = subgroup_table(
        y[rep], p[rep], 0.2, copies, intersections=False, n_boot=400, seed=1, clusters=rep
    )
    naive = subgroup_table(y[rep], p[rep], 0.2, copies, intersections=False, n_boot=400, seed=1)

    def width(a, metric):
        return np.array([r.metrics[metric][2] - r.metrics[metric][1] for r in a.rows if not r.suppressed])

    for metric in ("observed_expected_ratio", "calibration_slope"):
        ratio = width(clustered, metric) / width(single, metric)
        assert np.all((ratio > 0.8) & (ratio < 1.25)), (metric, ratio)
        assert np.all(width(naive, metric) / width(single, metric) < 0.6)


def test_a_group_with_twice_the_deaths_predicted_fails_with_the_interval_in_words():
    y, p, attrs = _cohort(6000, seed=3)
    p = np.where(attrs["race_ethnicity"] == "Black", p / 2, p)
    a = subgroup_table(y, p, 0.2, attrs, intersections=False, n_boot=300, seed=1)
    black = next(r for r in a.rows_of("race_ethnicity") if r.group == "Black")
    v, lo, hi = black.metrics["observed_expected_ratio"]
    assert lo > 1.2  # the whole interval excludes parity and the acceptable range
    sentence = (
        f"observed/expected deaths {v:.2f} (95% CI {lo:.2f} to {hi:.2f}): more deaths than predicted, the "
        "whole interval above the acceptable range 0.80 to 1.20"
    )
    assert sentence in black.failures
    verdict_, reasons = verdict(a)
    assert verdict_ == "fail"
    assert f"race and ethnicity = Black: {sentence}" in reasons
    others = [
        r for r in a.rows if r.group != "Black" and not r.suppressed and r.attribute == "race_ethnicity"
    ]
    assert not any(r.failures for r in others)


def test_an_intersection_outside_the_range_is_flagged_for_review_beyond_chance_only():
    y, p, attrs = _cohort(6000, seed=3)
    p = np.where(attrs["race_ethnicity"] == "Black", p / 2, p)
    a = subgroup_table(y, p, 0.2, attrs, n_boot=200, seed=1)
    crossed = [r for r in a.rows if r.intersection and not r.suppressed]
    black = [r for r in crossed if "Black" in r.group]
    assert black and not any(r.failures for r in crossed)  # intersections never fail on calibration
    for r in black:
        v, lo, hi = r.metrics["observed_expected_ratio"]
        flag = next(f for f in r.flags if f.startswith("observed/expected deaths"))
        assert flag.startswith(
            f"observed/expected deaths {v:.2f} (95% CI {lo:.2f} to {hi:.2f}): more deaths than predicted, above "
            "the acceptable range 0.80 to 1.20, beyond chance among "
        )
    others = [r for r in crossed if "Black" not in r.group]
    assert not any(f.startswith("observed/expected") for r in others for f in r.flags)
    assert any(r.failures for r in a.rows_of("race_ethnicity"))  # the attribute carries the failure


def test_a_calibrated_model_has_no_calibration_failure():
    fails = 0
    for seed in range(10):
        y, p, attrs = _cohort(2500, seed=20 + seed)
        a = subgroup_table(y, p, 0.2, attrs, n_boot=200, seed=seed)
        fails += any(r.failures or any("acceptable range" in f for f in r.flags) for r in a.rows)
    assert fails <= 1


def test_a_point_estimate_below_a_minimum_gives_review_not_pass():
    y, p, attrs = _cohort(3000, seed=4)
    a0 = subgroup_table(y, p, 0.2, attrs, intersections=False, n_boot=200, seed=1)
    female = next(r for r in a0.rows_of("sex") if r.group == "Female")
    v, lo, hi = female.metrics["sensitivity"]
    minimum = (v + hi) / 2  # above the point estimate, below the upper bound
    a = subgroup_table(y, p, 0.2, attrs, intersections=False, n_boot=200, seed=1, sensitivity_min=minimum)
    female = next(r for r in a.rows_of("sex") if r.group == "Female")
    assert not female.failures and len(female.concerns) == 1
    assert female.concerns[0].startswith(
        f"sensitivity {v:.2f} is below the subgroup minimum of {minimum:.2f}"
    )
    assert f"but its 95% CI ({lo:.2f} to {hi:.2f}) reaches the minimum" in female.concerns[0]
    verdict_, reasons = verdict(a)
    assert verdict_ in ("review", "fail") and verdict_ != "pass"
    assert f"sex = Female: {female.concerns[0]}" in reasons


def test_an_attribute_with_one_group_to_judge_is_insufficient_data_not_pass():
    y, p, _ = _cohort(3000, seed=5)
    rare = np.where(np.arange(len(y)) < 40, "Rare", "Common")  # 40 patients: too few deaths to judge
    a = subgroup_table(y, p, 0.2, {"site": rare}, intersections=False, n_boot=100, seed=1)
    assert [r.suppressed for r in a.rows_of("site")] == [False, True]
    v, reasons = verdict(a)
    assert v == "insufficient data"
    assert reasons[0] == "site: 1 of 2 groups large enough to judge, so its groups cannot be compared"


@pytest.mark.parametrize("n", [29, 300])
def test_a_small_cohort_is_insufficient_data_with_the_counts(n):
    y, p, attrs = _cohort(n, seed=6)
    a = subgroup_table(y, p, 0.2, attrs, intersections=False, n_boot=100, seed=1)
    v, reasons = verdict(a, min_events=100, min_non_events=100)
    assert v == "insufficient data"
    events = int(y.sum())
    assert (
        f"too few outcomes to judge: {events} deaths and {n - events} survivors in the validation cohort, and "
        "at least 100 deaths and 100 survivors are needed"
    ) in reasons


def test_pass_says_what_was_judged():
    y, p, attrs = _cohort(4000, seed=7)
    a = subgroup_table(y, p, 0.2, attrs, intersections=False, n_boot=200, seed=2)
    v, reasons = verdict(a, min_events=100, min_non_events=100)
    assert v == "pass"  # a calibrated model, every group large enough
    assert reasons == [
        "no group of an audited attribute large enough to judge has a point estimate below a subgroup minimum, "
        "no group's 95% CI lies wholly below a minimum or outside a calibration range, and none is worse than "
        "all patients beyond chance"
    ]
    # what the sentence says, row by row
    judged = [r for r in a.rows if r.attribute != "overall" and not r.suppressed]
    assert judged and all(not r.failures and not r.flags for r in judged)
    assert all(not r.concerns for r in judged if not r.intersection)


def test_the_fairness_report_states_the_rules_the_failure_and_plots_observed_expected(tmp_path):
    from clinical_ml.core.reports import (
        fairness_report,
        observed_expected_forest_plots,
        sensitivity_forest_plots,
    )
    from clinical_ml.core.usecase import load_use_case
    from clinical_ml_tests.conftest import PROJECT_ROOT

    uc = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    y, p, attrs = _cohort(6000, seed=3)
    p = np.where(attrs["race_ethnicity"] == "Black", p / 2, p)
    a = subgroup_table(y, p, 0.2, attrs, n_boot=200, seed=1, words=uc.words)
    v, reasons = verdict(a, min_events=100, min_non_events=100, words=uc.words)
    oe_plots = observed_expected_forest_plots(a)
    assert set(oe_plots) == {s.attribute for s in a.attributes}
    assert all(png.startswith(b"\x89PNG") for png in oe_plots.values())
    html, md = fairness_report(
        use_case=uc,
        analysis=a,
        verdict=v,
        reasons=reasons,
        forest_plots=sensitivity_forest_plots(a, minimum=0.6),
        calibration_plots=oe_plots,
        model_version="v1",
        code_version="c1",
    )
    black = next(r for r in a.rows_of("race_ethnicity") if r.group == "Black")
    assert v == "fail" and "### Subcohort fairness: FAIL" in md
    assert f"<li>race and ethnicity = Black: {black.failures[0]}</li>" in html
    assert (
        "Acceptable calibration of a group: observed/expected deaths 0.80 to\n1.20, calibration slope 0.70 to 1.30"
        in html
    )
    assert f"from {a.calibration_n_boot}\nbootstrap resamples of the patients" in html
    assert html.count('alt="Observed / expected deaths by ') == len(a.attributes)


def test_site_is_an_audit_attribute_a_use_case_can_ask_for():
    import polars as pl

    from clinical_ml.core.fairness import audit_subcohorts
    from clinical_ml.core.usecase import OperatingPoint, Subgroups

    y, p, attrs = _cohort(3000, seed=8)
    rng = np.random.default_rng(9)
    frame = pl.DataFrame(
        {
            "split": np.where(np.arange(len(y)) < 1000, "tuning", "held_out"),
            "label": y.astype(bool),
            "risk": p,
            "sex": attrs["sex"],
            "site": rng.choice(["SITE_A", "SITE_B", "SITE_C"], len(y)),
            "subject_id": np.arange(len(y)) // 2,  # two rows per patient: resampled together
        }
    )
    audit = audit_subcohorts(
        frame,
        threshold=0.2,
        subgroups=Subgroups(attributes=["sex", "site"], age_bands=[18, 65]),
        operating_point=OperatingPoint(policy="min_sensitivity", target=0.8),
        n_boot=50,
        seed=1,
        min_events=100,
        min_non_events=100,
    )
    assert [r.group for r in audit.analysis.rows_of("site")] == ["SITE_A", "SITE_B", "SITE_C"]
    assert [r.group for r in audit.analysis.rows_of("sex & site")][:2] == [
        "Female & SITE_A",
        "Female & SITE_B",
    ]
    assert {t.attribute for t in audit.thresholds} == {"sex", "site"}


def test_an_intersection_below_a_minimum_by_a_wide_interval_is_noted_not_a_review():
    from clinical_ml.core.fairness import SubgroupRow

    concern = (
        "sensitivity 0.53 is below the subgroup minimum of 0.60, but its 95% CI (0.29 to 0.76) reaches it"
    )

    def row(attribute, group, *, intersection=False, concerns=()):
        return SubgroupRow(attribute, group, 200, 40, False, {}, intersection=intersection, concerns=concerns)

    groups = [
        row("overall", "all"),
        row("sex", "F"),
        row("sex", "M"),
        row("age_band", "45-64"),
        row("age_band", "65+"),
    ]
    crossed = [row("sex & age_band", "F & 45-64", intersection=True, concerns=(concern,))]
    crossed += [row("sex & age_band", g, intersection=True) for g in ("M & 45-64", "F & 65+", "M & 65+")]

    v, reasons = verdict(groups + crossed)
    assert v == "pass"
    note = next(r for r in reasons if "intersections judged" in r)
    assert note.startswith("1 of 4 intersections judged have a point estimate below a subgroup minimum")
    assert "sex and age group = F & 45-64" in note and "do not ask for review on their own" in note
    # the same concern on a group of an audited attribute asks for review
    v, reasons = verdict([*groups[:1], row("sex", "F", concerns=(concern,)), *groups[2:], *crossed])
    assert v == "review" and reasons[0] == f"sex = F: {concern}"
