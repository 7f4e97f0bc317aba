"""Cohort, labels and windowed features of one use case."""

import dagster as dg
import polars as pl

from clinical_ml.core.feature_cache import build_features_incremental
from clinical_ml.core.features import build_cohort, build_labels
from clinical_ml.core.storage import write_json, write_parquet
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import UseCasePaths, md_table, use_case_key
from clinical_ml.resources.zones import DataZones


def build_features_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    paths = UseCasePaths(uc.name)

    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

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
                    "**Participant flow**\n\n" + md_table(list(flow.as_dict().items()))
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
        deps=[key("cohort"), "anonymized_events"],
        group_name=Stage.FEATURES,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Windowed aggregates of each code before the prediction time, only from values available "
        "by then (result or stored time), plus static attributes. Incremental: kept per delivery batch and "
        "recomputed only for batches whose cohort rows or events changed (a new batch computes its own part).",
        owners=ML_OWNERS,
    )
    def patient_features(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        files = sorted((zones.deid / "events").glob("*.parquet"))
        feats, stats = build_features_incremental(
            files,
            pl.read_parquet(paths.deid(zones, "cohort.parquet")),
            uc,
            paths.deid(zones, "feature_cache"),
        )
        write_parquet(feats, paths.deid(zones, "features.parquet"))
        context.log.info(
            f"features: {stats.computed} batches computed, {stats.reused} reused from the cache "
            f"({stats.event_files_indexed} of {stats.event_files} event files indexed)"
        )
        missing = {c: float(feats[c].null_count() / max(feats.height, 1)) for c in feats.columns[3:]}
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": feats.height,
                "features": len(feats.columns) - 3,
                "share_missing_max": max(missing.values(), default=0.0),
                "batches_computed": stats.computed,
                "batches_reused": stats.reused,
            }
        )

    return [cohort, labels, patient_features]
