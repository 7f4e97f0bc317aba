import dagster as dg
import polars as pl

from clinical_ml.core.deid_publish import ReleaseSettings, publish_batch, suppresses_race
from clinical_ml.core.deid_release import BatchRelease
from clinical_ml.core.delivery import ZonePaths
from clinical_ml.core.landing import IMAGING_SOURCE, SOURCES
from clinical_ml.core.meds_layout import write_meds_dataset
from clinical_ml.core.reidentification import RiskPolicy
from clinical_ml.core.storage import code_version, sweep_leftovers
from clinical_ml.defs.anonymization.order import wait_for_earlier_batches
from clinical_ml.defs.conventions import PRIVACY_OWNERS, DataClass, Stage, batch_partitions, tags
from clinical_ml.defs.ingestion.ranges import BATCH_BACKFILL_POLICY, BatchOutcome, batch_result, log_batches
from clinical_ml.resources.pseudonym_secret import HmacKey, hmac_key_for
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml.resources.zones import DataZones

# a temporary file this old belongs to a write that died: the nightly MEDS export removes it
LEFTOVER_AGE_SECONDS = 6 * 3600
DEID_TABLES = {
    "patients": "anonymized_patients",
    "encounters": "anonymized_encounters",
    "events": "anonymized_events",
}


def _release_settings(settings: AnonymizationSettings, key: HmacKey | None) -> ReleaseSettings:
    return ReleaseSettings(
        policy=RiskPolicy(
            k=settings.k_anonymity_min,
            age_bands=tuple(settings.age_bands),
            races_kept=None if settings.races_kept is None else tuple(settings.races_kept),
            suppress_race=suppresses_race(settings.risk_scope, settings.race_remedy),
        ),
        pseudonym_mode=settings.pseudonym_mode,
        hmac_key=key,
        max_shift_weeks=settings.max_shift_weeks,
        seed=settings.pseudonym_seed,
        risk_scope=settings.risk_scope,
        max_holds=settings.max_holds,
        max_hold_deliveries=settings.max_hold_deliveries,
    )


def _table_schema(frame: pl.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(n, str(t)) for n, t in frame.schema.items()])


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            DEID_TABLES["patients"],
            deps=["raw_patients", "raw_encounters"],
            description="One row per patient: surrogate subject_id, sex, race, ethnicity, ZIP3 (rare races "
            "generalized, small classes suppressed).",
            group_name=Stage.ANONYMIZATION,
            kinds={"polars", "parquet"},
            owners=PRIVACY_OWNERS,
            tags=tags(DataClass.DEIDENTIFIED),
        ),
        dg.AssetSpec(
            DEID_TABLES["encounters"],
            deps=["raw_patients", "raw_encounters"],
            description="Admissions with surrogate ids, shifted dates, ages capped at 90, real year-quarter, "
            "coded payer (withheld where too rare to release).",
            group_name=Stage.ANONYMIZATION,
            kinds={"polars", "parquet"},
            owners=PRIVACY_OWNERS,
            tags=tags(DataClass.DEIDENTIFIED),
        ),
        dg.AssetSpec(
            DEID_TABLES["events"],
            deps=[f"raw_{s}" for s in (*SOURCES, IMAGING_SOURCE)],
            description="Labs, vitals, stay events, hospital-supplied labels (LABEL//<name>), medications, "
            "diagnoses, procedures, device vitals and imaging studies and findings (IMAGING//<modality>//<body "
            "part>, IMAGING_FINDING//<code>) in MEDS form with their availability time. The batch's DICOM "
            "files, de-identified (PS3.15 basic profile), go to deid/imaging/<batch>/<subject_id>/.",
            group_name=Stage.ANONYMIZATION,
            kinds={"polars", "parquet"},
            owners=PRIVACY_OWNERS,
            tags=tags(DataClass.DEIDENTIFIED),
        ),
    ],
    check_specs=[
        spec
        for name in DEID_TABLES.values()
        for spec in (
            dg.AssetCheckSpec(
                "no_direct_identifiers",
                asset=name,
                blocking=True,
                description="Only allowlisted columns; no raw identifier value or identifier-shaped text.",
            ),
            dg.AssetCheckSpec(
                "k_anonymity_meets_minimum",
                asset=name,
                blocking=True,
                description="Measured on the released batch: every equivalence class over age band, sex, "
                "race/ethnicity, ZIP3, admission quarter and payer that holds one of its people holds at least "
                "k people (k_anonymity_min), counted over the cumulative release unless risk_scope is 'batch'. "
                "When it fails nothing of the batch is written to the de-identified zone.",
            ),
            dg.AssetCheckSpec(
                "suppression_within_limit",
                asset=name,
                description="Suppression held back or withheld no more than max_withheld_share of the batch's "
                "patients (a warning: the release is safe, but it falls on rare groups and can bias models; "
                "under the cumulative scope those held back are released with a later batch once they can be).",
            ),
        )
    ],
    partitions_def=batch_partitions,
    backfill_policy=BATCH_BACKFILL_POLICY,
    pool="pseudonym_vault",
)
def anonymized_cohort(
    context: dg.AssetExecutionContext, zones: DataZones, anonymization: AnonymizationSettings
):
    key = hmac_key_for(anonymization)
    batches = context.partition_keys
    if anonymization.risk_scope == "cumulative":  # released in delivery order (see order.py)
        wait_for_earlier_batches(
            context, zones.deid_store(), batches[0], {dg.AssetKey(k) for k in DEID_TABLES.values()}
        )
    # Batch by batch, in order (the vault grows with each), each gated on its own: a batch that fails a check
    # is withheld whatever else the run holds (see clinical_ml.defs.ingestion.ranges for runs of many).
    lines: list[str] = []
    per_batch = {b: _anonymize_batch(context, zones, anonymization, key, b, lines) for b in batches}
    log_batches(context, lines)
    for table, asset_key in DEID_TABLES.items():
        if len(batches) == 1:
            (outcome,) = (o[table] for o in per_batch.values())
            yield dg.MaterializeResult(asset_key=asset_key, metadata=dict(outcome.metadata))
            yield from outcome.checks
        else:
            yield batch_result(context, {b: o[table] for b, o in per_batch.items()}, asset_key=asset_key)


def _anonymize_batch(
    context: dg.AssetExecutionContext,
    zones: DataZones,
    anonymization: AnonymizationSettings,
    key: HmacKey | None,
    batch_id: str,
    lines: list[str],
) -> dict[str, BatchOutcome]:
    """Anonymize, remedy, gate and (when it passes) release one batch; what each table reports."""
    paths = ZonePaths(
        landing=zones.landing, archive=zones.archive, quarantine=zones.quarantine, phi=zones.phi
    )
    published = publish_batch(
        paths=paths,
        deid=zones.deid_store(),
        batch_id=batch_id,
        settings=_release_settings(anonymization, key),
        site_mappings_dir=zones.site_mappings_dir,
    )
    release = published.release
    if published.withdrawal.removed:
        context.log.warning(published.withdrawal.sentence())
    lines.append(release.log_line())
    return {t: _table_outcome(t, release, anonymization, zones) for t in release.frames}


def _table_outcome(
    table: str, release: BatchRelease, anonymization: AnonymizationSettings, zones: DataZones
) -> BatchOutcome:
    """The metadata and the three checks of one de-identified table of a batch."""
    frame, remedied, published, k = (
        release.frames[table],
        release.remedied,
        release.published,
        release.policy.k,
    )
    asset = DEID_TABLES[table]
    return BatchOutcome(
        metadata={
            "dagster/row_count": frame.height if release.released else 0,
            "dagster/column_schema": _table_schema(frame),
            "released": release.released,
            "path": str(zones.deid_store().table(table).part(release.batch_id).path.relative_to(zones.deid))
            if release.released
            else "",
            "pseudonym_mode": release.deid.pseudonym_mode,
            "k_min": published.k_min if published.k_min is not None else 0,
            "k_required": k,
            "share_below_k_before_suppression": remedied.before.share_below_k,
            "max_prosecutor_risk": published.max_prosecutor_risk,
            "mean_prosecutor_risk": published.mean_prosecutor_risk,
            "subjects_withheld": remedied.subjects_withheld,
            "withheld_share": release.withheld_share,
            # people earlier batches held back (core.holdback), released with this one / held back still
            "held_back_released": remedied.carried.patients_released,
            "held_back_still": remedied.carried.patients_held,
            "zip3_suppressed": remedied.zip3_suppressed,
            "race_suppressed": remedied.race_suppressed,
            "payer_suppressed": remedied.payer_suppressed,
            "race_generalized": remedied.race_generalized,
            "site_mapping": release.mapping_name,
            "coded_values_unmapped": dg.MetadataValue.json(release.deid.unmapped_released),
            **({"label_events": release.deid.label_events} if table == "events" else {}),
            **(_imaging_metadata(release) if table == "events" else {}),
            "report": dg.MetadataValue.md(release.summary),
        },
        checks=[
            dg.AssetCheckResult(
                asset_key=asset,
                check_name="no_direct_identifiers",
                passed=not release.leaks[table],
                metadata={
                    "problems": dg.MetadataValue.json(release.leaks[table]),
                    "columns": dg.MetadataValue.json(frame.columns),
                },
            ),
            dg.AssetCheckResult(
                asset_key=asset,
                check_name="k_anonymity_meets_minimum",
                passed=release.meets_k,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "k_min": published.k_min if published.k_min is not None else 0,
                    "k_required": k,
                    "records": published.records,
                    "share_below_k": published.share_below_k,
                    "max_prosecutor_risk": published.max_prosecutor_risk,
                    "subjects_withheld": remedied.subjects_withheld,
                },
            ),
            dg.AssetCheckResult(
                asset_key=asset,
                check_name="suppression_within_limit",
                passed=release.withheld_share <= anonymization.max_withheld_share,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={
                    "withheld_share": release.withheld_share,
                    "max_withheld_share": anonymization.max_withheld_share,
                    "subjects_withheld": remedied.subjects_withheld,
                },
            ),
        ],
    )


def _imaging_metadata(release: BatchRelease) -> dict:
    """Counts of the batch's imaging at the boundary (files released, pixels withheld and why, events)."""
    counts = release.imaging.counts if release.imaging is not None else {}
    return {
        "imaging_files_released": counts.get("instances_released", 0) if release.released else 0,
        "imaging_studies": counts.get("studies", 0),
        "imaging_pixels_withheld": dg.MetadataValue.json(
            {k.partition(":")[2]: v for k, v in counts.items() if k.startswith("pixels_dropped:")}
        ),
        "imaging_not_released": dg.MetadataValue.json(
            {k.partition(":")[2]: v for k, v in counts.items() if k.startswith("not_released:")}
        ),
    }


@dg.asset(
    deps=[DEID_TABLES["events"]],
    group_name=Stage.ANONYMIZATION,
    kinds={"polars", "parquet"},
    owners=PRIVACY_OWNERS,
    tags=tags(DataClass.DEIDENTIFIED),
    description="Every de-identified batch assembled into one MEDS dataset for MEDS tools (sharded by "
    "subject, sorted, validated with the meds package plus sort-order and subject-contiguity checks). Rebuilt "
    "with the nightly lifecycle_job; the features read the per-batch event files, so a new batch does not "
    "wait for this export.",
)
def meds_dataset(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
    deid = zones.deid_store()
    leftovers = sweep_leftovers(deid.root, older_than_seconds=LEFTOVER_AGE_SECONDS)
    if leftovers:  # batch ids and artifact names only, never a value
        context.log.warning(
            f"removed {len(leftovers)} temporary files or staged folders of writes that never finished (a killed run): "
            + ", ".join(str(p.relative_to(deid.root)) for p in leftovers[:20])
        )
    files = deid.events.files()
    if not files:
        raise dg.Failure(
            "No anonymized batches yet: materialize the ingestion and anonymization assets first."
        )
    events = pl.scan_parquet(files)  # one shard in memory at a time
    counts = write_meds_dataset(events, deid.meds, dataset_version=code_version())
    context.log.info(f"MEDS dataset written from {len(files)} batches")
    shards = pl.scan_parquet(deid.meds_shards())
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(counts.values()),
            "batches": len(files),
            "subjects": shards.select(pl.col("subject_id").n_unique()).collect().item(),
            "codes": deid.meds_codes.scan().select(pl.len()).collect().item(),
            "path": "meds",
        }
    )
