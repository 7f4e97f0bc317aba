"""The drift check of one batch of a deployed model against its derivation cohort.

:func:`prepare_reference` profiles the derivation cohort once; :func:`monitor_batch` tests every predictor
(numeric and categorical), missingness, the prediction distribution and, once labels are known, the label
prevalence, overall and per subgroup, with a per-batch false alarm budget (see :mod:`clinical_ml.core.drift`).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from clinical_ml.core.drift import (
    FeatureDrift,
    ReferenceProfile,
    batch_drift,
    drift_reason,
    n_tests_for,
    reference_profile,
    worst_level,
)
from clinical_ml.core.features import CATEGORICAL_STATIC
from clinical_ml.core.monitoring_config import MonitoringConfig

PREDICTION_COLUMN = "predicted_risk"


# --- columns ----------------------------------------------------------------------------------------


def split_columns(columns: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Numeric predictors and one-hot groups (``sex__f``, ``sex__m`` -> categorical ``sex``)."""
    numeric: list[str] = []
    groups: dict[str, list[str]] = {}
    for c in columns:
        stem = c.partition("__")[0]
        if stem in CATEGORICAL_STATIC and "__" in c:
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
            "features": [d.as_dict() for d in self.features],
            "prediction": self.prediction.as_dict() if self.prediction else None,
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

    reasons = [drift_reason(d, statistics=config.drift.selected) for d in drift if d.level != "ok"][:10]
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
