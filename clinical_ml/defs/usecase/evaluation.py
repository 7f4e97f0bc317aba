"""Validation predictions, metrics with CIs, SHAP, and the performance report."""

import dagster as dg
import polars as pl

from clinical_ml.core import plots
from clinical_ml.core.explain import global_importance, shap_values
from clinical_ml.core.features import SplitInfo, feature_matrix, validation_rows
from clinical_ml.core.reports import b64, fmt_ci, performance_report, write_report
from clinical_ml.core.storage import code_version, read_json, write_json, write_parquet
from clinical_ml.core.training import (
    evaluate_validation,
    operating_threshold,
    predict_frame,
    training_frame,
)
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import UseCasePaths, load_challenger, use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones


def build_evaluation_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    paths = UseCasePaths(uc.name)

    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("validation_predictions"),
        deps=[key("risk_model"), key("subject_splits")],
        group_name=Stage.EVALUATION,
        kinds={"lightgbm", "polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Predicted risk for the tuning part of the derivation cohort and the validation cohort, "
        "with the operating threshold chosen on the tuning part.",
        owners=ML_OWNERS,
    )
    def validation_predictions(zones: DataZones) -> dg.MaterializeResult:
        model, fit = load_challenger(paths, zones)
        frame = training_frame(
            pl.read_parquet(paths.deid(zones, "features.parquet")),
            pl.read_parquet(paths.deid(zones, "labels.parquet")),
            pl.read_parquet(paths.deid(zones, "subject_splits.parquet")),
        ).filter(pl.col("split").is_in(["tuning", "held_out"]))
        info = SplitInfo.from_dict(read_json(paths.deid(zones, "split_info.json")))
        preds = predict_frame(model, frame, pl.read_parquet(paths.deid(zones, "cohort.parquet")))
        # temporal validation: a held-out patient's admissions before the validation period are not scored
        preds = preds.filter(validation_rows(info))
        threshold = operating_threshold(preds, uc)
        preds = preds.with_columns((pl.col("risk") >= threshold).alias("flagged"))
        write_parquet(preds, paths.deid(zones, "validation_predictions.parquet"))
        write_json(
            {"threshold": threshold, "model_version": fit["version"]}, paths.deid(zones, "threshold.json")
        )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": preds.height,
                "threshold": threshold,
                "model_version": fit["version"],
            }
        )

    @dg.asset(
        key=key("model_evaluation"),
        deps=[key("validation_predictions")],
        group_name=Stage.EVALUATION,
        kinds={"numpy", "matplotlib"},
        tags=tags(DataClass.AGGREGATE),
        description="AUROC, AUPRC, sensitivity, specificity, PPV, NPV, Brier and calibration on the validation "
        "cohort with bootstrap 95% CIs; calibration and decision curves.",
        owners=ML_OWNERS,
    )
    def model_evaluation(zones: DataZones, evaluation: EvaluationSettings) -> dg.MaterializeResult:
        preds = pl.read_parquet(paths.deid(zones, "validation_predictions.parquet"))
        t = read_json(paths.deid(zones, "threshold.json"))
        result = evaluate_validation(
            preds, t["threshold"], n_boot=evaluation.n_bootstrap, seed=evaluation.bootstrap_seed
        )
        result["model_version"] = t["model_version"]
        write_json(result, paths.deid(zones, "evaluation.json"))
        val = preds.filter(pl.col("split") == "held_out")
        plot_dir = paths.reports(zones, "plots")
        plot_dir.mkdir(parents=True, exist_ok=True)
        (plot_dir / "roc.png").write_bytes(
            plots.roc_plot(val["label"].to_numpy(), val["risk"].to_numpy(), threshold=t["threshold"])
        )
        (plot_dir / "calibration.png").write_bytes(plots.calibration_plot(result["calibration_curve"]))
        (plot_dir / "decision_curve.png").write_bytes(plots.decision_curve_plot(result["decision_curve"]))
        m = result["metrics"]
        rows = "".join(f"| {k.replace('_', ' ')} | {fmt_ci(v)} |\n" for k, v in m.items())
        md = (
            f"**Validation cohort**: {result['n_validation']} admissions, {result['events_validation']} events; "
            f"operating threshold {t['threshold']:.3f} (chosen on the tuning part of the derivation cohort); "
            f"{evaluation.n_bootstrap} bootstrap replicates.\n\n"
            f"| measure | value (95% CI) |\n|---|---|\n{rows}\n"
            f"**Calibration curve**\n\n![calibration](data:image/png;base64,"
            f"{b64((plot_dir / 'calibration.png').read_bytes())})\n\n"
            f"**Decision curve** (net benefit vs treat all and treat none)\n\n![decision curve](data:image/png;base64,"
            f"{b64((plot_dir / 'decision_curve.png').read_bytes())})\n"
        )
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "calibration_plot_path": dg.MetadataValue.path(str(plot_dir / "calibration.png")),
                "decision_curve_plot_path": dg.MetadataValue.path(str(plot_dir / "decision_curve.png")),
                **{f"{k}_validation": v["value"] for k, v in m.items()},
                "auroc_validation_lower": m["auroc"]["lower"],
                "auroc_validation_upper": m["auroc"]["upper"],
                "threshold": t["threshold"],
                "model_version": t["model_version"],
            }
        )

    @dg.asset_check(
        asset=key("model_evaluation"),
        name="auroc_lower_bound_meets_minimum",
        description=f"The lower 95% bound of validation AUROC is at least {uc.success_criteria.auroc_min} "
        "(a warning here; the blocking decision is the promotion gate, which still lets a refused model's "
        "reports be written).",
    )
    def auroc_lower_bound_meets_minimum(zones: DataZones) -> dg.AssetCheckResult:
        m = read_json(paths.deid(zones, "evaluation.json"))["metrics"]["auroc"]
        return dg.AssetCheckResult(
            passed=bool(m["lower"] >= uc.success_criteria.auroc_min),
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "auroc_lower": m["lower"],
                "auroc": m["value"],
                "minimum": uc.success_criteria.auroc_min,
            },
        )

    @dg.asset(
        key=key("shap_explanations"),
        deps=[key("risk_model"), key("validation_predictions")],
        group_name=Stage.EVALUATION,
        kinds={"shap"},
        tags=tags(DataClass.AGGREGATE),
        description="Global SHAP importance of each predictor on the validation cohort.",
        owners=ML_OWNERS,
    )
    def shap_explanations(zones: DataZones, evaluation: EvaluationSettings) -> dg.MaterializeResult:
        model, fit = load_challenger(paths, zones)
        feats = pl.read_parquet(paths.deid(zones, "features.parquet"))
        held = pl.read_parquet(paths.deid(zones, "validation_predictions.parquet")).filter(
            pl.col("split") == "held_out"
        )
        x = feature_matrix(feats.join(held.select("hadm_id"), on="hadm_id", how="semi"), model.feature_names)
        _, values = shap_values(model, x, max_rows=evaluation.shap_max_rows, seed=evaluation.bootstrap_seed)
        importance = global_importance(values, model.feature_names)
        write_json(
            {"model_version": fit["version"], "importance": importance}, paths.deid(zones, "shap.json")
        )
        png = plots.importance_plot(importance)
        paths.reports(zones, "plots").mkdir(parents=True, exist_ok=True)
        paths.reports(zones, "plots/shap_importance.png").write_bytes(png)
        top = "".join(
            f"{i + 1}. {r['label']} ({r['mean_abs_shap']:.3f})\n" for i, r in enumerate(importance[:8])
        )
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(f"**Top predictors**\n\n{top}"),
                "rows_explained": int(values.shape[0]),
            }
        )

    @dg.asset(
        key=key("performance_report"),
        deps=[key("model_registry"), key("cohort")],
        group_name=Stage.EVALUATION,
        kinds={"html"},
        tags=tags(DataClass.AGGREGATE),
        description="The model's performance report for clinicians (HTML): flow, metrics with CIs, curves, "
        "drivers, promotion decision.",
        owners=ML_OWNERS,
    )
    def performance_report_asset(zones: DataZones) -> dg.MaterializeResult:
        ev = read_json(paths.deid(zones, "evaluation.json"))
        fit = read_json(paths.deid(zones, "challenger/fit.json"))
        plot_dir = paths.reports(zones, "plots")
        html, md = performance_report(
            use_case=uc,
            evaluation=ev,
            plots={
                "roc": (plot_dir / "roc.png").read_bytes(),
                "calibration": (plot_dir / "calibration.png").read_bytes(),
                "decision": (plot_dir / "decision_curve.png").read_bytes(),
                "importance": (plot_dir / "shap_importance.png").read_bytes(),
            },
            importance=read_json(paths.deid(zones, "shap.json"))["importance"],
            decision=read_json(paths.deid(zones, "decision.json")),
            flow=read_json(paths.deid(zones, "cohort_flow.json")),
            fit=fit["fit"],
            model_version=fit["version"],
            code_version=code_version(),
        )
        out = write_report(paths.reports(zones, "performance_report.html"), html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "auroc_validation": ev["metrics"]["auroc"]["value"],
            }
        )

    return [
        validation_predictions,
        model_evaluation,
        auroc_lower_bound_meets_minimum,
        shap_explanations,
        performance_report_asset,
    ]
