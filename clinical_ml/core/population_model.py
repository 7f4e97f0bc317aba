"""Would a population-specific model serve one group of patients better than the single model?

The subcohort analysis can end in "use a population-specific model for certain patients". This module
tests that option on the group the analysis points at, with the derivation cohort only for fitting and that
group's validation patients only for judging:

* the **single model** (the challenger), which per-group thresholds can adjust for the group;
* a **separate model**: the same procedure (predictors, parameters, early stopping) on the group's
  derivation patients alone;
* a **model with the group as a predictor**: the same procedure on every derivation patient, with membership
  of the group added as a predictor, so that the trees can form its interactions with every other one.

Per-group thresholds change who is flagged in a group, not how well the model ranks the group's patients
(AUROC) nor how close its risks are to what happens (observed/expected ratio, O/E): those two are what a
population-specific model could add, so they are what is compared. Each candidate minus the single model,
on the same patients, with a paired bootstrap that resamples patients (all their admissions together). Two
candidates and two measures make four comparisons, so each interval is at the Bonferroni level
1 - 0.05 / 4: a candidate called better "beyond chance" is so with 95% confidence over all four.

Which group
-----------
:func:`choose_group`: among the groups of the audited attributes (not intersections) that are large enough
to judge in the validation cohort (not suppressed) and have at least ``min_cell_size`` outcome events and as
many non-events in the derivation cohort, the one the fairness analysis fails (whole 95% CI below a
subgroup minimum or outside a calibration range), else one it flags (worse than all patients beyond chance);
among several, the one with the most outcome events in the validation cohort. When none is flagged, the
largest such group (most validation admissions). Patients whose attribute is not recorded ("Unknown") are
not a population and are never chosen.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from clinical_ml.core import bootstrap
from clinical_ml.core.display_names import who
from clinical_ml.core.evaluation import auroc
from clinical_ml.core.features import ROW_KEY, feature_matrix
from clinical_ml.core.modeling import DEFAULT_PARAMS, TrainedModel, refit_rounds, train_model

Estimate = tuple[float, float, float]  # value, lower, upper
FAMILY_LEVEL = 0.95
"""Confidence of the comparisons together (Bonferroni over candidates x measures)."""
IN_GROUP = "population__in_group"
"""The predictor added to the model with the group as a predictor (1 in the group, 0 outside)."""
UNKNOWN = "Unknown"
KINDS = {
    "separate": "a separate model fitted on the group's derivation patients alone",
    "interaction": "one model of all derivation patients with membership of the group as an added predictor "
    "(the trees can form its interactions with every other predictor)",
}
NAMES = {"separate": "Separate model", "interaction": "Model with the group as a predictor"}


@dataclass(frozen=True)
class CandidateComparison:
    """One population-specific candidate against the single model on the group's validation patients.

    Differences are candidate minus single model; ``calibration_gain`` is |ln O/E| of the single model minus
    that of the candidate (positive: the candidate's risks are closer to what happens)."""

    kind: str  # a key of KINDS
    fitted_rows: int
    fitted_events: int
    trees: int
    auroc_single: float
    auroc_candidate: float
    auroc_difference: Estimate
    oe_single: float
    oe_candidate: float
    oe_difference: Estimate
    calibration_gain: Estimate

    @property
    def name(self) -> str:
        return NAMES[self.kind]

    def better(self) -> list[str]:
        """The measures on which the candidate is better beyond chance (its interval excludes 0)."""
        return [
            w
            for w, lo in (
                ("discrimination", self.auroc_difference[1]),
                ("calibration", self.calibration_gain[1]),
            )
            if lo > 0
        ]

    def worse(self) -> list[str]:
        """The measures on which the single model is better beyond chance."""
        return [
            w
            for w, hi in (
                ("discrimination", self.auroc_difference[2]),
                ("calibration", self.calibration_gain[2]),
            )
            if hi < 0
        ]

    def sentence(self) -> str:
        """The comparison in words, true for the numbers it prints."""
        d, g = self.auroc_difference, self.calibration_gain
        numbers = (
            f"AUROC {self.auroc_candidate:.3f} vs {self.auroc_single:.3f} for the single model (difference "
            f"{_signed(d[0])}, CI {_signed(d[1])} to {_signed(d[2])}); O/E {self.oe_candidate:.2f} vs "
            f"{self.oe_single:.2f} (closer to 1 by {_signed(g[0])} on the log scale, CI {_signed(g[1])} to "
            f"{_signed(g[2])})"
        )
        better, worse = self.better(), self.worse()
        if not (math.isfinite(d[1]) and math.isfinite(g[1])):
            judged = "not judged: too few resamples with both outcomes to give an interval"
        elif better and worse:
            judged = f"better beyond chance in {better[0]} but worse in {worse[0]}"
        elif better:
            judged = f"better beyond chance in {' and '.join(better)}" + (
                "" if len(better) == 2 else f"; neither better nor worse beyond chance in {_other(better[0])}"
            )
        elif worse:
            judged = f"worse beyond chance in {' and '.join(worse)}" + (
                "" if len(worse) == 2 else f"; neither better nor worse beyond chance in {_other(worse[0])}"
            )
        else:
            judged = (
                "neither better nor worse beyond chance in discrimination or calibration (the intervals of the "
                "AUROC difference and of the gain in calibration both cover 0)"
            )
        return f"{self.name}: {numbers}: {judged}."

    def as_dict(self) -> dict:
        return {**self.__dict__}

    @classmethod
    def from_dict(cls, d: dict) -> "CandidateComparison":
        est = ("auroc_difference", "oe_difference", "calibration_gain")
        return cls(**{k: (tuple(v) if k in est else v) for k, v in d.items()})  # type: ignore[arg-type]


@dataclass(frozen=True)
class PopulationModelComparison:
    """The comparison of the model version's population-specific candidates for one group (``group`` is
    None when no audited group has enough outcomes; ``why`` then says so)."""

    model_version: str
    attribute: str | None
    group: str | None
    why: str
    validation_rows: int = 0
    validation_patients: int = 0
    validation_events: int = 0
    group_threshold: float | None = None  # the per-group threshold the fairness analysis recommends
    candidates: tuple[CandidateComparison, ...] = ()
    level: float = FAMILY_LEVEL
    n_boot: int = 0

    @property
    def who(self) -> str:
        return who(self.attribute or "", str(self.group))

    def recommendation(self) -> str:
        """What the panel can do about it, in one sentence true for the numbers of the comparison."""
        if self.group is None or not self.candidates:
            return self.why
        helps = [c for c in self.candidates if c.better() and not c.worse()]
        mixed = [c for c in self.candidates if c.better() and c.worse()]
        if helps:
            what = " and ".join(f"{c.name.lower()} ({' and '.join(c.better())})" for c in helps)
            return (
                f"A population-specific model is better beyond chance for {self.who}: {what}. The panel may "
                "consider it for these patients; it is not deployed by this analysis, and would need its own "
                "validation and sign-off before use."
            )
        if mixed:
            c = mixed[0]
            return (
                f"No clear gain for {self.who}: the {c.name.lower()} is better beyond chance in "
                f"{c.better()[0]} but worse in {c.worse()[0]}; keep one model unless the panel weighs "
                f"{c.better()[0]} above {c.worse()[0]} for these patients."
            )
        worse = sorted({w for c in self.candidates for w in c.worse()})
        why = (
            f"the single model is better beyond chance in {' and '.join(worse)}"
            if worse
            else "the intervals of the AUROC difference and of the gain in calibration all cover 0"
        )
        return (
            f"No evidence that a separate model helps {self.who}: {why}. Keep one model (with per-group "
            "thresholds where the panel approves them)."
        )

    def as_dict(self) -> dict:
        return {**self.__dict__, "candidates": [c.as_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "PopulationModelComparison":
        return cls(
            **{
                **d,
                "candidates": tuple(CandidateComparison.from_dict(c) for c in d.get("candidates", ())),
            }
        )


def _other(measure: str) -> str:
    return "calibration" if measure == "discrimination" else "discrimination"


def _signed(x: float, digits: int = 3) -> str:
    """``x`` with a sign and enough digits that a non-zero value never reads as 0 (an interval bound
    of +0.0004 shows as +0.0004, not +0.000, so "excludes 0" can be read off the text)."""
    if not math.isfinite(x):
        return "n/a"
    for d in range(digits, 9):
        if x == 0 or round(x, d) != 0:
            return f"{x:+.{d}f}"
    return f"{x:+.2e}"


def group_labels(frame: pl.DataFrame, attribute: str) -> np.ndarray:
    """The group of each row as the fairness analysis names it (missing: ``Unknown``)."""
    return frame[attribute].cast(pl.String).fill_null(UNKNOWN).to_numpy()


def _outcome_counts(frame: pl.DataFrame, attribute: str) -> dict[str, tuple[int, int]]:
    """(events, non-events) of each group of ``attribute`` in ``frame``."""
    y = frame["boolean_value"].cast(pl.Int8).to_numpy()
    groups = group_labels(frame, attribute)
    return {
        g: (int(y[groups == g].sum()), int((groups == g).sum() - y[groups == g].sum()))
        for g in np.unique(groups)
    }


def choose_group(
    fairness: dict, derivation: pl.DataFrame, *, attributes: Sequence[str], min_cell_size: int
) -> tuple[str | None, str | None, str]:
    """The group to try a population-specific model for, and why (the rule of the module docstring).

    Parameters
    ----------
    fairness : dict
        The subcohort analysis of the model (``fairness.json``: its ``rows``).
    derivation : polars.DataFrame
        Derivation rows with ``boolean_value`` and the audited attributes.
    attributes : sequence of str
        The audited attributes, in the use case's order (ties are broken by it, then by group name).
    min_cell_size : int
        Fewest outcome events, and non-events, a group needs in the derivation cohort to fit a model on.

    Returns
    -------
    tuple
        ``(attribute, group, why)``; attribute and group None when no group qualifies.
    """
    order = {a: i for i, a in enumerate(attributes)}
    rows = [
        r
        for r in fairness["rows"]
        if r["attribute"] in order and not r.get("intersection", False) and not r["suppressed"]
    ]
    counts = {a: _outcome_counts(derivation, a) for a in order if a in derivation.columns}
    total = derivation.height

    def fit_problem(r: dict) -> str | None:
        if r["group"] == UNKNOWN:
            return "not a population (attribute not recorded)"
        events, non_events = counts.get(r["attribute"], {}).get(r["group"], (0, 0))
        if events < min_cell_size or non_events < min_cell_size:
            # a small cell's count is never shown (as in the subcohort analysis)
            return f"fewer than {min_cell_size} outcome events or non-events in the derivation cohort"
        if events + non_events >= total:
            return "every derivation patient is in it"
        return None

    def tie(r: dict) -> tuple:
        return (order[r["attribute"]], r["group"])

    failing = [r for r in rows if r.get("failures")]
    flagged = [r for r in rows if r.get("flags") and not r.get("failures")]
    skipped: list[str] = []
    for tier, words in ((failing, "fails a subgroup minimum or calibration range"), (flagged, "is flagged")):
        for r in sorted(tier, key=lambda r: (-(r["events"] or 0), *tie(r))):
            problem = fit_problem(r)
            if problem is None:
                return (
                    r["attribute"],
                    r["group"],
                    f"{who(r['attribute'], r['group'])} {words} in the subcohort analysis"
                    + (f" (the one with the most outcome events: {r['events']})" if len(tier) > 1 else "")
                    + (f"; {'; '.join(skipped)}" if skipped else "")
                    + ".",
                )
            skipped.append(f"{who(r['attribute'], r['group'])}, also flagged, cannot be fitted on: {problem}")
    usable = [r for r in rows if fit_problem(r) is None]
    if not usable:
        return (
            None,
            None,
            "No audited group has enough outcomes to compare a population-specific model: each needs to be large "
            f"enough to judge in the validation cohort and at least {min_cell_size} outcome events and as many "
            "non-events in the derivation cohort" + (f" ({'; '.join(skipped)})" if skipped else "") + ".",
        )
    r = sorted(usable, key=lambda r: (-(r["n"] or 0), *tie(r)))[0]
    lead = (
        "No audited group is flagged by the subcohort analysis"
        if not skipped
        else "No flagged group can be fitted on"
    )
    return (
        r["attribute"],
        r["group"],
        f"{lead}, so the largest group with enough outcomes is compared: {who(r['attribute'], r['group'])} ({r['n']} validation "
        "admissions)" + (f"; {'; '.join(skipped)}" if skipped else "") + ".",
    )


def _fit_like(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_tune: np.ndarray,
    y_tune: np.ndarray,
    *,
    like: TrainedModel,
    feature_names: list[str],
    seed: int,
) -> TrainedModel:
    """The single model's procedure on other rows: early-stopped on ``x_tune`` when it holds both outcomes,
    else the single model's number of trees on all the rows given."""
    params = {k: v for k, v in (like.params or {}).items() if k != "seed"}
    if 0 < y_tune.sum() < y_tune.size and 0 < y_train.sum() < y_train.size:
        return train_model(
            x_train, y_train, x_tune, y_tune, feature_names=feature_names, seed=seed, params=params
        )
    x, y = np.vstack([x_train, x_tune]), np.concatenate([y_train, y_tune])
    base = TrainedModel(
        like.booster, feature_names, like.best_iteration, {**DEFAULT_PARAMS, **params, "seed": seed}
    )
    return refit_rounds(x, y, like=base)


def _paired_replicates(
    y: np.ndarray,
    single: np.ndarray,
    candidates: list[np.ndarray],
    patients: np.ndarray,
    *,
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """Per replicate and candidate: AUROC difference, O/E difference and calibration gain, resampling
    patients (a patient's rows get the patient's multiplicity). Shape (n_boot, candidates, 3)."""
    _, inverse = np.unique(patients, return_inverse=True)
    yf = y.astype(np.float64)
    out = []
    for counts in bootstrap.resample_counts(
        int(inverse.max()) + 1, n_boot=n_boot, rng=np.random.default_rng(seed)
    ):
        w = counts[:, inverse]
        events = w @ yf
        auc_s = bootstrap.weighted_auroc(y, single, w)
        with np.errstate(divide="ignore", invalid="ignore"):
            oe_s = events / (w @ single)
            block = []
            for p in candidates:
                oe_c = events / (w @ p)
                block.append(
                    np.stack(
                        [
                            bootstrap.weighted_auroc(y, p, w) - auc_s,
                            oe_c - oe_s,
                            np.abs(np.log(oe_s)) - np.abs(np.log(oe_c)),
                        ],
                        axis=1,
                    )
                )
        out.append(np.stack(block, axis=1))
    return np.concatenate(out) if out else np.empty((0, len(candidates), 3))


def compare_population_model(
    frame: pl.DataFrame,
    model: TrainedModel,
    fairness: dict,
    *,
    attributes: Sequence[str],
    min_cell_size: int,
    seed: int,
    n_boot: int,
    bootstrap_seed: int,
    model_version: str,
) -> PopulationModelComparison:
    """Fit the population-specific candidates for the chosen group and compare them with the single model.

    Parameters
    ----------
    frame : polars.DataFrame
        The training frame (features, ``boolean_value``, ``split``, ``subject_id``) with the audited
        attributes, restricted to derivation and validation rows (``held_out`` rows are the validation
        cohort; under temporal validation, without a held-out patient's earlier admissions).
    model : TrainedModel
        The single model (the challenger).
    fairness : dict
        The subcohort analysis of ``model`` (chooses the group, gives its per-group threshold).
    attributes, min_cell_size
        The audited attributes and the smallest cell (see :func:`choose_group`).
    seed : int
        Seeds the candidates' fits (as the single model's).
    n_boot, bootstrap_seed : int
        Replicates and seed of the paired patient bootstrap.
    model_version : str
        The single model's version.
    """
    frame = frame.sort(ROW_KEY)  # the fits see rows in one order, whatever order the joins left
    derivation = frame.filter(pl.col("split") != "held_out")
    attribute, group, why = choose_group(
        fairness, derivation, attributes=attributes, min_cell_size=min_cell_size
    )
    if attribute is None or group is None:
        return PopulationModelComparison(model_version, None, None, why, n_boot=n_boot)
    held = frame.filter(
        (pl.col("split") == "held_out") & (pl.col(attribute).cast(pl.String).fill_null(UNKNOWN) == group)
    )
    cols = list(model.feature_names)
    y_val = held["boolean_value"].cast(pl.Int8).to_numpy()
    x_val = feature_matrix(held, cols)
    single = model.predict(x_val)

    def part(split: str, only_group: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = derivation.filter(pl.col("split") == split)
        member = (group_labels(rows, attribute) == group).astype(np.float64)
        if only_group:
            rows, member = rows.filter(pl.Series(member == 1)), member[member == 1]
        return feature_matrix(rows, cols), rows["boolean_value"].cast(pl.Int8).to_numpy(), member

    fits: dict[str, tuple[TrainedModel, np.ndarray, int, int]] = {}
    (xs, ys, _), (xt, yt, _) = part("train", True), part("tuning", True)
    sep = _fit_like(xs, ys, xt, yt, like=model, feature_names=cols, seed=seed)
    fits["separate"] = (sep, sep.predict(x_val), ys.size + yt.size, int(ys.sum() + yt.sum()))
    (xs, ys, ms), (xt, yt, mt) = part("train", False), part("tuning", False)
    inter = _fit_like(
        np.column_stack([xs, ms]),
        ys,
        np.column_stack([xt, mt]),
        yt,
        like=model,
        feature_names=[*cols, IN_GROUP],
        seed=seed,
    )
    x_in = np.column_stack([x_val, np.ones(len(y_val))])
    fits["interaction"] = (inter, inter.predict(x_in), ys.size + yt.size, int(ys.sum() + yt.sum()))

    level = 1 - (1 - FAMILY_LEVEL) / (2 * len(fits))
    reps = _paired_replicates(
        y_val,
        single,
        [p for _, p, _, _ in fits.values()],
        held["subject_id"].to_numpy(),
        n_boot=n_boot,
        seed=bootstrap_seed,
    )
    lower, upper = bootstrap.percentile_interval(reps, level=level, min_finite=max(10, n_boot // 4))
    oe_s = float(y_val.sum() / single.sum())
    candidates = []
    for i, (kind, (fitted, p, rows, events)) in enumerate(fits.items()):
        oe_c = float(y_val.sum() / p.sum())
        point = (
            auroc(y_val, p) - auroc(y_val, single),
            oe_c - oe_s,
            abs(math.log(oe_s)) - abs(math.log(oe_c)),
        )
        est = [(float(point[j]), float(lower[i, j]), float(upper[i, j])) for j in range(3)]
        candidates.append(
            CandidateComparison(
                kind,
                rows,
                events,
                fitted.best_iteration,
                float(auroc(y_val, single)),
                float(auroc(y_val, p)),
                est[0],
                oe_s,
                oe_c,
                est[1],
                est[2],
            )
        )
    thresholds = [
        t["threshold"]
        for t in fairness.get("group_thresholds", [])
        if t["attribute"] == attribute and t["group"] == group and not t["suppressed"]
    ]
    return PopulationModelComparison(
        model_version,
        attribute,
        group,
        why,
        validation_rows=held.height,
        validation_patients=held["subject_id"].n_unique(),
        validation_events=int(y_val.sum()),
        group_threshold=float(thresholds[0]) if thresholds else None,
        candidates=tuple(candidates),
        level=level,
        n_boot=n_boot,
    )


def population_model_view(c: PopulationModelComparison) -> dict:
    """The comparison as the report card and the asset's page show it: every number formatted, every
    sentence written here (and tested), none in a template."""
    view: dict = {"recommendation": c.recommendation(), "why": c.why, "compared": c.group is not None}
    if c.group is None or not c.candidates:
        return {**view, "compared": False}
    first = c.candidates[0]
    threshold = (
        f" (the fairness analysis recommends {c.group_threshold:.3f} for {c.who})"
        if c.group_threshold is not None
        else ""
    )
    return {
        **view,
        "who": c.who,
        "thresholds": f"Per-group thresholds change who is flagged in a group{threshold}, not how well the model "
        "ranks the group's patients (AUROC) nor how close its risks are to what happens (observed/expected "
        "ratio, O/E): those two are what a population-specific model could add, so they are compared.",
        "single": {"auroc": f"{first.auroc_single:.3f}", "oe": f"{first.oe_single:.2f}"},
        "rows": [
            {
                "name": x.name,
                "fitted": f"{x.fitted_rows:,} ({x.fitted_events:,})",
                "auroc": f"{x.auroc_candidate:.3f}",
                "auroc_difference": f"{_signed(x.auroc_difference[0])} ({_signed(x.auroc_difference[1])} to "
                f"{_signed(x.auroc_difference[2])})",
                "oe": f"{x.oe_candidate:.2f}",
                "oe_difference": f"{_signed(x.oe_difference[0], 2)} ({_signed(x.oe_difference[1], 2)} to "
                f"{_signed(x.oe_difference[2], 2)})",
                "sentence": x.sentence(),
            }
            for x in c.candidates
        ],
        "note": f"Judged on {c.validation_rows:,} validation admissions of {c.validation_patients:,} patients "
        f"({c.validation_events:,} outcome events) of {c.who}, never used for fitting. Differences are candidate "
        f"minus single model on the same patients, with paired bootstrap intervals that resample patients "
        f"({c.n_boot} replicates) at {c.level:.2%} each, so that all {2 * len(c.candidates)} comparisons hold "
        "together with 95% confidence. Calibration is better when O/E is closer to 1 (a smaller |ln O/E|), and "
        "better beyond chance when the interval of that gain excludes 0.",
    }


def population_model_markdown(c: PopulationModelComparison, *, escape: Callable[[str], str] = str) -> str:
    """The comparison for the asset's page in Markdown, every text passed through ``escape`` (the report
    module's Markdown escaping, so that a group's name is shown as text)."""
    v = population_model_view(c)
    head = f"**Would a population-specific model help?** {escape(v['recommendation'])}\n\n"
    if not v["compared"]:
        return head
    cells = ("name", "fitted", "auroc", "auroc_difference", "oe", "oe_difference")
    rows = "".join("| " + " | ".join(escape(r[k]) for k in cells) + " |\n" for r in v["rows"])
    return (
        head
        + f"{escape(v['why'])} {escape(v['thresholds'])}\n\n"
        + "| Model | Fitted on: admissions (outcome events) | AUROC | AUROC difference (CI) | O/E | "
        "O/E difference (CI) |\n|---|---|---|---|---|---|\n"
        + f"| Single model | the derivation cohort | {escape(v['single']['auroc'])} | | "
        f"{escape(v['single']['oe'])} | |\n"
        + rows
        + "\n"
        + "".join(f"- {escape(r['sentence'])}\n" for r in v["rows"])
        + f"\n{escape(v['note'])}\n"
    )
