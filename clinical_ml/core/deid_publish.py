"""One batch across the anonymization boundary, end to end: read what ingestion accepted, release it
(:func:`clinical_ml.core.deid_release.release_batch`), and write what passed the gate into the de-identified
zone, with the vault, the batch's records and the consent withdrawals, in an order a killed run can repeat.

The Dagster asset ``anonymized_cohort`` calls :func:`publish_batch` once per batch; the fault-injection tests
call it too, so what they kill is what runs.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.artifacts import DeidStore, DictRecord, PhiStore
from clinical_ml.core.consent import Withdrawal, objecting_subjects, read_register, withdraw_objections
from clinical_ml.core.deid_release import (
    BatchRelease,
    PseudonymContinuityError,
    batch_rng,
    pseudonym_continuity_problem,
    release_batch,
    released_before,
    released_subject_ids,
)
from clinical_ml.core.delivery import ZonePaths, ingested_site_mapping
from clinical_ml.core.dicom import uid_key
from clinical_ml.core.holdback import (
    MAX_HOLD_DELIVERIES,
    MAX_HOLDS,
    HeldRows,
    instances_of,
    rows_of,
    still_held,
)
from clinical_ml.core.imaging import accepted_instances, publish_imaging, staging_folder, withdraw_imaging
from clinical_ml.core.ingestion import empty_accepted
from clinical_ml.core.landing import SOURCES
from clinical_ml.core.pseudonyms import HmacKey
from clinical_ml.core.reidentification import RiskPolicy
from clinical_ml.core.row_accounting import batch_account

RISK_SCOPES = ("cumulative", "batch")
RACE_REMEDIES = ("hold_back", "suppress")


def suppresses_race(risk_scope: str, race_remedy: str) -> bool:
    """Whether race and ethnicity are suppressed for people still too rare (``RiskPolicy.suppress_race``):
    always under the per-batch scope, where nothing is held back; else unless ``race_remedy`` is
    ``hold_back``."""
    if race_remedy not in RACE_REMEDIES:
        raise ValueError(f"race_remedy must be 'hold_back' or 'suppress', not {race_remedy!r}")
    return risk_scope != "cumulative" or race_remedy == "suppress"


@dataclass(frozen=True)
class ReleaseSettings:
    """How a batch is released: the risk policy and scope, the pseudonym mode and key, the date shifts."""

    policy: RiskPolicy
    pseudonym_mode: str
    hmac_key: HmacKey | None
    max_shift_weeks: int
    seed: int | None = None
    """Surrogates and shifts reproducible from this seed (tests only); None: operating-system entropy."""
    risk_scope: str = "cumulative"
    max_holds: int = MAX_HOLDS
    """Deliveries a person is held back by before their race may be withheld to release them (when the
    policy does not suppress race at once: ``RiskPolicy.suppress_race``)."""
    max_hold_deliveries: int = MAX_HOLD_DELIVERIES
    """Deliveries after which a person still held back is withheld for good (:func:`held_rows`)."""

    def __post_init__(self) -> None:
        if self.risk_scope not in RISK_SCOPES:
            raise ValueError(f"risk_scope must be 'cumulative' or 'batch', not {self.risk_scope!r}")
        if self.max_hold_deliveries < 1 or self.max_holds < 1:
            raise ValueError("max_holds and max_hold_deliveries must be at least 1")


@dataclass(frozen=True)
class Published:
    """A batch's release decision and what the consent register withdrew from earlier releases meanwhile."""

    release: BatchRelease
    withdrawal: Withdrawal


def accepted_rows(phi: PhiStore, source: str, batch_id: str) -> pl.DataFrame:
    """The batch's accepted rows of ``source``; no rows when the file was quarantined or never delivered."""
    part = phi.raw(source).part(batch_id)
    return part.read() if part.exists() else empty_accepted(source)


def counted_before(deid: DeidStore, batch_id: str) -> list[str] | None:
    """The batches an earlier run of ``batch_id`` counted its risk with (``None``: its first run, or it was
    judged on its own)."""
    record = deid.privacy.part(batch_id)
    counted = record.read().data.get("batches_counted") if record.exists() else None
    return [str(b) for b in counted] if isinstance(counted, list) else None


def held_rows(
    paths: ZonePaths,
    batch_id: str,
    counted: Sequence[str],
    *,
    settings: ReleaseSettings,
    site_mappings_dir: str | Path | None = None,
) -> list[HeldRows]:
    """The rows of the people held back by the batches ``counted`` and released by none of them, per delivery
    they came in (:mod:`clinical_ml.core.holdback`).

    Only the last ``settings.max_hold_deliveries`` batches counted are read, and only people who came in
    one of them are carried: a person still held back after that many deliveries is withheld for good (they
    stay counted as withheld), so a batch reads a bounded number of hold records and deliveries however
    long the stream."""
    phi = PhiStore(paths.phi)
    recent = sorted(b for b in counted if b < batch_id)[-settings.max_hold_deliveries :]
    records = [phi.held.part(b).read() for b in recent if phi.held.part(b).exists()]
    pending = still_held(records).filter(pl.col("origin_batch").is_in(recent))
    out = []
    for (origin,), people in pending.group_by("origin_batch", maintain_order=True):
        raw = {s: accepted_rows(phi, s, str(origin)) for s in SOURCES}
        out.append(
            HeldRows(
                str(origin),
                rows_of(raw, people["mrn"]),
                batch_rng(settings.seed, str(origin)),
                ingested_site_mapping(paths, str(origin), folder=site_mappings_dir),
                instances_of(accepted_instances(paths, str(origin)), people["mrn"]),
                people.filter(pl.col("holds") >= settings.max_holds)["mrn"],
            )
        )
    return out


def publish_batch(
    *,
    paths: ZonePaths,
    deid: DeidStore,
    batch_id: str,
    settings: ReleaseSettings,
    site_mappings_dir: str | Path | None = None,
) -> Published:
    """Anonymize, remedy, gate and (when it passes) release one batch into ``deid``.

    Raises :class:`PseudonymContinuityError` before anything is written when the vault no longer holds the
    patients released before (a lost or replaced vault would hand out second pseudonyms).
    """
    phi, key = PhiStore(paths.phi), settings.hmac_key
    vault = phi.read_vault() if key is None else Vault.empty()
    problem = pseudonym_continuity_problem(
        batch_id=batch_id,
        mode=settings.pseudonym_mode,
        released=[r.data for r in deid.privacy.read_all()],
        vault_subjects=vault.patients["subject_id"],
        released_subjects=released_subject_ids(deid),
    )
    if problem:
        raise PseudonymContinuityError(problem)
    cumulative = settings.risk_scope == "cumulative"
    opted_out = read_register(phi.consent_register)
    imaging = accepted_instances(paths, batch_id)
    before = (
        released_before(deid, batch_id, policy=settings.policy, counted=counted_before(deid, batch_id))
        if cumulative
        else None
    )
    held = (
        held_rows(paths, batch_id, before[1], settings=settings, site_mappings_dir=site_mappings_dir)
        if before is not None
        else []
    )
    pictures = imaging or any(h.imaging for h in held)
    release = release_batch(
        {s: accepted_rows(phi, s, batch_id) for s in SOURCES},
        imaging=imaging,
        imaging_key=uid_key(phi_dir=paths.phi, hmac_secret=key.secret if key else None) if pictures else None,
        imaging_stage=staging_folder(deid.imaging / batch_id),
        opted_out=opted_out,
        vault=vault,
        batch_id=batch_id,
        policy=settings.policy,
        released=before,
        held=held,
        max_shift_weeks=settings.max_shift_weeks,
        rng=batch_rng(settings.seed, batch_id),
        hmac_key=key,
        mapping=ingested_site_mapping(paths, batch_id, folder=site_mappings_dir),
    )
    if release.deid.persist_vault:
        phi.write_vault(release.deid.vault)
    deid.privacy.part(batch_id).write(DictRecord(release.privacy_record()))
    # counts and reason codes only: what the report card's participant flow shows per delivery
    deid.accounting.part(batch_id).write(DictRecord(batch_account(paths, deid.root, batch_id).as_dict()))
    # before the frames: a later batch that counts this one must find whom it holds back and released
    if release.released and cumulative:
        phi.held.part(batch_id).write(release.hold)
    else:
        phi.held.part(batch_id).remove()
    for table, frame in release.frames.items():
        target = deid.table(table).part(batch_id)
        if release.released:
            target.write(frame)
        else:
            target.remove()  # a failed re-run must not leave an older release behind
    publish_imaging(release.imaging, deid.imaging / batch_id, released=release.released)
    withdrawal = withdraw_objections(deid, opted_out, vault=release.deid.vault, hmac_key=key)
    objecting = objecting_subjects(opted_out, vault=release.deid.vault, hmac_key=key)
    if files := withdraw_imaging(deid.imaging, objecting):
        withdrawal = dataclasses.replace(
            withdrawal, rows_removed={**withdrawal.rows_removed, "imaging files": files}
        )
    deid.consent.part(batch_id).write(
        DictRecord({"withheld_by_consent": release.consent.as_dict(), "withdrawn": withdrawal.as_dict()})
    )
    return Published(release, withdrawal)
