"""What the clinical panel can do about the subcohort analysis and about drift, each tested before it is
offered: a population-specific model compared with the single model for the group the analysis points at,
and a recalibrated champion, through the promotion gate, when its monitored calibration drifts."""

import dagster as dg

from clinical_ml.core.champion_monitoring import load_champion
from clinical_ml.core.champion_recalibration import offer_recalibration
from clinical_ml.core.features import ROW_KEY, validation_rows
from clinical_ml.core.modeling import load_model
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.population_model import compare_population_model, population_model_markdown
from clinical_ml.core.reports import md_escape
from clinical_ml.core.training import training_frame
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones

RECALIBRATION_TAG = ("action", "recalibration")
"""Marks the recalibration challenger, which the lifecycle job leaves out (it runs with the monitoring reports)."""


def build_panel_action_assets(
    uc: UseCase, monitoring: MonitoringConfig
) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("population_model_comparison"),
        deps=[key("risk_model"), key("subject_splits"), key("subcohort_fairness_report")],
        group_name=Stage.EVALUATION,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="Would a population-specific model help? For the group the subcohort analysis flags (else "
        "the largest with enough outcomes): a separate model and a model with the group as a predictor, fitted "
        "on the derivation cohort, against the single model on the group's validation patients (AUROC and O/E "
        "differences, paired patient-bootstrap CIs) and the recommendation.",
        owners=ML_OWNERS,
    )
    def population_model_comparison(zones: DataZones, evaluation: EvaluationSettings) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        fit, fairness = store.challenger.fit.read(), store.fairness.read()
        if fairness.model_version != fit.version:
            raise ValueError(
                f"the subcohort analysis is of model {fairness.model_version}, not of the challenger {fit.version}: "
                "materialize subcohort_fairness_report first"
            )
        attributes = [a for a in uc.subgroups.attributes if a in store.cohort.scan().collect_schema().names()]
        frame = (
            training_frame(store.features.read(), store.labels.read(), store.subject_splits.read())
            .drop([*attributes, "period"], strict=False)
            .join(store.cohort.read(columns=[*ROW_KEY, *attributes, "period"]), on=ROW_KEY, how="left")
        )
        result = compare_population_model(
            frame.filter(validation_rows(store.split_info.read())),
            load_model(store.challenger.model_text()),
            fairness.as_dict(),
            attributes=attributes,
            min_cell_size=uc.subgroups.min_cell_size,
            seed=uc.validation.seed,
            n_boot=evaluation.n_bootstrap,
            bootstrap_seed=evaluation.bootstrap_seed,
            model_version=fit.version,
        )
        store.population_model.write(result)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(population_model_markdown(result, escape=md_escape)),
                "recommendation": dg.MetadataValue.text(result.recommendation()),
                "group": result.who if result.group is not None else "none",
                "model_version": fit.version,
            }
        )

    @dg.asset(
        key=key("recalibration_challenger"),
        deps=[key("monitoring_report")],
        group_name=Stage.MONITORING,
        kinds={"lightgbm"},
        tags={**tags(DataClass.AGGREGATE), RECALIBRATION_TAG[0]: RECALIBRATION_TAG[1]},
        description="When the champion's calibration on recent admissions with known outcomes is outside its "
        "monitoring range (95% CI): the champion recalibrated (logistic intercept and slope) on them, registered "
        "and judged by the promotion gate out of fold, with a report card saying what was recalibrated on how "
        "many patients; it waits for the panel's sign-off.",
        owners=ML_OWNERS,
    )
    def recalibration_challenger(
        context: dg.AssetExecutionContext, zones: DataZones, evaluation: EvaluationSettings
    ) -> dg.MaterializeResult:
        registry, store = zones.model_registry(uc.name), zones.use_case(uc.name)
        if registry.champion() is None:
            return dg.MaterializeResult(metadata={"status": "no champion", "report": "No champion yet."})
        offer = offer_recalibration(
            store,
            registry,
            load_champion(registry),
            monitoring,
            use_case=uc,
            settings=evaluation.gate_settings(),
            events=zones.deid_store().events,
            run_id=context.run.run_id,
        )
        context.log.info(offer.reason)
        card = store.reports.report(f"report_card_{offer.challenger_version}", "md")
        return dg.MaterializeResult(
            metadata={
                "status": offer.status,
                "reason": dg.MetadataValue.text(offer.reason),
                "report": dg.MetadataValue.md(
                    card.read_text() if offer.status == "offered" else md_escape(offer.reason)
                ),
                "challenger_version": offer.challenger_version or "none",
                "admissions_recent_labelled": offer.admissions,
            }
        )

    return [population_model_comparison, recalibration_challenger]
