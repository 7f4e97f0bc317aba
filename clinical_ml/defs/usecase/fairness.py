"""The subcohort fairness report."""

import dagster as dg
import polars as pl

from clinical_ml.core import plots
from clinical_ml.core.fairness import subgroup_table, verdict
from clinical_ml.core.reports import fairness_report, write_report
from clinical_ml.core.storage import code_version, read_json
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import UseCasePaths, use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones


def build_fairness_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    paths = UseCasePaths(uc.name)

    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("subcohort_fairness_report"),
        deps=[key("validation_predictions"), key("model_registry")],
        group_name=Stage.EVALUATION,
        kinds={"fairlearn", "html"},
        tags=tags(DataClass.AGGREGATE),
        description="Performance by sex, race/ethnicity and age group with 95% CIs (fairlearn MetricFrame), "
        "small cells suppressed, verdict against the subgroup minimums.",
        owners=ML_OWNERS,
    )
    def subcohort_fairness_report(zones: DataZones, evaluation: EvaluationSettings) -> dg.MaterializeResult:
        preds = pl.read_parquet(paths.deid(zones, "validation_predictions.parquet")).filter(
            pl.col("split") == "held_out"
        )
        t = read_json(paths.deid(zones, "threshold.json"))
        sg = uc.subgroups
        rows = subgroup_table(
            preds["label"].cast(pl.Int8).to_numpy(),
            preds["risk"].to_numpy(),
            t["threshold"],
            {a: preds[a].fill_null("Unknown").to_numpy() for a in sg.attributes},
            min_cell_size=sg.min_cell_size,
            auroc_min=sg.auroc_min,
            sensitivity_min=sg.sensitivity_min,
            n_boot=min(evaluation.n_bootstrap, 300),
            seed=evaluation.bootstrap_seed,
        )
        v, reasons = verdict(rows)
        overall = rows[0].metrics["sensitivity"]
        forests = {
            a: plots.forest_plot(
                [
                    {
                        "label": r.group,
                        "value": r.metrics["sensitivity"][0],
                        "lower": r.metrics["sensitivity"][1],
                        "upper": r.metrics["sensitivity"][2],
                        "flagged": bool(r.flags),
                    }
                    for r in rows
                    if r.attribute == a and not r.suppressed
                ],
                metric="sensitivity",
                overall=overall,
                minimum=sg.sensitivity_min,
            )
            for a in sg.attributes
        }
        html, md = fairness_report(
            use_case=uc,
            rows=rows,
            verdict=v,
            reasons=reasons,
            threshold=t["threshold"],
            forest_plots={str(k): v for k, v in forests.items()},
            model_version=t["model_version"],
            code_version=code_version(),
        )
        out = write_report(paths.reports(zones, "subcohort_fairness_report.html"), html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "verdict": v,
                "groups_flagged": sum(bool(r.flags) for r in rows),
                "groups_suppressed": sum(r.suppressed for r in rows),
            }
        )

    return [subcohort_fairness_report]
