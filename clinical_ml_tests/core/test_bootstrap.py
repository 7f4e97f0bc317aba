import numpy as np
import pytest

from clinical_ml.core import bootstrap
from clinical_ml.core.evaluation import auroc


def _loop_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n, n) for _ in range(n_boot)])


@pytest.mark.parametrize("max_cells", [1, 50, 7 * 40, bootstrap.MAX_CELLS])
def test_resample_indices_are_the_plain_loop_stream_whatever_the_block_size(max_cells):
    got = np.concatenate(
        list(bootstrap.resample_indices(40, n_boot=23, rng=np.random.default_rng(3), max_cells=max_cells))
    )
    np.testing.assert_array_equal(got, _loop_indices(40, 23, 3))


def test_a_generator_passed_on_continues_the_stream_as_a_loop_would():
    rng = np.random.default_rng(9)
    first = np.concatenate(list(bootstrap.resample_indices(30, n_boot=5, rng=rng, max_cells=60)))
    second = np.concatenate(list(bootstrap.resample_indices(12, n_boot=4, rng=rng)))
    loop = np.random.default_rng(9)
    want_first = np.stack([loop.integers(0, 30, 30) for _ in range(5)])
    want_second = np.stack([loop.integers(0, 12, 12) for _ in range(4)])
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(second, want_second)


def test_counts_are_the_multiplicities_of_the_same_resamples():
    counts = np.concatenate(list(bootstrap.resample_counts(25, n_boot=11, rng=np.random.default_rng(4))))
    idx = _loop_indices(25, 11, 4)
    want = np.stack([np.bincount(i, minlength=25) for i in idx])
    np.testing.assert_array_equal(counts, want)
    assert (counts.sum(axis=1) == 25).all()


def test_seeds_are_reproducible_and_distinct():
    def draw(seed: int) -> np.ndarray:
        return np.concatenate(list(bootstrap.resample_counts(50, n_boot=8, rng=np.random.default_rng(seed))))

    np.testing.assert_array_equal(draw(1), draw(1))
    assert not np.array_equal(draw(1), draw(2))


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auroc_equals_the_auroc_of_the_repeated_rows_to_the_last_bit(ties):
    rng = np.random.default_rng(5)
    p = rng.random(120)
    if ties:
        p = np.round(p, 1)  # many ties across classes
    y = rng.random(120) < p
    idx = _loop_indices(120, 40, 6)
    counts = np.stack([np.bincount(i, minlength=120) for i in idx]).astype(np.float64)
    got = bootstrap.weighted_auroc(y, p, counts)
    want = np.array([auroc(y[i], p[i]) for i in idx])
    np.testing.assert_array_equal(got, want)


def test_weighted_auroc_is_undefined_where_one_class_has_no_weight():
    y = np.array([0, 0, 1, 1], dtype=bool)
    p = np.array([0.1, 0.4, 0.35, 0.8])
    counts = np.array([[1.0, 1, 1, 1], [2, 2, 0, 0], [0, 0, 3, 1]])
    got = bootstrap.weighted_auroc(y, p, counts)
    assert got[0] == pytest.approx(0.75)
    assert np.isnan(got[1:]).all()


def test_replicates_call_the_statistic_on_each_resample_of_the_stream():
    x = np.random.default_rng(7).normal(size=60)
    got = bootstrap.replicates(
        lambda i: (x[i].mean(), x[i].max()), 60, n_boot=30, rng=np.random.default_rng(8)
    )
    idx = _loop_indices(60, 30, 8)
    np.testing.assert_array_equal(got, np.array([(x[i].mean(), x[i].max()) for i in idx]))
    scalar = bootstrap.replicates(lambda i: x[i].mean(), 60, n_boot=30, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(scalar, got[:, 0])
    assert bootstrap.replicates(lambda i: x[i].mean(), 60, n_boot=0, rng=np.random.default_rng(8)).size == 0


def test_multinomial_counts_keep_each_stratum_total_and_leave_empty_strata_empty():
    counts = np.array([[30, 10, 5, 55], [0, 0, 0, 0], [1, 0, 0, 2]])
    reps = bootstrap.multinomial_counts(counts, n_boot=500, rng=np.random.default_rng(0))
    assert reps.shape == (500, 3, 4)
    np.testing.assert_array_equal(reps.sum(axis=2), np.broadcast_to(counts.sum(axis=1), (500, 3)))
    assert (reps[:, 1] == 0).all()
    assert (reps[:, 2, 1:3] == 0).all()  # an empty cell stays empty
    # the multinomial is the row bootstrap of the stratum: same mean cell shares
    np.testing.assert_allclose(reps[:, 0].mean(axis=0), counts[0], atol=1.5)
    again = bootstrap.multinomial_counts(counts, n_boot=500, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(reps, again)


@pytest.mark.parametrize("level", [0.95, 0.9, 0.5])
def test_percentile_interval_equals_numpy_quantile_of_the_finite_replicates(level):
    rng = np.random.default_rng(1)
    reps = rng.normal(size=(101, 6))
    reps[rng.random(reps.shape) < 0.2] = np.nan
    reps[3, 2] = np.inf
    reps[:, 5] = np.nan
    lo, hi = bootstrap.percentile_interval(reps, level=level)
    a = (1 - level) / 2
    for j in range(5):
        col = reps[:, j][np.isfinite(reps[:, j])]
        want = np.quantile(col, [a, 1 - a])
        assert (lo[j], hi[j]) == (want[0], want[1])
    assert np.isnan(lo[5]) and np.isnan(hi[5])
    assert (lo[:5] <= hi[:5]).all()


def test_a_wider_level_gives_a_wider_interval_that_keeps_its_shape():
    reps = np.random.default_rng(2).gamma(2.0, size=(400, 2, 3))
    lo95, hi95 = bootstrap.percentile_interval(reps, level=0.95)
    lo80, hi80 = bootstrap.percentile_interval(reps, level=0.8)
    assert lo95.shape == (2, 3)
    assert (lo95 <= lo80).all() and (hi80 <= hi95).all()
    assert (reps.min(axis=0) <= lo95).all() and (hi95 <= reps.max(axis=0)).all()
    one = bootstrap.percentile_interval(reps[:, 0, 0], level=0.95)
    assert np.ndim(one[0]) == 0 and one[0] == lo95[0, 0]


def test_percentile_interval_needs_min_finite_replicates():
    vals = np.r_[np.linspace(0.6, 0.8, 49), np.full(151, np.nan)]
    assert np.isnan(bootstrap.percentile_interval(vals, min_finite=50)).all()
    vals[49] = 0.7
    assert np.isfinite(bootstrap.percentile_interval(vals, min_finite=50)).all()
    assert np.isnan(bootstrap.percentile_interval(np.empty(0))).all()
