"""The promotion decision and the UI's metric values in words and rounded numbers."""

import math

import pytest

from clinical_ml.core.reports import ci_text, decision_in_words, rounded


def _criterion(reason: str, *, passed: bool) -> dict:
    return {"group": "minimums", "passed": passed, "reason": reason}


def test_a_refusal_names_only_the_parts_that_failed_and_the_champion_that_stays():
    decision = {
        "promoted": False,
        "challenger": "v2",
        "champion_before": "v1",
        "reasons": ["AUROC lower 95% bound 0.61 is below the minimum 0.70", "latency within the SLO"],
        "criteria": [
            _criterion("AUROC lower 95% bound 0.61 is below the minimum 0.70", passed=False),
            _criterion("latency within the SLO", passed=True),
        ],
    }
    words = decision_in_words(decision)
    assert words == (
        "Refused: challenger v2 is not promoted, because AUROC lower 95% bound 0.61 is below the minimum "
        "0.70. So the champion stays v1."
    )


def test_a_refusal_without_a_champion_says_there_is_none():
    words = decision_in_words(
        {"promoted": False, "challenger": "v1", "champion_before": None, "reasons": ["Brier too high."]}
    )
    assert words.endswith("because Brier too high. So there is still no champion.")


@pytest.mark.parametrize(
    ("before", "expected"),
    [("v1", "challenger v2 replaces v1"), (None, "challenger v2 becomes the first champion")],
)
def test_a_promotion_says_what_it_replaces(before, expected):
    words = decision_in_words({"promoted": True, "challenger": "v2", "champion_before": before})
    assert words.startswith("Promoted: ") and expected in words


@pytest.mark.parametrize(
    ("criteria", "reasons", "says", "never"),
    [
        # the gate judged every part and each passed
        ([True, True], ["AUROC meets the minimum"], "every part of the promotion gate passed", None),
        # a hand approval records no criteria: its reason is said, not a pass nobody judged
        (
            [],
            ["manual approval for the demo; the gate had refused it"],
            "manual approval for the demo",
            "passed",
        ),
        # a part failed and yet the model was promoted: never "every part passed"
        ([True, False], ["approved by hand"], "approved by hand", "every part"),
    ],
)
def test_a_promotion_says_the_gate_passed_only_when_it_judged_and_passed_every_part(
    criteria, reasons, says, never
):
    decision = {
        "promoted": True,
        "challenger": "v2",
        "champion_before": None,
        "reasons": reasons,
        "criteria": [_criterion(f"part {i}", passed=p) for i, p in enumerate(criteria)],
    }
    words = decision_in_words(decision)
    assert says in words
    assert never is None or never not in words


def test_rounded_keeps_three_decimals_and_leaves_missing_values_alone():
    assert rounded(0.8933541908462431) == 0.893
    assert rounded(12.3456, 2) == 12.35
    assert rounded(None) is None and math.isnan(rounded(float("nan")))


def test_ci_text_reads_value_then_interval_and_says_when_undefined():
    from clinical_ml.core.evaluation import MetricWithCI

    assert ci_text(MetricWithCI(0.8933, 0.8712, 0.9154)) == "0.893 (0.871 to 0.915)"
    assert ci_text(MetricWithCI(0.5, float("nan"), 0.7), digits=2) == "0.50 (n/a to 0.70)"
    assert ci_text(MetricWithCI(float("nan"), float("nan"), float("nan"))) == "n/a"


def test_a_refusal_names_the_judged_failures_not_the_parts_left_unjudged_because_of_them():
    decision = {
        "promoted": False,
        "challenger": "v2",
        "champion_before": "v1",
        "reasons": [],
        "criteria": [
            _criterion("too few outcomes to judge: 68 deaths, 100 needed", passed=False),
            {**_criterion("AUROC: not judged (too few outcomes to judge)", passed=False), "judged": False},
        ],
    }
    assert decision_in_words(decision) == (
        "Refused: challenger v2 is not promoted, because too few outcomes to judge: 68 deaths, 100 needed. "
        "So the champion stays v1."
    )
