"""The promotion gate: every condition a challenger must meet to become champion, and the verdict.

A challenger becomes champion only when the validation cohort holds enough outcomes to judge it (at least
``min_events`` events and ``min_non_events`` non-events: below either the gate refuses with "too few
outcomes to judge"), when it meets every absolute minimum of its use case on its 95% CI (the lower bound of
AUROC, sensitivity and specificity; the whole interval of the calibration slope, intercept and
observed/expected ratio within their ranges: calibration is judged by the same logic as discrimination; a
degenerate interval, such as AUROC 0.500 (0.500 to 0.500), is never judged as met), is non-inferior to
the champion on the same patients, has no group large enough to judge whose 95% CI lies wholly below a
subgroup minimum or outside a calibration range, and scores one patient within the latency SLO. Each
condition is a :class:`GateCriterion` with its outcome in words; the Dagster graph turns each group of
criteria into one blocking asset check.

Operational limits of the use case (alert burden: alerts per 100 patient-days, alerts per unit per day,
number needed to evaluate) are judged with the minimums, on the upper 95% bound. A limit with nothing to
judge (no alert raised on the validation cohort, or no burden measured) is recorded as *not judged*: it
does not block, and it is never reported as met.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from clinical_ml.core.display_names import who
from clinical_ml.core.evaluation import ALERT_BURDEN_LIMITS, AlertBurden, MetricWithCI, paired_comparison
from clinical_ml.core.fairness import subgroup_table
from clinical_ml.core.features import ROW_KEY, feature_matrix
from clinical_ml.core.modeling import TrainedModel
from clinical_ml.core.reports import md_escape
from clinical_ml.core.scoring import (
    Guardrails,
    Scorer,
    abstention_rate,
    reason_code_counts,
    scoring_latency_ms,
)
from clinical_ml.core.usecase import OutcomeWords, UseCase
from clinical_ml.core.validation import Evaluation

GATE_GROUPS = ("minimums", "non_inferiority", "subgroups", "latency")


@dataclass(frozen=True)
class GateCriterion:
    """One condition of the promotion gate and its outcome in words. ``judged`` is False for a condition
    with nothing to judge: it passes (it does not block) and its reason says it was not judged."""

    group: str  # one of GATE_GROUPS
    name: str
    passed: bool
    reason: str
    judged: bool = True

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class GateResult:
    """Every criterion of the promotion gate; the challenger passes only if all pass."""

    criteria: tuple[GateCriterion, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def group_passed(self, group: str) -> bool:
        return all(c.passed for c in self.criteria if c.group == group)

    def reasons(self, group: str | None = None) -> list[str]:
        return [c.reason for c in self.criteria if group is None or c.group == group]

    def as_dict(self) -> dict:
        return {"passed": self.passed, "criteria": [c.as_dict() for c in self.criteria]}

    @classmethod
    def from_dict(cls, d: dict) -> "GateResult":
        return cls(tuple(GateCriterion(**c) for c in d["criteria"]))


def _in_range(v: float, rng: tuple[float, float] | list[float]) -> bool:
    return bool(rng[0] <= v <= rng[1])


def evaluability_criterion(y: np.ndarray, criteria: dict, *, words: OutcomeWords) -> list[GateCriterion]:
    """Enough outcomes to judge: at least ``min_events`` events and ``min_non_events`` non-events in the
    validation cohort; below either the gate refuses, whatever the metrics say."""
    events = int(np.sum(y))
    return evaluability_from_counts(events, int(np.size(y) - events), criteria, words=words)


def evaluability_from_counts(
    events: int, non_events: int, criteria: dict, *, words: OutcomeWords
) -> list[GateCriterion]:
    """:func:`evaluability_criterion` from the counts of the validation cohort."""
    need_e, need_n = int(criteria.get("min_events", 1)), int(criteria.get("min_non_events", 1))
    ok = events >= need_e and non_events >= need_n
    counts = (
        f"{events} {words.event if events == 1 else words.events} and {non_events} {words.non_events} in "
        "the validation cohort"
    )
    return [
        GateCriterion(
            "minimums",
            "enough_outcomes_to_judge",
            ok,
            f"{counts}: at least {need_e} {words.events} and {need_n} {words.non_events} are needed to judge"
            if ok
            else f"too few outcomes to judge: {counts}, and at least {need_e} {words.events} and {need_n} "
            f"{words.non_events} are needed; the minimums of discrimination, calibration and Brier score are "
            "not judged",
        )
    ]


def auroc_minimum(evaluation: Evaluation, use_case: UseCase) -> GateCriterion:
    """The gate's AUROC minimum on a stored evaluation: not judged (and not met) when the validation cohort
    has too few outcomes to judge or the interval has no width, as :func:`minimum_criteria` decides."""
    criteria = use_case.success_criteria.model_dump()
    events = evaluation.events_validation
    enough = evaluability_from_counts(
        events, evaluation.n_validation - events, criteria, words=use_case.words
    )[0]
    judged = minimum_criteria(evaluation.metrics_dict(), criteria, evaluable=enough.passed)
    auroc = next(c for c in judged if c.name == "auroc_lower_bound")
    if enough.passed:
        return auroc
    return dataclasses.replace(auroc, reason=f"{auroc.reason}: {enough.reason}")


def _not_judged(name: str, label: str, why: str) -> GateCriterion:
    """A minimum that cannot be judged: it blocks (the model has not shown it meets it) and says why."""
    return GateCriterion("minimums", name, False, f"{label}: not judged ({why})", judged=False)


def _degenerate(m: dict) -> bool:
    return not (math.isfinite(m["lower"]) and math.isfinite(m["upper"])) or m["lower"] == m["upper"]


def minimum_criteria(metrics: dict, criteria: dict, *, evaluable: bool = True) -> list[GateCriterion]:
    """Absolute minimums of the use case, each judged on its 95% CI: AUROC, sensitivity and specificity on
    the lower bound, Brier on the upper bound, and calibration (slope, and intercept and observed/expected
    where set) by the same logic: the whole interval must lie within the range.

    A metric whose interval is degenerate (no width, e.g. AUROC 0.500 (0.500 to 0.500) when every patient
    gets the same risk) or not finite is not judged and blocks; with ``evaluable`` False (too few
    outcomes, :func:`evaluability_criterion`) none of them is judged (the comparison with the champion and
    the operational limits are judged on their own terms)."""
    out = []
    for metric, key, words in (
        ("auroc", "auroc_min", "AUROC"),
        ("sensitivity", "sensitivity_min", "sensitivity"),
        ("specificity", "specificity_min", "specificity"),
    ):
        lo, minimum = metrics[metric]["lower"], float(criteria[key])
        if not evaluable or _degenerate(metrics[metric]):
            out.append(
                _not_judged(
                    f"{metric}_lower_bound",
                    f"{words} (minimum {minimum:.2f})",
                    _why(metrics[metric], evaluable),
                )
            )
            continue
        ok = bool(lo >= minimum)
        out.append(
            GateCriterion(
                "minimums",
                f"{metric}_lower_bound",
                ok,
                f"{words} lower 95% bound {_sided(lo, (minimum,), 3)} {'meets' if ok else 'is below'} the "
                f"minimum {minimum:.2f}",
            )
        )
    brier_max = float(criteria.get("brier_max", 1.0))
    b = metrics["brier"]["upper"]
    ok = bool(b <= brier_max)
    if not evaluable or _degenerate(metrics["brier"]):
        out.append(
            _not_judged(
                "brier_upper_bound",
                f"Brier score (maximum {brier_max:.2f})",
                _why(metrics["brier"], evaluable),
            )
        )
    else:
        out.append(
            GateCriterion(
                "minimums",
                "brier_upper_bound",
                ok,
                f"Brier score upper 95% bound {b:.3f} {'within' if ok else 'above'} the maximum {brier_max:.2f}",
            )
        )
    for metric, key, words in (
        ("calibration_slope", "calibration_slope_range", "calibration slope"),
        ("calibration_intercept", "calibration_intercept_range", "calibration intercept"),
        ("observed_expected_ratio", "observed_expected_range", "observed/expected ratio"),
    ):
        rng = criteria.get(key)
        if rng is None:
            continue
        m = metrics[metric]
        if not evaluable or _degenerate(m):
            out.append(
                _not_judged(
                    f"{metric}_in_range", f"{words} (range {rng[0]:g} to {rng[1]:g})", _why(m, evaluable)
                )
            )
            continue
        v, lo, hi = m["value"], m["lower"], m["upper"]
        ok = _in_range(lo, rng) and _in_range(hi, rng)
        if ok:
            verdict = "the whole interval lies within"
        elif lo > rng[1] or hi < rng[0]:
            verdict = "the whole interval lies outside"
        else:
            verdict = "the interval is not wholly within"
        out.append(
            GateCriterion(
                "minimums",
                f"{metric}_in_range",
                ok,
                f"{words} {v:.2f} (95% CI {_sided(lo, tuple(rng))} to {_sided(hi, tuple(rng))}): {verdict} the "
                f"range {rng[0]:g} to {rng[1]:g} "
                "(calibration is judged like discrimination: the whole 95% CI must meet the criterion)",
            )
        )
    return out


def _sided(x: float, limits: tuple[float, ...], digits: int = 2) -> str:
    """``x`` with at least ``digits`` decimals and as many more as it takes to read on the same side of each
    limit as it is (a lower bound of 0.6996 is not "0.70" beside a minimum of 0.70)."""
    for d in range(digits, 9):
        text = f"{x:.{d}f}"
        if all((float(text) > t) == (x > t) and (float(text) < t) == (x < t) for t in limits):
            return text
    return repr(x)


def _why(m: dict, evaluable: bool) -> str:
    if not evaluable:
        return "too few outcomes to judge"
    if math.isfinite(m["lower"]) and m["lower"] == m["upper"]:
        return (
            f"its 95% CI {m['lower']:.3f} to {m['upper']:.3f} has no width: the validation cohort cannot "
            "measure it"
        )
    return "its value or 95% confidence interval could not be computed"


def _bound_words(bound: float, limit: float) -> str:
    """``bound`` with enough digits that it reads as above ``limit`` when it is (4.001 is not "4.00")."""
    if math.isinf(bound):
        return "infinite"
    for digits in range(2, 9):
        text = f"{bound:.{digits}f}"
        if (float(text) > limit) == (bound > limit):
            return text
    return repr(bound)


def operational_criteria(
    burden: AlertBurden | dict | None,
    criteria: dict,
    *,
    words: OutcomeWords | None = None,
    evaluable: bool = True,
) -> list[GateCriterion]:
    """The use case's operational limits (alert burden at the operating point), one criterion per limit set.

    A maximum is met when the upper bound of its 95% CI is at or below it. A limit is *not judged* (passes,
    does not block, says so) when no burden was measured, when no prediction of the validation cohort was
    flagged (there is no burden to judge), when its value or interval could not be computed, or, for the
    number needed to evaluate (which counts outcomes), when the validation cohort has too few outcomes to
    judge (``evaluable`` false, :func:`evaluability_criterion`).

    Parameters
    ----------
    burden
        :class:`clinical_ml.core.evaluation.AlertBurden` of the validation cohort (or its ``as_dict``).
    criteria
        The use case's success criteria (``SuccessCriteria.model_dump()``).
    words
        The outcome's words (the number needed to evaluate is "patients flagged per <event> found").
    """
    if isinstance(burden, dict):
        burden = AlertBurden.from_dict(burden)
    event = words.event if words is not None else "event"
    out = []
    for metric, key, name in ALERT_BURDEN_LIMITS:
        limit = criteria.get(key)
        if limit is None:
            continue
        limit = float(limit)
        flagged = "patients flagged" if burden is None or burden.one_row_per_stay else "alerts"
        label = f"{name} ({flagged} per {event} found)" if metric == "number_needed_to_evaluate" else name
        estimate: MetricWithCI | None = None if burden is None else getattr(burden, metric)
        why = None
        if burden is None:
            why = "the alert burden was not measured for this model"
        elif not burden.judged:
            why = (
                "no prediction of the validation cohort was flagged at the operating point, so there is no "
                "alert burden to judge"
            )
        elif metric == "number_needed_to_evaluate" and not evaluable:
            why = "too few outcomes to judge"
        elif estimate is None and metric == "alerts_per_unit_day" and burden.undated_rows:
            why = (
                f"the day on the ward of {burden.undated_rows} of the {burden.prediction_rows} prediction rows "
                "is not known: their batch is not a dated delivery"
            )
        elif estimate is None or math.isnan(estimate.upper):
            why = "its value or 95% confidence interval could not be computed"
        if why is not None:
            out.append(
                GateCriterion(
                    "minimums",
                    f"{metric}_upper_bound",
                    True,
                    f"{label}: not judged ({why}); the maximum is {limit:g}",
                    judged=False,
                )
            )
            continue
        assert estimate is not None
        ok = bool(estimate.upper <= limit)
        if math.isinf(estimate.upper):
            which = "no" if math.isinf(estimate.value) else "in some resamples of the patients no"
            why = f" ({which} flagged prediction was followed by the outcome, {event})"
        else:
            why = ""
        out.append(
            GateCriterion(
                "minimums",
                f"{metric}_upper_bound",
                ok,
                f"{label} upper 95% bound {_bound_words(estimate.upper, limit)}{why} "
                f"{'at or below' if ok else 'above'} the maximum {limit:g}",
            )
        )
    return out


def non_inferiority_criteria(
    challenger_metrics: dict,
    champion_card: dict | None,
    *,
    comparison: dict | None,
    auroc_margin: float,
    slope_margin: float = 0.1,
    intercept_margin: float = 0.1,
) -> list[GateCriterion]:
    """Non-inferiority to the champion.

    With ``comparison`` (:func:`clinical_ml.core.evaluation.paired_comparison` of both models on the same
    validation patients, each ``{"value", "lower", "upper"}``): the lower 95% bound of the AUROC difference
    must be above ``-auroc_margin`` and the calibration errors (|slope - 1|, |intercept|) may grow by at most
    their margins. Without it (the champion cannot score these rows), the champion card's own validation
    figures are compared, point to point.
    """
    if champion_card is None:
        return [
            GateCriterion(
                "non_inferiority",
                "no_champion",
                True,
                "no champion yet: the first model meeting every minimum becomes champion",
            )
        ]
    champ = champion_card.get("version", "champion")
    if comparison is not None:
        d = comparison["auroc_difference"]
        ok_auc = bool(d["lower"] >= -auroc_margin)
        sd = comparison["slope_error_difference"]["value"]
        idf = comparison["intercept_error_difference"]["value"]
        ok_i = bool(idf <= intercept_margin)
        return [
            GateCriterion(
                "non_inferiority",
                "auroc_non_inferior",
                ok_auc,
                f"AUROC difference vs champion {champ} on the same patients {d['value']:+.3f} "
                f"(95% CI {d['lower']:+.3f} to {d['upper']:+.3f}): "
                f"{'non-inferior' if ok_auc else 'not shown non-inferior'} within a margin of {auroc_margin:.2f}",
            ),
            _slope_criterion(sd, slope_margin),
            GateCriterion(
                "non_inferiority",
                "calibration_intercept_non_inferior",
                ok_i,
                f"calibration-in-the-large error {'changes' if ok_i else 'grows'} by {idf:+.3f} vs the champion "
                f"(margin {intercept_margin:.2f})",
            ),
        ]
    cm = champion_card["metrics"]
    chal, ref = challenger_metrics["auroc"]["value"], cm["auroc"]["value"]
    ok_auc = bool(chal >= ref - auroc_margin)
    out = [
        GateCriterion(
            "non_inferiority",
            "auroc_non_inferior",
            ok_auc,
            f"AUROC {chal:.3f} vs champion {ref:.3f} (each on its own validation cohort): "
            f"{'non-inferior' if ok_auc else 'inferior'} within a margin of {auroc_margin:.2f}",
        )
    ]
    if "calibration_slope" in cm and "calibration_slope" in challenger_metrics:
        sd = abs(challenger_metrics["calibration_slope"]["value"] - 1) - abs(
            cm["calibration_slope"]["value"] - 1
        )
        out.append(_slope_criterion(sd, slope_margin))
    return out


def _slope_criterion(slope_error_change: float, margin: float) -> GateCriterion:
    """The challenger's calibration slope error (|slope - 1|) may not grow by more than ``margin``."""
    ok = bool(slope_error_change <= margin)
    return GateCriterion(
        "non_inferiority",
        "calibration_slope_non_inferior",
        ok,
        f"calibration slope error {'changes' if ok else 'grows'} by {slope_error_change:+.3f} vs the champion "
        f"(margin {margin:.2f})",
    )


def subgroup_criteria(rows: list[dict], *, min_cell_size: int) -> list[GateCriterion]:
    """Subgroup minimums and calibration ranges where groups are large enough.

    ``rows`` are subgroup rows (``attribute``, ``group``, ``n``, ``suppressed``, ``flags``, ``failures``) as
    produced by :func:`clinical_ml.core.fairness.subgroup_table`; a group fails when its whole CI lies
    below a use-case minimum or outside an acceptable calibration range. Groups under ``min_cell_size``
    (or without both outcomes) are not judged; with no group to judge the criterion is not judged.
    """
    judged = [r for r in rows if r["attribute"] != "overall" and not r["suppressed"]]
    skipped = [r for r in rows if r["attribute"] != "overall" and r["suppressed"]]
    failing = [
        f"{who(r['attribute'], r['group'])}: {f}"
        for r in judged
        for f in (r["failures"] if "failures" in r else [f for f in r["flags"] if "subgroup minimum" in f])
    ]
    tail = f"; {len(skipped)} groups too small to judge (under {min_cell_size} or one outcome only)"
    if not judged:
        return [
            GateCriterion(
                "subgroups",
                "subgroup_minimums",
                True,
                "not judged: no audited group is large enough to judge" + tail,
                judged=False,
            )
        ]
    ok = not failing
    return [
        GateCriterion(
            "subgroups",
            "subgroup_minimums",
            ok,
            (
                f"none of the {len(judged)} audited groups large enough to judge fails a subgroup minimum or a "
                "calibration range (a group fails when its whole 95% CI lies below a minimum or outside a range)"
                if ok
                else f"{len(failing)} subgroup criteria missed: " + "; ".join(failing)
            )
            + tail,
        )
    ]


def latency_criterion(
    p99_ms: float, *, slo_ms: float, wall_p99_ms: float | None = None
) -> list[GateCriterion]:
    """Scoring latency SLO: one patient scored with reasons, 99th percentile, in process.

    Judge the scorer's own time (CPU time of the scoring thread) so that a busy shared machine cannot refuse
    a model; the wall-clock p99, when given, is reported beside it.
    """
    ok = bool(p99_ms <= slo_ms)
    wall = f" (wall clock {wall_p99_ms:.2f} ms on this machine)" if wall_p99_ms is not None else ""
    return [
        GateCriterion(
            "latency",
            "scoring_latency_p99",
            ok,
            f"one-patient score with reasons p99 {p99_ms:.2f} ms {'within' if ok else 'above'} the SLO of "
            f"{slo_ms:g} ms{wall}",
        )
    ]


def ranking_criterion(
    p: np.ndarray, y: np.ndarray, *, best_iteration: int, words: str
) -> list[GateCriterion]:
    """A model giving (nearly) every validation patient the same risk learned nothing: say so, with the
    counts, before the minimums it then misses (an AUROC of exactly 0.500 reads like a coin, not a cause)."""
    distinct = int(np.unique(np.round(p, 12)).size) if p.size else 0
    if distinct > 1:
        return []
    return [
        GateCriterion(
            "minimums",
            "model_ranks_patients",
            False,
            f"the model gives every one of the {len(y)} validation patients the same risk (it stopped after "
            f"{best_iteration} boosting {'round' if best_iteration == 1 else 'rounds'}): it found nothing in the "
            f"derivation cohort to rank patients by, so the {int(y.sum())} {words} in validation cannot be told "
            "apart from the others; more outcome events (more data or a longer period) are needed",
        )
    ]


def evaluate_gate(*criteria_lists: list[GateCriterion]) -> GateResult:
    """Combine the gate's criteria (from the functions above) into one result."""
    return GateResult(tuple(c for lst in criteria_lists for c in lst))


def _subgroup_dicts(rows: list) -> list[dict]:
    return [
        {
            "attribute": r.attribute,
            "group": r.group,
            "n": r.n,
            "suppressed": r.suppressed,
            "flags": list(r.flags),
            "failures": list(r.failures),
        }
        for r in rows
    ]


@dataclass(frozen=True)
class GateInputs:
    """What the promotion gate judges: the challenger on the validation cohort, and the champion if any."""

    y: np.ndarray  # outcome labels of the validation rows
    x: np.ndarray  # their feature matrix, in the challenger's feature order
    groups: dict[str, np.ndarray]  # audited attribute -> group label per validation row
    metrics: dict  # the challenger's validation metrics with CIs
    challenger: TrainedModel
    threshold: float
    training_ranges: dict[str, tuple[float, float]]
    champion: TrainedModel | None = None
    champion_card: dict | None = None
    champion_x: np.ndarray | None = None  # validation rows in the champion's feature order
    alert_burden: AlertBurden | None = None  # at the operating point on the validation cohort
    patients: np.ndarray | None = None  # the patient of each validation row (resampled together)
    # the challenger's risk on these rows when it is not its prediction of ``x`` (e.g. a recalibration judged
    # out of fold: each patient's risk from a fit that did not see the patient)
    risk: np.ndarray | None = None


def judge_challenger(
    inputs: GateInputs,
    use_case: UseCase,
    *,
    n_boot: int,
    seed: int,
    latency_repeats: int = 300,
    auroc_margin: float | None = None,
) -> tuple[GateResult, dict]:
    """Run every criterion of the promotion gate; returns the result and the figures behind it
    (paired comparison, latency, abstention on the validation cohort)."""
    promo = use_case.promotion
    sg = use_case.subgroups
    p = inputs.risk if inputs.risk is not None else inputs.challenger.predict(inputs.x)
    comparison = None
    if inputs.champion is not None and inputs.champion_x is not None:
        p_champ = inputs.champion.predict(inputs.champion_x)
        comparison = {
            k: v.as_dict()
            for k, v in paired_comparison(inputs.y, p, p_champ, n_boot=n_boot, seed=seed).items()
        }
    rows = subgroup_table(
        inputs.y,
        p,
        inputs.threshold,
        inputs.groups,
        intersections=False,
        min_cell_size=sg.min_cell_size,
        auroc_min=sg.auroc_min,
        sensitivity_min=sg.sensitivity_min,
        n_boot=n_boot,
        seed=seed,
        words=use_case.words,
        observed_expected_range=sg.observed_expected_range,
        calibration_slope_range=sg.calibration_slope_range,
        clusters=inputs.patients,
    ).rows
    scorer = Scorer(
        inputs.challenger,
        inputs.threshold,
        inputs.training_ranges,
        Guardrails(**use_case.guardrails.model_dump()),
    )
    latency = scoring_latency_ms(scorer, inputs.x[:200], repeats=latency_repeats)
    scores = scorer.score(inputs.x, n_reasons=0)
    criteria = use_case.success_criteria.model_dump()
    enough = evaluability_criterion(inputs.y, criteria, words=use_case.words)
    gate = evaluate_gate(
        enough,
        ranking_criterion(
            p, inputs.y, best_iteration=inputs.challenger.best_iteration, words=use_case.words.events
        ),
        minimum_criteria(inputs.metrics, criteria, evaluable=enough[0].passed),
        operational_criteria(inputs.alert_burden, criteria, words=use_case.words, evaluable=enough[0].passed),
        non_inferiority_criteria(
            inputs.metrics,
            inputs.champion_card,
            comparison=comparison,
            auroc_margin=promo.auroc_non_inferiority_margin if auroc_margin is None else auroc_margin,
            slope_margin=promo.calibration_slope_margin,
            intercept_margin=promo.calibration_intercept_margin,
        ),
        subgroup_criteria(_subgroup_dicts(list(rows)), min_cell_size=sg.min_cell_size),
        latency_criterion(
            latency["p99_cpu_ms"], slo_ms=promo.latency_p99_ms_max, wall_p99_ms=latency["p99_ms"]
        ),
    )
    extras = {
        "paired_comparison": comparison,
        "latency_ms": latency,
        "abstention_rate_validation": abstention_rate(scores),
        "reason_codes_validation": reason_code_counts(scores),
    }
    return gate, extras


def gate_inputs(
    validation_predictions: pl.DataFrame,
    features: pl.DataFrame,
    *,
    use_case: UseCase,
    metrics: dict,
    threshold: float,
    challenger: TrainedModel,
    training_ranges: dict[str, tuple[float, float]],
    champion: TrainedModel | None = None,
    champion_card: dict | None = None,
    alert_burden: AlertBurden | None = None,
) -> GateInputs:
    """The validation cohort as the gate judges it: the challenger's rows, and the champion's where it can
    score them (every feature it needs still exists; otherwise it is compared on its card's figures); the
    challenger's alert burden (``Evaluation.alert_burden``) for the operational limits."""
    held = validation_predictions.filter(pl.col("split") == "held_out")
    patient = ["subject_id"] if "subject_id" in held.columns else []
    rows = held.select(*ROW_KEY, "label", *use_case.subgroups.attributes, *patient).join(
        features.drop(patient, strict=False), on=ROW_KEY, how="inner"
    )
    champion_x = (
        feature_matrix(rows, champion.feature_names)
        if champion is not None and set(champion.feature_names) <= set(rows.columns)
        else None
    )
    return GateInputs(
        y=rows["label"].cast(pl.Int8).to_numpy(),
        x=feature_matrix(rows, challenger.feature_names),
        groups={
            a: rows[a].cast(pl.String).fill_null("Unknown").to_numpy() for a in use_case.subgroups.attributes
        },
        metrics=metrics,
        challenger=challenger,
        threshold=threshold,
        training_ranges=training_ranges,
        champion=champion,
        champion_card=champion_card,
        champion_x=champion_x,
        alert_burden=alert_burden,
        patients=rows["subject_id"].to_numpy() if "subject_id" in rows.columns else None,
    )


def criterion_result(criterion: dict) -> str:
    """A recorded criterion's result in words: pass, **FAIL**, or not judged (nothing to judge)."""
    if not criterion.get("judged", True):
        return "not judged"
    return "pass" if criterion["passed"] else "**FAIL**"


def gate_markdown(decision: dict, *, champion_now: str | None, history: list[dict] | None = None) -> str:
    """The decision and each part of the gate in a Markdown table (newest decisions after it, if given)."""
    verdict = "Promoted" if decision["promoted"] else "Not promoted"
    rows = "".join(
        f"| {c['group'].replace('_', ' ')} | {criterion_result(c)} | {md_escape(c['reason'])} |\n"
        for c in decision.get("criteria", [])
    )
    md = (
        f"**{verdict}**: challenger {decision['challenger']} "
        f"(champion before: {decision['champion_before'] or 'none'}; now: {champion_now or 'none'})\n\n"
        f"| part of the gate | result | reason |\n|---|---|---|\n{rows}"
    )
    if history:
        md += "\n**Recent decisions**\n\n| decided at | challenger | promoted |\n|---|---|---|\n" + "".join(
            f"| {h['at'][:19]} | {h['challenger']} | {'yes' if h['promoted'] else 'no'} |\n"
            for h in reversed(history)
        )
    return md
