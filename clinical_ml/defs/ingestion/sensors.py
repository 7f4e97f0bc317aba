import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from clinical_ml.core.landing import (
    COMPLETION_MARKER,
    LandingBatch,
    NotStarted,
    batch_folders,
    inspect_batch,
    line_ending_conversions,
    overdue_batches,
    read_unmarked_batch,
)
from clinical_ml.core.locations import alerts_file
from clinical_ml.core.run_health import RUNNING, WAITING, RunView, stuck_runs
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME, batch_partitions
from clinical_ml.defs.ingestion.jobs import batch_ingestion_job
from clinical_ml.defs.monitoring.sensors import write_alert
from clinical_ml.resources.zones import DataZones

ALERT_WEBHOOK_ENV = "CLINICAL_ML_ALERT_WEBHOOK"


def _sort_folders(
    context: dg.SensorEvaluationContext,
    zones: DataZones,
    folders: list[Path],
    seen: dict[str, str],
    pending: dict,
) -> tuple[list[LandingBatch], dict, dict[str, NotStarted]]:
    """The landing folders sorted out: complete batches new to the sensor (``seen`` is updated), unmarked
    folders still settling, and folders that are not started (with why)."""
    new: list[LandingBatch] = []
    next_pending: dict = {}
    not_started: dict[str, NotStarted] = {}
    for d in folders:
        b = inspect_batch(d)
        if b is None:
            b, next_pending[d.name] = _unmarked(d, pending.get(d.name), zones.unmarked_batch_quiet_seconds)
        if isinstance(b, NotStarted):  # a folder already ingested too: a redelivery may be the one stuck
            not_started[d.name] = b
            continue
        next_pending.pop(d.name, None)
        if seen.get(b.batch_id) == b.content_hash:
            continue
        seen[b.batch_id] = b.content_hash
        if _already_ingested(context.instance, b.batch_id, b.content_hash):
            continue  # e.g. by `make demo` or a replay, outside this sensor: same content, nothing to redo
        if b.unverified_files:
            context.log.warning(
                f"batch {b.batch_id}: {b.unverified_files} file(s) listed without a sha256; integrity not checked"
            )
        new.append(b)
    return new, next_pending, not_started


def _load_cursor(raw: str | None) -> tuple[dict[str, str], dict[str, str], dict[str, list]]:
    """(batch -> content hash launched, batch -> fingerprint of an unmarked batch seen last tick,
    batch -> [first seen, reason reported] of folders not started)."""
    if not raw:
        return {}, {}, {}
    data = json.loads(raw)
    if "seen" not in data:  # the first cursor format: a plain batch -> hash map
        return dict(data), {}, {}
    return dict(data["seen"]), dict(data.get("pending", {})), dict(data.get("waiting", {}))


def _already_ingested(instance: dg.DagsterInstance, batch_id: str, content_hash: str) -> bool:
    """A successful ingestion run of this batch with this content exists on the instance."""
    return bool(
        instance.get_run_records(
            dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.SUCCESS],
                tags={"batch_id": batch_id, "content_sha256": content_hash},
            ),
            limit=1,
        )
    )


def _unmarked(d: Path, previous: str | None, quiet_seconds: float) -> tuple[LandingBatch | NotStarted, str]:
    """An unmarked folder as a batch once stable, else why not (still changing, or stable without data)."""
    b, fp = read_unmarked_batch(d, previous_fingerprint=previous, quiet_seconds=quiet_seconds)
    if b is not None:
        return b, fp
    if fp == previous:
        return NotStarted(
            d.name,
            "no_data_files",
            f"no {COMPLETION_MARKER} marker and no file named after a source (patients, encounters, labs, "
            "vitals, labels) ending .csv, .parquet or .zip",
        ), fp
    return NotStarted(
        d.name, "files_still_changing", f"no {COMPLETION_MARKER} marker and the files are still changing"
    ), fp


def _report(context: dg.SensorEvaluationContext, zones: DataZones, why: NotStarted, waited: float) -> None:
    detail = why.detail
    if why.reason == "size_mismatch" and line_ending_conversions(zones.landing / why.batch_id):
        detail += "; their sizes differ by exactly their line count: line ends were converted (LF/CRLF)"
    message = (
        f"batch folder {why.batch_id} not started after {waited / 60:.0f} min ({why.reason}): {detail}. "
        "See docs/operations.md, 'A delivery that does not start'."
    )
    context.log.warning(message)
    alert = {
        "at": datetime.now(UTC).isoformat(),
        "job": batch_ingestion_job.name,
        "partition": why.batch_id,
        "reason": why.reason,
        "message": message,
    }
    try:
        write_alert(alert, file=alerts_file(Path(zones.root)), webhook=os.environ.get(ALERT_WEBHOOK_ENV))
    except OSError as exc:  # an unreachable webhook must not stop the sensor from starting other batches
        context.log.error(f"alert for batch folder {why.batch_id} not delivered ({type(exc).__name__})")


@dg.sensor(
    job=batch_ingestion_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts one ingestion run per complete new batch in the landing zone (complete = a _SUCCESS "
    "marker whose listed sizes match, or without one, sizes and times stable across two checks). The run key is "
    "the batch id with its content hash, so a batch delivered again unchanged never runs twice and changed "
    "content runs again; cursor and run keys survive a daemon restart. A file identical to one accepted in an "
    "earlier batch is ledgered as a duplicate delivery and never ingested twice. A folder not started within "
    "stuck_batch_seconds (broken marker, listed files absent or of another size, files still changing) is "
    "reported: a warning in the sensor log and an alert in alerts/alerts.jsonl, once per reason.",
)
def landing_sensor(context: dg.SensorEvaluationContext, zones: DataZones) -> dg.SensorResult:
    seen, pending, waiting = _load_cursor(context.cursor)
    folders, skipped = batch_folders(zones.landing)
    if skipped:
        context.log.warning(f"{skipped} landing entries skipped: odd folder names or symlinks are never read")
    new, next_pending, not_started = _sort_folders(context, zones, folders, seen, pending)
    now = time.time()
    waiting, overdue = overdue_batches(waiting, not_started, now=now, limit_seconds=zones.stuck_batch_seconds)
    for why in overdue:
        _report(context, zones, why, now - waiting[why.batch_id][0])
    known = set(context.instance.get_dynamic_partitions(BATCH_PARTITIONS_NAME))
    to_add = [b.batch_id for b in new if b.batch_id not in known]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"{b.batch_id}:{b.content_hash}",
                partition_key=b.batch_id,
                tags={"batch_id": b.batch_id, "content_sha256": b.content_hash},
            )
            for b in new
        ],
        dynamic_partitions_requests=[batch_partitions.build_add_request(to_add)] if to_add else [],
        cursor=json.dumps({"seen": seen, "pending": next_pending, "waiting": waiting}, sort_keys=True),
    )


# Runs are looked at in pages; a stuck run is old, so the oldest in-progress runs come first.
_RUN_PAGE = 200


def build_stuck_run_alert_sensor(
    alert_file: Path, webhook: str | None = None, *, limit_seconds: float = 7200.0
) -> dg.SensorDefinition:
    """A sensor that alerts once per run waiting to start, or running, for longer than ``limit_seconds``."""

    @dg.sensor(
        name="stuck_run_alert_sensor",
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Every run queued, starting or started for more than {limit_seconds / 60:.0f} min writes "
        "an alert (log, alerts/alerts.jsonl, webhook), once per run: a killed run holding a pool slot, or a run "
        "waiting behind one. Dagster's run monitoring (dagster.yaml) fails the dead run after its max runtime "
        "and frees its slots; docs/operations.md says what to do before that.",
    )
    def stuck_run_alert_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        reported = json.loads(context.cursor) if context.cursor else []
        statuses = [dg.DagsterRunStatus(s) for s in sorted(WAITING | RUNNING)]
        records = context.instance.get_run_records(
            dg.RunsFilter(statuses=statuses), limit=_RUN_PAGE, ascending=True
        )
        runs = [
            RunView(
                run_id=r.dagster_run.run_id,
                job_name=r.dagster_run.job_name,
                status=r.dagster_run.status.value,
                created_at=r.create_timestamp.timestamp(),
                started_at=r.start_time,
            )
            for r in records
        ]
        stuck = stuck_runs(
            runs, now=time.time(), limit_seconds=limit_seconds, already_reported=frozenset(reported)
        )
        for s in stuck:
            context.log.warning(s.message)
            alert = {
                "at": datetime.now(UTC).isoformat(),
                "job": s.run.job_name,
                "run_id": s.run.run_id,
                "reason": "run_stuck",
                "message": s.message,
            }
            try:
                write_alert(alert, file=alert_file, webhook=webhook)
            except OSError as exc:
                context.log.error(f"stuck-run alert for {s.run.run_id} not delivered ({type(exc).__name__})")
        # remember only runs still in progress: the cursor stays small
        in_progress = {r.run_id for r in runs}
        keep = sorted((set(reported) & in_progress) | {s.run.run_id for s in stuck})
        return dg.SensorResult(cursor=json.dumps(keep))

    return stuck_run_alert_sensor
