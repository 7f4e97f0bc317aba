"""The landing sensor: one run per new complete batch, none for a batch already seen."""

import os
import shutil

import dagster as dg
import pytest

from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker
from clinical_ml.defs.ingestion.sensors import landing_sensor
from clinical_ml.resources.zones import DataZones


@pytest.fixture
def landing(tmp_path):
    generate_hospital(tmp_path / "landing", SyntheticConfig(n_patients=60, n_batches=2, seed=3))
    return tmp_path


def _tick(instance, root, cursor=None):
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"zones": DataZones(root=str(root))}
    )
    return landing_sensor(ctx)


def test_one_run_per_new_batch_and_none_for_seen_batches(landing):
    with dg.instance_for_test() as instance:
        first = _tick(instance, landing)
        assert sorted(r.partition_key for r in first.run_requests) == ["2026-01-05", "2026-01-06"]
        assert len({r.run_key for r in first.run_requests}) == 2
        again = _tick(instance, landing, first.cursor)
        assert again.run_requests == []


def test_incomplete_batch_waits_for_its_marker(landing):
    with dg.instance_for_test() as instance:
        first = _tick(instance, landing)
        new = landing / "landing" / "2026-01-07"
        shutil.copytree(landing / "landing" / "2026-01-06", new)
        (new / "_SUCCESS").unlink()
        assert _tick(instance, landing, first.cursor).run_requests == []
        write_completion_marker(new)
        result = _tick(instance, landing, first.cursor)
        assert [r.partition_key for r in result.run_requests] == ["2026-01-07"]


def test_changed_content_under_the_same_name_runs_again(landing):
    with dg.instance_for_test() as instance:
        first = _tick(instance, landing)
        batch = landing / "landing" / "2026-01-05"
        lines = (batch / "labs.csv").read_text().splitlines(keepends=True)
        (batch / "labs.csv").write_text("".join(lines[:-1]))
        write_completion_marker(batch)
        result = _tick(instance, landing, first.cursor)
        assert [r.partition_key for r in result.run_requests] == ["2026-01-05"]
        assert result.run_requests[0].run_key != next(
            r.run_key for r in first.run_requests if r.partition_key == "2026-01-05"
        )


def _tick_with(instance, root, cursor=None, **zone_options):
    ctx = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"zones": DataZones(root=str(root), **zone_options)}
    )
    return landing_sensor(ctx)


def test_a_restarted_daemon_neither_repeats_nor_loses_a_batch(landing):
    with dg.instance_for_test() as instance:
        first = _tick(instance, landing)
        # A restart starts from the persisted cursor: nothing runs twice...
        assert _tick(instance, landing, first.cursor).run_requests == []
        # ...and a batch that arrived while the daemon was down is picked up.
        new = landing / "landing" / "2026-01-09"
        shutil.copytree(landing / "landing" / "2026-01-06", new)
        write_completion_marker(new)
        assert [r.partition_key for r in _tick(instance, landing, first.cursor).run_requests] == [
            "2026-01-09"
        ]


def test_a_batch_without_marker_runs_once_its_files_stop_changing(landing):
    with dg.instance_for_test() as instance:
        first = _tick(instance, landing)
        new = landing / "landing" / "2026-01-08"
        shutil.copytree(landing / "landing" / "2026-01-06", new)
        (new / "_SUCCESS").unlink()
        seen = _tick_with(instance, landing, first.cursor, unmarked_batch_quiet_seconds=0)
        assert seen.run_requests == []  # first sight: sizes and times not yet known to be stable
        # Still being copied: the modification time moves.
        os.utime(new / "vitals.csv", ns=(1, 1))
        moved = _tick_with(instance, landing, seen.cursor, unmarked_batch_quiet_seconds=0)
        assert moved.run_requests == []
        stable = _tick_with(instance, landing, moved.cursor, unmarked_batch_quiet_seconds=0)
        assert [r.partition_key for r in stable.run_requests] == ["2026-01-08"]
        assert _tick_with(instance, landing, stable.cursor, unmarked_batch_quiet_seconds=0).run_requests == []


def test_odd_and_symlinked_batch_folders_are_never_read(landing):
    with dg.instance_for_test() as instance:
        first = _tick(instance, landing)
        src = landing / "landing" / "2026-01-06"
        shutil.copytree(src, landing / "landing" / "batch 7")
        (landing / "landing" / "2026-01-10").symlink_to(src, target_is_directory=True)
        assert _tick(instance, landing, first.cursor).run_requests == []


@dg.op
def _ingested() -> None:
    return None


@dg.job
def _ingestion_stand_in() -> None:
    _ingested()


def test_a_batch_ingested_outside_the_sensor_is_not_ingested_again(landing):
    from clinical_ml.core.landing import find_complete_batches

    batches = {b.batch_id: b for b in find_complete_batches(landing / "landing")}
    done = batches["2026-01-05"]
    with dg.instance_for_test() as instance:
        # as `make demo` tags its runs: same batch, same content
        _ingestion_stand_in.execute_in_process(
            instance=instance, tags={"batch_id": done.batch_id, "content_sha256": done.content_hash}
        )
        first = _tick(instance, landing)
        assert [r.partition_key for r in first.run_requests] == ["2026-01-06"]
        assert _tick(instance, landing, first.cursor).run_requests == []


def _alerts(root) -> list[dict]:
    import json

    from clinical_ml.core.locations import alerts_file

    f = alerts_file(root)
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def test_every_batch_folder_seen_is_started_or_reported(tmp_path):
    from clinical_ml_tests.core.test_landing_markers import BATCH, VARIANTS, make_variant

    generate_hospital(tmp_path / "clean", SyntheticConfig(n_patients=40, n_batches=1, seed=5))
    for name in VARIANTS:
        make_variant(tmp_path / "clean" / BATCH, tmp_path / "landing", name)
    unmarked = tmp_path / "landing" / "unmarked_no_data"
    unmarked.mkdir()
    (unmarked / "readme.txt").write_text("x")
    with dg.instance_for_test() as instance:
        quiet = _tick_with(instance, tmp_path, stuck_batch_seconds=3600)
        assert _alerts(tmp_path) == []  # within the limit: nothing to report yet
        first = _tick_with(instance, tmp_path, stuck_batch_seconds=0)
        started = {r.partition_key for r in first.run_requests}
        reported = {a["partition"]: a["reason"] for a in _alerts(tmp_path)}
        assert started == {n for n, (_, why) in VARIANTS.items() if why == "started"}
        expected = {n: why for n, (_, why) in VARIANTS.items() if why != "started"}
        assert reported == expected | {"unmarked_no_data": "files_still_changing"}
        assert {r.partition_key for r in quiet.run_requests} == started
        # the stable unmarked folder is reported again for its new reason; nobody is reported twice
        again = _tick_with(instance, tmp_path, first.cursor, stuck_batch_seconds=0)
        assert again.run_requests == []
        assert [a["reason"] for a in _alerts(tmp_path)[len(reported) :]] == ["no_data_files"]
        assert any(
            "crlf_in_transfer" in a["message"] and "line ends were converted" in a["message"]
            for a in _alerts(tmp_path)
        )
        # a broken marker fixed later starts the batch
        write_completion_marker(tmp_path / "landing" / "empty")
        fixed = _tick_with(instance, tmp_path, again.cursor, stuck_batch_seconds=0)
        assert [r.partition_key for r in fixed.run_requests] == ["empty"]
