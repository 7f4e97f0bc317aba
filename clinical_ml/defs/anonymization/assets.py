import re
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from clinical_ml.core.anonymization import DEID_COLUMNS, Vault, anonymize_batch, k_anonymity
from clinical_ml.core.features import age_band_expr, race_ethnicity_expr
from clinical_ml.core.meds_layout import write_meds_dataset
from clinical_ml.core.storage import code_version, write_parquet
from clinical_ml.defs.conventions import PRIVACY_OWNERS, DataClass, Stage, batch_partitions, tags
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml.resources.zones import DataZones

DEID_TABLES = {
    "patients": "anonymized_patients",
    "encounters": "anonymized_encounters",
    "events": "anonymized_events",
}
QUASI_IDENTIFIERS = ["age_band", "sex", "race_ethnicity", "zip3", "period"]
_IDENTIFIER_PATTERNS = {
    "email address": re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.I),
    "phone number": re.compile(r"\(?\d{3}\)?[ .-]\d{3}-\d{4}"),
}


def _vault_paths(zones: DataZones) -> tuple[Path, Path]:
    return zones.phi / "vault" / "patients.parquet", zones.phi / "vault" / "encounters.parquet"


def load_vault(zones: DataZones) -> Vault:
    pp, ep = _vault_paths(zones)
    if not pp.exists():
        return Vault.empty()
    return Vault(pl.read_parquet(pp), pl.read_parquet(ep))


def _raw(zones: DataZones, source: str, batch_id: str) -> pl.DataFrame:
    return pl.read_parquet(zones.phi / "raw" / source / f"{batch_id}.parquet")


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


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            DEID_TABLES["patients"],
            deps=["raw_patients", "raw_encounters"],
            description="One row per patient: surrogate subject_id, sex, race, ethnicity, ZIP3.",
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
        dg.AssetCheckSpec(
            "no_direct_identifiers",
            asset=name,
            blocking=True,
            description="Only allowlisted columns; no raw identifier value or identifier-shaped text.",
        )
        for name in DEID_TABLES.values()
    ],
    partitions_def=batch_partitions,
    pool="pseudonym_vault",
)
def anonymized_cohort(
    context: dg.AssetExecutionContext, zones: DataZones, anonymization: AnonymizationSettings
):
    batch_id = context.partition_key
    raw = {s: _raw(zones, s, batch_id) for s in ("patients", "encounters", "labs", "vitals")}
    result = anonymize_batch(
        patients=raw["patients"],
        encounters=raw["encounters"],
        labs=raw["labs"],
        vitals=raw["vitals"],
        vault=load_vault(zones),
        batch_id=batch_id,
        max_shift_weeks=anonymization.max_shift_weeks,
        rng=np.random.default_rng(
            None
            if anonymization.pseudonym_seed is None
            else [anonymization.pseudonym_seed, *map(int, batch_id.encode())]
        ),
    )
    pp, ep = _vault_paths(zones)
    write_parquet(result.vault.patients, pp)
    write_parquet(result.vault.encounters, ep)
    frames = {"patients": result.patients, "encounters": result.encounters, "events": result.events}
    ids, numeric_ids = _raw_identifier_values(raw["patients"], raw["encounters"])
    qi = result.encounters.join(result.patients, on="subject_id", how="left").with_columns(
        age_band_expr(pl.col("age_years"), [0, 18, 30, 40, 50, 60, 70, 80, 90]).alias("age_band"),
        race_ethnicity_expr().alias("race_ethnicity"),
    )
    risk = k_anonymity(qi, QUASI_IDENTIFIERS, k=anonymization.k_anonymity_min)
    summary = (
        f"**Batch {batch_id}**\n\n"
        f"- Removed (not on the allowlist): patients {', '.join(result.dropped_columns['patients'])}; "
        f"encounters {', '.join(result.dropped_columns['encounters'])}\n"
        f"- Pseudonymized: {result.new_pseudonyms} new patients got random surrogate ids (mapping in the phi vault)\n"
        f"- Dates shifted per patient by whole weeks (up to {anonymization.max_shift_weeks}); real year-quarter kept\n"
        f"- Generalized: {result.ages_capped} admissions aged 90 or over reported as 90+; "
        f"ZIP cut to 3 digits, {result.zip3_restricted} in restricted areas set to 000\n"
        f"- Quasi-identifiers {', '.join(QUASI_IDENTIFIERS)}: smallest class k = {risk['k_min']}, "
        f"{100 * risk['share_below_k']:.1f}% of admissions in classes below k = {anonymization.k_anonymity_min}, "
        f"max prosecutor risk {risk['max_prosecutor_risk']:.2f}\n"
    )
    for table, frame in frames.items():
        out = write_parquet(frame, zones.deid / table / f"{batch_id}.parquet")
        problems = identifier_leaks(frame, table, ids, numeric_ids)
        yield dg.MaterializeResult(
            asset_key=DEID_TABLES[table],
            metadata={
                "dagster/row_count": frame.height,
                "dagster/column_schema": dg.TableSchema(
                    columns=[dg.TableColumn(n, str(t)) for n, t in frame.schema.items()]
                ),
                "path": str(out.relative_to(zones.deid)),
                "k_min": risk["k_min"],
                "share_below_k": risk["share_below_k"],
                "max_prosecutor_risk": risk["max_prosecutor_risk"],
                "report": dg.MetadataValue.md(summary),
            },
        )
        yield dg.AssetCheckResult(
            asset_key=DEID_TABLES[table],
            check_name="no_direct_identifiers",
            passed=not problems,
            metadata={
                "problems": dg.MetadataValue.json(problems),
                "columns": dg.MetadataValue.json(frame.columns),
            },
        )
    context.log.info(f"batch {batch_id} anonymized: {result.encounters.height} admissions")


@dg.asset(
    deps=[DEID_TABLES["events"]],
    group_name=Stage.ANONYMIZATION,
    kinds={"polars", "parquet"},
    owners=PRIVACY_OWNERS,
    tags=tags(DataClass.DEIDENTIFIED),
    description="Every de-identified batch assembled into one MEDS dataset (sharded by subject, sorted, "
    "validated with the meds package plus sort-order and subject-contiguity checks).",
)
def meds_dataset(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
    files = sorted((zones.deid / "events").glob("*.parquet"))
    if not files:
        raise dg.Failure(
            "No anonymized batches yet: materialize the ingestion and anonymization assets first."
        )
    events = pl.concat([pl.read_parquet(f) for f in files])
    counts = write_meds_dataset(events, zones.deid / "meds", dataset_version=code_version())
    context.log.info(f"MEDS dataset written from {len(files)} batches")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(counts.values()),
            "batches": len(files),
            "subjects": events["subject_id"].n_unique(),
            "codes": events["code"].n_unique(),
            "path": "meds",
        }
    )
