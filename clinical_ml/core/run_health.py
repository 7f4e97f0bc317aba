"""Runs that have waited or run past a limit: the pure part of the stuck-run alert (no Dagster here).

A run killed with ``kill -9`` stays STARTED in the instance and keeps its pool slots until Dagster's run
monitoring (``dagster.yaml``: ``run_monitoring``) times it out and frees them; a run queued behind it waits as
long. Both are reported to a person once, with what to do, as soon as they pass the limit.
"""

from dataclasses import dataclass

# Statuses as Dagster names them (``DagsterRunStatus.value``).
WAITING = frozenset({"QUEUED", "NOT_STARTED", "STARTING"})
RUNNING = frozenset({"STARTED", "CANCELING"})


@dataclass(frozen=True)
class RunView:
    """What the check needs of one run.

    Attributes
    ----------
    run_id, job_name, status
        As the instance has them (status is ``DagsterRunStatus.value``).
    created_at
        Epoch seconds the run was created (queued).
    started_at
        Epoch seconds the run started, or ``None`` when it has not.
    """

    run_id: str
    job_name: str
    status: str
    created_at: float
    started_at: float | None = None


@dataclass(frozen=True)
class StuckRun:
    """A run past its limit, and the sentence a person reads."""

    run: RunView
    minutes: int
    message: str


def stuck_runs(
    runs: list[RunView], *, now: float, limit_seconds: float, already_reported: frozenset[str] = frozenset()
) -> list[StuckRun]:
    """Runs waiting to start, or started, for longer than ``limit_seconds`` and not yet reported.

    A waiting run is timed from its creation, a running one from its start (from its creation when the
    instance has no start time)."""
    out = []
    for r in sorted(runs, key=lambda r: r.created_at):
        if r.run_id in already_reported or r.status not in WAITING | RUNNING:
            continue
        since = r.started_at if r.status in RUNNING and r.started_at is not None else r.created_at
        waited = now - since
        if waited < limit_seconds:
            continue
        minutes = int(waited // 60)
        if r.status in WAITING:
            message = (
                f"run {r.run_id} of {r.job_name} has waited {minutes} min to start ({r.status}): a pool slot or "
                "a run slot may be held by a run that died. See docs/operations.md, 'A run that is stuck'."
            )
        else:
            message = (
                f"run {r.run_id} of {r.job_name} has been {r.status} for {minutes} min: its process may have "
                "died (run monitoring fails it after max_runtime and frees its pool slots). See "
                "docs/operations.md, 'A run that is stuck'."
            )
        out.append(StuckRun(r, minutes, message))
    return out
