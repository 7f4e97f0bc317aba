"""The Celery app of the workers: dagster-celery's app (its ``dagster`` queue, priorities and ``execute_plan``
task) with the broker and backend from the environment and the settings the executor uses
(deploy/celery/settings.py). Tested by clinical_ml_tests/e2e/test_celery.py; how to run it: deploy/celery/README.md.

    .venv/bin/celery -A deploy.celery.worker worker -Q dagster --concurrency 2 -n w1@%h -l info
"""

import os

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from deploy.celery.settings import BACKEND_ENV, BROKER_ENV, CELERY_SETTINGS

app = make_app(
    {
        "broker": os.environ[BROKER_ENV],
        "backend": os.environ[BACKEND_ENV],
        "include": [],
        "config_source": CELERY_SETTINGS,
    }
)
execute_plan = create_task(app)
