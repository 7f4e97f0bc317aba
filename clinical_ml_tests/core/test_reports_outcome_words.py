"""Every report names the use case's outcome: a 30-day readmission model is reported with readmissions
(never deaths or survivors), the mortality model still with deaths and survivors; the alert burden is shown
in plain words whether or not the use case limits it, and a gate part with nothing to judge reads
"not judged"."""

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from clinical_ml.core import plots
from clinical_ml.core.evaluation import bootstrap_metrics, calibration_curve, decision_curve
from clinical_ml.core.fairness import (
    analysis_summary,
    group_thresholds,
    subgroup_table,
    threshold_recommendation,
    verdict,
)
from clinical_ml.core.gate import operational_criteria
from clinical_ml.core.reports import (
    evaluation_markdown,
    fairness_report,
    performance_report,
    report_card,
    sensitivity_forest_plots,
)
from clinical_ml.core.usecase import UseCase, parse_use_case
from clinical_ml.core.validation import validation_alert_burden

USECASE = Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml"
DEATH_WORDS = re.compile(r"death|died|dying|surviv|mortality", re.IGNORECASE)


def readmission_use_case(**success_criteria: float) -> UseCase:
    """The shipped mortality use case asked as a 30-day readmission question at discharge; its own texts
    (title, question, exclusion) are the file's, so they are rewritten too."""
    raw = yaml.safe_load(USECASE.read_text())
    raw["name"] = "readmission_30d"
    raw["title"] = "Readmission within 30 days of discharge"
    raw["clinical_question"] = "Who is at high risk of coming back within 30 days of going home?"
    raw["population"]["exclusion"] = "Stays ending in a transfer to another hospital."
    raw["outcome"] = {
        "type": "readmission",
        "within_days": 30,
        "description": "A new admission within 30 days after discharge.",
    }
    raw["prediction_time"] = {"anchor": "discharge"}
    raw["success_criteria"].update(success_criteria)
    return parse_use_case(yaml.safe_dump(raw), source="readmission.yaml")


def mortality_use_case() -> UseCase:
    return parse_use_case(USECASE.read_text(), source=str(USECASE))


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_data(self, data):
        self.parts.append(data)


def text_of(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    return re.sub(r"\s+", " ", " ".join(parser.parts))


def _predictions(n: int = 2400, seed: int = 0) -> pl.DataFrame:
    """Validation rows with stays (one prediction per stay), and a group whose outcome is under-predicted
    (so a subgroup flag speaks of the outcome)."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-rng.normal(-2, 1.2, n)))
    race = rng.choice(["A", "B", "C"], n, p=[0.4, 0.4, 0.2])
    truth = np.where(race == "C", np.minimum(1, 2.5 * p), p)
    y = rng.random(n) < truth
    start = pl.datetime(2026, 1, 5) + pl.duration(hours=pl.int_range(0, n) * 7)
    return pl.DataFrame(
        {
            "subject_id": np.arange(n) // 2,
            "hadm_id": np.arange(n),
            "label": y,
            "risk": p,
            "sex": rng.choice(["Female", "Male"], n),
            "race_ethnicity": race,
            "age_band": rng.choice(["18-44", "45-64", "65-79", "80+"], n),
            "unit": rng.choice(["MICU", "SICU", "CCU"], n),
        }
    ).with_columns(
        start.alias("prediction_time"),
        (start + pl.duration(hours=36)).alias("discharge_time"),
        pl.lit(None, dtype=pl.Datetime("us")).alias("death_time"),
    )


def _render(
    uc: UseCase, *, decision_criteria: list[dict] | None = None, deliveries: list[dict] | None = None
) -> dict[str, str]:
    frame = _predictions()
    y, p = frame["label"].cast(pl.Int8).to_numpy(), frame["risk"].to_numpy()
    threshold = 0.15
    attrs = {a: frame[a].to_numpy() for a in ("sex", "race_ethnicity", "age_band")}
    analysis = subgroup_table(y, p, threshold, attrs, n_boot=100, words=uc.words)
    v, reasons = verdict(analysis)
    half = np.arange(len(y)) < len(y) // 2
    thresholds = group_thresholds(
        y[half],
        p[half],
        {a: x[half] for a, x in attrs.items()},
        y[~half],
        p[~half],
        {a: x[~half] for a, x in attrs.items()},
        threshold=threshold,
        policy="min_sensitivity",
        target=0.8,
        n_boot=20,
    )
    recs = threshold_recommendation(thresholds, policy="min_sensitivity", target=0.8)
    forests = sensitivity_forest_plots(analysis, minimum=0.6)
    burden = validation_alert_burden(
        frame,
        frame,
        threshold=threshold,
        one_day_per_stay=uc.prediction_time.anchor == "discharge",
        n_boot=50,
        seed=0,
    )
    evaluation = {
        "threshold": threshold,
        "n_validation": len(y),
        "events_validation": int(y.sum()),
        "metrics": {k: m.as_dict() for k, m in bootstrap_metrics(y, p, threshold, n_boot=30).items()},
        "calibration_curve": calibration_curve(y, p),
        "decision_curve": decision_curve(y, p),
        "n_bootstrap": 50,
        "alert_burden": burden.as_dict(),
    }
    png = plots.calibration_plot(evaluation["calibration_curve"], words=uc.words)
    criteria = decision_criteria or [
        c.as_dict() for c in operational_criteria(burden, uc.success_criteria.model_dump(), words=uc.words)
    ]
    decision = {
        "promoted": False,
        "reasons": [c["reason"] for c in criteria] or ["challenger ok"],
        "criteria": criteria,
    }
    flow = {"admissions": 2600, "steps": [["under 18 years", 200]], "included": 2400, "predictions": 2400}
    fit = {"n_train": 5000, "n_tuning": 1200, "events_train": 700, "events_tuning": 160}
    plot_set = {"roc": png, "calibration": png, "decision": png, "importance": png}
    importance = [{"label": "lactate", "mean_abs_shap": 0.2, "feature": "lactate__max_24h"}]
    perf_html, perf_md = performance_report(
        use_case=uc,
        evaluation=evaluation,
        plots=plot_set,
        importance=importance,
        decision=decision,
        flow=flow,
        fit=fit,
        model_version="v1",
        code_version="abc",
    )
    fair_html, fair_md = fairness_report(
        use_case=uc,
        analysis=analysis,
        verdict=v,
        reasons=reasons,
        thresholds=thresholds,
        recommendations=recs,
        forest_plots=forests,
        model_version="v1",
        code_version="abc",
    )
    card_html, card_md = report_card(
        use_case=uc,
        evaluation=evaluation,
        fairness=analysis_summary(analysis, v, reasons, thresholds, recs),
        decision=decision,
        flow=flow,
        fit=fit,
        training_ranges={"lactate__max_24h": (0.5, 9.0)},
        importance=importance,
        plots=plot_set,
        forest_plots=forests,
        data_periods=[("Validation cohort (test set)", ["2026Q1"])],
        batch_ids=["b1"],
        predictor_labels=["lactate"],
        model_version="v1",
        code_version="abc",
        deliveries=DELIVERIES if deliveries is None else deliveries,
    )
    return {
        "performance": text_of(perf_html),
        "performance_md": perf_md,
        "fairness": text_of(fair_html),
        "fairness_md": fair_md,
        "card": text_of(card_html),
        "card_md": card_md,
        "evaluation_md": evaluation_markdown(evaluation, {}, words=uc.words),
    }


DELIVERIES = [
    {
        "batch_id": "2026-01-05",
        "delivered": 627,
        "accepted": 620,
        "rejected": 7,
        "reasons": "5 unknown_patient, 2 future_date:admit_time",
        "withheld": 4,
        "released": 616,
        "in_cohort": 402,
        "released_later": 3,
        "held_back": True,
    },
    {
        "batch_id": "2026-01-19",
        "delivered": 30,
        "accepted": 30,
        "rejected": 0,
        "reasons": "",
        "withheld": None,
        "released": 0,
        "in_cohort": 0,
    },
]


def test_the_report_card_follows_each_delivery_from_export_to_cohort(readmission):
    card = readmission["card"]
    assert (
        "2026-01-05 627 620 7 (5 unknown_patient, 2 future_date:admit_time) 4 616 (3 with a later delivery) 402"
        in card
    )
    assert "releases them with a later delivery once enough patients alike have been released" in card
    per_batch = _render(
        readmission_use_case(),
        deliveries=[{**d, "held_back": False, "released_later": 0} for d in DELIVERIES],
    )["card"]
    assert (
        "the privacy gate withholds the admissions" in per_batch and "with a later delivery" not in per_batch
    )
    assert "2026-01-19 30 30 0 the whole batch 0 0" in card


@pytest.fixture(scope="module")
def readmission():
    return _render(readmission_use_case(number_needed_to_evaluate_max=50.0))


@pytest.fixture(scope="module")
def mortality():
    return _render(mortality_use_case())


@pytest.mark.parametrize(
    "part", ["performance", "performance_md", "fairness", "fairness_md", "card", "card_md", "evaluation_md"]
)
def test_a_readmission_model_is_never_reported_with_deaths_or_survivors(readmission, part):
    text = readmission[part]
    assert DEATH_WORDS.search(text) is None, DEATH_WORDS.search(text)
    assert "readmission" in text.lower()


def test_the_readmission_sentences_name_readmissions(readmission):
    perf, card, fair = readmission["performance"], readmission["card"], readmission["fairness"]
    assert "the model separates patients who were readmitted from patients who were not readmitted" in perf
    assert "of the patients who were readmitted and" in perf
    assert "at least 80% of readmissions are flagged" in perf
    assert "Observed / expected readmissions" in perf
    assert "share of patients who were readmitted that the model flagged" in perf
    assert re.search(r"\d+ readmissions\), of which", perf)
    assert re.search(
        r"ranks one of the patients who were readmitted above one of the patients who were not", card
    )
    assert "% of readmissions and" in card and "% of patients not readmitted" in card
    assert "Readmissions" in card  # the cohort and subgroup tables' column
    # (text_of puts a space where a tag ends: "<strong>readmission</strong>," reads "readmission ,")
    assert re.search(
        r"estimates the risk of readmission ?, asked at hospital discharge: A new admission within 30 days",
        card,
    )
    assert "values from up to 24 hours before the prediction time" in card
    assert re.search(r"All patients: 2400 admissions, \d+ readmissions", fair)
    assert "fewer than 11 patients, readmissions or patients not readmitted" in fair
    assert "more readmissions than predicted" in fair  # the under-predicted group's flag
    assert re.search(
        r"Validation cohort \(test set\): 2400 admissions, \d+ readmissions\.", readmission["card_md"]
    )


def test_the_markdown_summaries_state_the_decision_and_the_verdict(readmission):
    assert "**Promotion:** not promoted" in readmission["performance_md"]
    assert re.search(
        r"\*\*Promotion:\*\* not promoted\. \*\*Subcohorts:\*\* (PASS|REVIEW|FAIL)", readmission["card_md"]
    )
    for part in ("performance_md", "card_md"):
        assert "{" not in readmission[part]  # no f-string left unformatted


def test_the_mortality_reports_still_speak_of_deaths_and_survivors(mortality):
    perf, card, fair = mortality["performance"], mortality["card"], mortality["fairness"]
    assert "the model separates patients who died from patients who survived" in perf
    assert "at least 80% of deaths are flagged" in perf
    assert "Observed / expected deaths" in perf
    assert "share of survivors the model did not flag" in perf
    assert "% of deaths and" in card and "% of survivors" in card
    assert "fewer than 11 patients, deaths or survivors" in fair
    assert "more deaths than predicted" in fair
    assert re.search(r"\d+ deaths\.", mortality["performance_md"])


def test_the_alert_burden_is_shown_in_plain_words_even_without_a_limit(mortality, readmission):
    for rendered in (mortality, readmission):
        for part in ("performance", "card", "performance_md", "card_md", "evaluation_md"):
            text = rendered[part].replace("\\", "")  # Markdown escapes parentheses
            assert re.search(
                r"About [\d.,]+ alerts per 100 patient-days \(95% CI [\d.,]+ to [\d.,]+\)", text
            ), part
            assert "alerts per unit per day" in text
            assert "A unit-day is one unit" in text
    assert "The use case sets no maximum on the alert burden" in mortality["performance"]
    assert "none set" in mortality["card"]
    assert "at most 50 (upper bound)" in readmission["performance"]
    assert (
        "A maximum of the use case is met when the upper end of its interval is at or below it"
        in (readmission["card"])
    )
    # asked at discharge: one patient-day per stay, and the NNE in the outcome's words
    assert "Patient-days at risk: one day per stay (2400 stays)" in readmission["performance"]
    assert re.search(
        r"For every [\d.]+ patients flagged, one is among the patients who were readmitted",
        readmission["card"],
    )
    assert re.search(
        r"For every [\d.]+ patients flagged, one is among the patients who died", mortality["card"]
    )


def test_a_gate_part_with_nothing_to_judge_reads_not_judged_in_the_report():
    uc = readmission_use_case(alerts_per_unit_day_max=2.0)
    criteria = [
        c.as_dict() for c in operational_criteria(None, uc.success_criteria.model_dump(), words=uc.words)
    ]
    assert criteria and not criteria[0]["judged"]
    perf = _render(uc, decision_criteria=criteria)["performance"]
    row = perf[perf.index("Part of the promotion gate") :]
    assert "minimums not judged alerts per unit per day: not judged" in row
    assert "minimums pass" not in row


def test_plot_axes_name_the_outcome(monkeypatch):
    labels: list[str] = []

    def keep(fig) -> bytes:
        labels.extend(label for ax in fig.axes for label in (ax.get_xlabel(), ax.get_ylabel()))
        return b""

    monkeypatch.setattr(plots, "_png", keep)
    uc = readmission_use_case()
    y, p = np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6])
    plots.roc_plot(y, p, threshold=0.5, words=uc.words)
    plots.calibration_plot(calibration_curve(y, p, n_bins=2), words=uc.words)
    assert labels == [
        "1 - specificity (false alarms among patients not readmitted)",
        "sensitivity (readmissions flagged)",
        "predicted risk of readmission",
        "observed proportion of patients who were readmitted",
    ]
    labels.clear()
    plots.roc_plot(y, p, threshold=0.5)  # without a use case: the mortality question's words
    assert labels == ["1 - specificity (false alarms among survivors)", "sensitivity (deaths flagged)"]
