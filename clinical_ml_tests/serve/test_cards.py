"""Cards say what the numbers beside them are."""

import pytest

from clinical_ml.core.scoring import ABSTAIN_MISSINGNESS, ABSTAIN_OUT_OF_RANGE, Score
from clinical_ml.serve.cards import (
    OVERRIDE_REASONS,
    clinical_action,
    guardrail_words,
    not_scored_card,
    percent,
    risk_band,
    scored_card,
)
from clinical_ml_tests.serve.conftest import use_case


@pytest.mark.parametrize(
    ("risk", "threshold", "indicator"),
    [
        (0.05, 0.1, "info"),
        (0.1, 0.1, "warning"),
        (0.19, 0.1, "warning"),
        (0.2, 0.1, "critical"),
        (0.9, 0.6, "warning"),
    ],
)
def test_band_follows_the_operating_threshold(risk: float, threshold: float, indicator: str) -> None:
    band = risk_band(risk, threshold)
    assert band.indicator == indicator
    # the words are true of the numbers
    assert ("at or above" in band.words) == (risk >= threshold)


def test_percent_never_rounds_to_a_certainty() -> None:
    assert [percent(p) for p in (0.001, 0.234, 0.999)] == ["<1%", "23%", ">99%"]


def test_clinical_action_is_the_use_cases_own() -> None:
    uc = use_case()
    stated = uc.operating_point.clinical_action
    assert stated and clinical_action(uc) == stated.rstrip(".") + "."
    unstated = uc.model_copy(
        update={"operating_point": uc.operating_point.model_copy(update={"clinical_action": None})}
    )
    assert clinical_action(unstated) == "The team can review goals of care and escalation early."


def test_scored_card_names_risk_band_reasons_action_version_and_report() -> None:
    uc = use_case()
    reasons = [
        {
            "feature": "lactate__max_24h",
            "value": 4.5,
            "text": "highest lactate (last 24 h) was 4.5, which raises the risk",
        }
    ]
    score = Score(risk=0.31, flagged=True, reasons=reasons)
    card = scored_card(uc, score, version="v1", threshold=0.12, report_url="http://x/reports/u/v1")
    assert card["indicator"] == "critical"  # 0.31 >= 2 x 0.12
    assert len(card["summary"]) < 140 and "31%" in card["summary"]
    assert "31%" in card["detail"] and "12%" in card["detail"] and "highest lactate" in card["detail"]
    assert clinical_action(uc)[:-1] in card["detail"] and "version v1" in card["detail"]
    assert card["links"][0]["url"] == "http://x/reports/u/v1" and card["links"][0]["type"] == "absolute"
    assert card["extension"]["clinical-ml-model-version"] == "v1"
    assert {c["code"] for c in card["overrideReasons"]} == set(OVERRIDE_REASONS)
    low = scored_card(uc, Score(risk=0.05, flagged=False), version="v1", threshold=0.12, report_url=None)
    assert low["indicator"] == "info" and "Suggested action" not in low["detail"] and "below" in low["detail"]


def test_guardrail_reasons_in_words() -> None:
    missing = Score(
        float("nan"), False, flags=["missing_fraction:0.78"], abstained=True, reason_code=ABSTAIN_MISSINGNESS
    )
    assert "78%" in guardrail_words(missing, max_out_of_range=3, max_missing_fraction=0.5)
    outside = Score(
        float("nan"),
        False,
        flags=[f"out_of_range:f{i}" for i in range(4)],
        abstained=True,
        reason_code=ABSTAIN_OUT_OF_RANGE,
    )
    assert guardrail_words(outside, max_out_of_range=3, max_missing_fraction=0.5).startswith("4 values")
    card = not_scored_card(use_case(), "reason", version="v1", report_url=None)
    assert card["summary"].endswith("not scored") and card["indicator"] == "info"
