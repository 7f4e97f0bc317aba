"""Cohorts and labels of every outcome type and prediction-time anchor, against hand-computed labels.

Edges: an event exactly at the window boundary, a readmission on day 30 and day 31, death after discharge,
transfer, a label window still open at the end of the data, repeated predictions.
"""

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinical_ml.core.features import build_features, history_features
from clinical_ml.core.labeling import build_cohort, build_labels, data_end
from clinical_ml.core.usecase import UseCaseError, load_use_case, parse_use_case

SHIPPED = load_use_case(Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml")
T0 = datetime(2026, 1, 5, 8, 0)


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def d(days: float) -> datetime:
    return T0 + timedelta(days=days)


def replaced(base, **update):
    """``base`` with parts replaced (validated like a file)."""
    raw = base.model_dump(mode="json", exclude={"source_sha256"})
    for key, value in update.items():
        raw[key] = value
    import yaml

    return parse_use_case(yaml.safe_dump(raw))


# The tests below build stays without ICU unit events or unit types and test something other than the ICU
# anchor, so their base case is the shipped mortality question asked 24 h after *hospital* admission of a
# stay in any unit (the settings it had before it was anchored at ICU admission).
BASE = replaced(
    SHIPPED,
    population={**SHIPPED.population.model_dump(mode="json"), "unit_types": None},
    prediction_time={"anchor": "admission", "offset_hours": 24},
)


def use_case(**update):
    """The base mortality use case with parts replaced (validated like a file)."""
    return replaced(BASE, **update)


def stays(rows: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """De-identified encounters and patients; each row names subject, hadm, admit, discharge, optional death,
    disposition, admission type. Batch ids are not dates (a research export delivered whole)."""
    enc = pl.DataFrame(
        {
            "subject_id": [r["s"] for r in rows],
            "hadm_id": [r["a"] for r in rows],
            "admit_time": [r["in"] for r in rows],
            "discharge_time": [r["out"] for r in rows],
            "death_time": pl.Series([r.get("died") for r in rows], dtype=pl.Datetime("us")),
            "admission_type": [r.get("type", "EMERGENCY") for r in rows],
            "unit": [r.get("unit", "MICU") for r in rows],
            "site": ["SITE_A"] * len(rows),
            "discharge_disposition": [r.get("disp", "EXPIRED" if r.get("died") else "HOME") for r in rows],
            "age_years": [r.get("age", 60.0) for r in rows],
            "period": ["2026Q1"] * len(rows),
            "batch_id": [r.get("batch", "export") for r in rows],
        }
    ).with_columns(pl.col("admit_time", "discharge_time").cast(pl.Datetime("us")))
    subjects = sorted({r["s"] for r in rows})
    pat = pl.DataFrame(
        {
            "subject_id": subjects,
            "sex": ["F"] * len(subjects),
            "race": ["White"] * len(subjects),
            "ethnicity": ["Not Hispanic or Latino"] * len(subjects),
            "zip3": ["021"] * len(subjects),
        }
    )
    return enc, pat


def events(rows: list[tuple[int, int, str, float | None, datetime, datetime | None]]) -> pl.DataFrame:
    """(subject, hadm, code, value, time, available time or None for the same)."""
    return pl.DataFrame(
        {
            "subject_id": [r[0] for r in rows],
            "hadm_id": [r[1] for r in rows],
            "code": [r[2] for r in rows],
            "numeric_value": pl.Series([r[3] for r in rows], dtype=pl.Float32),
            "time": pl.Series([r[4] for r in rows], dtype=pl.Datetime("us")),
            "available_time": pl.Series([r[5] or r[4] for r in rows], dtype=pl.Datetime("us")),
            "implausible": [False] * len(rows),
        }
    )


def labels_of(uc, enc, pat, ev=None, **kw) -> dict[int, bool]:
    cohort, _ = build_cohort(enc, pat, uc, ev)
    lab = build_labels(cohort, uc, encounters=enc, events=ev, **kw)
    return dict(zip(lab["hadm_id"].to_list(), lab["boolean_value"].to_list(), strict=True))


# --- death ----------------------------------------------------------------------------------------------


def test_in_hospital_death_and_the_stays_that_ended_before_the_prediction_time():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": h(0), "out": h(100), "died": h(100)},  # dies in hospital
            {"s": 2, "a": 2, "in": h(0), "out": h(100)},  # survives
            {"s": 3, "a": 3, "in": h(0), "out": h(20), "died": h(20)},  # dies before 24 h: excluded
            {"s": 4, "a": 4, "in": h(0), "out": h(24)},  # leaves exactly at 24 h: nothing to predict
        ]
    )
    cohort, flow = build_cohort(enc, pat, BASE)
    assert labels_of(BASE, enc, pat) == {1: True, 2: False}
    assert flow.excluded("stay ended") == 2 and flow.included == 2
    assert cohort["prediction_time"].to_list() == [h(24), h(24)]


def test_the_shipped_question_asks_icu_stays_24_h_after_their_first_icu_admission():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": h(0), "out": h(100), "died": h(100)},  # ICU from 6 h, again from 50 h
            {"s": 2, "a": 2, "in": h(0), "out": h(100), "unit": "WARD"},  # never in an ICU
            {"s": 3, "a": 3, "in": h(0), "out": h(100)},  # an ICU unit but no ICU admission recorded
            {"s": 4, "a": 4, "in": h(0), "out": h(40)},  # ICU from 20 h, home before 44 h
        ]
    )
    typed = enc.with_columns(pl.Series("unit_type", ["ICU", "WARD", "ICU", "ICU"]))
    ev = events(
        [
            (1, 1, "ICU_UNIT//MICU", None, h(6), None),
            (1, 1, "ICU_UNIT//SICU", None, h(50), None),
            # data written before the anonymizer kept ICU events to ICU-typed units: only the unit filter
            # leaves this ward stay out
            (2, 2, "ICU_UNIT//WARD", None, h(0), None),
            (4, 4, "ICU_UNIT//MICU", None, h(20), None),
        ]
    )
    cohort, flow = build_cohort(typed, pat, SHIPPED, ev)
    assert cohort["hadm_id"].to_list() == [1] and cohort["prediction_time"].to_list() == [h(30)]
    assert (flow.excluded("unit type"), flow.excluded("no anchor"), flow.excluded("stay ended")) == (1, 1, 1)
    assert labels_of(SHIPPED, typed, pat, ev) == {1: True}


def test_death_within_30_days_counts_a_death_after_discharge_on_any_stay_and_not_day_31():
    uc = use_case(
        prediction_time={"anchor": "discharge"},
        outcome={"type": "death", "within_days": 30, "description": "death within 30 days of discharge"},
    )
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(5)},
            {"s": 1, "a": 11, "in": d(20), "out": d(34), "died": d(34)},  # died 29 days after discharge of 1
            {"s": 2, "a": 2, "in": d(0), "out": d(5)},
            {"s": 2, "a": 12, "in": d(30), "out": d(36), "died": d(36) + timedelta(minutes=1)},  # 31 days on
            {"s": 3, "a": 3, "in": d(0), "out": d(4), "died": d(4)},  # died in hospital: nothing to predict
            {"s": 4, "a": 4, "in": d(0), "out": d(60)},  # window open at the data's end
        ]
    )
    got = labels_of(uc, enc, pat)
    assert got[1] is True and got[2] is False
    assert 3 not in got
    assert 4 not in got  # discharged day 60, data end day 60: the 30-day window has not closed
    # the readmission stay of patient 1 that ends in death is itself an index stay only if discharged alive
    assert 11 not in got


# --- readmission ----------------------------------------------------------------------------------------


def readmission(**kw):
    outcome = {"type": "readmission", "within_days": 30, "description": "readmission within 30 days", **kw}
    return use_case(prediction_time={"anchor": "discharge"}, outcome=outcome)


def test_readmission_on_day_30_counts_day_31_does_not_and_death_or_transfer_are_excluded():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(3) + timedelta(hours=10)},
            {"s": 1, "a": 11, "in": d(33) + timedelta(hours=15), "out": d(40)},  # day 30 (30 d 5 h later)
            {"s": 2, "a": 2, "in": d(0), "out": d(3) + timedelta(hours=10)},
            {"s": 2, "a": 12, "in": d(34) + timedelta(hours=1), "out": d(40)},  # day 31
            {"s": 3, "a": 3, "in": d(0), "out": d(5), "died": d(5)},  # died: no index stay
            {"s": 4, "a": 4, "in": d(0), "out": d(5), "disp": "TRANSFER"},
            {"s": 4, "a": 14, "in": d(5) + timedelta(hours=1), "out": d(9)},  # the transfer's next stay
            {"s": 5, "a": 5, "in": d(0), "out": d(5)},
            {"s": 9, "a": 9, "in": d(120), "out": d(121)},  # the data run to day 121
        ]
    )
    uc = readmission()
    _cohort, flow = build_cohort(enc, pat, uc)
    got = labels_of(uc, enc, pat)
    assert got[1] is True and got[2] is False and got[5] is False
    assert 3 not in got and 4 not in got
    assert flow.excluded("died in hospital") == 1 and flow.excluded("transferred") == 1
    assert got[14] is False  # the stay after the transfer is an index stay of its own, not readmitted
    assert 9 not in got  # its 30 days run past the data's end


def test_a_readmission_window_of_a_fractional_day_count_counts_whole_calendar_days_and_ignores_earlier_stays():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(3) + timedelta(hours=10)},
            {"s": 1, "a": 11, "in": d(33) + timedelta(hours=12), "out": d(40)},  # day 30: counts
            {"s": 2, "a": 2, "in": d(0), "out": d(3) + timedelta(hours=10)},
            {"s": 2, "a": 12, "in": d(34), "out": d(40)},  # day 31: 30.9 days allow 30 whole days only
            # an overlapping stay (admitted before the discharge) and an earlier one are no readmission
            {"s": 3, "a": 23, "in": d(0), "out": d(2)},
            {"s": 3, "a": 3, "in": d(4), "out": d(8)},
            {"s": 3, "a": 13, "in": d(7), "out": d(7) + timedelta(hours=20)},
            {"s": 9, "a": 9, "in": d(120), "out": d(121)},
        ]
    )
    uc = readmission(within_days=30.9)
    got = labels_of(uc, enc, pat)
    assert got[1] is True and got[2] is False and got[3] is False and got[13] is False
    assert got[23] is True  # stay 3 follows it within 2 days
    cohort, _ = build_cohort(enc, pat, uc)
    ends = dict(zip(cohort["hadm_id"].to_list(), cohort["label_window_end"].to_list(), strict=True))
    assert ends[1] == d(33) + timedelta(hours=12)  # known when the readmission happens
    assert ends[2] == datetime(2026, 1, 8) + timedelta(days=31)  # else at the end of day 30 after it


def test_unplanned_readmission_ignores_an_elective_return():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(3)},
            {"s": 1, "a": 11, "in": d(10), "out": d(12), "type": "ELECTIVE"},
            {"s": 9, "a": 9, "in": d(120), "out": d(121)},
        ]
    )
    assert labels_of(readmission(), enc, pat)[1] is True
    assert labels_of(readmission(unplanned_only=True), enc, pat)[1] is False


def test_dated_batches_hold_a_label_back_until_the_data_cover_its_window():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(2), "batch": "2026-01-05"},
            {"s": 2, "a": 2, "in": d(14), "out": d(16), "batch": "2026-01-19"},
            {"s": 3, "a": 3, "in": d(40), "out": d(41), "batch": "2026-02-14"},
        ]
    )
    # the last batch (2026-02-14) covers as long as the gap before it (26 days)
    assert data_end(enc) == datetime(2026, 3, 12)
    got = labels_of(readmission(), enc, pat)
    # stay 1: known 2026-01-05 + 33 days = 2026-02-07; stay 2: 2026-01-19 + 33 days = 2026-02-21, both by
    # the end; stay 3: 2026-02-14 + 32 days = 2026-03-18, after it
    assert got == {1: False, 2: False}
    assert labels_of(readmission(), enc, pat, known_by=datetime(2026, 3, 31)) == {
        1: False,
        2: False,
        3: False,
    }


# --- events ---------------------------------------------------------------------------------------------

AKI = {
    "type": "event",
    "code": "LAB//2160-0",
    "value": {"at_least_times_baseline": 1.5},
    "window_hours": 48,
    "description": "KDIGO creatinine >= 1.5x baseline within 48 h",
}
CREAT = "LAB//2160-0"


def test_an_event_exactly_at_the_window_boundary_counts_and_a_minute_later_does_not():
    uc = use_case(outcome=AKI)
    enc, pat = stays([{"s": i, "a": i, "in": h(0), "out": h(200)} for i in (1, 2, 3, 4, 5)])
    ev = events(
        [
            (1, 1, CREAT, 1.0, h(2), h(3)),
            (1, 1, CREAT, 1.5, h(24 + 48), None),  # exactly at the boundary, exactly 1.5x
            (2, 2, CREAT, 1.0, h(2), h(3)),
            (2, 2, CREAT, 2.0, h(24 + 48) + timedelta(minutes=1), None),  # a minute late
            (3, 3, CREAT, 1.0, h(2), h(3)),
            (3, 3, CREAT, 1.6, h(20), h(21)),  # already 1.6x before the prediction time: excluded
            (4, 4, CREAT, 1.0, h(2), h(23.5)),
            (4, 4, CREAT, 1.4, h(30), None),  # below 1.5x
            (5, 5, CREAT, 1.0, h(23), h(25)),  # resulted after the prediction time: no baseline
        ]
    )
    _cohort, flow = build_cohort(enc, pat, uc, ev)
    assert labels_of(uc, enc, pat, ev) == {1: True, 2: False, 4: False}
    assert flow.excluded("outcome already present") == 1
    assert flow.excluded("no baseline") == 1


def test_an_absolute_value_rule_and_prevalent_events_kept_when_asked():
    outcome = {**AKI, "value": {"at_least": 2.0}, "exclude_prevalent": False}
    uc = use_case(outcome=outcome)
    enc, pat = stays(
        [{"s": 1, "a": 1, "in": h(0), "out": h(200)}, {"s": 2, "a": 2, "in": h(0), "out": h(200)}]
    )
    ev = events(
        [(1, 1, CREAT, 2.5, h(10), None), (1, 1, CREAT, 2.1, h(30), None), (2, 2, CREAT, 1.9, h(30), None)]
    )
    assert labels_of(uc, enc, pat, ev) == {1: True, 2: False}


def test_length_of_stay_beyond_72_hours_after_the_prediction_time():
    uc = use_case(outcome={"type": "length_of_stay", "beyond_hours": 72, "description": "stay > 72 h more"})
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": h(0), "out": h(24 + 72)},  # exactly 72 h more: not beyond
            {"s": 2, "a": 2, "in": h(0), "out": h(24 + 73)},
            {"s": 3, "a": 3, "in": h(0), "out": h(200), "died": h(60)},  # dies first
        ]
    )
    assert labels_of(uc, enc, pat) == {1: False, 2: True, 3: False}


# --- prediction times -----------------------------------------------------------------------------------


def test_icu_admission_and_first_code_anchors():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": h(0), "out": h(200)},
            {"s": 2, "a": 2, "in": h(0), "out": h(200)},  # never in an ICU, no lactate
        ]
    )
    ev = events([(1, 1, "ICU_UNIT//MICU", None, h(30), None), (1, 1, "LAB//2524-7", 3.0, h(40), h(41))])
    icu = use_case(prediction_time={"anchor": "icu_admission", "offset_hours": 24})
    cohort, flow = build_cohort(enc, pat, icu, ev)
    assert cohort["prediction_time"].to_list() == [h(54)] and flow.excluded("no anchor") == 1
    first = use_case(prediction_time={"anchor": "first_code", "code": "LAB//2524-7", "offset_hours": 1})
    cohort, _ = build_cohort(enc, pat, first, ev)
    assert cohort["prediction_time"].to_list() == [h(42)]  # anchored when the result is available


def test_repeated_predictions_stop_with_the_stay_and_features_only_see_their_own_past():
    uc = use_case(prediction_time={"anchor": "admission", "offset_hours": 4, "every_hours": 4})
    enc, pat = stays([{"s": 1, "a": 1, "in": h(0), "out": h(16)}, {"s": 2, "a": 2, "in": h(0), "out": h(3)}])
    cohort, flow = build_cohort(enc, pat, uc)
    assert cohort["prediction_time"].to_list() == [h(4), h(8), h(12)]  # not 16: the stay ends then
    assert flow.included == 1 and flow.predictions == 3
    ev = events([(1, 1, "VITAL//heart_rate", float(v), h(v), None) for v in (1, 5, 9, 13)])
    feats = build_features(ev, cohort, uc)
    assert feats["heart_rate__last_24h"].to_list() == [1.0, 5.0, 9.0]
    assert feats["heart_rate__count_24h"].to_list() == [1.0, 2.0, 3.0]


def test_history_features_count_earlier_admissions_and_codes_known_by_the_prediction_time():
    uc = use_case(
        prediction_time={"anchor": "discharge"},
        outcome={"type": "readmission", "within_days": 30, "description": "r"},
        features={
            **BASE.features.model_dump(mode="json"),
            "history": [{"days": 365}, {"days": 365, "code": "LAB//2524-7"}],
        },
    )
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(2)},
            {"s": 1, "a": 2, "in": d(100), "out": d(102)},
            {"s": 1, "a": 3, "in": d(500), "out": d(502)},  # 400 days after stay 2
        ]
    )
    ev = events([(1, 1, "LAB//2524-7", 4.0, d(1), None)])
    cohort, _ = build_cohort(enc, pat, uc, ev)
    hist = history_features(cohort, enc, ev, uc).sort("hadm_id")
    assert hist["history__admissions_365d"].to_list() == [0.0, 1.0, 0.0]
    assert hist["history__lactate_365d"].to_list() == [1.0, 1.0, 0.0]


# --- leakage properties -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    after=st.lists(st.tuples(st.floats(0.01, 400), st.floats(0.1, 9.0)), max_size=6),
    anchor=st.sampled_from(["admission", "icu_admission", "first_code"]),
    every=st.sampled_from([None, 6.0]),
)
def test_no_feature_or_exclusion_changes_with_data_after_the_prediction_time(after, anchor, every):
    """Adding events after every prediction time changes no cohort row and no feature, for every anchor."""
    pt = {"anchor": anchor, "offset_hours": 12, "every_hours": every}
    if anchor == "first_code":
        pt["code"] = "LAB//2524-7"
    uc = use_case(prediction_time=pt, outcome=AKI)
    enc, pat = stays([{"s": 1, "a": 1, "in": h(0), "out": h(48)}])
    base = [
        (1, 1, "ICU_UNIT//MICU", None, h(1), None),
        (1, 1, "LAB//2524-7", 2.0, h(2), h(3)),
        (1, 1, CREAT, 1.0, h(2), h(3)),
        (1, 1, "VITAL//heart_rate", 90.0, h(4), None),
    ]
    cohort, _ = build_cohort(enc, pat, uc, events(base))
    last = cohort["prediction_time"].max()
    if last is None:
        return
    late = [
        (1, 1, c, v, last + timedelta(hours=dh), None)
        for dh, v in after
        for c in (CREAT, "VITAL//heart_rate")
    ]
    cohort2, _ = build_cohort(enc, pat, uc, events(base + late))
    assert cohort2.equals(cohort)
    f1 = build_features(events(base), cohort, uc)
    f2 = build_features(events(base + late), cohort, uc)
    assert f1.equals(f2)


@settings(max_examples=40, deadline=None)
@given(outside=st.lists(st.floats(48.001, 500), max_size=6))
def test_no_event_label_uses_values_outside_its_window(outside):
    """Values after the window never change a label; a value inside it is what makes it."""
    uc = use_case(outcome=AKI)
    enc, pat = stays([{"s": 1, "a": 1, "in": h(0), "out": h(600)}])
    base = [(1, 1, CREAT, 1.0, h(1), None)]
    extra = [(1, 1, CREAT, 5.0, h(24 + x), None) for x in outside]
    assert labels_of(uc, enc, pat, events(base + extra)) == {1: False}
    inside = [(1, 1, CREAT, 5.0, h(24 + 10), None)]
    assert labels_of(uc, enc, pat, events(base + extra + inside)) == {1: True}


# --- the file -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "says"),
    [
        (
            {"outcome": {"type": "event", "code": "LAB//9999-9", "window_hours": 4, "description": "x"}},
            "9999-9",
        ),
        ({"features": {**BASE.features.model_dump(mode="json"), "codes": ["LAB//1234-5"]}}, "1234-5"),
        ({"outcome": {"type": "readmission", "description": "x"}}, "outcome.readmission.within_days"),
        ({"outcome": {"type": "sepsis", "description": "x"}}, "outcome"),
        ({"prediction_time": {"anchor": "first_code", "offset_hours": 1}}, "code is required"),
        ({"prediction_time": {"anchor": "discharge"}}, "cannot be predicted at discharge"),
        (
            {"population": {**BASE.population.model_dump(mode="json"), "discharge_dispositions": ["HOME"]}},
            "only known at discharge",
        ),
    ],
)
def test_a_bad_question_is_refused_naming_the_field(update, says):
    with pytest.raises(UseCaseError, match=says):
        use_case(**update)


def test_a_file_written_before_outcome_types_still_loads():
    text = (Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml").read_text()
    legacy = text.replace("type: death", "name: in_hospital_death\n  window: until hospital discharge")
    uc = parse_use_case(legacy)
    assert uc.outcome.type == "death" and uc.words.events == "deaths"


def test_the_documented_vocabulary_is_the_one_the_code_checks_against():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "usecases.md").read_text()
    table = doc.split("<!-- vocabulary:start -->\n", 1)[1].split("\n<!-- vocabulary:end -->", 1)[0]
    from clinical_ml.core.units import vocabulary_markdown

    assert table == vocabulary_markdown()


def test_a_supplied_label_is_the_latest_one_recorded_for_the_stay_and_unlabelled_stays_wait():
    uc = use_case(
        outcome={"type": "supplied_label", "label": "delirium_review", "description": "chart review"}
    )
    enc, pat = stays([{"s": i, "a": i, "in": h(0), "out": h(100)} for i in (1, 2, 3)])
    ev = events(
        [
            (1, 1, "LABEL//delirium_review", 0.0, h(50), d(20)),
            (1, 1, "LABEL//delirium_review", 1.0, h(50), d(30)),  # a second review overrules the first
            (2, 2, "LABEL//delirium_review", 0.0, None, d(25)),
            (3, 3, "LABEL//other_review", 1.0, h(50), d(20)),  # another label: stay 3 waits for its own
        ]
    )
    cohort, _ = build_cohort(enc, pat, uc, ev)
    assert labels_of(uc, enc, pat, ev) == {1: True, 2: False}
    ends = dict(zip(cohort["hadm_id"].to_list(), cohort["label_window_end"].to_list(), strict=True))
    assert ends[1] == d(30) and ends[2] == d(25) and ends[3].year == 9999
    assert uc.words.events == "positive delirium review labels"


def test_monitoring_counts_a_readmission_outcome_only_30_days_after_discharge():
    from clinical_ml.core.performance_monitoring import label_maturity

    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(3), "batch": "2026-01-05"},
            {"s": 9, "a": 9, "in": d(120), "out": d(121), "batch": "2026-05-05"},
        ]
    )
    cohort, _ = build_cohort(enc, pat, readmission())
    first = cohort.filter(pl.col("hadm_id") == 1)
    # discharged on day 3 of a batch delivered 2026-01-05: known at the end of day 30 after discharge
    assert not label_maturity(first, as_of=datetime(2026, 2, 7)).item()
    assert label_maturity(first, as_of=datetime(2026, 2, 8)).item()
    mortality, _ = build_cohort(enc, pat, BASE)
    assert label_maturity(mortality.filter(pl.col("hadm_id") == 1), as_of=datetime(2026, 1, 8, 9)).item()


def test_a_readmission_near_the_end_of_the_data_is_known_when_it_happens():
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(100), "out": d(102)},
            {"s": 1, "a": 11, "in": d(110), "out": d(112)},  # readmitted 8 days later, 11 days before the end
            {"s": 2, "a": 2, "in": d(100), "out": d(102)},  # not readmitted: its 30 days are still open
            {"s": 9, "a": 9, "in": d(120), "out": d(121)},
        ]
    )
    got = labels_of(readmission(), enc, pat)
    assert got.get(1) is True and 2 not in got


def test_a_death_is_counted_as_a_death_before_the_population_disposition_list():
    uc = use_case(
        prediction_time={"anchor": "discharge"},
        outcome={"type": "readmission", "within_days": 30, "description": "r"},
        population={**BASE.population.model_dump(mode="json"), "discharge_dispositions": ["HOME"]},
    )
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(2), "died": d(2)},
            {"s": 2, "a": 2, "in": d(0), "out": d(2), "disp": "SNF"},
            {"s": 3, "a": 3, "in": d(0), "out": d(2)},
        ]
    )
    _, flow = build_cohort(enc, pat, uc)
    assert flow.excluded("died in hospital") == 1
    assert flow.excluded("discharge disposition") == 1 and flow.included == 1


def test_a_result_without_a_value_does_not_hide_a_prevalent_event_and_a_death_after_discharge_keeps_the_index():
    uc = use_case(outcome=AKI)
    enc, pat = stays([{"s": 1, "a": 1, "in": h(0), "out": h(200)}])
    ev = events(
        [(1, 1, CREAT, 1.0, h(2), None), (1, 1, CREAT, None, h(5), None), (1, 1, CREAT, 1.6, h(10), None)]
    )
    _, flow = build_cohort(enc, pat, uc, ev)
    assert flow.excluded("outcome already present") == 1
    # an index stay whose encounter records a death after its discharge (e.g. a death registry) is an index
    # stay: only a death in hospital rules a readmission out
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(3), "died": d(40)},
            {"s": 9, "a": 9, "in": d(120), "out": d(121)},
        ]
    )
    assert labels_of(readmission(), enc, pat) == {1: False}


def test_repeated_predictions_built_in_parts_equal_the_whole(monkeypatch):
    from clinical_ml.core import features

    uc = use_case(prediction_time={"anchor": "admission", "offset_hours": 2, "every_hours": 3})
    enc, pat = stays([{"s": i, "a": i, "in": h(0), "out": h(20 + i)} for i in range(1, 9)])
    ev = events(
        [
            (i, i, "VITAL//heart_rate", float(60 + i + t), h(t), None)
            for i in range(1, 9)
            for t in range(0, 26, 2)
        ]
    )
    cohort, _ = build_cohort(enc, pat, uc)
    whole = build_features(ev, cohort, uc)
    monkeypatch.setattr(features, "MAX_ROWS_PER_PART", 7)
    parts = build_features(ev.lazy(), cohort, uc)
    assert parts.equals(whole) and whole.height == cohort.height > 8


def test_a_population_of_icu_stays_only_by_the_site_mapping_unit_types():
    uc = use_case(population={**BASE.population.model_dump(mode="json"), "unit_types": ["ICU"]})
    enc, pat = stays([{"s": i, "a": i, "in": h(0), "out": h(100)} for i in (1, 2, 3)])
    typed = enc.with_columns(pl.Series("unit_type", ["ICU", "WARD", None]))
    cohort, flow = build_cohort(typed, pat, uc)
    assert cohort["hadm_id"].to_list() == [1] and flow.excluded("unit type not in") == 1
    assert flow.excluded("no unit type recorded") == 1
    # data written before units had types: nobody can be shown to be in an ICU, and the flow says why
    _, old = build_cohort(enc, pat, uc)
    assert old.included == 0 and old.excluded("no unit type recorded") == 3
    assert any(label.endswith("run its batch's anonymization again)") for label, _ in old.steps)
    # with every unit typed, no empty step is added to the participant flow
    _, all_typed = build_cohort(typed.filter(pl.col("unit_type").is_not_null()), pat, uc)
    assert not any(label.startswith("no unit type") for label, _ in all_typed.steps)


def test_a_stay_failing_several_exclusions_is_counted_once_by_the_first_and_redeliveries_collapse():
    """The flow counts each excluded stay under the first exclusion it fails (in the order the steps are
    listed), however the steps are applied; a stay or patient delivered twice counts once (its last row)."""
    uc = replaced(
        readmission(),
        population={
            **BASE.population.model_dump(mode="json"),
            "admission_types": ["EMERGENCY"],
            "units": ["MICU", "SICU"],
        },
    )
    enc, pat = stays(
        [
            {"s": 1, "a": 1, "in": d(0), "out": d(2), "age": 16.0, "died": d(2), "unit": "CCU"},  # under age
            {"s": 2, "a": 2, "in": d(0), "out": d(2), "died": d(2), "type": "ELECTIVE"},  # died in hospital
            {"s": 3, "a": 3, "in": d(0), "out": d(2), "disp": "TRANSFER", "unit": "CCU"},  # transferred
            {"s": 4, "a": 4, "in": d(0), "out": d(2), "unit": "CCU", "type": "ELECTIVE"},  # unit
            {"s": 5, "a": 5, "in": d(0), "out": d(2), "type": "ELECTIVE"},  # admission type
            {"s": 6, "a": 6, "in": d(0), "out": d(2), "unit": "CCU"},  # delivered first in the CCU ...
            {"s": 6, "a": 6, "in": d(0), "out": d(2)},  # ... then again in the MICU: included
            {"s": 7, "a": 7, "in": d(0), "out": d(2)},  # included
            {"s": 8, "a": 8, "in": d(0), "out": d(2), "age": 17.0},  # under age
        ]
    )
    pat = pl.concat([pat, pat.filter(pl.col("subject_id") == 7).with_columns(pl.lit(None).alias("sex"))])
    cohort, flow = build_cohort(enc, pat, uc)
    assert flow.admissions == 8
    assert [(label.split(" (")[0], n) for label, n in flow.steps] == [
        ("under 18 years", 2),
        ("died in hospital", 1),
        ("transferred to another hospital", 1),
        ("unit not in the population", 1),
        ("admission type not in the population", 1),
        ("demographics missing", 1),  # patient 7's last row has no sex
    ]
    assert cohort["hadm_id"].to_list() == [6] and flow.included == flow.predictions == 1
