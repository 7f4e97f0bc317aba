"""PNG plots for reports (matplotlib, headless). Each function returns PNG bytes."""

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from clinical_ml.core.display_names import display_name
from clinical_ml.core.usecase import DeathOutcome, OutcomeWords, outcome_words

# The words of plots drawn without a use case: the mortality question's (deaths, survivors).
DEFAULT_WORDS = outcome_words(DeathOutcome(type="death", description="death before hospital discharge"))

_BLUE, _GREY, _RED = "#1f5fa8", "#888888", "#b33a3a"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # "tight" keeps axis labels and legends placed outside the axes inside the image
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", pad_inches=0.08)
    plt.close(fig)
    return buf.getvalue()


def _legend_outside(ax) -> None:
    """The legend beside the axes (right), so that it covers neither data nor the axis label."""
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def roc_plot(y: np.ndarray, p: np.ndarray, *, threshold: float, words: OutcomeWords | None = None) -> bytes:
    """ROC curve with the operating point; axes name the outcome by ``words`` (the use case's)."""
    w = words or DEFAULT_WORDS
    y = np.asarray(y, dtype=bool)
    order = np.argsort(-np.asarray(p))
    ys = y[order]
    tpr = np.concatenate([[0], np.cumsum(ys) / max(ys.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(~ys) / max((~ys).sum(), 1)])
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, color=_BLUE, label="model")
    ax.plot([0, 1], [0, 1], color=_GREY, ls="--", label="chance")
    flag = np.asarray(p) >= threshold
    ax.scatter(
        [(flag & ~y).sum() / max((~y).sum(), 1)],
        [(flag & y).sum() / max(y.sum(), 1)],
        color=_RED,
        zorder=3,
        label="operating point",
    )
    ax.set_xlabel(f"1 - specificity (false alarms among {w.non_events})")
    ax.set_ylabel(f"sensitivity ({w.events} flagged)")
    ax.set_title("ROC curve, validation cohort")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def calibration_plot(curve: list[dict[str, float]], *, words: OutcomeWords | None = None) -> bytes:
    """Observed vs predicted risk per bin with 95% CIs; axes name the outcome by ``words``."""
    w = words or DEFAULT_WORDS
    fig, ax = plt.subplots(figsize=(4.2, 4))
    pred = [r["predicted"] for r in curve]
    obs = [r["observed"] for r in curve]
    err = [
        [max(0.0, r["observed"] - r["lower"]) for r in curve],
        [max(0.0, r["upper"] - r["observed"]) for r in curve],
    ]
    top = max([*pred, *obs, 0.1]) * 1.1
    ax.plot([0, top], [0, top], color=_GREY, ls="--", label="perfect calibration")
    ax.errorbar(pred, obs, yerr=err, fmt="o-", color=_BLUE, capsize=3, label="observed (95% CI)")
    ax.set_xlabel(f"predicted risk of {w.event}")
    ax.set_ylabel(f"observed proportion of {w.with_event}")
    ax.set_title("Calibration, validation cohort")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def decision_curve_plot(curve: list[dict[str, float]]) -> bytes:
    fig, ax = plt.subplots(figsize=(4.8, 4))
    t = [r["threshold"] for r in curve]
    ax.plot(t, [r["model"] for r in curve], color=_BLUE, label="use the model")
    ax.plot(t, [r["treat_all"] for r in curve], color=_RED, ls=":", label="review every patient")
    ax.plot(t, [0 for _ in curve], color=_GREY, ls="--", label="review no one")
    lo = min(0.0, min(r["model"] for r in curve))
    ax.set_ylim(lo - 0.01, max(max(r["model"] for r in curve), max(r["treat_all"] for r in curve)) + 0.02)
    ax.set_xlabel("risk threshold at which a review is worthwhile")
    ax.set_ylabel("net benefit")
    ax.set_title("Decision curve, validation cohort")
    ax.legend(fontsize=8)
    return _png(fig)


def importance_plot(importance: list[dict], *, top: int = 12) -> bytes:
    rows = importance[:top][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.4))
    names = [display_name(str(r["feature"])) if "feature" in r else str(r["label"]) for r in rows]
    ax.barh(names, [r["mean_abs_shap"] for r in rows], color=_BLUE)
    ax.set_xlabel("average influence on predicted risk\n(mean |SHAP|, in log-odds)")
    ax.set_title("What the model relies on most")
    return _png(fig)


def forest_plot(
    rows: list[dict], *, metric: str, overall: tuple[float, float, float], minimum: float | None
) -> bytes:
    """Point estimate and 95% CI per subgroup; ``rows`` have ``label`` and ``value``/``lower``/``upper``."""
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1.4))
    ys = np.arange(len(rows))[::-1]
    for yv, r in zip(ys, rows, strict=True):
        color = _RED if r.get("flagged") else _BLUE
        ax.plot([r["lower"], r["upper"]], [yv, yv], color=color)
        ax.plot([r["value"]], [yv], "o", color=color)
    ax.axvline(overall[0], color=_GREY, ls="--", label="all patients")
    if minimum is not None:
        ax.axvline(minimum, color=_RED, ls=":", label="subgroup minimum")
    ax.set_yticks(ys, [r["label"] for r in rows])
    ax.set_xlabel(f"{metric} (95% CI)")
    _legend_outside(ax)
    return _png(fig)


def drift_plot(names: list[str], values: list[float], *, warn: float, error: float) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(names) + 1.2))
    colors = [_RED if v >= error else "#d08a1a" if v >= warn else _BLUE for v in values]
    ax.barh(names[::-1], values[::-1], color=colors[::-1])
    ax.axvline(warn, color="#d08a1a", ls=":", label=f"warning ({warn})")
    ax.axvline(error, color=_RED, ls=":", label=f"action ({error})")
    ax.set_xlabel("population stability index (PSI)")
    _legend_outside(ax)
    return _png(fig)


def subgroup_forest_plot(
    rows: list,
    *,
    metric: str,
    title: str,
    overall: tuple[float, float, float],
    minimum: float | None = None,
) -> bytes:
    """Forest plot of one metric over the groups of an attribute (``SubgroupRow``); suppressed groups are
    listed with the word "suppressed" instead of an estimate, so no group silently disappears."""
    fig, ax = plt.subplots(figsize=(6.4, 0.3 * len(rows) + 1.5))
    ys = np.arange(len(rows))[::-1]
    labels = []
    for yv, r in zip(ys, rows, strict=True):
        if r.suppressed:
            labels.append(f"{r.group} (suppressed)")
            continue
        v, lo, hi = r.metrics[metric]
        color = _RED if r.flags else _BLUE
        ax.plot([lo, hi], [yv, yv], color=color)
        ax.plot([v], [yv], "o", color=color)
        labels.append(f"{r.group} (n={r.n})")
    ax.axvline(overall[0], color=_GREY, ls="--", label="all patients")
    if minimum is not None:
        ax.axvline(minimum, color=_RED, ls=":", label="subgroup minimum")
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"{metric} (95% CI); red = flagged")
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return _png(fig)


def ratio_forest_plot(
    rows: list,
    *,
    metric: str,
    label: str,
    title: str,
    overall: tuple[float, float, float],
    acceptable: tuple[float, float],
) -> bytes:
    """Forest plot of a ratio (e.g. observed/expected) over the groups of an attribute, on a log scale
    around parity, with the acceptable range shaded. ``rows`` are ``SubgroupRow``; a group whose whole interval
    lies outside the range is red; suppressed groups are listed as such, so no group silently disappears."""
    fig, ax = plt.subplots(figsize=(6.4, 0.3 * len(rows) + 1.5))
    ys = np.arange(len(rows))[::-1]
    labels = []
    ends: list[float] = [acceptable[0], acceptable[1]]
    for yv, r in zip(ys, rows, strict=True):
        v, lo, hi = r.metrics.get(metric, (np.nan, np.nan, np.nan)) if not r.suppressed else (np.nan,) * 3
        if r.suppressed or not (np.isfinite(v) and v > 0):
            labels.append(f"{r.group} ({'suppressed' if r.suppressed else 'no estimate'})")
            continue
        lo = lo if np.isfinite(lo) and lo > 0 else v
        hi = hi if np.isfinite(hi) else v
        color = _RED if lo > acceptable[1] or hi < acceptable[0] else _BLUE
        ax.plot([lo, hi], [yv, yv], color=color)
        ax.plot([v], [yv], "o", color=color)
        ends += [lo, hi]
        labels.append(f"{r.group} (n={r.n})")
    ax.axvspan(acceptable[0], acceptable[1], color=_GREY, alpha=0.15, label="acceptable range")
    ax.axvline(1.0, color=_GREY, lw=0.8)
    if np.isfinite(overall[0]) and overall[0] > 0:
        ax.axvline(overall[0], color=_GREY, ls="--", label="all patients")
    ax.set_xscale("log")
    low, high = min(ends) / 1.15, max(ends) * 1.15
    ax.set_xlim(low, high)
    ticks = [t for t in (0.25, 0.5, 0.67, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yticks(ys, labels, fontsize=8)
    ax.set_xlabel(f"{label} (95% CI, log scale); red = whole interval outside the acceptable range")
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return _png(fig)


MAX_BATCH_LABELS = 40
"""A plot over batches names at most this many on its axis (every k-th): more cannot be read at the plot's
width, and laying out a label per batch of a year of daily batches cost seconds per plot."""


def _tick_step(n: int) -> int:
    return max(1, -(-n // MAX_BATCH_LABELS))


def drift_trend_plot(batches: Sequence[dict]) -> bytes:
    """Per batch: -log10 of the smallest drift p-value, coloured by level, and mean predicted risk."""
    colours = {"ok": _BLUE, "warn": "#d08a1a", "error": _RED}
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
    ax2.plot(xs, pm, marker="o", color=_BLUE, label="mean predicted risk")
    ref = next(((b["prediction"] or {}).get("mean_reference") for b in batches if b.get("prediction")), None)
    if ref is not None:
        ax2.axhline(ref, color=_GREY, ls=":", label="derivation cohort")
    # from zero: a change of 0.159 to 0.181 must look like the 14% it is, not like a spike
    top = np.nanmax([*pm, ref if ref is not None else np.nan, 0.0])
    ax2.set_ylim(0, max(top * 1.15, 0.05))
    ax2.set_ylabel("mean predicted risk")
    ax2.legend(fontsize=8, loc="lower left", ncol=2)
    named = xs[:: _tick_step(len(xs))]
    ax2.set_xticks(named, [batches[i]["batch_id"][5:] for i in named], rotation=90, fontsize=7)
    return _png(fig)


def performance_plot(rows: Sequence[dict]) -> bytes:
    """Realised AUROC with 95% CI per period (mature: filled) and the label-free estimate."""
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
                    mfc=_BLUE if r["status"] == "mature" else "white",
                    color=_BLUE,
                )
    est = [(r["estimated"] or {}).get("auroc", np.nan) for r in overall]
    ax.plot(xs, est, ls="--", color="#d08a1a", label="estimated (no labels, CBPE-like)")
    named = xs[:: _tick_step(len(xs))]
    ax.set_xticks(named, [overall[i]["period"][5:] for i in named], rotation=90, fontsize=7)
    ax.set_ylabel("AUROC")
    # the whole scale from chance (0.5) to perfect, so that a small change looks small
    lows = [v for r in overall if r["realised"] for v in (r["realised"]["auroc"]["lower"],) if np.isfinite(v)]
    ax.set_ylim(min([0.5, *[v - 0.05 for v in lows], *[v - 0.05 for v in est if np.isfinite(v)]]), 1.02)
    ax.set_title("Realised AUROC (filled: labels mature; hollow: maturing)")
    # beside the axes: the rotated period labels take the space below
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(fig)
