"""The clinical_ml code location with every step executed by a Celery worker (dagster-celery), on the
PostgreSQL instance of deploy/celery/dagster.yaml. Tested by clinical_ml_tests/e2e/test_celery.py; how to run
it on several machines: deploy/celery/README.md.

Load it as the code location (``--module-name deploy.celery.definitions``); nothing else in the code changes.
"""

import dagster as dg
from dagster_celery import celery_executor

from clinical_ml.defs.build import build_definitions
from deploy.celery.settings import BACKEND_ENV, BROKER_ENV, CELERY_SETTINGS

defs = dg.Definitions.merge(
    build_definitions(),
    dg.Definitions(
        executor=celery_executor.configured(
            {
                "broker": {"env": BROKER_ENV},
                "backend": {"env": BACKEND_ENV},
                "config_source": CELERY_SETTINGS,
            }
        )
    ),
)
