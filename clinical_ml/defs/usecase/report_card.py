"""The HCP report card (one self-contained HTML file per model version for the clinical review panel) and the
Model Facts label beside it (one page for the clinicians who see the score)."""

from collections.abc import Collection
from pathlib import Path

import dagster as dg

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.features import validation_design
from clinical_ml.core.model_facts import ModelFacts, model_facts, model_facts_html, model_facts_markdown
from clinical_ml.core.population_model import PopulationModelComparison
from clinical_ml.core.registry import ModelCard
from clinical_ml.core.reports import data_periods, predictor_labels, report_card, report_card_markdown
from clinical_ml.core.row_accounting import delivery_rows, privacy_by_group
from clinical_ml.core.storage import code_version
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import use_case_key
from clinical_ml.resources.zones import DataZones


def build_report_card_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("model_report_card"),
        deps=[
            key("model_registry"),
            key("model_evaluation"),
            key("shap_explanations"),
            key("subcohort_fairness_report"),
            key("cohort"),
            key("learning_curve"),
            key("population_model_comparison"),
        ],
        group_name=Stage.EVALUATION,
        kinds={"html", "markdown"},
        tags=tags(DataClass.AGGREGATE),
        description="Report card of the model version for the clinical review panel, structured after "
        "TRIPOD+AI: intended use, data, flow, predictors, cohorts, performance with CIs, subgroups, per-group "
        "thresholds, SHAP, limitations, promotion decision (one self-contained HTML file per version); beside "
        "it, the version's one-page Model Facts label for the clinicians who see the score (Sendak et al. 2020).",
        owners=ML_OWNERS,
    )
    def model_report_card(zones: DataZones) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        fairness, decision = store.fairness.read(), store.decision.read()
        card = zones.model_registry(uc.name).card(fairness.model_version)
        design = validation_design(store.split_info.read(), fraction=uc.validation.fraction)
        out, summary = _write_report_card(zones, uc, card, design)
        facts = _model_facts(store, uc, card, design, report_card_file=out.name)
        label = store.reports.write_report(
            f"model_facts_{card.version}", model_facts_html(facts, use_case=uc, code_version=code_version())
        )
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(summary),
                "report_path": dg.MetadataValue.path(str(out)),
                "model_facts": dg.MetadataValue.md(model_facts_markdown(facts)),
                "model_facts_path": dg.MetadataValue.path(str(label)),
                "model_version": card.version,
                "fairness_verdict": fairness.verdict,
                "promoted": decision.promoted,
            }
        )

    return [model_report_card]


def _write_report_card(zones: DataZones, uc: UseCase, card: ModelCard, design: str) -> tuple[Path, str]:
    """Render and write the version's report card (HTML and Markdown); its path and the asset page's summary."""
    store = zones.use_case(uc.name)
    plots, forests = store.reports.performance_plots(), store.reports.forest_plots(uc.subgroups.attributes)
    html, md = report_card(
        use_case=uc,
        evaluation=store.evaluation.read().as_dict(),
        fairness=store.fairness.read().as_dict(),
        decision=store.decision.read().as_dict(),
        flow=store.cohort_flow.read().as_dict(),
        fit=card.fit,
        training_ranges=card.training_ranges,
        importance=list(store.shap.read().importance),
        plots=plots,
        forest_plots=forests,
        data_periods=data_periods(
            store.cohort.read(columns=["subject_id", "period"]), store.subject_splits.read()
        ),
        batch_ids=list(card.lineage.batch_ids),
        predictor_labels=predictor_labels(card.feature_names, static=uc.features.static),
        model_version=card.version,
        code_version=code_version(),
        deliveries=_deliveries(zones, uc, list(card.lineage.batch_ids)),
        validation_design=design,
        privacy_groups=_privacy_groups(zones, list(card.lineage.batch_ids), uc.subgroups.attributes),
        learning_curve=store.learning_curve.read() if store.learning_curve.exists() else None,
        population_model=_population_model(store, card.version),
    )
    out = store.reports.write_report(f"report_card_{card.version}", html)
    store.reports.write_report(f"report_card_{card.version}", md, suffix="md")
    return out, report_card_markdown(md, plots["calibration"], forests)


def _population_model(store: UseCaseStore, version: str) -> PopulationModelComparison | None:
    """The population-specific model comparison of this version, if it was made."""
    result = store.population_model.read() if store.population_model.exists() else None
    return result if result is not None and result.model_version == version else None


def _model_facts(
    store: UseCaseStore, uc: UseCase, card: ModelCard, design: str, *, report_card_file: str
) -> ModelFacts:
    """The version's Model Facts label content (Sendak et al. 2020), from what the report card shows."""
    fairness = store.fairness.read()
    return model_facts(
        use_case=uc,
        evaluation=store.evaluation.read().as_dict(),
        fairness_verdict=fairness.verdict,
        fairness_reasons=list(fairness.as_dict().get("reasons", [])),
        decision=store.decision.read().as_dict(),
        fit=card.fit,
        importance=list(store.shap.read().importance),
        n_predictors=len(card.feature_names),
        batch_ids=list(card.lineage.batch_ids),
        model_version=card.version,
        code_version=code_version(),
        report_card_file=report_card_file,
        validation_design=design,
    )


def _privacy_groups(zones: DataZones, batch_ids: list[str], attributes: Collection[str]) -> list[dict]:
    """What the privacy gate took from each group the use case audits over the batches the model was trained
    on."""
    privacy = zones.deid_store().privacy
    records = [privacy.part(b).read().as_dict() for b in batch_ids if privacy.part(b).exists()]
    return privacy_by_group(records, attributes=attributes)


def _deliveries(zones: DataZones, uc: UseCase, batch_ids: list[str]) -> list[dict]:
    """Each delivery the model was trained on, from export to cohort (counts recorded at anonymization;
    batches anonymized before that record existed, or adapted from a research export, are left out)."""
    deid = zones.deid_store()
    accounts = [
        deid.accounting.part(b).read().as_dict() for b in batch_ids if deid.accounting.part(b).exists()
    ]
    cohort = zones.use_case(uc.name).cohort.read(columns=["hadm_id", "batch_id"]).unique("hadm_id")
    counts = dict(cohort.group_by("batch_id").len().iter_rows())
    return delivery_rows(accounts, counts)
