"""Windowed features: the leakage rule, each aggregate, missingness indicators, and the splits."""

import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from clinical_ml.core.features import (
    build_features,
    derivation_validation_split,
    feature_columns,
    patient_grouped_split,
    temporal_split,
    validation_design,
    validation_rows,
)
from clinical_ml.core.usecase import Features, load_use_case

USE_CASE = load_use_case(Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml")
T0 = datetime(2026, 1, 5, 8, 0)
PRED = T0 + timedelta(hours=24)


def _use_case(**features):
    base = {
        "window_hours": [24, 6],
        "aggregations": ["last", "min", "max", "mean", "count", "slope", "time_since_last"],
        "codes": ["LAB//2524-7", "VITAL//heart_rate"],
        "static": ["age_years"],
        "missing_indicators": True,
    }
    return USE_CASE.model_copy(update={"features": Features(**{**base, **features})})


def _cohort(n: int = 2) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "subject_id": list(range(1, n + 1)),
            "hadm_id": list(range(101, 101 + n)),
            "prediction_time": [PRED] * n,
            "age_years": [60.0 + i for i in range(n)],
        }
    )


def _events(rows: list[tuple[int, str, float, float, float]]) -> pl.DataFrame:
    """(hadm_id, code, value, charted hours after T0, available hours after T0)."""
    return pl.DataFrame(
        {
            "hadm_id": [r[0] for r in rows],
            "code": [r[1] for r in rows],
            "numeric_value": pl.Series([r[2] for r in rows], dtype=pl.Float32),
            "time": [T0 + timedelta(hours=r[3]) for r in rows],
            "available_time": [T0 + timedelta(hours=r[4]) for r in rows],
            "implausible": [False] * len(rows),
        }
    )


BASE_ROWS = [
    (101, "LAB//2524-7", 2.0, 2.0, 3.0),
    (101, "LAB//2524-7", 3.0, 12.0, 13.0),
    (101, "LAB//2524-7", 4.0, 20.0, 21.0),
    (101, "VITAL//heart_rate", 90.0, 22.0, 22.0),
    (102, "VITAL//heart_rate", 120.0, 23.0, 23.5),
]


def test_aggregates_match_hand_computation():
    feats = build_features(_events(BASE_ROWS), _cohort(), _use_case()).filter(pl.col("hadm_id") == 101)
    row = feats.row(0, named=True)
    assert row["lactate__last_24h"] == 4.0
    assert row["lactate__min_24h"] == 2.0
    assert row["lactate__max_24h"] == 4.0
    assert row["lactate__mean_24h"] == pytest.approx(3.0)
    assert row["lactate__count_24h"] == 3.0
    t = np.array([2.0, 12.0, 20.0])
    assert row["lactate__slope_24h"] == pytest.approx(np.polyfit(t, [2.0, 3.0, 4.0], 1)[0])
    assert row["lactate__time_since_last_24h"] == pytest.approx(4.0)
    # the 6 h window (18 h to 24 h after admission) holds only the 20 h value
    assert row["lactate__count_6h"] == 1.0
    assert row["lactate__missing_24h"] == 0.0


def test_missing_indicators_and_counts_for_unmeasured_codes():
    feats = build_features(_events(BASE_ROWS), _cohort(3), _use_case())
    by_id = {r["hadm_id"]: r for r in feats.iter_rows(named=True)}
    assert by_id[102]["lactate__missing_24h"] == 1.0
    assert by_id[102]["lactate__count_24h"] == 0.0
    assert by_id[102]["lactate__last_24h"] is None
    assert by_id[102]["heart_rate__missing_24h"] == 0.0
    assert all(v == 1.0 for k, v in by_id[103].items() if "__missing_" in k)
    assert feats.columns[3:] == feature_columns(_use_case())


def test_a_lazy_scan_of_the_events_gives_the_same_features(tmp_path):
    path = tmp_path / "events.parquet"
    _events(BASE_ROWS).write_parquet(path)
    eager = build_features(_events(BASE_ROWS), _cohort(3), _use_case())
    lazy = build_features(pl.scan_parquet(path), _cohort(3), _use_case())
    assert eager.height == 3 and lazy.equals(eager)


def test_without_missing_indicators_no_indicator_columns():
    cols = feature_columns(_use_case(missing_indicators=False))
    assert not [c for c in cols if "__missing_" in c]


LATER = [
    # resulted after the prediction time although drawn before it: not known at prediction time
    (101, "LAB//2524-7", 15.0, 23.0, 25.0),
    # charted and resulted after the prediction time
    (101, "VITAL//heart_rate", 200.0, 30.0, 30.0),
    (102, "LAB//2524-7", 9.0, 26.0, 27.0),
]


def test_values_available_after_the_prediction_time_change_no_feature():
    uc = _use_case()
    before = build_features(_events(BASE_ROWS), _cohort(), uc)
    after = build_features(_events(BASE_ROWS + LATER), _cohort(), uc)
    assert before.equals(after)


def test_a_value_available_exactly_at_the_prediction_time_is_used():
    uc = _use_case()
    before = build_features(_events(BASE_ROWS), _cohort(), uc)
    at = build_features(_events([*BASE_ROWS, (102, "LAB//2524-7", 9.0, 23.0, 24.0)]), _cohort(), uc)
    assert not before.equals(at)
    assert at.filter(pl.col("hadm_id") == 102)["lactate__last_24h"][0] == 9.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([101, 102]),
            st.sampled_from(["LAB//2524-7", "VITAL//heart_rate"]),
            st.floats(-50, 300, allow_nan=False, width=32),
            st.floats(-30, 48),
            st.floats(0, 30),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_no_feature_ever_depends_on_a_later_available_value(rows):
    """Property: perturb or drop every event whose availability is after the prediction time (24 h);
    no feature of any admission may change. Any feature reading a later value fails this."""
    events = [(h, c, v, t, t + d) for h, c, v, t, d in rows]
    uc = _use_case()
    known = [e for e in events if e[4] <= 24.0]
    later = [e for e in events if e[4] > 24.0]
    altered = [(h, c, v * 3 + 7, t, a) for h, c, v, t, a in later]
    ref = build_features(_events(known), _cohort(), uc) if known else None
    full = build_features(_events(known + altered), _cohort(), uc)
    if ref is not None:
        # equal up to float rounding of the sums (row order may differ); a leak changes values by far more
        assert_frame_equal(full, ref, rel_tol=1e-9, abs_tol=1e-9)
    else:
        assert all(v == 1.0 for c in full.columns if "__missing_" in c for v in full[c])


def _multi_period_cohort(n_subjects: int = 300, seed: int = 3) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    subjects = rng.integers(1, n_subjects, n_subjects * 2)
    periods = rng.choice(["2014", "2015"], size=len(subjects), p=[0.6, 0.4])
    return pl.DataFrame({"subject_id": subjects, "hadm_id": np.arange(len(subjects)), "period": periods})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_patient_split_puts_no_patient_in_both_cohorts(seed):
    cohort = _multi_period_cohort(seed=seed)
    splits = patient_grouped_split(cohort, validation_fraction=0.3, tuning_fraction=0.2, seed=seed)
    assert splits["subject_id"].is_unique().all()
    assert set(splits["subject_id"]) == set(cohort["subject_id"])
    assert set(splits["split"]) == {"train", "tuning", "held_out"}
    share = (splits["split"] == "held_out").mean()
    assert 0.25 < share < 0.35


def test_temporal_split_holds_out_the_latest_period_and_no_patient_twice():
    cohort = _multi_period_cohort()
    splits, info = derivation_validation_split(
        cohort, strategy="temporal", validation_periods=None, fraction=0.3, tuning_fraction=0.2, seed=0
    )
    assert info.strategy == "temporal"
    assert info.validation_periods == ("2015",)
    joined = cohort.join(splits, on="subject_id")
    held = set(joined.filter(pl.col("split") == "held_out")["subject_id"])
    deriv = set(joined.filter(pl.col("split") != "held_out")["subject_id"])
    assert held and deriv and not held & deriv
    # every derivation admission precedes the validation period
    assert set(joined.filter(pl.col("split") != "held_out")["period"]) == {"2014"}
    # validation rows are the held-out admissions of 2015 only
    rows = joined.filter(validation_rows(info)).filter(pl.col("split") == "held_out")
    assert set(rows["period"]) == {"2015"}
    assert rows.height == cohort.filter(pl.col("period") == "2015").height


def test_temporal_split_with_explicit_periods_and_tuning_from_derivation_only():
    cohort = _multi_period_cohort()
    splits = temporal_split(cohort, validation_periods=["2015"], tuning_fraction=0.25, seed=1)
    joined = cohort.join(splits, on="subject_id")
    assert set(joined.filter(pl.col("split") == "tuning")["period"]) == {"2014"}


def test_temporal_falls_back_to_patient_split_on_a_single_period():
    cohort = _multi_period_cohort().with_columns(pl.lit("2026Q1").alias("period"))
    splits, info = derivation_validation_split(
        cohort, strategy="temporal", validation_periods=None, fraction=0.3, tuning_fraction=0.2, seed=0
    )
    assert info.strategy == "patient" and info.requested == "temporal"
    assert "do not span" in info.note
    assert (splits["split"] == "held_out").any()


@pytest.mark.parametrize(
    ("strategy", "periods", "words", "not_words"),
    [
        (
            "temporal",
            None,
            ["Temporal validation", "admitted in 2014", "validated on patients admitted in 2015"],
            ["Internal validation", "same hospitals and period"],
        ),
        (
            "patient",
            None,
            ["Internal validation", "a random 30% of the patients", "same hospitals and period"],
            ["Temporal", "asked for"],
        ),
        (
            "temporal",
            ["2030"],
            ["Internal validation", "temporal validation was asked for"],
            ["Temporal validation"],
        ),
    ],
)
def test_the_validation_design_is_named_from_the_split_applied(strategy, periods, words, not_words):
    _, info = derivation_validation_split(
        _multi_period_cohort(),
        strategy=strategy,
        validation_periods=periods,
        fraction=0.3,
        tuning_fraction=0.2,
        seed=0,
    )
    sentence = validation_design(info, fraction=0.3)
    for w in words:
        assert w in sentence
    for w in not_words:
        assert w not in sentence


def test_patient_split_is_stable_when_new_patients_arrive():
    cohort = _multi_period_cohort()
    grown = pl.concat(
        [
            cohort,
            pl.DataFrame(
                {
                    "subject_id": np.arange(1000, 1400),
                    "hadm_id": np.arange(5000, 5400),
                    "period": ["2016"] * 400,
                }
            ),
        ]
    )
    a = patient_grouped_split(cohort, validation_fraction=0.3, tuning_fraction=0.2, seed=5)
    b = patient_grouped_split(grown, validation_fraction=0.3, tuning_fraction=0.2, seed=5)
    assert a.join(b, on="subject_id", suffix="_b").filter(pl.col("split") != pl.col("split_b")).height == 0
    c = patient_grouped_split(cohort, validation_fraction=0.3, tuning_fraction=0.2, seed=6)
    assert not a.equals(c)


def test_a_year_names_every_quarter_of_it():
    cohort = _multi_period_cohort().with_columns(
        pl.col("period").replace_strict({"2014": "2014Q2", "2015": "2015Q3"}, return_dtype=pl.String)
    )
    _, info = derivation_validation_split(
        cohort, strategy="temporal", validation_periods=["2015"], fraction=0.3, tuning_fraction=0.2, seed=0
    )
    assert info.strategy == "temporal" and info.validation_periods == ("2015Q3",)


@pytest.mark.parametrize(
    ("rows", "events", "says"),
    [
        ({"train": 0, "tuning": 0}, {}, "derivation cohort is empty (0 training and 0 tuning"),
        ({"train": 40, "tuning": 0}, {"train": 5}, "derivation cohort is empty (40 training and 0 tuning"),
        ({"train": 40, "tuning": 20}, {"train": 5}, "0 in its 20 tuning admissions"),
        ({"train": 40, "tuning": 20}, {"tuning": 3}, "has 0 outcome events in its 40 training"),
    ],
)
def test_a_cohort_a_model_cannot_learn_from_is_refused_with_its_counts(rows, events, says):
    from clinical_ml.core.features import feature_columns
    from clinical_ml.core.training import fit_model

    cols = feature_columns(USE_CASE)
    n = sum(rows.values())
    split = [s for s, k in rows.items() for _ in range(k)]
    label = [i < events.get(s, 0) for s, k in rows.items() for i in range(k)]
    frame = pl.DataFrame(
        {c: np.zeros(n) for c in cols} | {"split": split, "boolean_value": label},
        schema_overrides={"split": pl.String, "boolean_value": pl.Boolean},
    )
    with pytest.raises(ValueError, match=re.escape(says)):
        fit_model(frame, USE_CASE)


def test_features_do_not_depend_on_the_order_the_events_arrive_in():
    """Same inputs, same outputs: the de-identified events are written in the order of a parallel join, so
    two runs deliver the same rows in different orders; every aggregate (slopes and means are sums of
    floats, whose rounding depends on the order) must come out bit for bit the same."""
    rng = np.random.default_rng(5)
    n = 6000
    rows = [
        (
            int(101 + rng.integers(0, 40)),
            str(rng.choice(["LAB//2524-7", "VITAL//heart_rate"])),
            float(rng.normal(80, 25)),
            float(rng.uniform(0, 23.5)),
            0.0,
        )
        for _ in range(n)
    ]
    events = _events([(h, c, v, t, t) for h, c, v, t, _ in rows])
    cohort, uc = _cohort(40), _use_case()
    reference = build_features(events, cohort, uc)
    for seed in (1, 2, 3):
        shuffled = events.sample(fraction=1.0, shuffle=True, seed=seed)
        assert_frame_equal(build_features(shuffled, cohort, uc), reference, check_exact=True)


def test_a_broader_code_feature_takes_every_method_and_a_method_feature_only_its_own():
    from clinical_ml.core.features import stay_aggregates
    from clinical_ml.core.units import BROADER_CODES

    arterial, cuff = sorted(c for c, b in BROADER_CODES.items() if b == "VITAL//mean_bp")
    uc = _use_case(codes=["VITAL//mean_bp", arterial], window_hours=[24], aggregations=["count", "min"])
    rows = [
        (101, arterial, 60.0, 20.0, 20.0),
        (101, cuff, 75.0, 20.0, 20.0),  # the same minute by another method: a second measurement
        (101, "VITAL//mean_bp", 80.0, 21.0, 21.0),
        (102, "VITAL//heart_rate", 80.0, 21.0, 21.0),
    ]
    feats = build_features(_events(rows), _cohort(), uc).row(0, named=True)
    assert (feats["mean_arterial_pressure__count_24h"], feats["mean_arterial_pressure__min_24h"]) == (
        3.0,
        60.0,
    )
    assert feats["mean_arterial_pressure_arterial_line__count_24h"] == 1.0
    # the point of care's one-stay path counts the same way
    stay = [
        (code, T0 + timedelta(hours=t), T0 + timedelta(hours=a), v, False)
        for h, code, v, t, a in rows
        if h == 101
    ]
    assert stay_aggregates(stay, PRED, uc) == {k: v for k, v in feats.items() if "__" in k}
