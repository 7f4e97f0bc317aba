"""Fitting the challenger: the rows, columns and values it is trained on are those of the feature tables.

``training_frame`` and ``fit_model`` avoid copying the wide feature table (the joins choose rows on the key
columns, the matrices are built from the columns used); these tests pin that the model and its fit summary
are the ones the plain construction gives: the same joins, ``feature_columns`` on the derivation rows,
``feature_matrix`` of each split.
"""

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.features import ROW_KEY, feature_columns, feature_matrix
from clinical_ml.core.modeling import train_model
from clinical_ml.core.training import fit_model, training_frame, training_ranges
from clinical_ml.core.usecase import load_use_case

USE_CASE = load_use_case(Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml")


def _tables(
    n: int = 900, seed: int = 5, labelled: float = 0.9
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Features (the use case's columns, missing values, one-hot columns of which one is too rare to be
    chosen), labels for most rows only, and patient splits; rows in no particular order."""
    rng = np.random.default_rng(seed)
    cols = feature_columns(USE_CASE)
    x = rng.normal(size=(n, len(cols)))
    x[rng.random(x.shape) < 0.3] = np.nan
    subject = rng.permutation(n) // 2  # two prediction rows per patient, one per stay
    t0 = datetime(2026, 1, 5)
    features = pl.DataFrame(
        {
            "subject_id": subject,
            "hadm_id": subject * 10 + np.arange(n) % 2,
            "prediction_time": [t0 + timedelta(hours=int(h)) for h in rng.integers(0, 5000, n)],
        }
    ).hstack(pl.DataFrame(x, schema=cols))
    features = features.with_columns(
        pl.Series("sex__F", (rng.random(n) < 0.5).astype(float)),
        pl.Series("unit__MICU", (rng.random(n) < 0.3).astype(float)),
        pl.Series("unit__RARE", (np.arange(n) < 3).astype(float)),  # on 3 admissions: not chosen
    )
    y = rng.random(n) < 1 / (1 + np.exp(-(np.nan_to_num(x[:, 0]) - 1.5)))
    labels = features.select(
        "subject_id", "prediction_time", pl.Series("boolean_value", y), "hadm_id"
    ).filter(pl.Series(rng.random(n) < labelled))
    patients = np.unique(subject)
    splits = pl.DataFrame(
        {
            "subject_id": patients,
            "split": rng.choice(["train", "tuning", "held_out"], patients.size, p=[0.6, 0.2, 0.2]),
        }
    )
    return features, labels, splits


@pytest.mark.parametrize("labelled", [0.9, 1.0])
def test_the_training_frame_is_the_features_joined_to_their_labels_and_splits(labelled):
    features, labels, splits = _tables(labelled=labelled)
    plain = features.join(labels.select(*ROW_KEY, "boolean_value"), on=ROW_KEY, how="inner").join(
        splits, on="subject_id", how="inner"
    )
    frame = training_frame(features, labels, splits)
    assert frame.columns == plain.columns
    assert frame.equals(plain)


def test_the_challenger_is_the_model_of_the_plain_feature_matrices():
    frame = training_frame(*_tables())
    model, fit = fit_model(frame, USE_CASE)

    cols = feature_columns(USE_CASE, frame.filter(pl.col("split").is_in(["train", "tuning"])))
    assert "unit__MICU" in cols and "unit__RARE" not in cols
    train, tune = frame.filter(pl.col("split") == "train"), frame.filter(pl.col("split") == "tuning")
    x_tr, y_tr = feature_matrix(train, cols), train["boolean_value"].cast(pl.Int8).to_numpy()
    x_tu, y_tu = feature_matrix(tune, cols), tune["boolean_value"].cast(pl.Int8).to_numpy()
    plain = train_model(x_tr, y_tr, x_tu, y_tu, feature_names=cols, seed=USE_CASE.validation.seed)

    assert model.feature_names == cols
    assert model.to_text() == plain.to_text()
    assert (fit.n_train, fit.n_tuning, fit.events_train) == (len(y_tr), len(y_tu), int(y_tr.sum()))
    assert fit.training_ranges == training_ranges(x_tr, cols)


def test_training_ranges_are_the_1st_and_99th_percentiles_of_the_finite_values():
    x = np.array([[1.0, np.nan], [2.0, np.inf], [3.0, np.nan], [np.nan, np.nan]])
    ranges = training_ranges(x, ["a", "b"])
    assert ranges["a"] == (
        float(np.quantile([1.0, 2.0, 3.0], 0.01)),
        float(np.quantile([1.0, 2.0, 3.0], 0.99)),
    )
    assert np.isnan(ranges["b"][0]) and np.isnan(ranges["b"][1])


def test_the_ranges_from_the_frames_columns_are_those_of_its_feature_matrix():
    """``fit_model`` takes the training ranges from the stored columns (nulls, integers, infinities and all)
    and fits on the row-major matrix: the same values as the default column-major ``feature_matrix``."""
    from clinical_ml.core.training import _frame_ranges

    part = pl.DataFrame(
        {
            "a": [1.0, None, 3.0, float("nan"), 2.0, float("inf")],
            "b": pl.Series([4, None, 1, 9, 2, 7], dtype=pl.Int64),
            "c": pl.Series([None] * 6, dtype=pl.Float64),
            "d": [True, False, None, True, True, False],
        }
    )
    cols = ["a", "b", "c", "d"]
    np.testing.assert_equal(_frame_ranges(part, cols), training_ranges(feature_matrix(part, cols), cols))
    row_major = feature_matrix(part, cols, order="c")
    assert row_major.flags.c_contiguous and row_major.flags.writeable and row_major.dtype == np.float64
    np.testing.assert_array_equal(row_major, feature_matrix(part, cols))


def test_the_ranges_are_measured_two_columns_at_a_time_with_the_same_values_as_one_at_a_time(monkeypatch):
    """Two columns are measured at once (each waits at a barrier for the other: one at a time, it would
    time out), and the ranges are the same, in the same order, as one column at a time."""
    import threading

    from clinical_ml.core import training

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 12))
    x[rng.random(x.shape) < 0.3] = np.nan
    cols = [f"f{j}" for j in range(12)]
    both_at_once = threading.Barrier(2, timeout=10)

    def column(j: int) -> np.ndarray:
        if j < 2:
            both_at_once.wait()
        return x[:, j]

    together = training._ranges(column, cols)
    monkeypatch.setattr(training, "RANGE_THREADS", 1)
    alone = training_ranges(x, cols)
    assert list(together) == cols
    assert together == alone
    assert together["f0"] == (
        float(np.nanquantile(x[:, 0], 0.01)),
        float(np.nanquantile(x[:, 0], 0.99)),
    )
