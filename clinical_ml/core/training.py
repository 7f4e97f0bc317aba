"""Fitting the challenger of one use case on its derivation cohort, as plain functions over the feature tables."""

from dataclasses import dataclass

import numpy as np
import polars as pl

from clinical_ml.core.features import ROW_KEY, feature_columns, feature_matrix
from clinical_ml.core.modeling import TrainedModel, train_model
from clinical_ml.core.usecase import UseCase


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

    @classmethod
    def from_dict(cls, d: dict) -> "FitSummary":
        return cls(
            **{k: v for k, v in d.items() if k != "training_ranges"},
            training_ranges={k: (float(v[0]), float(v[1])) for k, v in d["training_ranges"].items()},
        )


@dataclass(frozen=True)
class ChallengerFit:
    """What was fitted: the challenger's version, its fit summary and its feature order."""

    version: str
    fit: FitSummary
    feature_names: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"version": self.version, "fit": self.fit.as_dict(), "feature_names": list(self.feature_names)}

    @classmethod
    def from_dict(cls, d: dict) -> "ChallengerFit":
        return cls(d["version"], FitSummary.from_dict(d["fit"]), tuple(d["feature_names"]))


def training_frame(features: pl.DataFrame, labels: pl.DataFrame, splits: pl.DataFrame) -> pl.DataFrame:
    """Features with the label and the split of each prediction row (rows without a known label left out)."""
    return features.join(labels.select(*ROW_KEY, "boolean_value"), on=ROW_KEY, how="inner").join(
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
    # one-hot categories are those set on enough admissions of the derivation cohort
    cols = feature_columns(use_case, frame.filter(pl.col("split").is_in(["train", "tuning"])))
    x_tr, y_tr = _xy(frame, "train", cols)
    x_tu, y_tu = _xy(frame, "tuning", cols)
    if len(y_tr) == 0 or len(y_tu) == 0:
        raise ValueError(
            f"the derivation cohort is empty ({len(y_tr)} training and {len(y_tu)} tuning admissions): no "
            "admission is eligible; the cohort's participant flow says why (e.g. every stay ended before the "
            f"prediction time, {use_case.prediction_time.describe()})"
        )
    if y_tr.sum() == 0 or y_tu.sum() == 0:
        raise ValueError(
            f"the derivation cohort has {int(y_tr.sum())} outcome events in its {len(y_tr)} training and "
            f"{int(y_tu.sum())} in its {len(y_tu)} tuning admissions: a model needs events in both"
        )
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
