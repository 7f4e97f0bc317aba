"""Cohort, labels and windowed features of one use case."""

import dagster as dg
import polars as pl

from clinical_ml.core.feature_cache import build_features_incremental
from clinical_ml.core.features import build_cohort, build_labels
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import md_table, use_case_key
from clinical_ml.resources.zones import DataZones


def build_features_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
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
        deid, store = zones.deid_store(), zones.use_case(uc.name)
        frame, flow = build_cohort(deid.encounters.read_all(), deid.patients.read_all(), uc)
        store.cohort.write(frame)
        store.cohort_flow.write(flow)
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
        store = zones.use_case(uc.name)
        lab = build_labels(store.cohort.read())
        store.labels.write(lab)
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
        store = zones.use_case(uc.name)
        files = zones.deid_store().events.files()
        feats, stats = build_features_incremental(files, store.cohort.read(), uc, store.feature_cache)
        store.features.write(feats)
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
