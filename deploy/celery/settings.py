"""Settings shared by the Celery executor (deploy/celery/definitions.py) and the workers
(deploy/celery/worker.py): both must agree on the broker, the result backend and how a task is acknowledged.

The broker and backend come from the environment (no secret in code): ``CLINICAL_ML_CELERY_BROKER`` (e.g.
``redis://broker:6379/0``) and ``CLINICAL_ML_CELERY_BACKEND`` (e.g. ``redis://broker:6379/1``).
"""

BROKER_ENV = "CLINICAL_ML_CELERY_BROKER"
BACKEND_ENV = "CLINICAL_ML_CELERY_BACKEND"
# Where a worker's pool process says it has loaded the code location (an empty file named by its pid), if set.
READY_DIR_ENV = "CLINICAL_ML_WORKER_READY_DIR"

# A step's task is acknowledged when the step has finished, not when a worker takes it, and a task whose
# worker process died (SIGKILL, the OOM killer) goes back on the queue for another worker instead of being
# lost: without these two a killed worker process leaves its run waiting for a result that never comes.
# One task at a time per worker process (no prefetching): a long step does not hold others hostage.
CELERY_SETTINGS: dict[str, object] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    # Redis keeps one list per priority step (kombu's 0, 3, 6, 9) and a worker takes from the lowest number
    # first: the steps holding a pool slot go at POOL_STEP_PRIORITY, the others at dagster-celery's default 5
    # (definitions.py). (RabbitMQ orders the other way round and needs x-max-priority: not tested.)
    "task_default_priority": 5,
    # A pool process loads the code location as it starts (worker.py), several seconds on a loaded machine:
    # Celery's default 4 s for a new process to report itself up would have it killed and started again.
    "worker_proc_alive_timeout": 120,
}
POOL_STEP_PRIORITY = 0
# How often a run's executor looks at its steps in flight (dagster-celery's default is 1 s): see definitions.py.
# 0.1 s (0.2 s before): each of a run's hand-overs from one step to the next waits half a tick on average, and
# with three runs at once two workers waited on those hand-overs (benchmarks/README.md, "Celery: fourth re-run").
# A tick costs one result-backend read per step in flight.
STEP_POLL_SECONDS = 0.1
