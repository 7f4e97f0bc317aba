"""The data quality pages: one per batch and the trend over batches, with their Markdown summaries.

Every value reaches the page through Jinja2 with autoescaping on (see :mod:`clinical_ml.core.reports`), so a site
or code name from a delivered file is text, never markup; the Markdown summaries escape with ``md_escape``.
"""

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from clinical_ml.core.quality import (
    SOURCES,
    CodeProfile,
    QualityProfile,
    QualityTrend,
    TrendFlag,
    TrendThresholds,
    rules_over_share,
    series,
)
from clinical_ml.core.reports import b64, md_escape, render
from clinical_ml.core.units import LAB_CODES, VITAL_CODES

SOURCE_TITLES = {"labs": "Laboratory results", "vitals": "Vital signs"}


def code_label(source: str, code: str) -> str:
    """A code in plain words with its unit: ``creatinine, mg/dL (2160-0)``; an unknown code as it is."""
    entry = (LAB_CODES if source == "labs" else VITAL_CODES).get(code)
    return f"{entry[0]}, {entry[1]} ({code})" if entry else code


def _fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def _flag_label(flag: TrendFlag, profile_rules: dict[str, str]) -> str:
    if flag.kind == "new_rule_violation":
        return profile_rules.get(flag.code, flag.code)
    return code_label(flag.source, flag.code)


def _code_row(c: CodeProfile) -> dict:
    q = c.value_quantiles
    return {
        "label": code_label(c.source, c.code),
        "rows": c.rows,
        "with_value": f"{c.encounters_with_value} of {c.encounters_at_site} ({_percent(1 - c.missing_share)})",
        "suppressed": q is None and c.median_interval_hours is None and c.delay_median_minutes is None,
        "interval": "one value per stay"
        if c.median_interval_hours is None
        else f"{c.median_interval_hours:.1f} h",
        "delay": f"{_fmt(c.delay_median_minutes, 0)} / {_fmt(c.delay_p90_minutes, 0)} min",
        "quantiles": "n/a" if q is None else ", ".join(f"{v:.3g}" for v in q),
        "implausible": f"{c.implausible_rows} ({_percent(c.implausible_share)})",
        "duplicates": c.duplicate_rows,
    }


def profile_page(
    profile: QualityProfile,
    flags: Sequence[TrendFlag],
    *,
    thresholds: TrendThresholds,
    earlier_batches: int,
    code_version: str = "",
) -> str:
    """The HTML page of one batch's quality profile and what changed against the earlier batches."""
    rule_words = {r.name: r.words for r in profile.rule_words}
    over = {(r.rule, r.site) for r in rules_over_share(profile, max_share=thresholds.max_violation_share)}
    blocks = [
        {
            "title": f"{SOURCE_TITLES.get(source, source)} at site {site.site}",
            "delay_words": SOURCES[source].delay_words.capitalize(),
            "rows": [_code_row(c) for c in profile.codes if c.source == source and c.site == site.site],
        }
        for source in SOURCES
        for site in profile.sites
    ]
    return render(
        "quality.html.j2",
        title=f"Data quality of batch {profile.batch_id}",
        subtitle="Per source, hospital site and measurement, from the rows ingestion accepted.",
        batch_id=profile.batch_id,
        min_cell=profile.min_cell_patients,
        n_flags=len(flags),
        n_rules_over=len(over),
        max_violation_percent=f"{100 * thresholds.max_violation_share:g}",
        interval_factor=f"{thresholds.interval_factor:g}",
        missing_points=f"{thresholds.missing_points:g}",
        compared=thresholds.compares(earlier_batches),
        compared_words=compared_words(earlier_batches, thresholds),
        sites=[s.as_dict() for s in profile.sites],
        sources=[s.as_dict() for s in profile.sources],
        flags=[{"site": f.site, "label": _flag_label(f, rule_words), "words": f.words} for f in flags],
        rules=[
            {
                "words": rule_words.get(r.rule, r.rule),
                "site": r.site,
                "pairs": r.pairs,
                "violations": r.violations,
                "share": _percent(r.violation_share),
                "over": (r.rule, r.site) in over,
            }
            for r in profile.rules
        ],
        blocks=[b for b in blocks if b["rows"]],
        code_version=code_version,
    )


def compared_words(earlier_batches: int, thresholds: TrendThresholds) -> str:
    """Why a batch was not compared with earlier ones (too few earlier profiles)."""
    return (
        f"Not compared with earlier batches: {earlier_batches} earlier batch profiles, "
        f"{thresholds.min_earlier_batches} needed."
    )


def profile_markdown(
    profile: QualityProfile,
    flags: Sequence[TrendFlag],
    *,
    thresholds: TrendThresholds,
    earlier_batches: int | None = None,
) -> str:
    """The Markdown summary of a batch's profile for the asset's metadata (names of sites and codes only).
    With ``earlier_batches`` below the number needed, it says that nothing was compared."""
    rule_words = {r.name: r.words for r in profile.rule_words}
    over = rules_over_share(profile, max_share=thresholds.max_violation_share)
    changes = (
        "not compared with earlier batches"
        if earlier_batches is not None and not thresholds.compares(earlier_batches)
        else f"{len(flags)} changes against earlier batches"
    )
    lines = [
        f"**Data quality of batch {md_escape(profile.batch_id)}**: {len(profile.sites)} sites, "
        f"{len(profile.codes)} measurements profiled, {changes}, "
        f"{len(over)} cross-code checks broken in more than {100 * thresholds.max_violation_share:g}% of pairs.",
        "",
    ]
    lines += [
        f"- site {md_escape(f.site)}, {md_escape(_flag_label(f, rule_words))}: {f.words}" for f in flags
    ]
    lines += [
        f"- site {md_escape(r.site)}: {md_escape(rule_words.get(r.rule, r.rule))} broken in "
        f"{r.violations} of {r.pairs} pairs"
        for r in over
    ]
    return "\n".join(lines)


MAX_TICK_LABELS = 12
"""A series plot names at most this many batches on its axis (every k-th): a year of daily batches cannot be
read at the plot's width, and laying out every label cost seconds per plot."""


def _tick_step(n: int) -> int:
    return max(1, -(-n // MAX_TICK_LABELS))


def _series_plot(batch_ids: Sequence[str], panels: dict[str, list[float | None]], title: str) -> bytes:
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    x = list(range(len(batch_ids)))
    for ax, (name, ys) in zip(axes[0], panels.items(), strict=True):
        pts = [(i, y) for i, y in zip(x, ys, strict=True) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="#1f5fa8")
        ax.set_title(name, fontsize=9)
        ticks = x[:: _tick_step(len(x))]
        ax.set_xticks(ticks, [batch_ids[i] for i in ticks], rotation=45, ha="right", fontsize=7)
    fig.suptitle(title.replace("$", r"\$"), fontsize=9)  # delivered text is never mathtext
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def trend_plots(profiles: Sequence[QualityProfile], trend: QualityTrend) -> list[tuple[str, bytes]]:
    """One small plot per flagged measurement (site, code) or check (site, rule), over every batch."""
    ordered = sorted(profiles, key=lambda p: p.batch_id)
    batch_ids = [p.batch_id for p in ordered]
    rule_words = {r.name: r.words for p in ordered for r in p.rule_words}
    out: list[tuple[str, bytes]] = []
    seen: set[tuple[str, str, str, bool]] = set()
    for f in trend.flags:
        is_rule = f.kind == "new_rule_violation"
        key = (f.source, f.site, f.code, is_rule)
        if key in seen:
            continue
        seen.add(key)
        if is_rule:
            shares: list[float | None] = []
            for p in ordered:
                r = next((r for r in p.rules if (r.rule, r.site) == (f.code, f.site)), None)
                shares.append(None if r is None else 100 * r.violation_share)
            title = f"site {f.site}: {rule_words.get(f.code, f.code)}"
            out.append((title, _series_plot(batch_ids, {"% of pairs that disagree": shares}, title)))
        else:
            s = series(ordered, (f.source, f.site, f.code))
            title = f"site {f.site}: {code_label(f.source, f.code)}"
            panels = {
                "median hours between values": s["median_interval_hours"],
                "% of stays without a value": s["missing_percent"],
            }
            out.append((title, _series_plot(batch_ids, panels, title)))
    return out


def trend_page(
    profiles: Sequence[QualityProfile],
    trend: QualityTrend,
    *,
    thresholds: TrendThresholds,
    code_version: str = "",
) -> str:
    """The HTML page of every batch's changes against the batches before it, with a plot per flagged code."""
    rule_words = {r.name: r.words for p in profiles for r in p.rule_words}
    by_batch = {p.batch_id: p for p in profiles}
    return render(
        "quality_trend.html.j2",
        title="Data quality over batches",
        subtitle="Each batch against the batches delivered before it, per hospital site and measurement.",
        interval_factor=f"{thresholds.interval_factor:g}",
        missing_points=f"{thresholds.missing_points:g}",
        n_batches=len(trend.batch_ids),
        flags=[
            {"batch_id": f.batch_id, "site": f.site, "label": _flag_label(f, rule_words), "words": f.words}
            for f in trend.flags
        ],
        plots=[{"png": b64(png), "alt": title} for title, png in trend_plots(profiles, trend)],
        batches=[
            {
                "batch_id": b,
                "encounters": sum(s.encounters for s in by_batch[b].sites),
                "flags": sum(1 for f in trend.flags if f.batch_id == b),
            }
            for b in trend.batch_ids
        ],
        code_version=code_version,
    )


def trend_markdown(trend: QualityTrend, profiles: Sequence[QualityProfile]) -> str:
    rule_words = {r.name: r.words for p in profiles for r in p.rule_words}
    lines = [f"**Data quality over {len(trend.batch_ids)} batches**: {len(trend.flags)} changes flagged.", ""]
    lines += [
        f"- batch {md_escape(f.batch_id)}, site {md_escape(f.site)}, {md_escape(_flag_label(f, rule_words))}: "
        f"{f.words}"
        for f in trend.flags[:30]
    ]
    return "\n".join(lines)
