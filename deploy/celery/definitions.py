"""The clinical_ml code location with every step executed by a Celery worker (dagster-celery), on the
PostgreSQL instance of deploy/celery/dagster.yaml. Tested by clinical_ml_tests/e2e/test_celery.py; how to run
it on several machines: deploy/celery/README.md.

Load it as the code location (``--module-name deploy.celery.definitions``); nothing else in the code changes.

The executor is dagster-celery's, except that a step holding a pool slot (``landing_ledger``, the
``pseudonym_vault`` steps) is sent at :data:`POOL_STEP_PRIORITY`, ahead of the steps that hold none: its run
claims the slot before it submits the task, so every second the task waits in the queue behind other runs'
steps the single slot is held by nobody running. The slots are claimed and freed as before.

Each run's executor also looks at its steps every :data:`STEP_POLL_SECONDS` instead of dagster-celery's one
second: a single-slot pool is handed from one run's step to the next only when the finished step's run has
seen the result and freed the slot, so with one-second ticks every hand-over waited ~0.5 to 1 s with no step
running. A tick costs one result-backend read per step in flight.
"""

import dagster as dg
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.execution.retries import RetryMode
from dagster_celery import core_execution_loop
from dagster_celery.core_execution_loop import core_celery_execution_loop
from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor, _submit_task

from clinical_ml.defs.build import build_definitions
from deploy.celery.settings import (
    BACKEND_ENV,
    BROKER_ENV,
    CELERY_SETTINGS,
    POOL_STEP_PRIORITY,
    STEP_POLL_SECONDS,
)

# dagster-celery (pinned) reads its loop's tick from this module constant on every tick and takes no setting
# for it: set it here, where the executor is defined, so every run process that loads this location uses it.
core_execution_loop.TICK_SECONDS = STEP_POLL_SECONDS


def _submit_pool_steps_first(app, plan_context, step, queue, priority, known_state):  # type: ignore[no-untyped-def]
    return _submit_task(
        app, plan_context, step, queue, POOL_STEP_PRIORITY if step.pool else priority, known_state
    )


class PoolStepsFirstCeleryExecutor(CeleryExecutor):
    def execute(self, plan_context, execution_plan):  # type: ignore[no-untyped-def]
        return core_celery_execution_loop(
            plan_context, execution_plan, step_execution_fn=_submit_pool_steps_first
        )


@dg.executor(
    name="celery",
    config_schema=CELERY_CONFIG,
    requirements=multiple_process_executor_requirements(),
)
def pool_steps_first_celery_executor(init_context: dg.InitExecutorContext) -> dg.Executor:
    """dagster-celery's ``celery_executor`` (same config), pool steps sent first (module docstring)."""
    config = init_context.executor_config
    return PoolStepsFirstCeleryExecutor(
        broker=config.get("broker"),
        backend=config.get("backend"),
        config_source=config.get("config_source"),
        include=config.get("include"),
        retries=RetryMode.from_config(config["retries"]),  # type: ignore[arg-type]
    )


defs = dg.Definitions.merge(
    build_definitions(),
    dg.Definitions(
        executor=pool_steps_first_celery_executor.configured(
            {
                "broker": {"env": BROKER_ENV},
                "backend": {"env": BACKEND_ENV},
                "config_source": CELERY_SETTINGS,
            }
        )
    ),
)
