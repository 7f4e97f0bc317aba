"""The service's per-request shortcuts equal the batch path's code, for any input (property-based).

The point of care reads one stay in plain Python where the batch path uses polars over many: unit
harmonisation, age, coded values, the windowed aggregates and the feature row's layout. Each is held equal
here to the batch function it stands for, on generated inputs, so a change to either side fails here.
"""

import math
from array import array
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.core.anonymization import age_in_years
from clinical_ml.core.features import (
    ROW_KEY,
    build_features,
    feature_matrix,
    stay_aggregates,
    stem_aggregates,
)
from clinical_ml.core.ingestion import _harmonize_units
from clinical_ml.core.registry import Registry
from clinical_ml.core.site_mapping import enforce_controlled_values
from clinical_ml.core.units import LAB_CODES, UNIT_CONVERSIONS, VITAL_CODES, canonical_unit
from clinical_ml.serve.chart import Chart, CodedValues, _measurements, age_years, harmonized
from clinical_ml.serve.models import served_model
from clinical_ml_tests.serve.conftest import USE_CASE, use_case

CODES = [*LAB_CODES, *VITAL_CODES]
# every unit the vocabulary converts, every canonical unit, and units it does not know
PAIRS = sorted(
    {*UNIT_CONVERSIONS, *((c, canonical_unit(c)) for c in CODES)}
    | {(c, u) for c in CODES[:3] for u in ("furlongs", "MG/DL", "")}
)
_values = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12) | st.sampled_from(
    [0.0, -0.0, 1.0, 1e308, -1e308, 5e-324]
)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(values=st.lists(_values, min_size=1, max_size=8))
def test_unit_harmonisation_is_ingestions(values: list[float]) -> None:
    rows = [(c, u, v) for c, u in PAIRS for v in values]
    frame = pl.DataFrame(
        {"code": [r[0] for r in rows], "unit": [r[1] for r in rows], "value": [r[2] for r in rows]},
        schema={"code": pl.String, "unit": pl.String, "value": pl.Float64},
    )
    batch = _harmonize_units(frame, "code").select("value", "unit_known", "implausible").rows()
    for (code, unit, value), (b_value, b_known, b_implausible) in zip(rows, batch, strict=True):
        mine = harmonized(code, value, unit)
        assert (mine is not None) == b_known, (code, unit)
        if mine is not None:
            assert mine == (b_value, b_implausible), (code, unit, value)
    # a chart's measurements apply the same rule (inline there), then round each value to Float32
    at = [datetime(2026, 1, 1) + timedelta(minutes=i) for i in range(len(rows))]
    not_used: dict[str, int] = {}
    measured = _measurements([(c, v, u, t, t) for (c, u, v), t in zip(rows, at, strict=True)], not_used)
    known = [(r, b) for r, b in zip(rows, batch, strict=True) if b[1]]
    assert not_used.get("unknown_unit", 0) == len(rows) - len(known)
    assert [(m[3], m[4]) for m in measured] == [(array("f", [b[0]])[0], b[2]) for _, b in known]


@FAST
@given(
    pairs=st.lists(
        st.tuples(
            st.dates(min_value=date(1900, 1, 1), max_value=date(2030, 12, 31)),
            st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2040, 12, 31)),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_age_is_the_anonymizers(pairs: list[tuple[date, datetime]]) -> None:
    frame = pl.DataFrame(
        {"birth": [p[0] for p in pairs], "at": [p[1] for p in pairs]},
        schema={"birth": pl.Date, "at": pl.Datetime("us")},
    )
    batch = frame.select(age_in_years(pl.col("birth"), pl.col("at")))[:, 0].to_list()
    assert [age_years(b, at) for b, at in pairs] == batch


def test_coded_values_are_the_boundarys_and_remembered(site_mapping) -> None:
    coded = CodedValues(site_mapping, remember=2)
    for admission_type, unit, site in [
        ("EMERGENCY", "MICU", None),
        ("emergency ", "Room 12 next to the window", "SITE_A"),
        (None, None, None),
        ("EMERGENCY", "MICU", None),  # again, from memory
    ]:
        frame = pl.DataFrame(
            {"admission_type": [admission_type], "unit": [unit], "site": [site]},
            schema=dict.fromkeys(("admission_type", "unit", "site"), pl.String),
        )
        expected = enforce_controlled_values(frame, "encounters", site_mapping)[0].row(0)
        assert coded.stay(admission_type=admission_type, unit=unit, site=site) == expected[:3]
    assert coded.sex("female") == "F" and coded.sex("something else") == "unmapped"
    assert len(coded._seen) == 2  # bounded
    assert coded.stay(admission_type="x" * 10_000, unit=None, site=None)[0] == "unmapped"
    assert all(len(str(k)) < 1000 for k in coded._seen)  # long text is recoded, never remembered


# -- the windowed aggregates and the feature row ---------------------------------------------------------
PREDICTED = datetime(2026, 3, 3, 14, 0)
ADMITTED = PREDICTED - timedelta(hours=30)


def _all_aggregates_use_case():
    uc = use_case()
    features = uc.features.model_copy(
        update={
            "window_hours": [6.0, 24.0],
            "aggregations": ["last", "min", "max", "mean", "count", "slope", "time_since_last"],
        }
    )
    return uc.model_copy(update={"features": features})


_event = st.tuples(
    st.sampled_from(["LAB//2524-7", "LAB//2160-0", "VITAL//heart_rate", "VITAL//spo2", "LAB//9999-9"]),
    st.integers(min_value=-40 * 60, max_value=120),  # minutes from the prediction time
    st.integers(min_value=0, max_value=180),  # minutes until available
    st.sampled_from([1.0, 2.5, 97.0]) | st.floats(min_value=-1e6, max_value=1e6, width=32),
    st.booleans(),
)


def _chart(events, *, unit: str | None = "MICU", sex: str | None = "F", age: int | None = 70) -> Chart:
    measurements = tuple(
        (
            code,
            PREDICTED + timedelta(minutes=t),
            PREDICTED + timedelta(minutes=t + delay),
            float(np.float32(value)),
            implausible,
        )
        for code, t, delay, value, implausible in events
    )
    stay = {
        "subject_id": 1,
        "hadm_id": 1,
        "prediction_time": PREDICTED,
        "admit_time": ADMITTED,
        "age_years": age,
        "sex": sex,
        "admission_type": "EMERGENCY",
        "unit": unit,
        "site": None,
    }
    return Chart(stay=stay, measurements=measurements, admissions=(ADMITTED,))


def _same(a, b, *, rel: float = 0.0) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a == b or (rel > 0 and math.isclose(a, b, rel_tol=rel, abs_tol=0.0))


# Means and slopes are sums of floats: polars' own result for the same rows differs in the last bits between
# query plans and engines (five rows gave a slope ending ...946 through the batch plan, ...945 in-memory,
# ...918 from a collected frame), so neither path can promise the other's last bit; they must agree to 1e-12.
SUMS = ("__mean_", "__slope_")


@FAST
@given(events=st.lists(_event, max_size=40))
def test_one_stays_aggregates_are_the_batch_paths(events) -> None:
    uc = _all_aggregates_use_case()
    chart = _chart(events)
    long = stem_aggregates(chart.events, chart.cohort, uc)
    names = [c for c in long.columns if c not in (*ROW_KEY, "stem")]
    batch = {f"{r['stem']}__{n}": r[n] for r in long.iter_rows(named=True) for n in names}
    mine = stay_aggregates(chart.measurements, PREDICTED, uc)
    assert mine.keys() == batch.keys()
    differ = [k for k in batch if not _same(mine[k], batch[k], rel=1e-12 if any(s in k for s in SUMS) else 0)]
    assert not differ


@pytest.fixture(scope="module")
def served(trained_registry):
    registry = Registry(trained_registry, USE_CASE)
    version = registry.champion()
    assert version is not None
    return served_model(registry, use_case(), version)


@FAST
@given(
    events=st.lists(_event, max_size=30),
    unit=st.sampled_from(["MICU", "SICU", "unmapped", None]),
    sex=st.sampled_from(["F", "M", None]),
    age=st.sampled_from([17, 70, 90, None]),
)
def test_the_served_feature_row_is_build_features_row(served, events, unit, sex, age) -> None:
    chart = _chart(events, unit=unit, sex=sex, age=age)
    names = list(served.card.feature_names)
    batch = build_features(chart.events, chart.cohort, served.use_case, served.categories(chart.cohort))
    theirs = feature_matrix(batch, names)[0]
    mine = feature_matrix(served.features(chart), names)[0]
    sums = np.array([any(s in n for s in SUMS) for n in names])
    assert np.array_equal(mine[~sums], theirs[~sums], equal_nan=True)
    assert np.allclose(mine[sums], theirs[sums], rtol=1e-12, atol=0, equal_nan=True)
    # and the vector scoring uses is that row
    _score, values = served.score(chart)
    assert np.array_equal(
        np.array([np.nan if values[n] is None else values[n] for n in names]), theirs, equal_nan=True
    )
