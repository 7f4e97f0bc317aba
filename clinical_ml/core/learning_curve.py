"""Would more data help? The challenger refitted on growing shares of the derivation cohort and judged on the
same validation cohort: discrimination (AUROC, DeLong 95% CI) and calibration (slope) against training size.

The model's features, parameters and number of trees are kept, so the curve shows what more patients of the
same kind would add; a curve still rising at the full cohort says more data would likely help, a flat one says
that more of the same patients will not do much (new predictors might).
"""

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from clinical_ml.core.evaluation import calibration_slope_intercept
from clinical_ml.core.fairness import delong_auroc
from clinical_ml.core.features import feature_matrix, stable_uniform
from clinical_ml.core.modeling import TrainedModel, refit_rounds

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
STILL_RISING = 0.01
"""AUROC gained from 75% to 100% of the derivation cohort above which more data would likely help."""


@dataclass(frozen=True)
class CurvePoint:
    fraction: float
    patients: int
    rows: int
    events: int
    auroc: tuple[float, float, float]  # value, lower, upper (95%)
    calibration_slope: float


@dataclass(frozen=True)
class LearningCurve:
    points: tuple[CurvePoint, ...]
    validation_rows: int
    validation_events: int

    def as_dict(self) -> dict:
        return {
            "points": [p.__dict__ for p in self.points],
            "validation_rows": self.validation_rows,
            "validation_events": self.validation_events,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LearningCurve":
        points = tuple(
            CurvePoint(**{**p, "auroc": tuple(p["auroc"])})  # type: ignore[arg-type]
            for p in d["points"]
        )
        return cls(points, int(d["validation_rows"]), int(d["validation_events"]))

    def recommendation(self) -> str:
        """One sentence a panel can act on, true for the numbers of the curve."""
        fitted = [p for p in self.points if np.isfinite(p.auroc[0])]
        if len(fitted) < 2:
            return "The curve could not be drawn: too few outcome events in the smaller shares of the cohort."
        last, before = fitted[-1], fitted[-2]
        gain = last.auroc[0] - before.auroc[0]
        step = (
            f"AUROC went from {before.auroc[0]:.3f} with {before.fraction:.0%} of the derivation cohort "
            f"({before.patients:,} patients) to {last.auroc[0]:.3f} with all of it ({last.patients:,})"
        )
        if gain > STILL_RISING:
            return f"{step}: still rising, so more data of the same kind would likely help."
        return (
            f"{step}: flat (a gain under {STILL_RISING}), so more patients of the same kind are unlikely to help "
            "much; new predictors are the next thing to try."
        )


def learning_curve(
    frame: pl.DataFrame,
    model: TrainedModel,
    *,
    seed: int,
    fractions: tuple[float, ...] = FRACTIONS,
) -> LearningCurve:
    """The curve on ``frame`` (the training frame: features, ``boolean_value``, ``split``; validation rows are
    its ``held_out`` rows). Shares are nested sets of derivation patients (a seeded hash of the pseudonym), so
    each point adds patients to the one before."""
    derivation = frame.filter(pl.col("split") != "held_out")
    held = frame.filter(pl.col("split") == "held_out")
    x_val = feature_matrix(held, model.feature_names)
    y_val = held["boolean_value"].cast(pl.Int8).to_numpy()
    u = stable_uniform(derivation["subject_id"].to_numpy(), seed=seed + 2)
    x_all = feature_matrix(derivation, model.feature_names)
    y_all = derivation["boolean_value"].cast(pl.Int8).to_numpy()
    z = float(stats.norm.ppf(0.975))
    points = []
    for f in fractions:
        take = u < f
        y = y_all[take]
        if y.sum() == 0 or y.sum() == y.size or not (0 < y_val.sum() < y_val.size):
            auc, slope = (float("nan"),) * 3, float("nan")
        else:
            p = refit_rounds(x_all[take], y, like=model).predict(x_val)
            value, var = delong_auroc(y_val, p)
            half = z * float(np.sqrt(max(var, 0.0)))
            auc = (float(value), max(0.0, float(value) - half), min(1.0, float(value) + half))
            slope = float(calibration_slope_intercept(y_val, p)[0])
        points.append(
            CurvePoint(
                fraction=f,
                patients=int(np.unique(derivation["subject_id"].to_numpy()[take]).size),
                rows=int(take.sum()),
                events=int(y.sum()),
                auroc=auc,
                calibration_slope=slope,
            )
        )
    return LearningCurve(tuple(points), int(y_val.size), int(y_val.sum()))


def learning_curve_markdown(curve: LearningCurve) -> str:
    rows = "".join(
        f"| {p.fraction:.0%} | {p.patients:,} | {p.events:,} | "
        f"{p.auroc[0]:.3f} ({p.auroc[1]:.3f} to {p.auroc[2]:.3f}) | {p.calibration_slope:.2f} |\n"
        for p in curve.points
    )
    return (
        f"**Would more data help?** {curve.recommendation()}\n\n"
        "| Share of the derivation cohort | Patients | Outcome events | Validation AUROC (95% CI) | "
        "Calibration slope |\n|---|---|---|---|---|\n"
        + rows
        + f"\nJudged on the same validation cohort ({curve.validation_rows:,} rows, {curve.validation_events:,} "
        "outcome events); the model's features, parameters and number of trees are kept.\n"
    )
