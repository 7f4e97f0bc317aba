"""The system-health page: each sentence true for the numbers beside it, nothing judged without data."""

from datetime import UTC, date, datetime

import numpy as np
import polars as pl

from clinical_ml.core.run_health import RunView
from clinical_ml.core.served_predictions import REQUEST_SCHEMA, service_requests
from clinical_ml.core.system_health import health_html, health_markdown, system_health
from clinical_ml.core.time_to_prediction import PredictionTiming

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
T = NOW.timestamp()
HOUR = 3600.0


def _requests(rows: list[tuple[date, str, int, float, str]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=REQUEST_SCHEMA, orient="row")


def test_failed_and_stuck_runs_slow_batches_and_service_failures_are_named() -> None:
    runs = [
        RunView("r-new", "batch_ingestion_job", "FAILURE", T - 2 * HOUR, T - 2 * HOUR),
        RunView("r-old", "lifecycle_job", "FAILURE", T - 9 * 24 * HOUR, T - 9 * 24 * HOUR),  # outside 7 days
        RunView("r-stuck", "<script>job</script>", "STARTED", T - 5 * HOUR, T - 5 * HOUR),
        RunView("r-ok", "lifecycle_job", "SUCCESS", T - HOUR, T - HOUR),
        RunView("r-running", "lifecycle_job", "STARTED", T - 0.5 * HOUR, T - 0.5 * HOUR),
    ]
    timings = [
        PredictionTiming("b1", "2026-03-01T00:00:00+00:00", "2026-03-01T01:30:00+00:00", 24.0),
        PredictionTiming("b2", "2026-03-02T00:00:00+00:00", "2026-03-03T06:00:00+00:00", 24.0),
        PredictionTiming("b3", None, "2026-03-04T06:00:00+00:00", 24.0),
    ]
    hook_ms = [12.0, 15.0, 18.0, 22.0, 30.0, 41.0, 55.0, 80.0]
    today = NOW.date()
    requests = _requests(
        [(today, "hook", 200, ms, "scored") for ms in hook_ms]
        + [(today, "hook", 401, 0.4, "auth"), (today, "hook", 500, 3.0, "error")]
        + [(date(2026, 2, 1), "hook", 500, 1.0, "error")]  # outside the 7 days
    )
    h = system_health(runs=runs, timings=timings, requests=requests, now=NOW, stuck_limit_seconds=2 * HOUR)

    assert [r.run_id for r in h.runs.failed] == ["r-new"]
    assert [(r.run_id, m) for r, m in h.runs.stuck] == [("r-stuck", 300)]
    assert (
        h.runs.sentence()
        == "1 run(s) failed in the last 7 days; 1 run(s) waiting or running for more than 120 min."
    )
    assert h.timing.sentence() == (
        "Time to prediction: 1 of 2 measured batch(es) over the limit of 24 h; the newest, b2, took 30.00 h "
        "(longest 30.00 h)."
    )
    p50, p95 = np.percentile(hook_ms, 50), np.percentile(hook_ms, 95)
    assert (h.service.calls, h.service.errors, h.service.refused, h.service.cards) == (10, 1, 1, 8)
    assert h.service.sentence() == (
        "Point-of-care service: 10 call(s) in the last 7 days, 1 failed (10.0%) and 1 refused as bad input or "
        f"unauthorised (10.0%); hook calls answered in {p50:.1f} ms (median) and {p95:.1f} ms (95th percentile)."
    )
    assert h.headline() == "Needs attention: runs, time to prediction, point-of-care service."
    assert h.metadata()["service_error_rate"] == 0.1 and h.metadata()["batches_over_time_limit"] == 1

    html = health_html(h, use_case_name="uc", use_case_hash="abc", code_version="v")
    assert "&lt;script&gt;job&lt;/script&gt;" in html and "<script>job" not in html
    assert (
        "Use case uc (contract abc)." in html and "Model" not in html.split("<footer>")[1]
    )  # no model to name
    for sentence in h.sentences():
        assert sentence.replace("'", "&#39;") in html
    assert health_markdown(h).count("\n- ") == 3


def test_nothing_to_judge_is_said_never_passed_as_healthy() -> None:
    h = system_health(runs=[], timings=[], requests=None, now=NOW)
    assert h.attention == []
    assert h.headline() == (
        "No failed or stuck run, no batch over its limit, no service failure (nothing to judge yet for: "
        "time to prediction, service)."
    )
    assert h.timing.sentence() == "Time to prediction: no batch scored yet."
    assert h.service.sentence() == "Point-of-care service: no call recorded in the last 7 days."
    assert h.timing.ok is None and h.service.ok is None


def test_service_requests_keep_only_controlled_codes() -> None:
    frame = service_requests(
        [
            {
                "at": "2026-03-10T08:00:00+00:00",
                "route": "hook",
                "status": 500,
                "ms": 2.5,
                "outcome": "error:KeyError",
            },
            {
                "at": "2026-03-10T07:00:00+00:00",
                "route": "hook",
                "status": 401,
                "ms": 0.3,
                "outcome": "auth:expired",
            },
            {
                "at": "2026-03-10T09:00:00+00:00",
                "route": "pat-4711",
                "status": 200,
                "ms": 9.0,
                "outcome": "Jane",
            },
            {"at": "2026-03-10T09:00:00+00:00", "route": "hook", "ms": 1.0},  # no status: not a call record
            {"at": "not a time", "route": "hook", "status": 200, "ms": 1.0, "outcome": "scored"},
        ]
    )
    assert frame.rows() == [
        (date(2026, 3, 10), "hook", 401, 0.3, "auth"),
        (date(2026, 3, 10), "hook", 500, 2.5, "error"),
        (date(2026, 3, 10), "other", 200, 9.0, "other"),
    ]
