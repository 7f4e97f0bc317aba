"""HTML reports for healthcare professionals and their Markdown summaries.

Jinja2 renders with autoescaping on for every template, so a value that came from a delivered file
(a unit name, a site code) can never become markup in a report.
"""

import base64
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
    undefined=StrictUndefined,
)

METRIC_MEANINGS = {
    "auroc": ("AUROC", "chance that a patient who died was ranked above one who survived"),
    "auprc": ("AUPRC", "average precision across thresholds (compare with the death rate)"),
    "sensitivity": ("Sensitivity", "share of patients who died that the model flagged"),
    "specificity": ("Specificity", "share of survivors the model did not flag"),
    "ppv": ("Positive predictive value", "share of flagged patients who died"),
    "npv": ("Negative predictive value", "share of unflagged patients who survived"),
    "brier": ("Brier score", "mean squared error of predicted risk (lower is better)"),
    "calibration_slope": ("Calibration slope", "1 is ideal; below 1 means predictions too extreme"),
    "calibration_intercept": (
        "Calibration intercept",
        "0 is ideal; above 0 means risk underestimated overall",
    ),
    "observed_expected_ratio": (
        "Observed / expected deaths",
        "1 is ideal; above 1 means more deaths than predicted",
    ),
}


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def render(template: str, **context: object) -> str:
    """Render a report template; common footer fields default to empty strings."""
    context.setdefault("generated_at", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    for key in ("code_version", "use_case_name", "use_case_hash", "model_version", "subtitle"):
        context.setdefault(key, "")
    return _ENV.get_template(template).render(**context)


def write_report(path: Path, html: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path


def md_escape(text: object) -> str:
    """Neutralize Markdown and HTML control characters in a value placed in a Markdown summary."""
    s = str(text)
    for ch in "\\`*_{}[]<>()#+!|":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\n", " ")


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
) -> tuple[str, str]:
    """HTML performance report and its Markdown summary."""
    crit = use_case.success_criteria.model_dump()
    metrics = evaluation["metrics"]
    rows = []
    for key, (name, meaning) in METRIC_MEANINGS.items():
        minimum = ""
        if key in _MIN_KEYS:
            minimum = f"{crit[_MIN_KEYS[key]]:.2f} (lower bound)"
        elif key == "brier":
            minimum = f"at most {crit['brier_max']:.2f}"
        elif key == "calibration_slope":
            lo, hi = crit["calibration_slope_range"]
            minimum = f"{lo:.1f} to {hi:.1f}"
        rows.append({"name": name, "meaning": meaning, "metric": metrics[key], "minimum": minimum})
    op = use_case.operating_point
    policy_words = (
        f"chosen so that at least {op.target:.0%} of deaths are flagged"
        if op.policy == "min_sensitivity"
        else f"chosen so that at least {op.target:.0%} of survivors are not flagged"
    )
    flow_rows = [
        ("Admissions in the de-identified data", flow["admissions"]),
        (f"Excluded: under {use_case.population.min_age_years} years", flow["excluded_under_age"]),
        ("Excluded: stay ended before the prediction time", flow["excluded_stay_ended_before_prediction"]),
        ("Excluded: demographics missing", flow["excluded_missing_demographics"]),
        ("Included", flow["included"]),
    ]
    html = render(
        "performance.html.j2",
        title=f"{use_case.title}: model performance",
        subtitle=f"Prediction {use_case.prediction_time.offset_hours:g} h after admission; outcome: "
        f"{use_case.outcome.description}",
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
        limitations=[
            "Validated on patients of the same hospitals and period as the derivation cohort (internal validation).",
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
        f"{evaluation['events_validation']} deaths.\n\n"
        f"| Measure | Value (95% CI) |\n|---|---|\n"
        + "".join(f"| {METRIC_MEANINGS[k][0]} | {fmt_ci(m[k])} |\n" for k in METRIC_MEANINGS)
        + f"\nOperating point: risk >= {evaluation['threshold']:.3f} ({policy_words}).\n\n"
        f"**Promotion:** {'promoted to champion' if decision['promoted'] else 'not promoted'}\n\n"
        + "".join(f"- {md_escape(r)}\n" for r in decision["reasons"])
    )
    return html, md


def fairness_report(
    *,
    use_case,
    rows: list,
    verdict: str,
    reasons: list[str],
    threshold: float,
    forest_plots: Mapping[str, bytes],
    model_version: str,
    code_version: str,
) -> tuple[str, str]:
    """HTML subcohort fairness report and its Markdown summary; ``rows`` are ``SubgroupRow``."""
    titles = {
        "overall": "all patients",
        "sex": "sex",
        "race_ethnicity": "race and ethnicity",
        "age_band": "age group",
    }
    attributes = [
        {
            "title": titles.get(a, a),
            "rows": [r for r in rows if r.attribute == a],
            "forest": b64(forest_plots[a]),
        }
        for a in use_case.subgroups.attributes
    ]
    html = render(
        "fairness.html.j2",
        title=f"{use_case.title}: subcohort fairness report",
        subtitle="Performance of the model in each group of patients of the validation cohort",
        verdict=verdict,
        reasons=reasons,
        threshold=threshold,
        attributes=attributes,
        min_cell_size=use_case.subgroups.min_cell_size,
        auroc_min=use_case.subgroups.auroc_min,
        sensitivity_min=use_case.subgroups.sensitivity_min,
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    lines = [f"### Subcohort fairness: {verdict.upper()}\n"]
    lines += [f"- {md_escape(r)}" for r in reasons]
    lines.append(
        "\n| Attribute | Group | Patients | AUROC (95% CI) | Sensitivity (95% CI) |\n|---|---|---|---|---|"
    )
    for r in rows:
        if r.suppressed:
            lines.append(
                f"| {md_escape(r.attribute)} | {md_escape(r.group)} | < {use_case.subgroups.min_cell_size}"
                if r.n < use_case.subgroups.min_cell_size
                else f"| {md_escape(r.attribute)} | {md_escape(r.group)} | {r.n}"
            )
            lines[-1] += " | suppressed | suppressed |"
        else:
            lines.append(
                f"| {md_escape(r.attribute)} | {md_escape(r.group)} | {r.n} | {fmt_ci(r.metrics['auroc'], 2)} | "
                f"{fmt_ci(r.metrics['sensitivity'], 2)} |"
            )
    return html, "\n".join(lines) + "\n"


def drift_report(
    *,
    use_case,
    batch_id: str,
    rows: list[dict],
    n_reference: int,
    n_current: int,
    plot: bytes,
    warn: float,
    error: float,
    model_version: str,
    code_version: str,
) -> tuple[str, str]:
    """HTML feature drift report and its Markdown summary; ``rows`` are drift dicts with a ``label``."""
    n_error = sum(r["level"] == "error" for r in rows)
    n_warn = sum(r["level"] == "warn" for r in rows)
    html = render(
        "drift.html.j2",
        title=f"{use_case.title}: data drift, batch {batch_id}",
        subtitle="Newest batch compared with the derivation cohort",
        batch_id=batch_id,
        rows=rows,
        n_reference=n_reference,
        n_current=n_current,
        plot=b64(plot),
        warn=warn,
        error=error,
        n_error=n_error,
        n_warn=n_warn,
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    md = (
        f"### Drift of batch {md_escape(batch_id)} vs the derivation cohort\n\n"
        f"{n_error} predictors moved substantially (PSI >= {error}), {n_warn} somewhat.\n\n"
        "| Predictor | PSI | KS | Level |\n|---|---|---|---|\n"
        + "".join(
            f"| {md_escape(r['label'])} | {r['psi']:.3f} | {r['ks_statistic']:.3f} | {r['level']} |\n"
            for r in rows[:10]
        )
    )
    return html, md
