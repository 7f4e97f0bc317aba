"""The clinical_ml code location with steps executed by Celery workers (dagster-celery).

NOT TESTED HERE (no broker; dagster-celery is not installed in this environment). Start workers on each
machine with the repository checked out, its .venv, the instance's DAGSTER_HOME and the shared data root:

    DAGSTER_HOME=... CLINICAL_ML_DATA_ROOT=/data .venv/bin/celery -A deploy.celery.worker worker -l info

and load this module as the code location (`--module-name deploy.celery.definitions`).
"""

import dagster as dg
from dagster_celery import celery_executor

from clinical_ml.defs.build import build_definitions

defs = dg.Definitions.merge(
    build_definitions(),
    dg.Definitions(
        executor=celery_executor.configured(
            {
                "broker": {"env": "CLINICAL_ML_CELERY_BROKER"},  # e.g. redis://broker:6379/0
                "backend": {"env": "CLINICAL_ML_CELERY_BACKEND"},  # e.g. redis://broker:6379/1
                "include": ["clinical_ml.defs.build"],
            }
        )
    ),
)
