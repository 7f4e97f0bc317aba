"""Drift statistics, one registered object each: what it measures in plain words, how it is computed from the
reference profile and a batch's column, how it is shown, and whether it can raise a level.

Adding a statistic is a subclass of :class:`DriftStatistic` and one entry in :data:`STATISTICS`; the drift
engine (:mod:`clinical_ml.core.drift`), the HTML and Markdown reports and the monitoring record iterate over
the registered statistics, so none of them changes. A statistic that should raise ERROR also returns its
threshold from :meth:`DriftStatistic.error_level` (a field of :class:`DriftThresholds`, read from the use
case's monitoring file).

Levels (see :mod:`clinical_ml.core.drift`): a statistic with a test (``pvalue_key``) is one of the ``m``
tests of a batch; a column is an ERROR when one of its tests is significant at ``alpha_error / m`` and the
value of the same statistic is at or beyond its ``error_level``. A statistic without a test is reported only.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy import special

PSI_WARN = 0.1
PSI_ERROR = 0.25
PSI_FLOOR = 1e-4
KS_GRID = 10_000  # reference ECDF points kept per column (exact KS when a column has no more distinct values)
NUMERIC, CATEGORICAL = "numeric", "categorical"


@dataclass(frozen=True)
class ColumnReference:
    """What the statistics need from one reference column, computed once (small: no row is kept).

    The reference ECDF is kept at a grid of its values: every distinct value when there are at most
    ``KS_GRID`` of them (statistics built on it are then exact), else ``KS_GRID`` quantiles (then the ECDF is
    exact at the grid points and within ``ks_resolution``, the largest reference mass between two of them).
    ``summaries`` holds what each statistic kept for itself (:meth:`DriftStatistic.summarise`), by name.
    """

    name: str
    kind: str  # numeric | categorical
    n_total: int
    n_observed: int
    grid: np.ndarray  # sorted reference values at which its ECDF is known (numeric)
    cdf_right: np.ndarray  # reference ECDF at grid, F(g)
    cdf_left: np.ndarray  # reference ECDF just below grid, F(g-)
    edges: np.ndarray  # inner PSI bin edges (numeric)
    counts: np.ndarray  # bin (or category) counts, last entry = missing
    categories: tuple = ()
    mean: float = float("nan")
    ks_resolution: float = 0.0
    summaries: Mapping[str, Any] = field(default_factory=dict)

    @property
    def n_missing(self) -> int:
        return int(self.counts[-1])


@dataclass(frozen=True)
class ColumnSample:
    """One column of one batch, prepared once for every statistic.

    Parameters
    ----------
    observed
        The batch's finite values, sorted (numeric columns; empty for categorical ones).
    counts
        The batch's counts on the reference's bins or categories (plus a bin for unseen categories when
        there are any), the last entry the missing values.
    reference_counts
        The reference's counts on the same bins, aligned with ``counts``.
    n_total, n_observed
        Rows of the batch, and those with a value.
    at_grid
        Observed values at or below each point of the reference's ECDF grid (numeric columns).
    """

    observed: np.ndarray
    counts: np.ndarray
    reference_counts: np.ndarray
    n_total: int
    n_observed: int
    at_grid: np.ndarray


@dataclass(frozen=True)
class Measurement:
    """A statistic's value for one column, and its test's p-value when it has one."""

    value: float
    pvalue: float = float("nan")


class DriftStatistic:
    """One drift statistic (subclass it, then add an instance to :data:`STATISTICS`).

    Attributes
    ----------
    name
        Identifier, as named in the monitoring file's ``statistics`` list.
    key, pvalue_key
        Keys of the value and of the test's p-value in a column's drift record (``pvalue_key`` is ``None``
        for a statistic reported only).
    label, meaning
        Column header, and what the statistic measures in words for a physician.
    method
        How it is computed (one clause, for the "how drift is measured" sentence of the reports).
    kinds
        Column kinds it applies to; on other columns its value is NaN.
    on_observed_values
        Its test looks at observed values only, so it counts only when both samples have at least
        ``min_rows`` of them.
    """

    name: ClassVar[str]
    key: ClassVar[str]
    pvalue_key: ClassVar[str | None] = None
    label: ClassVar[str]
    meaning: ClassVar[str]
    method: ClassVar[str]
    kinds: ClassVar[frozenset[str]] = frozenset({NUMERIC, CATEGORICAL})
    on_observed_values: ClassVar[bool] = False

    def summarise(self, observed_sorted: np.ndarray) -> Any:
        """What this statistic keeps of a numeric reference column (its sorted observed values)."""
        return None

    def measure(self, reference: ColumnReference, sample: ColumnSample) -> Measurement:
        """The statistic of one batch column against its reference."""
        raise NotImplementedError

    def error_level(self, thresholds: "DriftThresholds") -> float | None:
        """The value at or beyond which a significant change is material (ERROR); ``None``: never."""
        return None

    def format(self, value: float) -> str:
        """The value as a report shows it."""
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"

    def judged(self, thresholds: "DriftThresholds") -> str:
        """How this statistic makes a significant change material, with the threshold that applies."""
        level = self.error_level(thresholds)
        if self.pvalue_key is None:
            return f"{self.label}: reported only, raises no level"
        if level is None:
            return f"{self.label}: its test raises WARN at most"
        return f"{self.label} at least {self.format(level)}"


def psi_from_counts(ref_counts: np.ndarray, cur_counts: np.ndarray) -> float:
    """PSI of two count vectors over the same bins (shares floored at ``PSI_FLOOR``)."""
    r = np.maximum(ref_counts / max(ref_counts.sum(), 1), PSI_FLOOR)
    c = np.maximum(cur_counts / max(cur_counts.sum(), 1), PSI_FLOOR)
    return float(np.sum((c - r) * np.log(c / r)))


def chi2_homogeneity_pvalue(
    ref_counts: np.ndarray, cur_counts: np.ndarray, *, min_expected: float = 10.0
) -> float:
    """Chi-square test that two samples share one distribution over the bins.

    Adjacent bins (all but the last, the missing bin) are merged until every expected count is at least
    ``min_expected``, so the chi-square approximation holds for small batches too.
    """
    table = np.vstack([ref_counts, cur_counts]).astype(np.float64)
    if (table.sum(axis=1) == 0).any():
        return 1.0
    share = table.sum(axis=0) / table.sum()
    need = min_expected / max(table.sum(axis=1).min(), 1.0)
    merged, acc, acc_share = [], np.zeros(2), 0.0
    for j in range(table.shape[1] - 1):
        acc, acc_share = acc + table[:, j], acc_share + share[j]
        if acc_share >= need:
            merged.append(acc)
            acc, acc_share = np.zeros(2), 0.0
    if acc_share > 0:
        if merged:
            merged[-1] = merged[-1] + acc
        else:
            merged.append(acc)
    if share[-1] >= need:
        merged.append(table[:, -1])
    elif merged:
        merged[-1] = merged[-1] + table[:, -1]
    t = np.array(merged).T
    t = t[:, t.sum(axis=0) > 0]
    if t.shape[1] < 2:
        return 1.0
    expected = t.sum(axis=1, keepdims=True) * t.sum(axis=0, keepdims=True) / t.sum()
    stat = float(np.sum((t - expected) ** 2 / expected))
    return float(special.chdtrc(t.shape[1] - 1, stat))


def ks_two_sample(
    col: ColumnReference, cur_sorted: np.ndarray, *, at_grid: np.ndarray | None = None
) -> tuple[float, float]:
    """Two-sample KS statistic and its asymptotic (Kolmogorov) p-value, from the reference's ECDF grid and
    the sorted current values: four binary searches per grid point, no pass over the reference rows.

    Exact (identical to ``scipy.stats.ks_2samp``) when the grid holds every distinct reference value; else
    exact at the grid points and within ``col.ks_resolution`` of the exact statistic (never above it).
    ``at_grid``, the current values at or below each grid point, saves one of the searches when known.
    """
    n, m = col.n_observed, cur_sorted.size
    if n == 0 or m == 0:
        return float("nan"), float("nan")
    # both ECDFs are right-continuous steps: between two grid points the reference one is flat (exact grid),
    # so the largest gap is at a grid point or just below one
    below = np.searchsorted(cur_sorted, col.grid, side="right") if at_grid is None else at_grid
    cur_right = below / m
    # values below a grid point are those at or below it, unless the last of them equals it: searched
    # again only at those points (few in a continuous column, whose batch rarely holds a reference value)
    strictly = below.copy()
    tied = np.flatnonzero(below > 0)
    tied = tied[cur_sorted[below[tied] - 1] == col.grid[tied]]
    strictly[tied] = np.searchsorted(cur_sorted, col.grid[tied], side="left")
    cur_left = strictly / m
    d = float(
        max(
            np.abs(col.cdf_right - cur_right).max(initial=0.0),
            np.abs(col.cdf_left - cur_left).max(initial=0.0),
        )
    )
    en = n * m / (n + m)
    return d, float(np.clip(special.kolmogorov(np.sqrt(en) * d), 0.0, 1.0))


def two_proportion_pvalue(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided z-test that ``k1 / n1`` and ``k2 / n2`` estimate one proportion."""
    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = np.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    return float(2 * special.ndtr(-abs(k1 / n1 - k2 / n2) / se))


class PopulationStabilityIndex(DriftStatistic):
    """PSI over the reference's quantile bins (or categories) plus a missing bin, tested by chi-square."""

    name, key, pvalue_key, label = "psi", "psi", "chi2_pvalue", "PSI"
    meaning = (
        "how differently the patients spread over the derivation cohort's tenths of values (or its "
        "categories) and 'not measured'; 0 = the same spread"
    )
    method = (
        "PSI over the reference's quantile bins plus a missing-value bin (empty bins floored at "
        f"{PSI_FLOOR:g}), tested by chi-square on the same bins or on the categories"
    )

    def measure(self, reference: ColumnReference, sample: ColumnSample) -> Measurement:
        return Measurement(
            psi_from_counts(sample.reference_counts, sample.counts),
            chi2_homogeneity_pvalue(sample.reference_counts, sample.counts),
        )

    def error_level(self, thresholds: "DriftThresholds") -> float | None:
        return thresholds.psi_error


class KolmogorovSmirnov(DriftStatistic):
    """Two-sample KS on observed values; PSI alone misses modest mean shifts."""

    name, key, pvalue_key, label = "ks", "ks_statistic", "ks_pvalue", "KS"
    meaning = "the largest gap between the shares of patients below any value (0 = same, 1 = no overlap)"
    method = "two-sample Kolmogorov-Smirnov on observed values"
    kinds = frozenset({NUMERIC})
    on_observed_values = True

    def measure(self, reference: ColumnReference, sample: ColumnSample) -> Measurement:
        if min(sample.n_observed, reference.n_observed) <= 1:
            return Measurement(float("nan"))
        return Measurement(*ks_two_sample(reference, sample.observed, at_grid=sample.at_grid))

    def error_level(self, thresholds: "DriftThresholds") -> float | None:
        return thresholds.ks_error


class Missingness(DriftStatistic):
    """The change of the share not measured, tested with a two-proportion z-test."""

    name, key, pvalue_key, label = (
        "missingness",
        "missing_change",
        "missing_pvalue",
        "Change in share not measured",
    )
    meaning = "how much more (or less) often the value is missing than in the derivation cohort"
    method = "two-proportion z-test on the missing share"

    def measure(self, reference: ColumnReference, sample: ColumnSample) -> Measurement:
        k, n = sample.n_total - sample.n_observed, sample.n_total
        change = k / max(n, 1) - reference.n_missing / max(reference.n_total, 1)
        return Measurement(change, two_proportion_pvalue(reference.n_missing, reference.n_total, k, n))

    def error_level(self, thresholds: "DriftThresholds") -> float | None:
        return thresholds.missing_error

    def format(self, value: float) -> str:
        # rounded before the sign is written: a change of -0.2 points is "+0 points", never "-0 points"
        return "n/a" if not math.isfinite(value) else f"{round(100 * value):+d} points"

    def judged(self, thresholds: "DriftThresholds") -> str:
        return f"missing share changed by at least {100 * thresholds.missing_error:.0f} points either way"


class Wasserstein(DriftStatistic):
    """Wasserstein-1 (earth mover's) distance on observed values, in reference standard deviations.

    Dividing by the reference's standard deviation (population SD of its observed values) makes columns of
    different units comparable (as Evidently's normed Wasserstein); NaN when the reference is constant.
    Computed from the reference's ECDF grid: exact (``scipy.stats.wasserstein_distance`` over the SD) when
    the grid holds every distinct reference value, else within ``ks_resolution`` times the reference's range
    (over its SD). Reported only: it has no test of its own, and the level rule pairs significance with size.
    """

    name, key, label = "wasserstein", "wasserstein", "Wasserstein (SD)"
    meaning = (
        "how far values moved on average, in standard deviations of the derivation cohort "
        "(0.2 = a fifth of the usual spread)"
    )
    method = "Wasserstein distance on observed values over the reference's standard deviation"
    kinds = frozenset({NUMERIC})

    def summarise(self, observed_sorted: np.ndarray) -> Any:
        return float(observed_sorted.std()) if observed_sorted.size else float("nan")

    def measure(self, reference: ColumnReference, sample: ColumnSample) -> Measurement:
        sd, x, g = reference.summaries.get(self.name, float("nan")), sample.observed, reference.grid
        if not sd > 0 or x.size == 0 or g.size == 0:
            return Measurement(float("nan"))
        m, n, c_g = x.size, reference.n_observed, sample.at_grid
        # W1 = integral |F_ref - F_cur|. F_ref is R_k = F_ref(g_k) on [g_k, g_k+1) (0 below the grid, 1 from
        # its last point, the maximum); F_cur reaches R_k at t_k, its j_k-th value, j_k = ceil(R_k m). With
        # A(t) = integral of F_cur up to t = (c t - sum of the c smallest values) / m for any c with
        # x[c-1] <= t <= x[c], each piece is closed form.
        j = -(-np.rint(reference.cdf_right[:-1] * n).astype(np.int64) * m // n)
        crossing = x[np.clip(j - 1, 0, m - 1)]
        t = np.clip(crossing, g[:-1], g[1:])
        # a count valid for t that lies in [c_g[k], c_g[k+1]]: sorted, as _prefix_sums needs
        c_t = np.where(crossing > g[1:], c_g[1:], np.maximum(j - 1, c_g[:-1]))
        # c_g[0] <= c_t[0] <= c_g[1] <= ... <= m: interleaved, one summing pass gives every prefix sum
        at = np.empty(2 * g.size, dtype=np.int64)
        at[0:-1:2], at[1:-1:2], at[-1] = c_g, c_t, m
        sums = _prefix_sums(x, at)
        s_g, s_t, total = sums[0:-1:2], sums[1:-1:2], sums[-1]
        a_g, a_t, level = (c_g * g - s_g) / m, (c_t * t - s_t) / m, reference.cdf_right[:-1]
        inner = level * (t - g[:-1]) - (a_t - a_g[:-1]) + (a_g[1:] - a_t) - level * (g[1:] - t)
        above = (total - s_g[-1]) / m - (m - c_g[-1]) / m * g[-1]
        distance = (a_g[0] + inner.sum() + above) / sd
        return Measurement(max(float(distance), 0.0))  # rounding can dip below 0 for identical samples


def _prefix_sums(x: np.ndarray, at: np.ndarray) -> np.ndarray:
    """``x[:c].sum()`` for each ``c`` of the sorted counts ``at`` (in ``[0, x.size]``): one summing pass."""
    inside = at[at < x.size]
    if inside.size == 0:
        return np.full(at.size, x.sum())
    seg = np.add.reduceat(x, inside)  # sum of x[inside[i]:inside[i+1]], the last to the end
    seg[:-1][inside[:-1] == inside[1:]] = 0.0  # reduceat gives x[i] for an empty segment
    head = x[: inside[0]].sum()
    before = head + np.concatenate([[0.0], np.cumsum(seg[:-1])])
    return np.concatenate([before, np.full(at.size - inside.size, head + seg.sum())])


class JensenShannon(DriftStatistic):
    """Jensen-Shannon distance (base 2, so between 0 and 1) between the shares of the reference's bins (or
    categories) and the missing bin; symmetric and finite where PSI needs a floor for empty bins. Reported
    only: it has no test of its own."""

    name, key, label = "jensen_shannon", "jensen_shannon", "Jensen-Shannon"
    meaning = "how far apart the two spreads over the same bins are (0 = the same, 1 = no bin in common)"
    method = "Jensen-Shannon distance (base 2) over the same bins as PSI"

    def measure(self, reference: ColumnReference, sample: ColumnSample) -> Measurement:
        ref, cur = sample.reference_counts.astype(np.float64), sample.counts.astype(np.float64)
        if ref.sum() == 0 or cur.sum() == 0:
            return Measurement(float("nan"))
        p, q = ref / ref.sum(), cur / cur.sum()
        m = (p + q) / 2

        def kl(a: np.ndarray) -> float:  # to the mixture, over the bins a has (the mixture has them too)
            has = a > 0
            return float(np.sum(a[has] * np.log2(a[has] / m[has])))

        return Measurement(float(np.sqrt(max((kl(p) + kl(q)) / 2, 0.0))))


# The registry: the engine, the reports and the records iterate over these, in this order.
STATISTICS: tuple[DriftStatistic, ...] = (
    PopulationStabilityIndex(),
    KolmogorovSmirnov(),
    Missingness(),
    Wasserstein(),
    JensenShannon(),
)


def registered(names: Sequence[str] | None = None) -> tuple[DriftStatistic, ...]:
    """The registered statistics named (all of them when ``names`` is ``None``), in registry order.

    Raises
    ------
    ValueError
        When a name is not registered.
    """
    if names is None:
        return STATISTICS
    known = {s.name for s in STATISTICS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"unknown drift statistics {unknown}; registered: {sorted(known)}")
    return tuple(s for s in STATISTICS if s.name in set(names))


@dataclass(frozen=True)
class DriftThresholds:
    """WARN and ERROR levels of the drift tests, and the statistics computed; read from the use case's
    monitoring file.

    Parameters
    ----------
    alpha_warn, alpha_error
        Family-wise false alarm rate per batch for a warning and for an error (Bonferroni over tests).
    psi_warn, psi_error
        PSI at which a significant change is worth watching / material.
    ks_error
        KS statistic at which a significant change is material.
    missing_error
        Absolute change of the missing share at which a significant change is material.
    n_bins
        Quantile bins of the reference for PSI and chi-square (plus one for missing values).
    min_rows
        Columns with fewer observed values than this in either sample are not tested.
    statistics
        Names of the registered statistics (:data:`STATISTICS`) computed, in registry order; all by default.
    """

    alpha_warn: float = 0.05
    alpha_error: float = 0.01
    psi_warn: float = PSI_WARN
    psi_error: float = PSI_ERROR
    ks_error: float = 0.2
    missing_error: float = 0.2
    n_bins: int = 10
    min_rows: int = 20
    statistics: tuple[str, ...] = tuple(s.name for s in STATISTICS)

    def __post_init__(self) -> None:
        # a YAML list becomes a tuple (hashable, and its repr keys the cached reference profiles)
        object.__setattr__(self, "statistics", tuple(s.name for s in registered(self.statistics)))

    @property
    def selected(self) -> tuple[DriftStatistic, ...]:
        """The statistics computed, as objects."""
        return registered(self.statistics)

    def describe(self) -> str:
        """The statistics and thresholds in words, for reports."""
        tested = [s for s in self.selected if s.pvalue_key is not None and s.error_level(self) is not None]
        others = [s.judged(self) for s in self.selected if s not in tested]
        return (
            "; ".join(s.method for s in self.selected)
            + f". Bins are the reference's {self.n_bins} quantile bins. A column is flagged (WARN) when a test "
            f"is significant at {self.alpha_warn:g}/m (Bonferroni over the m tests of the batch), an ERROR when "
            f"significant at {self.alpha_error:g}/m and material in the same respect ("
            + ", ".join(s.judged(self) for s in tested)
            + ")."
            + "".join(f" {o}." for o in others)
        )
