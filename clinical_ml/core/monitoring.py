"""Monitoring of a deployed model: per-batch drift, label-maturity-aware performance, and its estimate.

Pieces
------
- :class:`MonitoringConfig`: WARN/ERROR levels and knobs, read from ``usecases/monitoring/<use case>.yaml``
  (defaults when the file is absent; the use case contract itself forbids extra sections).
- :func:`monitor_batch`: one batch against the derivation cohort: every predictor (numeric and categorical),
  missingness, the prediction distribution, label prevalence once labels are known, overall and per subgroup,
  with a per-batch false alarm budget (see :mod:`clinical_ml.core.drift`).
- :func:`label_maturity`: which admissions' outcome windows have closed by a given date.
- :class:`ConfidenceBasedEstimator`: performance before labels arrive, from calibrated risks (the idea of
  NannyML's CBPE). Assumptions: the risks are calibrated on the reference after isotonic recalibration, and
  the relation between predictors and outcome has not changed (covariate shift only). A change of assay or
  of coding (concept shift) breaks it: realised performance, once labels mature, is the judge.
- :func:`performance_by_period`: realised AUROC, O/E, calibration slope and sensitivity per period and
  subgroup with bootstrap CIs where labels have matured, the estimate beside them where they have not.
"""

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from scipy import stats
from sklearn.isotonic import IsotonicRegression

from clinical_ml.core.drift import (
    DriftThresholds,
    FeatureDrift,
    ReferenceProfile,
    batch_drift,
    n_tests_for,
    reference_profile,
    worst_level,
)
from clinical_ml.core.evaluation import (
    auroc,
    calibration_slope_intercept,
    calibration_slopes_weighted,
    confusion,
)
from clinical_ml.core.features import STATIC_CATEGORIES

PREDICTION_COLUMN = "predicted_risk"


@dataclass(frozen=True)
class MonitoringConfig:
    """Knobs of monitoring for one use case.

    Parameters
    ----------
    drift
        Levels and binning of the drift tests.
    subgroup_attributes
        Cohort columns whose groups are tested separately (their own Bonferroni family).
    min_subgroup_rows
        Groups smaller than this in the batch are not tested.
    n_bootstrap
        Bootstrap replicates of the 95% CIs of realised performance (per period and subgroup).
    auroc_min, sensitivity_min, calibration_slope_range, oe_range
        Minimums of realised performance: a period whose CI lies wholly below (or outside) is an ERROR.
    min_matured_share
        A period is "mature" when at least this share of its admissions have their outcome known.
    retrain_on
        Levels that request retraining (``error`` by default).
    min_reference_rows
        After a drift-triggered retraining, the drift reference is the derivation cohort from the batch
        where the drift began (the accepted new normal) when it has at least this many admissions; else
        the whole derivation cohort.
    """

    drift: DriftThresholds = field(default_factory=DriftThresholds)
    subgroup_attributes: tuple[str, ...] = ("sex", "age_band", "race_ethnicity")
    min_subgroup_rows: int = 30
    auroc_min: float = 0.70
    sensitivity_min: float = 0.60
    calibration_slope_range: tuple[float, float] = (0.5, 2.0)
    oe_range: tuple[float, float] = (0.5, 2.0)
    min_matured_share: float = 0.9
    n_bootstrap: int = 200
    retrain_on: tuple[str, ...] = ("error",)
    min_reference_rows: int = 100


def load_monitoring_config(path: Path | str | None) -> MonitoringConfig:
    """Read a monitoring YAML (``drift:`` thresholds plus the fields of :class:`MonitoringConfig`).

    A missing file gives the defaults; an unknown key raises ``ValueError`` naming it.
    """
    if path is None or not Path(path).exists():
        return MonitoringConfig()
    raw = yaml.safe_load(Path(path).read_text()) or {}
    known = set(MonitoringConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown monitoring settings {unknown}")
    drift_raw = raw.pop("drift", {}) or {}
    bad = sorted(set(drift_raw) - set(DriftThresholds.__dataclass_fields__))
    if bad:
        raise ValueError(f"{path}: unknown drift settings {bad}")
    for k in ("subgroup_attributes", "calibration_slope_range", "oe_range", "retrain_on"):
        if k in raw:
            raw[k] = tuple(raw[k])
    return MonitoringConfig(drift=DriftThresholds(**drift_raw), **raw)


# --- columns ----------------------------------------------------------------------------------------


def split_columns(columns: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Numeric predictors and one-hot groups (``sex__f``, ``sex__m`` -> categorical ``sex``)."""
    numeric: list[str] = []
    groups: dict[str, list[str]] = {}
    for c in columns:
        stem = c.partition("__")[0]
        if stem in STATIC_CATEGORIES and "__" in c:
            groups.setdefault(stem, []).append(c)
        else:
            numeric.append(c)
    return numeric, groups


def categorical_codes(frame: pl.DataFrame, one_hot: Sequence[str]) -> np.ndarray:
    """Integer codes of a one-hot group (index of the set column; ``-1`` when none is set or missing)."""
    m = frame.select([pl.col(c).cast(pl.Float64).fill_null(0.0) for c in one_hot]).to_numpy()
    return np.where(m.max(axis=1) > 0, m.argmax(axis=1), -1).astype(np.int64)


def string_codes(values: pl.Series, categories: Sequence[str]) -> np.ndarray:
    """Integer codes of a string column against a fixed category list (unknown -> new codes, null -> -1)."""
    index = {c: i for i, c in enumerate(categories)}
    extra: dict[str, int] = {}
    out = np.empty(values.len(), dtype=np.int64)
    for i, v in enumerate(values.to_list()):
        if v is None:
            out[i] = -1
        elif v in index:
            out[i] = index[v]
        else:
            out[i] = extra.setdefault(v, len(categories) + len(extra))
    return out


# --- per-batch monitoring ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchMonitoring:
    """Everything one batch's drift check decides, as plain data."""

    batch_id: str
    n_current: int
    n_reference: int
    n_tests: int
    features: tuple[FeatureDrift, ...]
    prediction: FeatureDrift | None
    label_prevalence: dict | None
    subgroups: tuple[dict, ...]
    level: str
    retraining_requested: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict:
        return {
            "batch_id": self.batch_id,
            "n_current": self.n_current,
            "n_reference": self.n_reference,
            "n_tests": self.n_tests,
            "level": self.level,
            "retraining_requested": self.retraining_requested,
            "reasons": list(self.reasons),
            "features": [d.__dict__ for d in self.features],
            "prediction": self.prediction.__dict__ if self.prediction else None,
            "label_prevalence": self.label_prevalence,
            "subgroups": list(self.subgroups),
        }


def _prevalence_test(ref_y: np.ndarray, cur_y: np.ndarray, alpha: float) -> dict:
    k1, n1, k2, n2 = int(ref_y.sum()), ref_y.size, int(cur_y.sum()), cur_y.size
    p = (k1 + k2) / max(n1 + n2, 1)
    se = np.sqrt(p * (1 - p) * (1 / max(n1, 1) + 1 / max(n2, 1)))
    pv = float(2 * stats.norm.sf(abs(k1 / max(n1, 1) - k2 / max(n2, 1)) / se)) if se > 0 else 1.0
    return {
        "prevalence_reference": k1 / max(n1, 1),
        "prevalence_current": k2 / max(n2, 1),
        "n_labelled": n2,
        "pvalue": pv,
        "level": "warn" if pv < alpha else "ok",
    }


@dataclass(frozen=True)
class MonitoringReference:
    """The derivation cohort prepared once for many batches: overall and per-subgroup profiles."""

    profile: ReferenceProfile
    subgroup_profiles: dict[tuple[str, str], ReferenceProfile]
    numeric_columns: tuple[str, ...]
    one_hot_groups: dict[str, list[str]]
    labels: np.ndarray | None = None

    def matrices(self, frame: pl.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x = frame.select([pl.col(c).cast(pl.Float64) for c in self.numeric_columns]).to_numpy()
        return x.astype(np.float64), {g: categorical_codes(frame, c) for g, c in self.one_hot_groups.items()}


def prepare_reference(
    reference: pl.DataFrame,
    feature_columns: Sequence[str],
    *,
    config: MonitoringConfig,
    labels: np.ndarray | None = None,
) -> MonitoringReference:
    """Profile the derivation cohort (features, ``predicted_risk`` when present, subgroups) once."""
    numeric, groups = split_columns(feature_columns)
    num_cols = tuple(numeric + ([PREDICTION_COLUMN] if PREDICTION_COLUMN in reference.columns else []))
    ref = MonitoringReference(
        reference_profile(np.zeros((0, 0)), [], thresholds=config.drift), {}, num_cols, groups, labels
    )
    x, c = ref.matrices(reference)
    profile = reference_profile(x, num_cols, categorical=c, thresholds=config.drift)
    subs = {}
    for a in config.subgroup_attributes:
        if a not in reference.columns:
            continue
        for g in reference[a].drop_nulls().unique().to_list():
            part = reference.filter(pl.col(a) == g)
            if part.height >= config.min_subgroup_rows:
                gx, gc = ref.matrices(part)
                subs[(a, str(g))] = reference_profile(gx, num_cols, categorical=gc, thresholds=config.drift)
    return MonitoringReference(profile, subs, num_cols, groups, labels)


def monitor_batch(
    *,
    batch_id: str,
    reference: MonitoringReference,
    current: pl.DataFrame,
    config: MonitoringConfig,
    current_labels: np.ndarray | None = None,
) -> BatchMonitoring:
    """Drift of one batch against the derivation cohort.

    Parameters
    ----------
    reference
        From :func:`prepare_reference`.
    current
        The batch's feature rows, its ``predicted_risk`` when the reference has one, and subgroup columns.
    current_labels
        Outcomes of the batch where known (matured); label prevalence is tested when the reference has
        labels too.
    """
    profile = reference.profile
    cx, cc = reference.matrices(current)
    m = n_tests_for(profile)
    drift = batch_drift(profile, cx, categorical=cc, n_tests=m)
    prediction = next((d for d in drift if d.feature == PREDICTION_COLUMN), None)
    features = tuple(d for d in drift if d.feature != PREDICTION_COLUMN)

    subgroups: list[dict] = []
    cells = [
        (a, str(g))
        for a in config.subgroup_attributes
        if a in current.columns
        for g in sorted(current[a].drop_nulls().unique().to_list())
        if (current[a] == g).sum() >= config.min_subgroup_rows and (a, str(g)) in reference.subgroup_profiles
    ]
    m_sub = max(len(cells), 1) * m
    for a, g in cells:
        prof_g = reference.subgroup_profiles[(a, g)]
        cgx, cgc = reference.matrices(current.filter(pl.col(a).cast(pl.String) == g))
        d_g = batch_drift(prof_g, cgx, categorical=cgc, n_tests=m_sub)
        pred_g = next((d for d in d_g if d.feature == PREDICTION_COLUMN), None)
        subgroups.append(
            {
                "attribute": a,
                "group": g,
                "n_current": cgx.shape[0],
                "n_reference": prof_g.n_rows,
                # subgroup drift is for review: it splits small batches, so it never requests retraining
                "level": "warn" if any(d.drifted for d in d_g) else "ok",
                "n_drifted": sum(d.drifted for d in d_g),
                "top": [d.feature for d in d_g if d.drifted][:5],
                "prediction_mean_reference": pred_g.mean_reference if pred_g else None,
                "prediction_mean_current": pred_g.mean_current if pred_g else None,
            }
        )

    prevalence = None
    if reference.labels is not None and current_labels is not None and len(current_labels):
        prevalence = _prevalence_test(
            np.asarray(reference.labels, bool), np.asarray(current_labels, bool), config.drift.alpha_warn
        )

    reasons = [
        f"{d.feature}: {d.level.upper()} (p = {d.p_min:.2g}, PSI {d.psi:.2f}"
        + (f", KS {d.ks_statistic:.2f})" if np.isfinite(d.ks_statistic) else ")")
        for d in drift
        if d.level != "ok"
    ][:10]
    reasons += [
        f"subgroup {s['attribute']}={s['group']}: {s['level'].upper()} ({s['n_drifted']} columns moved)"
        for s in subgroups
        if s["level"] != "ok"
    ]
    if prevalence and prevalence["level"] != "ok":
        reasons.append(
            f"label prevalence {prevalence['prevalence_current']:.3f} vs {prevalence['prevalence_reference']:.3f}"
        )
    level = worst_level(
        [d.level for d in drift]
        + [s["level"] for s in subgroups]
        + ([prevalence["level"]] if prevalence else [])
    )
    return BatchMonitoring(
        batch_id=batch_id,
        n_current=current.height,
        n_reference=profile.n_rows,
        n_tests=m,
        features=features,
        prediction=prediction,
        label_prevalence=prevalence,
        subgroups=tuple(subgroups),
        level=level,
        retraining_requested=level in config.retrain_on,
        reasons=tuple(reasons),
    )


# --- labels, performance and its estimate ----------------------------------------------------------


def newly_labelled(cohort: pl.DataFrame, *, trained_on: Sequence[str], as_of: date | datetime) -> int:
    """Admissions whose outcome is known by ``as_of`` and whose batch the model was not trained on: what
    makes a nightly retraining worth running."""
    if cohort.height == 0:
        return 0
    matured = label_maturity(cohort, as_of=as_of)
    return int((matured & ~cohort["batch_id"].is_in(list(trained_on))).sum())


def label_maturity(cohort: pl.DataFrame, *, as_of: date | datetime) -> pl.Series:
    """True where the outcome window (until discharge or death) has closed by ``as_of``.

    Dates in the de-identified layer are shifted per patient, so the real day an outcome became known is
    the batch's delivery date (its id) plus the preserved interval from admission to the end of the stay.
    """
    as_of_dt = as_of if isinstance(as_of, datetime) else datetime.combine(as_of, datetime.min.time())
    if as_of_dt.tzinfo is not None:  # the data's times are naive UTC
        as_of_dt = as_of_dt.astimezone(UTC).replace(tzinfo=None)
    end = pl.min_horizontal(
        pl.col("discharge_time"), pl.col("death_time").fill_null(pl.col("discharge_time"))
    )
    known_at = pl.col("batch_id").str.to_date().cast(pl.Datetime("us")) + (end - pl.col("admit_time"))
    return cohort.select((known_at <= as_of_dt).fill_null(False).alias("matured")).to_series()


@dataclass(frozen=True)
class ConfidenceBasedEstimator:
    """Expected AUROC and sensitivity from calibrated risks, without labels (after NannyML's CBPE).

    Fit an isotonic map from risk to observed outcome on a labelled reference; for a new batch, each
    admission counts as ``p`` of a death and ``1 - p`` of a survival, which gives an expected ROC curve.
    """

    calibrator: IsotonicRegression
    threshold: float

    @classmethod
    def fit(cls, risk: np.ndarray, y: np.ndarray, *, threshold: float) -> "ConfidenceBasedEstimator":
        iso = IsotonicRegression(y_min=1e-4, y_max=1 - 1e-4, out_of_bounds="clip")
        iso.fit(np.asarray(risk, np.float64), np.asarray(y, np.float64))
        return cls(iso, threshold)

    def calibrated(self, risk: np.ndarray) -> np.ndarray:
        return np.asarray(self.calibrator.predict(np.asarray(risk, np.float64)))

    def estimate(self, risk: np.ndarray) -> dict[str, float]:
        """Expected AUROC, sensitivity, specificity and prevalence of a batch."""
        r = np.asarray(risk, np.float64)
        if r.size == 0:
            return {"auroc": float("nan"), "sensitivity": float("nan"), "specificity": float("nan")}
        p = self.calibrated(r)
        # group tied risks: the ROC moves diagonally through ties (mid-rank convention)
        uniq, inv = np.unique(-r, return_inverse=True)
        pos = np.bincount(inv, weights=p, minlength=uniq.size)
        neg = np.bincount(inv, weights=1 - p, minlength=uniq.size)
        tpr = np.concatenate([[0.0], np.cumsum(pos)]) / max(pos.sum(), 1e-12)
        fpr = np.concatenate([[0.0], np.cumsum(neg)]) / max(neg.sum(), 1e-12)
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        flag = r >= self.threshold
        return {
            "auroc": auc,
            "sensitivity": float(p[flag].sum() / max(p.sum(), 1e-12)),
            "specificity": float((1 - p)[~flag].sum() / max((1 - p).sum(), 1e-12)),
            "prevalence": float(p.mean()),
        }


_METRICS = ("auroc", "sensitivity", "observed_expected", "calibration_slope")


def _bootstrap_counts(n: int, *, n_boot: int, seed: int, max_cells: int = 2**20) -> Iterator[np.ndarray]:
    """Bootstrap multiplicities, (replicates, rows) blocks of at most ``max_cells`` cells.

    The resamples are those of ``n_boot`` draws of ``rng.integers(0, n, n)`` from ``default_rng(seed)``:
    a block of draws continues the same stream, so the replicates do not depend on the block size.
    """
    rng = np.random.default_rng(seed)
    per_block = max(1, max_cells // max(n, 1))
    for first in range(0, n_boot, per_block):
        k = min(per_block, n_boot - first)
        idx = rng.integers(0, n, (k, n)) + n * np.arange(k)[:, None]
        yield np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)


def _weighted_auroc(y: np.ndarray, p: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AUROC of each resample given by a row of ``counts`` (Mann-Whitney with ties counted half).

    Equals :func:`auroc` on the repeated rows: a positive scores the weight of negatives with a lower risk
    plus half of those with the same risk. NaN where one class has no weight.
    """
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


def _bootstrap_replicates(
    y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """The four metrics on each of ``n_boot`` resamples of the rows, all replicates at once (NaN: undefined)."""
    y = np.asarray(y, dtype=bool)
    p = np.asarray(p, dtype=np.float64)
    events_flagged = (y & (p >= threshold)).astype(np.float64)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in _METRICS}
    for c in _bootstrap_counts(y.size, n_boot=n_boot, seed=seed):
        events = c @ y.astype(np.float64)
        expected = c @ p
        with np.errstate(divide="ignore", invalid="ignore"):
            parts["sensitivity"].append(np.where(events > 0, (c @ events_flagged) / events, np.nan))
            parts["observed_expected"].append(np.where(expected > 0, events / expected, np.nan))
        parts["auroc"].append(_weighted_auroc(y, p, c))
        parts["calibration_slope"].append(calibration_slopes_weighted(y, p, c))
    return {k: np.concatenate(v) if v else np.empty(0) for k, v in parts.items()}


def _percentile_ci(replicates: np.ndarray, *, n_boot: int, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the finite replicates; NaN when fewer than max(10, n_boot // 4) are finite."""
    vals = replicates[np.isfinite(replicates)]
    if vals.size < max(10, n_boot // 4):
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _metrics_with_ci(y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int, seed: int) -> dict:
    tp, _, _, fn = confusion(y, p, threshold)
    value = {
        "auroc": auroc(y, p),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "observed_expected": float(y.sum() / p.sum()) if p.sum() > 0 else float("nan"),
        "calibration_slope": calibration_slope_intercept(y, p)[0],
    }
    reps = _bootstrap_replicates(y, p, threshold, n_boot=n_boot, seed=seed)
    out = {}
    for name in _METRICS:
        v = value[name]
        lo, hi = _percentile_ci(reps[name], n_boot=n_boot) if np.isfinite(v) else (np.nan, np.nan)
        out[name] = {"value": float(v), "lower": lo, "upper": hi}
    return out


def performance_by_period(
    predictions: pl.DataFrame,
    *,
    threshold: float,
    estimator: ConfidenceBasedEstimator | None,
    config: MonitoringConfig,
    period_column: str = "batch_id",
    seed: int = 0,
) -> list[dict]:
    """Realised and estimated performance per period, overall and per subgroup.

    ``predictions`` holds ``predicted_risk``, ``label`` (null while unknown), ``matured`` and the
    subgroup columns. A period is ``mature`` when at least ``config.min_matured_share`` of its admissions
    have a known outcome; realised metrics use the matured admissions only, and are judged against the
    minimums when mature (ERROR when the CI lies wholly below a minimum or outside a range).
    """
    rows: list[dict] = []
    attrs = [a for a in config.subgroup_attributes if a in predictions.columns]
    slices: list[tuple[str, str, pl.Expr]] = [("all", "all", pl.lit(True))]
    slices += [
        (a, str(g), pl.col(a) == g)
        for a in attrs
        for g in sorted(predictions[a].drop_nulls().unique().to_list())
    ]
    for (period,), part in sorted(predictions.group_by(period_column), key=lambda t: str(t[0][0])):
        for i, (attr, group, expr) in enumerate(slices):
            s = part.filter(expr)
            if s.height == 0 or (attr != "all" and s.height < config.min_subgroup_rows):
                continue
            risk = s[PREDICTION_COLUMN].to_numpy().astype(np.float64)
            lab = s.filter(pl.col("matured") & pl.col("label").is_not_null())
            share = lab.height / s.height
            row: dict = {
                "period": str(period),
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
                row["realised"] = _metrics_with_ci(y, p, threshold, n_boot=config.n_bootstrap, seed=seed + i)
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


# --- plots ------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def drift_trend_plot(batches: Sequence[dict]) -> bytes:
    """Per batch: -log10 of the smallest drift p-value, coloured by level, and mean predicted risk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"ok": "#1f5fa8", "warn": "#d08a1a", "error": "#b33a3a"}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    xs = np.arange(len(batches))
    score = [
        min(-np.log10(max(min((f["p_min"] for f in b["features"]), default=1.0), 1e-300)), 50)
        for b in batches
    ]
    ax1.bar(xs, score, color=[colours[b["level"]] for b in batches])
    ax1.set_ylabel("-log10 smallest p")
    ax1.set_title("Drift per batch (red: ERROR, amber: WARN)")
    pm = [(b["prediction"] or {}).get("mean_current", np.nan) for b in batches]
    ax2.plot(xs, pm, marker="o", color="#1f5fa8", label="mean predicted risk")
    ref = next(((b["prediction"] or {}).get("mean_reference") for b in batches if b.get("prediction")), None)
    if ref is not None:
        ax2.axhline(ref, color="#888888", ls=":", label="derivation cohort")
    ax2.legend(fontsize=8)
    ax2.set_xticks(xs, [b["batch_id"][5:] for b in batches], rotation=90, fontsize=7)
    return _png(fig)


def performance_plot(rows: Sequence[dict]) -> bytes:
    """Realised AUROC with 95% CI per period (mature: filled) and the label-free estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = [r for r in rows if r["attribute"] == "all"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    xs = np.arange(len(overall))
    for x, r in zip(xs, overall, strict=True):
        if r["realised"]:
            a = r["realised"]["auroc"]
            if np.isfinite(a["value"]):
                ax.errorbar(
                    x,
                    a["value"],
                    yerr=[[a["value"] - a["lower"]], [a["upper"] - a["value"]]]
                    if np.isfinite(a["lower"])
                    else None,
                    fmt="o",
                    mfc="#1f5fa8" if r["status"] == "mature" else "white",
                    color="#1f5fa8",
                )
    est = [(r["estimated"] or {}).get("auroc", np.nan) for r in overall]
    ax.plot(xs, est, ls="--", color="#d08a1a", label="estimated (no labels, CBPE-like)")
    ax.set_xticks(xs, [r["period"][5:] for r in overall], rotation=90, fontsize=7)
    ax.set_ylabel("AUROC")
    ax.set_title("Realised AUROC (filled: labels mature; hollow: maturing)")
    ax.legend(fontsize=8)
    return _png(fig)


def monitoring_report(
    *,
    use_case,
    batches: Sequence[dict],
    performance: Sequence[dict],
    decisions: Sequence[dict],
    config: MonitoringConfig,
    model_version: str,
    code_version: str,
) -> tuple[str, str]:
    """HTML monitoring report and its Markdown summary (aggregates only)."""
    from clinical_ml.core.reports import b64, md_escape, render

    overall = [r for r in performance if r["attribute"] == "all"]
    subgroups = [r for r in performance if r["attribute"] != "all"]
    n_error = sum(b["level"] == "error" for b in batches)
    first_error = next((b["batch_id"] for b in batches if b["level"] == "error"), None)
    html = render(
        "monitoring.html.j2",
        title=f"{use_case.title}: monitoring",
        subtitle="Drift per batch against the derivation cohort, performance over time, decisions",
        batches=list(batches),
        overall=overall,
        subgroups=subgroups,
        decisions=list(decisions)[-20:],
        n_error=n_error,
        first_error=first_error,
        binning=config.drift.describe(),
        drift_plot=b64(drift_trend_plot(batches)) if batches else None,
        performance_plot=b64(performance_plot(performance)) if overall else None,
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=model_version,
        code_version=code_version,
    )
    lines = [
        f"### Monitoring of {md_escape(use_case.name)}",
        "",
        f"{len(batches)} batches monitored, {n_error} at ERROR"
        + (f" (first: {md_escape(first_error)})" if first_error else "")
        + ".",
        "",
        "| Batch | Level | Retraining requested | Top reason |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {md_escape(b['batch_id'])} | {b['level']} | {'yes' if b['retraining_requested'] else 'no'} | "
        f"{md_escape((b['reasons'] or [''])[0])} |"
        for b in batches[-15:]
    ]
    lines += ["", "| Period | Labels | Realised AUROC | Estimated AUROC |", "|---|---|---|---|"]
    for r in overall[-15:]:
        real = r["realised"]["auroc"]["value"] if r["realised"] else float("nan")
        est = (r["estimated"] or {}).get("auroc", float("nan"))
        lines.append(f"| {md_escape(r['period'])} | {r['status']} | {real:.3f} | {est:.3f} |")
    return html, "\n".join(lines) + "\n"
