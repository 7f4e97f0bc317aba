"""Celery app for the workers, with the broker and backend from the environment (dagster-celery's documented
customization: an app whose ``execute_plan`` task runs Dagster steps). NOT TESTED HERE."""

import os

from celery import Celery
from dagster_celery.tasks import create_task

app = Celery(
    "dagster",
    broker=os.environ["CLINICAL_ML_CELERY_BROKER"],
    backend=os.environ["CLINICAL_ML_CELERY_BACKEND"],
    include=["clinical_ml.defs.build"],
)
execute_plan = create_task(app)

if __name__ == "__main__":
    app.worker_main()
