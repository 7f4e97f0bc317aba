"""The Celery app of the workers: dagster-celery's app (its ``dagster`` queue, priorities and ``execute_plan``
task) with the broker and backend from the environment and the settings the executor uses
(deploy/celery/settings.py). Tested by clinical_ml_tests/e2e/test_celery.py; how to run it: deploy/celery/README.md.

    .venv/bin/celery -A deploy.celery.worker worker -Q dagster --concurrency 2 -n w1@%h -l info

One change to the task: a worker process keeps the Dagster instance it builds from a step's instance reference
for the next steps with the same reference, where dagster-celery builds a new one for every step (three
storages opened, each asking the database for its tables on a connection of its own): about a fifth of a
worker's time in a step's task, in py-spy samples of benchmarks/bench_celery.py on PostgreSQL. Long-lived
instances are what the daemon and the webserver use; nothing in a step's execution keeps per-run state on it.
"""

import functools
import os

from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._serdes import deserialize_value, serialize_value
from dagster_celery import tasks
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from deploy.celery.settings import BACKEND_ENV, BROKER_ENV, CELERY_SETTINGS


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

app = make_app(
    {
        "broker": os.environ[BROKER_ENV],
        "backend": os.environ[BACKEND_ENV],
        "include": [],
        "config_source": CELERY_SETTINGS,
    }
)
execute_plan = create_task(app)
