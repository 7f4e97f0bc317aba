"""Validation of a challenger: its out-of-fold risk on the derivation cohort and its risk on the validation
cohort, the operating threshold chosen on the out-of-fold risk, and its metrics with 95% CIs on the validation
cohort (the held-out test set)."""

from dataclasses import dataclass

import numpy as np
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
from clinical_ml.core.features import ROW_KEY, SplitInfo, feature_matrix, stable_uniform, validation_rows
from clinical_ml.core.labeling import batch_date
from clinical_ml.core.modeling import TrainedModel, refit_rounds
from clinical_ml.core.usecase import UseCase

AUDIT_COLUMNS = ("sex", "race_ethnicity", "age_band", "period", "batch_id", "site", "payer")
# audit columns a cohort may lack (an export or an older release without a payer): read as not known
OPTIONAL_AUDIT_COLUMNS = ("payer",)
# what the alert burden needs of each cohort row besides the row key
STAY_COLUMNS = ("discharge_time", "death_time", "unit", "admit_time", "batch_id")


THRESHOLD_FOLDS = 5
"""Folds (by patient) of the derivation cohort whose out-of-fold risk the operating threshold is chosen on."""


@dataclass(frozen=True)
class OperatingThreshold:
    """The risk at and above which the challenger flags a patient, chosen by the use case's policy on the
    out-of-fold risk of the derivation cohort (``chosen_on``), where it achieves ``achieved`` (the policy's
    measure, e.g. the sensitivity asked for); None in files written before it was recorded."""

    threshold: float
    model_version: str
    chosen_on: str = "the tuning part of the derivation cohort"
    rows: int | None = None
    achieved: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> "OperatingThreshold":
        return cls(
            float(d["threshold"]),
            str(d["model_version"]),
            str(d.get("chosen_on", cls.chosen_on)),
            d.get("rows"),
            d.get("achieved"),
        )


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


def predict_frame(
    model: TrainedModel, frame: pl.DataFrame, cohort: pl.DataFrame, *, risk: np.ndarray | None = None
) -> pl.DataFrame:
    """Risk for each admission of ``frame`` (the model's, or ``risk`` when given) with its label, split and
    audit attributes."""
    if risk is None:
        risk = model.predict(feature_matrix(frame, model.feature_names))
    missing = [c for c in OPTIONAL_AUDIT_COLUMNS if c not in cohort.columns]
    audit = cohort.with_columns(pl.lit(None, dtype=pl.String).alias(c) for c in missing).select(
        *ROW_KEY, *AUDIT_COLUMNS
    )
    return (
        frame.select(
            "subject_id", "hadm_id", "prediction_time", "split", pl.col("boolean_value").alias("label")
        )
        .with_columns(pl.Series("risk", risk))
        .join(audit, on=ROW_KEY, how="left")
    )


def out_of_fold_risk(
    derivation: pl.DataFrame, model: TrainedModel, *, folds: int = THRESHOLD_FOLDS, seed: int
) -> np.ndarray:
    """Each derivation row's risk from a model fitted without its patient: the rows are cut into ``folds``
    groups of patients (a seeded hash of the pseudonym), and each group is scored by a model with the
    challenger's features, parameters and number of trees fitted on the other groups. NaN where a fold's
    fit had no outcome event or no non-event (a tiny cohort).

    The challenger itself saw the training rows and was early-stopped on the tuning rows, so its risk on
    either is optimistic; a threshold chosen there flags fewer patients with the outcome on new patients
    than it promised (the 80% asked for became 69% on validation)."""
    x = feature_matrix(derivation, model.feature_names)
    y = derivation["boolean_value"].cast(pl.Int8).to_numpy()
    subjects = derivation["subject_id"].to_numpy()
    fold = np.minimum((stable_uniform(subjects, seed=seed + 1) * folds).astype(np.int64), folds - 1)
    risk = np.full(len(y), np.nan)
    for k in range(folds):
        fit, out = fold != k, fold == k
        if out.any() and 0 < y[fit].sum() < fit.sum():
            risk[out] = refit_rounds(x[fit], y[fit], like=model).predict(x[out])
    return risk


def operating_threshold(predictions: pl.DataFrame, use_case: UseCase) -> float:
    """The threshold the use case's policy picks on the derivation rows' (out-of-fold) risk."""
    return choose_operating_threshold(predictions, use_case, model_version="").threshold


def choose_operating_threshold(
    predictions: pl.DataFrame, use_case: UseCase, *, model_version: str
) -> OperatingThreshold:
    """The use case's policy applied to the derivation rows of ``predictions`` that have a risk (out of
    fold: :func:`validation_predictions`), with what it achieves there."""
    rows = predictions.filter((pl.col("split") != "held_out") & pl.col("risk").is_not_nan())
    y, p = rows["label"].cast(pl.Int8).to_numpy(), rows["risk"].to_numpy()
    op = use_case.operating_point
    threshold = choose_threshold(y, p, policy=op.policy, target=op.target)
    flagged = p >= threshold
    wanted = y == 1 if op.policy == "min_sensitivity" else y == 0
    share = flagged[wanted].mean() if op.policy == "min_sensitivity" else (~flagged[wanted]).mean()
    return OperatingThreshold(
        threshold,
        model_version,
        f"out-of-fold predictions of the derivation cohort ({THRESHOLD_FOLDS} folds of patients)",
        rows.height,
        float(share) if wanted.any() else None,
    )


def validation_predictions(
    model: TrainedModel,
    frame: pl.DataFrame,
    cohort: pl.DataFrame,
    split: SplitInfo,
    use_case: UseCase,
    *,
    model_version: str,
) -> tuple[pl.DataFrame, OperatingThreshold]:
    """The challenger's risk on the validation cohort, the out-of-fold risk of the derivation cohort
    (:func:`out_of_fold_risk`), each row ``flagged`` at the operating threshold chosen on the latter.

    ``frame`` is the training frame (features, label, split); under temporal validation a held-out
    patient's admissions before the validation period are left out (:func:`validation_rows`)."""
    derivation = frame.filter(pl.col("split") != "held_out")
    oof = out_of_fold_risk(derivation, model, seed=use_case.validation.seed)
    preds = pl.concat(
        [
            predict_frame(model, derivation, cohort, risk=oof),
            predict_frame(model, frame.filter(pl.col("split") == "held_out"), cohort),
        ]
    ).filter(validation_rows(split))
    threshold = choose_operating_threshold(preds, use_case, model_version=model_version)
    return preds.with_columns((pl.col("risk") >= threshold.threshold).alias("flagged")), threshold


def _real_day() -> pl.Expr:
    """The calendar day a prediction was made on the ward. De-identified times are shifted per patient (by
    up to a year), so their dates would spread one ward day over many; the batch's delivery date (its id,
    when it is a date) plus the preserved interval from admission is the real day, up to the batch's own
    span. Null for a batch not named by date (a research export: eICU's synthetic calendar, MIMIC's dates
    shifted per patient into another century), whose dates say nothing of the ward's days."""
    return (batch_date() + (pl.col("prediction_time") - pl.col("admit_time"))).dt.date()


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
        ``prediction_time`` (a stay may have several prediction rows). With ``batch_id`` and ``admit_time``
        the day of a prediction is its batch's delivery date plus the time since admission, and alerts per
        unit per day are not computed when a row's batch is not named by date (its day is not known:
        ``undated_rows``); without them the prediction times are taken as the ward's own.
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
            pl.when(pl.col("_day").is_not_null())
            .then(1.0 / pl.len().over("unit", "_day"))
            .otherwise(0.0)
            .alias("_share"),
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
        unit_days=df.filter(pl.col("_day").is_not_null()).select(pl.struct("unit", "_day").n_unique()).item()
        if df.height
        else 0,
        undated_rows=int(df["_day"].null_count()),
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
