"""Has the newest batch moved away from the derivation cohort? PSI and KS per feature.

PSI uses the reference's deciles as bin edges (so every reference bin holds ~10% of its values) plus one
bin for missing values, so a change in how often something is measured counts as drift too. KS is the
two-sample Kolmogorov-Smirnov statistic on the observed values; PSI alone misses modest mean shifts.
"""

from dataclasses import dataclass

import numpy as np
from scipy import stats

PSI_WARN = 0.1
PSI_ERROR = 0.25


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    ks_statistic: float
    ks_pvalue: float
    missing_reference: float
    missing_current: float
    mean_reference: float
    mean_current: float
    level: str  # ok | warn | error


def psi(reference: np.ndarray, current: np.ndarray, *, n_bins: int = 10) -> float:
    """Population stability index with reference-quantile bins and a missing-value bin."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    ref_obs = ref[np.isfinite(ref)]
    cur_obs = cur[np.isfinite(cur)]
    if ref_obs.size:
        edges = np.unique(np.quantile(ref_obs, np.linspace(0, 1, n_bins + 1))[1:-1])
        ref_counts = np.bincount(np.searchsorted(edges, ref_obs, side="right"), minlength=edges.size + 1)
        cur_counts = np.bincount(np.searchsorted(edges, cur_obs, side="right"), minlength=edges.size + 1)
    else:
        ref_counts = cur_counts = np.zeros(1, dtype=int)
        cur_counts = np.array([cur_obs.size])
    ref_counts = np.append(ref_counts, ref.size - ref_obs.size)
    cur_counts = np.append(cur_counts, cur.size - cur_obs.size)
    # a small floor avoids log(0) for empty bins (the usual 1e-4 convention)
    r = np.maximum(ref_counts / max(ref.size, 1), 1e-4)
    c = np.maximum(cur_counts / max(cur.size, 1), 1e-4)
    return float(np.sum((c - r) * np.log(c / r)))


def feature_drift(
    reference: np.ndarray,
    current: np.ndarray,
    feature_names: list[str],
    *,
    warn: float = PSI_WARN,
    error: float = PSI_ERROR,
    ks_alpha: float = 0.05,
) -> list[FeatureDrift]:
    """Drift of every feature column, largest PSI first.

    The KS test is Bonferroni-corrected over features; a significant KS alone raises a warning.
    """
    out = []
    m = len(feature_names)
    for j, name in enumerate(feature_names):
        r, c = reference[:, j], current[:, j]
        ro, co = r[np.isfinite(r)], c[np.isfinite(c)]
        value = psi(r, c)
        if ro.size > 1 and co.size > 1:
            ks = stats.ks_2samp(ro, co)
            ks_stat, ks_p = float(ks.statistic), float(ks.pvalue)
        else:
            ks_stat, ks_p = float("nan"), float("nan")
        level = "error" if value >= error else "warn" if value >= warn or (ks_p < ks_alpha / m) else "ok"
        out.append(
            FeatureDrift(
                feature=name,
                psi=value,
                ks_statistic=ks_stat,
                ks_pvalue=ks_p,
                missing_reference=float(1 - ro.size / max(r.size, 1)),
                missing_current=float(1 - co.size / max(c.size, 1)),
                mean_reference=float(ro.mean()) if ro.size else float("nan"),
                mean_current=float(co.mean()) if co.size else float("nan"),
                level=level,
            )
        )
    return sorted(out, key=lambda d: -d.psi)
