"""The Model Facts label: one printed page per model version for the clinicians who see its score.

After the format of Sendak et al., "Presenting machine learning model information to clinical end users
with model facts labels", npj Digital Medicine 3, 41 (2020): summary, mechanism, validation and performance,
uses and directions, warnings, other information. Every sentence is built from the numbers it states (the
validation metrics, the fit, the decision), so that it stays true for the version it describes.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clinical_ml.core.reports import decision_in_words, md_escape, render
from clinical_ml.core.usecase import UseCase

SOURCE = (
    "Format: Model Facts label (Sendak MP, Gao M, Brajer N, Balu S. npj Digital Medicine 2020;3:41). "
    "The full evidence is in the report card of the same version."
)
# the measures a clinician reads on the label, in order: (key, name)
LABEL_METRICS = (
    ("auroc", "AUROC (discrimination)"),
    ("sensitivity", "Sensitivity at the threshold"),
    ("specificity", "Specificity at the threshold"),
    ("ppv", "Positive predictive value"),
    ("npv", "Negative predictive value"),
    ("observed_expected_ratio", "Observed / expected (calibration in the large)"),
    ("calibration_slope", "Calibration slope"),
)


@dataclass(frozen=True)
class ModelFacts:
    """The label's sections as plain sentences (and the performance table as name / value rows)."""

    title: str
    model_version: str
    summary: tuple[str, ...]
    mechanism: tuple[str, ...]
    performance: tuple[tuple[str, str], ...]
    performance_notes: tuple[str, ...]
    uses: tuple[str, ...]
    warnings: tuple[str, ...]
    other: tuple[tuple[str, str], ...]

    def sections(self) -> list[tuple[str, tuple[str, ...]]]:
        return [
            ("Summary", self.summary),
            ("Mechanism", self.mechanism),
            ("Uses and directions", self.uses),
            ("Warnings", self.warnings),
        ]


def _ci(m: Mapping[str, float], digits: int = 2) -> str:
    v, lo, hi = m["value"], m["lower"], m["upper"]
    if not math.isfinite(v):
        return "not estimable"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} (95% CI {lo:.{digits}f} to {hi:.{digits}f})"


def _per_100(x: float) -> str:
    return f"{round(100 * x):d}"


def model_facts(
    *,
    use_case: UseCase,
    evaluation: Mapping,
    fairness_verdict: str,
    fairness_reasons: Sequence[str],
    decision: Mapping,
    fit: Mapping,
    importance: Sequence[Mapping],
    n_predictors: int,
    batch_ids: Sequence[str],
    model_version: str,
    code_version: str,
    report_card_file: str,
    validation_design: str | None = None,
) -> ModelFacts:
    """The Model Facts label of one model version.

    Parameters
    ----------
    use_case : UseCase
        The contract: question, population, prediction time, outcome, operating point and its action.
    evaluation : mapping
        ``evaluation.json`` (metrics with CIs, threshold, validation cohort sizes, alert burden).
    fairness_verdict, fairness_reasons
        The subcohort audit's verdict and its reasons.
    decision : mapping
        The promotion decision of this version.
    fit : mapping
        The fit summary (``n_train``, ``n_tuning``, ``events_train``, ``events_tuning``, ``best_iteration``).
    importance : sequence of mapping
        Global SHAP importance, strongest first (``label``, ``mean_abs_shap``).
    n_predictors : int
        Number of model inputs (columns).
    batch_ids : sequence of str
        Batches the model was derived from.
    model_version, code_version, report_card_file : str
        Lineage, and the file name of the report card beside the label.
    validation_design : str, optional
        How the validation cohort was chosen, in words.
    """
    w, m = use_case.words, evaluation["metrics"]
    op = use_case.operating_point
    threshold = float(evaluation["threshold"])
    n_val, e_val = int(evaluation["n_validation"]), int(evaluation["events_validation"])
    n_derived = int(fit["n_train"]) + int(fit.get("n_tuning", 0))
    e_derived = int(fit["events_train"]) + int(fit.get("events_tuning", 0))
    top = [str(r["label"]) for r in importance[:5]]
    periods = f"batches {batch_ids[0]} to {batch_ids[-1]}" if batch_ids else "batches not recorded"

    summary = (
        f"Question: {use_case.clinical_question}",
        f"Output: the predicted risk (0 to 1) of {w.event}, {use_case.outcome.window}; a patient at or above "
        f"{threshold:.3f} is flagged.",
        f"For: {use_case.population.inclusion}",
        f"When: {use_case.prediction_time.describe()}.",
    )
    mechanism = (
        f"Gradient-boosted decision trees (LightGBM, {int(fit['best_iteration'])} trees) over {n_predictors} "
        "inputs from the electronic health record, using only values available by the prediction time.",
        "Inputs that weigh most on average (mean absolute SHAP value): "
        + (", ".join(top) or "not recorded")
        + ".",
        f"Derived from {n_derived} admissions with {e_derived} {w.events} ({periods}).",
        f"Outcome: {use_case.outcome.description}",
    )
    sens, spec, ppv = m["sensitivity"]["value"], m["specificity"]["value"], m["ppv"]["value"]
    notes = [
        f"Validated on {n_val} admissions with {e_val} {w.events} that the model was not fitted on."
        + (f" {validation_design.rstrip('.')}." if validation_design else ""),
    ]
    if all(math.isfinite(x) for x in (sens, spec, ppv)):
        notes.append(
            f"At the threshold, of every 100 {w.with_event} about {_per_100(sens)} are flagged; of every 100 "
            f"{w.without_event} about {_per_100(1 - spec)} are flagged too; of every 100 flagged patients "
            f"about {_per_100(ppv)} are {w.with_event}."
        )
    burden = evaluation.get("alert_burden") or {}
    nne = (burden.get("number_needed_to_evaluate") or {}).get("value", math.nan)
    if math.isfinite(nne):
        notes.append(
            f"Number needed to evaluate: about {nne:.1f} flagged patients are reviewed to find one of the "
            f"{w.with_event}."
        )
    action = op.clinical_action
    uses = (
        f"At a risk of {threshold:.3f} or more: {action.rstrip('.')}."
        if action
        else "The use case states no action for a flagged patient: the team must agree one before the score "
        "is shown.",
        "Use the score with, never instead of, clinical judgement: it prompts a review, it decides nothing.",
        "A patient below the threshold is not 'safe': "
        + (
            f"about {_per_100(1 - sens)} of every 100 {w.with_event} are not flagged."
            if math.isfinite(sens)
            else "the share of them missed is not estimable."
        ),
    )
    warnings = [f"Not for: {use_case.population.exclusion}"]
    if not decision.get("promoted", False):
        warnings.insert(0, _not_in_use(decision))
    warnings.append(
        f"Subgroups: {fairness_verdict.upper()}"
        + (f": {fairness_reasons[0].rstrip('.')}." if fairness_reasons else ".")
    )
    guard = use_case.guardrails
    warnings.append(
        f"A patient with {guard.max_out_of_range} or more inputs outside the derivation ranges, or more than "
        f"{guard.max_missing_fraction:.0%} of them missing, "
        + (
            "gets no score (the model abstains)."
            if guard.policy == "abstain"
            else "gets a score with a warning."
        )
    )
    warnings.append(
        "Performance changes when practice, case mix or measurement changes: each new batch is checked for "
        "drift against the derivation data."
    )
    other = (
        ("Model version", model_version),
        ("Promotion decision", "promoted" if decision.get("promoted") else "refused"),
        ("Decided at", str(decision.get("at", ""))[:19] or "not recorded"),
        ("Responsible team", use_case.owner),
        ("Use case", f"{use_case.name} (contract {use_case.source_sha256[:12]})"),
        ("Code version", code_version),
        ("Evidence", report_card_file),
    )
    return ModelFacts(
        title=use_case.title,
        model_version=model_version,
        summary=summary,
        mechanism=mechanism,
        performance=tuple((name, _ci(m[k])) for k, name in LABEL_METRICS if k in m),
        performance_notes=tuple(notes),
        uses=uses,
        warnings=tuple(warnings),
        other=other,
    )


def _not_in_use(decision: Mapping) -> str:
    """Why a version that is not champion is not in use, in one short sentence (the first reason; the report
    card lists them all)."""
    failed = [
        str(c["reason"]) for c in decision.get("criteria", ()) if not c["passed"] and c.get("judged", True)
    ]
    reasons = failed or [str(r) for r in decision.get("reasons", ())]
    if decision.get("awaiting_sign_off") or not reasons:
        return f"This version is not in use. {decision_in_words(decision)}"
    more = f"; and {len(reasons) - 1} more reason(s) in the report card" if len(reasons) > 1 else ""
    before = decision.get("champion_before")
    stays = f"the champion stays {before}" if before else "there is no champion"
    return f"This version is not in use: the promotion gate refused it ({reasons[0].rstrip('.')}{more}); {stays}."


def model_facts_html(facts: ModelFacts, *, use_case: UseCase, code_version: str) -> str:
    """The label as one self-contained HTML page (A4 when printed)."""
    return render(
        "model_facts.html.j2",
        title=f"Model Facts: {facts.title}",
        subtitle=f"Model {facts.model_version}, for the clinicians who see its score",
        facts=facts,
        source=SOURCE,
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=facts.model_version,
        code_version=code_version,
    )


def model_facts_markdown(facts: ModelFacts) -> str:
    """The label as Markdown (the asset page's summary)."""
    parts = [f"### Model Facts: {md_escape(facts.title)} ({md_escape(facts.model_version)})\n"]
    for name, lines in facts.sections()[:2]:
        parts.append(f"**{name}**\n\n" + "".join(f"- {md_escape(s)}\n" for s in lines))
    parts.append(
        "**Validation and performance**\n\n| measure | value |\n|---|---|\n"
        + "".join(f"| {md_escape(n)} | {md_escape(v)} |\n" for n, v in facts.performance)
        + "\n"
        + "".join(f"- {md_escape(s)}\n" for s in facts.performance_notes)
    )
    for name, lines in facts.sections()[2:]:
        parts.append(f"**{name}**\n\n" + "".join(f"- {md_escape(s)}\n" for s in lines))
    return "\n".join(parts)
