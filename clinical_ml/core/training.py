"""Model fitting and validation for one use case, as plain functions over the feature tables."""

from dataclasses import dataclass

import numpy as np
import polars as pl

from clinical_ml.core import registry
from clinical_ml.core.evaluation import (
    bootstrap_metrics,
    calibration_curve,
    choose_threshold,
    decision_curve,
    paired_comparison,
)
from clinical_ml.core.fairness import subgroup_table
from clinical_ml.core.features import feature_columns, feature_matrix
from clinical_ml.core.modeling import TrainedModel, train_model
from clinical_ml.core.scoring import (
    Guardrails,
    Scorer,
    abstention_rate,
    reason_code_counts,
    scoring_latency_ms,
)
from clinical_ml.core.usecase import UseCase

AUDIT_COLUMNS = ("sex", "race_ethnicity", "age_band", "period", "batch_id", "site")


@dataclass(frozen=True)
class FitSummary:
    n_train: int
    n_tuning: int
    events_train: int
    events_tuning: int
    best_iteration: int
    training_ranges: dict[str, tuple[float, float]]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def training_frame(features: pl.DataFrame, labels: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Features with the label and the split of each admission."""
    return features.join(labels.select("hadm_id", "boolean_value"), on="hadm_id", how="inner").join(
        splits, on="subject_id", how="inner"
    )


def _xy(frame: pl.DataFrame, split: str, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    part = frame.filter(pl.col("split") == split)
    return feature_matrix(part, cols), part["boolean_value"].cast(pl.Int8).to_numpy()


def training_ranges(x: np.ndarray, cols: list[str]) -> dict[str, tuple[float, float]]:
    """1st and 99th percentile of each feature in the training rows: the range the model has seen
    (percentiles, not extremes, so no single patient's value is stored)."""
    out = {}
    for j, c in enumerate(cols):
        v = x[:, j][np.isfinite(x[:, j])]
        out[c] = (float(np.quantile(v, 0.01)), float(np.quantile(v, 0.99))) if v.size else (float("nan"),) * 2
    return out  # type: ignore[return-value]


def fit_model(frame: pl.DataFrame, use_case: UseCase) -> tuple[TrainedModel, FitSummary]:
    """Fit on ``train`` rows, early-stop on ``tuning`` rows; the ``held_out`` rows are not touched."""
    cols = feature_columns(use_case)
    x_tr, y_tr = _xy(frame, "train", cols)
    x_tu, y_tu = _xy(frame, "tuning", cols)
    if y_tr.sum() == 0 or y_tu.sum() == 0:
        raise ValueError("the derivation cohort has no outcome events in its training or tuning part")
    model = train_model(x_tr, y_tr, x_tu, y_tu, feature_names=cols, seed=use_case.validation.seed)
    summary = FitSummary(
        n_train=len(y_tr),
        n_tuning=len(y_tu),
        events_train=int(y_tr.sum()),
        events_tuning=int(y_tu.sum()),
        best_iteration=model.best_iteration,
        training_ranges=training_ranges(x_tr, cols),
    )
    return model, summary


def predict_frame(model: TrainedModel, frame: pl.DataFrame, cohort: pl.DataFrame) -> pl.DataFrame:
    """Risk for each admission of ``frame`` with its label, split and audit attributes."""
    risk = model.predict(feature_matrix(frame, model.feature_names))
    audit = cohort.select("hadm_id", *AUDIT_COLUMNS)
    return (
        frame.select(
            "subject_id", "hadm_id", "prediction_time", "split", pl.col("boolean_value").alias("label")
        )
        .with_columns(pl.Series("risk", risk))
        .join(audit, on="hadm_id", how="left")
    )


def operating_threshold(predictions: pl.DataFrame, use_case: UseCase) -> float:
    """The threshold the use case's policy picks on the tuning rows of the derivation cohort."""
    tune = predictions.filter(pl.col("split") == "tuning")
    return choose_threshold(
        tune["label"].cast(pl.Int8).to_numpy(),
        tune["risk"].to_numpy(),
        policy=use_case.operating_point.policy,
        target=use_case.operating_point.target,
    )


def evaluate_validation(predictions: pl.DataFrame, threshold: float, *, n_boot: int, seed: int) -> dict:
    """Metrics with 95% CIs, calibration and decision curves on the ``held_out`` (validation) rows."""
    val = predictions.filter(pl.col("split") == "held_out")
    y = val["label"].cast(pl.Int8).to_numpy()
    p = val["risk"].to_numpy()
    metrics = bootstrap_metrics(y, p, threshold, n_boot=n_boot, seed=seed)
    return {
        "threshold": threshold,
        "n_validation": len(y),
        "events_validation": int(y.sum()),
        "metrics": {k: v.as_dict() for k, v in metrics.items()},
        "calibration_curve": calibration_curve(y, p),
        "decision_curve": decision_curve(y, p),
        "n_bootstrap": n_boot,
    }


def _subgroup_dicts(rows: list) -> list[dict]:
    return [
        {
            "attribute": r.attribute,
            "group": r.group,
            "n": r.n,
            "suppressed": r.suppressed,
            "flags": list(r.flags),
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


def judge_challenger(
    inputs: GateInputs,
    use_case: UseCase,
    *,
    n_boot: int,
    seed: int,
    latency_repeats: int = 300,
    auroc_margin: float | None = None,
) -> tuple["registry.GateResult", dict]:
    """Run every criterion of the promotion gate; returns the result and the figures behind it
    (paired comparison, latency, abstention on the validation cohort)."""
    promo = use_case.promotion
    sg = use_case.subgroups
    p = inputs.challenger.predict(inputs.x)
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
    ).rows
    scorer = Scorer(
        inputs.challenger,
        inputs.threshold,
        inputs.training_ranges,
        Guardrails(**use_case.guardrails.model_dump()),
    )
    latency = scoring_latency_ms(scorer, inputs.x[:200], repeats=latency_repeats)
    scores = scorer.score(inputs.x, n_reasons=0)
    gate = registry.evaluate_gate(
        registry.minimum_criteria(inputs.metrics, use_case.success_criteria.model_dump()),
        registry.non_inferiority_criteria(
            inputs.metrics,
            inputs.champion_card,
            comparison=comparison,
            auroc_margin=promo.auroc_non_inferiority_margin if auroc_margin is None else auroc_margin,
            slope_margin=promo.calibration_slope_margin,
            intercept_margin=promo.calibration_intercept_margin,
        ),
        registry.subgroup_criteria(_subgroup_dicts(list(rows)), min_cell_size=sg.min_cell_size),
        registry.latency_criterion(
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
