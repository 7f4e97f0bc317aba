"""One delivered file through the landing zone: checks, validation, archive or quarantine, ledger entry.

The landing zone is only read. An accepted original is copied read-only into ``archive/files/<sha256>``; a
rejected one into ``quarantine/<batch>/`` beside a JSON reason (code, counts, line or byte offset, no values).
Either way the accepted-rows Parquet of the source is written (empty, with the contract's columns, when the
file was quarantined or missing), so the other sources of the batch proceed. An optional source (labels) that a
batch does not deliver is ``not_delivered``: empty accepted rows, no ledger entry, nothing wrong.

Each batch is read through the site mapping its marker names (else ``default``); the mapping's name is in the
ledger entry and its content hash in the data version. The delivered values of coded fields that no mapping
names (which may be PHI) are listed, with their row counts, in ``phi/unmapped/<source>/<batch>.parquet`` for
the data steward; the ledger and the asset pages carry their counts only.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from clinical_ml.core.clinical_sources import MORE_SOURCES
from clinical_ml.core.ingestion import (
    DUPLICATE_KEYS,
    RULES_VERSION,
    BatchContext,
    IngestResult,
    default_site_mapping,
    empty_accepted,
    empty_rejects,
    ingest_file,
)
from clinical_ml.core.landing import COMPLETION_MARKER, OPTIONAL_SOURCES, marker_site_mapping, read_marker
from clinical_ml.core.pseudonyms import normalize_identifier
from clinical_ml.core.safety import (
    FileRejected,
    Limits,
    check_entry,
    check_size,
    extract_zip_member,
    neutralize_formula,
    safe_name,
)
from clinical_ml.core.site_mapping import DEFAULT_MAPPING, SiteMapping, load_site_mapping
from clinical_ml.core.storage import sha256_file, write_json, write_parquet

DELIVERY_SUFFIXES = (".csv", ".parquet", ".zip")
SHRINKING_REPLACEMENT = "replacement_drops_rows"
REPLACEMENT_SUFFIX = ".replacement.json"
STATUSES = ("accepted", "quarantined", "missing", "duplicate_delivery", "not_delivered")


@dataclass(frozen=True)
class ZonePaths:
    """The zones ingestion touches."""

    landing: Path
    archive: Path
    quarantine: Path
    phi: Path


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one source file of one batch; :meth:`ledger_row` is its PHI-free ledger entry."""

    batch_id: str
    source: str
    status: str
    file: str | None
    sha256: str | None
    n_bytes: int
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    rejected_by_reason: dict[str, int]
    warnings: dict[str, int]
    data_version: str
    reason_code: str | None = None
    detail: str | None = None
    line: int | None = None
    byte_offset: int | None = None
    quarantined_as: str | None = None
    archived_as: str | None = None
    accepted_path: str = ""
    rejects_path: str = ""
    site_mapping: str = DEFAULT_MAPPING
    unmapped_values_path: str = ""
    recorded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def ledger_row(self) -> dict:
        return asdict(self)

    @property
    def accounted(self) -> bool:
        return self.rows_in == self.rows_accepted + self.rows_rejected


def accepted_path(zones: ZonePaths, source: str, batch_id: str) -> Path:
    return zones.phi / "raw" / source / f"{batch_id}.parquet"


def rejects_path(zones: ZonePaths, source: str, batch_id: str) -> Path:
    return zones.phi / "rejects" / source / f"{batch_id}.parquet"


def unmapped_values_path(zones: ZonePaths, source: str, batch_id: str) -> Path:
    """The delivered coded values no mapping names, with their row counts: phi zone only (they may be PHI)."""
    return zones.phi / "unmapped" / source / f"{batch_id}.parquet"


def batch_site_mapping(zones: ZonePaths, batch_id: str, *, folder: str | Path | None = None) -> SiteMapping:
    """The mapping batch ``batch_id`` is read with: the one its marker names, else ``default``.

    Raises
    ------
    SiteMappingError
        When that mapping is missing or invalid (naming the file and field): the batch waits for a fix,
        nothing of it is read.
    """
    return load_site_mapping(marker_site_mapping(zones.landing / batch_id) or DEFAULT_MAPPING, folder=folder)


def ingested_site_mapping(
    zones: ZonePaths, batch_id: str, *, folder: str | Path | None = None
) -> SiteMapping:
    """The mapping batch ``batch_id`` was ingested with (its ledger entries name it), for the boundary to
    apply again; the batch's own choice when no entry names one."""
    for source in ("encounters", "patients"):
        entry = read_ledger_entry(zones, batch_id, source)
        if entry is not None and entry.get("site_mapping"):
            return load_site_mapping(str(entry["site_mapping"]), folder=folder)
    return batch_site_mapping(zones, batch_id, folder=folder)


def ledger_entry_path(zones: ZonePaths, batch_id: str, source: str) -> Path:
    return zones.archive / "ledger" / batch_id / f"{source}.json"


def read_ledger_entry(zones: ZonePaths, batch_id: str, source: str) -> dict | None:
    p = ledger_entry_path(zones, batch_id, source)
    return json.loads(p.read_text()) if p.is_file() else None


def replacement_entry_path(zones: ZonePaths, batch_id: str, source: str) -> Path:
    """The ledger entry of a replacement that was refused because it drops rows the batch had."""
    return zones.archive / "ledger" / batch_id / f"{source}{REPLACEMENT_SUFFIX}"


def replacement_entries(zones: ZonePaths, batch_id: str) -> list[dict]:
    """The ledger entries of the batch's refused replacements (see :func:`replacement_entry_path`)."""
    folder = zones.archive / "ledger" / batch_id
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"*{REPLACEMENT_SUFFIX}"))]


def _refuse_shrinking_replacement(
    zones: ZonePaths, batch_id: str, source: str, sha: str | None, accepted: pl.DataFrame
) -> None:
    """A new version of an accepted file of this batch that leaves out patients or stays the earlier one had
    (a batch replaced in place with fewer encounters) is refused: rows are never silently taken back."""
    previous = read_ledger_entry(zones, batch_id, source)
    part = accepted_path(zones, source, batch_id)
    if previous is None or previous.get("status") != "accepted" or previous.get("sha256") == sha:
        return
    if not part.is_file():
        return
    key = DUPLICATE_KEYS[source][0]
    before = pl.read_parquet(part, columns=[key]).select(normalize_identifier(pl.col(key))).unique()[:, 0]
    now = accepted.select(normalize_identifier(pl.col(key))).unique()[:, 0]
    gone = int((~before.is_in(now.implode())).sum())
    if gone:
        raise FileRejected(
            SHRINKING_REPLACEMENT,
            f"{gone} of {before.len()} {key} values accepted from the earlier delivery of this batch are absent "
            "from this one; the earlier delivery is kept (docs/operations.md: a replaced delivery)",
        )


def _candidates(batch_dir: Path, source: str) -> list[Path]:
    return [
        batch_dir / f"{source}{ext}"
        for ext in DELIVERY_SUFFIXES
        if os.path.lexists(batch_dir / f"{source}{ext}")
    ]


def _data_version(sha: str | None, upstream: list[str | None]) -> str:
    key = "|".join([sha or "missing", RULES_VERSION, *[u or "missing" for u in upstream]])
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _archive(zones: ZonePaths, path: Path, sha256: str, batch_id: str, source: str) -> Path:
    dest = zones.archive / "files" / f"{sha256}{path.suffix}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(path, tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    first = dest.with_suffix(".json")
    if not first.exists():
        # checked on its own: a run killed between the copy and this record would otherwise leave a copy
        # without it for good, and the same bytes delivered in a later batch would be ingested twice
        write_json({"first_batch_id": batch_id, "source": source, "sha256": sha256}, first)
    return dest


def _first_delivery(zones: ZonePaths, sha256: str) -> dict | None:
    p = zones.archive / "files" / f"{sha256}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _quarantine(
    zones: ZonePaths,
    path: Path | None,
    batch_id: str,
    source: str,
    exc: FileRejected,
    *,
    copy: bool,
    sha: str | None,
) -> Path:
    qdir = zones.quarantine / batch_id
    qdir.mkdir(parents=True, exist_ok=True)
    name = path.name if path is not None and safe_name(path.name) else f"{source}.unnamed"
    dest = qdir / name
    copied = False
    if copy and path is not None:
        shutil.copyfile(path, dest)
        copied = True
    write_json(
        {
            "batch_id": batch_id,
            "source": source,
            "file": name,
            "sha256": sha,
            "reason_code": exc.reason_code,
            "detail": exc.detail,
            "line": exc.line,
            "byte_offset": exc.byte_offset,
            "copied": copied,
            "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        qdir / f"{name}.reason.json",
    )
    return dest


def process_file(
    *,
    zones: ZonePaths,
    batch_id: str,
    source: str,
    batch: BatchContext | None = None,
    upstream_versions: list[str | None] | None = None,
    limits: Limits | None = None,
    now: datetime | None = None,
    mapping: SiteMapping | None = None,
) -> tuple[FileOutcome, pl.DataFrame]:
    """Ingest the ``source`` file of batch ``batch_id`` and file the outcome.

    Parameters
    ----------
    zones
        Landing (read only), archive, quarantine and phi zones.
    batch_id
        The batch folder's name.
    source
        ``patients``, ``encounters``, ``labs``, ``vitals`` or ``labels`` (optional).
    batch
        Accepted patients/encounters of the batch (and for labels those of the earlier batches) for cross-file
        checks.
    upstream_versions
        Data versions this file's validation depends on (the batch's patients/encounters), folded into its
        data version.
    limits
        Size limits for files and zip members.
    now
        Ingestion time for the future-date check.
    mapping
        The batch's site mapping (:func:`batch_site_mapping`); the default mapping when not given.

    Returns
    -------
    tuple[FileOutcome, polars.DataFrame]
        The outcome (also written as the file's ledger entry) and the accepted rows (empty with the contract's
        columns unless accepted).
    """
    if not safe_name(batch_id):
        raise ValueError("batch ids are plain folder names")
    limits = limits or Limits()
    batch_dir = zones.landing / batch_id
    candidates = _candidates(batch_dir, source)
    mapping = mapping or default_site_mapping()
    upstream = [*(upstream_versions or []), f"mapping={mapping.digest()}"]
    acc_path = accepted_path(zones, source, batch_id)
    rej_path = rejects_path(zones, source, batch_id)

    def finish(
        outcome: FileOutcome, accepted: pl.DataFrame, rejects: pl.DataFrame
    ) -> tuple[FileOutcome, pl.DataFrame]:
        write_parquet(accepted, acc_path)
        write_parquet(rejects, rej_path)
        write_json(outcome.ledger_row(), ledger_entry_path(zones, batch_id, source))
        return outcome, accepted

    common: dict[str, Any] = {
        "batch_id": batch_id,
        "source": source,
        "site_mapping": mapping.name,
        "accepted_path": str(acc_path.relative_to(zones.phi)),
        "rejects_path": str(rej_path.relative_to(zones.phi)),
    }
    if not candidates and source in OPTIONAL_SOURCES:
        # nothing to account for; an entry left by an earlier delivery of the batch no longer holds
        ledger_entry_path(zones, batch_id, source).unlink(missing_ok=True)
        outcome = FileOutcome(
            **common, status="not_delivered", file=None, sha256=None, n_bytes=0, rows_in=0, rows_accepted=0,
            rows_rejected=0, rejected_by_reason={}, warnings={}, data_version=_data_version(None, upstream),
            detail=f"the batch has no {source} file (optional)",
        )  # fmt: skip
        write_parquet(empty_accepted(source), acc_path)
        write_parquet(empty_rejects(), rej_path)
        return outcome, empty_accepted(source)
    if not candidates:
        outcome = FileOutcome(
            **common, status="missing", file=None, sha256=None, n_bytes=0, rows_in=0, rows_accepted=0,
            rows_rejected=0, rejected_by_reason={}, warnings={}, data_version=_data_version(None, upstream),
            reason_code="file_missing", detail=f"the batch has no {source} file ({', '.join(DELIVERY_SUFFIXES)})",
        )  # fmt: skip
        return finish(outcome, empty_accepted(source), empty_rejects())

    path = candidates[0]
    sha: str | None = None
    n_bytes = 0
    try:
        if len(candidates) > 1:
            raise FileRejected(
                "ambiguous_delivery", f"{len(candidates)} files for one source; exactly 1 expected"
            )
        check_entry(path, root=batch_dir)
        n_bytes = check_size(path, limits=limits)
        listing = read_marker(batch_dir)
        if listing is not None:
            if path.name not in listing:
                raise FileRejected("unlisted_file", f"not listed in the {COMPLETION_MARKER} marker")
            if listing[path.name]["bytes"] != n_bytes:
                raise FileRejected(
                    "incomplete_file",
                    f"{n_bytes} bytes on disk vs {listing[path.name]['bytes']} listed: still being written",
                    byte_offset=n_bytes,
                )
        if path.suffix == ".zip":
            sha = sha256_file(path)
            work = zones.phi / ".work"
            work.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                member = extract_zip_member(path, workdir=Path(tmp), limits=limits)
                if not member.name.startswith(f"{source}."):
                    raise FileRejected("odd_file_name", "the archive member is not named after its source")
                result: IngestResult = ingest_file(
                    member, source, batch=batch, now=now, limits=limits, mapping=mapping
                )
        else:
            result = ingest_file(path, source, batch=batch, now=now, limits=limits, mapping=mapping)
            sha = result.sha256
        listed_sha = listing[path.name]["sha256"] if listing is not None else ""
        if listed_sha and listed_sha != sha:
            raise FileRejected("checksum_mismatch", "sha256 differs from the one listed in the marker")
        _refuse_shrinking_replacement(zones, batch_id, source, sha, result.accepted)
    except FileRejected as exc:
        if sha is None and n_bytes and os.path.isfile(path) and not os.path.islink(path):
            sha = sha256_file(path)
        regular = exc.reason_code not in (
            "symlink",
            "not_regular_file",
            "odd_file_name",
            "path_escape",
            "file_missing",
        )
        copy = regular and 0 < n_bytes <= limits.max_file_bytes
        dest = _quarantine(zones, path, batch_id, source, exc, copy=copy, sha=sha)
        previous = (
            read_ledger_entry(zones, batch_id, source) if exc.reason_code == SHRINKING_REPLACEMENT else None
        )
        outcome = FileOutcome(
            **common, status="quarantined", file=path.name if safe_name(path.name) else None, sha256=sha,
            n_bytes=n_bytes, rows_in=0, rows_accepted=0, rows_rejected=0, rejected_by_reason={}, warnings={},
            data_version=previous["data_version"] if previous else _data_version(sha, upstream),
            reason_code=exc.reason_code, detail=exc.detail, line=exc.line, byte_offset=exc.byte_offset,
            quarantined_as=str(dest.relative_to(zones.quarantine)),
        )  # fmt: skip
        if previous is not None:
            # The earlier delivery stays what the batch holds (its rows, entry and data version, so nothing
            # downstream changes); the refused replacement gets an entry of its own for the ledger.
            write_json(outcome.ledger_row(), replacement_entry_path(zones, batch_id, source))
            return outcome, pl.read_parquet(acc_path)
        return finish(outcome, empty_accepted(source), empty_rejects())

    assert sha is not None
    first = _first_delivery(zones, sha)
    if first is not None and first["first_batch_id"] != batch_id:
        # The same bytes were accepted in an earlier batch: ingesting them again would double every row.
        rejects = result.accepted.select("row_number", pl.lit("duplicate_delivery").alias("reason"))
        rejects = pl.concat([result.rejects, rejects]).sort("row_number")
        outcome = FileOutcome(
            **common, status="duplicate_delivery", file=path.name, sha256=sha, n_bytes=n_bytes,
            rows_in=result.rows_in, rows_accepted=0, rows_rejected=rejects.height,
            rejected_by_reason={**result.rejected_by_reason, "duplicate_delivery": result.rows_accepted},
            warnings=result.warnings, data_version=_data_version(sha, upstream), reason_code="duplicate_delivery",
            detail="identical to a file accepted in an earlier batch",
        )  # fmt: skip
        return finish(outcome, empty_accepted(source), rejects)

    archived = _archive(zones, path, sha, batch_id, source)
    unmapped_path = unmapped_values_path(zones, source, batch_id)
    if result.unmapped_values is not None and result.unmapped_values.height:
        # the data steward's list: exported beside the exact value, neutralised for a spreadsheet
        write_parquet(
            result.unmapped_values.with_columns(
                neutralize_formula(pl.col("value")).alias("value_for_spreadsheet")
            ),
            unmapped_path,
        )
        common["unmapped_values_path"] = str(unmapped_path.relative_to(zones.phi))
    else:
        unmapped_path.unlink(missing_ok=True)  # a re-run under a fixed mapping leaves no stale list
    # no digest to compare with (a marker without one, or no marker): a transfer error would go unseen
    unverified = {} if listed_sha else {"integrity_not_checked": 1}
    outcome = FileOutcome(
        **common, status="accepted", file=path.name, sha256=sha, n_bytes=n_bytes, rows_in=result.rows_in,
        rows_accepted=result.rows_accepted, rows_rejected=result.rows_rejected,
        rejected_by_reason=result.rejected_by_reason, warnings=result.warnings | unverified,
        data_version=_data_version(sha, upstream), archived_as=str(archived.relative_to(zones.archive)),
    )  # fmt: skip
    return finish(outcome, result.accepted, result.rejects)


# Each source is validated against the accepted rows of these sources of the same batch.
UPSTREAM: dict[str, list[str]] = {
    "patients": [],
    "encounters": ["patients"],
    "labs": ["patients", "encounters"],
    "vitals": ["patients", "encounters"],
    "labels": ["encounters"],
} | {s: ["patients", "encounters"] for s in MORE_SOURCES}


def earlier_encounters(zones: ZonePaths, batch_id: str) -> tuple[pl.DataFrame, list[str]]:
    """``encounter_id`` and ``mrn`` of the encounters accepted in the earlier batches (batch ids that sort
    before ``batch_id``: ISO dates sort chronologically), newest batch first, and the data versions they come
    from: the encounters a label may name besides its own batch's.

    Read from the accepted encounters of the phi zone, not from the pseudonym vault: the vault maps an
    encounter to its ``hadm_id`` only (the patient, and so the date shift, is not in it), and HMAC mode keeps
    no vault at all. Later batches are left out so that a label's validation does not depend on what was
    delivered after it.
    """
    ledger = zones.archive / "ledger"
    folders = [d.name for d in ledger.iterdir() if d.is_dir()] if ledger.is_dir() else []
    frames, versions = [], []
    for other in sorted((b for b in folders if b < batch_id), reverse=True):
        entry = read_ledger_entry(zones, other, "encounters") if safe_name(other) else None
        part = accepted_path(zones, "encounters", other)
        if entry is None or entry.get("status") != "accepted" or not part.is_file():
            continue
        frames.append(pl.read_parquet(part, columns=["encounter_id", "mrn"]))
        versions.append(f"{other}={entry.get('data_version')}")
    if not frames:
        return pl.DataFrame(schema={"encounter_id": pl.String, "mrn": pl.String}), versions
    return pl.concat(frames), versions


def batch_context(
    zones: ZonePaths, source: str, batch_id: str
) -> tuple[BatchContext | None, list[str | None]]:
    """The accepted upstream rows of ``source`` in batch ``batch_id`` and their data versions (for labels that
    are delivered, also the encounters of the earlier batches, folded into one more version)."""
    ups = UPSTREAM[source]
    if not ups:
        return None, []
    entries = {u: read_ledger_entry(zones, batch_id, u) or {} for u in ups}
    # Rows are checked against an upstream source only when its file was accepted: a quarantined patients file
    # must not reject every encounter of the batch (the outcome carries a warning instead).
    frames = {
        u: pl.read_parquet(accepted_path(zones, u, batch_id))
        for u in ups
        if entries[u].get("status") == "accepted"
    }
    versions = [entries[u].get("data_version") for u in ups]
    earlier = None
    if source in OPTIONAL_SOURCES and _candidates(zones.landing / batch_id, source):
        earlier, earlier_versions = earlier_encounters(zones, batch_id)
        versions.append(hashlib.sha256("\n".join(earlier_versions).encode()).hexdigest())
    context = BatchContext(
        patients=frames.get("patients"), encounters=frames.get("encounters"), earlier_encounters=earlier
    )
    return context, versions


def process_batch(
    *,
    zones: ZonePaths,
    batch_id: str,
    limits: Limits | None = None,
    now: datetime | None = None,
    mappings_dir: str | Path | None = None,
) -> dict[str, FileOutcome]:
    """Every source of one batch in dependency order (what the ingestion assets do, without Dagster); an
    optional source the batch does not deliver is left out."""
    out = {}
    mapping = batch_site_mapping(zones, batch_id, folder=mappings_dir)
    for source in UPSTREAM:
        batch, versions = batch_context(zones, source, batch_id)
        outcome, _ = process_file(
            zones=zones, batch_id=batch_id, source=source, batch=batch, upstream_versions=versions,
            limits=limits, now=now, mapping=mapping,
        )  # fmt: skip
        if outcome.status != "not_delivered":
            out[source] = outcome
    return out
