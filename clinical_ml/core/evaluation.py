"""Discrimination, calibration and clinical utility with bootstrap confidence intervals.

All functions take outcome labels ``y`` (0/1) and predicted risks ``p`` as numpy arrays.
"""

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

METRIC_NAMES = (
    "auroc",
    "auprc",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "brier",
    "calibration_slope",
    "calibration_intercept",
    "observed_expected_ratio",
)
_EPS = 1e-6


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN with one class only."""
    y = np.asarray(y, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sp = np.asarray(p)[order]
    # mid-ranks for ties
    _, first, counts = np.unique(sp, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision (step-wise area under the precision-recall curve)."""
    y = np.asarray(y, dtype=bool)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(p), kind="mergesort")
    ys = y[order]
    tp = np.cumsum(ys)
    precision = tp / np.arange(1, len(ys) + 1)
    return float(precision[ys].sum() / ys.sum())


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) when risk >= threshold means "flagged as high risk"."""
    y = np.asarray(y, dtype=bool)
    flag = np.asarray(p) >= threshold
    return int((flag & y).sum()), int((flag & ~y).sum()), int((~flag & ~y).sum()), int((~flag & y).sum())


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def calibration_slope_intercept(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Logistic recalibration: slope of outcome on logit(p), and calibration-in-the-large (offset fit).

    Fitted by Newton-Raphson; a slope below 1 means predictions are too extreme (overfitting).
    """
    y = np.asarray(y, dtype=np.float64)
    lp = np.log(np.clip(p, _EPS, 1 - _EPS) / (1 - np.clip(p, _EPS, 1 - _EPS)))
    if y.min() == y.max():
        return float("nan"), float("nan")
    x = np.column_stack([np.ones_like(lp), lp])
    beta = np.array([0.0, 1.0])
    for _ in range(50):
        mu = expit(x @ beta)
        w = mu * (1 - mu) + 1e-12
        step = np.linalg.solve((x * w[:, None]).T @ x + 1e-9 * np.eye(2), x.T @ (y - mu))
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    # calibration-in-the-large: intercept with the slope fixed at 1 (offset logit)
    a = 0.0
    for _ in range(50):
        mu = expit(a + lp)
        step = (y - mu).sum() / max((mu * (1 - mu)).sum(), 1e-12)
        a += step
        if abs(step) < 1e-10:
            break
    return float(beta[1]), float(a)


def calibration_slopes_weighted(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Calibration slope of :func:`calibration_slope_intercept` for many case-weightings of one data set.

    Parameters
    ----------
    y, p
        Outcome labels (0/1) and predicted risks, one per row.
    weights
        Case weights, shape (replicates, rows); bootstrap multiplicities make row ``b`` stand for the data
        set that repeats row ``i`` ``weights[b, i]`` times.

    Returns
    -------
    numpy.ndarray
        One slope per replicate: the same Newton-Raphson as :func:`calibration_slope_intercept` (start,
        ridge, tolerance and 50 steps), run on all replicates at once with batched 2x2 solves, a replicate
        frozen once its step is below the tolerance. NaN where one outcome class has no weight.
    """
    y = np.asarray(y, dtype=np.float64)
    c = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    pc = np.clip(p, _EPS, 1 - _EPS)
    lp = np.log(pc / (1 - pc))
    n_pos = c @ (y != 0)
    two_classes = (n_pos > 0) & (c.sum(axis=1) - n_pos > 0)
    beta = np.tile([0.0, 1.0], (c.shape[0], 1))
    active = two_classes.copy()
    for _ in range(50):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        cr = c[rows]
        mu = expit(beta[rows, :1] + beta[rows, 1:] * lp)
        w = cr * (mu * (1 - mu) + 1e-12)
        r = cr * (y - mu)
        h = np.empty((rows.size, 2, 2))
        h[:, 0, 0] = w.sum(axis=1) + 1e-9
        h[:, 0, 1] = h[:, 1, 0] = w @ lp
        h[:, 1, 1] = w @ (lp * lp) + 1e-9
        g = np.stack([r.sum(axis=1), r @ lp], axis=1)
        step = np.linalg.solve(h, g[:, :, None])[:, :, 0]
        beta[rows] += step
        active[rows] = np.abs(step).max(axis=1) >= 1e-8
    return np.where(two_classes, beta[:, 1], np.nan)


def point_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Every metric of ``METRIC_NAMES`` at one operating threshold."""
    tp, fp, tn, fn = confusion(y, p, threshold)
    slope, intercept = calibration_slope_intercept(y, p)
    return {
        "auroc": auroc(y, p),
        "auprc": auprc(y, p),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "brier": float(np.mean((np.asarray(p) - np.asarray(y)) ** 2)),
        "calibration_slope": slope,
        "calibration_intercept": intercept,
        "observed_expected_ratio": _ratio(float(np.sum(y)), float(np.sum(p))),
    }


@dataclass(frozen=True)
class MetricWithCI:
    value: float
    lower: float
    upper: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lower": self.lower, "upper": self.upper}


def bootstrap_metrics(
    y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int = 500, seed: int = 0, level: float = 0.95
) -> dict[str, MetricWithCI]:
    """Point estimates with percentile bootstrap CIs (resampling patients' rows with replacement).

    The threshold stays fixed across replicates: it was chosen on other data, so its uncertainty is not
    part of the validation estimate.
    """
    y = np.asarray(y)
    p = np.asarray(p)
    point = point_metrics(y, p, threshold)
    rng = np.random.default_rng(seed)
    reps = {k: np.empty(n_boot) for k in METRIC_NAMES}
    n = len(y)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        m = point_metrics(y[idx], p[idx], threshold)
        for k in METRIC_NAMES:
            reps[k][b] = m[k]
    alpha = (1 - level) / 2
    out = {}
    for k in METRIC_NAMES:
        r = reps[k][np.isfinite(reps[k])]
        lo, hi = np.quantile(r, [alpha, 1 - alpha]) if r.size else (np.nan, np.nan)
        out[k] = MetricWithCI(point[k], float(lo), float(hi))
    return out


def choose_threshold(y: np.ndarray, p: np.ndarray, *, policy: str, target: float) -> float:
    """Operating threshold by the use case's policy, chosen on tuning data.

    ``min_sensitivity``: the highest threshold whose sensitivity is at least ``target``.
    ``min_specificity``: the lowest threshold whose specificity is at least ``target``.
    """
    y = np.asarray(y, dtype=bool)
    cand = np.unique(p)[::-1]
    if policy == "min_sensitivity":
        pos = np.sort(np.asarray(p)[y])[::-1]
        if pos.size == 0:
            return float(cand[-1])
        k = int(np.ceil(target * pos.size)) - 1
        return float(pos[max(k, 0)])
    if policy == "min_specificity":
        neg = np.sort(np.asarray(p)[~y])
        if neg.size == 0:
            return float(cand[0])
        k = int(np.ceil(target * neg.size)) - 1
        return float(np.nextafter(neg[max(k, 0)], np.inf))
    raise ValueError(f"unknown operating point policy {policy!r}")


def calibration_curve(y: np.ndarray, p: np.ndarray, *, n_bins: int = 10) -> list[dict[str, float]]:
    """Observed vs predicted risk per quantile bin of predicted risk, with Wilson 95% intervals."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p)
    edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        mask = idx == b
        n = int(mask.sum())
        if n == 0:
            continue
        obs = y[mask].mean()
        z = 1.96
        denom = 1 + z * z / n
        centre = (obs + z * z / (2 * n)) / denom
        half = z * np.sqrt(obs * (1 - obs) / n + z * z / (4 * n * n)) / denom
        rows.append(
            {
                "predicted": float(p[mask].mean()),
                "observed": float(obs),
                "lower": float(centre - half),
                "upper": float(centre + half),
                "n": n,
            }
        )
    return rows


def decision_curve(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | None = None
) -> list[dict[str, float]]:
    """Net benefit of the model, of treating all and of treating none across threshold probabilities."""
    y = np.asarray(y, dtype=bool)
    ts = thresholds if thresholds is not None else np.round(np.arange(0.02, 0.61, 0.02), 2)
    n = len(y)
    prev = y.mean()
    rows = []
    for t in ts:
        tp, fp, _, _ = confusion(y, p, float(t))
        w = t / (1 - t)
        rows.append(
            {
                "threshold": float(t),
                "model": tp / n - fp / n * w,
                "treat_all": float(prev - (1 - prev) * w),
                "treat_none": 0.0,
            }
        )
    return rows


def paired_comparison(
    y: np.ndarray,
    p_challenger: np.ndarray,
    p_champion: np.ndarray,
    *,
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, MetricWithCI]:
    """Challenger minus champion on the same patients, with paired percentile bootstrap CIs.

    Returns ``auroc_difference`` (positive: the challenger discriminates better) and the differences of
    calibration error, ``slope_error_difference`` (|slope - 1|) and ``intercept_error_difference``
    (|intercept|), where positive means the challenger is worse calibrated.
    """
    y = np.asarray(y)
    a = np.asarray(p_challenger)
    b = np.asarray(p_champion)

    def diffs(idx: np.ndarray) -> tuple[float, float, float]:
        sa, ia = calibration_slope_intercept(y[idx], a[idx])
        sb, ib = calibration_slope_intercept(y[idx], b[idx])
        return (
            auroc(y[idx], a[idx]) - auroc(y[idx], b[idx]),
            abs(sa - 1) - abs(sb - 1),
            abs(ia) - abs(ib),
        )

    names = ("auroc_difference", "slope_error_difference", "intercept_error_difference")
    point = diffs(np.arange(len(y)))
    rng = np.random.default_rng(seed)
    reps = np.array([diffs(rng.integers(0, len(y), len(y))) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    out = {}
    for j, name in enumerate(names):
        r = reps[:, j][np.isfinite(reps[:, j])] if n_boot else np.empty(0)
        lo, hi = np.quantile(r, [alpha, 1 - alpha]) if r.size else (np.nan, np.nan)
        out[name] = MetricWithCI(float(point[j]), float(lo), float(hi))
    return out
