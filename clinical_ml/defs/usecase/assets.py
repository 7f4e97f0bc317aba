"""One branch of the graph per use case, from cohort to reports (a factory over ``usecases/*.yaml``)."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from clinical_ml.core import plots, registry
from clinical_ml.core.drift import PSI_ERROR, PSI_WARN, feature_drift
from clinical_ml.core.explain import feature_label, global_importance, shap_values
from clinical_ml.core.fairness import subgroup_table, verdict
from clinical_ml.core.features import (
    build_cohort,
    build_features,
    build_labels,
    feature_matrix,
    patient_grouped_split,
)
from clinical_ml.core.meds_layout import read_meds_events
from clinical_ml.core.modeling import load_model
from clinical_ml.core.reports import drift_report, fairness_report, performance_report, write_report
from clinical_ml.core.storage import code_version, read_json, write_json, write_parquet
from clinical_ml.core.training import (
    evaluate_validation,
    fit_model,
    operating_threshold,
    predict_frame,
    training_frame,
)
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones


@dataclass(frozen=True)
class UseCasePaths:
    """Files of one use case, relative to the zones."""

    name: str

    def deid(self, zones: DataZones, file: str) -> Path:
        return zones.deid / "usecases" / self.name / file

    def reports(self, zones: DataZones, file: str) -> Path:
        return zones.reports / self.name / file

    def registry(self, zones: DataZones) -> Path:
        return zones.registry


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _md_table(rows: list[tuple[str, object]]) -> str:
    return "| | |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def build_use_case_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    """Assets and checks of one use case, keyed under its name."""
    paths = UseCasePaths(uc.name)

    def key(name: str) -> dg.AssetKey:
        return dg.AssetKey([uc.name, name])

    @dg.asset(
        key=key("cohort"),
        deps=["anonymized_encounters", "anonymized_patients"],
        group_name=Stage.FEATURES,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description=f"Eligible admissions: {uc.population.inclusion} Excluded: {uc.population.exclusion}",
        owners=ML_OWNERS,
    )
    def cohort(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        enc = pl.read_parquet(zones.deid / "encounters" / "*.parquet")
        pat = pl.read_parquet(zones.deid / "patients" / "*.parquet")
        frame, flow = build_cohort(enc, pat, uc)
        write_parquet(frame, paths.deid(zones, "cohort.parquet"))
        write_json(flow.as_dict(), paths.deid(zones, "cohort_flow.json"))
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": frame.height,
                "admissions": flow.admissions,
                "excluded_stay_ended_before_prediction": flow.excluded_stay_ended_before_prediction,
                "report": dg.MetadataValue.md(
                    "**Participant flow**\n\n" + _md_table(list(flow.as_dict().items()))
                ),
            }
        )

    @dg.asset(
        key=key("labels"),
        deps=[key("cohort")],
        group_name=Stage.FEATURES,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description=f"MEDS labels: {uc.outcome.description}",
        owners=ML_OWNERS,
    )
    def labels(zones: DataZones) -> dg.MaterializeResult:
        lab = build_labels(pl.read_parquet(paths.deid(zones, "cohort.parquet")))
        write_parquet(lab, paths.deid(zones, "labels.parquet"))
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": lab.height,
                "prevalence": float(lab["boolean_value"].cast(pl.Float64).to_numpy().mean())
                if lab.height
                else 0.0,
            }
        )

    @dg.asset(
        key=key("patient_features"),
        deps=[key("cohort"), "meds_dataset"],
        group_name=Stage.FEATURES,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Windowed aggregates of each code before the prediction time, only from values available "
        "by then (result or stored time), plus static attributes.",
        owners=ML_OWNERS,
    )
    def patient_features(zones: DataZones) -> dg.MaterializeResult:
        feats = build_features(
            read_meds_events(zones.deid / "meds"), pl.read_parquet(paths.deid(zones, "cohort.parquet")), uc
        )
        write_parquet(feats, paths.deid(zones, "features.parquet"))
        missing = {c: float(feats[c].null_count() / max(feats.height, 1)) for c in feats.columns[3:]}
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": feats.height,
                "features": len(feats.columns) - 3,
                "share_missing_max": max(missing.values(), default=0.0),
            }
        )

    @dg.asset(
        key=key("subject_splits"),
        deps=[key("cohort")],
        group_name=Stage.TRAINING,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Derivation cohort (MEDS train + tuning) and validation cohort (held_out), split by patient.",
        owners=ML_OWNERS,
    )
    def subject_splits(zones: DataZones) -> dg.MaterializeResult:
        splits = patient_grouped_split(
            pl.read_parquet(paths.deid(zones, "cohort.parquet")),
            validation_fraction=uc.validation.fraction,
            tuning_fraction=uc.validation.tuning_fraction,
            seed=uc.validation.seed,
        )
        write_parquet(splits, paths.deid(zones, "subject_splits.parquet"))
        counts = dict(splits.group_by("split").len().iter_rows())
        return dg.MaterializeResult(
            metadata={"dagster/row_count": splits.height, **{f"subjects_{k}": v for k, v in counts.items()}}
        )

    @dg.asset(
        key=key("risk_model"),
        deps=[key("patient_features"), key("labels"), key("subject_splits")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="The challenger: LightGBM fitted on the derivation cohort, early-stopped on its tuning part.",
        owners=ML_OWNERS,
    )
    def risk_model(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        frame = training_frame(
            pl.read_parquet(paths.deid(zones, "features.parquet")),
            pl.read_parquet(paths.deid(zones, "labels.parquet")),
            pl.read_parquet(paths.deid(zones, "subject_splits.parquet")),
        )
        model, fit = fit_model(frame, uc)
        version = registry.new_version()
        challenger = paths.deid(zones, "challenger")
        challenger.mkdir(parents=True, exist_ok=True)
        (challenger / "model.txt").write_text(model.to_text())
        write_json(
            {"version": version, "fit": fit.as_dict(), "feature_names": model.feature_names},
            challenger / "fit.json",
        )
        context.log.info(f"challenger {version}: {fit.best_iteration} trees")
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "best_iteration": fit.best_iteration,
                "n_train": fit.n_train,
                "n_tuning": fit.n_tuning,
                "events_train": fit.events_train,
            },
            data_version=dg.DataVersion(version),
        )

    def _load_challenger(zones: DataZones):
        d = paths.deid(zones, "challenger")
        return load_model((d / "model.txt").read_text()), read_json(d / "fit.json")

    @dg.asset(
        key=key("validation_predictions"),
        deps=[key("risk_model")],
        group_name=Stage.EVALUATION,
        kinds={"lightgbm", "polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Predicted risk for the tuning part of the derivation cohort and the validation cohort, "
        "with the operating threshold chosen on the tuning part.",
        owners=ML_OWNERS,
    )
    def validation_predictions(zones: DataZones) -> dg.MaterializeResult:
        model, fit = _load_challenger(zones)
        frame = training_frame(
            pl.read_parquet(paths.deid(zones, "features.parquet")),
            pl.read_parquet(paths.deid(zones, "labels.parquet")),
            pl.read_parquet(paths.deid(zones, "subject_splits.parquet")),
        ).filter(pl.col("split").is_in(["tuning", "held_out"]))
        preds = predict_frame(model, frame, pl.read_parquet(paths.deid(zones, "cohort.parquet")))
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
        return dg.MaterializeResult(
            metadata={
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
        blocking=True,
        description=f"The lower 95% bound of validation AUROC is at least {uc.success_criteria.auroc_min}.",
    )
    def auroc_lower_bound_meets_minimum(zones: DataZones) -> dg.AssetCheckResult:
        m = read_json(paths.deid(zones, "evaluation.json"))["metrics"]["auroc"]
        return dg.AssetCheckResult(
            passed=bool(m["lower"] >= uc.success_criteria.auroc_min),
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
        model, fit = _load_challenger(zones)
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
        key=key("model_registry"),
        deps=[key("model_evaluation"), key("shap_explanations")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="Registers the challenger with its lineage and metrics; promotes it to champion only if it "
        "meets every minimum on the lower CI bound and is non-inferior to the current champion.",
        owners=ML_OWNERS,
    )
    def model_registry(
        context: dg.AssetExecutionContext, zones: DataZones, evaluation: EvaluationSettings
    ) -> dg.MaterializeResult:
        model_dir = paths.deid(zones, "challenger")
        fit = read_json(model_dir / "fit.json")
        ev = read_json(paths.deid(zones, "evaluation.json"))
        version = fit["version"]
        cohort_df = pl.read_parquet(paths.deid(zones, "cohort.parquet"), columns=["batch_id"])
        batches = sorted(cohort_df["batch_id"].unique().to_list())
        card = {
            "use_case": uc.name,
            "version": version,
            "feature_names": fit["feature_names"],
            "training_ranges": fit["fit"]["training_ranges"],
            "fit": {k: v for k, v in fit["fit"].items() if k != "training_ranges"},
            "threshold": ev["threshold"],
            "metrics": ev["metrics"],
            "lineage": {
                "batch_ids": batches,
                "batch_data_versions": {
                    b: _sha256_file(zones.deid / "events" / f"{b}.parquet")
                    for b in batches
                    if (zones.deid / "events" / f"{b}.parquet").exists()
                },
                "code_version": code_version(),
                "use_case_sha256": uc.source_sha256,
                "dagster_run_id": context.run.run_id,
            },
        }
        root = paths.registry(zones)
        champ_version = registry.champion(root, uc.name)
        champ_card = registry.read_card(root, uc.name, champ_version) if champ_version else None
        if champ_version == version:
            raise dg.Failure(f"model {version} is already registered; materialize risk_model first")
        registry.register_model(
            root, uc.name, version, model_text=(model_dir / "model.txt").read_text(), card=card
        )
        promoted, reasons = registry.decide_promotion(
            card,
            champ_card,
            criteria=uc.success_criteria.model_dump(),
            auroc_margin=evaluation.auroc_non_inferiority_margin,
        )
        decision = registry.PromotionDecision(promoted, version, champ_version, tuple(reasons))
        registry.record_decision(root, uc.name, decision)
        write_json(decision.as_dict(), paths.deid(zones, "decision.json"))
        now = registry.champion(root, uc.name)
        md = (
            f"**{'Promoted' if promoted else 'Not promoted'}**: challenger {version}\n\n"
            + "".join(f"- {r}\n" for r in reasons)
            + f"\nChampion now: {now}\n"
        )
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "promoted": promoted,
                "champion_version": now or "none",
                "auroc_validation": ev["metrics"]["auroc"]["value"],
                "report": dg.MetadataValue.md(md),
                "lineage": dg.MetadataValue.json(card["lineage"]),
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
        feats = pl.read_parquet(paths.deid(zones, "features.parquet"))
        cohort_df = pl.read_parquet(paths.deid(zones, "cohort.parquet"), columns=["hadm_id", "batch_id"])
        splits = pl.read_parquet(paths.deid(zones, "subject_splits.parquet"))
        feats = feats.join(cohort_df, on="hadm_id").join(splits, on="subject_id")
        newest = max(cohort_df["batch_id"].unique().to_list())
        reference = feats.filter(pl.col("split").is_in(["train", "tuning"]) & (pl.col("batch_id") != newest))
        if reference.height == 0:
            reference = feats.filter(pl.col("split").is_in(["train", "tuning"]))
        current = feats.filter(pl.col("batch_id") == newest)
        cols = [
            c
            for c in feats.columns
            if "__" in c and not c.startswith(("sex__", "unit__", "admission_type__"))
        ]
        drift = feature_drift(feature_matrix(reference, cols), feature_matrix(current, cols), cols)
        rows = [{**d.__dict__, "label": feature_label(d.feature)} for d in drift]
        write_json({"batch_id": newest, "features": rows}, paths.deid(zones, "feature_drift.json"))
        top = rows[:15]
        png = plots.drift_plot(
            [r["label"] for r in top], [r["psi"] for r in top], warn=PSI_WARN, error=PSI_ERROR
        )
        champ = registry.champion(zones.registry, uc.name) or "none"
        html, md = drift_report(
            use_case=uc,
            batch_id=newest,
            rows=rows,
            n_reference=reference.height,
            n_current=current.height,
            plot=png,
            warn=PSI_WARN,
            error=PSI_ERROR,
            model_version=champ,
            code_version=code_version(),
        )
        out = write_report(paths.reports(zones, "feature_drift_report.html"), html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "batch_id": newest,
                "psi_max": float(np.max([r["psi"] for r in rows])) if rows else 0.0,
                "features_drift_error": sum(r["level"] == "error" for r in rows),
                "features_drift_warn": sum(r["level"] == "warn" for r in rows),
            }
        )

    return [
        cohort,
        labels,
        patient_features,
        subject_splits,
        risk_model,
        validation_predictions,
        model_evaluation,
        auroc_lower_bound_meets_minimum,
        shap_explanations,
        model_registry,
        performance_report_asset,
        subcohort_fairness_report,
        feature_drift_report,
    ]
