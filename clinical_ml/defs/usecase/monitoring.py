"""Monitoring of one use case: each batch scored and checked for drift (one partition per batch), the FHIR
export for the EHR, and performance over time; the newest-batch drift report is kept for the report set."""

import warnings
from datetime import UTC, datetime

import dagster as dg

from clinical_ml.core.artifacts import DriftRecord, FeatureDriftSnapshot
from clinical_ml.core.batch_monitoring import BatchMonitoring
from clinical_ml.core.champion_monitoring import (
    Champion,
    NoChampionError,
    check_batch,
    decisions_with_reasons,
    hold_reason,
    load_champion,
    monitoring_frame,
    newest_batch_drift,
    review_performance,
    score_batch,
    scored_admissions,
    scored_summary,
)
from clinical_ml.core.clinician_feedback import feedback_view
from clinical_ml.core.delivery import ZonePaths, read_ledger_entry
from clinical_ml.core.display_names import display_name
from clinical_ml.core.fhir import reidentify_for_ehr, write_ndjson
from clinical_ml.core.ingestion import SOURCE_COLUMNS
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.reports import (
    drift_check_words,
    drift_markdown,
    drift_report,
    md_escape,
    monitoring_report,
    rounded,
)
from clinical_ml.core.storage import code_version
from clinical_ml.core.time_to_prediction import PredictionTiming, landed_at, prediction_timing
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import (
    ML_OWNERS,
    PRIVACY_OWNERS,
    DataClass,
    Stage,
    batch_partitions,
    tags,
)
from clinical_ml.defs.usecase.feedback import clinician_feedback_monitoring
from clinical_ml.defs.usecase.health import system_health_metadata
from clinical_ml.defs.usecase.paths import md_table, use_case_key
from clinical_ml.resources.zones import DataZones

PER_BATCH_TAG = {"monitoring": "per_batch"}


def _nothing_deployed(health: dict):
    """The monitoring report's results before any champion: nothing to monitor, the check not judged."""
    yield dg.MaterializeResult(
        metadata={"report": dg.MetadataValue.md("No champion yet: nothing deployed."), **health}
    )
    yield dg.AssetCheckResult(
        check_name="realised_performance_meets_minimums",
        passed=True,
        description="not judged: no champion model deployed yet",
        metadata={"note": "no champion model deployed yet", "judged": False},
    )


def _champion(zones: DataZones, uc: UseCase) -> Champion:
    try:
        return load_champion(zones.model_registry(uc.name))
    except NoChampionError as e:
        raise dg.Failure(str(e)) from e


def _held(context: dg.AssetExecutionContext, zones: DataZones, uc: UseCase, what: str) -> str | None:
    """Why the batch's drift check holds ``what`` back (a decision: the asset records it and the run goes
    on), or None. A batch no drift check has judged yet fails the run: there is nothing to decide from."""
    batch = context.partition_key
    part = zones.use_case(uc.name).drift_records.part(batch)
    record = part.read() if part.exists() else None
    held = hold_reason(record, batch_id=batch, what=what)
    if held and record is None:
        raise dg.Failure(held)
    if held:
        context.log.warning(held)
    return held


def _held_result(reason: str) -> dg.MaterializeResult:
    """Nothing of the batch written, and why: what the asset page shows for a held batch."""
    return dg.MaterializeResult(metadata={"dagster/row_count": 0, "held": True, "held_because": reason})


def _released_predictions(zones: DataZones, uc: UseCase, batch: str):
    """The batch's scored admissions, the model version and its threshold (the drift check released them)."""
    store = zones.use_case(uc.name)
    preds = store.batch_predictions.part(batch).read()
    version = str(preds["model_version"][0]) if preds.height else "none"
    threshold = zones.model_registry(uc.name).card(version).threshold if preds.height else 0.5
    return preds, version, threshold


def build_ehr_delivery_asset(uc: UseCase, site_system: str) -> dg.AssetsDefinition:
    """Opt-in (``CLINICAL_ML_FHIR_SUBJECT=site``): the batch's RiskAssessments under the site's own patient and
    encounter ids and real times, written to the phi zone's outbox for the EHR interface engine. The one
    asset outside ingestion that reads the pseudonym vault: it re-crosses the boundary on purpose, and
    only into the phi zone."""

    @dg.asset(
        key=use_case_key(uc, "ehr_delivery"),
        deps=[use_case_key(uc, "risk_assessment_export")],
        partitions_def=batch_partitions,
        group_name=Stage.DELIVERY,
        kinds={"fhir", "ndjson"},
        tags={**tags(DataClass.PHI), **PER_BATCH_TAG},
        description="FHIR R4 RiskAssessments of the batch with the site's patient id (its MRN system) and "
        "encounter id and the real prediction time, in the phi zone's outbox for the EHR interface engine.",
        owners=PRIVACY_OWNERS,
    )
    def ehr_delivery(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        batch = context.partition_key
        if held := _held(context, zones, uc, "EHR delivery"):
            return _held_result(held)
        preds, version, threshold = _released_predictions(zones, uc, batch)
        phi = zones.phi_store()
        vault = phi.read_vault()
        if preds.height and vault.patients.height == 0:
            raise dg.Failure(
                "No pseudonym vault in the phi zone: site ids need the vault pseudonym mode (HMAC mode keeps no "
                "mapping). Set CLINICAL_ML_FHIR_SUBJECT=pseudonym or use the vault mode."
            )
        site = reidentify_for_ehr(preds, vault.patients, vault.encounters)
        n = write_ndjson(
            scored_admissions(site, subject="mrn", encounter="encounter_id"),
            phi.ehr_outbox(uc.name, batch),
            use_case=uc.name,
            outcome=uc.outcome.outcome_code,
            outcome_text=uc.outcome.description,
            model_version=version,
            clinical_action=uc.operating_point.clinical_action,
            threshold=threshold,
            subject_system=site_system,
        )
        # counts only: the file holds identifiers, its metadata does not
        return dg.MaterializeResult(
            metadata={"dagster/row_count": n, "held": False, "subject_system": site_system}
        )

    return ehr_delivery


def _rounded(metadata: dict) -> dict:
    """Numbers as the UI shows them: floats to 3 decimals (counts and text as they are)."""
    return {k: rounded(v) if isinstance(v, float) else v for k, v in metadata.items()}


def _partitioned_check_spec(asset: dg.AssetKey) -> dg.AssetCheckSpec:
    """The drift check, one result per batch (its partition shows beside the result in the UI)."""
    with warnings.catch_warnings():
        # partitioned asset checks are a preview in Dagster 1.13; their behaviour is tested here
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.AssetCheckSpec(
            "drift_below_error_level",
            asset=asset,
            partitions_def=batch_partitions,
            description="No predictor or prediction drift at ERROR level (significant after Bonferroni and "
            "material). An ERROR is a decision, not a crash: it requests retraining, alerts, and holds this "
            "batch's FHIR export (the export records why); the run succeeds.",
        )


TIME_TO_PREDICTION_CHECK = "time_to_prediction_within_limit"


def _time_to_prediction_spec(asset: dg.AssetKey, uc: UseCase) -> dg.AssetCheckSpec:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)  # partitioned checks: see _partitioned_check_spec
        return dg.AssetCheckSpec(
            TIME_TO_PREDICTION_CHECK,
            asset=asset,
            partitions_def=batch_partitions,
            description="The batch's predictions were written within operations.max_hours_to_prediction "
            f"({uc.operations.max_hours_to_prediction:g} h) of the batch landing (its first ledger entry); "
            "a re-scoring keeps the first time. A warning: late predictions are still delivered.",
        )


def _timing(zones: DataZones, uc: UseCase, batch: str) -> PredictionTiming:
    """This scoring's time to prediction, kept beside the batch's predictions."""
    paths = ZonePaths(
        landing=zones.landing, archive=zones.archive, quarantine=zones.quarantine, phi=zones.phi
    )
    part = zones.use_case(uc.name).prediction_timing.part(batch)
    timing = prediction_timing(
        batch_id=batch,
        landed=landed_at(e for s in SOURCE_COLUMNS if (e := read_ledger_entry(paths, batch, s)) is not None),
        now=datetime.now(UTC),
        limit_hours=uc.operations.max_hours_to_prediction,
        previous=part.read() if part.exists() else None,
    )
    part.write(timing)
    return timing


def _drift_markdown(record: DriftRecord, result: BatchMonitoring, config: MonitoringConfig) -> str:
    moved = [d for d in result.features if d.level != "ok"]
    return (
        f"**Batch {record.batch_id}: {record.level.upper()}**"
        + (" (retraining requested)" if record.retraining_requested else "")
        + (f"\n\n{record.retraining_note}" if record.retraining_note else "")
        + f"\n\nReference: {record.reference}.\n\n{config.drift.describe()}\n\n"
        + drift_markdown(moved, thresholds=config.drift, label=display_name)
    )


def build_monitoring_assets(
    uc: UseCase, config: MonitoringConfig
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("batch_predictions"),
        deps=[key("patient_features"), key("model_registry")],
        partitions_def=batch_partitions,
        group_name=Stage.MONITORING,
        kinds={"lightgbm", "parquet"},
        tags={**tags(DataClass.DEIDENTIFIED), **PER_BATCH_TAG},
        description="The batch's eligible admissions scored by the champion at their prediction time: risk, "
        "operating-point flag, top reasons, guardrail flags, model version; and the hours from the batch "
        "landing to these predictions.",
        owners=ML_OWNERS,
        check_specs=[_time_to_prediction_spec(key("batch_predictions"), uc)],
    )
    def batch_predictions(context: dg.AssetExecutionContext, zones: DataZones):
        store, champion = zones.use_case(uc.name), _champion(zones, uc)
        scored = score_batch(monitoring_frame(store, context.partition_key), champion)
        store.batch_predictions.part(context.partition_key).write(scored)
        timing = _timing(zones, uc, context.partition_key)
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": scored.height,
                "model_version": champion.version,
                **_rounded(scored_summary(scored)),
                **_rounded({"hours_to_prediction": timing.hours} if timing.hours is not None else {}),
            }
        )
        yield dg.AssetCheckResult(
            check_name=TIME_TO_PREDICTION_CHECK,
            passed=timing.within_limit is not False,
            severity=dg.AssetCheckSeverity.WARN,
            description=timing.sentence(),
            metadata=_rounded({**timing.as_dict(), "hours_to_prediction": timing.hours or 0.0}),
        )

    @dg.asset(
        key=key("batch_drift"),
        deps=[key("batch_predictions")],
        partitions_def=batch_partitions,
        group_name=Stage.MONITORING,
        kinds={"numpy"},
        tags={**tags(DataClass.AGGREGATE), **PER_BATCH_TAG},
        description="The batch against the champion's derivation cohort: every predictor (PSI, chi-square, KS, "
        "missingness), the prediction distribution, label prevalence once known, overall and per subgroup.",
        owners=ML_OWNERS,
        check_specs=[_partitioned_check_spec(key("batch_drift"))],
    )
    def batch_drift(context: dg.AssetExecutionContext, zones: DataZones):
        batch, champion = context.partition_key, _champion(zones, uc)
        check = check_batch(zones.use_case(uc.name), zones.model_registry(uc.name), champion, config, batch)
        result, record = check.result, check.record
        words = drift_check_words(batch, result.level, result.reasons)
        context.log.info(f"batch {batch}: drift level {result.level}")
        yield dg.MaterializeResult(
            metadata={
                "level": result.level,
                "retraining_requested": record.retraining_requested,
                "reference": record.reference,
                "features_drift_error": sum(d.level == "error" for d in result.features),
                "features_drift_warn": sum(d.level == "warn" for d in result.features),
                "psi_max": rounded(max((d.value("psi") for d in result.features), default=0.0)),
                "prediction_psi": rounded(result.prediction.value("psi")) if result.prediction else 0.0,
                "n_current": result.n_current,
                "n_reference": check.n_reference,
                "model_version": champion.version,
                "in_words": words,
                "report": dg.MetadataValue.md(_drift_markdown(record, result, config)),
            }
        )
        yield dg.AssetCheckResult(
            check_name="drift_below_error_level",
            passed=result.level != "error",
            severity=dg.AssetCheckSeverity.ERROR,
            # the batch and the columns that moved, in words: what the run's page and the alert show
            description=words,
            metadata={
                "batch": batch,
                "level": result.level,
                "reasons": dg.MetadataValue.md(
                    "".join(f"- {md_escape(r)}\n" for r in result.reasons) or "none"
                ),
            },
        )

    @dg.asset(
        key=key("risk_assessment_export"),
        deps=[key("batch_drift")],
        partitions_def=batch_partitions,
        group_name=Stage.MONITORING,
        kinds={"fhir", "ndjson"},
        tags={**tags(DataClass.DEIDENTIFIED), **PER_BATCH_TAG},
        description="FHIR R4 RiskAssessment resources (NDJSON, validated with fhir.resources) for the EHR "
        "interface engine; subject = pseudonym. Held (nothing written, the reason recorded) when the batch's "
        "drift check reached ERROR.",
        owners=ML_OWNERS,
    )
    def risk_assessment_export(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        batch, store = context.partition_key, zones.use_case(uc.name)
        if held := _held(context, zones, uc, "FHIR export"):
            return _held_result(held)
        preds, version, threshold = _released_predictions(zones, uc, batch)
        out = store.fhir_export(batch)
        n = write_ndjson(
            scored_admissions(preds, subject="subject_id", encounter="hadm_id"),
            out,
            use_case=uc.name,
            outcome=uc.outcome.outcome_code,
            outcome_text=uc.outcome.description,
            model_version=version,
            clinical_action=uc.operating_point.clinical_action,
            threshold=threshold,
        )
        return dg.MaterializeResult(
            metadata={"dagster/row_count": n, "held": False, "path": str(out.relative_to(zones.deid))}
        )

    @dg.asset(
        key=key("monitoring_report"),
        deps=[key("batch_drift"), key("model_registry"), key("clinician_feedback")],
        group_name=Stage.MONITORING,
        kinds={"html"},
        tags=tags(DataClass.AGGREGATE),
        description="Trends over batches: drift, prediction distribution, realised performance where labels "
        "have matured and a label-free estimate where not, per subgroup, and the decisions taken.",
        owners=ML_OWNERS,
        check_specs=[
            dg.AssetCheckSpec(
                "realised_performance_meets_minimums",
                asset=key("monitoring_report"),
                description="In every mature period, realised AUROC, sensitivity, O/E and calibration slope are "
                "not wholly below their minimums (95% CI), overall and per subgroup.",
            )
        ],
    )
    def monitoring_report_asset(context: dg.AssetExecutionContext, zones: DataZones):
        store, registry = zones.use_case(uc.name), zones.model_registry(uc.name)
        health = system_health_metadata(context.instance, uc, store)  # a page of its own beside the report
        if registry.champion() is None:
            yield from _nothing_deployed(health)
            return
        review = review_performance(store, registry, _champion(zones, uc), config)
        feedback = clinician_feedback_monitoring(uc, store)
        html, md = monitoring_report(
            use_case=uc,
            batches=review.batches,
            performance=review.rows,
            decisions=decisions_with_reasons(registry),
            config=config,
            model_version=review.champion,
            code_version=code_version(),
            feedback=feedback_view(feedback) if feedback.overall().answered else None,
        )
        out = store.reports.write_report("monitoring_report", html)
        summary = review.summary()
        yield dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                **_rounded(summary),
                **health,
            }
        )
        mature = summary["periods_mature"]
        yield dg.AssetCheckResult(
            check_name="realised_performance_meets_minimums",
            passed=not review.failing,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None if mature else "not judged: no period has mature labels yet",
            metadata={"failing": dg.MetadataValue.json(review.failing_summary()), "judged": bool(mature)},
        )

    @dg.asset(
        key=key("feature_drift_report"),
        deps=[key("patient_features"), key("subject_splits"), key("model_registry")],
        group_name=Stage.MONITORING,
        kinds={"numpy", "html"},
        tags=tags(DataClass.AGGREGATE),
        description="PSI and KS of each predictor in the newest batch against the derivation cohort.",
        owners=ML_OWNERS,
    )
    def feature_drift_report(zones: DataZones) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        drift = newest_batch_drift(store, config)
        rows = [{**d.as_dict(), "label": display_name(d.feature)} for d in drift.features]
        store.feature_drift.write(FeatureDriftSnapshot(drift.batch_id, tuple(rows)))
        html, md = drift_report(
            use_case=uc,
            batch_id=drift.batch_id,
            drift=drift.features,
            thresholds=config.drift,
            n_reference=drift.n_reference,
            n_current=drift.n_current,
            n_tests=drift.n_tests,
            # the reference is the derivation cohort of the newest split: the newest registered model's
            model_version=newest.version
            if (newest := zones.model_registry(uc.name).newest_card())
            else "none",
            code_version=code_version(),
            label=display_name,
        )
        out = store.reports.write_report("feature_drift_report", html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "batch_id": drift.batch_id,
                "psi_max": rounded(max((d.value("psi") for d in drift.features), default=0.0)),
                "features_drift_error": sum(r["level"] == "error" for r in rows),
                "features_drift_warn": sum(r["level"] == "warn" for r in rows),
                "thresholds": dg.MetadataValue.md(md_table(list(config.drift.__dict__.items()))),
            }
        )

    return [
        batch_predictions,
        batch_drift,
        risk_assessment_export,
        monitoring_report_asset,
        feature_drift_report,
    ]
