"""The quality profile on hand-made frames: each metric, each cross-code rule, the small-cell rule, the trend
flags, the typed round trip, and pages that escape delivered text and hold no identifier."""

import json
from datetime import datetime, timedelta

import polars as pl
import pytest

from clinical_ml.core.quality import (
    PLAUSIBILITY_RULES,
    PlausibilityRule,
    QualityProfile,
    TrendThresholds,
    compare_with_earlier,
    profile_batch,
    rules_over_share,
    trend_over_batches,
)
from clinical_ml.core.quality_report import profile_markdown, profile_page, trend_page

T0 = datetime(2026, 1, 5, 8)
TS = pl.Datetime("us")


def _encounters(sites: dict[str, str], mrn: dict[str, str] | None = None) -> pl.DataFrame:
    """encounter id -> site; each encounter its own patient unless ``mrn`` says otherwise."""
    ids = list(sites)
    return pl.DataFrame(
        {
            "encounter_id": ids,
            "mrn": [(mrn or {}).get(e, f"MRN{e}") for e in ids],
            "site": [sites[e] for e in ids],
        }
    )


def _vitals(rows: list[tuple[str, str, float, float]], *, delay_min: float = 5.0) -> pl.DataFrame:
    """(encounter, code, value, hours after T0) -> vitals rows stored ``delay_min`` after charting."""
    return pl.DataFrame(
        {
            "encounter_id": [r[0] for r in rows],
            "code": [r[1] for r in rows],
            "value": [float(r[2]) for r in rows],
            "charted_time": [T0 + timedelta(hours=r[3]) for r in rows],
            "stored_time": [T0 + timedelta(hours=r[3], minutes=delay_min) for r in rows],
            "implausible": [False] * len(rows),
        },
        schema_overrides={"charted_time": TS, "stored_time": TS},
    )


def _labs(rows: list[tuple[str, str, float, float, float]]) -> pl.DataFrame:
    """(encounter, LOINC, value, hours after T0, minutes to result) -> lab rows."""
    return pl.DataFrame(
        {
            "encounter_id": [r[0] for r in rows],
            "loinc_code": [r[1] for r in rows],
            "value": [float(r[2]) for r in rows],
            "specimen_time": [T0 + timedelta(hours=r[3]) for r in rows],
            "result_time": [T0 + timedelta(hours=r[3], minutes=r[4]) for r in rows],
            "implausible": [False] * len(rows),
        },
        schema={
            "encounter_id": pl.String,
            "loinc_code": pl.String,
            "value": pl.Float64,
            "specimen_time": TS,
            "result_time": TS,
            "implausible": pl.Boolean,
        },
    )


NO_LABS = _labs([])
NO_VITALS = _vitals([])


def _profile(batch="b1", *, encounters, labs=NO_LABS, vitals=NO_VITALS, min_cell=1, **kw) -> QualityProfile:
    return profile_batch(
        batch, encounters=encounters, labs=labs, vitals=vitals, min_cell_patients=min_cell, **kw
    )


def test_missingness_counts_the_site_stays_without_a_value():
    enc = _encounters({"e1": "A", "e2": "A", "e3": "A", "e4": "A", "e5": "B"})
    vit = _vitals([("e1", "heart_rate", 80, 0), ("e1", "heart_rate", 82, 1), ("e2", "heart_rate", 90, 0)])
    c = _profile(encounters=enc, vitals=vit).code("vitals", "A", "heart_rate")
    assert (c.rows, c.encounters_with_value, c.encounters_at_site) == (3, 2, 4)
    assert c.missing_share == pytest.approx(0.5)


def test_sampling_interval_is_the_median_gap_between_values_of_a_stay():
    # gaps of 1 h, 1 h and 4 h in one stay, 2 h in another; a stay with one value has no gap
    vit = _vitals(
        [("e1", "heart_rate", 80, h) for h in (0, 1, 2, 6)]
        + [("e2", "heart_rate", 80, h) for h in (5, 7)]
        + [("e3", "heart_rate", 80, 3)]
    )
    c = _profile(encounters=_encounters({"e1": "A", "e2": "A", "e3": "A"}), vitals=vit).code(
        "vitals", "A", "heart_rate"
    )
    assert c.median_interval_hours == pytest.approx(1.5)


def test_time_to_result_median_and_90th_percentile():
    labs = _labs(
        [("e1", "2160-0", 1.0, i, m) for i, m in enumerate((10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110))]
    )
    c = _profile(encounters=_encounters({"e1": "A"}), labs=labs).code("labs", "A", "2160-0")
    assert c.delay_median_minutes == pytest.approx(60)
    assert c.delay_p90_minutes == pytest.approx(100)


def test_value_quantiles_and_implausible_share():
    vit = _vitals([(f"e{i}", "heart_rate", float(i), 0) for i in range(1, 102)]).with_columns(
        implausible=pl.col("value") > 91
    )
    enc = _encounters({f"e{i}": "A" for i in range(1, 102)})
    c = _profile(encounters=enc, vitals=vit).code("vitals", "A", "heart_rate")
    assert c.value_quantiles == pytest.approx((6, 26, 51, 76, 96))
    assert c.implausible_rows == 10 and c.implausible_share == pytest.approx(10 / 101)


def test_a_cell_of_fewer_patients_than_the_minimum_keeps_counts_but_no_distribution():
    # three stays of two patients: below a minimum of 3 patients
    enc = _encounters({"e1": "A", "e2": "A", "e3": "A"}, mrn={"e1": "p1", "e2": "p1", "e3": "p2"})
    vit = _vitals([(e, "heart_rate", 80, h) for e in ("e1", "e2", "e3") for h in (0, 1)])
    small = _profile(encounters=enc, vitals=vit, min_cell=3).code("vitals", "A", "heart_rate")
    assert (small.rows, small.patients, small.encounters_with_value) == (6, 2, 3)
    assert small.value_quantiles is None and small.median_interval_hours is None
    assert small.delay_median_minutes is None and small.delay_p90_minutes is None
    large = _profile(encounters=enc, vitals=vit, min_cell=2).code("vitals", "A", "heart_rate")
    assert large.value_quantiles is not None and large.median_interval_hours == pytest.approx(1)


def test_duplicates_from_the_rejects_and_recounted_among_accepted_rows():
    vit = _vitals([("e1", "heart_rate", 80, 0), ("e1", "heart_rate", 81, 0), ("e1", "heart_rate", 80, 1)])
    rejects = {
        "vitals": pl.DataFrame(
            {
                "row_number": [4, 5, 6],
                "reason": ["duplicate_row", "conflicting_duplicate", "implausible_time"],
            }
        )
    }
    p = _profile(encounters=_encounters({"e1": "A"}), vitals=vit, rejects=rejects)
    assert p.code("vitals", "A", "heart_rate").duplicate_rows == 1
    (vitals,) = [s for s in p.sources if s.source == "vitals"]
    assert (vitals.rows_accepted, vitals.rows_rejected, vitals.duplicates_rejected) == (3, 3, 2)


def test_sites_count_stays_and_patients_and_events_of_unknown_stays_are_kept_apart():
    enc = _encounters({"e1": "A", "e2": "A", "e3": "B"}, mrn={"e1": "p1", "e2": "p1", "e3": "p2"})
    vit = _vitals([("e9", "heart_rate", 80, 0)])
    p = _profile(encounters=enc, vitals=vit)
    assert [(s.site, s.encounters, s.patients) for s in p.sites] == [("A", 2, 1), ("B", 1, 1)]
    assert p.code("vitals", "unknown", "heart_rate").rows == 1


RULE_CASES = {
    **{
        f"{name}{m}": [(f"{upper}{m}", bad_upper), (f"{lower}{m}", bad_lower)]
        for m in ("", "_invasive", "_noninvasive")
        for name, (upper, bad_upper), (lower, bad_lower) in (
            ("systolic_at_least_diastolic", ("systolic_bp", 80), ("diastolic_bp", 90)),
            ("mean_bp_at_most_systolic", ("systolic_bp", 100), ("mean_bp", 110)),
            ("mean_bp_at_least_diastolic", ("mean_bp", 60), ("diastolic_bp", 70)),
        )
    },
    "hdl_at_most_total_cholesterol": [("2093-3", 40), ("2085-9", 60)],
    "direct_bilirubin_at_most_total": [("1975-2", 1.0), ("1968-7", 1.5)],
}


@pytest.mark.parametrize("rule", PLAUSIBILITY_RULES, ids=lambda r: r.name)
def test_each_cross_code_rule_counts_same_time_pairs_and_violations(rule: PlausibilityRule):
    (upper, bad_upper), (lower, bad_lower) = RULE_CASES[rule.name]
    assert (rule.upper, rule.lower) == (upper, lower)
    # e1: a violating pair at 0 h and a good pair at 1 h; e2: the two codes at different times (no pair)
    rows = [
        ("e1", upper, bad_upper, 0),
        ("e1", lower, bad_lower, 0),
        ("e1", upper, bad_lower + 1, 1),
        ("e1", lower, bad_lower, 1),
        ("e2", upper, 1, 0),
        ("e2", lower, 1000, 2),
    ]
    enc = _encounters({"e1": "A", "e2": "A"})
    if rule.source == "vitals":
        p = _profile(encounters=enc, vitals=_vitals([(e, c, v, h) for e, c, v, h in rows]))
    else:
        p = _profile(encounters=enc, labs=_labs([(e, c, v, h, 30) for e, c, v, h in rows]))
    (result,) = [r for r in p.rules if r.rule == rule.name]
    assert (result.site, result.pairs, result.violations) == ("A", 2, 1)
    assert rules_over_share(p, max_share=0.4) == (result,)
    assert rules_over_share(p, max_share=0.5) == ()


def test_an_arterial_line_and_a_cuff_at_the_same_minute_are_not_compared():
    # a cuff systolic below the arterial diastolic is two measurements by two methods, not an implausible pair
    vit = _vitals([("e1", "systolic_bp_noninvasive", 80, 0), ("e1", "diastolic_bp_invasive", 90, 0)])
    p = _profile(encounters=_encounters({"e1": "A"}), vitals=vit)
    assert sum(r.pairs for r in p.rules) == 0


def test_rules_are_data_a_hospital_can_replace():
    mine = (PlausibilityRule("spo2_at_most_100", "vitals", "ceiling", "spo2", "SpO2 at most 100"),)
    vit = _vitals([("e1", "spo2", 101, 0), ("e1", "ceiling", 100, 0)])
    p = _profile(encounters=_encounters({"e1": "A"}), vitals=vit, rules=mine)
    assert [(r.rule, r.violations) for r in p.rules] == [("spo2_at_most_100", 1)]
    assert p.rule_words == mine


def test_profile_round_trips_through_its_dict_and_json():
    enc = _encounters({"e1": "A", "e2": "B"})
    vit = _vitals([("e1", "systolic_bp", 120, 0), ("e1", "diastolic_bp", 80, 0), ("e2", "heart_rate", 70, 0)])
    p = _profile(encounters=enc, vitals=vit, labs=_labs([("e2", "2160-0", 1.1, 0, 45)]))
    assert QualityProfile.from_dict(json.loads(json.dumps(p.as_dict()))) == p


# --- trend -------------------------------------------------------------------------------------------


def _batch(batch: str, *, every_hours: float, stays_with_value: int, stays: int = 10, bp_violation=False):
    enc = _encounters({f"{batch}-e{i}": "A" for i in range(stays)})
    rows = [
        (f"{batch}-e{i}", "heart_rate", 80, h * every_hours)
        for i in range(stays_with_value)
        for h in range(3)
    ]
    rows += [
        (f"{batch}-e0", "systolic_bp", 70 if bp_violation else 120, 0),
        (f"{batch}-e0", "diastolic_bp", 80, 0),
    ]
    return _profile(batch, encounters=enc, vitals=_vitals(rows))


def _kinds(flags) -> set[tuple[str, str, str]]:
    return {(f.kind, f.site, f.code) for f in flags}


def test_a_sampling_interval_doubled_or_halved_is_flagged_and_a_small_change_is_not():
    earlier = [
        _batch("b1", every_hours=1, stays_with_value=10),
        _batch("b2", every_hours=1, stays_with_value=10),
    ]
    assert _kinds(compare_with_earlier(_batch("b3", every_hours=2, stays_with_value=10), earlier)) == {
        ("sampling_interval", "A", "heart_rate")
    }
    assert _kinds(compare_with_earlier(_batch("b3", every_hours=0.5, stays_with_value=10), earlier)) == {
        ("sampling_interval", "A", "heart_rate")
    }
    assert compare_with_earlier(_batch("b3", every_hours=1.5, stays_with_value=10), earlier) == ()
    (flag,) = compare_with_earlier(_batch("b3", every_hours=2, stays_with_value=10), earlier)
    assert (flag.earlier, flag.current) == (pytest.approx(1), pytest.approx(2))
    assert "longer apart" in flag.words


def test_missingness_up_by_the_configured_points_is_flagged():
    earlier = [_batch("b1", every_hours=1, stays_with_value=10)]
    assert _kinds(compare_with_earlier(_batch("b2", every_hours=1, stays_with_value=8), earlier)) == {
        ("missing_share", "A", "heart_rate")
    }
    assert compare_with_earlier(_batch("b2", every_hours=1, stays_with_value=9), earlier) == ()
    loose = TrendThresholds(missing_points=30)
    assert (
        compare_with_earlier(_batch("b2", every_hours=1, stays_with_value=8), earlier, thresholds=loose) == ()
    )


def test_a_code_that_stopped_arriving_at_a_site_is_missing_in_every_stay():
    earlier = [_batch("b1", every_hours=1, stays_with_value=10)]
    (flag,) = compare_with_earlier(_batch("b2", every_hours=1, stays_with_value=0), earlier)
    assert (flag.kind, flag.code, flag.current) == ("missing_share", "heart_rate", 1.0)


def test_a_rule_broken_where_it_never_was_is_flagged_once():
    clean = _batch("b1", every_hours=1, stays_with_value=10)
    broken = _batch("b2", every_hours=1, stays_with_value=10, bp_violation=True)
    assert _kinds(compare_with_earlier(broken, [clean])) == {
        ("new_rule_violation", "A", "systolic_at_least_diastolic")
    }
    again = _batch("b3", every_hours=1, stays_with_value=10, bp_violation=True)
    assert compare_with_earlier(again, [clean, broken]) == ()


def test_nothing_is_compared_before_enough_earlier_batches():
    first = _batch("b1", every_hours=1, stays_with_value=10)
    changed = _batch("b2", every_hours=3, stays_with_value=5)
    assert compare_with_earlier(changed, []) == ()
    assert compare_with_earlier(changed, [first], thresholds=TrendThresholds(min_earlier_batches=2)) == ()


def test_the_trend_compares_each_batch_with_the_batches_before_it_in_order():
    profiles = [
        _batch("b3", every_hours=2, stays_with_value=10),
        _batch("b1", every_hours=1, stays_with_value=10),
        _batch("b2", every_hours=1, stays_with_value=10),
    ]
    trend = trend_over_batches(profiles)
    assert trend.batch_ids == ("b1", "b2", "b3")
    assert [(f.batch_id, f.kind) for f in trend.flags] == [("b3", "sampling_interval")]


# --- pages -------------------------------------------------------------------------------------------

ODD_SITE = "<script>alert(1)</script> & Co"


def test_pages_escape_delivered_text_and_hold_no_identifier():
    enc = _encounters(
        {"ENC123456": ODD_SITE, "ENC654321": ODD_SITE}, mrn={"ENC123456": "MRN777", "ENC654321": "MRN888"}
    )
    vit = _vitals([(e, "heart_rate", 80, h) for e in ("ENC123456", "ENC654321") for h in (0, 2)])
    first = _profile("b1", encounters=enc, vitals=vit)
    second = _profile("b2", encounters=enc, vitals=_vitals([("ENC123456", "heart_rate", 80, 0)]))
    flags = compare_with_earlier(second, [first])
    thresholds = TrendThresholds()
    page = profile_page(second, flags, thresholds=thresholds, earlier_batches=1)
    trend_html = trend_page([first, second], trend_over_batches([first, second]), thresholds=thresholds)
    markdown = profile_markdown(second, flags, thresholds=thresholds)
    for html in (page, trend_html):
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in html
    assert "<script>" not in markdown
    assert "heart rate" in page and "more stays without a value" in page
    written = page + trend_html + markdown + json.dumps(first.as_dict()) + json.dumps(second.as_dict())
    for identifier in ("ENC123456", "ENC654321", "MRN777", "MRN888"):
        assert identifier not in written


def test_the_trend_before_any_batch_is_a_page_that_says_so():
    trend = trend_over_batches([])
    html = trend_page([], trend, thresholds=TrendThresholds())
    assert trend.flags == () and "0 batches, 0 changes flagged" in html


def test_a_first_batch_is_not_said_to_have_no_change_when_nothing_was_compared():
    from clinical_ml.core.quality_report import compared_words

    enc = _encounters(
        {"ENC123456": "SITE_A", "ENC654321": "SITE_A"}, mrn={"ENC123456": "M1", "ENC654321": "M2"}
    )
    vit = _vitals([(e, "heart_rate", 80, h) for e in ("ENC123456", "ENC654321") for h in (0, 2)])
    first = _profile("b1", encounters=enc, vitals=vit)
    thresholds = TrendThresholds()
    assert thresholds.min_earlier_batches >= 1
    page = profile_page(first, [], thresholds=thresholds, earlier_batches=0)
    markdown = profile_markdown(first, [], thresholds=thresholds, earlier_batches=0)
    for text in (page, markdown):
        assert "not compared with earlier batches" in text
        assert (
            "0 changes against earlier batches" not in text
            and "Nothing changed beyond the limits" not in text
        )
    assert compared_words(0, thresholds) in page
    second = _profile("b2", encounters=enc, vitals=vit)
    compared = profile_page(second, [], thresholds=thresholds, earlier_batches=thresholds.min_earlier_batches)
    assert "0 changes against earlier batches" in compared and "Nothing changed beyond the limits" in compared
