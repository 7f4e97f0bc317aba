"""Batches go out in delivery order when their runs go at once (clinical_ml/defs/anonymization/order.py): a
batch waits for earlier batches whose runs are queued or running and that are not yet released, and for no
others (a failed or finished run, a later batch, an earlier batch already released, another job's run)."""

from types import SimpleNamespace

import dagster as dg
import pytest

from clinical_ml.core.artifacts import DeidStore, DictRecord
from clinical_ml.defs.anonymization.order import (
    LONGEST_WAIT_SECONDS,
    MAX_WAITS,
    WAIT_AT_MOST_SECONDS,
    earlier_batches_in_flight,
    wait_for_earlier_batches,
    wait_seconds,
)

KEYS = {dg.AssetKey("anonymized_events")}


@dg.op
def _step() -> None:
    return None


@dg.job
def batch_ingestion_job() -> None:
    _step()


@dg.job
def other_job() -> None:
    _step()


def _run(instance: dg.DagsterInstance, job: dg.JobDefinition, batch: str, status: dg.DagsterRunStatus):
    return instance.create_run_for_job(job, status=status, tags={"dagster/partition": batch})


def _context(instance: dg.DagsterInstance, run: dg.DagsterRun, *, retry_number: int = 0):
    logged: list[str] = []
    log = SimpleNamespace(info=logged.append, warning=logged.append)
    context = SimpleNamespace(instance=instance, run=run, retry_number=retry_number, log=log)
    return context, logged


def test_a_batch_waits_only_for_earlier_batches_still_in_flight(tmp_path):
    deid = DeidStore(tmp_path / "deid", tmp_path / "reports")
    started = dg.DagsterRunStatus.STARTED
    with dg.instance_for_test() as instance:
        me = _run(instance, batch_ingestion_job, "2026-01-05", started)
        _run(instance, batch_ingestion_job, "2026-01-02", started)  # earlier, running: waited for
        _run(
            instance, batch_ingestion_job, "2026-01-03", dg.DagsterRunStatus.STARTING
        )  # earlier, starting: waited for
        _run(instance, batch_ingestion_job, "2026-01-04", started)  # earlier, already released: not
        deid.privacy.part("2026-01-04").write(DictRecord({"released": True}))
        _run(instance, batch_ingestion_job, "2026-01-01", dg.DagsterRunStatus.FAILURE)  # failed: not
        _run(instance, batch_ingestion_job, "2026-01-06", started)  # later: not
        _run(instance, other_job, "2025-12-30", started)  # another job (scoring, say): not
        context, logged = _context(instance, me)
        assert earlier_batches_in_flight(context, deid, "2026-01-05", KEYS) == ["2026-01-02", "2026-01-03"]  # type: ignore[arg-type]
        with pytest.raises(dg.RetryRequested) as asked:
            wait_for_earlier_batches(context, deid, "2026-01-05", KEYS)  # type: ignore[arg-type]
        assert asked.value.max_retries == MAX_WAITS and asked.value.seconds_to_wait > 0
        assert logged == [
            "waiting for earlier batches in flight to be released first: 2026-01-02, 2026-01-03"
        ]
        # the first batch waits for nobody; after the last try a batch goes out and says so
        first, _ = _context(instance, _run(instance, batch_ingestion_job, "2025-12-31", started))
        wait_for_earlier_batches(first, deid, "2025-12-31", KEYS)  # type: ignore[arg-type]
        last, logged = _context(instance, me, retry_number=MAX_WAITS)
        wait_for_earlier_batches(last, deid, "2026-01-05", KEYS)  # type: ignore[arg-type]
        assert logged and logged[0].startswith("released without waiting longer")


def test_the_waits_start_short_and_grow_to_the_longest_and_last_about_an_hour_in_all(tmp_path):
    deid = DeidStore(tmp_path / "deid", tmp_path / "reports")
    started = dg.DagsterRunStatus.STARTED
    with dg.instance_for_test() as instance:
        me = _run(instance, batch_ingestion_job, "2026-01-05", started)
        _run(instance, batch_ingestion_job, "2026-01-02", started)
        asked = []
        for retry in range(8):
            context, _ = _context(instance, me, retry_number=retry)
            with pytest.raises(dg.RetryRequested) as raised:
                wait_for_earlier_batches(context, deid, "2026-01-05", KEYS)  # type: ignore[arg-type]
            asked.append(raised.value.seconds_to_wait)
    assert asked == sorted(asked) and asked[0] < 1 and asked[-1] == LONGEST_WAIT_SECONDS
    total = sum(wait_seconds(n) for n in range(MAX_WAITS))
    assert WAIT_AT_MOST_SECONDS <= total < WAIT_AT_MOST_SECONDS + LONGEST_WAIT_SECONDS
