"""The Model Facts label: six sections, each sentence true for the numbers it is built from."""

from pathlib import Path

import pytest

from clinical_ml.core.model_facts import model_facts, model_facts_html, model_facts_markdown
from clinical_ml.core.usecase import load_use_case

USECASE = Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml"
ACTION = "Senior review of the treatment plan and goals of care with the ICU team within 12 h"


def _m(value: float, lower: float, upper: float) -> dict:
    return {"value": value, "lower": lower, "upper": upper}


EVALUATION = {
    "threshold": 0.1234,
    "n_validation": 400,
    "events_validation": 60,
    "metrics": {
        "auroc": _m(0.861, 0.82, 0.9),
        "sensitivity": _m(0.783, 0.69, 0.87),
        "specificity": _m(0.771, 0.73, 0.8),
        "ppv": _m(0.404, 0.32, 0.46),
        "npv": _m(0.95, 0.92, 0.97),
        "observed_expected_ratio": _m(1.16, 0.98, 1.38),
        "calibration_slope": _m(0.87, 0.72, 1.1),
    },
    "alert_burden": {"number_needed_to_evaluate": _m(2.48, 2.2, 3.1)},
}
FIT = {"n_train": 700, "n_tuning": 200, "events_train": 110, "events_tuning": 30, "best_iteration": 78}
IMPORTANCE = [{"label": f"predictor {i}", "mean_abs_shap": 1 / (i + 1)} for i in range(8)]


def _facts(*, promoted: bool = True, action: str | None = ACTION, owner: str = "icu-ml-team", verdict="pass"):
    uc = load_use_case(USECASE)
    op = uc.operating_point.model_copy(update={"clinical_action": action})
    uc = uc.model_copy(update={"operating_point": op, "owner": owner})
    decision = {
        "promoted": promoted,
        "challenger": "v2",
        "champion_before": "v1",
        "reasons": ["AUROC lower 95% bound 0.61 is below the minimum 0.70"],
        "criteria": [
            {
                "group": "minimums",
                "passed": promoted,
                "reason": "AUROC lower 95% bound 0.61 is below the minimum 0.70",
            }
        ],
        "at": "2026-12-06T09:13:31.123456+00:00",
    }
    facts = model_facts(
        use_case=uc,
        evaluation=EVALUATION,
        fairness_verdict=verdict,
        fairness_reasons=["every audited group meets the subgroup minimums."],
        decision=decision,
        fit=FIT,
        importance=IMPORTANCE,
        n_predictors=118,
        batch_ids=["2026-01-05", "2026-01-06", "2026-01-07"],
        model_version="v2",
        code_version="abc123",
        report_card_file="report_card_v2.html",
    )
    return uc, facts


def test_the_numbers_in_the_sentences_are_the_numbers_given():
    _, facts = _facts()
    text = " ".join([*facts.summary, *facts.mechanism, *facts.performance_notes, *facts.uses])
    assert "a patient at or above 0.123 is flagged" in text
    assert "LightGBM, 78 trees) over 118 inputs" in text
    assert "Derived from 900 admissions with 140 deaths (batches 2026-01-05 to 2026-01-07)" in text
    assert (
        "predictor 0, predictor 1, predictor 2, predictor 3, predictor 4." in text
        and "predictor 5" not in text
    )
    assert "Validated on 400 admissions with 60 deaths" in text
    # 0.783 -> 78 of 100 flagged; 1 - 0.771 -> 23 of 100 survivors flagged; 0.404 -> 40 of 100 flagged died
    assert "about 78 are flagged" in text and "about 23 are flagged too" in text and "about 40 are" in text
    assert "about 22 of every 100 patients who died are not flagged" in text
    assert "about 2.5 flagged patients are reviewed" in text
    assert dict(facts.performance)["AUROC (discrimination)"] == "0.86 (95% CI 0.82 to 0.90)"
    assert (
        dict(facts.performance)["Observed / expected (calibration in the large)"]
        == "1.16 (95% CI 0.98 to 1.38)"
    )


@pytest.mark.parametrize("action", [ACTION, None])
def test_uses_and_directions_state_the_action_at_the_threshold_or_that_none_is_stated(action):
    _, facts = _facts(action=action)
    if action:
        assert facts.uses[0] == f"At a risk of 0.123 or more: {ACTION}."
    else:
        assert "states no action for a flagged patient" in facts.uses[0]


def test_a_refused_version_warns_first_that_it_is_not_in_use_and_a_promoted_one_does_not():
    _, refused = _facts(promoted=False)
    assert refused.warnings[0] == (
        "This version is not in use: the promotion gate refused it (AUROC lower 95% bound 0.61 is below the "
        "minimum 0.70); the champion stays v1."
    )
    assert dict(refused.other)["Promotion decision"] == "refused"
    _, promoted = _facts(promoted=True)
    assert not any("not in use" in w for w in promoted.warnings)
    assert promoted.warnings[0].startswith("Not for: ")
    assert any(w.startswith("Subgroups: PASS: every audited group") for w in promoted.warnings)


def test_the_page_has_the_six_sections_and_escapes_every_value():
    uc, facts = _facts(owner="<script>alert(1)</script>")
    html = model_facts_html(facts, use_case=uc, code_version="abc123")
    for section in ("summary", "mechanism", "validation-and-performance", "uses-and-directions", "warnings"):
        assert f'id="{section}"' in html
    assert 'id="other-information"' in html and "Sendak" in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    md = model_facts_markdown(facts)
    for name in ("Summary", "Mechanism", "Validation and performance", "Uses and directions", "Warnings"):
        assert f"**{name}**" in md
