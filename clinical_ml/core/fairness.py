"""Subcohort performance: does the model work as well for every group of patients?

fairlearn's ``MetricFrame`` computes the point estimates (the reference implementation); confidence
intervals come from a seeded percentile bootstrap within each group. Groups smaller than the use case's
minimum cell size are reported as suppressed, never dropped.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame

from clinical_ml.core.evaluation import auroc, confusion


def _sens(y, p_flag) -> float:
    tp, _, _, fn = confusion(np.asarray(y), np.asarray(p_flag, dtype=float), 0.5)
    return tp / (tp + fn) if tp + fn else float("nan")


def _spec(y, p_flag) -> float:
    _, fp, tn, _ = confusion(np.asarray(y), np.asarray(p_flag, dtype=float), 0.5)
    return tn / (tn + fp) if tn + fp else float("nan")


def _ppv(y, p_flag) -> float:
    tp, fp, _, _ = confusion(np.asarray(y), np.asarray(p_flag, dtype=float), 0.5)
    return tp / (tp + fp) if tp + fp else float("nan")


def _npv(y, p_flag) -> float:
    _, _, tn, fn = confusion(np.asarray(y), np.asarray(p_flag, dtype=float), 0.5)
    return tn / (tn + fn) if tn + fn else float("nan")


GROUP_METRICS = ("auroc", "sensitivity", "specificity", "ppv", "npv", "prevalence", "observed_expected_ratio")


@dataclass(frozen=True)
class SubgroupRow:
    attribute: str
    group: str
    n: int
    events: int
    suppressed: bool
    metrics: dict[str, tuple[float, float, float]]  # name -> (value, lower, upper)
    flags: tuple[str, ...]


def _group_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    tp, fp, tn, fn = confusion(y, p, threshold)
    return {
        "auroc": auroc(y, p),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "ppv": tp / (tp + fp) if tp + fp else float("nan"),
        "npv": tn / (tn + fn) if tn + fn else float("nan"),
        "prevalence": float(np.mean(y)),
        "observed_expected_ratio": float(np.sum(y) / np.sum(p)) if np.sum(p) else float("nan"),
    }


def reference_metric_frame(y: np.ndarray, p: np.ndarray, threshold: float, groups: pd.Series) -> MetricFrame:
    """fairlearn ``MetricFrame`` of the confusion-matrix metrics at the operating threshold."""
    flag = (np.asarray(p) >= threshold).astype(int)
    return MetricFrame(
        metrics={"sensitivity": _sens, "specificity": _spec, "ppv": _ppv, "npv": _npv},
        y_true=np.asarray(y).astype(int),
        y_pred=flag,
        sensitive_features=groups,
    )


def subgroup_table(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    attributes: dict[str, np.ndarray],
    *,
    min_cell_size: int = 11,
    auroc_min: float = 0.5,
    sensitivity_min: float = 0.0,
    n_boot: int = 300,
    seed: int = 0,
) -> list[SubgroupRow]:
    """Per-group metrics with 95% CIs for each attribute, plus "Overall".

    A group is flagged when the upper bound of its CI is below the use case's subgroup minimum (the
    evidence says it misses the bar), or below the lower bound of the overall estimate (worse than
    everyone else beyond chance).
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p)
    rng = np.random.default_rng(seed)
    overall = _with_ci(y, p, threshold, rng, n_boot)
    rows = [SubgroupRow("overall", "All patients", len(y), int(y.sum()), False, overall, ())]
    for attr, values in attributes.items():
        mf = reference_metric_frame(y, p, threshold, pd.Series(values, name=attr))
        for group in sorted(pd.unique(values).tolist(), key=str):
            mask = values == group
            n = int(mask.sum())
            ev = int(y[mask].sum())
            if n < min_cell_size or ev < 1 or (n - ev) < 1:
                rows.append(SubgroupRow(attr, str(group), n, ev, True, {}, ()))
                continue
            m = _with_ci(y[mask], p[mask], threshold, rng, n_boot)
            # the point estimates are fairlearn's: keep ours only for metrics MetricFrame does not compute
            for name in ("sensitivity", "specificity", "ppv", "npv"):
                ref = float(mf.by_group.loc[group, name])
                m[name] = (ref, m[name][1], m[name][2])
            flags = []
            if m["auroc"][2] < auroc_min:
                flags.append(f"AUROC below the subgroup minimum of {auroc_min:.2f}")
            elif m["auroc"][2] < overall["auroc"][1]:
                flags.append("AUROC lower than in all patients")
            if m["sensitivity"][2] < sensitivity_min:
                flags.append(f"sensitivity below the subgroup minimum of {sensitivity_min:.2f}")
            elif m["sensitivity"][2] < overall["sensitivity"][1]:
                flags.append("sensitivity lower than in all patients")
            rows.append(SubgroupRow(attr, str(group), n, ev, False, m, tuple(flags)))
    return rows


def _with_ci(y, p, threshold, rng, n_boot) -> dict[str, tuple[float, float, float]]:
    point = _group_metrics(y, p, threshold)
    reps: dict[str, list[float]] = {k: [] for k in point}
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for k, v in _group_metrics(y[idx], p[idx], threshold).items():
            reps[k].append(v)
    out = {}
    for k, v in point.items():
        r = np.asarray(reps[k])
        r = r[np.isfinite(r)]
        lo, hi = np.quantile(r, [0.025, 0.975]) if r.size else (np.nan, np.nan)
        out[k] = (float(v), float(lo), float(hi))
    return out


def verdict(rows: list[SubgroupRow]) -> tuple[str, list[str]]:
    """``pass`` when no group is flagged, ``fail`` when a group misses a use-case minimum, else ``review``."""
    reasons = [f"{r.attribute} = {r.group}: {f}" for r in rows for f in r.flags]
    if any("minimum" in reason for reason in reasons):
        return "fail", reasons
    if reasons:
        return "review", reasons
    return "pass", ["every audited group of adequate size meets the subgroup minimums"]
