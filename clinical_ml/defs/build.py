"""Assemble the code location from the stage modules and the use case files."""

import os
from pathlib import Path

import dagster as dg

from clinical_ml.core.fhir import SUBJECT_SYSTEM_SITE
from clinical_ml.core.locations import (
    alerts_file,
    monitoring_config_file,
    resolve_data_root,
    resolve_usecases_dir,
)
from clinical_ml.core.monitoring_config import load_monitoring_config
from clinical_ml.core.usecase import load_use_cases
from clinical_ml.defs.anonymization.assets import anonymized_cohort, meds_dataset
from clinical_ml.defs.conventions import in_use_case_groups
from clinical_ml.defs.ingestion.assets import raw_assets
from clinical_ml.defs.ingestion.jobs import batch_ingestion_job
from clinical_ml.defs.ingestion.quality import quality_assets
from clinical_ml.defs.ingestion.sensors import build_stuck_run_alert_sensor, landing_sensor
from clinical_ml.defs.monitoring.sensors import (
    build_decision_alert_sensor,
    build_drift_retraining_sensor,
    build_monitoring_chain_sensors,
    build_run_failure_alert_sensor,
    features_after_ingestion_sensor,
)
from clinical_ml.defs.usecase.automation import (
    batch_monitoring_job,
    build_nightly_retraining_schedule,
    feature_refresh_job,
    lifecycle_job,
    monitoring_report_job,
)
from clinical_ml.defs.usecase.factory import build_use_case_assets
from clinical_ml.defs.usecase.training import build_sign_off_job
from clinical_ml.resources.pseudonym_secret import anonymization_settings_from_env
from clinical_ml.resources.settings import AnonymizationSettings, EvaluationSettings
from clinical_ml.resources.zones import DataZones


def build_definitions(
    *,
    data_root: str | Path | None = None,
    usecases_dir: str | Path | None = None,
    evaluation: EvaluationSettings | None = None,
    anonymization: AnonymizationSettings | None = None,
    fhir_subject: str | None = None,
    data: str | None = None,
) -> dg.Definitions:
    """The whole graph; every setting is resolved here, once, and passed down. Defaults:
    ``$CLINICAL_ML_DATA_ROOT`` or ``./data``, ``$CLINICAL_ML_USECASES`` or ``./usecases`` (with each use
    case's monitoring levels in ``<usecases>/monitoring/<name>.yaml``), ``$CLINICAL_ML_FHIR_SUBJECT`` or ``pseudonym`` (``site``: also deliver RiskAssessments
    under the site's ids, identifier system ``$CLINICAL_ML_FHIR_SITE_SYSTEM``, to the phi zone's outbox).
    ``data``: only the use cases written for that data (their ``datasets`` empty or naming it); ``None``: all."""
    subject = fhir_subject or os.environ.get("CLINICAL_ML_FHIR_SUBJECT") or "pseudonym"
    if subject not in ("pseudonym", "site"):
        raise ValueError(f"CLINICAL_ML_FHIR_SUBJECT must be 'pseudonym' or 'site', not {subject!r}")
    site_system = (
        (os.environ.get("CLINICAL_ML_FHIR_SITE_SYSTEM") or SUBJECT_SYSTEM_SITE) if subject == "site" else None
    )
    root = resolve_data_root(data_root)
    cases_dir = resolve_usecases_dir(usecases_dir)
    # a location shows what it can materialize: the use cases written for its data (``datasets``)
    use_cases = [
        uc for uc in load_use_cases(cases_dir) if data is None or not uc.datasets or data in uc.datasets
    ]
    use_case_assets = [
        a
        for uc in use_cases
        for a in build_use_case_assets(
            uc,
            monitoring=load_monitoring_config(monitoring_config_file(cases_dir, uc.name)),
            ehr_site_system=site_system,
        )
    ]
    assets = [
        *in_use_case_groups([*raw_assets, *quality_assets, anonymized_cohort, meds_dataset]),  # stage tags
        *[a for a in use_case_assets if not isinstance(a, dg.AssetChecksDefinition)],
    ]
    # a retraining request retrains the use case that asked, not every use case of lifecycle_job
    lifecycle_keys = lifecycle_job.selection.resolve(assets)
    return dg.Definitions(
        assets=assets,
        asset_checks=[a for a in use_case_assets if isinstance(a, dg.AssetChecksDefinition)],
        jobs=[
            batch_ingestion_job,
            lifecycle_job,
            feature_refresh_job,
            batch_monitoring_job,
            monitoring_report_job,
            *[build_sign_off_job(uc) for uc in use_cases],
        ],
        sensors=[
            landing_sensor,
            features_after_ingestion_sensor,
            *build_monitoring_chain_sensors(use_cases),
            build_drift_retraining_sensor(use_cases, lifecycle_keys),
            build_run_failure_alert_sensor(alerts_file(root), os.environ.get("CLINICAL_ML_ALERT_WEBHOOK")),
            build_stuck_run_alert_sensor(
                alerts_file(root),
                os.environ.get("CLINICAL_ML_ALERT_WEBHOOK"),
                limit_seconds=60 * float(os.environ.get("CLINICAL_ML_STUCK_RUN_MINUTES", "120")),
            ),
            build_decision_alert_sensor(
                use_cases, alerts_file(root), os.environ.get("CLINICAL_ML_ALERT_WEBHOOK")
            ),
        ],
        schedules=[build_nightly_retraining_schedule(use_cases)],
        resources={
            "zones": DataZones(root=str(root)),
            "anonymization": anonymization or anonymization_settings_from_env(),
            "evaluation": evaluation or EvaluationSettings(),
        },
    )
