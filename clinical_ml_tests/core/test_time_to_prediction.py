"""Time to prediction on the batch path (issue 20 item 7): from the ledger's landing to the predictions."""

from datetime import UTC, datetime, timedelta

import pytest

from clinical_ml.core.time_to_prediction import PredictionTiming, landed_at, prediction_timing

T0 = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


def test_landing_is_the_batchs_first_ledger_entry():
    entries: list[dict] = [
        {"recorded_at": (T0 + timedelta(minutes=5)).isoformat()},
        {"recorded_at": T0.isoformat()},
        {"recorded_at": "not a time"},
        {"recorded_at": None},
        {},
    ]
    assert landed_at(entries) == T0.isoformat()
    assert landed_at([{"recorded_at": "2026-03-02T06:00:00"}]) is None  # no zone: not comparable
    assert landed_at([]) is None


@pytest.mark.parametrize(("hours", "within"), [(2.5, True), (24.0, True), (30.0, False)])
def test_hours_and_the_limit(hours, within):
    t = prediction_timing(
        batch_id="b1", landed=T0.isoformat(), now=T0 + timedelta(hours=hours), limit_hours=24, previous=None
    )
    assert t.hours == pytest.approx(hours) and t.within_limit is within
    assert (" within " in t.sentence()) is within and f"{hours:.2f} h" in t.sentence()
    assert PredictionTiming.from_dict(t.as_dict()) == t


def test_a_rescoring_keeps_the_first_time_and_a_redelivery_starts_again():
    first = prediction_timing(
        batch_id="b1", landed=T0.isoformat(), now=T0 + timedelta(hours=1), limit_hours=24, previous=None
    )
    again = prediction_timing(
        batch_id="b1", landed=T0.isoformat(), now=T0 + timedelta(days=9), limit_hours=24, previous=first
    )
    assert again.hours == pytest.approx(1.0)
    relanded = T0 + timedelta(days=8)
    redelivered = prediction_timing(
        batch_id="b1", landed=relanded.isoformat(), now=T0 + timedelta(days=9), limit_hours=24, previous=first
    )
    assert redelivered.hours == pytest.approx(24.0)


def test_without_a_ledger_entry_nothing_is_claimed():
    t = prediction_timing(batch_id="b1", landed=None, now=T0, limit_hours=24, previous=None)
    assert t.hours is None and t.within_limit is None and "not measured" in t.sentence()
