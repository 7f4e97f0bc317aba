"""Validation predictions, metrics with CIs, SHAP, and the performance report."""

import dagster as dg
import polars as pl

from clinical_ml.core import plots
from clinical_ml.core.artifacts import ShapImportance
from clinical_ml.core.explain import global_importance, shap_values
from clinical_ml.core.features import ROW_KEY, feature_matrix, validation_design, validation_rows
from clinical_ml.core.gate import auroc_minimum
from clinical_ml.core.learning_curve import learning_curve, learning_curve_markdown
from clinical_ml.core.modeling import load_model
from clinical_ml.core.reports import ci_text, evaluation_markdown, performance_report, rounded
from clinical_ml.core.storage import code_version
from clinical_ml.core.training import training_frame
from clinical_ml.core.usecase import UseCase
from clinical_ml.core.validation import STAY_COLUMNS, Evaluation, evaluate_validation
from clinical_ml.core.validation import validation_predictions as validation_predictions_of
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones


def build_evaluation_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("validation_predictions"),
        deps=[key("risk_model"), key("subject_splits")],
        group_name=Stage.EVALUATION,
        kinds={"lightgbm", "polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Predicted risk for the validation cohort and out-of-fold risk for the derivation cohort "
        "(5 folds of patients), with the operating threshold chosen on the out-of-fold risk.",
        owners=ML_OWNERS,
    )
    def validation_predictions(zones: DataZones) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        model, fit = load_model(store.challenger.model_text()), store.challenger.fit.read()
        frame = training_frame(store.features.read(), store.labels.read(), store.subject_splits.read())
        preds, threshold = validation_predictions_of(
            model, frame, store.cohort.read(), store.split_info.read(), uc, model_version=fit.version
        )
        store.validation_predictions.write(preds)
        store.threshold.write(threshold)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": preds.height,
                "threshold": threshold.threshold,
                "threshold_chosen_on": threshold.chosen_on,
                "model_version": fit.version,
            }
        )

    @dg.asset(
        key=key("learning_curve"),
        deps=[key("risk_model"), key("subject_splits")],
        group_name=Stage.EVALUATION,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="Would more data help? The challenger refitted on 25, 50, 75 and 100% of the derivation "
        "cohort's patients, validation AUROC (95% CI) and calibration slope of each, and the recommendation.",
        owners=ML_OWNERS,
    )
    def learning_curve_asset(zones: DataZones) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        frame = training_frame(store.features.read(), store.labels.read(), store.subject_splits.read()).join(
            store.cohort.read(columns=[*ROW_KEY, "period"]), on=ROW_KEY, how="left"
        )
        curve = learning_curve(
            # under temporal validation, a held-out patient's earlier admissions are neither cohort
            frame.filter(validation_rows(store.split_info.read())),
            load_model(store.challenger.model_text()),
            seed=uc.validation.seed,
        )
        store.learning_curve.write(curve)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(learning_curve_markdown(curve)),
                "recommendation": dg.MetadataValue.text(curve.recommendation()),
            }
        )

    @dg.asset(
        key=key("model_evaluation"),
        deps=[key("validation_predictions")],
        group_name=Stage.EVALUATION,
        kinds={"numpy", "matplotlib"},
        tags=tags(DataClass.AGGREGATE),
        description="AUROC, AUPRC, sensitivity, specificity, PPV, NPV, Brier and calibration on the validation "
        "cohort with bootstrap 95% CIs; calibration and decision curves; the alert burden at the operating point "
        "(alerts per 100 patient-days, per unit per day, number needed to evaluate).",
        owners=ML_OWNERS,
    )
    def model_evaluation(zones: DataZones, evaluation: EvaluationSettings) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        preds = store.validation_predictions.read()
        ev = evaluate_validation(
            preds,
            store.threshold.read(),
            n_boot=evaluation.n_bootstrap,
            seed=evaluation.bootstrap_seed,
            stays=store.cohort.read(columns=[*ROW_KEY, *STAY_COLUMNS]),
            one_day_per_stay=uc.prediction_time.anchor == "discharge",
        )
        store.evaluation.write(ev)
        val = preds.filter(pl.col("split") == "held_out")
        figures = store.reports
        curves = {
            "roc": plots.roc_plot(
                val["label"].to_numpy(), val["risk"].to_numpy(), threshold=ev.threshold, words=uc.words
            ),
            "calibration": plots.calibration_plot(list(ev.calibration_curve), words=uc.words),
            "decision_curve": plots.decision_curve_plot(list(ev.decision_curve)),
        }
        for name, png in curves.items():
            figures.write_plot(name, png)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(evaluation_markdown(ev.as_dict(), curves, words=uc.words)),
                "calibration_plot_path": dg.MetadataValue.path(str(figures.plot("calibration"))),
                "decision_curve_plot_path": dg.MetadataValue.path(str(figures.plot("decision_curve"))),
                **_metric_metadata(ev),
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
        ev = zones.use_case(uc.name).evaluation.read()
        auroc = auroc_minimum(ev, uc)  # not judged (and not passed) with too few outcomes, as in the gate
        m = ev.metric("auroc")
        return dg.AssetCheckResult(
            passed=auroc.passed,
            severity=dg.AssetCheckSeverity.WARN,
            description=auroc.reason,
            metadata={
                "auroc_lower": m.lower,
                "auroc": m.value,
                "minimum": uc.success_criteria.auroc_min,
                "judged": auroc.judged,
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
        store = zones.use_case(uc.name)
        model, fit = load_model(store.challenger.model_text()), store.challenger.fit.read()
        held = store.validation_predictions.read().filter(pl.col("split") == "held_out")
        rows = store.features.read().join(held.select(ROW_KEY), on=ROW_KEY, how="semi")
        _, values = shap_values(
            model,
            feature_matrix(rows, model.feature_names),
            max_rows=evaluation.shap_max_rows,
            seed=evaluation.bootstrap_seed,
        )
        importance = global_importance(values, model.feature_names)
        store.shap.write(ShapImportance(fit.version, tuple(importance)))
        store.reports.write_plot("shap_importance", plots.importance_plot(importance))
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
        store = zones.use_case(uc.name)
        ev, fit = store.evaluation.read(), store.challenger.fit.read()
        html, md = performance_report(
            use_case=uc,
            evaluation=ev.as_dict(),
            plots=store.reports.performance_plots(),
            importance=list(store.shap.read().importance),
            decision=store.decision.read().as_dict(),
            flow=store.cohort_flow.read().as_dict(),
            fit=fit.fit.as_dict(),
            model_version=fit.version,
            code_version=code_version(),
            validation_design=validation_design(store.split_info.read(), fraction=uc.validation.fraction),
        )
        out = store.reports.write_report("performance_report", html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "auroc_validation": rounded(ev.metric("auroc").value),
            }
        )

    return [
        validation_predictions,
        learning_curve_asset,
        model_evaluation,
        auroc_lower_bound_meets_minimum,
        shap_explanations,
        performance_report_asset,
    ]


def _metric_metadata(ev: Evaluation) -> dict:
    """The validation metrics for the asset page: rounded for reading (3 decimals), each with its CI in words
    beside it, the alert burden's finite rates, the threshold and the model version."""
    burden = ev.alert_burden.finite_values() if ev.alert_burden else {}
    return {
        **{f"{k}_validation": rounded(v.value) for k, v in ev.metrics.items()},
        **{f"{k}_validation_ci": ci_text(v) for k, v in ev.metrics.items()},
        "auroc_validation_lower": rounded(ev.metric("auroc").lower),
        "auroc_validation_upper": rounded(ev.metric("auroc").upper),
        **{f"{k}_validation": rounded(v) for k, v in burden.items()},
        "threshold": rounded(ev.threshold, 4),
        "model_version": ev.model_version,
    }
