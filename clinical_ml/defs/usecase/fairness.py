"""The subcohort fairness report: subgroup table, disparities, per-group operating points, verdict."""

import dagster as dg

from clinical_ml.core.artifacts import FairnessSummary
from clinical_ml.core.fairness import audit_subcohorts
from clinical_ml.core.reports import (
    fairness_report,
    observed_expected_forest_plots,
    sensitivity_forest_plots,
)
from clinical_ml.core.storage import code_version
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones


def build_fairness_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("subcohort_fairness_report"),
        # before the registry: under promotion.approval automatic, a verdict other than pass waits for the panel
        deps=[key("validation_predictions")],
        group_name=Stage.EVALUATION,
        kinds={"fairlearn", "html"},
        tags=tags(DataClass.AGGREGATE),
        description="Performance by sex, race/ethnicity, age group and their intersections with 95% CIs, "
        "disparities, calibration (observed/expected, slope) by group, small cells suppressed, per-group "
        "operating points, verdict against the subgroup minimums and calibration ranges.",
        owners=ML_OWNERS,
    )
    def subcohort_fairness_report(zones: DataZones, evaluation: EvaluationSettings) -> dg.MaterializeResult:
        store, t = zones.use_case(uc.name), zones.use_case(uc.name).threshold.read()
        audit = audit_subcohorts(
            store.validation_predictions.read(),
            threshold=t.threshold,
            subgroups=uc.subgroups,
            operating_point=uc.operating_point,
            n_boot=evaluation.n_bootstrap,
            seed=evaluation.bootstrap_seed,
            words=uc.words,
            min_events=uc.success_criteria.min_events,
            min_non_events=uc.success_criteria.min_non_events,
        )
        forests = sensitivity_forest_plots(audit.analysis, minimum=uc.subgroups.sensitivity_min)
        for attribute in uc.subgroups.attributes:
            store.reports.write_plot(store.reports.forest_plot_name(attribute), forests[attribute])
        html, md = fairness_report(
            use_case=uc,
            analysis=audit.analysis,
            verdict=audit.verdict,
            reasons=audit.reasons,
            thresholds=audit.thresholds,
            recommendations=audit.recommendations,
            forest_plots=forests,
            calibration_plots=observed_expected_forest_plots(audit.analysis),
            model_version=t.model_version,
            code_version=code_version(),
        )
        store.fairness.write(FairnessSummary(t.model_version, audit.verdict, audit.summary()))
        out = store.reports.write_report("subcohort_fairness_report", html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "verdict": audit.verdict,
                **audit.counts(),
                "model_version": t.model_version,
            }
        )

    return [subcohort_fairness_report]
