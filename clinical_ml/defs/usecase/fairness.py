"""The subcohort fairness report: subgroup table, disparities, per-group operating points, verdict."""

import dagster as dg
import polars as pl

from clinical_ml.core import plots
from clinical_ml.core.artifacts import FairnessSummary
from clinical_ml.core.fairness import (
    analysis_summary,
    group_thresholds,
    subgroup_table,
    threshold_recommendation,
    verdict,
)
from clinical_ml.core.reports import attribute_title, fairness_report
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
        deps=[key("validation_predictions"), key("model_registry")],
        group_name=Stage.EVALUATION,
        kinds={"fairlearn", "html"},
        tags=tags(DataClass.AGGREGATE),
        description="Performance by sex, race/ethnicity, age group and their intersections with 95% CIs, "
        "disparities, small cells suppressed, per-group operating points, verdict against the subgroup "
        "minimums.",
        owners=ML_OWNERS,
    )
    def subcohort_fairness_report(zones: DataZones, evaluation: EvaluationSettings) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        preds = store.validation_predictions.read()
        held = preds.filter(pl.col("split") == "held_out")
        tune = preds.filter(pl.col("split") == "tuning")
        t = store.threshold.read()
        sg = uc.subgroups

        def groups(frame: pl.DataFrame) -> dict:
            return {a: frame[a].cast(pl.String).fill_null("Unknown").to_numpy() for a in sg.attributes}

        analysis = subgroup_table(
            held["label"].cast(pl.Int8).to_numpy(),
            held["risk"].to_numpy(),
            t.threshold,
            groups(held),
            min_cell_size=sg.min_cell_size,
            auroc_min=sg.auroc_min,
            sensitivity_min=sg.sensitivity_min,
            n_boot=evaluation.n_bootstrap,
            seed=evaluation.bootstrap_seed,
        )
        v, reasons = verdict(analysis)
        op = uc.operating_point
        thresholds = group_thresholds(
            tune["label"].cast(pl.Int8).to_numpy(),
            tune["risk"].to_numpy(),
            groups(tune),
            held["label"].cast(pl.Int8).to_numpy(),
            held["risk"].to_numpy(),
            groups(held),
            threshold=t.threshold,
            policy=op.policy,
            target=op.target,
            min_cell_size=sg.min_cell_size,
            n_boot=min(evaluation.n_bootstrap, 200),
            seed=evaluation.bootstrap_seed,
        )
        recommendations = threshold_recommendation(thresholds, policy=op.policy, target=op.target)
        forests = {
            a.attribute: plots.subgroup_forest_plot(
                analysis.rows_of(a.attribute),
                metric="sensitivity",
                title=f"Sensitivity by {attribute_title(a.attribute)}",
                overall=analysis.overall.metrics["sensitivity"],
                minimum=sg.sensitivity_min,
            )
            for a in analysis.attributes
        }
        for a in sg.attributes:
            store.reports.write_plot(store.reports.forest_plot_name(a), forests[a])
        html, md = fairness_report(
            use_case=uc,
            analysis=analysis,
            verdict=v,
            reasons=reasons,
            thresholds=thresholds,
            recommendations=recommendations,
            forest_plots=forests,
            model_version=t.model_version,
            code_version=code_version(),
        )
        summary = analysis_summary(analysis, v, reasons, thresholds, recommendations)
        store.fairness.write(FairnessSummary(t.model_version, v, summary))
        out = store.reports.write_report("subcohort_fairness_report", html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "verdict": v,
                "groups_flagged": sum(bool(r.flags) for r in analysis.rows),
                "groups_suppressed": sum(r.suppressed for r in analysis.rows),
                "groups_audited": len(analysis.rows) - 1,
                "comparisons_tested": analysis.tests,
                "model_version": t.model_version,
            }
        )

    return [subcohort_fairness_report]
