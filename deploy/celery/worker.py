"""The Celery app of the workers: dagster-celery's app (its ``dagster`` queue, priorities and ``execute_plan``
task) with the broker and backend from the environment and the settings the executor uses
(deploy/celery/settings.py). Tested by clinical_ml_tests/e2e/test_celery.py; how to run it: deploy/celery/README.md.

    .venv/bin/celery -A deploy.celery.worker worker -Q dagster --concurrency 2 -n w1@%h -l info

One change to the task: a worker process keeps the Dagster instance it builds from a step's instance reference
for the next steps with the same reference, where dagster-celery builds a new one for every step (three
storages opened, each asking the database for its tables on a connection of its own): about a fifth of a
worker's time in a step's task, in py-spy samples of benchmarks/bench_celery.py on PostgreSQL. Long-lived
instances are what the daemon and the webserver use; nothing in a step's execution keeps per-run state on it.

And each pool process loads the code location (:data:`CODE_LOCATION_MODULE`) when it starts, after Celery forks
it, instead of inside its first step: about 4 s of imports that made every new worker's first step, and every
step a replaced process takes, 4 s longer. A process that has loaded it writes an empty file named by its pid
in ``$CLINICAL_ML_WORKER_READY_DIR`` when that is set: a readiness check (``local.py``'s workers wait for
it). A code location that fails to load is logged and left to fail the first step, in the run's event log.
"""

import functools
import importlib
import logging
import os
import time
from pathlib import Path

from celery.signals import worker_process_init
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import deserialize_value, serialize_value
from dagster_celery import tasks
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from deploy.celery.settings import BACKEND_ENV, BROKER_ENV, CELERY_SETTINGS, READY_DIR_ENV

CODE_LOCATION_MODULE = "deploy.celery.definitions"
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _instance_for(serialized_ref: str) -> DagsterInstance:
    return DagsterInstance.from_ref(deserialize_value(serialized_ref, InstanceRef))


class InstancePerProcess(DagsterInstance):
    """What dagster-celery's task module calls ``DagsterInstance``: its ``from_ref`` gives this process's
    instance for the reference (made on first use), the rest is DagsterInstance's."""

    @staticmethod
    def from_ref(instance_ref: InstanceRef) -> DagsterInstance:
        return _instance_for(serialize_value(instance_ref))


# the pinned dagster-celery's task reads the name from its module on every call
# (clinical_ml_tests/defs/test_celery_executor.py fails if it stops doing so)
tasks.DagsterInstance = InstancePerProcess  # type: ignore[misc]


@worker_process_init.connect
def load_code_location(**_: object) -> None:
    """In every pool process as it starts (module docstring)."""
    started = time.perf_counter()
    try:
        importlib.import_module(CODE_LOCATION_MODULE)
    except Exception:
        logger.exception("the code location %s did not load; its steps will fail", CODE_LOCATION_MODULE)
        return
    logger.info("code location %s loaded in %.1f s", CODE_LOCATION_MODULE, time.perf_counter() - started)
    ready_dir = os.environ.get(READY_DIR_ENV)
    if ready_dir:
        Path(ready_dir).mkdir(parents=True, exist_ok=True)
        (Path(ready_dir) / str(os.getpid())).touch()


app = make_app(
    {
        "broker": os.environ[BROKER_ENV],
        "backend": os.environ[BACKEND_ENV],
        "include": [],
        "config_source": CELERY_SETTINGS,
    }
)
execute_plan = create_task(app)
