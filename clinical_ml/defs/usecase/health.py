"""The system-health page beside each use case's monitoring report (:mod:`clinical_ml.core.system_health`):
the instance's runs, the use case's time to prediction and its point-of-care service calls, gathered here."""

import os
from datetime import UTC, datetime, timedelta

import dagster as dg

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.run_health import RUNNING, WAITING, RunView
from clinical_ml.core.storage import code_version
from clinical_ml.core.system_health import health_html, health_markdown, system_health
from clinical_ml.core.usecase import UseCase

HEALTH_DAYS = 7
RUN_PAGE = 500  # runs read per status group: the page counts those, newest first


def _views(records: list[dg.RunRecord]) -> list[RunView]:
    return [
        RunView(
            run_id=r.dagster_run.run_id,
            job_name=r.dagster_run.job_name,
            status=r.dagster_run.status.value,
            created_at=r.create_timestamp.timestamp(),
            started_at=r.start_time,
        )
        for r in records
    ]


def system_health_metadata(instance: dg.DagsterInstance, uc: UseCase, store: UseCaseStore) -> dict:
    """Writes ``reports/<use case>/system_health.html``; its sentences and numbers for the report's metadata."""
    now = datetime.now(UTC)
    failed = instance.get_run_records(
        dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.FAILURE], created_after=now - timedelta(days=HEALTH_DAYS)
        ),
        limit=RUN_PAGE,
    )
    active = instance.get_run_records(
        dg.RunsFilter(statuses=[dg.DagsterRunStatus(s) for s in sorted(WAITING | RUNNING)]), limit=RUN_PAGE
    )
    health = system_health(
        runs=_views([*failed, *active]),
        timings=store.prediction_timing.read_all(),
        requests=store.service_requests.read() if store.service_requests.exists() else None,
        now=now,
        days=HEALTH_DAYS,
        stuck_limit_seconds=60 * float(os.environ.get("CLINICAL_ML_STUCK_RUN_MINUTES", "120")),
    )
    html = health_html(
        health, use_case_name=uc.name, use_case_hash=uc.source_sha256[:12], code_version=code_version()
    )
    out = store.reports.write_report("system_health", html)
    return {
        "system_health": dg.MetadataValue.md(health_markdown(health)),
        "system_health_path": dg.MetadataValue.path(str(out)),
        **health.metadata(),
    }
