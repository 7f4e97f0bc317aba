"""A data quality profile of one delivered batch, per source, site and code, and its trend over batches.

The profile is computed in the phi zone from the batch's accepted rows and holds aggregates only: counts,
shares and quantiles per (source, site, code). No identifier and no delivered text value leaves this module;
the site and code names are the vocabulary's and the hospital's codes. Distribution summaries (value quantiles,
sampling intervals, times to result) of a cell with fewer than ``min_cell_patients`` patients are left out
(``None``), so a summary never describes one or two people; counts stay, as they say nothing about who.

Cross-code plausibility rules are data (:data:`PLAUSIBILITY_RULES`): two codes of one encounter measured at the
same time, the first never below the second. A hospital passes its own tuple of :class:`PlausibilityRule`.
"""

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import polars as pl

# The small-cell minimum of the de-identified exports (DESIGN.md: k >= 11 for export).
MIN_CELL_PATIENTS = 11
# Reject reasons of ingestion that mean a row was delivered twice (see ingestion.DUPLICATE_KEYS).
DUPLICATE_REASONS = ("duplicate_row", "conflicting_duplicate", "superseded")
VALUE_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
UNKNOWN_SITE = "unknown"


@dataclass(frozen=True)
class SourceSpec:
    """Where a measurement source keeps its code, its event time and the time the value became known."""

    code: str
    event_time: str
    known_time: str
    delay_words: str


SOURCES: dict[str, SourceSpec] = {
    "labs": SourceSpec("loinc_code", "specimen_time", "result_time", "time from sample to result"),
    "vitals": SourceSpec("code", "charted_time", "stored_time", "time from charting to storage"),
}


@dataclass(frozen=True)
class PlausibilityRule:
    """Two codes of one encounter measured at the same time: ``upper`` must not be below ``lower``."""

    name: str
    source: str
    upper: str
    lower: str
    words: str

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "PlausibilityRule":
        return cls(**{k: str(d[k]) for k in ("name", "source", "upper", "lower", "words")})


def _blood_pressure_rules(method: str, words: str) -> tuple[PlausibilityRule, ...]:
    """Systolic >= mean >= diastolic for the pressures of one method (``""``, ``"_invasive"``,
    ``"_noninvasive"``): an arterial line and a cuff at the same minute are two measurements, never compared."""
    s, d, m = (f"{p}_bp{method}" for p in ("systolic", "diastolic", "mean"))
    return (
        PlausibilityRule(
            f"systolic_at_least_diastolic{method}", "vitals", s, d,
            f"systolic blood pressure{words} at least the diastolic pressure{words} charted at the same time",
        ),
        PlausibilityRule(
            f"mean_bp_at_most_systolic{method}", "vitals", s, m,
            f"mean arterial pressure{words} at most the systolic pressure{words} charted at the same time",
        ),
        PlausibilityRule(
            f"mean_bp_at_least_diastolic{method}", "vitals", m, d,
            f"mean arterial pressure{words} at least the diastolic pressure{words} charted at the same time",
        ),
    )  # fmt: skip


PLAUSIBILITY_RULES: tuple[PlausibilityRule, ...] = (
    *_blood_pressure_rules("", ""),
    *_blood_pressure_rules("_invasive", " (arterial line)"),
    *_blood_pressure_rules("_noninvasive", " (cuff)"),
    PlausibilityRule(
        "hdl_at_most_total_cholesterol", "labs", "2093-3", "2085-9",
        "HDL cholesterol at most the total cholesterol of the same sample",
    ),
    PlausibilityRule(
        "direct_bilirubin_at_most_total", "labs", "1975-2", "1968-7",
        "direct bilirubin at most the total bilirubin of the same sample",
    ),
)  # fmt: skip


@dataclass(frozen=True)
class CodeProfile:
    """One code at one site in one batch. Distribution fields are ``None`` for a small cell or no data."""

    source: str
    site: str
    code: str
    rows: int
    patients: int
    encounters_with_value: int
    encounters_at_site: int
    implausible_rows: int
    duplicate_rows: int
    median_interval_hours: float | None
    delay_median_minutes: float | None
    delay_p90_minutes: float | None
    value_quantiles: tuple[float, ...] | None

    @property
    def missing_share(self) -> float:
        """Share of the site's encounters of the batch without a single value of this code."""
        if self.encounters_at_site == 0:
            return 1.0
        return 1.0 - self.encounters_with_value / self.encounters_at_site

    @property
    def implausible_share(self) -> float:
        return self.implausible_rows / self.rows if self.rows else 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.site, self.code)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["value_quantiles"] = None if self.value_quantiles is None else list(self.value_quantiles)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "CodeProfile":
        q = d.get("value_quantiles")

        def timing(k: str) -> float | None:
            return None if d.get(k) is None else float(d[k])

        return cls(
            source=str(d["source"]),
            site=str(d["site"]),
            code=str(d["code"]),
            rows=int(d["rows"]),
            patients=int(d["patients"]),
            encounters_with_value=int(d["encounters_with_value"]),
            encounters_at_site=int(d["encounters_at_site"]),
            implausible_rows=int(d["implausible_rows"]),
            duplicate_rows=int(d["duplicate_rows"]),
            median_interval_hours=timing("median_interval_hours"),
            delay_median_minutes=timing("delay_median_minutes"),
            delay_p90_minutes=timing("delay_p90_minutes"),
            value_quantiles=None if q is None else tuple(float(x) for x in q),
        )


@dataclass(frozen=True)
class RuleResult:
    """How often a cross-code rule held at one site: pairs measured at the same time, pairs violating it."""

    rule: str
    site: str
    pairs: int
    violations: int

    @property
    def violation_share(self) -> float:
        return self.violations / self.pairs if self.pairs else 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RuleResult":
        return cls(str(d["rule"]), str(d["site"]), int(d["pairs"]), int(d["violations"]))


@dataclass(frozen=True)
class SourceRejects:
    """A source's rows of the batch as ingestion judged them, from its rejects (no value, only reasons)."""

    source: str
    rows_accepted: int
    rows_rejected: int
    duplicates_rejected: int

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SourceRejects":
        return cls(
            str(d["source"]), int(d["rows_accepted"]), int(d["rows_rejected"]), int(d["duplicates_rejected"])
        )


@dataclass(frozen=True)
class SiteCount:
    site: str
    encounters: int
    patients: int

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SiteCount":
        return cls(str(d["site"]), int(d["encounters"]), int(d["patients"]))


@dataclass(frozen=True)
class QualityProfile:
    """The quality profile of one batch: aggregates per source, site and code; no identifier, no text value."""

    batch_id: str
    min_cell_patients: int
    sites: tuple[SiteCount, ...]
    codes: tuple[CodeProfile, ...]
    rules: tuple[RuleResult, ...]
    rule_words: tuple[PlausibilityRule, ...]
    sources: tuple[SourceRejects, ...] = field(default_factory=tuple)

    def code(self, source: str, site: str, code: str) -> CodeProfile | None:
        return next((c for c in self.codes if c.key == (source, site, code)), None)

    def as_dict(self) -> dict:
        return {
            "batch_id": self.batch_id,
            "min_cell_patients": self.min_cell_patients,
            "sites": [s.as_dict() for s in self.sites],
            "codes": [c.as_dict() for c in self.codes],
            "rules": [r.as_dict() for r in self.rules],
            "rule_words": [r.as_dict() for r in self.rule_words],
            "sources": [s.as_dict() for s in self.sources],
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "QualityProfile":
        return cls(
            batch_id=str(d["batch_id"]),
            min_cell_patients=int(d["min_cell_patients"]),
            sites=tuple(SiteCount.from_dict(s) for s in d["sites"]),
            codes=tuple(CodeProfile.from_dict(c) for c in d["codes"]),
            rules=tuple(RuleResult.from_dict(r) for r in d["rules"]),
            rule_words=tuple(PlausibilityRule.from_dict(r) for r in d.get("rule_words", [])),
            sources=tuple(SourceRejects.from_dict(s) for s in d.get("sources", [])),
        )


# --- the profile of one batch ---------------------------------------------------------------------------


def _events(source: str, frame: pl.DataFrame, stays: pl.DataFrame) -> pl.DataFrame:
    """A source's rows in one shape: site, patient, encounter, code, value, event and known time."""
    spec = SOURCES[source]
    implausible = pl.col("implausible") if "implausible" in frame.columns else pl.lit(False)
    return (
        frame.select(
            pl.col("encounter_id").cast(pl.String),
            pl.col(spec.code).cast(pl.String).alias("code"),
            pl.col("value").cast(pl.Float64),
            pl.col(spec.event_time).alias("event_time"),
            pl.col(spec.known_time).alias("known_time"),
            implausible.fill_null(False).alias("implausible"),
        )
        .join(stays, on="encounter_id", how="left")
        .with_columns(pl.col("site").fill_null(UNKNOWN_SITE), pl.lit(source).alias("source"))
    )


def _stays(encounters: pl.DataFrame) -> pl.DataFrame:
    return encounters.select(
        pl.col("encounter_id").cast(pl.String),
        pl.col("mrn").cast(pl.String).alias("patient"),
        pl.col("site").cast(pl.String).fill_null(UNKNOWN_SITE),
    ).unique("encounter_id", keep="first")


def _quantile_or_none(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _code_profiles(events: pl.DataFrame, stays: pl.DataFrame, min_cell: int) -> list[CodeProfile]:
    if events.is_empty():
        return []
    keys = ["source", "site", "code"]
    at_site = stays.group_by("site").agg(pl.len().alias("encounters_at_site"))
    intervals = (
        events.sort("event_time")
        .with_columns(
            (
                pl.col("event_time").diff().over("source", "encounter_id", "code").dt.total_seconds() / 3600
            ).alias("interval_hours")
        )
        .group_by(keys)
        .agg(pl.col("interval_hours").drop_nulls().median().alias("median_interval_hours"))
    )
    duplicates = (
        events.group_by([*keys, "encounter_id", "event_time"])
        .agg(pl.len().alias("n"))
        .group_by(keys)
        .agg((pl.col("n") - 1).sum().alias("duplicate_rows"))
    )
    delay = (pl.col("known_time") - pl.col("event_time")).dt.total_seconds() / 60
    stats = (
        events.group_by(keys)
        .agg(
            pl.len().alias("rows"),
            pl.col("patient").n_unique().alias("patients"),
            pl.col("encounter_id").n_unique().alias("encounters_with_value"),
            pl.col("implausible").sum().alias("implausible_rows"),
            delay.median().alias("delay_median_minutes"),
            delay.quantile(0.9, "linear").alias("delay_p90_minutes"),
            *[pl.col("value").quantile(q, "linear").alias(f"q{i}") for i, q in enumerate(VALUE_QUANTILES)],
        )
        .join(intervals, on=keys, how="left")
        .join(duplicates, on=keys, how="left")
        .join(at_site, on="site", how="left")
        .sort(keys)
    )
    out = []
    for r in stats.iter_rows(named=True):
        large = r["patients"] >= min_cell
        quantiles = tuple(_quantile_or_none(r[f"q{i}"]) for i in range(len(VALUE_QUANTILES)))
        out.append(
            CodeProfile(
                source=r["source"],
                site=r["site"],
                code=r["code"],
                rows=int(r["rows"]),
                patients=int(r["patients"]),
                encounters_with_value=int(r["encounters_with_value"]),
                encounters_at_site=int(r["encounters_at_site"] or 0),
                implausible_rows=int(r["implausible_rows"]),
                duplicate_rows=int(r["duplicate_rows"] or 0),
                median_interval_hours=_quantile_or_none(r["median_interval_hours"]) if large else None,
                delay_median_minutes=_quantile_or_none(r["delay_median_minutes"]) if large else None,
                delay_p90_minutes=_quantile_or_none(r["delay_p90_minutes"]) if large else None,
                value_quantiles=quantiles if large and None not in quantiles else None,  # type: ignore[arg-type]
            )
        )
    return out


def _rule_results(events: pl.DataFrame, rules: Sequence[PlausibilityRule]) -> list[RuleResult]:
    out = []
    on = ["encounter_id", "event_time"]
    for rule in rules:
        of_source = events.filter(pl.col("source") == rule.source)

        def side(code: str, name: str, frame: pl.DataFrame = of_source) -> pl.DataFrame:
            return (
                frame.filter(pl.col("code") == code)
                .group_by([*on, "site"])
                .agg(pl.col("value").first().alias(name))
            )

        pairs = side(rule.upper, "upper").join(side(rule.lower, "lower"), on=[*on, "site"], how="inner")
        per_site = pairs.group_by("site").agg(
            pl.len().alias("pairs"), (pl.col("upper") < pl.col("lower")).sum().alias("violations")
        )
        out += [
            RuleResult(rule.name, r["site"], int(r["pairs"]), int(r["violations"]))
            for r in per_site.sort("site").iter_rows(named=True)
        ]
    return out


def _source_rejects(
    accepted: Mapping[str, pl.DataFrame], rejects: Mapping[str, pl.DataFrame]
) -> list[SourceRejects]:
    out = []
    for source in sorted(set(accepted) | set(rejects)):
        r = rejects.get(source)
        n_rejected = 0 if r is None else r.height
        dup = 0 if r is None or "reason" not in r.columns else int(r["reason"].is_in(DUPLICATE_REASONS).sum())
        out.append(
            SourceRejects(source, accepted[source].height if source in accepted else 0, n_rejected, dup)
        )
    return out


def profile_batch(
    batch_id: str,
    *,
    encounters: pl.DataFrame,
    labs: pl.DataFrame,
    vitals: pl.DataFrame,
    rejects: Mapping[str, pl.DataFrame] | None = None,
    rules: Sequence[PlausibilityRule] = PLAUSIBILITY_RULES,
    min_cell_patients: int = MIN_CELL_PATIENTS,
) -> QualityProfile:
    """The quality profile of one batch from its accepted rows (phi zone) and its rejects.

    Parameters
    ----------
    batch_id
        The delivery batch.
    encounters, labs, vitals
        The batch's accepted rows as ingestion wrote them (``encounter_id``, ``mrn``, ``site``; codes, values
        in canonical units, event and result times, ``implausible``). Read here, never copied out.
    rejects
        Per source, the batch's rejected rows (``row_number``, ``reason``), for the duplicates ingestion
        removed; the accepted rows are also counted again for repeats of a key.
    rules
        Cross-code plausibility rules (:data:`PLAUSIBILITY_RULES` by default).
    min_cell_patients
        A cell of fewer patients keeps its counts but no distribution summary.

    Returns
    -------
    QualityProfile
        Aggregates only.
    """
    stays = _stays(encounters)
    events = pl.concat(
        [_events("labs", labs, stays), _events("vitals", vitals, stays)],
        how="vertical_relaxed",
    )
    sites = (
        stays.group_by("site")
        .agg(pl.len().alias("encounters"), pl.col("patient").n_unique().alias("patients"))
        .sort("site")
    )
    return QualityProfile(
        batch_id=batch_id,
        min_cell_patients=min_cell_patients,
        sites=tuple(
            SiteCount(r["site"], r["encounters"], r["patients"]) for r in sites.iter_rows(named=True)
        ),
        codes=tuple(_code_profiles(events, stays, min_cell_patients)),
        rules=tuple(_rule_results(events, rules)),
        rule_words=tuple(rules),
        sources=tuple(
            _source_rejects({"encounters": encounters, "labs": labs, "vitals": vitals}, dict(rejects or {}))
        ),
    )


# --- the trend over batches -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrendThresholds:
    """When a batch differs enough from the earlier ones to be flagged.

    ``interval_factor``: the median sampling interval multiplied or divided by at least this factor against
    the median of earlier batches; ``missing_points``: the share of encounters without a value up by at least
    this many percentage points; ``min_earlier_batches``: earlier batches needed before anything is compared;
    ``max_violation_share``: share of same-time pairs that may violate a cross-code rule.
    """

    interval_factor: float = 2.0
    missing_points: float = 20.0
    min_earlier_batches: int = 1
    max_violation_share: float = 0.01

    def compares(self, earlier_batches: int) -> bool:
        """Whether a batch with this many earlier batch profiles is compared with them."""
        return earlier_batches >= self.min_earlier_batches


@dataclass(frozen=True)
class TrendFlag:
    """A change of one code at one site (or a new violation of a rule) in one batch against the earlier ones."""

    batch_id: str
    kind: str  # sampling_interval | missing_share | new_rule_violation
    source: str
    site: str
    code: str
    earlier: float
    current: float

    @property
    def words(self) -> str:
        if self.kind == "sampling_interval":
            way = "longer" if self.current > self.earlier else "shorter"
            return (
                f"values come {way} apart: median interval {self.current:.1f} h against "
                f"{self.earlier:.1f} h in earlier batches"
            )
        if self.kind == "missing_share":
            return (
                f"more stays without a value: {100 * self.current:.0f}% against "
                f"{100 * self.earlier:.0f}% in earlier batches"
            )
        return (
            f"the rule was broken in {100 * self.current:.1f}% of same-time pairs; never in earlier batches"
        )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrendFlag":
        return cls(
            **{k: str(d[k]) for k in ("batch_id", "kind", "source", "site", "code")},
            earlier=float(d["earlier"]),
            current=float(d["current"]),
        )


# shares and ratios at a limit exactly (8 of 10 stays: 20 points) count as reaching it
_EPS = 1e-9


class _Earlier:
    """What a comparison needs of the earlier batches' profiles, kept up to date one profile at a time: per
    (source, site, code) the sorted median intervals and missing shares of the batches that measured it, and
    the (rule, site) cells any of them broke. :func:`trend_over_batches` adds each batch after comparing it,
    so the trend costs one pass over the batches rather than one per pair."""

    def __init__(self) -> None:
        self.count = 0
        self.intervals: dict[tuple[str, str, str], list[float]] = {}
        self.missing: dict[tuple[str, str, str], list[float]] = {}
        self.broken: set[tuple[str, str]] = set()

    def add(self, profile: QualityProfile) -> None:
        self.count += 1
        for c in _first_codes(profile).values():
            bisect.insort(self.missing.setdefault(c.key, []), c.missing_share)
            intervals = self.intervals.setdefault(c.key, [])
            if c.median_interval_hours is not None:
                bisect.insort(intervals, c.median_interval_hours)
        self.broken |= {(r.rule, r.site) for r in profile.rules if r.violations > 0}


def _first_codes(profile: QualityProfile) -> dict[tuple[str, str, str], CodeProfile]:
    """The profile's codes by key, the first where a key repeats (as :meth:`QualityProfile.code` finds)."""
    codes: dict[tuple[str, str, str], CodeProfile] = {}
    for c in profile.codes:
        codes.setdefault(c.key, c)
    return codes


def _median(s: Sequence[float]) -> float:
    """The median of an already sorted sequence."""
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def compare_with_earlier(
    current: QualityProfile,
    earlier: Sequence[QualityProfile],
    *,
    thresholds: TrendThresholds = TrendThresholds(),
) -> tuple[TrendFlag, ...]:
    """What changed in ``current`` against the ``earlier`` batches' profiles, per site and code.

    The reference of a code at a site is the median over the earlier batches that measured it. A code an
    earlier batch had at a site that the current batch has not at all counts as missing in every stay
    (when the site has stays in the batch). A rule is newly violated when the batch breaks it at a site
    where no earlier batch did.
    """
    before = _Earlier()
    for p in earlier:
        if p.batch_id != current.batch_id:
            before.add(p)
    return _compare(current, before, thresholds)


def _compare(
    current: QualityProfile, earlier: _Earlier, thresholds: TrendThresholds
) -> tuple[TrendFlag, ...]:
    if not thresholds.compares(earlier.count):
        return ()
    flags: list[TrendFlag] = []
    current_sites = {s.site for s in current.sites if s.encounters > 0}
    now_codes = _first_codes(current)
    for key in sorted(earlier.missing.keys() | now_codes.keys()):
        now = now_codes.get(key)
        missing = earlier.missing.get(key)
        if not missing or (now is None and key[1] not in current_sites):
            continue
        intervals = earlier.intervals[key]
        if now is not None and now.median_interval_hours is not None and intervals:
            ref = _median(intervals)
            ratio = now.median_interval_hours / ref if ref > 0 else math.inf
            if ratio >= thresholds.interval_factor - _EPS or ratio <= 1 / thresholds.interval_factor + _EPS:
                flags.append(
                    TrendFlag(current.batch_id, "sampling_interval", *key, ref, now.median_interval_hours)
                )
        ref_missing = _median(missing)
        now_missing = 1.0 if now is None else now.missing_share
        if 100 * (now_missing - ref_missing) >= thresholds.missing_points - _EPS:
            flags.append(TrendFlag(current.batch_id, "missing_share", *key, ref_missing, now_missing))
    by_rule = {r.name: r for r in current.rule_words}
    for r in current.rules:
        if r.violations == 0:
            continue
        if (r.rule, r.site) not in earlier.broken:
            rule = by_rule.get(r.rule)
            flags.append(
                TrendFlag(
                    current.batch_id,
                    "new_rule_violation",
                    rule.source if rule else "",
                    r.site,
                    r.rule,
                    0.0,
                    r.violation_share,
                )
            )
    return tuple(flags)


def rules_over_share(profile: QualityProfile, *, max_share: float) -> tuple[RuleResult, ...]:
    """The (rule, site) cells whose same-time pairs violate the rule more often than ``max_share``."""
    return tuple(r for r in profile.rules if r.pairs and r.violation_share > max_share)


@dataclass(frozen=True)
class QualityTrend:
    """Every batch's flags against the batches before it, batches in order."""

    batch_ids: tuple[str, ...]
    flags: tuple[TrendFlag, ...]

    def as_dict(self) -> dict:
        return {"batch_ids": list(self.batch_ids), "flags": [f.as_dict() for f in self.flags]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "QualityTrend":
        return cls(tuple(d["batch_ids"]), tuple(TrendFlag.from_dict(f) for f in d["flags"]))


def trend_over_batches(
    profiles: Sequence[QualityProfile], *, thresholds: TrendThresholds = TrendThresholds()
) -> QualityTrend:
    """Each batch (in batch id order) compared with every batch before it."""
    ordered = sorted(profiles, key=lambda p: p.batch_id)
    if len({p.batch_id for p in ordered}) < len(ordered):  # a batch profiled twice: each copy judged apart
        return QualityTrend(
            tuple(p.batch_id for p in ordered),
            tuple(
                f
                for i, p in enumerate(ordered)
                for f in compare_with_earlier(p, ordered[:i], thresholds=thresholds)
            ),
        )
    earlier = _Earlier()
    flags: list[TrendFlag] = []
    for p in ordered:
        flags += _compare(p, earlier, thresholds)
        earlier.add(p)
    return QualityTrend(tuple(p.batch_id for p in ordered), tuple(flags))


def series(profiles: Sequence[QualityProfile], key: tuple[str, str, str]) -> dict[str, list[float | None]]:
    """One code at one site across batches (batch id order): median interval (h) and missing share (%)."""
    ordered = sorted(profiles, key=lambda p: p.batch_id)
    codes = [p.code(*key) for p in ordered]
    return {
        "median_interval_hours": [None if c is None else c.median_interval_hours for c in codes],
        "missing_percent": [None if c is None else 100 * c.missing_share for c in codes],
    }
