"""The repository's instance (dagster.yaml): event log with kept-open connections, same files and behaviour."""

import os
import subprocess
import sys
import textwrap

import dagster as dg

from clinical_ml.instance_storage import MAX_OPEN_SHARDS, PooledSqliteEventLogStorage, instance_yaml_for
from clinical_ml_tests.conftest import PROJECT_ROOT

days = dg.DynamicPartitionsDefinition(name="days")


@dg.asset(partitions_def=days)
def counted(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    context.log.info(f"partition {context.partition_key}")
    return dg.MaterializeResult(metadata={"partition": context.partition_key})


def _home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    text = instance_yaml_for((PROJECT_ROOT / "dagster.yaml").read_text(), str(home))
    (home / "dagster.yaml").write_text(text)
    return home


def test_many_runs_beyond_the_open_shards_keep_every_event_in_dagsters_layout(tmp_path):
    home = _home(tmp_path)
    keys = [f"2026-01-{d:02d}" for d in range(1, MAX_OPEN_SHARDS + 6)]
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        instance.add_dynamic_partitions("days", keys)
        run_ids = []
        for k in keys:
            res = dg.materialize([counted], instance=instance, partition_key=k)
            assert res.success
            run_ids.append(res.run_id)
        # every run's own shard, including those whose connection was closed to stay within the bound
        for run_id, k in zip(run_ids, keys, strict=True):
            logs = instance.all_logs(run_id)
            assert any(e.user_message == f"partition {k}" for e in logs)
            assert (home / "history" / "runs" / f"{run_id}.db").exists()
        mats = instance.fetch_materializations(counted.key, limit=100).records
        assert sorted(m.partition_key for m in mats) == keys
        assert len(instance.event_log_storage._engines) <= MAX_OPEN_SHARDS

        instance.wipe()  # closes the shards before deleting their files
        assert not instance.fetch_materializations(counted.key, limit=100).records
        instance.add_dynamic_partitions("days", keys[:1])
        assert dg.materialize([counted], instance=instance, partition_key=keys[0]).success


def test_another_process_writes_are_seen_through_the_open_connections(tmp_path):
    home = _home(tmp_path)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("days", ["a", "b"])
        assert dg.materialize([counted], instance=instance, partition_key="a").success
        assert instance.get_latest_materialization_event(counted.key).asset_materialization.partition == "a"
        script = textwrap.dedent(
            f"""
            import dagster as dg
            from clinical_ml_tests.defs.test_instance_storage import counted
            with dg.DagsterInstance.from_config({str(home)!r}) as instance:
                assert dg.materialize([counted], instance=instance, partition_key="b").success
            """
        )
        env = {**os.environ, "DAGSTER_HOME": str(home)}
        subprocess.run([sys.executable, "-c", script], check=True, cwd=PROJECT_ROOT, env=env, timeout=300)
        latest = instance.get_latest_materialization_event(counted.key)
        assert latest is not None and latest.asset_materialization.partition == "b"
        assert len(instance.get_run_records(dg.RunsFilter(), limit=10)) == 2
