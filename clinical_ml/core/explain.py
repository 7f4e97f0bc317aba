"""SHAP explanations of a tree model: global importance and per-patient reasons in plain words."""

import warnings

import numpy as np
import shap

from clinical_ml.core.modeling import TrainedModel

_AGG_WORDS = {
    "last": "latest",
    "min": "lowest",
    "max": "highest",
    "mean": "average",
    "count": "number of measurements of",
    "slope": "trend of",
    "time_since_last": "hours since last",
    "missing": "no measurement of",
}


def feature_label(feature: str) -> str:
    """Plain words for a feature column: ``lactate__max_24h`` -> ``highest lactate (last 24 h)``."""
    stem, _, rest = feature.partition("__")
    if not rest:
        return stem.replace("_", " ")
    if stem in ("sex", "admission_type", "unit"):
        return f"{stem.replace('_', ' ')}: {rest.replace('_', ' ')}"
    agg, _, window = rest.rpartition("_")
    words = _AGG_WORDS.get(agg, agg)
    window_words = f" (last {window.removesuffix('h')} h)" if window.endswith("h") else ""
    return f"{words} {stem.replace('_', ' ')}{window_words}"


def shap_values(
    model: TrainedModel, x: np.ndarray, *, max_rows: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """SHAP values (log-odds contributions) for up to ``max_rows`` rows sampled without replacement.

    Returns the sampled row indices and the SHAP matrix (rows x features).
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), size=min(max_rows, len(x)), replace=False))
    explainer = shap.TreeExplainer(model.booster)
    with warnings.catch_warnings():
        # shap notes that LightGBM binary output changed shape across versions; handled just below
        warnings.filterwarnings("ignore", message="LightGBM binary classifier", category=UserWarning)
        values = explainer.shap_values(x[idx])
    values = values[1] if isinstance(values, list) else values
    return idx, np.asarray(values)


def global_importance(values: np.ndarray, feature_names: list[str]) -> list[dict[str, float | str]]:
    """Mean absolute SHAP value per feature, largest first."""
    mean_abs = np.abs(values).mean(axis=0)
    order = np.argsort(-mean_abs)
    return [
        {
            "feature": feature_names[i],
            "label": feature_label(feature_names[i]),
            "mean_abs_shap": float(mean_abs[i]),
        }
        for i in order
    ]


def top_reasons(
    contributions: np.ndarray, row: np.ndarray, feature_names: list[str], *, k: int = 3
) -> list[dict[str, float | str | None]]:
    """The ``k`` features pushing this patient's risk up the most, with their values, in plain words."""
    order = np.argsort(-contributions)[:k]
    out = []
    for i in order:
        if contributions[i] <= 0:
            break
        v = row[i]
        label = feature_label(feature_names[i])
        value = None if not np.isfinite(v) else float(v)
        out.append(
            {
                "feature": feature_names[i],
                "label": label,
                "value": value,
                "contribution": float(contributions[i]),
                "text": reason_text(label, value),
            }
        )
    return out


def reason_text(label: str, value: float | None) -> str:
    """One reason as a clinician reads it: ``highest lactate (last 24 h) was 4.2, which raises the risk``."""
    if value is None:
        return f"{label}: not measured, which raises the risk"
    shown = f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{label} was {shown}, which raises the risk"
