"""Has a batch moved away from the derivation cohort? Per-column tests with a per-batch false alarm budget.

Binning and tests (stated in every report)
------------------------------------------
- **PSI** (population stability index): the reference's deciles are the bin edges (so every reference bin
  holds ~10% of its observed values; ties merge bins), plus one bin for missing values, so a change in how
  often something is measured counts too. Empty bins are floored at 1e-4 (the usual convention).
- **Chi-square** test of homogeneity on the same bins (numeric columns) or on the categories plus a missing
  category (categorical columns): the reference is a sample too, not a set of exact proportions. Adjacent
  bins are merged until every expected count is at least 10.
- **KS**: the two-sample Kolmogorov-Smirnov statistic on the observed values, Kolmogorov's asymptotic p-value;
  PSI alone misses modest mean shifts. The reference keeps its ECDF at up to ``KS_GRID`` (10,000) of its
  values: the statistic is exactly ``scipy.stats.ks_2samp``'s when a column has no more distinct values (small
  cohorts, and recorded values rounded to the assay's precision), else within the reference mass between two
  grid points (at most ~1e-4 for a large continuous column, e.g. a slope) below it.

Speed: a reference profile is computed once per champion and holds no row; a batch costs one sort per column
plus binary searches of the bin edges and the grid in it.
- **Missingness**: the share of missing values, with a two-proportion z-test.

Levels and multiple testing
---------------------------
A batch runs ``m`` tests (about three per numeric column). Each p-value is compared with ``alpha / m``
(Bonferroni), so the chance that a stable batch raises any alarm is at most ``alpha`` per batch whatever
the number of columns. A column is **drifted** when a test is significant at ``alpha_warn / m``; its level is
**error** when a test is significant at ``alpha_error / m`` and the change that test measures is material (chi-square with
PSI, KS with its statistic, missingness with the change of the missing share, each at or above its error
threshold), **warn** when it is drifted but not error, else ok.
Significance guards small batches (PSI of 100 stable rows is ~0.1 by chance alone); materiality guards
large ones (with a million rows every trivial change is significant).
"""

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from scipy import special

PSI_WARN = 0.1
PSI_ERROR = 0.25
PSI_FLOOR = 1e-4
KS_GRID = 10_000  # reference ECDF points kept per column (exact KS when a column has no more distinct values)
LEVELS = ("ok", "warn", "error")


@dataclass(frozen=True)
class DriftThresholds:
    """WARN and ERROR levels of the drift tests; read from the use case's monitoring file.

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
    """

    alpha_warn: float = 0.05
    alpha_error: float = 0.01
    psi_warn: float = PSI_WARN
    psi_error: float = PSI_ERROR
    ks_error: float = 0.2
    missing_error: float = 0.2
    n_bins: int = 10
    min_rows: int = 20

    def describe(self) -> str:
        """The binning and thresholds in words, for reports."""
        return (
            f"PSI over the reference's {self.n_bins} quantile bins plus a missing-value bin (empty bins floored "
            f"at {PSI_FLOOR:g}); chi-square on the same bins or on categories; two-sample KS on observed "
            f"values; two-proportion z-test on the missing share. A column is flagged when a test is "
            f"significant at {self.alpha_warn:g}/m (Bonferroni over the m tests of the batch), an ERROR when "
            f"significant at {self.alpha_error:g}/m and material (PSI >= {self.psi_error:g}, KS >= "
            f"{self.ks_error:g} or missing share changed by >= {self.missing_error:g})."
        )


@dataclass(frozen=True)
class ColumnReference:
    """What the tests need from one reference column, computed once (small: no row is kept).

    For KS the reference ECDF is kept at a grid of its values: every distinct value when there are at most
    ``KS_GRID`` of them (the statistic is then exact), else ``KS_GRID`` quantiles (then the statistic is
    exact at the grid points and within ``ks_resolution``, the largest reference mass between two of them,
    of the exact one).
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

    @property
    def n_missing(self) -> int:
        return int(self.counts[-1])


@dataclass(frozen=True)
class ReferenceProfile:
    """The derivation cohort summarised for drift tests: sort once, test many batches."""

    columns: tuple[ColumnReference, ...]
    n_rows: int
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


@dataclass(frozen=True)
class FeatureDrift:
    """Drift of one column of one batch."""

    feature: str
    kind: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    chi2_pvalue: float
    missing_reference: float
    missing_current: float
    missing_pvalue: float
    mean_reference: float
    mean_current: float
    n_current: int
    p_min: float  # smallest p-value of the column's tests
    drifted: bool
    level: str  # ok | warn | error


def _observed_sorted(values: np.ndarray) -> np.ndarray:
    """Finite values, sorted (NaN and +-inf, i.e. missing, dropped): one sort, no boolean copy."""
    s = np.sort(np.asarray(values, dtype=np.float64))
    # sort order: -inf, finite values, +inf, NaN
    lo, hi = np.searchsorted(s, -np.inf, side="right"), np.searchsorted(s, np.inf, side="left")
    return s[lo:hi]


def _numeric_reference(name: str, values: np.ndarray, n_bins: int) -> ColumnReference:
    v = np.asarray(values, dtype=np.float64)
    obs = _observed_sorted(v)
    n = obs.size
    if n:
        edges = np.unique(obs[np.minimum((np.arange(1, n_bins) * n) // n_bins, n - 1)])
        # drop an edge equal to the minimum, so the first bin is never empty by construction
        edges = edges[edges > obs[0]]
        uniq = obs[np.concatenate([[True], obs[1:] != obs[:-1]])]
        grid = (
            uniq if uniq.size <= KS_GRID else np.unique(obs[(np.arange(1, KS_GRID + 1) * n) // KS_GRID - 1])
        )
        right = np.searchsorted(obs, grid, side="right") / n
        left = np.searchsorted(obs, grid, side="left") / n
        # reference mass strictly between consecutive grid points (zero when the grid is every value)
        gaps = np.append(left, 1.0) - np.concatenate([[0.0], right])
        counts = np.diff(np.concatenate([[0], np.searchsorted(obs, edges, side="left"), [n]]))
        mean, resolution = float(obs.mean()), float(gaps.max())
    else:
        edges = grid = right = left = np.zeros(0)
        counts = np.zeros(1, dtype=np.int64)
        mean, resolution = float("nan"), 0.0
    return ColumnReference(
        name=name,
        kind="numeric",
        n_total=v.size,
        n_observed=n,
        grid=grid,
        cdf_right=right,
        cdf_left=left,
        edges=edges,
        counts=np.append(counts, v.size - n).astype(np.int64),
        mean=mean,
        ks_resolution=resolution,
    )


def _category_counts(values: np.ndarray, categories: tuple) -> tuple[np.ndarray, int]:
    """Counts of each known category, and of values (>= 0) in none of them."""
    v = np.asarray(values, dtype=np.int64)
    observed = v[v >= 0]
    per_code = np.bincount(observed) if observed.size else np.zeros(0, dtype=np.int64)
    known = np.array([per_code[c] if c < per_code.size else 0 for c in categories], dtype=np.int64)
    return known, int(observed.size - known.sum())


def _categorical_reference(name: str, values: np.ndarray) -> ColumnReference:
    v = np.asarray(values, dtype=np.int64)
    observed = v[v >= 0]
    cats = tuple(int(c) for c in np.flatnonzero(np.bincount(observed))) if observed.size else ()
    known, _ = _category_counts(v, cats)
    empty = np.zeros(0)
    return ColumnReference(
        name=name,
        kind="categorical",
        n_total=v.size,
        n_observed=observed.size,
        grid=empty,
        cdf_right=empty,
        cdf_left=empty,
        edges=empty,
        counts=np.append(known, v.size - observed.size).astype(np.int64),
        categories=cats,
    )


def reference_profile(
    reference: np.ndarray,
    feature_names: Sequence[str],
    *,
    categorical: Mapping[str, np.ndarray] | None = None,
    thresholds: DriftThresholds | None = None,
) -> ReferenceProfile:
    """Summarise the reference (derivation cohort) once.

    Parameters
    ----------
    reference
        Rows x numeric columns, NaN for missing.
    feature_names
        Names of ``reference``'s columns.
    categorical
        Optional categorical columns as integer codes (``-1`` = missing), by name.
    thresholds
        Levels and binning; :class:`DriftThresholds` defaults when omitted.
    """
    th = thresholds or DriftThresholds()
    ref = np.asarray(reference, dtype=np.float64)
    cols = [_numeric_reference(n, ref[:, j], th.n_bins) for j, n in enumerate(feature_names)]
    cols += [_categorical_reference(n, v) for n, v in (categorical or {}).items()]
    return ReferenceProfile(columns=tuple(cols), n_rows=ref.shape[0], thresholds=th)


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


def ks_two_sample(col: ColumnReference, cur_sorted: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and its asymptotic (Kolmogorov) p-value, from the reference's ECDF grid and
    the sorted current values: four binary searches per grid point, no pass over the reference rows.

    Exact (identical to ``scipy.stats.ks_2samp``) when the grid holds every distinct reference value; else
    exact at the grid points and within ``col.ks_resolution`` of the exact statistic (never above it).
    """
    n, m = col.n_observed, cur_sorted.size
    if n == 0 or m == 0:
        return float("nan"), float("nan")
    # both ECDFs are right-continuous steps: between two grid points the reference one is flat (exact grid),
    # so the largest gap is at a grid point or just below one
    cur_right = np.searchsorted(cur_sorted, col.grid, side="right") / m
    cur_left = np.searchsorted(cur_sorted, col.grid, side="left") / m
    d = float(
        max(
            np.abs(col.cdf_right - cur_right).max(initial=0.0),
            np.abs(col.cdf_left - cur_left).max(initial=0.0),
        )
    )
    en = n * m / (n + m)
    return d, float(np.clip(special.kolmogorov(np.sqrt(en) * d), 0.0, 1.0))


def _two_proportion_pvalue(k1: int, n1: int, k2: int, n2: int) -> float:
    if n1 == 0 or n2 == 0:
        return 1.0
    p = (k1 + k2) / (n1 + n2)
    se = np.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    return float(2 * special.ndtr(-abs(k1 / n1 - k2 / n2) / se))


def _column_stats(col: ColumnReference, values: np.ndarray) -> dict:
    if col.kind == "numeric":
        obs = _observed_sorted(values)
        n_obs, n_total = obs.size, int(np.asarray(values).size)
        # bin k holds edges[k-1] <= x < edges[k]: counts from binary searches of the edges in sorted values
        counts = np.diff(np.concatenate([[0], np.searchsorted(obs, col.edges, side="left"), [n_obs]]))
        counts = np.append(counts, n_total - n_obs)
        ks_d, ks_p = ks_two_sample(col, obs) if min(n_obs, col.n_observed) > 1 else (np.nan,) * 2
        mean = float(obs.mean()) if n_obs else float("nan")
    else:
        v = np.asarray(values, dtype=np.int64)
        known, unseen = _category_counts(v, col.categories)
        n_total = v.size
        n_obs = int(known.sum()) + unseen
        counts = np.append(known, n_total - n_obs)
        if unseen:  # categories the reference never had are a bin of their own
            counts = np.insert(counts, -1, unseen)
        ks_d = ks_p = float("nan")
        mean = float("nan")
    ref_counts = col.counts if counts.size == col.counts.size else np.insert(col.counts, -1, 0)
    return {
        "psi": psi_from_counts(ref_counts, counts),
        "chi2_pvalue": chi2_homogeneity_pvalue(ref_counts, counts),
        "ks_statistic": float(ks_d),
        "ks_pvalue": float(ks_p),
        "missing_reference": col.n_missing / max(col.n_total, 1),
        "missing_current": (n_total - n_obs) / max(n_total, 1),
        "missing_pvalue": _two_proportion_pvalue(col.n_missing, col.n_total, n_total - n_obs, n_total),
        "mean_current": mean,
        "n_current": int(n_total),
        "n_observed": int(n_obs),
    }


def _level(s: dict, col: ColumnReference, th: DriftThresholds, n_tests: int) -> tuple[float, bool, str]:
    if s["n_current"] < th.min_rows:
        return 1.0, False, "ok"
    testable = s["n_observed"] >= th.min_rows and col.n_observed >= th.min_rows
    # each test is paired with its own effect size: significant AND material in the same respect
    tests = [
        (s["chi2_pvalue"], s["psi"] >= th.psi_error),
        (s["missing_pvalue"], abs(s["missing_current"] - s["missing_reference"]) >= th.missing_error),
    ]
    if col.kind == "numeric" and testable and np.isfinite(s["ks_pvalue"]):
        tests.append((s["ks_pvalue"], s["ks_statistic"] >= th.ks_error))
    p_min = float(min(p for p, _ in tests))
    drifted = p_min < th.alpha_warn / n_tests
    if any(p < th.alpha_error / n_tests and material for p, material in tests):
        return p_min, True, "error"
    return p_min, drifted, "warn" if drifted else "ok"


def n_tests_for(profile: ReferenceProfile) -> int:
    """Tests one batch runs: chi-square and missingness per column, plus KS per numeric column."""
    return sum(3 if c.kind == "numeric" else 2 for c in profile.columns)


def batch_drift(
    profile: ReferenceProfile,
    current: np.ndarray,
    *,
    categorical: Mapping[str, np.ndarray] | None = None,
    n_tests: int | None = None,
    workers: int = 1,
) -> list[FeatureDrift]:
    """Drift of every column of one batch against the reference profile, most significant first.

    Parameters
    ----------
    profile
        From :func:`reference_profile` (its thresholds apply).
    current
        The batch's rows x numeric columns, in the profile's numeric column order (column-major, as
        ``polars.DataFrame.to_numpy`` returns it, reads fastest).
    categorical
        The batch's categorical columns as integer codes (``-1`` = missing), by name.
    n_tests
        Bonferroni denominator; defaults to the tests of this batch. Pass a larger one when several
        families (e.g. subgroups) share one false alarm budget.
    workers
        Threads over columns (numpy releases the GIL while sorting and searching).
    """
    th = profile.thresholds
    cur = np.asarray(current, dtype=np.float64)
    if cur.ndim == 1:
        cur = cur[:, None]
    numeric = [c for c in profile.columns if c.kind == "numeric"]
    cats = categorical or {}
    m = n_tests or n_tests_for(profile)
    jobs = [(c, cur[:, j]) for j, c in enumerate(numeric)]
    jobs += [(c, cats[c.name]) for c in profile.columns if c.kind == "categorical" and c.name in cats]

    def one(job: tuple[ColumnReference, np.ndarray]) -> FeatureDrift:
        col, values = job
        s = _column_stats(col, values)
        p_min, drifted, level = _level(s, col, th, m)
        return FeatureDrift(
            feature=col.name,
            kind=col.kind,
            psi=s["psi"],
            ks_statistic=s["ks_statistic"],
            ks_pvalue=s["ks_pvalue"],
            chi2_pvalue=s["chi2_pvalue"],
            missing_reference=s["missing_reference"],
            missing_current=s["missing_current"],
            missing_pvalue=s["missing_pvalue"],
            mean_reference=col.mean,
            mean_current=s["mean_current"],
            n_current=s["n_current"],
            p_min=p_min,
            drifted=drifted,
            level=level,
        )

    if workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            out = list(pool.map(one, jobs))
    else:
        out = [one(j) for j in jobs]
    rank = {lvl: i for i, lvl in enumerate(LEVELS)}
    return sorted(out, key=lambda d: (-rank[d.level], d.p_min, -d.psi))


def worst_level(levels: Sequence[str]) -> str:
    """The most severe of ``ok``, ``warn``, ``error``."""
    return max(levels, key=LEVELS.index, default="ok")


def psi(reference: np.ndarray, current: np.ndarray, *, n_bins: int = 10) -> float:
    """Population stability index with reference-quantile bins and a missing-value bin."""
    col = _numeric_reference("x", np.asarray(reference, dtype=np.float64), n_bins)
    return _column_stats(col, np.asarray(current, dtype=np.float64))["psi"]


def feature_drift(
    reference: np.ndarray,
    current: np.ndarray,
    feature_names: list[str],
    *,
    thresholds: DriftThresholds | None = None,
) -> list[FeatureDrift]:
    """Drift of every numeric column of ``current`` against ``reference`` (see :func:`batch_drift`)."""
    return batch_drift(reference_profile(reference, feature_names, thresholds=thresholds), current)
