"""Discrimination, calibration and clinical utility with bootstrap confidence intervals.

All functions take outcome labels ``y`` (0/1) and predicted risks ``p`` as numpy arrays.
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from clinical_ml.core import bootstrap

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


_NEWTON_STEPS = 100
_STEP_HALVINGS = 60
_STEP_TOL = 1e-9
_RIDGE = 1e-9


def _logit(p: np.ndarray) -> np.ndarray:
    pc = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(pc / (1 - pc))


def _separated(lp: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Whether, per row of weights ``c``, the logits (quasi-)completely separate the outcomes.

    With one covariate and an intercept the logistic maximum-likelihood fit exists exactly when the weighted
    rows of the two classes overlap on ``lp`` (Albert and Anderson, 1984): some event lies strictly below some
    non-event and some non-event strictly below some event. Otherwise a threshold splits them (ties allowed)
    and the slope runs off to infinity. One class only, or one logit value only, counts as separated.
    """
    on = c > 0
    pos = y != 0
    lp1, lp0 = lp[pos], lp[~pos]
    hi1 = np.where(on[:, pos], lp1, -np.inf).max(axis=1, initial=-np.inf)
    lo1 = np.where(on[:, pos], lp1, np.inf).min(axis=1, initial=np.inf)
    hi0 = np.where(on[:, ~pos], lp0, -np.inf).max(axis=1, initial=-np.inf)
    lo0 = np.where(on[:, ~pos], lp0, np.inf).min(axis=1, initial=np.inf)
    return (hi0 <= lo1) | (hi1 <= lo0)


def _log_likelihood(eta: np.ndarray, mu: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Weighted Bernoulli log-likelihood per row of linear predictors ``eta`` with ``mu = expit(eta)``.

    log(1 + exp(eta)) is taken as eta - log(mu) where eta > 0 and -log(1 - mu) elsewhere: both accurate and
    free of overflow, and ``mu`` is needed for the next Newton step anyway.
    """
    pos = eta > 0
    return (c * (y * eta - np.where(pos, eta, 0.0) + np.log(np.where(pos, mu, 1 - mu)))).sum(axis=1)


def _recalibration_slopes(lp: np.ndarray, y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Maximum-likelihood slope of y on ``lp`` (with intercept) for each row of case weights ``c``.

    Newton-Raphson from intercept 0, slope 1, damped by step-halving: a step is taken whole if it does not
    lower the log-likelihood (up to rounding, 1e-12 relative), else halved until it does (at most 60 times).
    A replicate stops once a Newton step moves neither coefficient by 1e-9. NaN where the fit does not exist
    (:func:`_separated`) or has not converged within 100 steps.
    """
    beta = np.tile([0.0, 1.0], (c.shape[0], 1))
    active = ~_separated(lp, y, c)
    converged = np.zeros(c.shape[0], dtype=bool)
    mu = np.zeros_like(c)
    mu[active] = expit(lp)
    ll = np.full(c.shape[0], -np.inf)
    ll[active] = _log_likelihood(np.broadcast_to(lp, c.shape)[active], mu[active], y, c[active])
    for _ in range(_NEWTON_STEPS):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        cr = c[rows]
        mr = mu[rows]
        w = cr * (mr * (1 - mr))
        r = cr * (y - mr)
        h = np.empty((rows.size, 2, 2))
        h[:, 0, 0] = w.sum(axis=1) + _RIDGE
        h[:, 0, 1] = h[:, 1, 0] = w @ lp
        h[:, 1, 1] = w @ (lp * lp) + _RIDGE
        g = np.stack([r.sum(axis=1), r @ lp], axis=1)
        step = np.linalg.solve(h, g[:, :, None])[:, :, 0]
        done = np.abs(step).max(axis=1) < _STEP_TOL
        beta[rows[done]] += step[done]
        converged[rows[done]] = True
        scale = np.ones(rows.size)
        pending = ~done
        for _ in range(_STEP_HALVINGS + 1):
            k = np.flatnonzero(pending)
            if k.size == 0:
                break
            rk = rows[k]
            cand = beta[rk] + scale[k, None] * step[k]
            e = cand[:, :1] + cand[:, 1:] * lp
            m = expit(e)
            new_ll = _log_likelihood(e, m, y, c[rk])
            take = new_ll >= ll[rk] - 1e-12 * np.abs(ll[rk])
            took = rk[take]
            beta[took], mu[took], ll[took] = cand[take], m[take], new_ll[take]
            pending[k[take]] = False
            scale[k[~take]] /= 2
        # converged, or no ascent along the Newton direction even after halving (gives up: NaN)
        active[rows] = ~done & ~pending
    return np.where(converged, beta[:, 1], np.nan)


def _calibration_in_the_large(lp: np.ndarray, y: np.ndarray) -> float:
    """Intercept ``a`` of the offset model logit P(y) = a + lp: the root of sum(y) = sum(expit(a + lp)).

    The score is decreasing in ``a`` and, with both classes present, changes sign inside
    [logit(k/n) - max(lp), logit(k/n) - min(lp)] (k events in n rows), so Newton steps are kept inside that
    shrinking bracket and replaced by bisection where they would leave it. NaN with one class only.
    """
    n, k = y.size, float(y.sum())
    if k == 0 or k == n:
        return float("nan")
    base = float(np.log(k / (n - k)))
    lo, hi = base - float(lp.max()), base - float(lp.min())
    a = min(max(0.0, lo), hi)
    for _ in range(200):
        mu = expit(a + lp)
        score = k - float(mu.sum())
        if score > 0:
            lo = a
        elif score < 0:
            hi = a
        else:
            break
        info = float((mu * (1 - mu)).sum())
        nxt = a + score / info if info > 0 else np.inf
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - a) < 1e-12 * max(1.0, abs(a)) or hi - lo < 1e-12:
            a = nxt
            break
        a = nxt
    return float(a)


def calibration_slope_intercept(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Logistic recalibration: slope of outcome on logit(p), and calibration-in-the-large (offset fit).

    Parameters
    ----------
    y, p
        Outcome labels (0/1) and predicted risks; risks are clipped to [1e-6, 1 - 1e-6] before the logit.

    Returns
    -------
    tuple of float
        ``(slope, intercept)``. The slope is the maximum-likelihood coefficient of logit(p) in a logistic
        regression with intercept (damped Newton-Raphson, see :func:`_recalibration_slopes`); below 1 means
        predictions too extreme (overfitting). It is NaN when that fit does not exist: one outcome class, or
        logit(p) separating events from non-events completely or quasi-completely (the slope would be
        infinite). The intercept is calibration-in-the-large, the intercept with the slope fixed at 1;
        NaN with one outcome class only.
    """
    y = np.asarray(y, dtype=np.float64)
    lp = _logit(p)
    if y.size == 0:
        return float("nan"), float("nan")
    slope = _recalibration_slopes(lp, y, np.ones((1, y.size)))[0]
    return float(slope), _calibration_in_the_large(lp, y)


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
        One slope per replicate, from the same damped Newton-Raphson as :func:`calibration_slope_intercept`
        (shared code), run on all replicates at once with batched 2x2 solves, a replicate frozen once it has
        converged. NaN where the fit does not exist for that weighting (one outcome class with weight, or
        separation) or did not converge.
    """
    y = np.asarray(y, dtype=np.float64)
    c = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return _recalibration_slopes(_logit(p), y, c)


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


def _metric_or_none(d: dict | None) -> MetricWithCI | None:
    return None if d is None else MetricWithCI(float(d["value"]), float(d["lower"]), float(d["upper"]))


# Each alert burden measure, the success criterion (a maximum) that limits it, and its name in words.
ALERT_BURDEN_LIMITS = (
    ("alerts_per_100_patient_days", "alerts_per_100_patient_days_max", "alerts per 100 patient-days"),
    ("alerts_per_unit_day", "alerts_per_unit_day_max", "alerts per unit per day"),
    ("number_needed_to_evaluate", "number_needed_to_evaluate_max", "number needed to evaluate"),
)


@dataclass(frozen=True)
class AlertBurden:
    """The alerts a model raises at its operating point on the validation cohort, with 95% CIs.

    ``alerts`` are flagged prediction rows and ``true_alerts`` those whose outcome occurred. ``patient_days``
    is the time at risk summed over the stays: from a stay's first prediction to its end (discharge or
    death), or one day per stay when the prediction is made once, at discharge (``one_day_per_stay``).
    ``unit_days`` counts the distinct (unit, calendar day of the prediction time) pairs with at least one
    prediction; ``undated_rows`` are prediction rows whose real day is not known (their batch is not a dated
    delivery): with any, alerts per unit per day are not computed. A rate is None when its denominator is
    zero; the number needed to evaluate (alerts per true alert, 1 / PPV) is None when nothing was flagged and
    infinite when alerts were raised but none was true.
    """

    prediction_rows: int
    stays: int
    patients: int
    alerts: int
    true_alerts: int
    patient_days: float
    unit_days: int
    one_day_per_stay: bool
    alerts_per_100_patient_days: MetricWithCI | None
    alerts_per_unit_day: MetricWithCI | None
    number_needed_to_evaluate: MetricWithCI | None
    n_bootstrap: int
    stays_ending_in_death: int = 0
    undated_rows: int = 0

    def finite_values(self) -> dict[str, float]:
        """The measured rates by name (``alerts_per_100_patient_days``...), those that exist and are finite."""
        named = {
            "alerts_per_100_patient_days": self.alerts_per_100_patient_days,
            "alerts_per_unit_day": self.alerts_per_unit_day,
            "number_needed_to_evaluate": self.number_needed_to_evaluate,
        }
        return {k: m.value for k, m in named.items() if m is not None and math.isfinite(m.value)}

    @property
    def judged(self) -> bool:
        """Whether there is a burden to judge: at least one prediction was flagged."""
        return self.alerts > 0

    @property
    def one_row_per_stay(self) -> bool:
        """Whether each stay was predicted once (an alert is then a patient flagged)."""
        return self.prediction_rows == self.stays

    def as_dict(self) -> dict:
        def m(x: MetricWithCI | None) -> dict | None:
            return None if x is None else x.as_dict()

        return {
            "prediction_rows": self.prediction_rows,
            "stays": self.stays,
            "patients": self.patients,
            "alerts": self.alerts,
            "true_alerts": self.true_alerts,
            "patient_days": self.patient_days,
            "unit_days": self.unit_days,
            "one_day_per_stay": self.one_day_per_stay,
            "alerts_per_100_patient_days": m(self.alerts_per_100_patient_days),
            "alerts_per_unit_day": m(self.alerts_per_unit_day),
            "number_needed_to_evaluate": m(self.number_needed_to_evaluate),
            "n_bootstrap": self.n_bootstrap,
            "stays_ending_in_death": self.stays_ending_in_death,
            "undated_rows": self.undated_rows,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AlertBurden":
        return cls(
            prediction_rows=int(d["prediction_rows"]),
            stays=int(d["stays"]),
            patients=int(d["patients"]),
            alerts=int(d["alerts"]),
            true_alerts=int(d["true_alerts"]),
            patient_days=float(d["patient_days"]),
            unit_days=int(d["unit_days"]),
            one_day_per_stay=bool(d["one_day_per_stay"]),
            alerts_per_100_patient_days=_metric_or_none(d.get("alerts_per_100_patient_days")),
            alerts_per_unit_day=_metric_or_none(d.get("alerts_per_unit_day")),
            number_needed_to_evaluate=_metric_or_none(d.get("number_needed_to_evaluate")),
            n_bootstrap=int(d["n_bootstrap"]),
            stays_ending_in_death=int(d.get("stays_ending_in_death", 0)),
            undated_rows=int(d.get("undated_rows", 0)),
        )


def _inverse(x: float) -> float:
    """1 / x, infinite at 0 (a PPV of 0: no alert was true), NaN stays NaN."""
    if np.isnan(x):
        return float("nan")
    return float("inf") if x == 0 else 1.0 / x


def alert_burden(
    *,
    alerts: np.ndarray,
    true_alerts: np.ndarray,
    patient_days: np.ndarray,
    unit_day_shares: np.ndarray,
    prediction_rows: int,
    stays: int,
    unit_days: int,
    one_day_per_stay: bool,
    stays_ending_in_death: int = 0,
    undated_rows: int = 0,
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> AlertBurden:
    """Alerts per 100 patient-days, alerts per unit per day and the number needed to evaluate, with
    percentile bootstrap CIs that resample patients (a patient's stays and prediction rows stay together).

    Parameters
    ----------
    alerts, true_alerts, patient_days : numpy.ndarray
        Per patient: flagged prediction rows, flagged rows whose outcome occurred, days at risk of their stays.
    unit_day_shares : numpy.ndarray
        Per patient: their share of the unit-days. Each unit-day is shared among the prediction rows made on
        it, so the shares of all patients add up to ``unit_days`` and a resample counts the unit-days of the
        patients it draws (counting only the distinct unit-days a resample covers would drop a unit-day with
        every patient left out while keeping the alerts of those drawn twice, and bias the rate upwards).
    prediction_rows, stays, unit_days : int
        Totals of the validation cohort (the denominators of the point estimates).
    one_day_per_stay : bool
        Whether ``patient_days`` counted one day per stay (prediction at discharge); kept for the reports.
    stays_ending_in_death : int
        Stays whose time at risk ended in death rather than discharge; kept for the reports.
    undated_rows : int
        Prediction rows whose real day is not known: with any, alerts per unit per day are not computed.
    n_boot, seed, level
        Bootstrap replicates, seed and coverage.

    Returns
    -------
    AlertBurden
        The NNE interval is that of the PPV inverted (1 / upper, 1 / lower); a replicate that flags nobody
        has no PPV and is left out, and a PPV bound of 0 gives an infinite NNE bound.
    """
    per = np.stack([alerts, true_alerts, patient_days, unit_day_shares], axis=1).astype(np.float64)
    n_alerts, n_true, days = int(per[:, 0].sum()), int(per[:, 1].sum()), float(per[:, 2].sum())
    blocks = []
    for counts in bootstrap.resample_counts(per.shape[0], n_boot=n_boot, rng=np.random.default_rng(seed)):
        s = counts @ per
        with np.errstate(divide="ignore", invalid="ignore"):
            blocks.append(np.stack([100 * s[:, 0] / s[:, 2], s[:, 0] / s[:, 3], s[:, 1] / s[:, 0]], axis=1))
    reps = np.concatenate(blocks) if blocks else np.empty((0, 3))
    lo, hi = bootstrap.percentile_interval(reps, level=level)
    per_days = MetricWithCI(100 * n_alerts / days, float(lo[0]), float(hi[0])) if days > 0 else None
    per_unit_day = (
        MetricWithCI(n_alerts / unit_days, float(lo[1]), float(hi[1]))
        if unit_days > 0 and undated_rows == 0
        else None
    )
    nne = None
    if n_alerts > 0:
        value = n_alerts / n_true if n_true else float("inf")
        nne = MetricWithCI(float(value), _inverse(float(hi[2])), _inverse(float(lo[2])))
    return AlertBurden(
        prediction_rows=int(prediction_rows),
        stays=int(stays),
        patients=int(per.shape[0]),
        alerts=n_alerts,
        true_alerts=n_true,
        patient_days=days,
        unit_days=int(unit_days),
        one_day_per_stay=bool(one_day_per_stay),
        alerts_per_100_patient_days=per_days,
        alerts_per_unit_day=per_unit_day,
        number_needed_to_evaluate=nne,
        n_bootstrap=int(n_boot),
        stays_ending_in_death=int(stays_ending_in_death),
        undated_rows=int(undated_rows),
    )


def bootstrap_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, MetricWithCI]:
    """Point estimates with percentile bootstrap CIs (resampling rows with replacement; with ``groups``,
    resampling whole patients, so that a patient's several stays or prediction times count once).

    The threshold stays fixed across replicates: it was chosen on other data, so its uncertainty is not
    part of the validation estimate.
    """
    y = np.asarray(y)
    p = np.asarray(p)
    point = point_metrics(y, p, threshold)

    def metrics(idx: np.ndarray) -> tuple[float, ...]:
        m = point_metrics(y[idx], p[idx], threshold)
        return tuple(m[k] for k in METRIC_NAMES)

    rng = np.random.default_rng(seed)
    reps = (
        bootstrap.cluster_replicates(metrics, groups, n_boot=n_boot, rng=rng)
        if groups is not None
        else bootstrap.replicates(metrics, len(y), n_boot=n_boot, rng=rng)
    )
    return _with_ci(point, reps, METRIC_NAMES, level=level)


def _with_ci(
    point: dict[str, float] | tuple[float, ...], reps: np.ndarray, names: tuple[str, ...], *, level: float
) -> dict[str, MetricWithCI]:
    """Point estimates (by name or position) with percentile intervals of the columns of ``reps``."""
    values = [point[k] for k in names] if isinstance(point, dict) else list(point)
    reps = reps.reshape(-1, len(names))
    lo, hi = bootstrap.percentile_interval(reps, level=level)
    return {k: MetricWithCI(float(values[j]), float(lo[j]), float(hi[j])) for j, k in enumerate(names)}


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
    reps = bootstrap.replicates(diffs, len(y), n_boot=n_boot, rng=np.random.default_rng(seed))
    return _with_ci(point, reps, names, level=level)
