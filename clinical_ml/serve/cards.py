"""CDS Hooks cards a clinician can use: the risk and its band, the reasons in plain words, what the use case
says to do, where the model's report card is, or why the patient was not scored.

Every card names the model version (in ``source.label`` and in an extension), and offers the coded override
reasons (:data:`OVERRIDE_REASONS`) that the feedback endpoint records.
"""

import math
import re
import uuid
from dataclasses import dataclass

from clinical_ml.core.reports import md_escape
from clinical_ml.core.scoring import (
    ABSTAIN_MISSINGNESS,
    ABSTAIN_OUT_OF_RANGE,
    WARN_MISSINGNESS,
    WARN_OUT_OF_RANGE,
    Score,
)
from clinical_ml.core.usecase import UseCase

OVERRIDE_SYSTEM = "urn:clinical-ml:override-reason"
# The reasons a clinician may give for not following a card (CDS Hooks ``overrideReasons``): codes only, so
# the de-identified layer can count them; a free-text comment stays in the phi zone.
OVERRIDE_REASONS: dict[str, str] = {
    "already-aware": "Already aware of this risk; care plan in place",
    "not-applicable": "Does not apply to this patient",
    "data-wrong": "The data behind the score are wrong or out of date",
    "risk-disagree": "My clinical judgement of the risk differs",
    "too-late": "Too late to act on",
}
USE_CASE_SYSTEM = "urn:clinical-ml:use-case"
MODEL_VERSION_EXTENSION = "clinical-ml-model-version"
SUMMARY_MAX = 140  # CDS Hooks: summary SHALL be under 140 characters


@dataclass(frozen=True)
class Band:
    """Where a risk sits against the use case's operating threshold."""

    indicator: str  # CDS Hooks indicator: info, warning or critical
    words: str


def risk_band(risk: float, threshold: float, *, critical_multiple: float = 2.0) -> Band:
    """``info`` below the operating threshold, ``warning`` at or above it, ``critical`` at or above
    ``critical_multiple`` times it (never when that is above 1)."""
    critical_at = critical_multiple * threshold
    if risk >= threshold and critical_at <= 1 and risk >= critical_at:
        return Band("critical", f"at or above {critical_multiple:g} times the operating threshold")
    if risk >= threshold:
        return Band("warning", "at or above the operating threshold")
    return Band("info", "below the operating threshold")


def percent(p: float) -> str:
    if p < 0.01:
        return "<1%"
    if p > 0.99:
        return ">99%"
    return f"{p:.0%}"


def clinical_action(use_case: UseCase) -> str | None:
    """What the team does for a flagged patient: the use case's ``operating_point.clinical_action``, else what
    its clinical question says the prediction is for (the clause after "so that")."""
    stated = use_case.operating_point.clinical_action
    if stated:
        text = " ".join(stated.split())
        return text if text.endswith(".") else text + "."
    m = re.search(r"\bso that\b\s*(.+?)[?.]?\s*$", use_case.clinical_question, flags=re.S)
    if not m:
        return None
    text = " ".join(m.group(1).split())
    return text[:1].upper() + text[1:] + "." if text else None


def _source(use_case: UseCase, version: str | None, report_url: str | None) -> dict:
    label = f"clinical_ml {use_case.name}" + (f" model {version}" if version else "")
    source: dict = {
        "label": label,
        "topic": {"system": USE_CASE_SYSTEM, "code": use_case.name, "display": use_case.title},
    }
    if report_url:
        source["url"] = report_url
    return source


def _base_card(
    use_case: UseCase,
    *,
    summary: str,
    detail: str,
    indicator: str,
    version: str | None,
    report_url: str | None,
) -> dict:
    card: dict = {
        "uuid": str(uuid.uuid4()),
        "summary": summary if len(summary) < SUMMARY_MAX else summary[: SUMMARY_MAX - 2] + "…",
        "detail": detail,
        "indicator": indicator,
        "source": _source(use_case, version, report_url),
        "overrideReasons": [
            {"system": OVERRIDE_SYSTEM, "code": c, "display": d} for c, d in OVERRIDE_REASONS.items()
        ],
    }
    if report_url:
        card["links"] = [
            {
                "label": "Model report card (validation, fairness, limits)",
                "url": report_url,
                "type": "absolute",
            }
        ]
    if version:
        card["extension"] = {MODEL_VERSION_EXTENSION: version}
    return card


def guardrail_words(score: Score, *, max_out_of_range: int, max_missing_fraction: float) -> str | None:
    """The guardrail's finding in plain words (None when it found nothing)."""
    code = score.reason_code
    if code in (ABSTAIN_MISSINGNESS, WARN_MISSINGNESS):
        share = next((f.partition(":")[2] for f in score.flags if f.startswith("missing_fraction:")), "")
        shown = f" ({float(share):.0%} of them)" if share else ""
        return (
            f"too many of the model's measurements are missing{shown}; the model is not used above "
            f"{max_missing_fraction:.0%}"
        )
    if code in (ABSTAIN_OUT_OF_RANGE, WARN_OUT_OF_RANGE):
        n = sum(f.startswith("out_of_range:") for f in score.flags)
        return (
            f"{n} values lie outside the ranges the model was trained on (the limit is "
            f"{max_out_of_range - 1}): the model has no basis for this patient"
        )
    return None


def scored_card(
    use_case: UseCase,
    score: Score,
    *,
    version: str,
    threshold: float,
    report_url: str | None,
    guardrail: str | None = None,
    not_used: int = 0,
    critical_multiple: float = 2.0,
) -> dict:
    """The card of a scored patient."""
    band = risk_band(score.risk, threshold, critical_multiple=critical_multiple)
    words = use_case.words
    pct = percent(score.risk)
    summary = f"{use_case.title}: risk {pct} ({'high' if score.flagged else 'not high'})"
    lines = [
        f"**Risk of {md_escape(words.event)}: {pct}**, {band.words} of {percent(threshold)}.",
    ]
    if score.reasons:
        lines += ["", "What raises it most:"]
        lines += [f"- {md_escape(r['text'])}" for r in score.reasons]
    action = clinical_action(use_case)
    if action and score.flagged:
        lines += ["", f"Suggested action: {md_escape(action)}"]
    if guardrail:
        lines += ["", f"Scored with a warning: {md_escape(guardrail)}."]
    lines += [
        "",
        f"Predicted from the chart now; the model was built and validated for "
        f"{md_escape(use_case.prediction_time.describe())}. Model {md_escape(use_case.name)} version "
        f"{md_escape(version)}."
        + (f" {not_used} observations were not used (unknown code, unit or status)." if not_used else ""),
    ]
    return _base_card(
        use_case,
        summary=summary,
        detail="\n".join(lines),
        indicator=band.indicator,
        version=version,
        report_url=report_url,
    )


def not_scored_card(use_case: UseCase, reason: str, *, version: str | None, report_url: str | None) -> dict:
    """The card of a patient the service did not score, with the reason in plain words."""
    detail = f"Not scored: {md_escape(reason)}."
    if version:
        detail += f"\n\nModel {md_escape(use_case.name)} version {md_escape(version)}."
    return _base_card(
        use_case,
        summary=f"{use_case.title}: not scored"[: SUMMARY_MAX - 1],
        detail=detail,
        indicator="info",
        version=version,
        report_url=report_url,
    )


def hook_response(cards: list[dict], *, version: str | None) -> dict:
    """A CDS Hooks response; its extension names the model version (none when no model was used)."""
    return {"cards": cards, "extension": {MODEL_VERSION_EXTENSION: version}}


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
