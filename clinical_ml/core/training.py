"""Fitting the challenger of one use case on its derivation cohort, as plain functions over the feature tables."""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl

from clinical_ml.core.features import CATEGORICAL_STATIC, ROW_KEY, feature_columns, feature_matrix
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
    known = labels.select(*ROW_KEY, "boolean_value")
    added = [*known.columns[len(ROW_KEY) :], *(c for c in splits.columns if c != "subject_id")]
    if _ROW in features.columns or set(added) & set(features.columns):  # names the joins would suffix
        return features.join(known, on=ROW_KEY, how="inner").join(splits, on="subject_id", how="inner")
    # the same joins on the key columns alone choose the rows and their order; the feature columns are then
    # gathered once (joined whole, every one of them was copied by each join)
    keys = (
        features.select(*ROW_KEY, "subject_id")
        .with_row_index(_ROW)
        .join(known, on=ROW_KEY, how="inner")
        .join(splits, on="subject_id", how="inner")
    )
    rows = keys.get_column(_ROW)
    # every row kept in its place (each has a label and a split, the usual case): the features as they are
    kept = features if keys.height == features.height and (rows.diff() > 0).all() else features[rows]
    return pl.concat([kept, keys.select(added)], how="horizontal")


_ROW = "_training_frame_row"


def _split_rows(frame: pl.DataFrame, split: str, cols: list[str]) -> pl.DataFrame:
    """The rows of ``split``, with the columns used only (the frame's other columns are not filtered)."""
    return frame.lazy().filter(pl.col("split") == split).select(*cols, "boolean_value").collect()


def _xy(part: pl.DataFrame, cols: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`feature_matrix` of the rows, row-major (LightGBM builds its Dataset from it faster than from
    the column-major default: same bins, same model), and the labels."""
    return feature_matrix(part, cols, order="c"), part["boolean_value"].cast(pl.Int8).to_numpy()


def _training_rows(
    frame: pl.DataFrame, cols: list[str]
) -> tuple[np.ndarray, np.ndarray, dict[str, tuple[float, float]]]:
    """:func:`_xy` of the ``train`` rows and their training ranges (the rows' frame is let go before the fit)."""
    part = _split_rows(frame, "train", cols)
    return *_xy(part, cols), _frame_ranges(part, cols)


def _category_candidates(frame: pl.DataFrame, use_case: UseCase) -> pl.DataFrame:
    """The derivation rows (``train`` and ``tuning``) with the columns :func:`feature_columns` looks at to
    choose the one-hot categories: every column but the fixed feature columns (those copied for nothing)."""
    prefixes = tuple(f"{s}__" for s in CATEGORICAL_STATIC)
    fixed = set(feature_columns(use_case))
    looked_at = [c for c in frame.columns if c not in fixed or c.startswith(prefixes)]
    return frame.lazy().filter(pl.col("split").is_in(["train", "tuning"])).select(looked_at).collect()


def training_ranges(x: np.ndarray, cols: list[str]) -> dict[str, tuple[float, float]]:
    """1st and 99th percentile of each feature in the training rows: the range the model has seen
    (percentiles, not extremes, so no single patient's value is stored)."""
    return _ranges((x[:, j] for j in range(len(cols))), cols)


def _frame_ranges(part: pl.DataFrame, cols: list[str]) -> dict[str, tuple[float, float]]:
    """:func:`training_ranges` of :func:`feature_matrix` of ``part``, from its columns as they are stored
    (contiguous, where a column of the row-major matrix is strided)."""
    return _ranges((part.get_column(c).cast(pl.Float64).to_numpy() for c in cols), cols)


def _ranges(columns: Iterable[np.ndarray], cols: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for c, col in zip(cols, columns, strict=True):
        q = _percentiles(col[np.isfinite(col)])
        out[c] = (float(q[0]), float(q[1]))
    return out


_RANGE_QUANTILES = np.array([0.01, 0.99])


def _percentiles(v: np.ndarray) -> np.ndarray:
    """``np.quantile(v, [0.01, 0.99])`` of finite values, bit for bit (numpy's linear method: the order
    statistics either side of ``(n - 1) q`` and its interpolation between them), with the order statistics
    taken from the values beyond a threshold read off a strided sample rather than by partitioning the whole
    column (the same values: the k-th smallest of ``v`` is the k-th smallest of ``v[v <= t]`` while more
    than k values are at or below ``t``)."""
    n = v.size
    if n == 0:
        return np.full(2, np.nan)
    virtual = (n - 1) * _RANGE_QUANTILES
    previous, following = np.floor(virtual), np.floor(virtual) + 1
    last = virtual >= n - 1  # numpy takes the largest value there (index -1, also in its gamma)
    previous[last], following[last] = -1, -1
    before, after = previous.astype(np.intp), following.astype(np.intp)
    gamma = virtual - before
    ab = _order_statistics(v, np.concatenate([before, after]) % n)
    a, b = ab[:2], ab[2:]
    diff = b - a
    out = a + diff * gamma
    np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
    return out


def _order_statistics(v: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """The values at sorted positions ``ks`` of ``v``: those in its lower half from the values at or below a
    threshold, those in its upper half from the values at or above one (each holding about twice the values
    needed according to a strided sample, else the whole column)."""
    n = v.size
    if n < 4096:
        return np.partition(v, ks)[ks]
    sample = np.sort(v[:: n // 2048])
    out = np.empty(len(ks))
    for upper in (False, True):
        which = ks >= n // 2 if upper else ks < n // 2
        if not which.any():
            continue
        pos = ks[which]
        needed = int(n - pos.min()) if upper else int(pos.max()) + 1
        j = min(sample.size - 1, 2 * sample.size * needed // n + 16)
        tail = v[v >= sample[-1 - j]] if upper else v[v <= sample[j]]
        if upper:
            pos = pos - (n - tail.size)
        if tail.size < needed:  # the sample misjudged the tail
            tail, pos = v, ks[which]
        out[which] = np.partition(tail, pos)[pos]
    return out


def fit_model(frame: pl.DataFrame, use_case: UseCase) -> tuple[TrainedModel, FitSummary]:
    """Fit on ``train`` rows, early-stop on ``tuning`` rows; the ``held_out`` rows are not touched."""
    # one-hot categories are those set on enough admissions of the derivation cohort
    cols = feature_columns(use_case, _category_candidates(frame, use_case))
    x_tr, y_tr, ranges = _training_rows(frame, cols)
    x_tu, y_tu = _xy(_split_rows(frame, "tuning", cols), cols)
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
        training_ranges=ranges,
    )
    return model, summary
