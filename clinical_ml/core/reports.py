"""HTML reports for healthcare professionals and their Markdown summaries.

Jinja2 renders with autoescaping on for every template, so a value that came from a delivered file
(a unit name, a site code) can never become markup in a report.
"""

import base64
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from clinical_ml.core import plots
from clinical_ml.core.display_names import attribute_title, display_name_and_unit
from clinical_ml.core.drift import FeatureDrift
from clinical_ml.core.drift_statistics import DriftStatistic, DriftThresholds
from clinical_ml.core.evaluation import ALERT_BURDEN_LIMITS, AlertBurden, MetricWithCI
from clinical_ml.core.features import DESIGN_NOT_RECORDED
from clinical_ml.core.glossary import glossary_for
from clinical_ml.core.labeling import CohortFlow
from clinical_ml.core.learning_curve import LearningCurve
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.population_model import PopulationModelComparison, population_model_view
from clinical_ml.core.row_accounting import PRIVACY_LOSS_LIMIT
from clinical_ml.core.usecase import OutcomeWords, UseCase

_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
    undefined=StrictUndefined,
)
PERIODS_LISTED = 8  # more year-quarters than this are given as a range


def periods_text(periods: Sequence[str]) -> str:
    """A cohort's admission periods in words: listed when few, else the first to the last and how many
    (MIMIC's dates are shifted per patient over a century: 48 year-quarters listed one by one say nothing)."""
    if not periods:
        return "none"
    if len(periods) <= PERIODS_LISTED:
        return ", ".join(periods)
    return f"{periods[0]} to {periods[-1]} ({len(periods)} year-quarters with admissions)"


_ENV.filters["periods_text"] = periods_text
_ENV.filters["attribute_title"] = attribute_title


def metric_meanings(words: OutcomeWords) -> dict[str, tuple[str, str]]:
    """Each validation metric's name and what it means at the bedside, in the outcome's words."""
    return {
        "auroc": (
            "AUROC",
            f"chance that one of the {words.with_event} was ranked above one of the {words.without_event}",
        ),
        "auprc": ("AUPRC", f"average precision across thresholds (compare with the {words.event} rate)"),
        "sensitivity": ("Sensitivity", f"share of {words.with_event} that the model flagged"),
        "specificity": ("Specificity", f"share of {words.non_events} the model did not flag"),
        "ppv": ("Positive predictive value", f"among flagged patients, the share of {words.with_event}"),
        "npv": ("Negative predictive value", f"among unflagged patients, the share of {words.without_event}"),
        "brier": ("Brier score", "mean squared error of predicted risk (lower is better)"),
        "calibration_slope": ("Calibration slope", "1 is ideal; below 1 means predictions too extreme"),
        "calibration_intercept": (
            "Calibration intercept",
            "0 is ideal; above 0 means risk underestimated overall",
        ),
        "observed_expected_ratio": (
            f"Observed / expected {words.events}",
            f"1 is ideal; above 1 means more {words.events} than predicted",
        ),
    }


# The mortality question's meanings (deaths, survivors); reports take theirs from the use case.
METRIC_MEANINGS = metric_meanings(plots.DEFAULT_WORDS)


def sentence_case(text: str) -> str:
    """``text`` with its first letter capitalized and the rest untouched (``"LDL events"`` stays)."""
    return text[:1].upper() + text[1:]


def _words_context(words: OutcomeWords) -> dict[str, object]:
    """What every report template needs to name the outcome."""
    return {"words": words, "events_heading": sentence_case(words.events)}


# --- alert burden -------------------------------------------------------------------------------------


def _num(x: float) -> str:
    """A rate in plain figures: two significant digits, whole numbers from 100 on."""
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.2g}"


def _one_decimal(x: float) -> str:
    return f"{x:.1f}"


def _ci_words(m: MetricWithCI, fmt: Callable[[float], str] = _num) -> str:
    if math.isnan(m.lower) or math.isnan(m.upper):
        return "no 95% CI could be computed"
    if math.isinf(m.upper):
        return f"95% CI {fmt(m.lower)} to no upper limit"
    return f"95% CI {fmt(m.lower)} to {fmt(m.upper)}"


def _value_with_ci(m: MetricWithCI | None, *, undefined: str = "n/a") -> str:
    if m is None:
        return undefined
    if math.isinf(m.value):
        return "no finite value"
    if math.isnan(m.lower) or math.isnan(m.upper):
        return f"{m.value:.2f} (no interval)"
    upper = "no upper limit" if math.isinf(m.upper) else f"{m.upper:.2f}"
    return f"{m.value:.2f} ({m.lower:.2f} to {upper})"


def _days(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _burden_parts(burden: AlertBurden | None, words: OutcomeWords) -> dict[str, str]:
    """The alert burden's sentences by role, in reading order: ``rate`` (alerts per 100 patient-days, or
    why there is none), ``days`` (its denominator), ``unit`` and ``unit_days`` (alerts per unit per day and
    its denominator), ``nne`` (number needed to evaluate)."""
    if burden is None:
        return {"rate": "The alert burden was not measured for this evaluation."}
    parts: dict[str, str] = {}
    rate = burden.alerts_per_100_patient_days
    if not burden.judged:
        parts["rate"] = (
            f"No prediction of the validation cohort was flagged at the operating point: 0 alerts over "
            f"{_days(burden.patient_days)} patient-days at risk, so there is no alert burden to judge."
        )
    elif rate is None:
        parts["rate"] = (
            f"{burden.alerts} alerts; alerts per 100 patient-days cannot be computed (the validation stays hold "
            "no time at risk)."
        )
    else:
        parts["rate"] = (
            f"About {_num(rate.value)} alerts per 100 patient-days ({_ci_words(rate)}): {burden.alerts} alerts "
            f"over {_days(burden.patient_days)} patient-days at risk."
        )
    if burden.one_day_per_stay:
        parts["days"] = (
            f"Patient-days at risk: one day per stay ({burden.stays} stays), since the prediction is made at "
            "hospital discharge, with no time in hospital after it."
        )
    else:
        ends = (
            f"discharge, or death for {burden.stays_ending_in_death} of them"
            if burden.stays_ending_in_death
            else "discharge"
        )
        parts["days"] = (
            f"Patient-days at risk: for each of the {burden.stays} stays, the time from its first prediction to "
            f"the end of the stay ({ends})."
        )
    if not burden.judged:
        return parts
    unit = burden.alerts_per_unit_day
    if unit is not None:
        parts["unit"] = (
            f"About {_num(unit.value)} alerts per unit per day ({_ci_words(unit)}): {burden.alerts} alerts over "
            f"{burden.unit_days} unit-days."
        )
        parts["unit_days"] = (
            "A unit-day is one unit (the unit recorded for the stay) on one day on which at least one of its "
            "stays had a prediction in the validation cohort. Dates are shifted per patient for "
            "de-identification, so the day of a prediction is taken as its batch's delivery date plus the time "
            "since the stay's admission: in a batch that covers several days, predictions made on one ward day "
            "can fall on different days here and others together, so the count of unit-days, and this rate, "
            "can differ from the ward's in either direction."
        )
    elif burden.undated_rows:
        parts["unit"] = (
            f"Alerts per unit per day are not computed: for {burden.undated_rows} of the "
            f"{burden.prediction_rows} prediction rows the day on the ward is not known (their batch is not a "
            "dated delivery, and the dates in these data are shifted or synthetic)."
        )
    nne = burden.number_needed_to_evaluate
    flagged = "patients flagged" if burden.one_row_per_stay else "alerts"
    if nne is None or burden.true_alerts == 0:
        parts["nne"] = (
            f"None of the {burden.alerts} patients flagged is among the {words.with_event}: the number needed "
            "to evaluate has no finite value."
            if burden.one_row_per_stay
            else f"None of the {burden.alerts} alerts was followed by the outcome ({words.event}) in its window: "
            "the number needed to evaluate has no finite value."
        )
    else:
        whom = (
            f"one is among the {words.with_event}"
            if burden.one_row_per_stay
            else f"one is followed by the outcome ({words.event}) in its window"
        )
        parts["nne"] = (
            f"For every {_num(nne.value)} {flagged}, {whom} (number needed to evaluate {nne.value:.1f}, "
            f"{_ci_words(nne, _one_decimal)}; {burden.true_alerts} of {burden.alerts} {flagged})."
        )
    return parts


def alert_burden_sentences(burden: AlertBurden | None, words: OutcomeWords) -> list[str]:
    """The alert burden in plain words, each sentence with the figures it rests on.

    Parameters
    ----------
    burden
        ``Evaluation.alert_burden``; None for an evaluation written before the burden was measured.
    words
        The outcome's words.
    """
    return list(_burden_parts(burden, words).values())


def alert_burden_headline(burden: AlertBurden | None, words: OutcomeWords) -> str:
    """The burden in one or two sentences: alerts per 100 patient-days and the number needed to evaluate."""
    parts = _burden_parts(burden, words)
    return " ".join(parts[k] for k in ("rate", "nne") if k in parts)


def alert_burden_rows(burden: AlertBurden | None, use_case: UseCase) -> list[dict[str, str]]:
    """Table rows of the alert burden: measure, meaning, value (95% CI) and the use case's maximum."""
    words, crit = use_case.words, use_case.success_criteria.model_dump()
    per_stay = burden is None or burden.one_row_per_stay
    meanings = {
        "alerts_per_100_patient_days": (
            "Alerts per 100 patient-days",
            "flagged predictions per 100 days at risk (one day per stay when predicted at discharge)",
        ),
        "alerts_per_unit_day": ("Alerts per unit per day", "flagged predictions per unit-day (see below)"),
        "number_needed_to_evaluate": (
            "Number needed to evaluate",
            f"{'patients flagged' if per_stay else 'alerts'} for each one among the {words.with_event} "
            "(1 / positive predictive value)",
        ),
    }
    rows = []
    for metric, key, _ in ALERT_BURDEN_LIMITS:
        name, meaning = meanings[metric]
        estimate = None if burden is None else getattr(burden, metric)
        undefined = "n/a (nothing flagged)" if burden is not None and not burden.judged else "n/a"
        if burden is not None and burden.judged and metric == "alerts_per_unit_day" and burden.undated_rows:
            undefined = "n/a (the days on the ward are not known)"
        limit = crit.get(key)
        rows.append(
            {
                "name": name,
                "meaning": meaning,
                "value": _value_with_ci(estimate, undefined=undefined),
                "maximum": f"at most {limit:g} (upper bound)" if limit is not None else "none set",
            }
        )
    return rows


def alert_burden_context(evaluation: Mapping, use_case: UseCase) -> dict[str, object]:
    """Template-ready alert burden of an ``Evaluation.as_dict``: rows, sentences, and whether limits are set."""
    raw = evaluation.get("alert_burden")
    burden = AlertBurden.from_dict(raw) if raw else None
    crit = use_case.success_criteria.model_dump()
    return {
        "measured": burden is not None,
        "rows": alert_burden_rows(burden, use_case),
        "sentences": alert_burden_sentences(burden, use_case.words),
        "headline": alert_burden_headline(burden, use_case.words),
        "limits_set": any(crit.get(key) is not None for _, key, _ in ALERT_BURDEN_LIMITS),
        "n_bootstrap": burden.n_bootstrap if burden is not None else 0,
        "threshold": evaluation["threshold"],
    }


def alert_burden_markdown(evaluation: Mapping, words: OutcomeWords) -> str:
    """The alert burden's sentences as a Markdown block (shown whether or not the use case limits it)."""
    raw = evaluation.get("alert_burden")
    burden = AlertBurden.from_dict(raw) if raw else None
    lines = "".join(f"- {md_escape(s)}\n" for s in alert_burden_sentences(burden, words))
    return f"**Alert burden at the operating point** (validation cohort)\n\n{lines}"


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def render(template: str, **context: object) -> str:
    """Render a report template; common footer fields default to empty strings."""
    context.setdefault("glossary", glossary_for(template))
    context.setdefault("generated_at", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    for key in ("code_version", "use_case_name", "use_case_hash", "model_version", "subtitle"):
        context.setdefault(key, "")
    return _ENV.get_template(template).render(**context)


def md_escape(text: object) -> str:
    """Neutralize Markdown and HTML control characters in a value placed in a Markdown summary."""
    s = str(text)
    for ch in "\\`*_{}[]<>()#+!|":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\n", " ")


def decision_in_words(decision: Mapping) -> str:
    """The promotion decision as one sentence: what was decided, why, and which model is champion after it.

    A refusal is a decision, not a failure: its sentence names every part of the gate that did not pass."""
    challenger, before = decision["challenger"], decision.get("champion_before")
    signed = decision.get("sign_off")
    stays = f"the champion stays {before}" if before else "there is still no champion"
    if decision["promoted"]:
        replaced = f"replaces {before}" if before else "becomes the first champion"
        criteria = decision.get("criteria") or ()
        if signed:
            how = f"the promotion gate passed and {signed['by']} approved it for the clinical panel on {signed['at'][:10]}"
        elif criteria and all(c["passed"] for c in criteria):
            how = "every part of the promotion gate passed"
        else:
            # no criteria recorded (a hand approval), or some did not pass: the decision's own reasons, not a
            # pass nobody judged
            reasons = [str(r).rstrip(".") for r in decision.get("reasons", ()) if str(r).strip()]
            how = "; ".join(reasons) or "no reason recorded"
        return f"Promoted: challenger {challenger} {replaced}; {how}."
    if decision.get("awaiting_sign_off"):
        return (
            f"Awaiting sign-off: challenger {challenger} passed the promotion gate and becomes champion when the "
            f"clinical panel approves it ({str(decision['reasons'][-1]).rstrip('.')}). Until then {stays}."
        )
    if signed:
        note = f": {signed['note']}" if signed.get("note") else ""
        return (
            f"Rejected: {signed['by']} rejected challenger {challenger} for the clinical panel on "
            f"{signed['at'][:10]}{note}. So {stays}."
        )
    failed = [c for c in decision.get("criteria", ()) if not c["passed"]]
    # the parts that were judged and failed say why; parts not judged follow from them (e.g. too few outcomes)
    named = [c["reason"] for c in failed if c.get("judged", True)] or [c["reason"] for c in failed]
    reasons = [str(r).rstrip(".") for r in named or decision.get("reasons", ()) if str(r).strip()]
    because = "; ".join(reasons) if reasons else "the gate did not pass (no reason recorded)"
    return f"Refused: challenger {challenger} is not promoted, because {because}. So {stays}."


def drift_check_words(batch: str, level: str, reasons: Sequence[str]) -> str:
    """A batch's drift check result in words: the batch, its level and what moved (for the check's
    description and the alert), e.g. ``Batch 2026-01-20: drift ERROR. creatinine__last_24h: ERROR (...)``."""
    head = f"Batch {batch}: drift {level.upper()}"
    if not reasons:
        return f"{head}: nothing moved enough to warn."
    return f"{head}. " + "; ".join(reasons)[:900]


def ci_text(m: MetricWithCI, digits: int = 3) -> str:
    """A metric with its 95% CI as the UI shows it: ``0.893 (0.870 to 0.915)``; ``n/a`` when undefined."""
    if not math.isfinite(m.value):
        return "n/a"
    lo = f"{m.lower:.{digits}f}" if math.isfinite(m.lower) else "n/a"
    hi = f"{m.upper:.{digits}f}" if math.isfinite(m.upper) else "n/a"
    return f"{m.value:.{digits}f} ({lo} to {hi})"


def rounded(value: float | None, digits: int = 3) -> float | None:
    """A metric as shown in the Dagster UI: rounded to ``digits`` decimals (None and NaN kept as they are)."""
    if value is None or not math.isfinite(value):
        return value
    return round(float(value), digits)


def fmt_ci(m: dict[str, float] | tuple[float, float, float], digits: int = 3) -> str:
    v, lo, hi = (m["value"], m["lower"], m["upper"]) if isinstance(m, dict) else m
    return f"{v:.{digits}f} ({lo:.{digits}f} to {hi:.{digits}f})"


_MIN_KEYS = {"auroc": "auroc_min", "sensitivity": "sensitivity_min", "specificity": "specificity_min"}


def performance_report(
    *,
    use_case,
    evaluation: dict,
    plots: dict[str, bytes],
    importance: list[dict],
    decision: dict,
    flow: dict[str, int],
    fit: dict,
    model_version: str,
    code_version: str,
    validation_design: str | None = None,
) -> tuple[str, str]:
    """HTML performance report and its Markdown summary; ``validation_design`` is
    :func:`clinical_ml.core.features.validation_design` of the split applied."""
    metrics = evaluation["metrics"]
    rows = _metric_rows(use_case, metrics)
    op, words = use_case.operating_point, use_case.words
    policy_words = (
        f"chosen on out-of-fold predictions of the derivation cohort so that at least {op.target:.0%} of "
        f"{words.events} are flagged there"
        if op.policy == "min_sensitivity"
        else f"chosen on out-of-fold predictions of the derivation cohort so that at least {op.target:.0%} of "
        f"{words.non_events} are not flagged there"
    )
    meanings = metric_meanings(words)
    flow_rows = _flow_rows(use_case, flow)
    html = render(
        "performance.html.j2",
        clinical_action=use_case.operating_point.clinical_action,
        title=f"{use_case.title}: model performance",
        subtitle=f"Prediction {use_case.prediction_time.describe()}; outcome: {use_case.outcome.description}",
        question=use_case.clinical_question,
        metrics=metrics,
        threshold=evaluation["threshold"],
        policy_words=policy_words,
        n_validation=evaluation["n_validation"],
        events_validation=evaluation["events_validation"],
        n_derivation=fit["n_train"] + fit["n_tuning"],
        events_derivation=fit["events_train"] + fit["events_tuning"],
        n_tuning=fit["n_tuning"],
        decision=decision,
        flow=flow_rows,
        metric_rows=rows,
        plots={k: b64(v) for k, v in plots.items()},
        importance=importance,
        burden=alert_burden_context(evaluation, use_case),
        **_words_context(words),
        limitations=[
            validation_design or DESIGN_NOT_RECORDED,
            "Values measured after the prediction time are never used; values missing by then count as missing.",
            "Measurements outside physiologically possible ranges are flagged at ingestion and not used.",
            "Predicted risk supports, and does not replace, clinical judgement.",
        ],
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    m = metrics
    md = (
        f"### {md_escape(use_case.title)}\n\n"
        f"Validation cohort (test set): {evaluation['n_validation']} admissions, "
        f"{evaluation['events_validation']} {md_escape(words.events)}.\n\n"
        f"| Measure | Value (95% CI) |\n|---|---|\n"
        + "".join(f"| {md_escape(meanings[k][0])} | {fmt_ci(m[k])} |\n" for k in meanings)
        + f"\nOperating point: risk >= {evaluation['threshold']:.3f} ({md_escape(policy_words)}).\n\n"
        + alert_burden_markdown(evaluation, words)
        + f"\n**Promotion:** {'promoted to champion' if decision['promoted'] else 'not promoted'}\n\n"
        + "".join(f"- {md_escape(r)}\n" for r in decision["reasons"])
    )
    return html, md


_TABLE_METRICS = (
    "auroc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "observed_expected_ratio",
    "calibration_slope",
)


def _estimate(e: tuple[float, float, float] | None) -> dict | None:
    if e is None:
        return None
    return {"value": e[0], "lower": e[1], "upper": e[2]}


def fairness_context(
    analysis, *, forest_plots: Mapping[str, bytes], calibration_plots: Mapping[str, bytes] | None = None
) -> list[dict]:
    """Template-ready sections (one per attribute and intersection) of a ``SubgroupAnalysis``; the
    observed/expected forest plot of an attribute beside its sensitivity one where given."""
    sections = []
    for summary in analysis.attributes:
        rows = []
        for r in analysis.rows_of(summary.attribute):
            rows.append(
                {
                    "group": r.group,
                    "n": r.n if r.n >= analysis.min_cell_size else None,
                    "events": r.events if r.events >= analysis.min_cell_size else None,
                    "suppressed": r.suppressed,
                    "flags": list(r.flags),
                    "metrics": {k: _estimate(r.metrics.get(k)) for k in _TABLE_METRICS},
                    "sens_diff": _estimate(r.disparities.get("sensitivity", {}).get("difference_to_overall")),
                    "sens_ratio_best": _estimate(r.disparities.get("sensitivity", {}).get("ratio_to_best")),
                    "auroc_diff": _estimate(r.disparities.get("auroc", {}).get("difference_to_overall")),
                }
            )
        png = forest_plots.get(summary.attribute)
        sections.append(
            {
                "attribute": summary.attribute,
                "title": attribute_title(summary.attribute),
                "intersection": summary.intersection,
                "rows": rows,
                "eod": _estimate(summary.equalized_odds_difference),
                "suppressed": summary.groups_suppressed,
                "best": summary.best_group,
                "forest": b64(png) if png else None,
                "oe_forest": b64(calibration_plots[summary.attribute])
                if calibration_plots and summary.attribute in calibration_plots
                else None,
                "concerns": [
                    f"{r.group}: {c}" for r in analysis.rows_of(summary.attribute) for c in r.concerns
                ],
            }
        )
    return sections


def thresholds_context(thresholds: list) -> list[dict]:
    """Template-ready rows of ``GroupThreshold``."""
    return [
        {
            "attribute": attribute_title(t.attribute),
            "group": t.group,
            "suppressed": t.suppressed,
            "threshold": t.threshold,
            "range": t.threshold_range,
            "sens_single": _estimate(t.sensitivity_single),
            "spec_single": _estimate(t.specificity_single),
            "sens_group": _estimate(t.sensitivity_group),
            "spec_group": _estimate(t.specificity_group),
        }
        for t in thresholds
    ]


def fairness_markdown(analysis, *, verdict: str, reasons: list[str], min_cell_size: int) -> str:
    """Markdown summary of the subcohort analysis (single attributes; intersections are in the HTML)."""
    lines = [f"### Subcohort fairness: {verdict.upper()}\n"]
    lines += [f"- {md_escape(r)}" for r in reasons]
    lines.append(
        "\n| Attribute | Group | Patients | AUROC (95% CI) | Sensitivity (95% CI) | O/E (95% CI) |\n"
        "|---|---|---|---|---|---|"
    )
    for r in analysis.rows:
        if r.intersection:
            continue
        head = f"| {md_escape(attribute_title(r.attribute))} | {md_escape(r.group)} | "
        if r.suppressed:
            size = f"fewer than {min_cell_size}" if r.n < min_cell_size else str(r.n)
            lines.append(head + f"{size} | suppressed | suppressed | suppressed |")
        else:
            lines.append(
                head + f"{r.n} | {fmt_ci(r.metrics['auroc'], 2)} | {fmt_ci(r.metrics['sensitivity'], 2)} | "
                f"{fmt_ci(r.metrics['observed_expected_ratio'], 2)} |"
            )
    eods = [
        f"{md_escape(attribute_title(a.attribute))}: {fmt_ci(a.equalized_odds_difference, 2)}"
        for a in analysis.attributes
        if not a.intersection
    ]
    lines.append("\nEqualized odds difference: " + "; ".join(eods))
    return "\n".join(lines) + "\n"


def fairness_report(
    *,
    use_case,
    analysis=None,
    verdict: str,
    reasons: list[str],
    thresholds: list | tuple = (),
    recommendations: list[str] | tuple = (),
    forest_plots: Mapping[str, bytes],
    model_version: str,
    code_version: str,
    rows=None,
    threshold: float | None = None,
    calibration_plots: Mapping[str, bytes] | None = None,
) -> tuple[str, str]:
    """HTML subcohort fairness report and its Markdown summary.

    ``rows`` and ``threshold`` are the earlier names of ``analysis`` (and its threshold), still accepted.

    Parameters
    ----------
    use_case : UseCase
        The use case (subgroup minimums, operating point).
    analysis : SubgroupAnalysis
        From :func:`clinical_ml.core.fairness.subgroup_table`.
    verdict, reasons
        From :func:`clinical_ml.core.fairness.verdict`.
    thresholds, recommendations
        From :func:`clinical_ml.core.fairness.group_thresholds` and ``threshold_recommendation``.
    forest_plots : mapping
        Attribute -> PNG bytes.
    """
    analysis = analysis if analysis is not None else rows
    if analysis is None:
        raise TypeError("fairness_report() needs the SubgroupAnalysis as analysis=")
    html = render(
        "fairness.html.j2",
        title=f"{use_case.title}: subcohort fairness report",
        subtitle="Performance of the model in each group of patients of the validation cohort",
        verdict=verdict,
        reasons=reasons,
        threshold=analysis.threshold,
        sections=fairness_context(analysis, forest_plots=forest_plots, calibration_plots=calibration_plots),
        oe_range=analysis.observed_expected_range,
        slope_range=analysis.calibration_slope_range,
        calibration_n_boot=analysis.calibration_n_boot,
        overall=_estimate_row(analysis.overall),
        group_thresholds=thresholds_context(list(thresholds)),
        recommendations=list(recommendations),
        policy_words=_policy_words(use_case),
        min_cell_size=use_case.subgroups.min_cell_size,
        auroc_min=use_case.subgroups.auroc_min,
        sensitivity_min=use_case.subgroups.sensitivity_min,
        n_boot=analysis.n_boot,
        tests=analysis.tests,
        **_words_context(use_case.words),
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    md = fairness_markdown(
        analysis, verdict=verdict, reasons=reasons, min_cell_size=use_case.subgroups.min_cell_size
    )
    return html, md


def _estimate_row(row) -> dict:
    return {
        "n": row.n,
        "events": row.events,
        "metrics": {k: _estimate(row.metrics.get(k)) for k in _TABLE_METRICS},
    }


def _policy_words(use_case) -> str:
    op, words = use_case.operating_point, use_case.words
    if op.policy == "min_sensitivity":
        return f"at least {op.target:.0%} of {words.events} flagged, as few false alarms as possible"
    return f"at least {op.target:.0%} of {words.non_events} not flagged"


def drift_rows(
    drift: Sequence[FeatureDrift | Mapping[str, Any]],
    *,
    statistics: Sequence[DriftStatistic],
    label: Callable[[str], str] = str,
) -> list[dict]:
    """One row per column for the drift tables: its label, every statistic formatted by the statistic
    itself, the means and missing shares, the smallest p-value and the level. ``drift`` holds
    :class:`FeatureDrift` or their flat records (``FeatureDrift.as_dict``, as stored in JSON)."""
    rows = []
    for d in drift:
        r = d.as_dict() if isinstance(d, FeatureDrift) else dict(d)
        rows.append(
            {
                **r,
                "label": r.get("label") or label(r["feature"]),
                "cells": [s.format(float(r.get(s.key, math.nan))) for s in statistics],
            }
        )
    return rows


def drift_markdown(
    drift: Sequence[FeatureDrift | Mapping[str, Any]],
    *,
    thresholds: DriftThresholds,
    label: Callable[[str], str] = str,
    limit: int = 10,
) -> str:
    """Markdown table of the first ``limit`` columns: predictor, every computed statistic, p (min), level."""
    stats = thresholds.selected
    head = ["Predictor", *(s.label for s in stats), "p (min)", "Level"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in drift_rows(list(drift)[:limit], statistics=stats, label=label):
        cells = [md_escape(r["label"]), *r["cells"], f"{r['p_min']:.2g}", r["level"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def drift_report(
    *,
    use_case,
    batch_id: str,
    drift: Sequence[FeatureDrift | Mapping[str, Any]] | None = None,
    thresholds: DriftThresholds | None = None,
    n_reference: int,
    n_current: int,
    model_version: str,
    code_version: str,
    label: Callable[[str], str] = str,
    rows: Sequence[Mapping[str, Any]] | None = None,
    plot: bytes | None = None,
    warn: float | None = None,
    error: float | None = None,
    n_tests: int | None = None,
) -> tuple[str, str]:
    """HTML feature drift report and its Markdown summary, judged by ``thresholds`` (the use case's).

    Parameters
    ----------
    drift
        Per column, from :func:`clinical_ml.core.drift.batch_drift` (or their flat records).
    thresholds
        The levels the drift was judged by (``MonitoringConfig.drift``); the report states them, and its
        tables have one column per statistic they select.
    label
        Display name of a column (e.g. :func:`clinical_ml.core.explain.feature_label`); its name by default.
    rows, plot, warn, error
        The former call (flat records with a ``label``, a PSI plot and PSI levels): kept until defs/ passes
        ``drift`` and ``thresholds``; ``warn`` and ``error`` then stand for ``psi_warn`` and ``psi_error``.
    n_tests
        The Bonferroni denominator ``m`` the levels were judged with (the report then says it).
    """
    if thresholds is None:
        default = DriftThresholds()
        thresholds = dataclasses.replace(
            default,
            psi_warn=default.psi_warn if warn is None else warn,
            psi_error=default.psi_error if error is None else error,
        )
    stats = thresholds.selected
    table = drift_rows(list(drift if drift is not None else rows or []), statistics=stats, label=label)
    n_error = sum(r["level"] == "error" for r in table)
    n_warn = sum(r["level"] == "warn" for r in table)
    if plot is None:
        top = sorted(table, key=lambda r: -float(r.get("psi", 0.0)))[:15]
        plot = plots.drift_plot(
            [r["label"] for r in top],
            [float(r.get("psi", 0.0)) for r in top],
            warn=thresholds.psi_warn,
            error=thresholds.psi_error,
        )
    html = render(
        "drift.html.j2",
        title=f"{use_case.title}: data drift, batch {batch_id}",
        subtitle="Newest batch compared with the derivation cohort",
        batch_id=batch_id,
        rows=table,
        statistics=[{"label": s.label, "meaning": s.meaning, "judged": s.judged(thresholds)} for s in stats],
        thresholds=thresholds,
        described=thresholds.describe(),
        n_reference=n_reference,
        n_current=n_current,
        plot=b64(plot),
        n_error=n_error,
        n_warn=n_warn,
        n_tests=n_tests,
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    md = (
        f"### Drift of batch {md_escape(batch_id)} vs the derivation cohort\n\n"
        f"{n_error} predictors at ERROR (a significant and material change), {n_warn} at WARN "
        "(significant only).\n\n" + drift_markdown(table, thresholds=thresholds, label=label)
    )
    return html, md


def _flow_rows(use_case, flow: dict) -> list[tuple[str, int]]:
    """The participant flow's rows (exclusions in the order the use case applies them)."""
    return CohortFlow.from_dict(flow).rows()


def _metric_rows(use_case, metrics: dict) -> list[dict]:
    crit = use_case.success_criteria.model_dump()
    rows = []
    for key, (name, meaning) in metric_meanings(use_case.words).items():
        minimum = ""
        if key in _MIN_KEYS:
            minimum = f"{crit[_MIN_KEYS[key]]:.2f} (lower bound)"
        elif key == "brier":
            minimum = f"at most {crit['brier_max']:.2f}"
        elif key == "calibration_slope":
            lo, hi = crit["calibration_slope_range"]
            minimum = f"{lo:.1f} to {hi:.1f}"
        rows.append({"name": name, "meaning": meaning, "metric": metrics[key], "minimum": minimum})
    return rows


def _json_estimate(e) -> dict | None:
    return None if not e else {"value": e[0], "lower": e[1], "upper": e[2]}


def _card_subgroups(fairness: dict, forest_plots: Mapping[str, bytes]) -> list[dict]:
    out = []
    for a in fairness["attributes"]:
        if a["intersection"]:
            continue
        rows = [
            {
                "group": r["group"],
                "n": r["n"],
                "events": r["events"],
                "suppressed": r["suppressed"],
                "flags": r["flags"],
                "metrics": {k: _json_estimate(v) for k, v in r["metrics"].items()},
                "sens_diff": _json_estimate(
                    r["disparities"].get("sensitivity", {}).get("difference_to_overall")
                ),
            }
            for r in fairness["rows"]
            if r["attribute"] == a["attribute"]
        ]
        png = forest_plots.get(a["attribute"])
        out.append(
            {
                "attribute": a["attribute"],
                "title": attribute_title(a["attribute"]),
                "rows": rows,
                "eod": _json_estimate(a["equalized_odds_difference"]),
                "forest": b64(png) if png else None,
            }
        )
    return out


def md_image(alt: str, png: bytes) -> str:
    """A PNG embedded in Markdown (what the Dagster UI shows under "Show Markdown")."""
    return f"![{md_escape(alt)}](data:image/png;base64,{b64(png)})"


def report_card(
    *,
    use_case,
    evaluation: dict,
    fairness: dict,
    decision: dict,
    flow: dict[str, int],
    fit: dict,
    training_ranges: dict[str, tuple[float, float]],
    importance: list[dict],
    plots: Mapping[str, bytes],
    forest_plots: Mapping[str, bytes],
    data_periods: list[tuple[str, list[str]]],
    batch_ids: list[str],
    predictor_labels: list[str],
    model_version: str,
    code_version: str,
    deliveries: list[dict] | None = None,
    validation_design: str | None = None,
    privacy_groups: list[dict] | None = None,
    learning_curve: LearningCurve | None = None,
    population_model: PopulationModelComparison | None = None,
) -> tuple[str, str]:
    """The HCP report card of one model version (HTML, self-contained) and its Markdown summary.

    Structured after TRIPOD+AI and model cards: intended use and population, data sources and dates,
    participant flow, outcome and prediction time, predictors, missing data, derivation and validation
    cohorts, performance with CIs and curves, subgroups, per-group thresholds, SHAP, out-of-range inputs,
    limitations and the promotion decision.

    Parameters
    ----------
    use_case : UseCase
        The contract the model is judged by.
    evaluation : dict
        ``evaluation.json`` of the model evaluation (metrics with CIs, threshold, cohort sizes).
    fairness : dict
        ``fairness.json`` written by the subcohort fairness report.
    decision, flow, fit : dict
        Promotion decision, cohort flow and fit summary of the model version.
    training_ranges : dict
        Predictor -> (1st, 99th percentile) in the derivation cohort.
    importance : list of dict
        Global SHAP importance (``label``, ``mean_abs_shap``).
    plots : mapping
        ``roc``, ``calibration``, ``decision``, ``importance`` PNG bytes.
    forest_plots : mapping
        Attribute -> PNG bytes of its forest plot.
    data_periods : list
        (cohort name, admission periods) pairs.
    batch_ids : list of str
        Batches the model was derived from.
    predictor_labels : list of str
        The measurements used, in words.
    model_version, code_version : str
        Lineage printed in the footer.

    Returns
    -------
    tuple of str
        HTML and Markdown.
    """
    m = evaluation["metrics"]
    words = use_case.words
    prediction_words = use_case.prediction_time.describe()
    inter = [a for a in fairness["attributes"] if a["intersection"]]
    inter_names = {a["attribute"] for a in inter}
    inter_rows = [r for r in fairness["rows"] if r["attribute"] in inter_names]
    f = use_case.features
    html = render(
        "report_card.html.j2",
        clinical_action=use_case.operating_point.clinical_action,
        title=f"{use_case.title}: report card",
        subtitle=f"Model {model_version}, for the clinical review panel",
        question=use_case.clinical_question,
        outcome=use_case.outcome.description,
        outcome_window=use_case.outcome.window,
        prediction_words=prediction_words,
        observation_hours=f"{use_case.observation_window_hours:g}",
        inclusion=use_case.population.inclusion,
        exclusion=use_case.population.exclusion,
        owner=use_case.owner,
        metrics=m,
        threshold=evaluation["threshold"],
        policy_words=_policy_words(use_case),
        n_validation=evaluation["n_validation"],
        events_validation=evaluation["events_validation"],
        decision=decision,
        fairness_verdict=fairness["verdict"],
        fairness_reasons=fairness["reasons"],
        batch_ids=batch_ids,
        data_periods=data_periods,
        flow=_flow_rows(use_case, flow),
        deliveries=deliveries or [],
        # under the cumulative scope the privacy gate holds people back and a later delivery releases them
        held_back=any(d.get("held_back") for d in deliveries or []),
        validation_design=validation_design or DESIGN_NOT_RECORDED,
        # what the privacy gate took from each audited group (row_accounting.privacy_by_group)
        privacy_groups=privacy_groups or [],
        # people held back at their delivery and released with a later one (each counted once per attribute)
        released_later=max(
            (
                sum(g.get("released_later", 0) for g in privacy_groups or [] if g["attribute"] == a)
                for a in {g["attribute"] for g in privacy_groups or []}
            ),
            default=0,
        ),
        privacy_loss_limit=PRIVACY_LOSS_LIMIT,
        learning_curve=learning_curve,
        learning_curve_words=learning_curve.recommendation() if learning_curve else "",
        population_model=population_model_view(population_model) if population_model else None,
        predictors=predictor_labels,
        windows=" and ".join(f"the last {w:g} h" for w in f.window_hours),
        aggregations=", ".join(f.aggregations),
        static=[s.replace("_", " ") for s in f.static],
        fit=fit,
        metric_rows=_metric_rows(use_case, m),
        plots={k: b64(v) for k, v in plots.items()},
        subgroups=_card_subgroups(fairness, forest_plots),
        min_cell_size=fairness["min_cell_size"],
        intersections=[attribute_title(a["attribute"]) for a in inter],
        intersection_groups=len(inter_rows),
        intersection_flagged=sum(bool(r["flags"]) for r in inter_rows),
        intersection_suppressed=sum(r["suppressed"] for r in inter_rows),
        group_thresholds=[
            {
                "attribute": attribute_title(t["attribute"]),
                "group": t["group"],
                "suppressed": t["suppressed"],
                "threshold": t["threshold"],
                "range": t["threshold_range"],
                "sens_single": _json_estimate(t["sensitivity_single"]),
                "sens_group": _json_estimate(t["sensitivity_group"]),
                "spec_single": _json_estimate(t["specificity_single"]),
                "spec_group": _json_estimate(t["specificity_group"]),
            }
            for t in fairness["group_thresholds"]
        ],
        recommendations=fairness.get("recommendations", []),
        importance=importance,
        burden=alert_burden_context(evaluation, use_case),
        **_words_context(words),
        ranges=[
            (*display_name_and_unit(k), v[0], v[1])
            for k, v in training_ranges.items()
            if not k.endswith("__count_24h")
        ],
        limitations=[
            validation_design or DESIGN_NOT_RECORDED,
            "Groups marked suppressed are too small to judge; the model's performance in them is unknown.",
            "The model cannot see what was not measured: groups measured less often, or whose devices read "
            "differently (e.g. pulse oximetry in darker skin), can be predicted less well.",
            "Values measured after the prediction time are never used; values missing by then count as missing.",
            "Predicted risk supports, and does not replace, clinical judgement.",
        ],
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    md = (
        f"### Report card: {md_escape(use_case.title)}\n\n"
        f"Model {md_escape(model_version)}. Validation cohort (test set): {evaluation['n_validation']} "
        f"admissions, {evaluation['events_validation']} {md_escape(words.events)}.\n\n"
        "| Measure | Value (95% CI) |\n|---|---|\n"
        + "".join(
            f"| {METRIC_MEANINGS[k][0]} | {fmt_ci(m[k])} |\n" for k in ("auroc", "sensitivity", "specificity")
        )
        + "\n"
        + alert_burden_markdown(evaluation, words)
        + f"\n**Promotion:** {'promoted to champion' if decision['promoted'] else 'not promoted'}. "
        f"**Subcohorts:** {fairness['verdict'].upper()}\n\n"
        + "".join(f"- {md_escape(r)}\n" for r in fairness["reasons"])
    )
    return html, md


def monitoring_report(
    *,
    use_case: UseCase,
    batches: Sequence[dict],
    performance: Sequence[dict],
    decisions: Sequence[dict],
    config: MonitoringConfig,
    model_version: str,
    code_version: str,
    feedback: dict | None = None,
) -> tuple[str, str]:
    """HTML monitoring report and its Markdown summary (aggregates only).

    Parameters
    ----------
    use_case
        The use case (its title, name and contract hash go into the report).
    batches
        :meth:`clinical_ml.core.batch_monitoring.BatchMonitoring.as_dict` of each monitored batch.
    performance
        Rows of :func:`clinical_ml.core.performance_monitoring.performance_by_period`.
    decisions
        Promotion decisions, newest last (the last 20 are shown).
    config
        The monitoring levels the batches were judged by.
    model_version, code_version
        Lineage shown in the footer.
    feedback
        Clinicians' answers to the point-of-care cards
        (:func:`clinical_ml.core.clinician_feedback.feedback_view`), or ``None`` when there are none.

    Returns
    -------
    tuple of str
        The HTML report and its Markdown summary.
    """
    overall = [r for r in performance if r["attribute"] == "all"]
    subgroups = [r for r in performance if r["attribute"] != "all"]
    n_error = sum(b["level"] == "error" for b in batches)
    first_error = next((b["batch_id"] for b in batches if b["level"] == "error"), None)
    html = render(
        "monitoring.html.j2",
        title=f"{use_case.title}: monitoring",
        subtitle="Drift per batch against the derivation cohort, performance over time, decisions",
        batches=list(batches),
        overall=overall,
        subgroups=subgroups,
        decisions=list(decisions)[-20:],
        n_error=n_error,
        first_error=first_error,
        binning=config.drift.describe(),
        drift_plot=b64(plots.drift_trend_plot(batches)) if batches else None,
        performance_plot=b64(plots.performance_plot(performance)) if overall else None,
        feedback=feedback,
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    lines = [
        f"### Monitoring of {md_escape(use_case.name)}",
        "",
        f"{len(batches)} batches monitored, {n_error} at ERROR"
        + (f" (first: {md_escape(first_error)})" if first_error else "")
        + ".",
        "",
        "| Batch | Level | Retraining requested | Top reason |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {md_escape(b['batch_id'])} | {b['level']} | {'yes' if b['retraining_requested'] else 'no'} | "
        f"{md_escape((b['reasons'] or [''])[0])} |"
        for b in batches[-15:]
    ]
    lines += ["", "| Period | Labels | Realised AUROC | Estimated AUROC |", "|---|---|---|---|"]
    for r in overall[-15:]:
        real = r["realised"]["auroc"]["value"] if r["realised"] else float("nan")
        est = (r["estimated"] or {}).get("auroc", float("nan"))
        lines.append(f"| {md_escape(r['period'])} | {r['status']} | {real:.3f} | {est:.3f} |")
    if feedback:
        lines += ["", f"Clinician feedback: {md_escape(feedback['rising_sentence'])}."]
    return html, "\n".join(lines) + "\n"


def evaluation_markdown(
    evaluation: Mapping, curves: Mapping[str, bytes], *, words: OutcomeWords | None = None
) -> str:
    """The validation metrics with CIs, the alert burden, and the calibration and decision curves, for the
    asset's page; ``words`` name the outcome (the use case's; "events" when not given)."""
    w = words or OutcomeWords(
        event="event",
        events="events",
        non_events="non-events",
        with_event="patients with the outcome",
        without_event="patients without the outcome",
    )
    rows = "".join(f"| {k.replace('_', ' ')} | {fmt_ci(v)} |\n" for k, v in evaluation["metrics"].items())
    md = (
        f"**Validation cohort**: {evaluation['n_validation']} admissions, {evaluation['events_validation']} "
        f"{md_escape(w.events)}; operating threshold {evaluation['threshold']:.3f} (chosen on out-of-fold "
        f"predictions of the derivation cohort); {evaluation['n_bootstrap']} bootstrap replicates.\n\n"
        f"| measure | value (95% CI) |\n|---|---|\n{rows}\n" + alert_burden_markdown(evaluation, w) + "\n"
    )
    if "calibration" in curves:
        md += f"**Calibration curve**\n\n{md_image('calibration', curves['calibration'])}\n\n"
    if "decision_curve" in curves:
        md += (
            "**Decision curve** (net benefit vs treat all and treat none)\n\n"
            f"{md_image('decision curve', curves['decision_curve'])}\n"
        )
    return md


_SPLIT_WORDS = {
    "train": "Derivation cohort (training set)",
    "tuning": "Derivation cohort, held back (tuning set)",
    "held_out": "Validation cohort (test set)",
}


def data_periods(cohort_periods: pl.DataFrame, splits: pl.DataFrame) -> list[tuple[str, list[str]]]:
    """The periods each part of the data comes from, in clinical words (derivation and validation cohort)."""
    periods = (
        cohort_periods.join(splits, on="subject_id", how="inner")
        .group_by("split")
        .agg(pl.col("period").cast(pl.String).unique().sort())
    )
    by_split = dict(zip(periods["split"].to_list(), periods["period"].to_list(), strict=True))
    return [(words, by_split.get(s, [])) for s, words in _SPLIT_WORDS.items()]


def predictor_labels(feature_names: Sequence[str], *, static: Sequence[str]) -> list[str]:
    """One readable name per measured predictor (its windows and statistics folded), static ones left out."""
    stems = dict.fromkeys(
        n.partition("__")[0] for n in feature_names if n.partition("__")[0] not in set(static)
    )
    return [s.replace("_", " ") for s in stems]


def report_card_markdown(md: str, calibration_png: bytes, forest_plots: Mapping[str, bytes]) -> str:
    """The report card's Markdown with its calibration and forest plots embedded (for the asset's page)."""
    images = [md_image("Calibration, validation cohort", calibration_png)]
    images += [md_image(f"Sensitivity by {attribute_title(a)}", png) for a, png in forest_plots.items()]
    return md + "\n" + "\n\n".join(images) + "\n"


def observed_expected_forest_plots(analysis) -> dict[str, bytes]:
    """One observed/expected forest plot per audited attribute (and intersection), with the acceptable range
    of the analysis shaded."""
    return {
        a.attribute: plots.ratio_forest_plot(
            analysis.rows_of(a.attribute),
            metric="observed_expected_ratio",
            label="observed / expected",
            title=f"Observed / expected by {attribute_title(a.attribute)}",
            overall=analysis.overall.metrics["observed_expected_ratio"],
            acceptable=analysis.observed_expected_range,
        )
        for a in analysis.attributes
    }


def sensitivity_forest_plots(analysis, *, minimum: float | None) -> dict[str, bytes]:
    """One sensitivity forest plot per audited attribute (and intersection) of a subgroup analysis."""
    return {
        a.attribute: plots.subgroup_forest_plot(
            analysis.rows_of(a.attribute),
            metric="sensitivity",
            title=f"Sensitivity by {attribute_title(a.attribute)}",
            overall=analysis.overall.metrics["sensitivity"],
            minimum=minimum,
        )
        for a in analysis.attributes
    }
