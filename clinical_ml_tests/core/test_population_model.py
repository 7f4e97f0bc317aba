"""A population-specific model against the single model (issue #18 item 7): which group, the paired
patient-bootstrap comparison, and the sentences the report card prints."""

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.modeling import train_model
from clinical_ml.core.population_model import (
    CandidateComparison,
    PopulationModelComparison,
    _paired_replicates,
    choose_group,
    compare_population_model,
    population_model_markdown,
)

FEATURES = [f"f{i}" for i in range(4)]


def _frame(n: int, *, offset: float, seed: int) -> pl.DataFrame:
    """One row per patient; group A (about a third) has ``offset`` added to its true risk logit, which no
    predictor carries (as in the synthetic bias scenario)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    group = np.where(rng.random(n) < 0.35, "A", "B")
    logit = -2.0 + 1.2 * x[:, 0] + 0.6 * x[:, 1] + offset * (group == "A")
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    u = rng.random(n)
    split = np.where(u < 0.3, "held_out", np.where(u < 0.45, "tuning", "train"))
    t0 = datetime(2026, 1, 1)
    return pl.DataFrame(
        {
            "subject_id": np.arange(n, dtype=np.int64) + 10_000,
            "hadm_id": np.arange(n, dtype=np.int64) + 50_000,
            "prediction_time": [t0 + timedelta(hours=int(i)) for i in range(n)],
            "split": split,
            "boolean_value": y,
            "race_ethnicity": group,
            **{c: x[:, j] for j, c in enumerate(FEATURES)},
        }
    )


def _model(frame: pl.DataFrame):
    def xy(part: str):
        rows = frame.filter(pl.col("split") == part)
        return rows.select(FEATURES).to_numpy(), rows["boolean_value"].cast(pl.Int8).to_numpy()

    (x_tr, y_tr), (x_tu, y_tu) = xy("train"), xy("tuning")
    return train_model(x_tr, y_tr, x_tu, y_tu, feature_names=FEATURES, seed=3)


def _row(attribute, group, *, n=300, events=40, suppressed=False, flags=(), failures=()):
    return {
        "attribute": attribute,
        "group": group,
        "n": n,
        "events": events,
        "suppressed": suppressed,
        "flags": list(flags),
        "failures": list(failures),
        "intersection": False,
    }


def _fairness(*rows, thresholds=()):
    return {"rows": [_row("overall", "all", n=1000, events=150), *rows], "group_thresholds": list(thresholds)}


def _derivation(counts: dict[tuple[str, str], tuple[int, int]]) -> pl.DataFrame:
    """Derivation rows with the given (events, non-events) per (attribute, group); one attribute per row."""
    parts = []
    for (attribute, group), (events, non_events) in counts.items():
        parts.append(
            pl.DataFrame(
                {
                    "boolean_value": [True] * events + [False] * non_events,
                    attribute: [group] * (events + non_events),
                }
            )
        )
    return pl.concat(parts, how="diagonal")


ENOUGH = (30, 200)


def test_a_failing_group_is_chosen_before_a_flagged_one_and_the_rule_is_said():
    derivation = _derivation(
        {
            ("sex", "F"): ENOUGH,
            ("sex", "M"): ENOUGH,
            ("race_ethnicity", "Black"): ENOUGH,
            ("race_ethnicity", "White"): ENOUGH,
        }
    )
    fairness = _fairness(
        _row("sex", "F", events=90, flags=["AUROC lower than all patients"]),
        _row("race_ethnicity", "Black", events=20, flags=["O/E"], failures=["O/E above the range"]),
    )
    attribute, group, why = choose_group(
        fairness, derivation, attributes=["sex", "race_ethnicity"], min_cell_size=11
    )
    assert (attribute, group) == ("race_ethnicity", "Black")
    assert (
        why
        == "race and ethnicity = Black fails a subgroup minimum or calibration range in the subcohort analysis."
    )


def test_among_flagged_groups_the_one_with_most_events_and_a_group_too_small_to_fit_is_skipped_with_why():
    derivation = _derivation({("sex", "F"): (5, 200), ("sex", "M"): ENOUGH, ("age_band", "80+"): ENOUGH})
    fairness = _fairness(
        _row("sex", "F", events=90, flags=["x"]),  # most events, but only 5 in the derivation cohort
        _row("age_band", "80+", events=50, flags=["y"]),
        _row("sex", "M", events=40, flags=["z"]),
    )
    attribute, group, why = choose_group(
        fairness, derivation, attributes=["sex", "age_band"], min_cell_size=11
    )
    assert (attribute, group) == ("age_band", "80+")
    assert "the one with the most outcome events: 50" in why
    assert (
        "sex = F, also flagged, cannot be fitted on: fewer than 11 outcome events or non-events in the derivation"
        in why
    )


def test_without_a_flag_the_largest_group_with_enough_outcomes_and_never_unknown():
    derivation = _derivation(
        {
            ("sex", "F"): ENOUGH,
            ("sex", "M"): ENOUGH,
            ("race_ethnicity", "Unknown"): ENOUGH,
            ("race_ethnicity", "White"): ENOUGH,
        }
    )
    fairness = _fairness(
        _row("sex", "F", n=400),
        _row("sex", "M", n=500),
        _row("race_ethnicity", "Unknown", n=900),
        _row("race_ethnicity", "Asian", n=950, suppressed=True),
    )
    attribute, group, why = choose_group(
        fairness, derivation, attributes=["sex", "race_ethnicity"], min_cell_size=11
    )
    assert (attribute, group) == ("sex", "M")
    assert why.startswith("No audited group is flagged by the subcohort analysis, so the largest group")
    assert "(500 validation admissions)" in why
    none = choose_group(
        _fairness(_row("sex", "F", suppressed=True)), derivation, attributes=["sex"], min_cell_size=11
    )
    assert none[:2] == (None, None) and none[2].startswith("No audited group has enough outcomes")


def test_patients_are_resampled_with_all_their_admissions():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.2
    single, other = rng.random(200), rng.random(200)
    patients = np.arange(200)
    once = _paired_replicates(y, single, [other], patients, n_boot=50, seed=4)
    twice = _paired_replicates(
        np.repeat(y, 2),
        np.repeat(single, 2),
        [np.repeat(other, 2)],
        np.repeat(patients, 2),
        n_boot=50,
        seed=4,
    )
    # each patient's two identical rows are drawn together: the same statistics as one row per patient
    np.testing.assert_allclose(once, twice)
    same = _paired_replicates(y, single, [single], patients, n_boot=50, seed=4)
    assert np.all(same == 0)


@pytest.fixture(scope="module")
def biased() -> tuple[pl.DataFrame, object]:
    frame = _frame(5000, offset=1.4, seed=21)
    return frame, _model(frame)


def _fairness_of(frame: pl.DataFrame, flagged: str | None) -> dict:
    held = frame.filter(pl.col("split") == "held_out")
    rows = []
    for g in ("A", "B"):
        part = held.filter(pl.col("race_ethnicity") == g)
        rows.append(
            _row(
                "race_ethnicity",
                g,
                n=part.height,
                events=int(part["boolean_value"].sum()),
                flags=["O/E"] if g == flagged else [],
            )
        )
    return _fairness(
        *rows,
        thresholds=[
            {"attribute": "race_ethnicity", "group": "A", "suppressed": False, "threshold": 0.31},
        ],
    )


def _compare(frame, model, fairness):
    return compare_population_model(
        frame,
        model,
        fairness,
        attributes=["race_ethnicity"],
        min_cell_size=11,
        seed=5,
        n_boot=200,
        bootstrap_seed=9,
        model_version="v1",
    )


def test_a_group_whose_risk_no_predictor_carries_is_better_served_by_a_population_model(biased):
    frame, model = biased
    result = _compare(frame, model, _fairness_of(frame, "A"))
    assert (result.attribute, result.group) == ("race_ethnicity", "A")
    held = frame.filter((pl.col("split") == "held_out") & (pl.col("race_ethnicity") == "A"))
    assert result.validation_rows == held.height and result.validation_events == int(
        held["boolean_value"].sum()
    )
    assert result.group_threshold == 0.31
    assert [c.kind for c in result.candidates] == ["separate", "interaction"]
    assert result.level == pytest.approx(1 - 0.05 / 4)
    for c in result.candidates:
        assert c.oe_single > 1.3  # the single model under-predicts the group's deaths
        assert abs(np.log(c.oe_candidate)) < abs(np.log(c.oe_single))
        assert c.calibration_gain[1] > 0 and "calibration" in c.better()
        for est in (c.auroc_difference, c.oe_difference, c.calibration_gain):
            assert est[1] <= est[0] <= est[2]
    interaction = result.candidates[1]
    assert interaction.fitted_rows == frame.filter(pl.col("split") != "held_out").height
    assert result.candidates[0].fitted_rows < interaction.fitted_rows
    words = result.recommendation()
    assert words.startswith("A population-specific model is better beyond chance for race and ethnicity = A")
    assert "not deployed by this analysis" in words
    assert words in population_model_markdown(result)
    assert PopulationModelComparison.from_dict(result.as_dict()) == result
    # same inputs, same result (fits and bootstrap seeded), whatever order the rows come in
    again = _compare(frame.sample(fraction=1.0, shuffle=True, seed=1), model, _fairness_of(frame, "A"))
    assert again.as_dict() == result.as_dict()


def test_without_a_group_effect_there_is_no_evidence_that_a_separate_model_helps():
    frame = _frame(1500, offset=0.0, seed=22)
    model = _model(frame)
    result = _compare(frame, model, _fairness_of(frame, None))
    assert result.why.startswith("No audited group is flagged")
    assert not any(c.better() for c in result.candidates)
    assert result.recommendation().startswith("No evidence that a separate model helps race and ethnicity = ")
    # same inputs, same result (fits and bootstrap seeded), whatever order the rows come in
    again = _compare(frame.sample(fraction=1.0, shuffle=True, seed=1), model, _fairness_of(frame, None))
    assert again.as_dict() == result.as_dict()


def _candidate(auroc_ci, gain_ci, kind="separate"):
    return CandidateComparison(
        kind, 900, 120, 80, 0.80, 0.80 + auroc_ci[0], auroc_ci, 1.3, 1.1, (-0.2, -0.3, -0.1), gain_ci
    )


@pytest.mark.parametrize(
    ("auroc_ci", "gain_ci", "judged", "recommendation"),
    [
        (
            (0.01, -0.01, 0.03),
            (0.05, -0.02, 0.12),
            "neither better nor worse beyond chance in discrimination or calibration (the intervals of the AUROC "
            "difference and of the gain in calibration both cover 0).",
            "No evidence that a separate model helps sex = F: the intervals of the AUROC difference and of the gain "
            "in calibration all cover 0.",
        ),
        (
            (-0.04, -0.07, -0.01),
            (0.0, -0.05, 0.05),
            "worse beyond chance in discrimination; neither better nor worse beyond chance in calibration.",
            "No evidence that a separate model helps sex = F: the single model is better beyond chance in "
            "discrimination.",
        ),
        (
            (0.01, -0.01, 0.03),
            (0.15, 0.0004, 0.3),
            "better beyond chance in calibration; neither better nor worse beyond chance in discrimination.",
            "A population-specific model is better beyond chance for sex = F: separate model (calibration).",
        ),
        (
            (-0.04, -0.07, -0.01),
            (0.15, 0.05, 0.3),
            "better beyond chance in calibration but worse in discrimination.",
            "No clear gain for sex = F: the separate model is better beyond chance in calibration but worse in "
            "discrimination",
        ),
    ],
)
def test_the_sentences_say_what_the_intervals_show(auroc_ci, gain_ci, judged, recommendation):
    c = _candidate(auroc_ci, gain_ci)
    assert c.sentence().endswith(judged)
    result = PopulationModelComparison("v1", "sex", "F", "why", 300, 290, 40, None, (c,), 0.975, 200)
    assert result.recommendation().startswith(recommendation)
    if gain_ci[1] == 0.0004:  # a bound that rounds to 0 at three digits still shows its sign
        assert "CI +0.0004 to +0.300" in c.sentence()


def test_a_group_name_is_shown_as_text_in_markdown():
    from clinical_ml.core.reports import md_escape

    c = _candidate((0.01, -0.01, 0.03), (0.05, -0.02, 0.12))
    result = PopulationModelComparison(
        "v1", "sex", "<script>x</script>", "why <b>", 300, 290, 40, 0.2, (c,), 0.975, 200
    )
    md = population_model_markdown(result, escape=md_escape)
    assert "<" not in md.replace("\\<", "")
    assert "sex = \\<script\\>x\\</script\\>" in md
    empty = PopulationModelComparison("v1", None, None, "No audited group has enough outcomes.")
    assert population_model_markdown(empty) == (
        "**Would a population-specific model help?** No audited group has enough outcomes.\n\n"
    )
