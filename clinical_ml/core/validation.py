"""Validation of a challenger: its risk on the tuning and validation rows, the operating threshold chosen on
the tuning rows, and its metrics with 95% CIs on the validation cohort (the held-out test set)."""

from dataclasses import dataclass

import polars as pl

from clinical_ml.core.evaluation import (
    AlertBurden,
    MetricWithCI,
    alert_burden,
    bootstrap_metrics,
    calibration_curve,
    choose_threshold,
    decision_curve,
)
from clinical_ml.core.features import ROW_KEY, feature_matrix
from clinical_ml.core.labeling import batch_date
from clinical_ml.core.modeling import TrainedModel
from clinical_ml.core.usecase import UseCase

AUDIT_COLUMNS = ("sex", "race_ethnicity", "age_band", "period", "batch_id", "site")
# what the alert burden needs of each cohort row besides the row key
STAY_COLUMNS = ("discharge_time", "death_time", "unit", "admit_time", "batch_id")


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
    """The challenger on the validation cohort: metrics with 95% CIs, calibration and decision curves, and
    the alert burden at the operating point (None in files written before it was measured)."""

    model_version: str
    threshold: float
    n_validation: int
    events_validation: int
    metrics: dict[str, MetricWithCI]
    calibration_curve: tuple[dict[str, float], ...]
    decision_curve: tuple[dict[str, float], ...]
    n_bootstrap: int
    alert_burden: AlertBurden | None = None

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
            **({"alert_burden": self.alert_burden.as_dict()} if self.alert_burden is not None else {}),
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
            alert_burden=AlertBurden.from_dict(d["alert_burden"]) if d.get("alert_burden") else None,
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


def _real_day() -> pl.Expr:
    """The calendar day a prediction was made on the ward. De-identified times are shifted per patient (by
    up to a year), so their dates would spread one ward day over many; the batch's delivery date (its id,
    when it is a date) plus the preserved interval from admission is the real day, up to the batch's own
    span (a batch of several days counts its predictions on fewer days: a higher, cautious rate). Batches
    not named by date fall back to the shifted date."""
    real = batch_date() + (pl.col("prediction_time") - pl.col("admit_time"))
    return pl.coalesce(real, pl.col("prediction_time")).dt.date()


def validation_alert_burden(
    rows: pl.DataFrame,
    stays: pl.DataFrame,
    *,
    threshold: float,
    one_day_per_stay: bool,
    n_boot: int,
    seed: int,
) -> AlertBurden:
    """The alert burden of the validation rows at ``threshold`` (see :func:`evaluation.alert_burden`).

    Parameters
    ----------
    rows
        Validation prediction rows: ``subject_id``, ``hadm_id``, ``prediction_time``, ``label``, ``risk``.
    stays
        Cohort rows with ``discharge_time``, ``death_time`` and ``unit``, joined on ``hadm_id`` and
        ``prediction_time`` (a stay may have several prediction rows).
    threshold
        Risk at and above which a row is an alert.
    one_day_per_stay
        Count one patient-day per stay (the prediction is made at discharge, so no time at risk follows it
        in hospital); otherwise a stay's days at risk run from its first prediction time to its end, the
        earlier of discharge and death.
    n_boot, seed
        Bootstrap replicates (resampling patients) and seed.
    """
    df = (
        rows.select("subject_id", *ROW_KEY, "label", "risk")
        .join(
            stays.select(*ROW_KEY, *[c for c in STAY_COLUMNS if c in stays.columns]), on=ROW_KEY, how="left"
        )
        .with_columns(
            (pl.col("risk") >= threshold).alias("_alert"),
            (
                _real_day()
                if {"batch_id", "admit_time"} <= set(stays.columns)
                else pl.col("prediction_time").dt.date()
            ).alias("_day"),
        )
        .with_columns(
            (pl.col("_alert") & pl.col("label").cast(pl.Boolean)).alias("_true"),
            # each unit-day shared among the rows predicted on it: the patients' shares add up to the count
            (1.0 / pl.len().over("unit", "_day")).alias("_share"),
        )
    )
    end = pl.min_horizontal(
        pl.col("discharge_time"), pl.col("death_time").fill_null(pl.col("discharge_time"))
    )
    at_risk = (
        pl.lit(1.0)
        if one_day_per_stay
        else ((end - pl.col("_first")).dt.total_microseconds() / 86_400e6).clip(lower_bound=0).fill_null(0.0)
    )
    per_stay = (
        df.group_by("subject_id", "hadm_id")
        .agg(pl.col("prediction_time").min().alias("_first"), pl.col(STAY_COLUMNS[:2]).first())
        .with_columns(
            at_risk.alias("_days"),
            (pl.col("death_time") <= pl.col("discharge_time")).fill_null(False).alias("_death_ends"),
        )
    )
    per_patient = (
        df.group_by("subject_id")
        .agg(pl.col("_alert").sum(), pl.col("_true").sum(), pl.col("_share").sum())
        .join(per_stay.group_by("subject_id").agg(pl.col("_days").sum()), on="subject_id", how="left")
        .sort("subject_id")
    )
    return alert_burden(
        alerts=per_patient["_alert"].to_numpy(),
        true_alerts=per_patient["_true"].to_numpy(),
        patient_days=per_patient["_days"].to_numpy(),
        unit_day_shares=per_patient["_share"].to_numpy(),
        prediction_rows=df.height,
        stays=per_stay.height,
        unit_days=df.select(pl.struct("unit", "_day").n_unique()).item() if df.height else 0,
        one_day_per_stay=one_day_per_stay,
        stays_ending_in_death=0 if one_day_per_stay else int(per_stay["_death_ends"].sum()),
        n_boot=n_boot,
        seed=seed,
    )


def evaluate_validation(
    predictions: pl.DataFrame,
    threshold: OperatingThreshold,
    *,
    n_boot: int,
    seed: int,
    stays: pl.DataFrame | None = None,
    one_day_per_stay: bool = False,
) -> Evaluation:
    """Metrics with 95% CIs, calibration and decision curves on the ``held_out`` (validation) rows, and the
    alert burden at the operating threshold when the cohort's ``stays`` are given
    (:func:`validation_alert_burden`)."""
    val = predictions.filter(pl.col("split") == "held_out")
    y = val["label"].cast(pl.Int8).to_numpy()
    p = val["risk"].to_numpy()
    burden = (
        validation_alert_burden(
            val,
            stays,
            threshold=threshold.threshold,
            one_day_per_stay=one_day_per_stay,
            n_boot=n_boot,
            seed=seed,
        )
        if stays is not None
        else None
    )
    return Evaluation(
        model_version=threshold.model_version,
        threshold=threshold.threshold,
        n_validation=len(y),
        events_validation=int(y.sum()),
        # a patient's several stays or prediction times are resampled together
        metrics=bootstrap_metrics(
            y, p, threshold.threshold, n_boot=n_boot, seed=seed, groups=val["subject_id"].to_numpy()
        ),
        calibration_curve=tuple(calibration_curve(y, p)),
        decision_curve=tuple(decision_curve(y, p)),
        n_bootstrap=n_boot,
        alert_burden=burden,
    )
