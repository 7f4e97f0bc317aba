import re

import dagster as dg
import numpy as np
import polars as pl

from clinical_ml.core.anonymization import DEID_COLUMNS, Vault, anonymize_batch
from clinical_ml.core.artifacts import DictRecord
from clinical_ml.core.ingestion import empty_accepted
from clinical_ml.core.meds_layout import write_meds_dataset
from clinical_ml.core.privacy_report import privacy_summary_markdown
from clinical_ml.core.reidentification import RiskPolicy, enforce_k_anonymity, measure_risk, quasi_identifiers
from clinical_ml.core.storage import code_version
from clinical_ml.defs.conventions import PRIVACY_OWNERS, DataClass, Stage, batch_partitions, tags
from clinical_ml.defs.ingestion.ranges import BATCH_BACKFILL_POLICY, BatchOutcome, batch_result, log_batches
from clinical_ml.resources.pseudonym_secret import HmacKey, hmac_key_for
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml.resources.zones import DataZones

DEID_TABLES = {
    "patients": "anonymized_patients",
    "encounters": "anonymized_encounters",
    "events": "anonymized_events",
}
_IDENTIFIER_PATTERNS = {
    "email address": re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.I),
    "phone number": re.compile(r"\(?\d{3}\)?[ .-]\d{3}-\d{4}"),
}


def _raw(zones: DataZones, source: str, batch_id: str) -> pl.DataFrame:
    """The batch's accepted rows; no rows when the file was quarantined or never delivered."""
    part = zones.phi_store().raw(source).part(batch_id)
    return part.read() if part.exists() else empty_accepted(source)


def identifier_leaks(
    deid: pl.DataFrame, table: str, raw_identifiers: set[str], raw_numeric_ids: set[int]
) -> list[str]:
    """Reasons why a de-identified table is unsafe; empty when it is safe. Never returns a value."""
    problems = []
    extra = sorted(set(deid.columns) - set(DEID_COLUMNS[table]))
    if extra:
        problems.append(f"columns outside the allowlist: {extra}")
    for name, dtype in deid.schema.items():
        if dtype == pl.String:
            values = set(deid[name].drop_nulls().unique().to_list())
            if values & raw_identifiers:
                problems.append(f"column {name} holds raw identifier values")
            for kind, pattern in _IDENTIFIER_PATTERNS.items():
                if any(pattern.search(v) for v in values):
                    problems.append(f"column {name} holds text shaped like a {kind}")
        elif dtype.is_integer() and raw_numeric_ids and deid[name].is_in(list(raw_numeric_ids)).any():
            problems.append(f"column {name} holds a raw MRN or encounter number")
    return problems


def _raw_identifier_values(patients: pl.DataFrame, encounters: pl.DataFrame) -> tuple[set[str], set[int]]:
    strings: set[str] = set()
    # Names are left out of the exact-value comparison: "White" is both a surname and a race category.
    for col in ("mrn", "address", "phone", "email", "zip"):
        strings |= set(patients[col].drop_nulls().cast(pl.String).to_list())
    strings |= set(patients["birth_date"].drop_nulls().cast(pl.String).to_list())
    strings |= set(encounters["encounter_id"].drop_nulls().to_list())
    numeric = set()
    for v in [*patients["mrn"].to_list(), *encounters["encounter_id"].to_list()]:
        if v and v.isdigit():
            numeric.add(int(v))
    return strings, numeric


def _policy(settings: AnonymizationSettings) -> RiskPolicy:
    return RiskPolicy(
        k=settings.k_anonymity_min,
        age_bands=tuple(settings.age_bands),
        races_kept=None if settings.races_kept is None else tuple(settings.races_kept),
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
            description="Admissions with surrogate ids, shifted dates, ages capped at 90, real year-quarter.",
            group_name=Stage.ANONYMIZATION,
            kinds={"polars", "parquet"},
            owners=PRIVACY_OWNERS,
            tags=tags(DataClass.DEIDENTIFIED),
        ),
        dg.AssetSpec(
            DEID_TABLES["events"],
            deps=["raw_patients", "raw_encounters", "raw_labs", "raw_vitals"],
            description="Labs, vitals and stay events in MEDS form with their availability time.",
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
                "race/ethnicity, ZIP3 and admission quarter holds at least k people (k_anonymity_min). "
                "When it fails nothing of the batch is written to the de-identified zone.",
            ),
            dg.AssetCheckSpec(
                "suppression_within_limit",
                asset=name,
                description="Suppression withheld no more than max_withheld_share of the batch's patients "
                "(a warning: the release is safe, but suppression falls on rare groups and can bias models).",
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
    raw = {s: _raw(zones, s, batch_id) for s in ("patients", "encounters", "labs", "vitals")}
    policy = _policy(anonymization)
    result = anonymize_batch(
        patients=raw["patients"],
        encounters=raw["encounters"],
        labs=raw["labs"],
        vitals=raw["vitals"],
        vault=zones.phi_store().read_vault() if key is None else Vault.empty(),
        batch_id=batch_id,
        max_shift_weeks=anonymization.max_shift_weeks,
        rng=np.random.default_rng(
            None
            if anonymization.pseudonym_seed is None
            else [anonymization.pseudonym_seed, *map(int, batch_id.encode())]
        ),
        hmac_key=key,
    )
    if result.persist_vault:
        zones.phi_store().write_vault(result.vault)
    remedied = enforce_k_anonymity(
        patients=result.patients, encounters=result.encounters, events=result.events, policy=policy
    )
    frames = {"patients": remedied.patients, "encounters": remedied.encounters, "events": remedied.events}
    # The gate measures the frames as released, independently of the remedy that produced them.
    published = measure_risk(
        quasi_identifiers(frames["patients"], frames["encounters"], policy=policy), k=policy.k
    )
    ids, numeric_ids = _raw_identifier_values(raw["patients"], raw["encounters"])
    leaks = {t: identifier_leaks(f, t, ids, numeric_ids) for t, f in frames.items()}
    all_leaks = [f"{t}: {p}" for t, ps in leaks.items() for p in ps]
    release = published.meets(policy.k) and not all_leaks
    withheld_share = remedied.subjects_withheld / max(remedied.before.subjects, 1)
    summary = privacy_summary_markdown(
        batch_id=batch_id,
        deid=result,
        remedied=remedied,
        published=published,
        policy=policy,
        max_shift_weeks=anonymization.max_shift_weeks,
        leaks=all_leaks,
    )
    risk_record = {
        "batch_id": batch_id,
        "released": release,
        "k_required": policy.k,
        "pseudonym_mode": result.pseudonym_mode,
        "before_suppression": remedied.before.as_dict(),
        "published": published.as_dict(),
        "race_generalized": remedied.race_generalized,
        "zip3_suppressed": remedied.zip3_suppressed,
        "race_suppressed": remedied.race_suppressed,
        "subjects_withheld": remedied.subjects_withheld,
        "admissions_withheld": remedied.admissions_withheld,
        "events_withheld": remedied.events_withheld,
        "columns_removed": result.dropped_columns,
        "free_text_removed": result.free_text_dropped,
    }
    deid = zones.deid_store()
    deid.privacy.part(batch_id).write(DictRecord(risk_record))
    outcomes = {}
    for table, frame in frames.items():
        target = deid.table(table).part(batch_id)
        if release:
            target.write(frame)
        else:
            target.remove()  # a failed re-run must not leave an older release behind
        outcomes[table] = BatchOutcome(
            metadata={
                "dagster/row_count": frame.height if release else 0,
                "dagster/column_schema": _table_schema(frame),
                "released": release,
                "path": str(target.path.relative_to(zones.deid)) if release else "",
                "pseudonym_mode": result.pseudonym_mode,
                "k_min": published.k_min if published.k_min is not None else 0,
                "k_required": policy.k,
                "share_below_k_before_suppression": remedied.before.share_below_k,
                "max_prosecutor_risk": published.max_prosecutor_risk,
                "mean_prosecutor_risk": published.mean_prosecutor_risk,
                "subjects_withheld": remedied.subjects_withheld,
                "withheld_share": withheld_share,
                "zip3_suppressed": remedied.zip3_suppressed,
                "race_suppressed": remedied.race_suppressed,
                "race_generalized": remedied.race_generalized,
                "report": dg.MetadataValue.md(summary),
            },
            checks=[
                dg.AssetCheckResult(
                    asset_key=DEID_TABLES[table],
                    check_name="no_direct_identifiers",
                    passed=not leaks[table],
                    metadata={
                        "problems": dg.MetadataValue.json(leaks[table]),
                        "columns": dg.MetadataValue.json(frame.columns),
                    },
                ),
                dg.AssetCheckResult(
                    asset_key=DEID_TABLES[table],
                    check_name="k_anonymity_meets_minimum",
                    passed=published.meets(policy.k),
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "k_min": published.k_min if published.k_min is not None else 0,
                        "k_required": policy.k,
                        "records": published.records,
                        "share_below_k": published.share_below_k,
                        "max_prosecutor_risk": published.max_prosecutor_risk,
                        "subjects_withheld": remedied.subjects_withheld,
                    },
                ),
                dg.AssetCheckResult(
                    asset_key=DEID_TABLES[table],
                    check_name="suppression_within_limit",
                    passed=withheld_share <= anonymization.max_withheld_share,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={
                        "withheld_share": withheld_share,
                        "max_withheld_share": anonymization.max_withheld_share,
                        "subjects_withheld": remedied.subjects_withheld,
                    },
                ),
            ],
        )
    lines.append(
        f"batch {batch_id}: {remedied.encounters.height} admissions, k = {published.k_min}, "
        f"{remedied.subjects_withheld} patients withheld, released = {release}"
    )
    return outcomes


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
