"""Releasing one batch across the anonymization boundary: de-identify, remedy (generalize and suppress),
measure the release as it would be published, look for identifiers, and decide.

A batch is released only when every equivalence class over the quasi-identifiers holds at least k people
and no de-identified table holds a raw identifier value or identifier-shaped text. The decision and its
counts (never a value) are the batch's privacy record.
"""

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from clinical_ml.core.anonymization import DEID_COLUMNS, DeidBatch, Vault, anonymize_batch
from clinical_ml.core.clinical_sources import source_events
from clinical_ml.core.consent import ConsentWithheld, objecting_subjects, withhold_objecting
from clinical_ml.core.dicom import (
    DeidLog,
    ImagingInstance,
    ImagingRelease,
    keep_subjects,
    release_imaging,
    stage_imaging,
)
from clinical_ml.core.holdback import HeldRows, empty_hold, hold_record
from clinical_ml.core.ingestion import default_site_mapping
from clinical_ml.core.privacy_report import privacy_summary_markdown
from clinical_ml.core.pseudonyms import HmacKey
from clinical_ml.core.reidentification import (
    Remedied,
    RiskPolicy,
    RiskSummary,
    enforce_k_anonymity,
    measure_risk,
    quasi_identifiers,
    released_quasi_identifiers,
)
from clinical_ml.core.site_mapping import CODED_FIELDS, UNMAPPED, SiteMapping

if TYPE_CHECKING:
    from clinical_ml.core.artifacts import DeidStore

DEID_TABLE_NAMES = ("patients", "encounters", "events")
_IDENTIFIER_PATTERNS = {
    "email address": re.compile(r"[^@\s]+@[^@\s]+\.[a-z]{2,}", re.I),
    "phone number": re.compile(r"\(?\d{3}\)?[ .-]\d{3}-\d{4}"),
}


def identifier_leaks(
    deid: pl.DataFrame,
    table: str,
    raw_identifiers: set[str],
    raw_numeric_ids: set[int],
    *,
    mapping: SiteMapping | None = None,
) -> list[str]:
    """Reasons why a de-identified table is unsafe; empty when it is safe. Never returns a value (nor a column
    name outside the allowlist: those are counted). With ``mapping``, a coded column holding a value outside
    its controlled vocabulary is a finding too."""
    problems = []
    extra = set(deid.columns) - set(DEID_COLUMNS[table])
    if extra:
        problems.append(f"{len(extra)} column(s) outside the allowlist")
    if mapping is not None:
        fields = [*CODED_FIELDS.get(table, ())] + (["unit_type"] if table == "encounters" else [])
        for name in (f for f in fields if f in deid.columns):
            allowed = [*mapping.allowed(name), UNMAPPED]
            if deid.select((pl.col(name).is_not_null() & ~pl.col(name).is_in(allowed)).any()).item():
                problems.append(f"column {name} holds values outside its controlled vocabulary")
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


def raw_identifier_values(
    patients: pl.DataFrame, encounters: pl.DataFrame, labels: pl.DataFrame | None = None
) -> tuple[set[str], set[int]]:
    """The batch's identifier values (as text, and the numeric ones as integers), to look for downstream;
    with ``labels``, also the encounter numbers and MRNs they name (which may be of earlier batches)."""
    strings: set[str] = set()
    # Names are left out of the exact-value comparison: "White" is both a surname and a race category.
    for col in ("mrn", "address", "phone", "email", "zip"):
        strings |= set(patients[col].drop_nulls().cast(pl.String).to_list())
    strings |= set(patients["birth_date"].drop_nulls().cast(pl.String).to_list())
    ids = [patients["mrn"], encounters["encounter_id"]]
    if labels is not None:
        ids += [labels[c] for c in ("encounter_id", "mrn") if c in labels.columns]
    numeric = set()
    for column in ids:
        values = column.drop_nulls().cast(pl.String).to_list()
        strings |= set(values)
        numeric |= {int(v) for v in values if v.isdigit()}
    return strings, numeric


@dataclass(frozen=True)
class BatchRelease:
    """One batch after anonymization and remedies, with the release decision and what it rests on."""

    batch_id: str
    deid: DeidBatch
    remedied: Remedied
    published: RiskSummary
    policy: RiskPolicy
    frames: dict[str, pl.DataFrame]  # patients, encounters, events as they would be released
    leaks: dict[str, list[str]]  # per table, why it is unsafe (empty: safe)
    summary: str  # Markdown for the asset pages
    mapping_name: str = "default"
    consent: ConsentWithheld = field(
        default_factory=ConsentWithheld
    )  # rows of patients who objected, kept back
    imaging: ImagingRelease | None = None
    """The batch's DICOM files of the released patients, de-identified into a staging folder (``None``: the
    batch has none)."""
    released_before: tuple[str, ...] | None = None
    """The batches whose people the risk was counted with (the cumulative release); ``None``: per batch."""
    hold: pl.DataFrame = field(default_factory=empty_hold)
    """The hold record (identified: phi zone only, :mod:`clinical_ml.core.holdback`): the people this batch
    holds back and the held-back people of earlier batches it released."""
    carried_from: tuple[str, ...] = ()
    """The earlier deliveries whose held-back people were judged again with this batch."""
    origins: pl.DataFrame = field(
        default_factory=lambda: pl.DataFrame(schema={"hadm_id": pl.Int64, "origin_batch": pl.String})
    )
    """``hadm_id`` -> ``origin_batch`` of the carried admissions."""

    @property
    def meets_k(self) -> bool:
        return self.published.meets(self.policy.k)

    @property
    def released(self) -> bool:
        return self.meets_k and not any(self.leaks.values())

    @property
    def withheld_share(self) -> float:
        """Share of the batch's own people withheld (held back)."""
        return self.remedied.subjects_withheld / max(self.remedied.subjects_delivered, 1)

    def privacy_record(self) -> dict:
        """Counts only: what was released, withheld, generalized and removed, and why."""
        r = self.remedied
        return {
            "batch_id": self.batch_id,
            "released": self.released,
            "k_required": self.policy.k,
            "pseudonym_mode": self.deid.pseudonym_mode,
            "risk_scope": "batch" if self.released_before is None else "cumulative",
            "batches_released_before": None if self.released_before is None else len(self.released_before),
            # their ids (delivery names, no person's data): a run of this batch again counts the same ones
            "batches_counted": None if self.released_before is None else list(self.released_before),
            "before_suppression": r.before.as_dict(),
            "published": self.published.as_dict(),
            "race_generalized": r.race_generalized,
            "zip3_suppressed": r.zip3_suppressed,
            "race_suppressed": r.race_suppressed,
            "payer_suppressed": r.payer_suppressed,
            "subjects_withheld": r.subjects_withheld,
            "withheld_by_consent": self.consent.as_dict(),
            # per audited group (sex, race/ethnicity, age band as delivered): what the remedies took from the audit
            "audited_groups": r.audited_groups,
            "admissions_withheld": r.admissions_withheld,
            # held back by earlier batches and judged again with this one: released now, or held still
            "held_back_from_earlier": {
                "batches": list(self.carried_from),
                **r.carried.as_dict(),
                # admissions released now per delivery they came in (row_accounting.delivery_rows)
                "admissions_released_by_batch": self.released_from(),
            },
            "events_withheld": r.events_withheld,
            "label_events": self.deid.label_events,
            "labels_not_released": self.deid.orphan_labels,  # no patient found, or not a label code
            "columns_removed": self.deid.dropped_columns,
            "free_text_removed": self.deid.free_text_dropped,
            "site_mapping": self.mapping_name,
            "coded_values_unmapped_at_boundary": self.deid.unmapped_at_boundary,
            "coded_values_unmapped_released": self.deid.unmapped_released,
            **({"imaging": dict(sorted(self.imaging.counts.items()))} if self.imaging is not None else {}),
        }

    def released_from(self) -> dict[str, int]:
        """Admissions of earlier deliveries' held-back people released with this batch, per delivery."""
        if not self.released or self.origins.height == 0:
            return {}
        counts = (
            self.frames["encounters"]
            .join(self.origins, on="hadm_id")
            .group_by("origin_batch")
            .len()
            .sort("origin_batch")
        )
        return {str(r["origin_batch"]): int(r["len"]) for r in counts.iter_rows(named=True)}

    def log_line(self) -> str:
        return (
            f"batch {self.batch_id}: {self.remedied.encounters.height} admissions, k = {self.published.k_min}, "
            f"{self.remedied.subjects_withheld} patients withheld, released = {self.released}"
        )


class PseudonymContinuityError(RuntimeError):
    """Releasing this batch would give a returning patient a second pseudonym (the vault was lost or replaced,
    or the pseudonym mode changed in a running deployment). Nothing is written; the landing data stay."""


def pseudonym_continuity_problem(
    *,
    batch_id: str,
    mode: str,
    released: Sequence[Mapping],
    vault_subjects: pl.Series,
    released_subjects: pl.Series,
) -> str | None:
    """Why releasing ``batch_id`` now would break pseudonym continuity, or None.

    Parameters
    ----------
    mode
        The pseudonym mode of this run (``vault`` or ``hmac``).
    released
        The privacy records of the batches already released (``batch_id``, ``released``, ``pseudonym_mode``).
    vault_subjects
        The subject ids the vault holds (vault mode; empty in HMAC mode).
    released_subjects
        Distinct subject ids of the de-identified patients already released.
    """
    earlier = [r for r in released if r.get("released") and r.get("batch_id") != batch_id]
    other_mode = [r["batch_id"] for r in earlier if r.get("pseudonym_mode", mode) != mode]
    if other_mode:
        was = earlier[0].get("pseudonym_mode")
        return (
            f"batch {batch_id}: the pseudonym mode is '{mode}', but {len(other_mode)} batches already released "
            f"were pseudonymised in '{was}' mode (first: {sorted(other_mode)[0]}); the same patient would get a "
            f"second subject id. Keep one mode per deployment (CLINICAL_ML_PSEUDONYM_MODE={was}), or start a new "
            "data root and re-release every batch from the archive in the new mode"
        )
    if mode != "vault" or released_subjects.len() == 0:
        return None
    missing = released_subjects.filter(~released_subjects.is_in(vault_subjects.implode())).len()
    if missing:
        state = (
            "missing or empty"
            if vault_subjects.len() == 0
            else "not the vault these batches were released with"
        )
        return (
            f"batch {batch_id}: the pseudonym vault is {state}: {missing} of the {released_subjects.len()} "
            f"patients already released ({len(earlier)} batches) are not in it, so a returning patient would "
            "get a second pseudonym. Restore data/phi/vault from the phi zone's backup, then run again"
        )
    return None


def released_subject_ids(deid: "DeidStore") -> pl.Series:
    """Distinct subject ids of every de-identified patient part released so far (empty before the first)."""
    files = deid.patients.files()
    if not files:
        return pl.Series("subject_id", [], dtype=pl.Int64)
    return pl.scan_parquet(files).select(pl.col("subject_id").unique()).collect()["subject_id"]


def released_before(
    deid: "DeidStore", batch_id: str, *, policy: RiskPolicy, counted: Sequence[str] | None = None
) -> tuple[pl.DataFrame, tuple[str, ...]]:
    """The quasi-identifiers of the batches released before ``batch_id`` and their ids: the cumulative release
    a new batch is judged with.

    Those are the batches whose ids sort below it, as they are now in the de-identified zone; batches with a
    later id are left out. ``counted``: the ids a first run of this batch counted (its privacy record's
    ``batches_counted``): a run again counts those of them still released and no others, so that it gives the
    same release even when a parallel backfill released more batches with a lower id in the meantime.
    """
    present = set(deid.patients.batch_ids()) & set(deid.encounters.batch_ids())
    if counted is not None:
        present &= set(counted)
    ids = tuple(sorted(b for b in present if b < batch_id))
    frames = [(deid.patients.part(b).read(), deid.encounters.part(b).read()) for b in ids]
    return released_quasi_identifiers(frames, policy=policy), ids


def batch_rng(seed: int | None, batch_id: str) -> np.random.Generator:
    """Surrogates and shifts from operating-system entropy, or reproducibly from ``seed`` and the batch."""
    return np.random.default_rng(None if seed is None else [seed, *map(int, batch_id.encode())])


def release_batch(
    raw: Mapping[str, pl.DataFrame],
    *,
    vault: Vault,
    batch_id: str,
    policy: RiskPolicy,
    max_shift_weeks: int,
    rng: np.random.Generator,
    hmac_key: HmacKey | None,
    mapping: SiteMapping | None = None,
    opted_out: pl.Series | None = None,
    imaging: Sequence[ImagingInstance] = (),
    imaging_key: bytes | None = None,
    imaging_stage: Path | None = None,
    released: tuple[pl.DataFrame, tuple[str, ...]] | None = None,
    held: Sequence[HeldRows] = (),
) -> BatchRelease:
    """Anonymize, remedy and judge one batch (``raw``: its validated patients, encounters, labs, vitals and,
    when delivered, labels; ``imaging``: its accepted DICOM files, de-identified under ``imaging_key``, the
    UID secret of :func:`clinical_ml.core.dicom.uid_key`).

    Imaging studies and findings join the events (so consent and suppression apply to them as to the rest);
    the DICOM files of the patients released are de-identified one at a time into ``imaging_stage`` (a hidden
    folder: :func:`clinical_ml.core.imaging.staging_folder`) and looked through for identifiers by the same
    gate as they are written, so memory holds one file, not the batch.

    ``released`` (:func:`released_before`): the quasi-identifiers and ids of the batches released before;
    the risk is then counted over the cumulative release (a class holds this batch's people and those
    already released alike), and only this batch is remedied. ``None`` judges the batch on its own.
    ``held``: the rows of people earlier batches held back (:mod:`clinical_ml.core.holdback`), anonymized as
    their delivery would and judged again with this batch's; the release's ``hold`` says who is held now.

    The gate measures the frames as they would be released, independently of the remedy that produced them.
    Nothing is written here but the staged DICOM files: the caller persists the vault and the release, and
    moves the staged files into place or removes them (:func:`clinical_ml.core.imaging.publish_imaging`).
    """
    result = anonymize_batch(
        patients=raw["patients"],
        encounters=raw["encounters"],
        labs=raw["labs"],
        vitals=raw["vitals"],
        labels=raw.get("labels"),
        vault=vault,
        batch_id=batch_id,
        max_shift_weeks=max_shift_weeks,
        rng=rng,
        hmac_key=hmac_key,
        site_mapping=mapping,
    )
    # medications, diagnoses, procedures and device vitals join the events under the same pseudonyms and shifts
    more = source_events(raw, patients=result.vault.patients, encounters=result.vault.encounters)
    pictures = None
    if imaging:
        if imaging_key is None:
            raise ValueError("imaging needs the UID secret (clinical_ml.core.dicom.uid_key)")
        if imaging_stage is None:
            raise ValueError("imaging needs a staging folder (clinical_ml.core.imaging.staging_folder)")
        pictures = release_imaging(
            list(imaging),
            patients=result.vault.patients,
            encounters=result.vault.encounters,
            raw_encounters=raw["encounters"],
            key=imaging_key,
        )
    result = dataclasses.replace(
        result,
        events=pl.concat(
            [result.events, more.events, *([pictures.events] if pictures is not None else [])],
            how="vertical_relaxed",
        ),
        orphan_events=result.orphan_events + sum(more.orphans_by_source.values()),
    )
    result, origins, mrn_of, carried_pictures = _with_carried(
        result, held, hmac_key=hmac_key, max_shift_weeks=max_shift_weeks, imaging_key=imaging_key
    )
    pictures = _with_carried_imaging(pictures, carried_pictures)
    overdue = pl.concat([h.overdue for h in held]) if held else pl.Series("mrn", [], dtype=pl.String)
    race_suppressible = mrn_of.filter(pl.col("mrn").is_in(overdue.implode()))["subject_id"]
    # patients of the opt-out register (normalized MRNs) never cross: counted, kept in the phi zone only
    objecting = objecting_subjects(
        opted_out if opted_out is not None else pl.Series("mrn", [], dtype=pl.String),
        vault=result.vault,
        hmac_key=hmac_key,
    )
    result, consent = withhold_objecting(result, objecting)
    prior = released[0] if released is not None else None
    remedied = enforce_k_anonymity(
        patients=result.patients,
        encounters=result.encounters,
        events=result.events,
        policy=policy,
        released=prior,
        carried=origins,
        race_suppressible=race_suppressible,
    )
    frames = {"patients": remedied.patients, "encounters": remedied.encounters, "events": remedied.events}
    published = measure_risk(
        quasi_identifiers(frames["patients"], frames["encounters"], policy=policy), k=policy.k, released=prior
    )
    ids, numeric_ids = raw_identifier_values(raw["patients"], raw["encounters"], raw.get("labels"))
    for h in held:  # the carried rows' identifiers are looked for too
        more_ids, more_numeric = raw_identifier_values(
            h.raw["patients"], h.raw["encounters"], h.raw.get("labels")
        )
        ids, numeric_ids = ids | more_ids, numeric_ids | more_numeric
    used = mapping or default_site_mapping()
    leaks = {t: identifier_leaks(f, t, ids, numeric_ids, mapping=used) for t, f in frames.items()}
    if pictures is not None and imaging_key is not None:
        if imaging_stage is None:
            raise ValueError("imaging needs a staging folder (clinical_ml.core.imaging.staging_folder)")
        pictures = keep_subjects(pictures, frames["patients"]["subject_id"].to_list())
        pictures, found = stage_imaging(
            pictures, imaging_stage, key=imaging_key, raw_identifiers=ids, raw_numeric_ids=numeric_ids
        )
        leaks["events"] += found
    summary = privacy_summary_markdown(
        batch_id=batch_id,
        deid=result,
        remedied=remedied,
        published=published,
        policy=policy,
        max_shift_weeks=max_shift_weeks,
        leaks=[f"{t}: {p}" for t, ps in leaks.items() for p in ps],
        released_before=None if released is None else len(released[1]),
    )
    return BatchRelease(
        batch_id,
        result,
        remedied,
        published,
        policy,
        frames,
        leaks,
        summary,
        used.name,
        consent,
        pictures,
        None if released is None else released[1],
        hold_record(
            batch_id=batch_id,
            encounters=result.encounters,
            origins=origins,
            withheld=remedied.withheld_subjects,
            mrn_of=mrn_of,
        ),
        tuple(h.batch_id for h in held),
        origins,
    )


def _with_carried_imaging(
    own: ImagingRelease | None, carried: Sequence[ImagingRelease]
) -> ImagingRelease | None:
    """The batch's imaging with the carried people's files added (``carried_from_earlier`` counts them)."""
    if not carried:
        return own
    parts = [*([own] if own is not None else []), *carried]
    log, counts = DeidLog(), Counter[str]()
    for part in parts:
        log.merge(part.log)
        counts.update(part.counts)
    counts["carried_from_earlier"] = sum(len(c.files) for c in carried)
    return ImagingRelease(
        {name: f for part in parts for name, f in part.files.items()},
        pl.concat([part.events for part in parts], how="vertical_relaxed"),
        dict(counts),
        log,
    )


def _with_carried(
    result: DeidBatch,
    held: Sequence[HeldRows],
    *,
    hmac_key: HmacKey | None,
    max_shift_weeks: int,
    imaging_key: bytes | None = None,
) -> tuple[DeidBatch, pl.DataFrame, pl.DataFrame, list[ImagingRelease]]:
    """The batch with the held-back rows of earlier deliveries added, each anonymized as its delivery would
    (same pseudonyms and shifts: the vault, or the key, already holds them; their DICOM files too, under
    ``imaging_key``); the carried admissions' ``hadm_id`` -> ``origin_batch``; ``subject_id`` -> normalized
    ``mrn`` of everyone in the batch; and the carried DICOM files, de-identified."""
    origins = pl.DataFrame(schema={"hadm_id": result.encounters["hadm_id"].dtype, "origin_batch": pl.String})
    mrn_of = [result.vault.patients.select("subject_id", "mrn")]
    pictures: list[ImagingRelease] = []
    if not held:
        return result, origins, mrn_of[0], pictures
    patients, encounters, events, vault, parts = [], [], [], result.vault, [origins]
    for h in held:
        part = anonymize_batch(
            patients=h.raw["patients"],
            encounters=h.raw["encounters"],
            labs=h.raw["labs"],
            vitals=h.raw["vitals"],
            labels=h.raw.get("labels"),
            vault=vault,
            batch_id=h.batch_id,
            max_shift_weeks=max_shift_weeks,
            rng=h.rng,
            hmac_key=hmac_key,
            site_mapping=h.mapping,
        )
        more = source_events(h.raw, patients=part.vault.patients, encounters=part.vault.encounters)
        if h.imaging and imaging_key is not None:
            pictures.append(
                release_imaging(
                    list(h.imaging),
                    patients=part.vault.patients,
                    encounters=part.vault.encounters,
                    raw_encounters=h.raw["encounters"],
                    key=imaging_key,
                )
            )
            events.append(pictures[-1].events)
        if hmac_key is None:
            vault = part.vault  # the held people are in the vault already: nothing is drawn for them
        patients.append(part.patients)
        encounters.append(part.encounters)
        events += [part.events, more.events]
        mrn_of.append(part.vault.patients.select("subject_id", "mrn"))
        parts.append(part.encounters.select("hadm_id", pl.lit(h.batch_id).alias("origin_batch")))
    carried = pl.concat(parts, how="vertical_relaxed").unique("hadm_id", keep="first")
    merged = dataclasses.replace(
        result,
        # a person delivered again keeps this batch's patient row; an admission delivered again, its own
        patients=pl.concat([result.patients, *patients], how="vertical_relaxed").unique(
            "subject_id", keep="first", maintain_order=True
        ),
        encounters=pl.concat([result.encounters, *encounters], how="vertical_relaxed").unique(
            "hadm_id", keep="first", maintain_order=True
        ),
        events=pl.concat([result.events, *events], how="vertical_relaxed"),
        vault=vault if hmac_key is None else result.vault,
    )
    own = result.encounters["hadm_id"].implode()
    return (
        merged,
        carried.filter(~pl.col("hadm_id").is_in(own)),
        pl.concat(mrn_of).unique("subject_id"),
        pictures,
    )
