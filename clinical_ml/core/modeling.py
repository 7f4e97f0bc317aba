"""LightGBM training and scoring. Models are stored in LightGBM's text format, never pickled."""

import json
from dataclasses import dataclass, field

import lightgbm as lgb
import numpy as np

DEFAULT_PARAMS: dict[str, object] = {
    "objective": "binary",
    "learning_rate": 0.04,
    "num_leaves": 15,
    "min_data_in_leaf": 25,
    "feature_fraction": 0.8,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "num_threads": 2,
    "verbosity": -1,
    "deterministic": True,
    "force_row_wise": True,
}


@dataclass(frozen=True)
class TrainedModel:
    booster: lgb.Booster
    feature_names: list[str]
    best_iteration: int
    params: dict[str, object] = field(default_factory=dict)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(x, num_iteration=self.best_iteration))

    def to_text(self) -> str:
        return self.booster.model_to_string(num_iteration=self.best_iteration)


def train_model(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_tune: np.ndarray,
    y_tune: np.ndarray,
    *,
    feature_names: list[str],
    seed: int,
    max_rounds: int = 600,
    early_stopping_rounds: int = 40,
    params: dict[str, object] | None = None,
) -> TrainedModel:
    """Gradient-boosted trees with early stopping on the tuning part of the derivation cohort.

    Parameters
    ----------
    x_train, y_train
        Derivation rows used to fit trees.
    x_tune, y_tune
        Derivation rows held back for early stopping (never the validation cohort).
    seed
        Seeds LightGBM's bagging and feature sampling.
    """
    p = {**DEFAULT_PARAMS, **(params or {}), "seed": seed}
    train = lgb.Dataset(x_train, label=y_train, feature_name=feature_names, free_raw_data=False)
    tune = lgb.Dataset(x_tune, label=y_tune, reference=train, free_raw_data=False)
    booster = lgb.train(
        p,
        train,
        num_boost_round=max_rounds,
        valid_sets=[tune],
        valid_names=["tuning"],
        callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False)],
    )
    best = booster.best_iteration or booster.current_iteration()
    return TrainedModel(booster=booster, feature_names=list(feature_names), best_iteration=best, params=p)


def refit_rounds(
    x: np.ndarray, y: np.ndarray, *, like: TrainedModel, rounds: int | None = None
) -> TrainedModel:
    """A model with ``like``'s features and parameters fitted on ``x, y`` for a fixed number of rounds
    (``like``'s best iteration by default): no early stopping, so no held-back rows are needed and none are
    looked at (the out-of-fold fits that choose the operating threshold)."""
    n = rounds or like.best_iteration
    # a model read back from its text carries the parameters it was trained with; keep the ones we set
    loaded = like.params or like.booster.params
    params = {k: loaded[k] for k in [*DEFAULT_PARAMS, "seed"] if k in loaded} | {"verbosity": -1}
    data = lgb.Dataset(x, label=y, feature_name=like.feature_names, free_raw_data=False)
    booster = lgb.train(params, data, num_boost_round=n)
    return TrainedModel(booster=booster, feature_names=like.feature_names, best_iteration=n, params=params)


def is_complete_model_text(text: str) -> bool:
    """Whether ``text`` has the shape of a whole LightGBM text model: its header, the end of its trees and of
    its parameters, and the closing line. LightGBM aborts the process on some truncated models instead of
    raising, so a file is checked before it is parsed."""
    lines = text.rstrip("\n").splitlines()
    if not lines or lines[0] != "tree" or "end of trees" not in lines or "end of parameters" not in lines:
        return False
    head, _, tail = lines[-1].partition(":")
    try:
        json.loads(tail)
    except ValueError:
        return False
    return head == "pandas_categorical"


def load_model(text: str) -> TrainedModel:
    """A model from its LightGBM text; ``ValueError`` when the text is not a whole model."""
    if not is_complete_model_text(text):
        raise ValueError("not a complete LightGBM text model (empty, truncated or another file)")
    booster = lgb.Booster(model_str=text)
    return TrainedModel(
        booster=booster,
        feature_names=list(booster.feature_name()),
        best_iteration=booster.current_iteration(),
    )
