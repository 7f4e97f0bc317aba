"""Drift of the newest batch against the derivation cohort."""

import dagster as dg
import numpy as np
import polars as pl

from clinical_ml.core import plots, registry
from clinical_ml.core.drift import PSI_ERROR, PSI_WARN, feature_drift
from clinical_ml.core.explain import feature_label
from clinical_ml.core.features import (
    feature_matrix,
)
from clinical_ml.core.reports import drift_report, write_report
from clinical_ml.core.storage import code_version, write_json
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import UseCasePaths, use_case_key
from clinical_ml.resources.zones import DataZones


def build_monitoring_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    paths = UseCasePaths(uc.name)

    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

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

    return [feature_drift_report]
