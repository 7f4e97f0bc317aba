"""Cohort, labels and windowed features of one use case."""

import dagster as dg
import polars as pl

from clinical_ml.core.feature_cache import build_features_incremental
from clinical_ml.core.features import ROW_KEY, build_cohort, build_labels, history_features
from clinical_ml.core.units import feature_stem
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import md_table, use_case_key
from clinical_ml.resources.zones import DataZones


def build_features_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("cohort"),
        deps=["anonymized_encounters", "anonymized_patients", "anonymized_events"],
        group_name=Stage.FEATURES,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description=f"Eligible admissions, predicted {uc.prediction_time.describe()}: {uc.population.inclusion} "
        f"Excluded: {uc.population.exclusion}",
        owners=ML_OWNERS,
    )
    def cohort(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        deid, store = zones.deid_store(), zones.use_case(uc.name)
        frame, flow = build_cohort(
            deid.encounters.read_all(relaxed=True), deid.patients.read_all(), uc, _events(deid.events.files())
        )
        store.cohort.write(frame)
        store.cohort_flow.write(flow)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": frame.height,
                "admissions": flow.admissions,
                "included_admissions": flow.included,
                "report": dg.MetadataValue.md("**Participant flow**\n\n" + md_table(list(flow.rows()))),
            }
        )

    @dg.asset(
        key=key("labels"),
        deps=[key("cohort"), "anonymized_encounters", "anonymized_events"],
        group_name=Stage.FEATURES,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description=f"MEDS labels ({uc.words.events}): {uc.outcome.description} Rows whose outcome window "
        "has not closed by the end of the data are left out until it has.",
        owners=ML_OWNERS,
    )
    def labels(zones: DataZones) -> dg.MaterializeResult:
        deid, store = zones.deid_store(), zones.use_case(uc.name)
        cohort = store.cohort.read()
        lab = build_labels(
            cohort, uc, encounters=deid.encounters.read_all(relaxed=True), events=_events(deid.events.files())
        )
        store.labels.write(lab)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": lab.height,
                "rows_awaiting_outcome": cohort.height - lab.height,
                "prevalence": float(lab["boolean_value"].cast(pl.Float64).to_numpy().mean())
                if lab.height
                else 0.0,
            }
        )

    @dg.asset(
        key=key("patient_features"),
        deps=[key("cohort"), "anonymized_events", "anonymized_encounters"],
        group_name=Stage.FEATURES,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Windowed aggregates of each code before the prediction time, only from values available "
        "by then (result or stored time), plus static attributes. Incremental: kept per delivery batch and "
        "recomputed only for batches whose cohort rows or events changed (a new batch computes its own part).",
        owners=ML_OWNERS,
    )
    def patient_features(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        deid, store = zones.deid_store(), zones.use_case(uc.name)
        files = deid.events.files()
        cohort = store.cohort.read()
        feats, stats = build_features_incremental(files, cohort, uc, store.feature_cache)
        if uc.features.history:
            history = history_features(cohort, deid.encounters.read_all(relaxed=True), _events(files), uc)
            feats = feats.join(history, on=ROW_KEY, how="left", maintain_order="left")
        store.features.write(feats)
        context.log.info(
            f"features: {stats.computed} batches computed, {stats.reused} reused from the cache "
            f"({stats.event_files_indexed} of {stats.event_files} event files indexed)"
        )
        missing = {c: float(feats[c].null_count() / max(feats.height, 1)) for c in feats.columns[3:]}
        absent = [
            c for c in uc.features.codes if all(missing.get(f, 1.0) == 1.0 for f in _columns_of(feats, c))
        ]
        if absent:
            context.log.warning(
                f"{len(absent)} of the use case's codes have no value for any admission (empty features): "
                f"{', '.join(absent)}"
            )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": feats.height,
                "features": len(feats.columns) - 3,
                "share_missing_max": max(missing.values(), default=0.0),
                "codes_without_values": len(absent),
                "batches_computed": stats.computed,
                "batches_reused": stats.reused,
            }
        )

    return [cohort, labels, patient_features]


def _events(files: list) -> pl.LazyFrame | None:
    """The de-identified events as one lazy scan (read only for the codes a step needs)."""
    return pl.scan_parquet(files) if files else None


def _columns_of(feats: pl.DataFrame, code: str) -> list[str]:
    stem = feature_stem(code)
    return [
        c
        for c in feats.columns
        if c.startswith(f"{stem}__") and "__missing_" not in c and "__count_" not in c
    ]
