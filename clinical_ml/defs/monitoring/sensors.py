"""Monitoring that acts: a new batch is scored and checked; a drift ERROR requests retraining (through the
promotion gate of lifecycle_job); every failed run, and every challenger the promotion gate refused, writes an
alert."""

import json
import urllib.request
from collections.abc import Collection, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import DRIFT_FROM_TAG, RETRAIN_REASON_TAG
from clinical_ml.defs.ingestion.jobs import batch_ingestion_job
from clinical_ml.defs.usecase.automation import (
    batch_monitoring_job,
    feature_refresh_job,
    lifecycle_job,
    monitoring_report_job,
)
from clinical_ml.defs.usecase.paths import stage_of, use_case_key
from clinical_ml.resources.zones import DataZones

PARTITION_TAG = "dagster/partition"
# the request a retraining run answers: a request already answered (e.g. in process by `make demo` or a replay,
# before `make dev` started this sensor) is not asked again
RETRAINING_REQUEST_TAG = "clinical_ml/retraining_request"
__all__ = ["DRIFT_FROM_TAG", "RETRAIN_REASON_TAG", "retraining_requests"]


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[batch_ingestion_job],
    request_job=feature_refresh_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a batch is ingested and anonymized, rebuild features so the batch can be monitored.",
)
def features_after_ingestion_sensor(context: dg.RunStatusSensorContext):
    batch = context.dagster_run.tags.get(PARTITION_TAG)
    if batch:
        return dg.RunRequest(run_key=f"features-{context.dagster_run.run_id}", tags={"batch_id": batch})
    return dg.SkipReason("ingestion run without a batch partition")


def _monitored_use_cases(use_cases: list[UseCase], zones: DataZones) -> list[UseCase]:
    """Use cases with a champion in this data root: the others (e.g. another source's) have nothing to score."""
    return [uc for uc in use_cases if zones.model_registry(uc.name).champion() is not None]


def build_monitoring_chain_sensors(use_cases: list[UseCase]) -> list[dg.SensorDefinition]:
    """features refreshed -> the batch scored and checked (use cases with a champion only) -> their
    monitoring reports refreshed, after a batch monitoring run that succeeded (a drift ERROR included: a
    decision) or failed alike."""

    @dg.run_status_sensor(
        name="batch_monitoring_sensor",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[feature_refresh_job],
        request_job=batch_monitoring_job,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Once features include a new batch, score it and check it for drift (one partition per "
        "batch), for every use case that has a champion.",
    )
    def batch_monitoring_sensor(context: dg.RunStatusSensorContext, zones: DataZones):
        batch = context.dagster_run.tags.get("batch_id")
        if not batch:
            return dg.SkipReason("feature refresh not tied to a batch")
        monitored = _monitored_use_cases(use_cases, zones)
        if not monitored:
            return dg.SkipReason("no use case has a champion yet: run lifecycle_job first")
        return dg.RunRequest(
            run_key=f"monitor-{context.dagster_run.run_id}",
            partition_key=batch,
            asset_selection=[
                use_case_key(uc, name)
                for uc in monitored
                for name in ("batch_predictions", "batch_drift", "risk_assessment_export")
            ],
        )

    def report_request(context, zones: DataZones) -> dg.RunRequest | dg.SkipReason:
        monitored = _monitored_use_cases(use_cases, zones)
        if not monitored:
            return dg.SkipReason("no use case has a champion yet")
        return dg.RunRequest(
            run_key=f"report-{context.dagster_run.run_id}",
            asset_selection=[
                use_case_key(uc, name)
                for uc in monitored
                for name in ("monitoring_report", "feature_drift_report")
            ],
        )

    @dg.run_status_sensor(
        name="monitoring_report_after_batch_sensor",
        run_status=dg.DagsterRunStatus.SUCCESS,
        monitored_jobs=[batch_monitoring_job],
        request_job=monitoring_report_job,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="After a batch has been scored and checked, refresh the monitoring reports.",
    )
    def monitoring_report_after_batch_sensor(context: dg.RunStatusSensorContext, zones: DataZones):
        return report_request(context, zones)

    @dg.run_failure_sensor(
        name="monitoring_report_after_failed_batch_sensor",
        monitored_jobs=[batch_monitoring_job],
        request_job=monitoring_report_job,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A batch whose monitoring run failed (scoring could not run) is reported too.",
    )
    def monitoring_report_after_failed_batch_sensor(context: dg.RunFailureSensorContext, zones: DataZones):
        return report_request(context, zones)

    return [
        batch_monitoring_sensor,
        monitoring_report_after_batch_sensor,
        monitoring_report_after_failed_batch_sensor,
    ]


def _meta(value: object) -> object:
    """A metadata entry's value (entries come wrapped in metadata value objects)."""
    return getattr(value, "value", value)


def _materialized_after(
    instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey], cursor: int
) -> Iterator[tuple[dg.AssetKey, dg.EventLogRecord, Mapping[str, object]]]:
    """Each materialization of ``keys`` stored after ``cursor``, oldest first, with its metadata."""
    for key in keys:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=cursor), limit=1000, ascending=True
        )
        for record in result.records:
            mat = record.asset_materialization
            yield key, record, (mat.metadata if mat else {})


def retraining_requests(
    instance: dg.DagsterInstance,
    keys: list[dg.AssetKey],
    cursor: int,
    *,
    lifecycle_keys: Collection[dg.AssetKey] | None = None,
) -> tuple[list[dg.RunRequest], int]:
    """One lifecycle run per materialization of ``keys`` (each use case's batch_drift and monitoring_report)
    that requested retraining after ``cursor``, unless a run already answers it (tagged with its run key).
    With ``lifecycle_keys`` (the assets of lifecycle_job), the run is narrowed to those of the use case that
    asked: a drift in one use case does not retrain, judge and alert on the others."""
    requests, newest = [], cursor
    for key, record, meta in _materialized_after(instance, keys, cursor):
        newest = max(newest, record.storage_id)
        mat = record.asset_materialization
        wanted = meta.get("retraining_requested")
        if wanted is None or not bool(_meta(wanted)):
            continue
        batch = mat.partition if mat else None
        reason = str(_meta(meta.get("retraining_reason")) or "") or (
            f"drift ERROR in batch {batch} ({key.to_user_string()})"
        )
        # a batch's drift starts an episode: the retrained model's drift reference begins there
        episode = {DRIFT_FROM_TAG: str(batch)} if stage_of(key) == "batch_drift" and batch else {}
        run_key = f"retrain-{key.to_user_string()}-{batch}-{record.storage_id}"
        if instance.get_run_ids(dg.RunsFilter(tags={RETRAINING_REQUEST_TAG: run_key}), limit=1):
            continue
        narrowed = None if lifecycle_keys is None else [k for k in lifecycle_keys if k.path[0] == key.path[0]]
        requests.append(
            dg.RunRequest(
                run_key=run_key,
                tags={RETRAIN_REASON_TAG: reason[:400], RETRAINING_REQUEST_TAG: run_key, **episode},
                asset_selection=sorted(narrowed, key=lambda k: k.to_user_string()) if narrowed else None,
            )
        )
    return requests, newest


def drift_errors_without_retraining(
    instance: dg.DagsterInstance, keys: list[dg.AssetKey], cursor: int
) -> list[str]:
    """Batches whose drift check reached ERROR after ``cursor`` without requesting retraining (the champion
    was trained on the batch, or a model retrained for the same episode stands refused)."""
    batches = []
    drift = (k for k in keys if stage_of(k) == "batch_drift")
    for _, record, meta in _materialized_after(instance, drift, cursor):
        level, wanted = meta.get("level"), meta.get("retraining_requested")
        if str(_meta(level)) == "error" and not bool(_meta(wanted)):
            mat = record.asset_materialization
            batches.append(str(mat.partition if mat else "?"))
    return batches


def build_drift_retraining_sensor(
    use_cases: list[UseCase], lifecycle_keys: Collection[dg.AssetKey] | None = None
) -> dg.SensorDefinition:
    keys = [use_case_key(uc, name) for uc in use_cases for name in ("batch_drift", "monitoring_report")]

    @dg.sensor(
        name="drift_retraining_sensor",
        job=lifecycle_job,
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A batch whose drift check reached ERROR, or realised performance of the champion below "
        "its minimums (overall or in a subgroup), requests retraining of that use case: lifecycle_job, narrowed "
        "to its assets, retrains, evaluates and promotes the challenger only through the gate.",
    )
    def drift_retraining_sensor(context: dg.SensorEvaluationContext):
        cursor = int(context.cursor or 0)
        unrequested = drift_errors_without_retraining(context.instance, keys, cursor)
        requests, newest = retraining_requests(context.instance, keys, cursor, lifecycle_keys=lifecycle_keys)
        context.update_cursor(str(newest))
        if requests:
            return requests
        if unrequested:
            return dg.SkipReason(
                f"{len(unrequested)} drift ERROR(s) since the last check did not request retraining "
                f"(batches {', '.join(unrequested[:10])}); each batch_drift page says why"
            )
        return dg.SkipReason("no retraining requested and no drift ERROR since the last check")

    return drift_retraining_sensor


def write_alert(alert: dict, *, file: Path, webhook: str | None = None) -> None:
    """Append an alert to a JSON-lines file and, when configured, POST it to a webhook."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as f:
        f.write(json.dumps(alert) + "\n")
    if webhook:
        req = urllib.request.Request(
            webhook, data=json.dumps(alert).encode(), headers={"Content-Type": "application/json"}
        )
        urllib.request.urlopen(req, timeout=10).close()


def failed_check_words(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Each asset check that failed in the run, as '<asset> <check> [<partition>]: <description>'."""
    out = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        event = entry.dagster_event
        evaluation = event.event_specific_data if event else None
        if not isinstance(evaluation, dg.AssetCheckEvaluation) or evaluation.passed:
            continue
        where = f" [{evaluation.partition}]" if evaluation.partition else ""
        out.append(
            f"{evaluation.asset_key.to_user_string()} {evaluation.check_name}{where}: "
            f"{evaluation.description or 'failed'}"[:1000]
        )
    return out


def build_run_failure_alert_sensor(alert_file: Path, webhook: str | None = None) -> dg.SensorDefinition:
    @dg.run_failure_sensor(
        name="run_failure_alert_sensor",
        default_status=dg.DefaultSensorStatus.RUNNING,
        monitor_all_code_locations=False,
        description="Every failed run (including a blocking check failure) writes an alert: log, file, webhook.",
    )
    def run_failure_alert_sensor(context: dg.RunFailureSensorContext):
        run = context.dagster_run
        alert = {
            "at": datetime.now(UTC).isoformat(),
            "job": run.job_name,
            "run_id": run.run_id,
            "partition": run.tags.get(PARTITION_TAG),
            # the failure message names steps and checks; our code never puts patient values in errors
            "message": (context.failure_event.message or "")[:500],
            # why, in words: each failed check's description names its batch and what moved (codes, never values)
            "failed_checks": failed_check_words(context.instance, run.run_id),
        }
        context.log.error(f"run {run.run_id} of {run.job_name} failed; alert written")
        write_alert(alert, file=alert_file, webhook=webhook)

    return run_failure_alert_sensor


def _decision_alert(key: dg.AssetKey, meta: Mapping[str, object]) -> tuple[str, str] | None:
    """The kind and words of the alert a decision asks for, or None: a promotion_decision that refused its
    challenger, or a batch_drift at ERROR (its FHIR export held)."""
    stage = stage_of(key)
    if stage == "promotion_decision" and str(_meta(meta.get("decision"))) == "refused":
        return "promotion_refused", str(_meta(meta.get("decision_in_words")) or "challenger refused")
    if stage == "batch_drift" and str(_meta(meta.get("level"))) == "error":
        asked = bool(_meta(meta.get("retraining_requested")))
        then = (
            "retraining requested"
            if asked
            else "no retraining requested (already answered for this drift episode, or the champion was "
            "trained on this batch): a person has to look"
        )
        words = str(_meta(meta.get("in_words")) or "drift ERROR")
        return "drift_error", f"{words} The batch's FHIR export is held; {then}."
    return None


def decision_alerts(
    instance: dg.DagsterInstance, keys: list[dg.AssetKey], cursor: int
) -> tuple[list[dict], int]:
    """An alert for each decision of ``keys`` materialized after ``cursor`` that a person must see (the run
    succeeded: a refusal or a held batch is a decision, not a crash), in the decision's own words."""
    alerts, newest = [], cursor
    for key, record, meta in _materialized_after(instance, keys, cursor):
        newest = max(newest, record.storage_id)
        mat = record.asset_materialization
        decided = _decision_alert(key, meta)
        if decided is None:
            continue
        alerts.append(
            {
                "at": datetime.now(UTC).isoformat(),
                "kind": decided[0],
                "job": record.event_log_entry.job_name,
                "run_id": record.run_id,
                "asset": key.to_user_string(),
                "partition": mat.partition if mat else None,
                "message": decided[1][:1000],
            }
        )
    return alerts, newest


def build_decision_alert_sensor(
    use_cases: list[UseCase], alert_file: Path, webhook: str | None = None
) -> dg.SensorDefinition:
    keys = [use_case_key(uc, stage) for uc in use_cases for stage in ("promotion_decision", "batch_drift")]

    @dg.sensor(
        name="decision_alert_sensor",
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A decision a person must see writes an alert with its reasons (log, file, webhook): a "
        "challenger refused by the promotion gate (the champion stays), a batch whose drift check reached "
        "ERROR (its FHIR export held). Both runs succeed: they are decisions, not crashes.",
    )
    def decision_alert_sensor(context: dg.SensorEvaluationContext):
        alerts, newest = decision_alerts(context.instance, keys, int(context.cursor or 0))
        for alert in alerts:
            context.log.warning(f"{alert['asset']}: {alert['message']}")
            write_alert(alert, file=alert_file, webhook=webhook)
        context.update_cursor(str(newest))
        if not alerts:
            return dg.SkipReason("no challenger refused and no batch held for drift since the last check")
        return dg.SkipReason(
            f"{len(alerts)} decision alert(s) written: " + " | ".join(a["message"] for a in alerts)[:900]
        )

    return decision_alert_sensor
