"""The promotion gate: minimums on CI bounds, paired non-inferiority, subgroups, latency; registry pointer."""

import json

import numpy as np
import pytest

from clinical_ml.core import gate
from clinical_ml.core.evaluation import bootstrap_metrics, paired_comparison
from clinical_ml.core.fairness import subgroup_table
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry
from clinical_ml.core.usecase import OutcomeWords

CRITERIA = {
    "auroc_min": 0.7,
    "sensitivity_min": 0.6,
    "specificity_min": 0.5,
    "brier_max": 0.2,
    "calibration_slope_range": (0.7, 1.3),
}


def _cohort(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5, 1.3, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-lp))).astype(int)
    good = 1 / (1 + np.exp(-lp))
    # deliberately degraded challenger: half its signal replaced by noise
    noisy = 0.4 * lp + rng.normal(0, 1.3, n) - 1.0
    degraded = 1 / (1 + np.exp(-noisy))
    return y, good, degraded


def _metrics(y, p):
    return {k: v.as_dict() for k, v in bootstrap_metrics(y, p, 0.2, n_boot=100, seed=1).items()}


def test_a_good_first_model_passes_minimums_and_has_no_champion_to_beat():
    y, good, _ = _cohort()
    result = gate.evaluate_gate(
        gate.minimum_criteria(_metrics(y, good), CRITERIA),
        gate.non_inferiority_criteria(_metrics(y, good), None, comparison=None, auroc_margin=0.02),
        gate.latency_criterion(1.2, slo_ms=10),
    )
    assert result.passed, result.reasons()
    assert any("no champion yet" in r for r in result.reasons("non_inferiority"))


def test_degraded_challenger_is_refused_against_the_champion():
    y, good, degraded = _cohort()
    comp = {k: v.as_dict() for k, v in paired_comparison(y, degraded, good, n_boot=100, seed=2).items()}
    assert comp["auroc_difference"]["upper"] < 0
    result = gate.evaluate_gate(
        gate.minimum_criteria(_metrics(y, degraded), {**CRITERIA, "auroc_min": 0.6}),
        gate.non_inferiority_criteria(
            _metrics(y, degraded),
            {"version": "v1", "metrics": _metrics(y, good)},
            comparison=comp,
            auroc_margin=0.02,
        ),
    )
    assert not result.passed
    assert not result.group_passed("non_inferiority")
    assert any("not shown non-inferior" in r for r in result.reasons())


def test_an_equal_challenger_is_non_inferior():
    y, good, _ = _cohort()
    rng = np.random.default_rng(5)
    twin = np.clip(good + rng.normal(0, 0.005, len(good)), 1e-4, 1 - 1e-4)
    comp = {k: v.as_dict() for k, v in paired_comparison(y, twin, good, n_boot=100, seed=2).items()}
    crit = gate.non_inferiority_criteria(
        _metrics(y, twin), {"version": "v1", "metrics": _metrics(y, good)}, comparison=comp, auroc_margin=0.02
    )
    assert all(c.passed for c in crit), [c.reason for c in crit]


def test_minimums_are_judged_on_the_lower_bound_not_the_point():
    y, good, _ = _cohort(n=300, seed=3)
    m = _metrics(y, good)
    floor = (m["auroc"]["lower"] + m["auroc"]["value"]) / 2  # between the lower bound and the point
    crit = gate.minimum_criteria(m, {**CRITERIA, "auroc_min": floor})
    auc = next(c for c in crit if c.name == "auroc_lower_bound")
    assert m["auroc"]["value"] > floor and not auc.passed


def test_miscalibrated_model_fails_the_observed_expected_range():
    y, good, _ = _cohort()
    m = _metrics(y, np.clip(good * 2.5, 0, 0.99))
    crit = gate.minimum_criteria(m, {**CRITERIA, "observed_expected_range": (0.8, 1.25)})
    assert not next(c for c in crit if c.name == "observed_expected_ratio_in_range").passed


def test_subgroup_minimums_use_the_fairness_table_and_skip_small_groups():
    y, good, _ = _cohort()
    rng = np.random.default_rng(4)
    sex = rng.choice(["F", "M"], len(y))
    tiny = np.where(np.arange(len(y)) < 5, "rare", "common")
    p = good.copy()
    p[sex == "F"] = rng.random(int((sex == "F").sum()))  # useless for women
    rows = subgroup_table(
        y, p, 0.2, {"sex": sex, "tiny": tiny}, min_cell_size=11, auroc_min=0.7, n_boot=50, intersections=False
    ).rows
    as_dicts = [
        {
            "attribute": r.attribute,
            "group": r.group,
            "n": r.n,
            "suppressed": r.suppressed,
            "flags": list(r.flags),
        }
        for r in rows
    ]
    crit = gate.subgroup_criteria(as_dicts, min_cell_size=11)[0]
    assert not crit.passed and "sex = F" in crit.reason and "sex = M" not in crit.reason
    assert "too small to judge" in crit.reason


@pytest.mark.parametrize(("p99", "ok"), [(3.0, True), (25.0, False)])
def test_latency_slo(p99, ok):
    assert gate.latency_criterion(p99, slo_ms=10)[0].passed is ok


def test_pointer_moves_only_by_set_champion_when_recording_without_move(tmp_path):
    reg = Registry(tmp_path, "uc")
    reg.register(ModelCard("uc", "v1"), model_text="tree\n")
    d = PromotionDecision(True, "v1", None, ("ok",), ({"name": "x"},))
    recorded = reg.record_decision(d, move_pointer=False)
    assert reg.champion() is None
    reg.set_champion("v1")
    assert reg.champion() == "v1"
    hist = reg.decisions()
    assert hist == [recorded] and hist[0].criteria == ({"name": "x"},) and hist[0].at
    with pytest.raises(FileNotFoundError):
        reg.set_champion("v404")
    with pytest.raises(FileExistsError):  # another model under a registered version
        reg.register(ModelCard("uc", "v1"), model_text="tree\nother\n")
    assert json.loads((tmp_path / "uc" / "champion.json").read_text())["version"] == "v1"


def test_gate_result_round_trips():
    result = gate.evaluate_gate(gate.latency_criterion(1.0, slo_ms=10))
    assert gate.GateResult.from_dict(result.as_dict()) == result


def test_model_card_round_trips_and_reads_cards_of_older_versions(tmp_path):
    reg = Registry(tmp_path, "uc")
    card = ModelCard(
        "uc",
        "v1",
        feature_names=("a__last",),
        training_ranges={"a__last": (0.5, 2.0)},
        threshold=0.2,
        gate=gate.evaluate_gate(gate.latency_criterion(1.0, slo_ms=10)),
        drift_reference_from="2026-01-20",
    )
    reg.register(card, model_text="tree\n")
    assert reg.card("v1") == card
    # a card written before the typed cards, without most fields, still reads back
    old = tmp_path / "uc" / "models" / "v0"
    old.mkdir(parents=True)
    (old / "card.json").write_text(json.dumps({"lineage": {"batch_ids": ["2026-01-05"]}, "extra": 1}))
    legacy = reg.card("v0")
    assert legacy.version == "v0" and legacy.trained_on("2026-01-05") and not legacy.trained_on("2026-01-06")


def test_a_refused_drift_retraining_is_remembered_until_a_newer_champion(tmp_path):
    registry = Registry(tmp_path, "uc")

    def reg(version, drift_from=None):
        registry.register(ModelCard("uc", version, drift_reference_from=drift_from), model_text="tree\n")

    def refused():
        card = registry.refused_drift_retraining()
        return card.drift_reference_from if card else None

    reg("v1")
    registry.set_champion("v1")
    assert refused() is None
    reg("v2")  # a nightly retraining that was refused is not a drift retraining
    assert refused() is None
    reg("v3", "2026-01-20")  # retrained for the drift of 01-20 and not promoted
    assert refused() == "2026-01-20"
    registry.set_champion("v3")  # once a model of that episode is champion, nothing pending
    assert refused() is None
    # a later (nightly) model inherits the episode: not a new refused drift retraining
    reg("v4", "2026-01-20")
    assert refused() is None
    reg("v5", "2026-02-02")  # a new episode, refused
    assert refused() == "2026-02-02"


WORDS = OutcomeWords(
    event="death",
    events="deaths",
    non_events="survivors",
    with_event="patients who died",
    without_event="patients who survived",
)


def test_too_few_outcomes_refuse_the_gate_and_no_minimum_is_judged():
    # an export with 1 death in 29 stays: every interval degenerate or meaningless
    y = np.zeros(29, dtype=int)
    y[3] = 1
    p = np.full(29, 0.05)
    m = _metrics(y, p)
    enough = gate.evaluability_criterion(
        y, {**CRITERIA, "min_events": 100, "min_non_events": 100}, words=WORDS
    )
    assert not enough[0].passed
    assert enough[0].reason == (
        "too few outcomes to judge: 1 death and 28 survivors in the validation cohort, and at least 100 deaths "
        "and 100 survivors are needed; the minimums of discrimination, calibration and Brier score are not judged"
    )
    mins = gate.minimum_criteria(m, CRITERIA, evaluable=False)
    result = gate.evaluate_gate(enough, mins)
    assert not result.passed
    assert all(not c.judged and not c.passed for c in mins)
    assert not any("meets" in c.reason or "within" in c.reason for c in mins)
    assert all(gate.criterion_result(c.as_dict()) == "not judged" for c in mins)


def test_enough_outcomes_say_how_many_were_needed():
    y, _good, _ = _cohort()
    enough = gate.evaluability_criterion(y, {"min_events": 100, "min_non_events": 100}, words=WORDS)[0]
    events = int(y.sum())
    assert enough.passed and enough.reason == (
        f"{events} deaths and {len(y) - events} survivors in the validation cohort: at least 100 deaths and "
        "100 survivors are needed to judge"
    )


def test_a_degenerate_interval_never_meets_a_minimum():
    y, good, _ = _cohort(n=400, seed=2)
    m = _metrics(y, good)
    m["auroc"] = {"value": 0.5, "lower": 0.5, "upper": 0.5}
    m["sensitivity"] = {"value": 1.0, "lower": 1.0, "upper": 1.0}
    crit = {c.name: c for c in gate.minimum_criteria(m, {**CRITERIA, "auroc_min": 0.5})}
    for name in ("auroc_lower_bound", "sensitivity_lower_bound"):
        assert not crit[name].passed and not crit[name].judged
        assert "meets" not in crit[name].reason
        assert "has no width: the validation cohort cannot measure it" in crit[name].reason
    assert crit["auroc_lower_bound"].reason.startswith(
        "AUROC (minimum 0.50): not judged (its 95% CI 0.500 to 0.500"
    )


def test_calibration_is_judged_on_its_interval_like_discrimination():
    # slope point estimate inside the range, interval reaching beyond it: refused, and the reason says why
    m = {
        **_metrics(*_cohort()[:2]),
        "calibration_slope": {"value": 1.26, "lower": 1.11, "upper": 1.45},
    }
    slope = next(c for c in gate.minimum_criteria(m, CRITERIA) if c.name == "calibration_slope_in_range")
    assert not slope.passed
    assert slope.reason == (
        "calibration slope 1.26 (95% CI 1.11 to 1.45): the interval is not wholly within the range 0.7 to 1.3 "
        "(calibration is judged like discrimination: the whole 95% CI must meet the criterion)"
    )
    m["calibration_slope"] = {"value": 1.02, "lower": 0.9, "upper": 1.15}
    slope = next(c for c in gate.minimum_criteria(m, CRITERIA) if c.name == "calibration_slope_in_range")
    assert slope.passed and "the whole interval lies within the range 0.7 to 1.3" in slope.reason
    m["calibration_slope"] = {"value": 0.5, "lower": 0.4, "upper": 0.6}
    slope = next(c for c in gate.minimum_criteria(m, CRITERIA) if c.name == "calibration_slope_in_range")
    assert not slope.passed and "the whole interval lies outside the range" in slope.reason


def test_subgroups_with_none_large_enough_are_not_judged_never_met():
    rows = [
        {
            "attribute": "overall",
            "group": "All patients",
            "n": 29,
            "suppressed": False,
            "flags": [],
            "failures": [],
        },
        {"attribute": "sex", "group": "F", "n": 12, "suppressed": True, "flags": [], "failures": []},
        {"attribute": "sex", "group": "M", "n": 17, "suppressed": True, "flags": [], "failures": []},
    ]
    crit = gate.subgroup_criteria(rows, min_cell_size=11)[0]
    assert not crit.judged and "meets" not in crit.reason
    assert crit.reason.startswith("not judged: no audited group is large enough to judge; 2 groups too small")


def test_a_subgroup_whose_calibration_interval_lies_outside_the_range_blocks_the_gate():
    y, good, _ = _cohort(n=6000, seed=7)
    rng = np.random.default_rng(8)
    race = rng.choice(["A", "B"], len(y), p=[0.7, 0.3])
    p = np.where(race == "B", good / 2, good)  # group B's risks halved: twice the deaths predicted
    rows = subgroup_table(y, p, 0.2, {"race": race}, n_boot=200, intersections=False).rows
    b = next(r for r in rows if r.group == "B")
    assert b.metrics["observed_expected_ratio"][1] > 1.2 and b.failures
    crit = gate.subgroup_criteria(gate._subgroup_dicts(list(rows)), min_cell_size=11)[0]
    assert not crit.passed and "race = B: observed/expected deaths" in crit.reason
    assert "race = A" not in crit.reason


def test_a_passing_subgroup_criterion_never_says_a_group_meets_a_range_its_point_estimate_is_outside():
    """The criterion passes when no group's whole CI lies outside a range; a group whose point estimate is
    outside but whose CI still reaches the range does not fail it, and the sentence must not say "meets"."""
    y, good, _ = _cohort(n=6000, seed=7)
    rng = np.random.default_rng(9)
    race = rng.choice(["A", "B"], len(y), p=[0.97, 0.03])  # B small: a wide interval
    p = np.where(race == "B", good / 1.1, good)  # B's risks too low: observed/expected about 1.45
    rows = subgroup_table(y, p, 0.2, {"race": race}, n_boot=200, intersections=False).rows
    b = next(r for r in rows if r.group == "B")
    oe, lo, _ = b.metrics["observed_expected_ratio"]
    assert not b.suppressed and oe > 1.2 and lo <= 1.2 and not b.failures
    crit = gate.subgroup_criteria(gate._subgroup_dicts(list(rows)), min_cell_size=11)[0]
    assert crit.passed and "meets" not in crit.reason
    assert crit.reason.startswith(
        "none of the 2 audited groups large enough to judge fails a subgroup minimum"
    )


@pytest.mark.parametrize(("lower", "shown"), [(0.69996, "0.69996"), (0.7004, "0.7004"), (0.75, "0.75")])
def test_a_calibration_bound_near_the_range_reads_on_its_side(lower, shown):
    m = {**_metrics(*_cohort()[:2]), "calibration_slope": {"value": 1.0, "lower": lower, "upper": 1.2}}
    slope = next(c for c in gate.minimum_criteria(m, CRITERIA) if c.name == "calibration_slope_in_range")
    assert slope.passed is (lower >= 0.7)
    assert f"(95% CI {shown} to 1.20)" in slope.reason


@pytest.mark.parametrize(
    ("events", "n", "judged", "passed"), [(150, 1000, True, True), (68, 976, False, False)]
)
def test_the_evaluation_asset_check_judges_the_auroc_minimum_as_the_gate_does(events, n, judged, passed):
    """eICU: 68 deaths in validation, AUROC 0.79 (0.735 to 0.84) against a minimum of 0.70. The gate says
    "not judged (too few outcomes to judge)"; the evaluation asset's check passed it. Both read the same
    rule now."""
    from clinical_ml.core.evaluation import MetricWithCI
    from clinical_ml.core.usecase import load_use_case
    from clinical_ml.core.validation import Evaluation
    from clinical_ml_tests.conftest import PROJECT_ROOT

    uc = load_use_case(PROJECT_ROOT / "usecases" / "eicu_mortality_24h.yaml")
    metrics = {
        "auroc": MetricWithCI(0.79, 0.735, 0.84),
        "sensitivity": MetricWithCI(0.76, 0.66, 0.86),
        "specificity": MetricWithCI(0.65, 0.61, 0.68),
        "brier": MetricWithCI(0.058, 0.047, 0.071),
        "calibration_slope": MetricWithCI(1.0, 0.8, 1.2),
        "calibration_intercept": MetricWithCI(0.0, -0.2, 0.2),
        "observed_expected_ratio": MetricWithCI(1.0, 0.8, 1.2),
    }
    ev = Evaluation("v1", 0.06, n, events, metrics, (), (), 200)
    crit = gate.auroc_minimum(ev, uc)
    assert (crit.judged, crit.passed) == (judged, passed)
    if judged:
        assert crit.reason == "AUROC lower 95% bound 0.735 meets the minimum 0.70"
    else:
        assert crit.reason.startswith("AUROC (minimum 0.70): not judged (too few outcomes to judge): too few")
        assert f"{events} deaths and {n - events} survivors" in crit.reason
