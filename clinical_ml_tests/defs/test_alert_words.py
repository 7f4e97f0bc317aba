"""Alerts and check results say, in words, which batch and which columns: a failed run's alert carries each
failed check's description, and the drift check's description names the batch, the level and what moved."""

import json

import dagster as dg

from clinical_ml.core.reports import drift_check_words
from clinical_ml.defs.monitoring.sensors import build_run_failure_alert_sensor, failed_check_words

_PARTS = dg.StaticPartitionsDefinition(["2026-01-20", "2026-01-21"])
_REASON = "creatinine__last_24h: ERROR (p = 1e-09, PSI 0.410)"


@dg.asset(
    partitions_def=_PARTS,
    check_specs=[dg.AssetCheckSpec("drift_below_error_level", asset="drifting", blocking=True)],
)
def drifting(context: dg.AssetExecutionContext):
    yield dg.MaterializeResult()
    yield dg.AssetCheckResult(
        check_name="drift_below_error_level",
        passed=context.partition_key != "2026-01-21",
        severity=dg.AssetCheckSeverity.ERROR,
        description=drift_check_words(context.partition_key, "error", [_REASON]),
    )


def test_drift_check_words_name_the_batch_the_level_and_what_moved():
    assert drift_check_words("2026-01-21", "error", [_REASON, "label prevalence 0.210 vs 0.120"]) == (
        f"Batch 2026-01-21: drift ERROR. {_REASON}; label prevalence 0.210 vs 0.120"
    )
    assert (
        drift_check_words("2026-01-20", "ok", [])
        == "Batch 2026-01-20: drift OK: nothing moved enough to warn."
    )


def test_the_alert_of_a_failed_run_names_the_failed_check_its_batch_and_why(tmp_path):
    alerts = tmp_path / "alerts.jsonl"
    sensor = build_run_failure_alert_sensor(alerts)
    with dg.instance_for_test() as instance:
        ok = dg.materialize([drifting], instance=instance, partition_key="2026-01-20", raise_on_error=False)
        assert ok.success and failed_check_words(instance, ok.run_id) == []
        bad = dg.materialize([drifting], instance=instance, partition_key="2026-01-21", raise_on_error=False)
        assert not bad.success
        context = dg.build_run_status_sensor_context(
            sensor_name=sensor.name,
            dagster_instance=instance,
            dagster_run=bad.dagster_run,
            dagster_event=bad.get_run_failure_event(),
        ).for_run_failure()
        sensor(context)
    (alert,) = [json.loads(line) for line in alerts.read_text().splitlines()]
    assert alert["failed_checks"] == [
        f"drifting drift_below_error_level: Batch 2026-01-21: drift ERROR. {_REASON}"
    ]
