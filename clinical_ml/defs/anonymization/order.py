"""Batches are released in delivery order, also when their runs go at once (a backfill, Celery workers).

Under the cumulative release (``risk_scope: cumulative``) a batch is judged with the people of the batches
released before it, so the order in which batches are released decides which rare people are withheld. The
vault pool lets one release at a time through, but in whatever order the runs reach it. So a batch whose
earlier batches are still in runs that are queued or running (and not yet released) waits for them: it asks
Dagster to run its step again a little later (sooner at first), which frees the pool for them. A batch whose run failed or was
never started is not waited for (nothing would release it); after :data:`MAX_WAITS` tries the batch goes out
counted with what is released then, and says so.
"""

import dagster as dg

from clinical_ml.core.artifacts import DeidStore

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
FIRST_WAIT_SECONDS = 0.5
LONGEST_WAIT_SECONDS = 5
WAIT_AT_MOST_SECONDS = 3600


def wait_seconds(retry_number: int) -> float:
    """How long the ``retry_number``-th wait lasts: doubling from :data:`FIRST_WAIT_SECONDS` up to
    :data:`LONGEST_WAIT_SECONDS`. An earlier batch in flight is usually released within a second or two (its
    anonymization takes about that long), so a first wait of 5 s mostly waited for nothing while every run
    behind this one in delivery order waited too; longer waits keep a long wait's retries few."""
    return min(LONGEST_WAIT_SECONDS, FIRST_WAIT_SECONDS * 2**retry_number)


def _waits_lasting(seconds: float) -> int:
    waits, waited = 0, 0.0
    while waited < seconds:
        waited += wait_seconds(waits)
        waits += 1
    return waits


MAX_WAITS = _waits_lasting(WAIT_AT_MOST_SECONDS)  # about an hour of waits


def _partitions_of(run: dg.DagsterRun) -> list[str]:
    tags = run.tags
    if "dagster/partition" in tags:
        return [tags["dagster/partition"]]
    start = tags.get("dagster/asset_partition_range_start")
    return [start] if start else []  # a ranged run is waited for by its first batch


def earlier_batches_in_flight(
    context: dg.AssetExecutionContext, deid: DeidStore, first_batch: str, asset_keys: set[dg.AssetKey]
) -> list[str]:
    """Batches before ``first_batch``, not yet released or refused, whose runs (of this run's job, or
    selecting one of ``asset_keys``) are queued or running; this run's own batches excepted."""
    waiting: set[str] = set()
    for run in context.instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT)):
        if run.run_id == context.run.run_id:
            continue
        if run.job_name != context.run.job_name and not (run.asset_selection or set()) & asset_keys:
            continue
        waiting |= {b for b in _partitions_of(run) if b < first_batch and not deid.privacy.part(b).exists()}
    return sorted(waiting)


def wait_for_earlier_batches(
    context: dg.AssetExecutionContext, deid: DeidStore, first_batch: str, asset_keys: set[dg.AssetKey]
) -> None:
    """Raise :class:`dagster.RetryRequested` while earlier batches are in flight (see the module docstring)."""
    waiting = earlier_batches_in_flight(context, deid, first_batch, asset_keys)
    if not waiting:
        return
    named = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
    if context.retry_number >= MAX_WAITS:
        context.log.warning(
            f"released without waiting longer for earlier batches still in flight ({named}): counted with "
            "the batches released so far"
        )
        return
    context.log.info(f"waiting for earlier batches in flight to be released first: {named}")
    raise dg.RetryRequested(max_retries=MAX_WAITS, seconds_to_wait=wait_seconds(context.retry_number))
