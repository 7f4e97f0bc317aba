"""Has a batch moved away from the derivation cohort? Per-column statistics with a per-batch false alarm budget.

The statistics are registered objects (:mod:`clinical_ml.core.drift_statistics`: what each measures, how it
is computed and shown, whether it can raise a level); this module is the engine that runs them.

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
- **Missingness**: the change of the share missing, with a two-proportion z-test.
- **Wasserstein** distance on observed values over the reference's standard deviation, from the same ECDF
  grid; reported only (no test of its own).

Speed: a reference profile is computed once per champion and holds no row; a batch costs one sort per column
plus binary searches of the bin edges and the grid in it.

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

import itertools
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import polars as pl
from polars.lazyframe.in_process import InProcessQuery

from clinical_ml.core.display_names import display_name
from clinical_ml.core.drift_statistics import (
    CATEGORICAL,
    KS_GRID,
    NUMERIC,
    ColumnReference,
    ColumnSample,
    DriftStatistic,
    DriftThresholds,
)

# kept importable from here while defs/ still names them (the levels come from DriftThresholds)
from clinical_ml.core.drift_statistics import PSI_ERROR as PSI_ERROR
from clinical_ml.core.drift_statistics import PSI_WARN as PSI_WARN

LEVELS = ("ok", "warn", "error")


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
    """Drift of one column of one batch.

    ``values`` holds every computed statistic's value and p-value by their keys (``psi``, ``chi2_pvalue``,
    ``ks_statistic``, ...; NaN where a statistic does not apply to the column's kind).
    """

    feature: str
    kind: str
    values: Mapping[str, float]
    missing_reference: float
    missing_current: float
    mean_reference: float
    mean_current: float
    n_current: int
    p_min: float  # smallest p-value of the column's tests
    drifted: bool
    level: str  # ok | warn | error

    def value(self, key: str) -> float:
        """A statistic's value or p-value by its key; NaN when it was not computed."""
        return float(self.values.get(key, math.nan))

    def as_dict(self) -> dict:
        """Flat record: the descriptive fields and every statistic's value and p-value by key."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "values"}
        return {**plain, **self.values}


def _observed_sorted(values: np.ndarray) -> np.ndarray:
    """Finite values, sorted (NaN and +-inf, i.e. missing, dropped): one sort, no boolean copy."""
    s = np.sort(np.asarray(values, dtype=np.float64))
    # sort order: -inf, finite values, +inf, NaN
    lo, hi = np.searchsorted(s, -np.inf, side="right"), np.searchsorted(s, np.inf, side="left")
    return s[lo:hi]


_INF_BITS = np.array([-np.inf, np.inf]).view(np.int64)


def _finite_from_sorted_bits(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A column's finite values sorted, from its doubles' bits sorted as int64: those of the non-negative
    doubles (sign bit clear) sort as the doubles do (0.0, the positive values, +inf, NaN), after those of the
    negative ones (sign bit set), which sort in reverse (-0.0, the negative values from the smallest in size,
    -inf, then NaN with its sign bit set). So: the negative finite values reversed (-0.0 last), then the
    non-negative finite ones; a view of ``bits`` when the column has no negative value, else a copy (into
    ``out`` when given: fresh memory costs more in page faults than the copy)."""
    n_negative = int(np.searchsorted(bits, 0, side="left"))
    negative = bits[: np.searchsorted(bits[:n_negative], _INF_BITS[0], side="left")].view(np.float64)
    positive = bits[n_negative : np.searchsorted(bits, _INF_BITS[1], side="left")].view(np.float64)
    if negative.size == 0:
        return positive
    values = np.empty(negative.size + positive.size) if out is None else out[: negative.size + positive.size]
    values[: negative.size] = negative[::-1]
    values[negative.size :] = positive
    return values


def _observed_columns(
    matrix: np.ndarray, *, first: int = 2, chunk: int = 6, reuse: bool = False
) -> Iterator[np.ndarray]:
    """Every column's finite values, sorted (those of :func:`_observed_sorted`; -0.0 before 0.0), one read-only
    array per column, in column order.

    Polars sorts the columns on its thread pool, 3x to 4x faster than numpy column by column (the sort is ~80%
    of a batch's drift check at 250,000 rows), and sorts their doubles' bits as int64 (as the matrix is, no
    copy), ~15% less CPU than the doubles (:func:`_finite_from_sorted_bits` puts the values in order). The
    columns are sorted ``chunk`` at a time (``first`` in the first query, so that the caller starts early) in
    the background of this thread, two queries queued at a time: the caller's work on a column (its
    statistics, on this thread) runs while polars sorts the next columns, instead of after every sort with
    polars' pool idle. The first queries start when this is called. ``reuse``: the columns that are copies
    share one array, overwritten by the next of them (for a caller done with each column before the next)."""
    n_cols = matrix.shape[1]
    out = np.empty(matrix.shape[0]) if reuse else None
    bounds = [0, *range(min(first, n_cols), n_cols, chunk), n_cols]
    parts = [(lo, hi) for lo, hi in itertools.pairwise(bounds) if hi > lo]

    def start(lo: int, hi: int) -> InProcessQuery:
        bits = np.asarray(matrix[:, lo:hi], dtype=np.float64).view(np.int64)
        frame = pl.DataFrame(bits, schema=[str(j) for j in range(lo, hi)], orient="row")
        return frame.lazy().select(pl.all().sort()).collect(background=True)

    pending = deque(start(*part) for part in parts[:2])  # started now, before the caller's first look

    def handed_over() -> Iterator[np.ndarray]:
        for k in range(len(parts)):
            done = pending.popleft().fetch_blocking()
            if k + 2 < len(parts):
                pending.append(start(*parts[k + 2]))
            yield from (_finite_from_sorted_bits(column.to_numpy(), out) for column in done.get_columns())

    return handed_over()


def _numeric_reference(
    name: str, values: np.ndarray, n_bins: int, statistics: Sequence[DriftStatistic]
) -> ColumnReference:
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
        kind=NUMERIC,
        n_total=v.size,
        n_observed=n,
        grid=grid,
        cdf_right=right,
        cdf_left=left,
        edges=edges,
        counts=np.append(counts, v.size - n).astype(np.int64),
        mean=mean,
        ks_resolution=resolution,
        summaries={s.name: s.summarise(obs) for s in statistics if NUMERIC in s.kinds},
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
        kind=CATEGORICAL,
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
        Levels, binning and the statistics computed; :class:`DriftThresholds` defaults when omitted.
    """
    th = thresholds or DriftThresholds()
    ref = np.asarray(reference, dtype=np.float64)
    stats = th.selected
    cols = [_numeric_reference(n, ref[:, j], th.n_bins, stats) for j, n in enumerate(feature_names)]
    cols += [_categorical_reference(n, v) for n, v in (categorical or {}).items()]
    return ReferenceProfile(columns=tuple(cols), n_rows=ref.shape[0], thresholds=th)


def _column_sample(
    col: ColumnReference, values: np.ndarray, *, observed: np.ndarray | None = None
) -> ColumnSample:
    """The batch's column prepared once for every statistic: sorted observed values, counts on the bins.
    ``observed``: a numeric column's finite values sorted, when known (:func:`_observed_columns`)."""
    if col.kind == NUMERIC:
        obs = _observed_sorted(values) if observed is None else observed
        n_obs, n_total = obs.size, int(np.asarray(values).size)
        # bin k holds edges[k-1] <= x < edges[k]: counts from binary searches of the edges in sorted values
        counts = np.diff(np.concatenate([[0], np.searchsorted(obs, col.edges, side="left"), [n_obs]]))
        counts = np.append(counts, n_total - n_obs)
        at_grid = np.searchsorted(obs, col.grid, side="right")
    else:
        v = np.asarray(values, dtype=np.int64)
        known, unseen = _category_counts(v, col.categories)
        obs, n_total, at_grid = np.zeros(0), v.size, np.zeros(0, dtype=np.int64)
        n_obs = int(known.sum()) + unseen
        counts = np.append(known, n_total - n_obs)
        if unseen:  # categories the reference never had are a bin of their own
            counts = np.insert(counts, -1, unseen)
    ref_counts = col.counts if counts.size == col.counts.size else np.insert(col.counts, -1, 0)
    return ColumnSample(
        observed=obs,
        counts=counts,
        reference_counts=ref_counts,
        n_total=int(n_total),
        n_observed=int(n_obs),
        at_grid=at_grid,
    )


def _measure(
    col: ColumnReference, sample: ColumnSample, statistics: Sequence[DriftStatistic]
) -> dict[str, float]:
    values: dict[str, float] = {}
    for s in statistics:
        m = s.measure(col, sample) if col.kind in s.kinds else None
        values[s.key] = float(m.value) if m else math.nan
        if s.pvalue_key is not None:
            values[s.pvalue_key] = float(m.pvalue) if m else math.nan
    return values


def _level(
    values: Mapping[str, float],
    sample: ColumnSample,
    col: ColumnReference,
    th: DriftThresholds,
    statistics: Sequence[DriftStatistic],
    n_tests: int,
) -> tuple[float, bool, str]:
    if sample.n_total < th.min_rows:
        return 1.0, False, "ok"
    testable = sample.n_observed >= th.min_rows and col.n_observed >= th.min_rows
    # each test is paired with its own statistic's size: significant AND material in the same respect
    tests = []
    for s in statistics:
        p = values[s.pvalue_key] if s.pvalue_key is not None else math.nan
        if math.isfinite(p) and (testable or not s.on_observed_values):
            error = s.error_level(th)
            tests.append((p, error is not None and abs(values[s.key]) >= error))
    p_min = float(min((p for p, _ in tests), default=1.0))
    drifted = p_min < th.alpha_warn / n_tests
    if any(p < th.alpha_error / n_tests and material for p, material in tests):
        return p_min, True, "error"
    return p_min, drifted, "warn" if drifted else "ok"


def n_tests_for(profile: ReferenceProfile) -> int:
    """Tests one batch runs: one per statistic with a test that applies to a column's kind (by default
    chi-square and missingness per column, plus KS per numeric column)."""
    tested = [s for s in profile.thresholds.selected if s.pvalue_key is not None]
    return sum(sum(c.kind in s.kinds for s in tested) for c in profile.columns)


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
        From :func:`reference_profile` (its thresholds, and the statistics they select, apply).
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
    statistics = th.selected
    cur = np.asarray(current, dtype=np.float64)
    if cur.ndim == 1:
        cur = cur[:, None]
    numeric = [c for c in profile.columns if c.kind == NUMERIC]
    cats = categorical or {}
    m = n_tests or n_tests_for(profile)
    categorical_columns = [c for c in profile.columns if c.kind == CATEGORICAL and c.name in cats]

    def one(col: ColumnReference, raw: np.ndarray, observed: np.ndarray | None = None) -> FeatureDrift:
        # a numeric column comes sorted (_observed_columns); categorical codes are counted, never sorted
        sample = _column_sample(col, raw, observed=observed)
        values = _measure(col, sample, statistics)
        p_min, drifted, level = _level(values, sample, col, th, statistics, m)
        return FeatureDrift(
            feature=col.name,
            kind=col.kind,
            values=values,
            missing_reference=col.n_missing / max(col.n_total, 1),
            missing_current=(sample.n_total - sample.n_observed) / max(sample.n_total, 1),
            mean_reference=col.mean,
            mean_current=float(sample.observed.mean()) if sample.observed.size else math.nan,
            n_current=sample.n_total,
            p_min=p_min,
            drifted=drifted,
            level=level,
        )

    # the numeric columns are measured as each comes sorted, while polars sorts the next ones; the categorical
    # ones first, while it sorts the first. The results in column order, numeric then categorical (the ranking
    # below keeps that order among ties).
    numeric_values = cur[:, : len(numeric)]
    ordered = _observed_columns(numeric_values, reuse=workers <= 1)  # one column measured at a time
    raws = [numeric_values[:, j] for j in range(len(numeric))]
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            by_category = list(
                pool.map(one, categorical_columns, [cats[c.name] for c in categorical_columns])
            )
            out = list(pool.map(one, numeric, raws, ordered))
    else:
        by_category = [one(c, cats[c.name]) for c in categorical_columns]
        out = [one(c, raw, obs) for c, raw, obs in zip(numeric, raws, ordered, strict=True)]
    out += by_category
    rank = {lvl: i for i, lvl in enumerate(LEVELS)}
    # ties in level and p-value: the larger first statistic (PSI by default) first
    first = statistics[0].key if statistics else ""
    return sorted(out, key=lambda d: (-rank[d.level], d.p_min, -np.nan_to_num(d.value(first))))


def drift_reason(drift: FeatureDrift, *, statistics: Sequence[DriftStatistic]) -> str:
    """One column's level in words with the statistics that judge it, e.g. for a batch's reasons and alerts:
    ``Lactate, lowest in 24 h (mmol/L) [lactate__min_24h]: ERROR (p = 1e-100; PSI 3.05; KS 0.547)``: its
    clinical name and unit first, the column the engineers know it by in brackets."""
    shown = [
        f"{_sentence_case(s.label)} {s.format(drift.value(s.key))}"
        for s in statistics
        if s.pvalue_key is not None and math.isfinite(drift.value(s.key))
    ]
    name = display_name(drift.feature)
    return f"{name} [{drift.feature}]: {drift.level.upper()} (p = {drift.p_min:.2g}; {'; '.join(shown)})"


def _sentence_case(label: str) -> str:
    """``Change in share not measured`` -> ``change in share not measured`` inside a sentence; ``PSI`` stays."""
    return label if label[:2].isupper() else label[:1].lower() + label[1:]


def worst_level(levels: Sequence[str]) -> str:
    """The most severe of ``ok``, ``warn``, ``error``."""
    return max(levels, key=LEVELS.index, default="ok")


def psi(reference: np.ndarray, current: np.ndarray, *, n_bins: int = 10) -> float:
    """Population stability index with reference-quantile bins and a missing-value bin."""
    profile = reference_profile(
        np.asarray(reference, dtype=np.float64)[:, None], ["x"], thresholds=DriftThresholds(n_bins=n_bins)
    )
    return batch_drift(profile, np.asarray(current, dtype=np.float64)[:, None])[0].value("psi")


def feature_drift(
    reference: np.ndarray,
    current: np.ndarray,
    feature_names: list[str],
    *,
    thresholds: DriftThresholds | None = None,
) -> list[FeatureDrift]:
    """Drift of every numeric column of ``current`` against ``reference`` (see :func:`batch_drift`)."""
    return batch_drift(reference_profile(reference, feature_names, thresholds=thresholds), current)
