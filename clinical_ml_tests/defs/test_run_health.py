"""Killed runs (issue 17 class 3): the instance's run monitoring is on and frees pool slots of ended runs, the
ingestion job has a max runtime, and a run waiting or running past the limit is alerted once."""

import json

import dagster as dg
import pytest

from clinical_ml.core.locations import alerts_file
from clinical_ml.core.run_health import RunView, stuck_runs
from clinical_ml.defs.ingestion.jobs import batch_ingestion_job
from clinical_ml.defs.ingestion.sensors import build_stuck_run_alert_sensor
from clinical_ml.instance_storage import instance_yaml_for
from clinical_ml_tests.conftest import PROJECT_ROOT

HOUR = 3600.0


@pytest.mark.parametrize(
    ("status", "created", "started", "now", "stuck"),
    [
        ("STARTED", 0.0, 10.0, 10.0 + 2 * HOUR, True),
        ("STARTED", 0.0, 1.5 * HOUR, 2.5 * HOUR, False),  # long queued, then started an hour ago
        ("STARTED", 0.0, None, 2 * HOUR, True),  # no start time: timed from creation
        ("QUEUED", 0.0, None, 2 * HOUR, True),  # waiting behind a dead run's pool slot
        ("STARTING", 0.0, None, 2 * HOUR - 1, False),
        ("CANCELING", 0.0, 0.0, 3 * HOUR, True),
        ("SUCCESS", 0.0, 0.0, 9 * HOUR, False),
        ("FAILURE", 0.0, 0.0, 9 * HOUR, False),
    ],
)
def test_a_run_is_stuck_past_the_limit_from_when_it_started_or_was_queued(
    status, created, started, now, stuck
):
    run = RunView("r1", "batch_ingestion_job", status, created, started)
    found = stuck_runs([run], now=now, limit_seconds=2 * HOUR)
    assert [s.run.run_id for s in found] == (["r1"] if stuck else [])
    if stuck:
        assert "docs/operations.md" in found[0].message and str(found[0].minutes) in found[0].message
    assert stuck_runs([run], now=now, limit_seconds=2 * HOUR, already_reported=frozenset({"r1"})) == []


def test_the_instance_frees_slots_of_dead_runs_and_times_ingestion_out(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        instance_yaml_for((PROJECT_ROOT / "dagster.yaml").read_text(), str(home))
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] > 0
        assert instance.run_monitoring_max_runtime_seconds > 0
    assert (
        float((batch_ingestion_job.tags or {})["dagster/max_runtime"])
        <= instance.run_monitoring_max_runtime_seconds
    )


@dg.op
def _step() -> None:
    return None


@dg.job
def _job() -> None:
    _step()


def _tick(sensor: dg.SensorDefinition, context: dg.SensorEvaluationContext) -> dg.SensorResult:
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def test_a_run_left_started_is_alerted_once(tmp_path):
    sensor = build_stuck_run_alert_sensor(alerts_file(tmp_path), limit_seconds=0)
    with dg.instance_for_test() as instance:
        dead = instance.create_run_for_job(_job, status=dg.DagsterRunStatus.STARTED)
        done = instance.create_run_for_job(_job, status=dg.DagsterRunStatus.SUCCESS)
        first = _tick(sensor, dg.build_sensor_context(instance=instance))
        alerts = [json.loads(line) for line in alerts_file(tmp_path).read_text().splitlines()]
        assert [(a["run_id"], a["reason"]) for a in alerts] == [(dead.run_id, "run_stuck")]
        assert done.run_id not in alerts_file(tmp_path).read_text()
        _tick(sensor, dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert len(alerts_file(tmp_path).read_text().splitlines()) == 1  # once per run
        # once the run has ended (run monitoring failed it), it leaves the cursor
        instance.report_run_failed(dead, "run worker died")
        later = _tick(sensor, dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert json.loads(later.cursor or "[]") == []
