"""The Celery code location's executor (deploy/celery/definitions.py): its runs look at their steps in flight
every STEP_POLL_SECONDS, not dagster-celery's one second, so a single-slot pool is handed on sooner.

The pinned dagster-celery takes no setting for its tick; the location sets the module constant its loop
sleeps on. If a new dagster-celery stopped reading that constant, the setting would silently do nothing: the
second test fails then.
"""

import inspect
import os
import sys

import pytest
from dagster_celery import core_execution_loop


def test_the_location_sets_the_loops_tick_below_dagster_celerys_second() -> None:
    from deploy.celery.definitions import defs
    from deploy.celery.settings import STEP_POLL_SECONDS

    assert defs.resolve_job_def("batch_ingestion_job").executor_def.name == "celery"
    assert 0 < STEP_POLL_SECONDS < 1
    assert core_execution_loop.TICK_SECONDS == STEP_POLL_SECONDS


def test_the_pinned_loop_sleeps_on_that_constant_each_tick() -> None:
    source = inspect.getsource(core_execution_loop.core_celery_execution_loop)
    assert "time.sleep(TICK_SECONDS)" in source


def test_a_worker_process_keeps_one_instance_per_instance_reference(tmp_path, monkeypatch) -> None:
    """The workers' task (deploy/celery/worker.py) builds its instance from each step's reference through
    the name ``DagsterInstance`` of dagster-celery's task module: the worker gives it one made once per
    process and reference."""
    import dagster as dg
    from dagster_celery import tasks

    monkeypatch.setenv("CLINICAL_ML_CELERY_BROKER", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CLINICAL_ML_CELERY_BACKEND", "redis://127.0.0.1:1/1")
    from deploy.celery import worker

    assert "DagsterInstance.from_ref(" in inspect.getsource(tasks.create_task)
    assert tasks.DagsterInstance is worker.InstancePerProcess
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        dg.instance_for_test(temp_dir=str(tmp_path / "a")) as a,
        dg.instance_for_test(temp_dir=str(tmp_path / "b")) as b,
    ):
        first = tasks.DagsterInstance.from_ref(a.get_ref())
        assert tasks.DagsterInstance.from_ref(a.get_ref()) is first
        assert first.root_directory == a.root_directory
        other = tasks.DagsterInstance.from_ref(b.get_ref())
        assert other is not first and other.root_directory == b.root_directory


def test_worker_processes_on_one_machine_share_its_cores_as_polars_threads() -> None:
    from deploy.celery.local import polars_threads

    assert polars_threads(2, 1) == 2  # one process: every core
    assert polars_threads(2, 2) == 1
    assert polars_threads(16, 4) == 4
    assert polars_threads(2, 3) == 1  # never none
    assert polars_threads(1, 0) == 1


@pytest.fixture
def worker_module(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CLINICAL_ML_CELERY_BROKER", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CLINICAL_ML_CELERY_BACKEND", "redis://127.0.0.1:1/1")
    from deploy.celery import worker

    return worker


def test_a_new_pool_process_loads_the_code_location_before_any_step_and_says_so(
    worker_module, tmp_path, monkeypatch
) -> None:
    """Celery sends ``worker_process_init`` in each pool process it starts: the worker's handler imports the code
    location there and then writes the process's ready file (what LocalWorkers.ready waits for)."""
    from celery.signals import worker_process_init

    from deploy.celery.settings import READY_DIR_ENV

    monkeypatch.setenv(READY_DIR_ENV, str(tmp_path / "ready"))
    monkeypatch.delitem(sys.modules, worker_module.CODE_LOCATION_MODULE, raising=False)
    worker_process_init.send(sender=None)
    assert worker_module.CODE_LOCATION_MODULE in sys.modules
    assert (tmp_path / "ready" / str(os.getpid())).exists()


def test_a_code_location_that_fails_to_load_is_logged_and_the_process_not_said_ready(
    worker_module, tmp_path, monkeypatch, caplog
) -> None:
    from deploy.celery.settings import READY_DIR_ENV

    monkeypatch.setenv(READY_DIR_ENV, str(tmp_path / "ready"))
    monkeypatch.setattr(worker_module, "CODE_LOCATION_MODULE", "deploy.celery.no_such_location")
    worker_module.load_code_location()
    assert not (tmp_path / "ready").exists()
    assert "deploy.celery.no_such_location did not load" in caplog.text
