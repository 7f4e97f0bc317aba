"""The HCP report card: one self-contained HTML file per model version for the clinical review panel."""

import dagster as dg
import polars as pl

from clinical_ml.core import registry
from clinical_ml.core.reports import md_image, report_card, write_report
from clinical_ml.core.storage import code_version, read_json
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import UseCasePaths, use_case_key
from clinical_ml.resources.zones import DataZones

_SPLIT_WORDS = {
    "train": "Derivation cohort (training set)",
    "tuning": "Derivation cohort, held back (tuning set)",
    "held_out": "Validation cohort (test set)",
}


def build_report_card_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    paths = UseCasePaths(uc.name)

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
        ],
        group_name=Stage.EVALUATION,
        kinds={"html", "markdown"},
        tags=tags(DataClass.AGGREGATE),
        description="Report card of the model version for the clinical review panel, structured after "
        "TRIPOD+AI: intended use, data, flow, predictors, cohorts, performance with CIs, subgroups, per-group "
        "thresholds, SHAP, limitations, promotion decision (one self-contained HTML file per version).",
        owners=ML_OWNERS,
    )
    def model_report_card(zones: DataZones) -> dg.MaterializeResult:
        fairness = read_json(paths.deid(zones, "fairness.json"))
        version = fairness["model_version"]
        card = registry.read_card(paths.registry(zones), uc.name, version)
        splits = pl.read_parquet(paths.deid(zones, "subject_splits.parquet"))
        periods = (
            pl.read_parquet(paths.deid(zones, "cohort.parquet"), columns=["subject_id", "period"])
            .join(splits, on="subject_id", how="inner")
            .group_by("split")
            .agg(pl.col("period").cast(pl.String).unique().sort())
        )
        by_split = dict(zip(periods["split"].to_list(), periods["period"].to_list(), strict=True))
        plot_dir = paths.reports(zones, "plots")
        forests: dict[str, bytes] = {
            a: (plot_dir / f"forest_{a}.png").read_bytes()
            for a in uc.subgroups.attributes
            if (plot_dir / f"forest_{a}.png").exists()
        }
        plot_bytes = {
            "roc": (plot_dir / "roc.png").read_bytes(),
            "calibration": (plot_dir / "calibration.png").read_bytes(),
            "decision": (plot_dir / "decision_curve.png").read_bytes(),
            "importance": (plot_dir / "shap_importance.png").read_bytes(),
        }
        static = set(uc.features.static)
        stems = dict.fromkeys(
            n.partition("__")[0] for n in card["feature_names"] if n.partition("__")[0] not in static
        )
        html, md = report_card(
            use_case=uc,
            evaluation=read_json(paths.deid(zones, "evaluation.json")),
            fairness=fairness,
            decision=read_json(paths.deid(zones, "decision.json")),
            flow=read_json(paths.deid(zones, "cohort_flow.json")),
            fit=card["fit"],
            training_ranges=card["training_ranges"],
            importance=read_json(paths.deid(zones, "shap.json"))["importance"],
            plots=plot_bytes,
            forest_plots=forests,
            data_periods=[(words, by_split.get(s, [])) for s, words in _SPLIT_WORDS.items()],
            batch_ids=card["lineage"]["batch_ids"],
            predictor_labels=[s.replace("_", " ") for s in stems],
            model_version=version,
            code_version=code_version(),
        )
        out = write_report(paths.reports(zones, f"report_card_{version}.html"), html)
        paths.reports(zones, f"report_card_{version}.md").write_text(md, encoding="utf-8")
        images = [md_image("Calibration, validation cohort", plot_bytes["calibration"])]
        images += [md_image(f"Sensitivity by {a.replace('_', ' ')}", png) for a, png in forests.items()]
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md + "\n" + "\n\n".join(images) + "\n"),
                "report_path": dg.MetadataValue.path(str(out)),
                "model_version": version,
                "fairness_verdict": fairness["verdict"],
                "promoted": bool(read_json(paths.deid(zones, "decision.json"))["promoted"]),
            }
        )

    return [model_report_card]
