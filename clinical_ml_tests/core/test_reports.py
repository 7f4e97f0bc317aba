"""The fairness report and the report card: structure, self-containment, and inert hostile values."""

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
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
from clinical_ml.core.learning_curve import CurvePoint, LearningCurve
from clinical_ml.core.population_model import CandidateComparison, PopulationModelComparison
from clinical_ml.core.reports import fairness_report, report_card
from clinical_ml.core.row_accounting import privacy_by_group
from clinical_ml.core.usecase import parse_use_case

USECASE = Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml"
SCRIPT = "<script>alert('x')</script>"
IMG = '<img src=x onerror="alert(1)">'
FORMULA = '=HYPERLINK("http://evil.example/?leak","open")'
MD_LINK = "[click](http://evil.example)"
PAYLOADS = (SCRIPT, IMG, FORMULA, MD_LINK)
SECTIONS = (
    "intended-use",
    "data",
    "flow",
    "outcome",
    "predictors",
    "missing",
    "cohorts",
    "performance",
    "subgroups",
    "thresholds",
    "drivers",
    "out-of-range",
    "limitations",
    "decision",
)


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of the document."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def _use_case(hostile: bool):
    raw = yaml.safe_load(USECASE.read_text())
    if hostile:
        raw["title"] = f"Mortality {SCRIPT}"
        raw["clinical_question"] = f"Who? {IMG} {FORMULA}"
        raw["owner"] = MD_LINK
        raw["population"]["inclusion"] = FORMULA
    return parse_use_case(yaml.safe_dump(raw), source="test.yaml")


def _inputs(hostile: bool):
    rng = np.random.default_rng(0)
    n = 3000
    groups = np.array([SCRIPT, FORMULA, "White", IMG] if hostile else ["A", "B", "White", "C"], dtype=object)
    race = groups[rng.choice(4, n, p=[0.3, 0.3, 0.397, 0.003])]
    sex = rng.choice(["Female", "Male"], n)
    age = rng.choice(["18-44", "45-64", "65-79", "80+"], n)
    p = 1 / (1 + np.exp(-rng.normal(-2, 1.3, n)))
    y = (rng.random(n) < p).astype(int)
    attrs = {"sex": sex, "race_ethnicity": race, "age_band": age}
    analysis = subgroup_table(y, p, 0.15, attrs, n_boot=100)
    v, reasons = verdict(analysis)
    half = np.arange(n) < n // 2
    thresholds = group_thresholds(
        y[half],
        p[half],
        {a: x[half] for a, x in attrs.items()},
        y[~half],
        p[~half],
        {a: x[~half] for a, x in attrs.items()},
        threshold=0.15,
        policy="min_sensitivity",
        target=0.8,
        n_boot=20,
    )
    recs = threshold_recommendation(thresholds, policy="min_sensitivity", target=0.8)
    forests = {
        a.attribute: plots.subgroup_forest_plot(
            analysis.rows_of(a.attribute),
            metric="sensitivity",
            title=a.attribute,
            overall=analysis.overall.metrics["sensitivity"],
        )
        for a in analysis.attributes
        if not a.intersection
    }
    metrics = {k: m.as_dict() for k, m in bootstrap_metrics(y, p, 0.15, n_boot=30).items()}
    evaluation = {
        "threshold": 0.15,
        "n_validation": n,
        "events_validation": int(y.sum()),
        "metrics": metrics,
        "calibration_curve": calibration_curve(y, p),
        "decision_curve": decision_curve(y, p),
    }
    label = f"lactate {SCRIPT}" if hostile else "lactate"
    png = plots.calibration_plot(evaluation["calibration_curve"])
    return {
        "analysis": analysis,
        "verdict": v,
        "reasons": reasons,
        "thresholds": thresholds,
        "recommendations": recs,
        "forests": forests,
        "evaluation": evaluation,
        "summary": analysis_summary(analysis, v, reasons, thresholds, recs),
        "importance": [{"label": label, "mean_abs_shap": 0.2, "feature": "lactate__max_24h"}],
        "plots": {"roc": png, "calibration": png, "decision": png, "importance": png},
        "ranges": {f"{label}__max_24h": (0.5, 9.0), "sodium__last_24h": (128.0, 150.0)},
        "predictors": [label, "sodium"],
    }


def _render(hostile: bool) -> dict[str, str]:
    uc = _use_case(hostile)
    x = _inputs(hostile)
    decision = {"promoted": False, "reasons": [f"challenger {SCRIPT}" if hostile else "challenger ok"]}
    html_f, md_f = fairness_report(
        use_case=uc,
        analysis=x["analysis"],
        verdict=x["verdict"],
        reasons=x["reasons"],
        thresholds=x["thresholds"],
        recommendations=x["recommendations"],
        forest_plots=x["forests"],
        model_version=f"v1 {IMG}" if hostile else "v1",
        code_version="abc",
    )
    html_c, md_c = report_card(
        use_case=uc,
        evaluation=x["evaluation"],
        fairness=x["summary"],
        decision=decision,
        flow={
            "admissions": 3300,
            "excluded_under_age": 100,
            "excluded_stay_ended_before_prediction": 200,
            "excluded_missing_demographics": 0,
            "included": 3000,
        },
        fit={"n_train": 5000, "n_tuning": 1200, "events_train": 700, "events_tuning": 160},
        training_ranges=x["ranges"],
        importance=x["importance"],
        plots=x["plots"],
        forest_plots=x["forests"],
        data_periods=[("Validation cohort (test set)", ["2026Q1", FORMULA if hostile else "2026Q2"])],
        batch_ids=[f"b1{SCRIPT}" if hostile else "b1"],
        predictor_labels=x["predictors"],
        model_version=f"v1 {IMG}" if hostile else "v1",
        code_version="abc",
        privacy_groups=privacy_by_group(
            [
                {
                    "audited_groups": {
                        "race_ethnicity": {
                            f"Asian{SCRIPT}" if hostile else "Asian": {
                                "patients": 40,
                                "withheld": 2,
                                "race_not_released": 8,
                            },
                            "White": {"patients": 400, "withheld": 1, "race_not_released": 0},
                        }
                    }
                },
                # a later batch released 1 of the 2 Asian patients held back (and held back 1 White one)
                {
                    "audited_groups": {
                        "race_ethnicity": {
                            f"Asian{SCRIPT}" if hostile else "Asian": {
                                "patients": 0,
                                "withheld": 0,
                                "released_later": 1,
                            },
                            "White": {"patients": 0, "withheld": 1, "race_not_released": 0},
                        }
                    }
                },
            ]
        ),
        learning_curve=LearningCurve(
            tuple(
                CurvePoint(f, int(1000 * f), int(1000 * f), int(150 * f), (a, a - 0.03, a + 0.03), 1.0)
                for f, a in ((0.25, 0.78), (0.5, 0.81), (0.75, 0.83), (1.0, 0.85))
            ),
            400,
            60,
        ),
        population_model=PopulationModelComparison(
            "v1",
            "race_ethnicity",
            SCRIPT if hostile else "Black",
            "race and ethnicity = Black fails a subgroup minimum or calibration range in the subcohort analysis.",
            300,
            290,
            45,
            0.21,
            (
                CandidateComparison(
                    "separate",
                    700,
                    90,
                    60,
                    0.80,
                    0.78,
                    (-0.02, -0.06, 0.02),
                    1.5,
                    1.05,
                    (-0.45, -0.7, -0.2),
                    (0.35, 0.1, 0.5),
                ),
            ),
            0.975,
            200,
        ),
    )
    return {"fairness_html": html_f, "fairness_md": md_f, "card_html": html_c, "card_md": md_c}


def test_report_card_says_what_privacy_took_from_each_group_and_whether_more_data_would_help(plain):
    text = " ".join(_parse(plain["card_html"]).text)
    # Asian: 2 held back, 1 of them released later, and 8 outside their group of 40 = 22.5%, over the 5% limit;
    # White: 2 of 400 held back
    assert "What the privacy gate took from each audited group" in text
    assert "22.5%" in text and "0.5%" in text
    assert (
        "1 patient held back at their delivery was released with a later one and is counted as released"
        in text
    )
    assert "<td>race and ethnicity</td><td>Asian</td>" in plain["card_html"]  # the attribute in words
    assert 'class="verdict review">22.5%' in plain["card_html"]
    assert 'class="verdict review">0.5%' not in plain["card_html"]
    assert (
        "AUROC went from 0.830 with 75% of the derivation cohort (750 patients) to 0.850 with all of it (1,000): "
        "still rising, so more data of the same kind would likely help."
    ) in text


def test_report_card_says_whether_a_population_specific_model_helps(plain):
    text = " ".join(_parse(plain["card_html"]).text)
    assert "Would a population-specific model help?" in text
    assert (
        "A population-specific model is better beyond chance for race and ethnicity = Black: separate model "
        "(calibration)."
    ) in text
    assert (
        "Separate model: AUROC 0.780 vs 0.800 for the single model (difference -0.020, CI -0.060 to +0.020)"
        in text
    )
    assert "the fairness analysis recommends 0.210 for race and ethnicity = Black" in text
    assert "Judged on 300 validation admissions of 290 patients (45 outcome events)" in text


@pytest.fixture(scope="module")
def plain():
    return _render(hostile=False)


@pytest.fixture(scope="module")
def hostile():
    return _render(hostile=True)


def test_report_card_has_every_tripod_ai_section_and_the_key_facts(plain):
    doc = _parse(plain["card_html"])
    ids = {a.get("id") for _, a in doc.tags}
    assert set(SECTIONS) <= ids
    assert {"five-minutes", "promotion", "fairness-verdict"} <= ids
    text = " ".join(doc.text)
    for words in (
        "Derivation cohort",
        "training set",
        "Validation cohort",
        "test set",
        "AUROC",
        "suppressed",
    ):
        assert words in text
    # one table and one forest plot per single attribute; ROC, calibration, decision curve, SHAP
    assert sum(1 for t, a in doc.tags if t == "table" and "subgroups" in (a.get("class") or "")) == 3
    assert sum(1 for t, a in doc.tags if t == "img") == 3 + 4


@pytest.mark.parametrize("name", ["card_html", "fairness_html"])
def test_reports_are_self_contained(plain, name):
    doc = _parse(plain[name])
    for tag, attrs in doc.tags:
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:image/png;base64,")
        if tag == "a":
            assert (attrs.get("href") or "").startswith("#")
        assert tag not in ("script", "link", "iframe", "object")
    csp = next(a for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in (csp.get("content") or "")


def test_small_groups_are_shown_as_suppressed_with_their_size_hidden(plain):
    text = " ".join(_parse(plain["fairness_html"]).text)
    assert "< 11" in text
    assert "suppressed (fewer than 11 patients, deaths or survivors)" in text
    assert "suppressed" in plain["fairness_md"]


@pytest.mark.parametrize("name", ["card_html", "fairness_html"])
def test_script_and_formula_payloads_are_inert_in_html(hostile, plain, name):
    html = hostile[name]
    doc = _parse(html)
    # no element or attribute came from a payload: same tag vocabulary as the plain report
    assert {t for t, _ in doc.tags} == {t for t, _ in _parse(plain[name]).tags}
    for tag, attrs in doc.tags:
        assert tag != "script"
        assert not any(k.startswith("on") for k in attrs)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:")
        if tag == "a":
            assert "evil" not in (attrs.get("href") or "")
    text = "".join(doc.text)
    # the payloads are displayed as text, exactly as delivered
    assert SCRIPT in text
    assert FORMULA in text
    assert "&lt;script&gt;" in html


@pytest.mark.parametrize("name", ["card_md", "fairness_md"])
def test_payloads_are_inert_in_markdown(hostile, name):
    md = hostile[name]
    # every markup character of a value is backslash-escaped, so Markdown shows it as text
    assert re.search(r"(?<!\\)[<>]", md) is None
    assert re.search(r"(?<!\\)\]\(", md) is None
    assert "\\<script\\>" in md


def test_admission_periods_are_listed_when_few_and_given_as_a_range_when_many():
    from clinical_ml.core.reports import PERIODS_LISTED, periods_text

    assert periods_text(["2014Q3", "2015Q3"]) == "2014Q3, 2015Q3"
    assert periods_text([]) == "none"
    many = [f"{y}Q{q}" for y in range(2102, 2115) for q in (1, 3)]  # MIMIC: shifted over a century
    assert len(many) > PERIODS_LISTED
    assert periods_text(many) == f"2102Q1 to 2114Q3 ({len(many)} year-quarters with admissions)"
    assert periods_text(many[:PERIODS_LISTED]) == ", ".join(many[:PERIODS_LISTED])
