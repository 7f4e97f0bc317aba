"""The Celery code location's executor (deploy/celery/definitions.py): its runs look at their steps in flight
every STEP_POLL_SECONDS, not dagster-celery's one second, so a single-slot pool is handed on sooner.

The pinned dagster-celery takes no setting for its tick; the location sets the module constant its loop
sleeps on. If a new dagster-celery stopped reading that constant, the setting would silently do nothing: the
second test fails then.
"""

import inspect

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
