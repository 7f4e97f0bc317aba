"""Resampling patients, not rows, where a patient has several rows."""

import numpy as np

from clinical_ml.core import bootstrap
from clinical_ml.core.evaluation import bootstrap_metrics


def test_with_one_row_per_patient_the_cluster_bootstrap_is_the_row_bootstrap():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.2
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    rows = bootstrap_metrics(y, p, 0.5, n_boot=200, seed=9)
    clusters = bootstrap_metrics(y, p, 0.5, n_boot=200, seed=9, groups=np.arange(300) + 1000)
    assert rows == clusters


def test_a_patients_rows_are_drawn_together():
    groups = np.repeat(np.arange(40), np.arange(40) % 4 + 1)  # 1 to 4 rows per patient
    size = np.bincount(groups)

    def whole_patients(idx: np.ndarray) -> float:
        drawn = np.bincount(groups[idx], minlength=40)
        return float(np.all(drawn % size == 0) and idx.size > 0)

    reps = bootstrap.cluster_replicates(whole_patients, groups, n_boot=100, rng=np.random.default_rng(1))
    assert reps.shape == (100,) and reps.all()


def test_repeated_rows_of_the_same_patients_do_not_narrow_the_interval():
    rng = np.random.default_rng(5)
    n = 250
    y = rng.random(n) < 0.25
    p = np.clip(0.25 * y + rng.normal(0.35, 0.15, n), 0.001, 0.999)
    one = bootstrap_metrics(y, p, 0.45, n_boot=400, seed=2)["auroc"]
    # every patient predicted 6 times with the same data: no new information
    y6, p6, g6 = np.repeat(y, 6), np.repeat(p, 6), np.repeat(np.arange(n), 6)
    rows = bootstrap_metrics(y6, p6, 0.45, n_boot=400, seed=2)["auroc"]
    clusters = bootstrap_metrics(y6, p6, 0.45, n_boot=400, seed=2, groups=g6)["auroc"]
    width = lambda m: m.upper - m.lower  # noqa: E731
    assert width(rows) < 0.6 * width(one)  # rows as if independent: about 1/sqrt(6) as wide
    assert 0.75 * width(one) < width(clusters) < 1.33 * width(one)
