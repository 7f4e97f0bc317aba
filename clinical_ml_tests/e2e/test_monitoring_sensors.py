"""The run-failure sensor writes an alert; the monitoring chain's sensors ask for the right runs."""

import json

import dagster as dg

from clinical_ml.defs.monitoring.sensors import (
    batch_monitoring_sensor,
    build_run_failure_alert_sensor,
    features_after_ingestion_sensor,
    write_alert,
)


@dg.op
def _fails() -> None:
    raise RuntimeError("step exploded")


@dg.job
def _failing_job() -> None:
    _fails()


def test_a_failed_run_writes_an_alert_line(tmp_path):
    alerts = tmp_path / "alerts" / "alerts.jsonl"
    sensor = build_run_failure_alert_sensor(alerts)
    with dg.instance_for_test() as instance:
        result = _failing_job.execute_in_process(instance=instance, raise_on_error=False)
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name,
            dagster_instance=instance,
            dagster_run=result.dagster_run,
            dagster_event=result.get_run_failure_event(),
        ).for_run_failure()
        sensor(context)
    lines = alerts.read_text().splitlines()
    assert len(lines) == 1
    alert = json.loads(lines[0])
    assert alert["job"] == "_failing_job" and alert["run_id"] == result.run_id


def test_write_alert_appends(tmp_path):
    f = tmp_path / "a.jsonl"
    write_alert({"n": 1}, file=f)
    write_alert({"n": 2}, file=f)
    assert [json.loads(x)["n"] for x in f.read_text().splitlines()] == [1, 2]


@dg.op
def _ok() -> None:
    return None


@dg.job
def _ok_job() -> None:
    _ok()


def test_ingestion_then_features_then_batch_monitoring_are_chained():
    with dg.instance_for_test() as instance:
        run = _ok_job.execute_in_process(instance=instance, tags={"dagster/partition": "2026-01-09"})
        ctx = dg.build_run_status_sensor_context(
            sensor_name="s",
            dagster_instance=instance,
            dagster_run=run.dagster_run,
            dagster_event=run.get_run_success_event(),
        )
        req = features_after_ingestion_sensor(ctx)
        assert isinstance(req, dg.RunRequest) and req.tags["batch_id"] == "2026-01-09"
        run2 = _ok_job.execute_in_process(instance=instance, tags={"batch_id": "2026-01-09"})
        ctx2 = dg.build_run_status_sensor_context(
            sensor_name="s",
            dagster_instance=instance,
            dagster_run=run2.dagster_run,
            dagster_event=run2.get_run_success_event(),
        )
        req2 = batch_monitoring_sensor(ctx2)
        assert isinstance(req2, dg.RunRequest) and req2.partition_key == "2026-01-09"
