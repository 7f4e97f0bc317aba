"""Validation of a challenger: its risk on the tuning and validation rows, the operating threshold chosen on
the tuning rows, and its metrics with 95% CIs on the validation cohort (the held-out test set)."""

from dataclasses import dataclass

import polars as pl

from clinical_ml.core.evaluation import (
    MetricWithCI,
    bootstrap_metrics,
    calibration_curve,
    choose_threshold,
    decision_curve,
)
from clinical_ml.core.features import ROW_KEY, feature_matrix
from clinical_ml.core.modeling import TrainedModel
from clinical_ml.core.usecase import UseCase

AUDIT_COLUMNS = ("sex", "race_ethnicity", "age_band", "period", "batch_id", "site")


@dataclass(frozen=True)
class OperatingThreshold:
    """The risk at and above which the challenger flags a patient, chosen on the tuning rows."""

    threshold: float
    model_version: str

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "model_version": self.model_version}

    @classmethod
    def from_dict(cls, d: dict) -> "OperatingThreshold":
        return cls(float(d["threshold"]), str(d["model_version"]))


@dataclass(frozen=True)
class Evaluation:
    """The challenger on the validation cohort: metrics with 95% CIs, calibration and decision curves."""

    model_version: str
    threshold: float
    n_validation: int
    events_validation: int
    metrics: dict[str, MetricWithCI]
    calibration_curve: tuple[dict[str, float], ...]
    decision_curve: tuple[dict[str, float], ...]
    n_bootstrap: int

    def metric(self, name: str) -> MetricWithCI:
        return self.metrics[name]

    def metrics_dict(self) -> dict[str, dict[str, float]]:
        return {k: v.as_dict() for k, v in self.metrics.items()}

    def as_dict(self) -> dict:
        return {
            "model_version": self.model_version,
            "threshold": self.threshold,
            "n_validation": self.n_validation,
            "events_validation": self.events_validation,
            "metrics": self.metrics_dict(),
            "calibration_curve": list(self.calibration_curve),
            "decision_curve": list(self.decision_curve),
            "n_bootstrap": self.n_bootstrap,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Evaluation":
        return cls(
            model_version=str(d["model_version"]),
            threshold=float(d["threshold"]),
            n_validation=int(d["n_validation"]),
            events_validation=int(d["events_validation"]),
            metrics={k: MetricWithCI(**v) for k, v in d["metrics"].items()},
            calibration_curve=tuple(d["calibration_curve"]),
            decision_curve=tuple(d["decision_curve"]),
            n_bootstrap=int(d["n_bootstrap"]),
        )


def predict_frame(model: TrainedModel, frame: pl.DataFrame, cohort: pl.DataFrame) -> pl.DataFrame:
    """Risk for each admission of ``frame`` with its label, split and audit attributes."""
    risk = model.predict(feature_matrix(frame, model.feature_names))
    audit = cohort.select(*ROW_KEY, *AUDIT_COLUMNS)
    return (
        frame.select(
            "subject_id", "hadm_id", "prediction_time", "split", pl.col("boolean_value").alias("label")
        )
        .with_columns(pl.Series("risk", risk))
        .join(audit, on=ROW_KEY, how="left")
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


def evaluate_validation(
    predictions: pl.DataFrame, threshold: OperatingThreshold, *, n_boot: int, seed: int
) -> Evaluation:
    """Metrics with 95% CIs, calibration and decision curves on the ``held_out`` (validation) rows."""
    val = predictions.filter(pl.col("split") == "held_out")
    y = val["label"].cast(pl.Int8).to_numpy()
    p = val["risk"].to_numpy()
    return Evaluation(
        model_version=threshold.model_version,
        threshold=threshold.threshold,
        n_validation=len(y),
        events_validation=int(y.sum()),
        metrics=bootstrap_metrics(y, p, threshold.threshold, n_boot=n_boot, seed=seed),
        calibration_curve=tuple(calibration_curve(y, p)),
        decision_curve=tuple(decision_curve(y, p)),
        n_bootstrap=n_boot,
    )
