"""The quality trend in one pass over the batches gives the flags the pairwise comparison of each batch with
every batch before it gave (the former implementation, kept here as the reference)."""

import math
from collections.abc import Sequence

import numpy as np
import pytest

from clinical_ml.core.quality import (
    PLAUSIBILITY_RULES,
    CodeProfile,
    QualityProfile,
    RuleResult,
    SiteCount,
    TrendFlag,
    TrendThresholds,
    compare_with_earlier,
    trend_over_batches,
)

_EPS = 1e-9


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _reference_compare(
    current: QualityProfile, earlier: Sequence[QualityProfile], thresholds: TrendThresholds
) -> tuple[TrendFlag, ...]:
    """compare_with_earlier as it was: every code looked up in every earlier profile."""
    earlier = [p for p in earlier if p.batch_id != current.batch_id]
    if not thresholds.compares(len(earlier)):
        return ()
    flags: list[TrendFlag] = []
    current_sites = {s.site for s in current.sites if s.encounters > 0}
    keys = {c.key for p in earlier for c in p.codes} | {c.key for c in current.codes}
    for key in sorted(keys):
        now = current.code(*key)
        before = [c for p in earlier if (c := p.code(*key)) is not None]
        if not before or (now is None and key[1] not in current_sites):
            continue
        intervals = [c.median_interval_hours for c in before if c.median_interval_hours is not None]
        if now is not None and now.median_interval_hours is not None and intervals:
            ref = _median(intervals)
            ratio = now.median_interval_hours / ref if ref > 0 else math.inf
            if ratio >= thresholds.interval_factor - _EPS or ratio <= 1 / thresholds.interval_factor + _EPS:
                flags.append(
                    TrendFlag(current.batch_id, "sampling_interval", *key, ref, now.median_interval_hours)
                )
        ref_missing = _median([c.missing_share for c in before])
        now_missing = 1.0 if now is None else now.missing_share
        if 100 * (now_missing - ref_missing) >= thresholds.missing_points - _EPS:
            flags.append(TrendFlag(current.batch_id, "missing_share", *key, ref_missing, now_missing))
    by_rule = {r.name: r for r in current.rule_words}
    for r in current.rules:
        if r.violations == 0:
            continue
        broken_before = any(
            e.violations > 0 for p in earlier for e in p.rules if (e.rule, e.site) == (r.rule, r.site)
        )
        if not broken_before:
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


def _reference_trend(profiles: Sequence[QualityProfile], thresholds: TrendThresholds) -> list[TrendFlag]:
    ordered = sorted(profiles, key=lambda p: p.batch_id)
    return [f for i, p in enumerate(ordered) for f in _reference_compare(p, ordered[:i], thresholds)]


SITES = ("north", "south", "east")
CODES = (("labs", "creatinine"), ("labs", "lactate"), ("vitals", "heart_rate"), ("vitals", "sbp"))


def _random_profile(rng: np.random.Generator, batch_id: str) -> QualityProfile:
    """A batch whose sites, codes, intervals, missingness and rule violations vary a lot (many flags)."""
    sites = tuple(SiteCount(s, int(rng.choice([0, 5, 10, 20])), 5) for s in SITES if rng.random() < 0.9)
    codes = []
    for site in SITES:
        for source, code in CODES:
            if rng.random() < 0.25:  # the code did not arrive at this site in this batch
                continue
            at_site = int(rng.choice([0, 10, 20]))
            for _ in range(1 + int(rng.random() < 0.1)):  # now and then the same key twice
                codes.append(
                    CodeProfile(
                        source,
                        site,
                        code,
                        rows=10,
                        patients=5,
                        encounters_with_value=int(rng.integers(0, at_site + 1)),
                        encounters_at_site=at_site,
                        implausible_rows=0,
                        duplicate_rows=0,
                        median_interval_hours=None
                        if rng.random() < 0.2
                        else float(rng.choice([0.0, 0.5, 1.0, 1.0, 1.0, 2.0, 4.0])),
                        delay_median_minutes=None,
                        delay_p90_minutes=None,
                        value_quantiles=None,
                    )
                )
    rules = tuple(
        RuleResult(r.name, site, pairs=10, violations=int(rng.random() < 0.08) * int(rng.integers(1, 4)))
        for r in PLAUSIBILITY_RULES[:3]
        for site in SITES
    )
    return QualityProfile(batch_id, 1, sites, tuple(codes), rules, PLAUSIBILITY_RULES)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thresholds", [TrendThresholds(), TrendThresholds(min_earlier_batches=3)])
def test_the_trend_in_one_pass_flags_what_each_pairwise_comparison_flagged(seed, thresholds):
    rng = np.random.default_rng(seed)
    profiles = [_random_profile(rng, f"2025-{m:02d}-{d:02d}") for m in (1, 2) for d in range(1, 29)]
    shuffled = [profiles[i] for i in rng.permutation(len(profiles))]  # the trend orders them itself
    expected = _reference_trend(profiles, thresholds)
    assert len({f.kind for f in expected}) == 3 and len(expected) > 50  # every kind of flag, often
    trend = trend_over_batches(shuffled, thresholds=thresholds)
    assert list(trend.flags) == expected
    assert trend.batch_ids == tuple(sorted(p.batch_id for p in profiles))


def test_compare_with_earlier_flags_what_it_flagged_before():
    rng = np.random.default_rng(7)
    profiles = [_random_profile(rng, f"b{i:02d}") for i in range(20)]
    for i, p in enumerate(profiles):
        # the current batch among the earlier ones too (a re-profiled batch): left out of its reference
        earlier = [*profiles[:i], p]
        assert compare_with_earlier(p, earlier) == _reference_compare(p, earlier, TrendThresholds())


def test_a_batch_profiled_twice_is_judged_as_before():
    rng = np.random.default_rng(3)
    profiles = [_random_profile(rng, f"b{i:02d}") for i in range(10)]
    twice = [*profiles, _random_profile(rng, "b04")]
    thresholds = TrendThresholds()
    assert list(trend_over_batches(twice, thresholds=thresholds).flags) == _reference_trend(twice, thresholds)


@pytest.mark.parametrize("n", [1, 5, 12, 13, 60, 364])
def test_a_series_plot_names_every_batch_up_to_twelve_and_every_kth_beyond(n):
    from clinical_ml.core.quality_report import MAX_TICK_LABELS, _tick_step

    named = range(0, n, _tick_step(n))
    assert len(named) == n if n <= MAX_TICK_LABELS else MAX_TICK_LABELS // 2 < len(named) <= MAX_TICK_LABELS
