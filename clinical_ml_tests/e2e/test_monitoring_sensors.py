"""The run-failure sensor writes an alert; the monitoring chain's sensors ask for the right runs."""

import json
from pathlib import Path

import dagster as dg

from clinical_ml.defs.monitoring.sensors import (
    build_monitoring_chain_sensors,
    build_run_failure_alert_sensor,
    features_after_ingestion_sensor,
    write_alert,
)
from clinical_ml.defs.usecase.paths import stage_of, use_case_key

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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


def test_ingestion_then_features_then_batch_monitoring_then_reports_are_chained(tmp_path):
    from clinical_ml.core.registry import ModelCard
    from clinical_ml.core.usecase import load_use_case
    from clinical_ml.resources.zones import DataZones

    ours = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    other = load_use_case(PROJECT_ROOT / "usecases" / "eicu_mortality_24h.yaml")
    sensors = {s.name: s for s in build_monitoring_chain_sensors([ours, other])}
    zones = DataZones(root=str(tmp_path))
    with dg.instance_for_test() as instance:

        def context(run):
            return dg.build_run_status_sensor_context(
                sensor_name="s",
                dagster_instance=instance,
                dagster_run=run.dagster_run,
                dagster_event=run.get_run_success_event(),
                resources={"zones": zones},
            )

        run = _ok_job.execute_in_process(instance=instance, tags={"dagster/partition": "2026-01-09"})
        req = features_after_ingestion_sensor(context(run))
        assert isinstance(req, dg.RunRequest) and req.tags["batch_id"] == "2026-01-09"
        run2 = _ok_job.execute_in_process(instance=instance, tags={"batch_id": "2026-01-09"})
        # no champion anywhere yet: nothing to score
        assert isinstance(sensors["batch_monitoring_sensor"](context(run2)), dg.SkipReason)
        models = zones.model_registry(ours.name)
        models.register(ModelCard(ours.name, "v1"), model_text="t\n")
        models.set_champion("v1")
        req2 = sensors["batch_monitoring_sensor"](context(run2))
        assert isinstance(req2, dg.RunRequest) and req2.partition_key == "2026-01-09"
        # only the use case with a champion is scored: the other source's branch is left alone
        assert {k.path[0] for k in req2.asset_selection} == {ours.name}
        req3 = sensors["monitoring_report_after_batch_sensor"](context(run2))
        assert {stage_of(k) for k in req3.asset_selection} == {"monitoring_report", "feature_drift_report"}
        assert {k.path[0] for k in req3.asset_selection} == {ours.name}


def test_nightly_retraining_runs_only_when_newly_labelled_admissions_exist(tmp_path):
    from datetime import UTC, datetime, timedelta

    import polars as pl

    from clinical_ml.core.registry import Lineage, ModelCard
    from clinical_ml.core.usecase import load_use_case
    from clinical_ml.defs.conventions import RETRAIN_REASON_TAG
    from clinical_ml.defs.usecase.automation import build_nightly_retraining_schedule
    from clinical_ml.resources.zones import DataZones

    uc = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    zones = DataZones(root=str(tmp_path))
    schedule = build_nightly_retraining_schedule([uc])
    night = datetime(2026, 1, 10, 2, tzinfo=UTC)

    def evaluate() -> list:
        # direct invocation (evaluate_tick would leave a definitions-load context on a closed instance)
        ctx = dg.build_schedule_context(scheduled_execution_time=night, resources={"zones": zones})
        return [schedule(ctx)]

    (skipped,) = evaluate()
    assert isinstance(skipped, dg.SkipReason)  # no cohort yet: nothing to learn from
    admit = datetime(2020, 3, 1)
    cohort = pl.DataFrame(
        {
            "batch_id": ["2026-01-05", "2026-01-08"],
            "admit_time": [admit, admit],
            "discharge_time": [admit + timedelta(days=1), admit + timedelta(days=1)],
            "death_time": [None, None],
        }
    )
    out = tmp_path / "deid" / "usecases" / uc.name / "cohort.parquet"
    out.parent.mkdir(parents=True)
    cohort.write_parquet(out)
    first = evaluate()
    assert len(first) == 1 and isinstance(first[0], dg.RunRequest)
    assert "no champion yet" in first[0].tags[RETRAIN_REASON_TAG]

    models = zones.model_registry(uc.name)
    models.register(
        ModelCard(uc.name, "v1", lineage=Lineage(batch_ids=tuple(["2026-01-05"]))), model_text="t\n"
    )
    models.set_champion("v1")
    new = evaluate()
    assert len(new) == 1 and isinstance(new[0], dg.RunRequest)
    assert "1 newly labelled admissions" in new[0].tags[RETRAIN_REASON_TAG]

    models = zones.model_registry(uc.name)
    models.register(
        ModelCard(uc.name, "v2", lineage=Lineage(batch_ids=tuple(["2026-01-05", "2026-01-08"]))),
        model_text="t\n",
    )
    models.set_champion("v2")
    (tick,) = evaluate()
    assert isinstance(tick, dg.SkipReason) and "no newly labelled" in (tick.skip_message or "")


def test_drift_and_performance_errors_request_one_retraining_each_and_only_drift_starts_an_episode():
    from clinical_ml.defs.conventions import DRIFT_FROM_TAG, RETRAIN_REASON_TAG
    from clinical_ml.defs.monitoring.sensors import retraining_requests

    drift_key, report_key = use_case_key("uc", "batch_drift"), use_case_key("uc", "monitoring_report")
    with dg.instance_for_test() as instance:

        def materialize(key, partition=None, **meta):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key=key, partition=partition, metadata=meta)
            )

        instance.add_dynamic_partitions("batches", ["2026-01-20", "2026-01-21"])
        materialize(drift_key, "2026-01-20", retraining_requested=True, level="error")
        materialize(drift_key, "2026-01-21", retraining_requested=False, level="error")
        materialize(
            report_key,
            retraining_requested=True,
            retraining_reason="realised performance below its minimums in 2026-01-05 (model v1)",
        )
        requests, cursor = retraining_requests(instance, [drift_key, report_key], 0)
        by_reason = {r.tags[RETRAIN_REASON_TAG]: r for r in requests}
        assert len(requests) == 2
        drift = by_reason[f"drift ERROR in batch 2026-01-20 ({drift_key.to_user_string()})"]
        assert drift.tags[DRIFT_FROM_TAG] == "2026-01-20"
        perf = by_reason["realised performance below its minimums in 2026-01-05 (model v1)"]
        assert DRIFT_FROM_TAG not in perf.tags
        assert retraining_requests(instance, [drift_key, report_key], cursor)[0] == []


def test_a_retraining_request_already_answered_is_not_asked_again():
    """``make demo SCENARIO=drift`` and the replay answer requests in process; the sensor that ``make dev`` starts
    afterwards reads the same materializations and must not ask for the same retraining again."""
    from clinical_ml.defs.monitoring.sensors import RETRAINING_REQUEST_TAG, retraining_requests

    drift_key = use_case_key("uc", "batch_drift")

    @dg.op
    def retrain() -> None:
        pass

    @dg.job(name="lifecycle_job")
    def lifecycle() -> None:
        retrain()

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("batches", ["2026-01-20", "2026-01-21"])
        for batch in ("2026-01-20", "2026-01-21"):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key=drift_key,
                    partition=batch,
                    metadata={"retraining_requested": True, "level": "error"},
                )
            )
        first, _ = retraining_requests(instance, [drift_key], 0)
        assert len(first) == 2 and all(r.tags[RETRAINING_REQUEST_TAG] == r.run_key for r in first)
        lifecycle.execute_in_process(instance=instance, tags=first[0].tags)
        again, _ = retraining_requests(instance, [drift_key], 0)
        assert [r.run_key for r in again] == [first[1].run_key]


def test_the_retraining_sensor_says_which_drift_errors_did_not_request_retraining():
    from clinical_ml.defs.monitoring.sensors import (
        build_drift_retraining_sensor,
        drift_errors_without_retraining,
    )

    drift_key = use_case_key("icu_mortality_24h", "batch_drift")
    from clinical_ml.core.usecase import load_use_case

    sensor = build_drift_retraining_sensor(
        [load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")]
    )
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None = None):
            return sensor(dg.build_sensor_context(instance=instance, cursor=cursor))

        quiet = tick()
        assert isinstance(quiet, dg.SkipReason) and "no drift ERROR" in (quiet.skip_message or "")
        instance.add_dynamic_partitions("batches", ["2026-01-21", "2026-01-22"])
        for batch, level in (("2026-01-21", "error"), ("2026-01-22", "warn")):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    asset_key=drift_key,
                    partition=batch,
                    metadata={"level": level, "retraining_requested": False},
                )
            )
        assert drift_errors_without_retraining(instance, [drift_key], 0) == ["2026-01-21"]
        said = tick()
        assert isinstance(said, dg.SkipReason)
        assert "1 drift ERROR(s)" in (said.skip_message or "") and "2026-01-21" in (said.skip_message or "")


def test_a_drift_in_one_use_case_retrains_that_use_case_only(tmp_path):
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.defs.conventions import RETRAIN_REASON_TAG

    defs = build_definitions(data_root=tmp_path)
    sensor = defs.resolve_sensor_def("drift_retraining_sensor")
    job = defs.resolve_job_def("lifecycle_job")
    drifted = use_case_key("aki_48h", "batch_drift")
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=drifted,
                partition="2026-01-09",
                metadata={"level": "error", "retraining_requested": True},
            )
        )
        (request,) = sensor(dg.build_sensor_context(instance=instance))
    selected = set(request.asset_selection)
    assert {k.path[0] for k in selected} == {"aki_48h"}
    assert (
        use_case_key("aki_48h", "risk_model") in selected
        and use_case_key("aki_48h", "promotion_decision") in selected
    )
    # every asset of that use case the lifecycle job holds, and a valid run of the job
    assert selected == {k for k in job.asset_layer.executable_asset_keys if k.path[0] == "aki_48h"}
    job.get_subset(asset_selection=selected)
    assert "drift ERROR in batch 2026-01-09" in request.tags[RETRAIN_REASON_TAG]
