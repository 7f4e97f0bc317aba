"""Realised performance of a deployed model over time, aware of when its outcomes become known.

- :func:`label_maturity`: which admissions' outcome windows have closed by a given date;
  :func:`newly_labelled`: how many matured since the model was trained.
- :func:`performance_by_period`: realised AUROC, O/E, calibration slope and sensitivity per period and
  subgroup with bootstrap CIs (:mod:`clinical_ml.core.bootstrap`) where labels have matured, the label-free
  estimate (:mod:`clinical_ml.core.performance_estimation`) beside them where they have not.
"""

import hashlib
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import polars as pl

from clinical_ml.core import bootstrap
from clinical_ml.core.batch_monitoring import PREDICTION_COLUMN
from clinical_ml.core.evaluation import (
    auroc,
    calibration_slope_intercept,
    calibration_slopes_weighted,
    confusion,
)
from clinical_ml.core.labeling import label_known_at
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.performance_estimation import ConfidenceBasedEstimator
from clinical_ml.core.storage import atomic_write_bytes

METRICS = ("auroc", "sensitivity", "observed_expected", "calibration_slope")


def newly_labelled(cohort: pl.DataFrame, *, trained_on: Sequence[str], as_of: date | datetime) -> int:
    """Admissions whose outcome is known by ``as_of`` and whose batch the model was not trained on: what
    makes a nightly retraining worth running."""
    if cohort.height == 0:
        return 0
    matured = label_maturity(cohort, as_of=as_of)
    return int((matured & ~cohort["batch_id"].is_in(list(trained_on))).sum())


def label_maturity(cohort: pl.DataFrame, *, as_of: date | datetime) -> pl.Series:
    """True where the outcome window (the use case's: until discharge, N days after discharge, N hours after
    the prediction time...; the cohort's ``label_window_end``) has closed by ``as_of``.

    Dates in the de-identified layer are shifted per patient, so the real day an outcome became known is
    the batch's delivery date (its id) plus the preserved interval from admission to the end of the stay.
    """
    as_of_dt = as_of if isinstance(as_of, datetime) else datetime.combine(as_of, datetime.min.time())
    if as_of_dt.tzinfo is not None:  # the data's times are naive UTC
        as_of_dt = as_of_dt.astimezone(UTC).replace(tzinfo=None)
    known_at = label_known_at(cohort, whole_export=False)
    return cohort.select((known_at <= as_of_dt).fill_null(False).alias("matured")).to_series()


def metric_replicates(
    y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """The four :data:`METRICS` on each of ``n_boot`` row resamples, all replicates at once.

    Parameters
    ----------
    y, p
        Outcome labels (0/1) and predicted risks.
    threshold
        Operating threshold (risk >= threshold is flagged), fixed across replicates.
    n_boot, seed
        Replicates, and the seed of their resample stream (:func:`clinical_ml.core.bootstrap.resample_counts`).

    Returns
    -------
    dict of str to numpy.ndarray
        ``n_boot`` values per metric; NaN where a replicate leaves it undefined.
    """
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    events_flagged = (y & (p >= threshold)).astype(np.float64)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    for c in bootstrap.resample_counts(y.size, n_boot=n_boot, rng=np.random.default_rng(seed)):
        events = c @ y.astype(np.float64)
        expected = c @ p
        with np.errstate(divide="ignore", invalid="ignore"):
            parts["sensitivity"].append(np.where(events > 0, (c @ events_flagged) / events, np.nan))
            parts["observed_expected"].append(np.where(expected > 0, events / expected, np.nan))
        parts["auroc"].append(bootstrap.weighted_auroc(y, p, c))
        parts["calibration_slope"].append(calibration_slopes_weighted(y, p, c))
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}


def metrics_with_ci(y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int, seed: int) -> dict:
    """Point estimates of :data:`METRICS` with percentile 95% bootstrap intervals.

    An interval is NaN when its point estimate is, or when fewer than ``max(10, n_boot // 4)`` replicates
    are finite (a small period with few events gives no interval rather than a misleading one).

    Returns
    -------
    dict
        Metric name -> ``{"value", "lower", "upper"}``.
    """
    tp, _, _, fn = confusion(y, p, threshold)
    value = {
        "auroc": auroc(y, p),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "observed_expected": float(y.sum() / p.sum()) if p.sum() > 0 else float("nan"),
        "calibration_slope": calibration_slope_intercept(y, p)[0],
    }
    reps = metric_replicates(y, p, threshold, n_boot=n_boot, seed=seed)
    out = {}
    for name in METRICS:
        v = value[name]
        lo, hi = bootstrap.percentile_interval(reps[name], level=0.95, min_finite=max(10, n_boot // 4))
        finite = bool(np.isfinite(v))
        out[name] = {
            "value": float(v),
            "lower": float(lo) if finite else float("nan"),
            "upper": float(hi) if finite else float("nan"),
        }
    return out


@dataclass(frozen=True)
class PeriodRowsCache:
    """Each period's rows of :func:`performance_by_period`, kept beside the inputs they were computed from
    (one file per period, under ``folder``): derived data only. A period is recomputed when anything its
    rows depend on changed (its admissions' risks, labels, maturity, subgroups and model versions; the
    slices, threshold, estimator, monitoring levels or seed), so a new batch costs its own period and the
    periods whose outcomes matured since, not the whole history."""

    folder: Path

    def path(self, period: str) -> Path:
        return self.folder / f"{period}.json"

    def get(self, period: str, key: str) -> list[dict] | None:
        """JSON, never pickle: a file in a data zone is read as data, whoever wrote it."""
        path = self.path(period)
        if not path.exists():
            return None
        try:
            kept = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None  # a damaged copy is recomputed
        return kept["rows"] if isinstance(kept, dict) and kept.get("key") == key else None

    def put(self, period: str, key: str, rows: list[dict]) -> None:
        atomic_write_bytes(self.path(period), json.dumps({"key": key, "rows": rows}).encode())


def _period_key(part: pl.DataFrame, columns: list[str], fixed: bytes) -> str:
    """What a period's rows are computed from: its rows of ``columns`` in order, and ``fixed`` (the same for
    every period of one call)."""
    h = hashlib.sha256(fixed)
    h.update(pickle.dumps(part.select(columns).to_dict(as_series=False), protocol=5))
    return h.hexdigest()


def _fixed_inputs(
    slices: list[tuple[str, str, pl.Expr]],
    threshold: float,
    estimator: ConfidenceBasedEstimator | None,
    config: MonitoringConfig,
    seed: int,
) -> bytes:
    est = (
        None
        if estimator is None
        else (
            estimator.threshold,
            repr(estimator.calibrator.get_params()),
            np.asarray(estimator.calibrator.X_thresholds_).tobytes(),
            np.asarray(estimator.calibrator.y_thresholds_).tobytes(),
        )
    )
    return pickle.dumps(
        (
            [(a, g) for a, g, _ in slices],
            float(threshold),
            est,
            repr(config),
            seed,
            METRICS,
        ),
        protocol=5,
    )


def performance_by_period(
    predictions: pl.DataFrame,
    *,
    threshold: float,
    estimator: ConfidenceBasedEstimator | None,
    config: MonitoringConfig,
    period_column: str = "batch_id",
    seed: int = 0,
    cache: PeriodRowsCache | None = None,
) -> list[dict]:
    """Realised and estimated performance per period, overall and per subgroup.

    ``predictions`` holds ``predicted_risk``, ``label`` (null while unknown), ``matured`` and the
    subgroup columns. A period is ``mature`` when at least ``config.min_matured_share`` of its admissions
    have a known outcome; realised metrics use the matured admissions only, and are judged against the
    minimums when mature (ERROR when the CI lies wholly below a minimum or outside a range). With ``cache``,
    a period whose inputs are unchanged since its rows were kept is read back rather than recomputed.
    """
    rows: list[dict] = []
    attrs = [a for a in config.subgroup_attributes if a in predictions.columns]
    slices: list[tuple[str, str, pl.Expr]] = [("all", "all", pl.lit(True))]
    slices += [
        (a, str(g), pl.col(a) == g)
        for a in attrs
        for g in sorted(predictions[a].drop_nulls().unique().to_list())
    ]
    columns = [
        c
        for c in (PREDICTION_COLUMN, "label", "matured", "model_version", *attrs)
        if c in predictions.columns
    ]
    fixed = _fixed_inputs(slices, threshold, estimator, config, seed) if cache is not None else b""
    for (period,), part in sorted(predictions.group_by(period_column), key=lambda t: str(t[0][0])):
        if cache is None:
            rows += _period_rows(str(period), part, slices, threshold, estimator, config, seed)
            continue
        key = _period_key(part, columns, fixed)
        kept = cache.get(str(period), key)
        if kept is None:
            kept = _period_rows(str(period), part, slices, threshold, estimator, config, seed)
            cache.put(str(period), key, kept)
        rows += kept
    return rows


def _period_rows(
    period: str,
    part: pl.DataFrame,
    slices: list[tuple[str, str, pl.Expr]],
    threshold: float,
    estimator: ConfidenceBasedEstimator | None,
    config: MonitoringConfig,
    seed: int,
) -> list[dict]:
    rows: list[dict] = []
    for i, (attr, group, expr) in enumerate(slices):
        s = part.filter(expr)
        if s.height == 0 or (attr != "all" and s.height < config.min_subgroup_rows):
            continue
        risk = s[PREDICTION_COLUMN].to_numpy().astype(np.float64)
        lab = s.filter(pl.col("matured") & pl.col("label").is_not_null())
        share = lab.height / s.height
        row: dict = {
            "period": period,
            "attribute": attr,
            "group": group,
            "n": s.height,
            "n_labelled": lab.height,
            "matured_share": share,
            "status": "mature" if share >= config.min_matured_share else "maturing",
            "model_versions": sorted(s["model_version"].unique().to_list())
            if "model_version" in s.columns
            else [],
            "estimated": estimator.estimate(risk) if estimator else None,
            "realised": None,
            "level": "ok",
            "reasons": [],
        }
        if lab.height >= 10:
            y = lab["label"].cast(pl.Boolean).to_numpy()
            p = lab[PREDICTION_COLUMN].to_numpy().astype(np.float64)
            row["realised"] = metrics_with_ci(y, p, threshold, n_boot=config.n_bootstrap, seed=seed + i)
            row["events"] = int(y.sum())
            if row["status"] == "mature":
                row["level"], row["reasons"] = _judge(row["realised"], config)
        rows.append(row)
    return rows


def _judge(m: dict, config: MonitoringConfig) -> tuple[str, list[str]]:
    reasons = []
    if m["auroc"]["upper"] < config.auroc_min:
        reasons.append(
            f"AUROC upper 95% bound {m['auroc']['upper']:.3f} below the minimum {config.auroc_min}"
        )
    if m["sensitivity"]["upper"] < config.sensitivity_min:
        reasons.append(
            f"sensitivity upper 95% bound {m['sensitivity']['upper']:.2f} below the minimum {config.sensitivity_min}"
        )
    lo, hi = config.oe_range
    if m["observed_expected"]["lower"] > hi or m["observed_expected"]["upper"] < lo:
        reasons.append(f"observed/expected {m['observed_expected']['value']:.2f} outside {lo} to {hi}")
    lo, hi = config.calibration_slope_range
    if m["calibration_slope"]["lower"] > hi or m["calibration_slope"]["upper"] < lo:
        reasons.append(f"calibration slope {m['calibration_slope']['value']:.2f} outside {lo} to {hi}")
    return ("error" if reasons else "ok"), reasons
