"""The one bootstrap behind every confidence interval: evaluation, fairness and monitoring.

Resampling, the replicates of the statistics that are costly per resample, and the percentile interval live
here once, the way fairlearn keeps one ``_bootstrap`` module that every metric reuses. The metrics
themselves stay with their owners (:mod:`clinical_ml.core.evaluation`, :mod:`clinical_ml.core.fairness`,
:mod:`clinical_ml.core.performance_monitoring`).

The resample stream
-------------------
A row bootstrap of ``n`` rows draws ``n_boot`` times ``rng.integers(0, n, n)`` from one
``numpy.random.Generator``. :func:`resample_indices` draws them in blocks of replicates, which continues the
same stream: the replicates do not depend on the block size, and a caller that passes the same generator on
to the next group (fairness) gets the same resamples as a plain loop would. Replicates are exposed either as
row indices (for statistics that depend on the order of the resampled rows, such as a stable sort with tied
risks) or as multiplicities, ``counts[b, i]`` = how often row ``i`` is in resample ``b`` (for statistics that
are sums over rows, computed for all replicates at once).
"""

from collections.abc import Callable, Iterator

import numpy as np

MAX_CELLS = 2**20
"""Most index or count cells held at once: a block has ``max(1, MAX_CELLS // n)`` replicates."""


def resample_indices(
    n: int, *, n_boot: int, rng: np.random.Generator, max_cells: int = MAX_CELLS
) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` resamples with replacement, in blocks of replicates.

    Parameters
    ----------
    n : int
        Rows of the data set.
    n_boot : int
        Replicates in all.
    rng : numpy.random.Generator
        Seeded generator; it is advanced exactly as by ``n_boot`` calls of ``rng.integers(0, n, n)``.
    max_cells : int
        Most cells per block.

    Yields
    ------
    numpy.ndarray
        Integer array of shape (replicates in the block, ``n``).
    """
    per_block = max(1, max_cells // max(n, 1))
    for first in range(0, n_boot, per_block):
        yield rng.integers(0, n, (min(per_block, n_boot - first), n))


def resample_counts(
    n: int, *, n_boot: int, rng: np.random.Generator, max_cells: int = MAX_CELLS
) -> Iterator[np.ndarray]:
    """Multiplicities of the resamples of :func:`resample_indices` (same stream), as float64 blocks.

    Yields
    ------
    numpy.ndarray
        Shape (replicates in the block, ``n``); row ``b`` sums to ``n``.
    """
    for idx in resample_indices(n, n_boot=n_boot, rng=rng, max_cells=max_cells):
        k = idx.shape[0]
        flat = (idx + n * np.arange(k)[:, None]).ravel()
        yield np.bincount(flat, minlength=k * n).reshape(k, n).astype(np.float64)


def replicates(
    statistic: Callable[[np.ndarray], float | tuple[float, ...]],
    n: int,
    *,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A statistic of the rows on each resample, one call per replicate (for statistics with no batched form).

    Parameters
    ----------
    statistic : callable
        Takes the row indices of one resample and returns one number or a tuple of numbers.
    n, n_boot, rng
        As in :func:`resample_indices`.

    Returns
    -------
    numpy.ndarray
        Shape (``n_boot``,) for a scalar statistic, (``n_boot``, k) for a k-tuple; (0, 0) when ``n_boot`` is 0.
    """
    values = [statistic(idx) for block in resample_indices(n, n_boot=n_boot, rng=rng) for idx in block]
    return np.asarray(values, dtype=np.float64) if values else np.empty((0, 0))


def multinomial_counts(counts: np.ndarray, *, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Stratified bootstrap of tabulated data: each stratum's cell counts resampled within the stratum.

    A row bootstrap of a stratum only changes how many of its rows fall into each cell (e.g. the four cells
    of a confusion matrix), so each replicate is drawn as a multinomial over the stratum's counts: exactly the
    distribution of the row bootstrap, at a cost independent of the number of rows.

    Parameters
    ----------
    counts : numpy.ndarray
        Shape (strata, cells) of non-negative integers.
    n_boot : int
        Replicates.
    rng : numpy.random.Generator
        Seeded generator, drawn from stratum by stratum.

    Returns
    -------
    numpy.ndarray
        Shape (``n_boot``, strata, cells), int64; an empty stratum stays all zero.
    """
    out = np.zeros((n_boot, *counts.shape), dtype=np.int64)
    for g, c in enumerate(counts):
        total = int(c.sum())
        if total:
            out[:, g, :] = rng.multinomial(total, c / total, size=n_boot)
    return out


def weighted_auroc(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of each resample given by a row of ``counts`` (Mann-Whitney with ties counted half).

    A positive scores the weight of the negatives with a lower risk plus half of those with the same risk.
    With integer multiplicities every sum is exact in float64, so the value equals the mid-rank AUROC of the
    repeated rows (:func:`clinical_ml.core.evaluation.auroc`) to the last bit.

    Parameters
    ----------
    y : numpy.ndarray
        Outcome labels, 0/1.
    p : numpy.ndarray
        Predicted risks.
    counts : numpy.ndarray
        Case weights, shape (replicates, rows).

    Returns
    -------
    numpy.ndarray
        One AUROC per replicate; NaN where one class has no weight.
    """
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="mergesort")
    sp, ys, c = p[order], y[order], counts[:, order]
    new_value = np.r_[True, sp[1:] != sp[:-1]]
    starts = np.flatnonzero(new_value)
    ends = np.r_[starts[1:], sp.size]
    group = np.cumsum(new_value) - 1
    neg_below = np.zeros((c.shape[0], sp.size + 1))
    np.cumsum(c * ~ys, axis=1, out=neg_below[:, 1:])
    pos = np.flatnonzero(ys)
    lo, hi = starts[group[pos]], ends[group[pos]]
    beaten = neg_below[:, lo] + 0.5 * (neg_below[:, hi] - neg_below[:, lo])
    n1 = c[:, pos].sum(axis=1)
    n0 = neg_below[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n1 > 0) & (n0 > 0), (c[:, pos] * beaten).sum(axis=1) / (n1 * n0), np.nan)


def percentile_interval(
    replicates: np.ndarray, *, level: float = 0.95, min_finite: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval along axis 0 from the finite replicates of each column.

    The quantiles are those of ``np.quantile(finite, [a, 1 - a])`` with ``a = (1 - level) / 2`` (linear
    interpolation, numpy's rounding), for every column at once instead of a Python loop per column.

    Parameters
    ----------
    replicates : numpy.ndarray
        Shape (replicates, ...); NaN and infinite values are left out column by column.
    level : float
        Coverage of the interval.
    min_finite : int
        Columns with fewer finite replicates get NaN bounds.

    Returns
    -------
    tuple of numpy.ndarray
        Lower and upper bounds, each of shape ``replicates.shape[1:]`` (0-d for a 1-d input).
    """
    alpha = (1 - level) / 2
    a = np.asarray(replicates, dtype=np.float64)
    shape = a.shape[1:]
    a = np.where(np.isfinite(a), a, np.nan).reshape(a.shape[0], int(np.prod(shape)))
    a = np.sort(a, axis=0)  # NaN sorts last
    k = np.isfinite(a).sum(axis=0)
    cols = np.arange(a.shape[1])
    last = np.maximum(k - 1, 0)
    bounds = []
    for q in (alpha, 1 - alpha):
        pos = last * q
        below = np.floor(pos).astype(np.int64)
        above = np.minimum(below + 1, last)
        t = pos - below
        if a.shape[0] == 0:
            va = vb = np.full(a.shape[1], np.nan)
        else:
            va, vb = a[below, cols], a[above, cols]
        d = vb - va
        # numpy's lerp: from the nearer end, so that t = 1 gives exactly the upper value
        v = np.where(t >= 0.5, vb - d * (1 - t), va + d * t)
        bounds.append(np.where(k >= max(min_finite, 1), v, np.nan).reshape(shape))
    return bounds[0], bounds[1]


def cluster_replicates(
    statistic: Callable[[np.ndarray], float | tuple[float, ...]],
    groups: np.ndarray,
    *,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Like :func:`replicates`, resampling whole groups (patients) instead of rows: a patient with several
    rows (several stays, or a stay predicted at several times) is drawn with all of them, so rows that are
    not independent do not narrow the interval. When every group has one row this is :func:`replicates`
    itself (the same resamples, the same numbers).

    Parameters
    ----------
    groups : numpy.ndarray
        The group of each row (e.g. the patient's pseudonym).
    """
    groups = np.asarray(groups)
    uniq, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if sizes.size == 0 or sizes.max() <= 1:
        return replicates(statistic, len(groups), n_boot=n_boot, rng=rng)
    order = np.argsort(inverse, kind="stable")  # rows grouped, each group's rows contiguous
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    values = []
    for block in resample_indices(uniq.size, n_boot=n_boot, rng=rng):
        for chosen in block:
            lengths = sizes[chosen]
            # row positions: each chosen group's start, plus 0 .. size-1
            offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            values.append(statistic(order[np.repeat(starts[chosen], lengths) + offsets]))
    return np.asarray(values, dtype=np.float64) if values else np.empty((0, 0))
