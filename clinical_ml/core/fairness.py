"""Subcohort performance: does the model work as well for every group of patients?

For each audited attribute (sex, race/ethnicity, age band) and each pairwise intersection of them, the
table gives patients, events, prevalence, AUROC, sensitivity, specificity, PPV, NPV and calibration
(observed/expected ratio, calibration slope), each with a 95% confidence interval, plus disparity measures
(difference and ratio to the best group and to all patients, equalized odds difference).

Point estimates: fairlearn's MetricFrame
----------------------------------------
The confusion-matrix metrics are disaggregated by ``fairlearn.metrics.MetricFrame``: by group, for all
patients, across the groups of an intersection (MetricFrame crosses the sensitive features) and the range
between groups behind the equalized odds difference. MetricFrame is given each group's four confusion cells
weighted by their patient counts, which is exact and costs the same for a thousand patients or a million.
What fairlearn does not have stays here: DeLong's AUROC variance, the observed/expected ratio and the
calibration slope with their intervals, per-group disparities with intervals, and Holm's correction.

How the intervals are computed, and why it is fast
---------------------------------------------------
All resampling goes through :mod:`clinical_ml.core.bootstrap`.

* Confusion-matrix metrics (sensitivity, specificity, PPV, NPV, prevalence): a stratified bootstrap. A
  resample of a group's rows only changes how many of them fall into each of the four confusion cells, so
  each replicate is drawn directly as a multinomial over the group's (tp, fp, fn, tn) counts: exactly the
  distribution of a row bootstrap within the group, at a cost independent of the number of rows
  (fairlearn's own ``MetricFrame(n_boot=...)`` rebuilds a frame per replicate; see
  ``benchmarks/bench_fairness.py``).
* AUROC: DeLong's variance (``auroc_ci="delong"``, default) or a row bootstrap of the group
  (``"bootstrap"``), which needs the rows and is measured separately in ``benchmarks/bench_fairness.py``.
* Observed/expected ratio: delta method on the log scale; calibration slope: Wald interval of the logistic
  recalibration fit, all groups of an attribute fitted at once.

:func:`reference_metric_frame` builds fairlearn's frame over the patients' rows, unweighted: the test oracle
and the benchmark's baseline.

Small cells
-----------
A group with fewer than ``min_cell_size`` patients, events or non-events is reported as suppressed (its
size shown as "< 11" when the patient count itself is small), never dropped.

Flags and the verdict
---------------------
A group is flagged when (a) the upper bound of its 95% CI is below a use-case subgroup minimum, or (b) it
is worse than all patients beyond chance: its difference to all patients (AUROC, sensitivity) or its
observed/expected ratio relative to all patients is significant after Holm's correction over every group
and metric tested, so that on a fair model the chance of any false flag stays at 5%.
"""

import dataclasses
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import polars as pl
from fairlearn.metrics import MetricFrame
from scipy import stats

from clinical_ml.core import bootstrap
from clinical_ml.core.display_names import attribute_title, who
from clinical_ml.core.evaluation import choose_threshold, confusion
from clinical_ml.core.usecase import OperatingPoint, OutcomeWords, Subgroups

RATE_METRICS = ("sensitivity", "specificity", "ppv", "npv", "prevalence")
METRICS = (
    "auroc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "prevalence",
    "observed_expected_ratio",
    "calibration_slope",
)
DISPARITY_METRICS = ("auroc", "sensitivity", "specificity", "ppv", "npv")
FLAG_METRICS = ("auroc", "sensitivity", "observed_expected_ratio")
INTERSECTION_SEP = " & "
_EPS = 1e-6

Estimate = tuple[float, float, float]  # (value, lower, upper)
_NAN3: Estimate = (float("nan"), float("nan"), float("nan"))


@dataclass(frozen=True)
class SubgroupRow:
    """One group of one attribute (or of an intersection of two attributes).

    ``metrics`` maps a name of ``METRICS`` to (value, lower, upper); ``disparities`` maps a name of
    ``DISPARITY_METRICS`` to ``{"difference_to_best", "ratio_to_best", "difference_to_overall",
    "ratio_to_overall"}`` estimates. Both are empty when the group is suppressed.
    """

    attribute: str
    group: str
    n: int
    events: int
    suppressed: bool
    metrics: dict[str, Estimate]
    flags: tuple[str, ...] = ()
    disparities: dict[str, dict[str, Estimate]] = field(default_factory=dict)
    p_values: dict[str, float] = field(default_factory=dict)
    intersection: bool = False
    # the flags that miss a use-case minimum or range on the whole 95% CI (verdict "fail"), and point
    # estimates beyond a minimum whose CI still reaches it (verdict at least "review"; not flags)
    failures: tuple[str, ...] = ()
    concerns: tuple[str, ...] = ()
    # bootstrap standard errors of the calibration estimates (log scale for O/E), for the intersections' test
    calibration_se: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AttributeSummary:
    """Disparity of one attribute across its reportable groups."""

    attribute: str
    groups: int
    groups_suppressed: int
    equalized_odds_difference: Estimate
    best_group: dict[str, str]
    intersection: bool = False


@dataclass(frozen=True)
class SubgroupAnalysis:
    """The whole subcohort analysis; ``rows[0]`` is all patients."""

    rows: tuple[SubgroupRow, ...]
    attributes: tuple[AttributeSummary, ...]
    threshold: float
    min_cell_size: int
    n_boot: int
    level: float
    auroc_ci: str
    tests: int
    observed_expected_range: tuple[float, float] = (0.8, 1.2)
    calibration_slope_range: tuple[float, float] = (0.7, 1.3)
    calibration_n_boot: int = 0

    @property
    def overall(self) -> SubgroupRow:
        return self.rows[0]

    # a sequence of its rows, as the earlier ``subgroup_table`` returned
    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> SubgroupRow:
        return self.rows[i]

    def rows_of(self, attribute: str) -> list[SubgroupRow]:
        return [r for r in self.rows if r.attribute == attribute]

    def summary_of(self, attribute: str) -> AttributeSummary:
        return next(a for a in self.attributes if a.attribute == attribute)


# --- per-group point estimates and intervals ------------------------------------------------------------


def _rates(c: np.ndarray) -> dict[str, np.ndarray]:
    """Rates from counts ``c[..., (tp, fp, fn, tn)]``; NaN where a denominator is 0."""
    tp, fp, fn, tn = (c[..., i].astype(np.float64) for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "prevalence": (tp + fn) / (tp + fp + fn + tn),
        }


def _counts_by_group(y: np.ndarray, flag: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, 4) counts of (tp, fp, fn, tn)."""
    cell = np.where(y, np.where(flag, 0, 2), np.where(flag, 1, 3))
    return np.bincount(codes * 4 + cell, minlength=n_groups * 4).reshape(n_groups, 4)


def delong_auroc(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """AUROC and its DeLong variance (Sun and Xu's fast algorithm); NaNs with one class only.

    Parameters
    ----------
    y : ndarray
        Outcome labels, 0/1.
    p : ndarray
        Predicted risks.

    Returns
    -------
    tuple of float
        (AUROC, variance).
    """
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    return _delong_sorted(p[order], np.asarray(y, dtype=bool)[order])


def _midranks_sorted(x: np.ndarray) -> np.ndarray:
    """1-based mid-ranks of an ascending array (ties share the mean of their positions), in O(n)."""
    if x.size == 0:
        return np.empty(0)
    change = np.flatnonzero(x[1:] != x[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [x.size]])
    return np.repeat((starts + ends + 1) / 2.0, ends - starts)


def _delong_sorted(ps: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    """DeLong AUROC and variance from scores sorted ascending with their labels."""
    m, n = int(ys.sum()), int(ys.size - ys.sum())
    if m == 0 or n == 0:
        return float("nan"), float("nan")
    tz = _midranks_sorted(ps)
    tx = _midranks_sorted(ps[ys])
    ty = _midranks_sorted(ps[~ys])
    tz_pos, tz_neg = tz[ys], tz[~ys]
    auc = (tz_pos.sum() - m * (m + 1) / 2) / (m * n)
    v01 = (tz_pos - tx) / n
    v10 = 1.0 - (tz_neg - ty) / m
    var = (np.var(v01, ddof=1) / m if m > 1 else 0.0) + (np.var(v10, ddof=1) / n if n > 1 else 0.0)
    return float(auc), float(var)


def bootstrap_auroc(y: np.ndarray, p: np.ndarray, *, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """AUROC of ``n_boot`` row resamples (:func:`clinical_ml.core.bootstrap.weighted_auroc`).

    Parameters
    ----------
    y, p : ndarray
        Labels (0/1) and predicted risks of one group.
    n_boot : int
        Replicates.
    rng : numpy.random.Generator
        Seeded generator, advanced as by ``n_boot`` draws of ``rng.integers(0, n, n)``.

    Returns
    -------
    ndarray
        ``n_boot`` AUROC values (NaN for a replicate with one class only).
    """
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    parts = [
        bootstrap.weighted_auroc(y, p, c) for c in bootstrap.resample_counts(y.size, n_boot=n_boot, rng=rng)
    ]
    return np.concatenate(parts) if parts else np.empty(0)


def _logit(p: np.ndarray) -> np.ndarray:
    pc = np.clip(p, _EPS, 1 - _EPS)
    return np.log(pc / (1 - pc))


def _calibration_fit(
    y: np.ndarray,
    p: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    max_iter: int = 30,
    with_intercept: bool = False,
):
    """Calibration slope and its standard error per group (logistic fit of y on logit(p), all groups at
    once by Newton-Raphson on per-group sums)."""
    lp = _logit(p)
    yf = y.astype(np.float64)
    beta = np.zeros((n_groups, 2))
    beta[:, 1] = 1.0
    s00: np.ndarray = np.zeros(n_groups)
    s01: np.ndarray = np.zeros(n_groups)
    s11: np.ndarray = np.zeros(n_groups)
    step = np.zeros((n_groups, 2))
    for _ in range(max_iter):
        eta = np.clip(beta[codes, 0] + beta[codes, 1] * lp, -30, 30)
        mu = 1 / (1 + np.exp(-eta))
        w = mu * (1 - mu) + 1e-12
        s00 = np.bincount(codes, w, n_groups)
        s01 = np.bincount(codes, w * lp, n_groups)
        s11 = np.bincount(codes, w * lp * lp, n_groups)
        g0 = np.bincount(codes, yf - mu, n_groups)
        g1 = np.bincount(codes, (yf - mu) * lp, n_groups)
        det = s00 * s11 - s01 * s01
        with np.errstate(invalid="ignore", divide="ignore"):
            step0 = (s11 * g0 - s01 * g1) / det
            step1 = (s00 * g1 - s01 * g0) / det
        # Damped Newton: a group with (quasi-)separation has no finite estimate and would step to
        # infinity; cap each step and report such groups as NaN instead of overflowing.
        step = np.clip(np.nan_to_num(np.column_stack([step0, step1]), nan=0.0, posinf=0.0, neginf=0.0), -5, 5)
        beta += step
        if np.abs(step).max() < 1e-7:  # Newton converges quadratically: the error is now ~1e-14
            break
    unconverged = np.abs(step).max(axis=1) >= 1e-4
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.sqrt(s00 / (s00 * s11 - s01 * s01))
    slope = np.where(unconverged, np.nan, beta[:, 1])
    if with_intercept:
        return slope, np.where(unconverged, np.nan, se), np.where(unconverged, np.nan, beta[:, 0])
    return slope, np.where(unconverged, np.nan, se)


def _oe(y: np.ndarray, p: np.ndarray, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Observed/expected ratio and the standard error of its logarithm (delta method), per group."""
    yf = y.astype(np.float64)
    o = np.bincount(codes, yf, n_groups)
    e = np.bincount(codes, p, n_groups)
    syp = np.bincount(codes, yf * p, n_groups)
    spp = np.bincount(codes, p * p, n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = o / e
        resid = o - 2 * r * syp + r * r * spp  # sum of (y - r p)^2
        se_log = np.sqrt(np.maximum(resid, 0)) / e / r
    return r, se_log


def _normal_ci(value: float, se: float, z: float, *, lo: float = -np.inf, hi: float = np.inf) -> Estimate:
    if not np.isfinite(value) or not np.isfinite(se):
        return (float(value), float("nan"), float("nan"))
    return (float(value), float(max(lo, value - z * se)), float(min(hi, value + z * se)))


def _bounded(value: float, lower: float, upper: float) -> Estimate:
    """A point estimate with its bootstrap interval; no interval where the estimate itself is not finite."""
    if not np.isfinite(value):
        return (float(value), float("nan"), float("nan"))
    return (float(value), float(lower), float(upper))


def _log_ci(value: float, se_log: float, z: float) -> Estimate:
    if not np.isfinite(value) or not np.isfinite(se_log) or value <= 0:
        return (float(value), float("nan"), float("nan"))
    return (float(value), float(value * np.exp(-z * se_log)), float(value * np.exp(z * se_log)))


CALIBRATION_BOOT_CELLS = 50_000_000
"""Most (replicate, row) cells of the calibration bootstrap: a validation cohort of up to 50,000 rows gets
every replicate asked for, a cohort of a million rows 50 (never fewer)."""
PERCENTILE_MIN_REPLICATES = 200
"""With fewer calibration replicates the interval is the normal one with the bootstrap's standard error (on
the log scale for O/E): 50 replicates estimate a standard error well, a 2.5% quantile poorly."""


def _replicate_sd(replicates: np.ndarray, *, log: bool) -> np.ndarray:
    """Standard deviation of each column's finite replicates (of their logarithm with ``log``); NaN with
    fewer than two."""
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.asarray(replicates, dtype=np.float64)
        if log:
            reps = np.log(np.where(reps > 0, reps, np.nan))
        ok = np.isfinite(reps)
        k = ok.sum(axis=0)
        x = np.where(ok, reps, 0.0)
        mean = x.sum(axis=0) / np.maximum(k, 1)
        ss = (np.where(ok, reps - mean, 0.0) ** 2).sum(axis=0)
        return np.where(k >= 2, np.sqrt(ss / np.maximum(k - 1, 1)), np.nan)


def calibration_interval(
    replicates: np.ndarray, value: np.ndarray, *, level: float, log: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Interval of each column of ``replicates``: percentile with enough replicates, else normal with the
    bootstrap standard error around ``value`` (log scale when ``log``)."""
    if replicates.shape[0] >= PERCENTILE_MIN_REPLICATES:
        return bootstrap.percentile_interval(replicates, level=level)
    z = float(stats.norm.ppf(0.5 + level / 2))
    sd = _replicate_sd(replicates, log=log)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.log(value) if log else np.asarray(value, dtype=np.float64)
        lo, hi = centre - z * sd, centre + z * sd
    return (np.exp(lo), np.exp(hi)) if log else (lo, hi)


def calibration_replicates(
    y: np.ndarray,
    p: np.ndarray,
    partitions: list[tuple[np.ndarray, int]],
    *,
    clusters: np.ndarray | None,
    n_boot: int,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Observed/expected ratio and calibration slope of every group of every partition on bootstrap
    resamples of the patients.

    One set of resamples serves every partition (sex, race, their intersection...), as a patient is drawn
    with all of their rows (:func:`clinical_ml.core.bootstrap.cluster_replicates`; with one row per patient
    it is the row bootstrap). The O/E of a replicate is exact (a ratio of weighted sums). The slope is the
    one-step estimate: one Newton step of the weighted logistic recalibration fit from the full-cohort fit,
    which needs only weighted sums too, so that all groups and replicates come from sparse products instead
    of a fit per group and replicate (asymptotically the same distribution as refitting).

    Parameters
    ----------
    y, p : ndarray
        Labels (bool) and predicted risks.
    partitions : list of (codes, n_groups)
        The group of each row, per partition.
    clusters : ndarray, optional
        The patient of each row; rows are resampled alone when not given.
    n_boot : int
        Replicates.
    rng : numpy.random.Generator
        Seeded generator of the resamples.

    Returns
    -------
    list of (ndarray, ndarray)
        Per partition, O/E and slope replicates, each of shape (n_boot, n_groups).
    """
    from scipy import sparse

    n = y.size
    lp = _logit(p)
    yf = y.astype(np.float64)
    stacks = []
    for codes, g in partitions:
        # full-cohort recalibration fit of each group, the point the one-step replicates start from
        a, b = _calibration_intercept_slope(y, p, codes, g)
        eta = np.clip(a[codes] + b[codes] * lp, -30, 30)
        mu = 1 / (1 + np.exp(-eta))
        w = mu * (1 - mu)
        values = np.column_stack([yf, p, w, w * lp, w * lp * lp, yf - mu, (yf - mu) * lp])
        k = values.shape[1]
        cols = codes[:, None] * k + np.arange(k)[None, :]
        m = sparse.csr_matrix(
            (values.ravel(), (np.repeat(np.arange(n), k), cols.ravel())), shape=(n, g * k)
        ).T.tocsr()
        stacks.append((m, g, k, b))
    if clusters is None:
        row_of_unit, units = None, n
    else:
        _, row_of_unit = np.unique(np.asarray(clusters), return_inverse=True)
        units = int(row_of_unit.max()) + 1 if n else 0
    sums: list[list[np.ndarray]] = [[] for _ in stacks]
    for counts in bootstrap.resample_counts(units, n_boot=n_boot, rng=rng):
        weights = counts if row_of_unit is None else counts[:, row_of_unit]
        for j, (m, g, k, _b) in enumerate(stacks):
            sums[j].append(np.asarray(m @ weights.T).T.reshape(-1, g, k))
    out = []
    for (_m, g, k, b), parts in zip(stacks, sums, strict=True):
        s = np.concatenate(parts) if parts else np.zeros((0, g, k))
        o, e, s00, s01, s11, g0, g1 = (s[..., i] for i in range(k))
        with np.errstate(invalid="ignore", divide="ignore"):
            oe = o / e
            slope = b[None, :] + (s00 * g1 - s01 * g0) / (s00 * s11 - s01 * s01)
        out.append((oe, slope))
    return out


def _calibration_intercept_slope(
    y: np.ndarray, p: np.ndarray, codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Intercept and slope of each group's logistic recalibration fit (NaN where it has no finite fit)."""
    slope, _se, intercept = _calibration_fit(y, p, codes, n_groups, with_intercept=True)
    return intercept, slope


# --- one partition of the patients (an attribute or an intersection) -----------------------------------


@dataclass(frozen=True)
class _Partition:
    """Groups of the patients: ``codes[i]`` is row i's group; ``keys[g]`` its label per sensitive feature."""

    features: tuple[str, ...]
    keys: list[tuple[str, ...]]
    codes: np.ndarray

    @property
    def attribute(self) -> str:
        return INTERSECTION_SEP.join(self.features)

    @property
    def labels(self) -> list[str]:
        return [INTERSECTION_SEP.join(k) for k in self.keys]

    @property
    def intersection(self) -> bool:
        return len(self.features) > 1


def _partition(attribute: str, values: np.ndarray) -> _Partition:
    # hash-based factorization: sorting a million strings (np.unique) costs seconds
    codes, uniques = pd.factorize(np.asarray(values), sort=True, use_na_sentinel=False)
    return _Partition((attribute,), [(str(v),) for v in uniques], codes.astype(np.int64))


def _cross(a: _Partition, b: _Partition) -> _Partition:
    """The intersection of two partitions, from their codes (groups ordered by a's, then b's label)."""
    kb = len(b.keys)
    present, codes = np.unique(a.codes * kb + b.codes, return_inverse=True)
    keys = [a.keys[c // kb] + b.keys[c % kb] for c in present.tolist()]
    return _Partition(a.features + b.features, keys, codes.astype(np.int64))


# --- disaggregation by fairlearn's MetricFrame ----------------------------------------------------------


def _weighted_rate(name: str) -> Callable[..., float]:
    """The rate ``name`` of :func:`_rates` as a fairlearn metric of rows weighted by ``sample_weight``."""

    def rate(y_true: np.ndarray, y_pred: np.ndarray, sample_weight: np.ndarray) -> float:
        t, f = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
        cell = np.where(t, np.where(f, 0, 2), np.where(f, 1, 3))  # (tp, fp, fn, tn), as _counts_by_group
        counts = np.bincount(cell, weights=np.asarray(sample_weight, dtype=np.float64), minlength=4)
        return float(_rates(counts)[name])

    rate.__name__ = name
    return rate


_FRAME_METRICS = {name: _weighted_rate(name) for name in RATE_METRICS}


def _metric_frame(
    part: _Partition,
    counts: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    metrics: tuple[str, ...] = RATE_METRICS,
) -> MetricFrame:
    """fairlearn ``MetricFrame`` of the confusion-matrix metrics of a partition (or of some of its groups).

    At a fixed threshold every patient of a group falls in one of four cells (tp, fp, fn, tn), and each of
    these metrics is a ratio of cell counts. So MetricFrame is given the non-empty cells of each group with
    their patient counts as sample weights: the same disaggregation as over the patients' rows (exactly:
    the weighted sums are integer counts), at a cost that does not grow with the number of patients.
    An intersection is handed over as its sensitive features, so MetricFrame does the crossing.
    MetricFrame calls each metric once per group, so ``metrics`` (names of :data:`RATE_METRICS`) is what
    costs; ``groups`` restricts the frame to some groups.
    """
    keep = np.arange(len(part.keys)) if groups is None else np.asarray(groups)
    group, cell = np.nonzero(counts[keep])
    weight = counts[keep][group, cell].astype(np.float64)
    return MetricFrame(
        metrics={name: _FRAME_METRICS[name] for name in metrics},
        y_true=(cell == 0) | (cell == 2),
        y_pred=(cell == 0) | (cell == 1),
        sensitive_features=pd.DataFrame([part.keys[g] for g in keep[group]], columns=list(part.features)),
        sample_params={name: {"sample_weight": weight} for name in metrics},
    )


def _by_group(frame: MetricFrame, part: _Partition) -> dict[str, np.ndarray]:
    """``frame.by_group`` as one array per metric, in the partition's group order."""
    index = (
        pd.Index([k[0] for k in part.keys], name=part.features[0])
        if len(part.features) == 1
        else pd.MultiIndex.from_tuples(part.keys, names=list(part.features))
    )
    table = frame.by_group.reindex(index)
    return {name: table[name].to_numpy(dtype=np.float64) for name in table.columns}


def _two_sided_p(z: float) -> float:
    return float(2 * stats.norm.sf(abs(z))) if np.isfinite(z) else float("nan")


def _analyse_partition(
    part: _Partition,
    y: np.ndarray,
    p: np.ndarray,
    flag: np.ndarray,
    p_order: np.ndarray,
    overall: dict,
    *,
    min_cell_size: int,
    n_boot: int,
    level: float,
    auroc_ci: str,
    rng: np.random.Generator,
    calibration: tuple[np.ndarray, np.ndarray],
) -> tuple[list[SubgroupRow], AttributeSummary]:
    g = len(part.labels)
    z = float(stats.norm.ppf(0.5 + level / 2))
    counts = _counts_by_group(y, flag, part.codes, g)
    point = _by_group(_metric_frame(part, counts), part)
    n = counts.sum(axis=1)
    events = counts[:, 0] + counts[:, 2]
    suppressed = (n < min_cell_size) | (events < min_cell_size) | (n - events < min_cell_size)
    reps = bootstrap.multinomial_counts(counts, n_boot=n_boot, rng=rng)
    rep_rates = _rates(reps)  # name -> (n_boot, g)
    # the population as the sum of its groups: replicates of "all patients" consistent with each group's
    rep_all = _rates(reps.sum(axis=1))  # name -> (n_boot,)
    oe, oe_se = _oe(y, p, part.codes, g)
    slope, _slope_se = _calibration_fit(y, p, part.codes, g)
    oe_lo, oe_hi = calibration_interval(calibration[0], oe, level=level, log=True)
    slope_lo, slope_hi = calibration_interval(calibration[1], slope, level=level, log=False)
    oe_se_boot = _replicate_sd(calibration[0], log=True)
    slope_se_boot = _replicate_sd(calibration[1], log=False)
    # rows grouped by group, each group's rows in ascending score order (p_order sorts all scores once)
    sorted_codes = part.codes[p_order]
    if g < 2**15:  # a stable sort of 16-bit integers is a radix sort: linear time
        sorted_codes = sorted_codes.astype(np.int16)
    order = p_order[np.argsort(sorted_codes, kind="stable")]
    bounds = np.concatenate([[0], np.cumsum(n)])
    auc = np.full(g, np.nan)
    auc_var = np.full(g, np.nan)
    auc_ci: list[Estimate] = [_NAN3] * g
    for i in range(g):
        if suppressed[i]:
            continue
        idx = order[bounds[i] : bounds[i + 1]]
        auc[i], auc_var[i] = _delong_sorted(p[idx], y[idx])
        if auroc_ci == "bootstrap":
            lo, hi = bootstrap.percentile_interval(
                bootstrap_auroc(y[idx], p[idx], n_boot=n_boot, rng=rng), level=level
            )
            auc_ci[i] = (float(auc[i]), float(lo), float(hi))
        else:
            auc_ci[i] = _normal_ci(auc[i], float(np.sqrt(auc_var[i])), z, lo=0.0, hi=1.0)

    ok = np.flatnonzero(~suppressed)
    best = {}
    for name in DISPARITY_METRICS:
        vals = auc if name == "auroc" else point[name]
        finite = [i for i in ok if np.isfinite(vals[i])]
        if finite:
            best[name] = int(max(finite, key=lambda i: vals[i]))
    # every percentile interval of the partition in one call per quantity (bounds arrays of shape (2, g))
    bounds_rate = {name: bootstrap.percentile_interval(rep_rates[name], level=level) for name in RATE_METRICS}
    bounds_disp: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in DISPARITY_METRICS:
            if name == "auroc" or name not in best:
                continue
            reps_g, reps_b = rep_rates[name], rep_rates[name][:, [best[name]]]
            reps_a = rep_all[name][:, None]
            bounds_disp[name] = {
                "difference_to_best": bootstrap.percentile_interval(reps_g - reps_b, level=level),
                "ratio_to_best": bootstrap.percentile_interval(reps_g / reps_b, level=level),
                "difference_to_overall": bootstrap.percentile_interval(reps_g - reps_a, level=level),
                "ratio_to_overall": bootstrap.percentile_interval(reps_g / reps_a, level=level),
            }
        sd_sens = np.full(g, np.nan)
        if ok.size:
            diff = rep_rates["sensitivity"][:, ok] - rep_all["sensitivity"][:, None]
            sd_sens[ok] = np.nanstd(diff, axis=0, ddof=1)
    rows: list[SubgroupRow] = []
    for i in range(g):
        if suppressed[i]:
            rows.append(
                SubgroupRow(
                    part.attribute,
                    part.labels[i],
                    int(n[i]),
                    int(events[i]),
                    True,
                    {},
                    (),
                    {},
                    {},
                    part.intersection,
                )
            )
            continue
        metrics: dict[str, Estimate] = {"auroc": auc_ci[i]}
        for name in RATE_METRICS:
            lo, hi = bounds_rate[name]
            metrics[name] = (float(point[name][i]), float(lo[i]), float(hi[i]))
        metrics["observed_expected_ratio"] = _bounded(oe[i], oe_lo[i], oe_hi[i])
        metrics["calibration_slope"] = _bounded(slope[i], slope_lo[i], slope_hi[i])
        disp: dict[str, dict[str, Estimate]] = {}
        for name in DISPARITY_METRICS:
            if name not in best:
                continue
            b = best[name]
            if name == "auroc":
                se_best = np.sqrt(auc_var[i] + (auc_var[b] if b != i else 0.0))
                # the group is part of all patients: adding the variances (ignoring their positive
                # covariance) makes the interval conservative
                se_all = np.sqrt(auc_var[i] + overall["auroc_var"])
                d_best = _normal_ci(auc[i] - auc[b], float(se_best), z)
                d_all = _normal_ci(auc[i] - overall["auroc"], float(se_all), z)
                r_best = _log_ci(auc[i] / auc[b], float(se_best / auc[i]), z)
                r_all = _log_ci(auc[i] / overall["auroc"], float(se_all / auc[i]), z)
            else:
                v, vb, va = point[name][i], point[name][b], overall[name]
                bd = bounds_disp[name]
                with np.errstate(invalid="ignore", divide="ignore"):
                    d_best, r_best, d_all, r_all = (
                        (float(est), float(bd[key][0][i]), float(bd[key][1][i]))
                        for key, est in (
                            ("difference_to_best", v - vb),
                            ("ratio_to_best", v / vb),
                            ("difference_to_overall", v - va),
                            ("ratio_to_overall", v / va),
                        )
                    )
            disp[name] = {
                "difference_to_best": d_best,
                "ratio_to_best": r_best,
                "difference_to_overall": d_all,
                "ratio_to_overall": r_all,
            }
        # one-sided evidence of harm, turned into two-sided p-values for Holm's correction
        p_values = {}
        if "auroc" in disp:
            se = np.sqrt(auc_var[i] + overall["auroc_var"])
            p_values["auroc"] = _two_sided_p((auc[i] - overall["auroc"]) / se) if se > 0 else float("nan")
        sd = float(sd_sens[i])
        est = float(point["sensitivity"][i] - overall["sensitivity"])
        p_values["sensitivity"] = _two_sided_p(est / sd) if sd > 0 else float("nan")
        se_log_ratio = np.sqrt(oe_se[i] ** 2 + overall["oe_se_log"] ** 2)
        p_values["observed_expected_ratio"] = _two_sided_p(
            float(np.log(oe[i] / overall["observed_expected_ratio"]) / se_log_ratio)
        )
        rows.append(
            SubgroupRow(
                part.attribute,
                part.labels[i],
                int(n[i]),
                int(events[i]),
                False,
                metrics,
                (),
                disp,
                p_values,
                part.intersection,
                calibration_se={
                    "observed_expected_ratio": float(oe_se_boot[i]),
                    "calibration_slope": float(slope_se_boot[i]),
                },
            )
        )

    # equalized odds difference: the larger of the ranges of TPR and FPR over the reportable groups
    if ok.size >= 2:
        # the range of FPR over groups is that of specificity
        between = _metric_frame(part, counts, groups=ok, metrics=("sensitivity", "specificity")).difference(
            method="between_groups"
        )
        eod = float(max(between["sensitivity"], between["specificity"]))
        rt = rep_rates["sensitivity"][:, ok]
        rf = 1 - rep_rates["specificity"][:, ok]
        eod_reps = np.maximum(np.nanmax(rt, 1) - np.nanmin(rt, 1), np.nanmax(rf, 1) - np.nanmin(rf, 1))
        lo, hi = bootstrap.percentile_interval(eod_reps, level=level)
        eod_ci: Estimate = (eod, float(lo), float(hi))
    else:
        eod_ci = _NAN3
    summary = AttributeSummary(
        part.attribute,
        g,
        int(suppressed.sum()),
        eod_ci,
        {k: part.labels[v] for k, v in best.items()},
        part.intersection,
    )
    return rows, summary


def _holm(p_values: list[float]) -> np.ndarray:
    """Holm-adjusted p-values (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.size, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    running = 0.0
    for k, j in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[j]))
        out[j] = running
    return out


def subgroup_table(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    attributes: dict[str, np.ndarray],
    *,
    intersections: bool = True,
    min_cell_size: int = 11,
    auroc_min: float = 0.5,
    sensitivity_min: float = 0.0,
    n_boot: int = 1000,
    level: float = 0.95,
    alpha: float = 0.05,
    auroc_ci: str = "delong",
    seed: int = 0,
    words: OutcomeWords | None = None,
    clusters: np.ndarray | None = None,
    observed_expected_range: tuple[float, float] = (0.8, 1.2),
    calibration_slope_range: tuple[float, float] = (0.7, 1.3),
) -> SubgroupAnalysis:
    """Per-group metrics with CIs for each attribute and pairwise intersection, plus all patients.

    Parameters
    ----------
    y : ndarray
        Outcome labels (0/1) of the validation cohort.
    p : ndarray
        Predicted risks.
    threshold : float
        Operating threshold (risk >= threshold is flagged), the same for every group.
    attributes : dict of str to ndarray
        Attribute name -> group label of each row (e.g. ``{"sex": ..., "age_band": ...}``).
    intersections : bool
        Also analyse every pair of attributes (``"sex & race_ethnicity"``).
    min_cell_size : int
        Groups with fewer patients, events or non-events are suppressed.
    auroc_min, sensitivity_min : float
        Subgroup minimums of the use case; a group whose CI upper bound is below one is flagged.
    n_boot : int
        Bootstrap replicates for the confusion-matrix metrics and their disparities.
    level : float
        Confidence level of the reported intervals.
    alpha : float
        Family-wise error rate of the "worse than all patients" flags (Holm).
    auroc_ci : {"delong", "bootstrap"}
        How AUROC intervals are computed.
    seed : int
        Seed of the bootstrap.
    words : OutcomeWords, optional
        How the flags name the outcome ("more readmissions than predicted"); deaths when not given.
    clusters : ndarray, optional
        The patient of each row: the calibration intervals resample patients with all their rows.
    observed_expected_range, calibration_slope_range : tuple of float
        Acceptable calibration of a group: it fails when its whole 95% CI lies outside a range.

    Returns
    -------
    SubgroupAnalysis
    """
    if auroc_ci not in ("delong", "bootstrap"):
        raise ValueError(f"auroc_ci must be 'delong' or 'bootstrap', got {auroc_ci!r}")
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    flag = p >= threshold
    rng = np.random.default_rng(seed)
    z = float(stats.norm.ppf(0.5 + level / 2))

    # all patients
    all_codes = np.zeros(y.size, dtype=np.int64)
    c_all = _counts_by_group(y, flag, all_codes, 1)
    everyone = _Partition(("overall",), [("All patients",)], all_codes)
    r_all = {name: np.array([v]) for name, v in _metric_frame(everyone, c_all).overall.items()}
    rep_all = _rates(bootstrap.multinomial_counts(c_all, n_boot=n_boot, rng=rng))
    p_order = np.argsort(p, kind="stable")
    auc_all, var_all = _delong_sorted(p[p_order], y[p_order])
    oe_all, oe_se_all = _oe(y, p, all_codes, 1)
    slope_all, _ = _calibration_fit(y, p, all_codes, 1)

    parts = [_partition(a, v) for a, v in attributes.items()]
    if intersections:
        parts += [_cross(a, b) for a, b in itertools.combinations(list(parts), 2)]
    # calibration intervals: one patient bootstrap for every partition, on its own stream so that the
    # other intervals do not depend on it; capped in cells so that a million rows stay cheap
    n_cal = min(n_boot, max(50, CALIBRATION_BOOT_CELLS // max(y.size, 1)))
    cal = calibration_replicates(
        y,
        p,
        [(all_codes, 1)] + [(part.codes, len(part.keys)) for part in parts],
        clusters=clusters,
        n_boot=n_cal,
        rng=np.random.default_rng([seed, 1]),
    )
    m_all: dict[str, Estimate] = {}
    if auroc_ci == "bootstrap":
        lo, hi = bootstrap.percentile_interval(bootstrap_auroc(y, p, n_boot=n_boot, rng=rng), level=level)
        m_all["auroc"] = (auc_all, float(lo), float(hi))
    else:
        m_all["auroc"] = _normal_ci(auc_all, float(np.sqrt(var_all)), z, lo=0.0, hi=1.0)
    for name in RATE_METRICS:
        lo, hi = bootstrap.percentile_interval(rep_all[name][:, 0], level=level)
        m_all[name] = (float(r_all[name][0]), float(lo), float(hi))
    for name, value, reps in (
        ("observed_expected_ratio", oe_all[0], cal[0][0]),
        ("calibration_slope", slope_all[0], cal[0][1]),
    ):
        lo, hi = calibration_interval(
            reps, np.array([value]), level=level, log=name == "observed_expected_ratio"
        )
        lo, hi = lo[0], hi[0]
        m_all[name] = _bounded(value, float(lo), float(hi))
    overall_row = SubgroupRow("overall", "All patients", int(y.size), int(y.sum()), False, m_all)
    overall = {name: float(r_all[name][0]) for name in RATE_METRICS}
    overall.update(
        auroc=auc_all,
        auroc_var=var_all,
        observed_expected_ratio=float(oe_all[0]),
        oe_se_log=float(oe_se_all[0]),
    )

    rows: list[SubgroupRow] = []
    summaries: list[AttributeSummary] = []
    for part, part_cal in zip(parts, cal[1:], strict=True):
        part_rows, part_summary = _analyse_partition(
            part,
            y,
            p,
            flag,
            p_order,
            overall,
            min_cell_size=min_cell_size,
            n_boot=n_boot,
            level=level,
            auroc_ci=auroc_ci,
            rng=rng,
            calibration=part_cal,
        )
        rows.extend(part_rows)
        summaries.append(part_summary)

    # flags: absolute minimums at the reported level; "worse than all patients" with Holm over all tests
    tests = [(i, k) for i, r in enumerate(rows) for k in FLAG_METRICS if k in r.p_values]
    adjusted = _holm([rows[i].p_values[k] for i, k in tests])
    worse: dict[int, list[str]] = {}
    events = words.events if words is not None else "deaths"
    for (i, k), padj in zip(tests, adjusted, strict=True):
        if not (np.isfinite(padj) and padj < alpha):
            continue
        r = rows[i]
        if k == "observed_expected_ratio":
            direction = "more" if r.metrics[k][0] > overall[k] else "fewer"
            worse.setdefault(i, []).append(
                f"{direction} {events} than predicted, relative to all patients (O/E "
                f"{r.metrics[k][0]:.2f} vs {overall[k]:.2f}, adjusted p = {padj:.3g})"
            )
        elif r.metrics[k][0] < overall[k]:
            d = r.disparities[k]["difference_to_overall"]
            worse.setdefault(i, []).append(
                f"{_WORDS[k]} lower than in all patients beyond chance (difference {d[0]:+.2f}, "
                f"95% CI {d[1]:+.2f} to {d[2]:+.2f}; adjusted p = {padj:.3g})"
            )
    ranges = {
        "observed_expected_ratio": observed_expected_range,
        "calibration_slope": calibration_slope_range,
    }
    # intersections: many small groups at once, so a calibration beyond its range is flagged only beyond
    # chance (one-sided tests of lying outside the range, Holm over every intersection and measure)
    range_tests = [
        (i, name, _outside_range_p(r, name, ranges[name]))
        for i, r in enumerate(rows)
        if r.intersection and not r.suppressed
        for name in ranges
    ]
    range_tests = [t for t in range_tests if np.isfinite(t[2])]
    range_adjusted = _holm([t[2] for t in range_tests])
    crossed: dict[int, list[str]] = {}
    for (i, name, _p), padj in zip(range_tests, range_adjusted, strict=True):
        if np.isfinite(padj) and padj < alpha:
            crossed.setdefault(i, []).append(
                _range_words(rows[i].metrics[name], name, ranges[name], events=events)
                + f", beyond chance among {len(range_tests)} intersection tests (adjusted p = {padj:.3g})"
            )
    final: list[SubgroupRow] = [overall_row]
    for i, r in enumerate(rows):
        failures: tuple[str, ...] = ()
        concerns: tuple[str, ...] = ()
        if not r.suppressed:
            failures, concerns = _judge_group(
                r.metrics,
                minimums={"auroc": auroc_min, "sensitivity": sensitivity_min},
                ranges={} if r.intersection else ranges,
                events=events,
            )
        final.append(
            dataclasses.replace(
                r,
                flags=failures + tuple(crossed.get(i, [])) + tuple(worse.get(i, [])),
                failures=failures,
                concerns=concerns,
            )
        )
    return SubgroupAnalysis(
        rows=tuple(final),
        attributes=tuple(summaries),
        threshold=float(threshold),
        min_cell_size=min_cell_size,
        n_boot=n_boot,
        level=level,
        auroc_ci=auroc_ci,
        tests=len(tests),
        observed_expected_range=(float(observed_expected_range[0]), float(observed_expected_range[1])),
        calibration_slope_range=(float(calibration_slope_range[0]), float(calibration_slope_range[1])),
        calibration_n_boot=n_cal,
    )


def _outside_range_p(row: SubgroupRow, name: str, acceptable: tuple[float, float]) -> float:
    """One-sided p-value that the group's calibration measure lies outside ``acceptable`` on the side of its
    point estimate (normal, with the bootstrap standard error; log scale for O/E); NaN inside the range."""
    value = row.metrics[name][0]
    se = row.calibration_se.get(name, float("nan"))
    log = name == "observed_expected_ratio"
    if not (np.isfinite(value) and np.isfinite(se) and se > 0) or (log and value <= 0):
        return float("nan")
    v, low, high = (
        (np.log(value), np.log(acceptable[0]), np.log(acceptable[1])) if log else (value, *acceptable)
    )
    if v > high:
        return float(stats.norm.sf((v - high) / se))
    if v < low:
        return float(stats.norm.sf((low - v) / se))
    return float("nan")


def _range_words(estimate: Estimate, name: str, acceptable: tuple[float, float], *, events: str) -> str:
    """A calibration measure beyond its acceptable range, in words."""
    v, lo, hi = estimate
    low, high = acceptable
    if name == "observed_expected_ratio":
        head = f"observed/expected {events} {v:.2f} (95% CI {lo:.2f} to {hi:.2f})"
        side = f"more {events} than predicted" if v > high else f"fewer {events} than predicted"
    else:
        head = f"calibration slope {v:.2f} (95% CI {lo:.2f} to {hi:.2f})"
        side = (
            "predicted risks too close to the average in this group"
            if v > high
            else "predicted risks too extreme in this group"
        )
    return f"{head}: {side}, {'above' if v > high else 'below'} the acceptable range {low:.2f} to {high:.2f}"


def _beyond(x: float, limit: float) -> str:
    """``x`` with enough digits that it reads on the same side of ``limit`` as it is (1.2004 > 1.20)."""
    for digits in range(2, 9):
        text = f"{x:.{digits}f}"
        if (float(text) > limit) == (x > limit) and (float(text) < limit) == (x < limit):
            return text
    return repr(x)


def _judge_group(
    metrics: dict[str, Estimate],
    *,
    minimums: dict[str, float],
    ranges: dict[str, tuple[float, float]],
    events: str,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A group's failures (its whole 95% CI misses a minimum or lies outside an acceptable range) and
    concerns (a point estimate below a minimum whose CI still reaches it)."""
    failures: list[str] = []
    concerns: list[str] = []
    for name, minimum in minimums.items():
        v, lo, hi = metrics[name]
        words = _WORDS[name]
        if hi < minimum:
            failures.append(
                f"{words} below the subgroup minimum of {minimum:.2f} (upper 95% bound {_beyond(hi, minimum)})"
            )
        elif v < minimum:
            concerns.append(
                f"{words} {_beyond(v, minimum)} is below the subgroup minimum of {minimum:.2f}, but its 95% CI "
                f"({lo:.2f} to {hi:.2f}) reaches the minimum: too uncertain to tell, so it needs review"
            )
    for name, (low, high) in ranges.items():
        v, lo, hi = metrics[name]
        if not (np.isfinite(lo) and np.isfinite(hi)):
            continue
        if name == "observed_expected_ratio":
            head = f"observed/expected {events} {v:.2f} (95% CI {{lo}} to {{hi}})"
            above, below = f"more {events} than predicted", f"fewer {events} than predicted"
        else:
            head = f"calibration slope {v:.2f} (95% CI {{lo}} to {{hi}})"
            above = "predicted risks too close to the average in this group"
            below = "predicted risks too extreme in this group"
        if lo > high:
            failures.append(
                head.format(lo=_beyond(lo, high), hi=f"{hi:.2f}")
                + f": {above}, the whole interval above the acceptable range {low:.2f} to {high:.2f}"
            )
        elif hi < low:
            failures.append(
                head.format(lo=f"{lo:.2f}", hi=_beyond(hi, low))
                + f": {below}, the whole interval below the acceptable range {low:.2f} to {high:.2f}"
            )
    return tuple(failures), tuple(concerns)


_WORDS = {"auroc": "AUROC", "sensitivity": "sensitivity", "observed_expected_ratio": "O/E ratio"}


# --- the reference ------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def _sens(y, f) -> float:
    tp, _, _, fn = confusion(np.asarray(y), np.asarray(f, dtype=float), 0.5)
    return _ratio(tp, tp + fn)


def _spec(y, f) -> float:
    _, fp, tn, _ = confusion(np.asarray(y), np.asarray(f, dtype=float), 0.5)
    return _ratio(tn, tn + fp)


def _ppv(y, f) -> float:
    tp, fp, _, _ = confusion(np.asarray(y), np.asarray(f, dtype=float), 0.5)
    return _ratio(tp, tp + fp)


def _npv(y, f) -> float:
    _, _, tn, fn = confusion(np.asarray(y), np.asarray(f, dtype=float), 0.5)
    return _ratio(tn, tn + fn)


def reference_metric_frame(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    groups: pd.Series | pd.DataFrame,
    *,
    n_boot: int | None = None,
    seed: int = 0,
):
    """fairlearn ``MetricFrame`` of the confusion-matrix metrics at the operating threshold.

    The reference that :func:`subgroup_table` is tested against (and benchmarked against, with ``n_boot``).
    """
    flag = (np.asarray(p) >= threshold).astype(int)
    kwargs = {"n_boot": n_boot, "ci_quantiles": [0.025, 0.975], "random_state": seed} if n_boot else {}
    return MetricFrame(
        metrics={"sensitivity": _sens, "specificity": _spec, "ppv": _ppv, "npv": _npv},
        y_true=np.asarray(y).astype(int),
        y_pred=flag,
        sensitive_features=groups,
        **kwargs,
    )


# --- per-group operating points -----------------------------------------------------------------------


@dataclass(frozen=True)
class GroupThreshold:
    """A recommended threshold for one group, chosen on the out-of-fold risk of the group's derivation rows
    (``n_tuning``, ``events_tuning``: the rows it was chosen on), judged on the validation rows."""

    attribute: str
    group: str
    n_tuning: int
    events_tuning: int
    suppressed: bool
    threshold: float
    threshold_range: tuple[float, float]
    sensitivity_single: Estimate
    specificity_single: Estimate
    sensitivity_group: Estimate
    specificity_group: Estimate
    meets_target_single: bool
    meets_target_group: bool


def _rate_ci(k: int, n: int, z: float) -> Estimate:
    """Wilson interval of k/n."""
    if n == 0:
        return _NAN3
    ph = k / n
    denom = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / denom
    half = z * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / denom
    return (float(ph), float(centre - half), float(centre + half))


def _sens_spec_at(y: np.ndarray, p: np.ndarray, threshold: float, z: float) -> tuple[Estimate, Estimate]:
    tp, fp, tn, fn = confusion(y, p, threshold)
    return _rate_ci(tp, tp + fn, z), _rate_ci(tn, tn + fp, z)


def _resample_threshold(
    idx: np.ndarray, *, y: np.ndarray, p: np.ndarray, policy: str, target: float
) -> float:
    return choose_threshold(y[idx], p[idx], policy=policy, target=target)


def group_thresholds(
    y_tuning: np.ndarray,
    p_tuning: np.ndarray,
    groups_tuning: dict[str, np.ndarray],
    y_valid: np.ndarray,
    p_valid: np.ndarray,
    groups_valid: dict[str, np.ndarray],
    *,
    threshold: float,
    policy: str,
    target: float,
    min_cell_size: int = 11,
    n_boot: int = 200,
    seed: int = 0,
) -> list[GroupThreshold]:
    """Per-group operating points that meet the use case's constraint in every group.

    For each group the threshold is chosen by the use case's policy on the group's derivation rows, scored
    out of fold (``*_tuning`` arguments: :func:`clinical_ml.core.validation.out_of_fold_risk`; e.g.
    ``min_sensitivity``: the highest threshold whose sensitivity is at least ``target``, which maximizes
    specificity), deterministically. Its stability is the 95% range of the thresholds chosen on
    ``n_boot`` resamples of those rows. Sensitivity and specificity on the validation rows are given
    at the single threshold and at the group's own, side by side. Nothing is applied: these are
    recommendations for the clinical team.

    Returns
    -------
    list of GroupThreshold
        One per group of each attribute; groups with fewer than ``min_cell_size`` tuning or validation
        events or non-events are suppressed.
    """
    rng = np.random.default_rng(seed)
    z = float(stats.norm.ppf(0.975))
    yt, pt = np.asarray(y_tuning).astype(bool), np.asarray(p_tuning, dtype=np.float64)
    yv, pv = np.asarray(y_valid).astype(bool), np.asarray(p_valid, dtype=np.float64)
    out = []
    for attr, values in groups_tuning.items():
        vt = np.asarray(values).astype(str)
        vv = np.asarray(groups_valid[attr]).astype(str)
        for group in sorted(set(vt.tolist()) | set(vv.tolist())):
            mt, mv = vt == group, vv == group
            ygt, pgt, ygv, pgv = yt[mt], pt[mt], yv[mv], pv[mv]
            small = min(int(ygt.sum()), int((~ygt).sum()), int(ygv.sum()), int((~ygv).sum())) < min_cell_size
            if small:
                out.append(
                    GroupThreshold(
                        attr,
                        group,
                        int(mt.sum()),
                        int(ygt.sum()),
                        True,
                        float("nan"),
                        (float("nan"), float("nan")),
                        _NAN3,
                        _NAN3,
                        _NAN3,
                        _NAN3,
                        False,
                        False,
                    )
                )
                continue
            t = choose_threshold(ygt, pgt, policy=policy, target=target)
            reps = bootstrap.replicates(
                functools.partial(_resample_threshold, y=ygt, p=pgt, policy=policy, target=target),
                ygt.size,
                n_boot=n_boot,
                rng=rng,
            )
            lo, hi = bootstrap.percentile_interval(reps, level=0.95)

            s1, sp1 = _sens_spec_at(ygv, pgv, threshold, z)
            s2, sp2 = _sens_spec_at(ygv, pgv, t, z)
            key = s1 if policy == "min_sensitivity" else sp1
            key2 = s2 if policy == "min_sensitivity" else sp2
            out.append(
                GroupThreshold(
                    attr,
                    group,
                    int(mt.sum()),
                    int(ygt.sum()),
                    False,
                    float(t),
                    (float(lo), float(hi)),
                    s1,
                    sp1,
                    s2,
                    sp2,
                    bool(key[0] >= target),
                    bool(key2[0] >= target),
                )
            )
    return out


THRESHOLD_GROUPS_NAMED = 3  # groups below the target within their CI named in the sentence, lowest first


def threshold_recommendation(rows: list[GroupThreshold], *, policy: str, target: float) -> list[str]:
    """Plain-words recommendations from :func:`group_thresholds` (never applied automatically)."""
    measure = "sensitivity" if policy == "min_sensitivity" else "specificity"

    def estimate(r: GroupThreshold) -> Estimate:
        """The measure at the single threshold."""
        return r.sensitivity_single if measure == "sensitivity" else r.specificity_single

    out = []
    for r in rows:
        if r.suppressed:
            continue
        single = estimate(r)
        own = r.sensitivity_group if measure == "sensitivity" else r.specificity_group
        if single[2] < target:
            out.append(
                f"{who(r.attribute, r.group)}: at the single threshold the {measure} is {single[0]:.2f} "
                f"(95% CI {single[1]:.2f} to {single[2]:.2f}), below the target of {target:.2f} beyond "
                f"chance; a group threshold of {r.threshold:.3f} (stable between {r.threshold_range[0]:.3f} "
                f"and {r.threshold_range[1]:.3f}) gives {own[0]:.2f}. Consider it, or a population-specific "
                "model, after clinical review."
            )
    if out:
        return out
    below = sorted(
        (r for r in rows if not r.suppressed and estimate(r)[0] < target), key=lambda r: estimate(r)[0]
    )
    if not below:
        return [
            f"At the single threshold the {measure} of every group large enough to judge is at or above the "
            f"target of {target:.2f}: no group-specific threshold is recommended."
        ]
    shown = below[:THRESHOLD_GROUPS_NAMED]
    named = ("the lowest: " if len(below) > len(shown) else "") + "; ".join(
        f"{who(r.attribute, r.group)} {_beyond(estimate(r)[0], target)} (95% CI {estimate(r)[1]:.2f} to "
        f"{estimate(r)[2]:.2f})"
        for r in shown
    )
    one = len(below) == 1
    return [
        f"At the single threshold no group's {measure} is below the target of {target:.2f} beyond chance, so "
        f"no group-specific threshold is recommended; {len(below)} {'group is' if one else 'groups are'} below "
        f"it within {'its' if one else 'their'} 95% CI ({named}): too uncertain to act on, more data would tell."
    ]


# --- the verdict --------------------------------------------------------------------------------------


VERDICTS = ("pass", "insufficient data", "review", "fail")


def verdict(
    analysis: SubgroupAnalysis | list[SubgroupRow],
    *,
    min_events: int = 0,
    min_non_events: int = 0,
    words: OutcomeWords | None = None,
) -> tuple[str, list[str]]:
    """The subcohort verdict and its reasons in words.

    * ``fail``: a group of an audited attribute has its whole 95% CI below a subgroup minimum or outside an
      acceptable calibration range (in an intersection of two attributes, this asks for review).
    * ``review``: a group is worse than all patients beyond chance (Holm), or a point estimate of a group of
      an audited attribute is below a subgroup minimum while its CI still reaches it (in an intersection this
      is noted, not a review: among dozens of small intersections some are below by chance).
    * ``insufficient data``: the validation cohort has fewer than ``min_events`` outcome events or
      ``min_non_events`` patients without it (unless a group fails), or, instead of pass, an audited
      attribute has fewer than two groups large enough to judge, so that its groups cannot be compared.
    * ``pass``: none of these.

    Returns
    -------
    tuple
        The verdict and its reasons in words.
    """
    rows = analysis.rows if isinstance(analysis, SubgroupAnalysis) else analysis
    ev, nev = (words.events, words.non_events) if words is not None else ("deaths", "survivors")
    failures = [f"{who(r.attribute, r.group)}: {f}" for r in rows for f in r.failures]
    flags = [f"{who(r.attribute, r.group)}: {f}" for r in rows for f in r.flags if f not in r.failures]
    concerns = [f"{who(r.attribute, r.group)}: {c}" for r in rows if not r.intersection for c in r.concerns]
    # An intersection's point estimate below a minimum, with a CI that reaches it, is expected by chance among
    # dozens of small intersections: it is shown (in the table and here) but asks for review only beyond chance.
    uncertain = [r for r in rows if r.intersection and r.concerns]
    judged_intersections = sum(1 for r in rows if r.intersection and not r.suppressed)
    note = (
        [
            f"{len(uncertain)} of {judged_intersections} intersections judged have a point estimate below a "
            "subgroup minimum with a 95% CI that still reaches it ("
            + "; ".join(who(r.attribute, r.group) for r in uncertain[:5])
            + ("; ..." if len(uncertain) > 5 else "")
            + "): with this many small intersections some fall below by chance, so they are shown but do not ask "
            "for review on their own"
        ]
        if uncertain
        else []
    )
    insufficient = []
    overall = next((r for r in rows if r.attribute == "overall"), None)
    too_few = overall is not None and (
        overall.events < min_events or overall.n - overall.events < min_non_events
    )
    if overall is not None and too_few:
        insufficient.append(
            f"too few outcomes to judge: {overall.events} {ev} and {overall.n - overall.events} {nev} in the "
            f"validation cohort, and at least {min_events} {ev} and {min_non_events} {nev} are needed"
        )
    for attribute in dict.fromkeys(
        r.attribute for r in rows if r.attribute != "overall" and not r.intersection
    ):
        groups = [r for r in rows if r.attribute == attribute]
        judged = [r for r in groups if not r.suppressed]
        if len(judged) < 2:
            insufficient.append(
                f"{attribute_title(attribute)}: {len(judged)} of {len(groups)} groups large enough to judge, so its groups "
                "cannot be compared"
            )
    suppressed = sum(r.suppressed for r in rows)
    tail = note + (
        [f"{suppressed} groups too small to judge (suppressed); they need more data before a verdict."]
        if suppressed
        else []
    )
    if failures:
        return "fail", failures + flags + concerns + insufficient + tail
    if too_few:  # a review on a cohort too small to judge would read as a finding
        return "insufficient data", insufficient + flags + concerns + tail
    if flags or concerns:
        return "review", flags + concerns + insufficient + tail
    if insufficient:
        return "insufficient data", insufficient + tail
    return "pass", [
        "no group of an audited attribute large enough to judge has a point estimate below a subgroup minimum, "
        "no group's 95% CI lies wholly below a minimum or outside a calibration range, and none is worse than "
        "all patients beyond chance",
        *tail,
    ]


def analysis_summary(
    analysis: SubgroupAnalysis,
    verdict: str,
    reasons: list[str],
    thresholds: list[GroupThreshold],
    recommendations: list[str],
) -> dict:
    """JSON-ready aggregates of the analysis (what the report card reads back).

    Counts below the minimum cell size are replaced by ``None``, so a small cell's size never leaves the
    analysis even in a file.
    """
    k = analysis.min_cell_size

    def row(r: SubgroupRow) -> dict:
        d = dataclasses.asdict(r)
        if r.n < k:
            d["n"] = None
        if r.events < k or r.n - r.events < k:
            d["events"] = None
        return d

    return {
        "threshold": analysis.threshold,
        "min_cell_size": k,
        "n_boot": analysis.n_boot,
        "tests": analysis.tests,
        "verdict": verdict,
        "reasons": reasons,
        "rows": [row(r) for r in analysis.rows],
        "attributes": [dataclasses.asdict(a) for a in analysis.attributes],
        "group_thresholds": [dataclasses.asdict(t) for t in thresholds],
        "recommendations": recommendations,
    }


@dataclass(frozen=True)
class FairnessAudit:
    """The subcohort analysis of a model on its validation cohort, with its verdict and per-group
    operating points chosen on the out-of-fold risk of the derivation cohort (what the fairness report and the
    report card show)."""

    analysis: SubgroupAnalysis
    verdict: str
    reasons: list[str]
    thresholds: list[GroupThreshold]
    recommendations: list[str]

    def summary(self) -> dict:
        return analysis_summary(
            self.analysis, self.verdict, self.reasons, self.thresholds, self.recommendations
        )

    def counts(self) -> dict[str, int]:
        """Aggregates for the asset's page: groups audited, flagged, suppressed, comparisons tested."""
        rows = self.analysis.rows
        return {
            "groups_flagged": sum(bool(r.flags) for r in rows),
            "groups_suppressed": sum(r.suppressed for r in rows),
            "groups_audited": len(rows) - 1,
            "comparisons_tested": self.analysis.tests,
        }


def audit_subcohorts(
    predictions: pl.DataFrame,
    *,
    threshold: float,
    subgroups: Subgroups,
    operating_point: OperatingPoint,
    n_boot: int,
    seed: int,
    words: OutcomeWords | None = None,
    min_events: int = 0,
    min_non_events: int = 0,
) -> FairnessAudit:
    """Audit the validation cohort (``held_out`` rows of ``predictions``) by the use case's subgroups, and
    choose per-group operating points on the derivation rows' out-of-fold risk, as the single threshold is
    (checked on the validation rows); ``words``
    name the outcome in the flags (deaths when not given). Below ``min_events`` or ``min_non_events`` in
    the validation cohort the verdict is "insufficient data" at best."""
    held = predictions.filter(pl.col("split") == "held_out")
    # the derivation cohort scored out of fold (a fold too small to fit has no risk: left out)
    tune = predictions.filter((pl.col("split") != "held_out") & pl.col("risk").is_not_nan())

    def groups(frame: pl.DataFrame) -> dict:
        return {a: frame[a].cast(pl.String).fill_null("Unknown").to_numpy() for a in subgroups.attributes}

    def yp(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return frame["label"].cast(pl.Int8).to_numpy(), frame["risk"].to_numpy()

    analysis = subgroup_table(
        *yp(held),
        threshold,
        groups(held),
        min_cell_size=subgroups.min_cell_size,
        auroc_min=subgroups.auroc_min,
        sensitivity_min=subgroups.sensitivity_min,
        n_boot=n_boot,
        seed=seed,
        words=words,
        clusters=held["subject_id"].to_numpy() if "subject_id" in held.columns else None,
        observed_expected_range=subgroups.observed_expected_range,
        calibration_slope_range=subgroups.calibration_slope_range,
    )
    v, reasons = verdict(analysis, min_events=min_events, min_non_events=min_non_events, words=words)
    thresholds = group_thresholds(
        *yp(tune),
        groups(tune),
        *yp(held),
        groups(held),
        threshold=threshold,
        policy=operating_point.policy,
        target=operating_point.target,
        min_cell_size=subgroups.min_cell_size,
        n_boot=min(n_boot, 200),
        seed=seed,
    )
    recommendations = threshold_recommendation(
        thresholds, policy=operating_point.policy, target=operating_point.target
    )
    return FairnessAudit(analysis, v, reasons, thresholds, recommendations)
