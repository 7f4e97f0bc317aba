"""PACS imaging through the landing zone and across the anonymization boundary: the pipeline around the DICOM
de-identification of :mod:`clinical_ml.core.dicom`.

Ingestion (:func:`process_imaging`)
    Each file of a batch's ``imaging/`` folder (listed in the ``_SUCCESS`` marker as ``imaging/<name>``, or
    found there in a batch without a marker) is checked on its own, and one file's fault never touches
    another file or source of the batch. A file is *accepted* (copied read-only into the archive under its
    sha256) or *rejected* with one reason, first matching wins (:data:`FILE_REASONS`); a rejected file is
    copied into ``quarantine/<batch>/imaging/`` beside a JSON reason (a repeat of a file accepted in an earlier
    batch is not: the archive holds it already). The ledger gets one entry for the folder (``source``
    ``imaging``): files in = accepted + rejected, rejects by reason, and the rejects table numbers the files
    in name order. File names never leave the phi zone (a name can carry anything): the accepted files'
    index, with their names, MRNs and admission numbers, is ``phi/raw/imaging/<batch>.parquet``.

    A DICOM file cut short at an element boundary reads as a valid, shorter file; the marker's size and
    sha256 are what catch it (a listed file of another size keeps the batch from starting, another digest
    rejects the file as ``checksum_mismatch``).

Anonymization (:func:`accepted_instances`, :func:`publish_imaging`, :func:`withdraw_imaging`)
    The accepted files are read back from the archive one at a time, de-identified under the batch's
    pseudonyms and date shifts (:func:`clinical_ml.core.dicom.release_imaging` and
    :func:`clinical_ml.core.dicom.stage_imaging`, called by :func:`clinical_ml.core.deid_release.release_batch`
    so that the consent register, suppression and the identifier gate apply to imaging as to every other
    event) into a hidden staging folder beside the batch's (:func:`staging_folder`), and, when the batch is
    released, that folder becomes ``deid/imaging/<batch>/<subject_id>/<new SOP instance UID>.dcm``: one
    folder per pseudonym, so a later objection removes a patient's files without reading any. Memory holds
    about one file at a time, whatever the size of the batch.
"""

import hashlib
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from clinical_ml.core.delivery import (
    FileOutcome,
    ZonePaths,
    _archive,
    _data_version,
    _first_delivery,
    accepted_path,
    ledger_entry_path,
    read_ledger_entry,
    rejects_path,
)
from clinical_ml.core.dicom import ImagingInstance, ImagingRelease
from clinical_ml.core.ingestion import empty_rejects
from clinical_ml.core.landing import (
    DICOM_SUFFIX,
    IMAGING_FOLDER,
    IMAGING_SOURCE,
    imaging_folder_problem,
    imaging_names,
    listed_entry_problem,
    read_marker,
)
from clinical_ml.core.pseudonyms import normalize_identifier
from clinical_ml.core.safety import FileRejected, Limits, check_size, safe_name
from clinical_ml.core.storage import sha256_file, write_json, write_parquet

# Why a file is rejected, in the order the checks run (first matching wins).
FILE_REASONS = {
    "odd_file_name": "the name has path parts or characters outside [A-Za-z0-9._-]",
    "symlink": "a symbolic link (never followed), or the imaging folder is one",
    "not_regular_file": "a folder or a special file",
    "empty_file": "0 bytes",
    "file_too_large": "larger than the file size limit",
    "incomplete_file": "its size differs from the marker's: still being written",
    "checksum_mismatch": "its sha256 differs from the marker's",
    "not_dicom": "not a DICOM file (no .dcm suffix, or no DICM prefix after the 128-byte preamble)",
    "unreadable_dicom": "DICOM that pydicom cannot decode",
    "truncated_dicom": "DICOM whose last element is cut short",
    "missing_patient_id": "no PatientID (the MRN that ties the file to its patient)",
    "missing_sop_instance_uid": "no SOPInstanceUID (the instance cannot be named)",
    "unknown_patient": "its PatientID is not a patient delivered in the batch",
    "future_date:StudyDate": "a StudyDate more than one day after the time of ingestion",
    "duplicate_instance": "a SOPInstanceUID that an earlier file of the batch (in name order) has",
    "duplicate_delivery": "identical to a file accepted in an earlier batch",
}
# Rejected without a copy in the quarantine: nothing safe to copy, or the archive holds it already.
_NOT_COPIED = (
    "odd_file_name",
    "symlink",
    "not_regular_file",
    "file_missing",
    "file_too_large",
    "duplicate_delivery",
)
FUTURE_GRACE = timedelta(days=1)
INDEX_SCHEMA = pl.Schema(
    {
        "row_number": pl.Int64(),
        "file": pl.String(),
        "sha256": pl.String(),
        "n_bytes": pl.Int64(),
        "archived_as": pl.String(),
        "mrn": pl.String(),
        "admission_id": pl.String(),
        "sop_instance_uid": pl.String(),
        "modality": pl.String(),
    }
)


def empty_index() -> pl.DataFrame:
    """The accepted-files index with no rows (``phi/raw/imaging/<batch>.parquet`` of a batch without any)."""
    return pl.DataFrame(schema=INDEX_SCHEMA)


def _text(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def read_dicom(path: Path) -> Dataset:
    """A delivered DICOM file, every element decoded.

    Raises
    ------
    FileRejected
        ``not_dicom``, ``unreadable_dicom`` or ``truncated_dicom``; the detail names the kind of failure only.
    """
    if not path.name.lower().endswith(DICOM_SUFFIX):
        raise FileRejected("not_dicom", f"the name does not end in {DICOM_SUFFIX}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
            for _ in ds.iterall():  # decodes every value (pydicom decodes lazily), inside sequences too
                pass
        except InvalidDicomError:
            raise FileRejected("not_dicom", "no DICM prefix after the 128-byte preamble") from None
        except Exception as exc:  # pydicom raises many kinds on malformed input; none may stop the batch
            raise FileRejected(
                "unreadable_dicom", f"pydicom could not decode it ({type(exc).__name__})"
            ) from None
    if any("EOF" in str(w.message) for w in caught):
        raise FileRejected("truncated_dicom", "the file ends inside an element")
    return ds


def _study_date_in_future(ds: Dataset, now: datetime) -> bool:
    d = _text(ds, "StudyDate")[:8]
    try:
        return datetime.strptime(d, "%Y%m%d") > now + FUTURE_GRACE
    except ValueError:
        return False


def _fact_problem(ds: Dataset, *, patients: set[str] | None, seen: set[str], now: datetime) -> str | None:
    """The first rule a readable file breaks (see :data:`FILE_REASONS`), or ``None``."""
    mrn = _text(ds, "PatientID").upper()
    if not mrn:
        return "missing_patient_id"
    sop = _text(ds, "SOPInstanceUID")
    if not sop:
        return "missing_sop_instance_uid"
    if patients is not None and mrn not in patients:
        return "unknown_patient"
    if _study_date_in_future(ds, now):
        return "future_date:StudyDate"
    if sop in seen:
        return "duplicate_instance"
    return None


def _quarantine(zones: ZonePaths, batch_dir: Path, batch_id: str, name: str, exc: FileRejected, *,
                row_number: int, sha: str | None) -> str:  # fmt: skip
    """Copy a rejected file into ``quarantine/<batch>/imaging/`` (unless :data:`_NOT_COPIED`) beside its
    reason; returns where, relative to the quarantine zone. A name that is not plain is replaced by the
    file's number."""
    folder = zones.quarantine / batch_id / IMAGING_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    plain = name.partition("/")[2]
    base = plain if safe_name(plain) else f"file_{row_number}"
    copied = False
    if exc.reason_code not in _NOT_COPIED and listed_entry_problem(batch_dir, name) is None:
        shutil.copyfile(batch_dir / name, folder / base)
        copied = True
    reason = {
        "batch_id": batch_id,
        "source": IMAGING_SOURCE,
        "file": base,
        "row_number": row_number,
        "sha256": sha,
        "reason_code": exc.reason_code,
        "detail": exc.detail,
        "copied": copied,
        "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(reason, folder / f"{base}.reason.json")
    return str((folder / base).relative_to(zones.quarantine))


def batch_patients(zones: ZonePaths, batch_id: str) -> tuple[set[str] | None, str | None]:
    """The normalized MRNs of the batch's accepted patients and their data version; ``None`` when the
    patients file was not accepted (the cross-file check is then skipped, with a warning)."""
    entry = read_ledger_entry(zones, batch_id, "patients") or {}
    part = accepted_path(zones, "patients", batch_id)
    if entry.get("status") != "accepted" or not part.is_file():
        return None, entry.get("data_version")
    mrns = pl.read_parquet(part, columns=["mrn"]).select(normalize_identifier(pl.col("mrn")))["mrn"]
    return set(mrns.drop_nulls().to_list()), entry.get("data_version")


def _delivered_names(batch_dir: Path, listing: Mapping[str, dict] | None) -> list[str]:
    if listing is not None:
        return imaging_names(list(listing))
    folder = batch_dir / IMAGING_FOLDER
    if imaging_folder_problem(batch_dir) is not None:
        return []
    return [
        f"{IMAGING_FOLDER}/{p.name}"
        for p in sorted(folder.iterdir())
        if p.name.lower().endswith(DICOM_SUFFIX)
    ]


def process_imaging(
    *,
    zones: ZonePaths,
    batch_id: str,
    limits: Limits | None = None,
    now: datetime | None = None,
) -> tuple[FileOutcome, pl.DataFrame]:
    """Ingest the imaging folder of batch ``batch_id`` and file the outcome (see the module docstring).

    Run after the batch's patients (their accepted MRNs are what a file's ``PatientID`` must name).

    Returns
    -------
    tuple[FileOutcome, polars.DataFrame]
        The folder's outcome (also written as its ledger entry; ``rows`` are files) and the index of the
        accepted files (:data:`INDEX_SCHEMA`, phi zone).
    """
    limits = limits or Limits()
    now = now or datetime.now(UTC).replace(tzinfo=None)
    batch_dir = zones.landing / batch_id
    listing = read_marker(batch_dir)
    names = _delivered_names(batch_dir, listing)
    patients, patients_version = batch_patients(zones, batch_id)
    acc_path, rej_path = (
        accepted_path(zones, IMAGING_SOURCE, batch_id),
        rejects_path(zones, IMAGING_SOURCE, batch_id),
    )
    common: dict[str, Any] = {
        "batch_id": batch_id,
        "source": IMAGING_SOURCE,
        "accepted_path": str(acc_path.relative_to(zones.phi)),
        "rejects_path": str(rej_path.relative_to(zones.phi)),
    }
    upstream = [patients_version, f"imaging_rules={_rules_digest()}"]
    if not names:
        ledger_entry_path(zones, batch_id, IMAGING_SOURCE).unlink(missing_ok=True)
        outcome = FileOutcome(
            **common, status="not_delivered", file=None, sha256=None, n_bytes=0, rows_in=0, rows_accepted=0,
            rows_rejected=0, rejected_by_reason={}, warnings={}, data_version=_data_version(None, upstream),
            detail="the batch has no imaging files (optional)",
        )  # fmt: skip
        write_parquet(empty_index(), acc_path)
        write_parquet(empty_rejects(), rej_path)
        return outcome, empty_index()
    accepted: list[dict] = []
    rejects: list[dict] = []
    warnings_: Counter = Counter()
    seen: set[str] = set()
    shas: list[str] = []
    total = 0
    if patients is None:
        warnings_["cross_file_checks_skipped"] = len(names)
    for row_number, name in enumerate(names, start=1):
        path = batch_dir / name
        sha: str | None = None
        try:
            problem = listed_entry_problem(batch_dir, name)
            if problem is not None:
                raise FileRejected(problem, FILE_REASONS.get(problem, problem))
            n_bytes = check_size(path, limits=limits)
            total += n_bytes
            listed = (listing or {}).get(name, {})
            if listing is not None and listed.get("bytes") != n_bytes:
                raise FileRejected("incomplete_file", FILE_REASONS["incomplete_file"], byte_offset=n_bytes)
            sha = sha256_file(path)
            shas.append(f"{name}={sha}")
            if listed.get("sha256") and listed["sha256"] != sha:
                raise FileRejected("checksum_mismatch", FILE_REASONS["checksum_mismatch"])
            if not listed.get("sha256"):
                warnings_["integrity_not_checked"] += 1
            ds = read_dicom(path)
            problem = _fact_problem(ds, patients=patients, seen=seen, now=now)
            if problem is not None:
                raise FileRejected(problem, FILE_REASONS[problem])
            first = _first_delivery(zones, sha)
            if first is not None and first["first_batch_id"] != batch_id:
                raise FileRejected("duplicate_delivery", FILE_REASONS["duplicate_delivery"])
        except FileRejected as exc:
            if exc.reason_code != "duplicate_delivery":
                _quarantine(zones, batch_dir, batch_id, name, exc, row_number=row_number, sha=sha)
            rejects.append({"row_number": row_number, "reason": exc.reason_code})
            continue
        seen.add(_text(ds, "SOPInstanceUID"))
        if not _text(ds, "StudyDate"):
            warnings_["no_study_date"] += 1
        archived = _archive(zones, path, sha, batch_id, IMAGING_SOURCE)
        accepted.append(
            {
                "row_number": row_number,
                "file": name,
                "sha256": sha,
                "n_bytes": n_bytes,
                "archived_as": str(archived.relative_to(zones.archive)),
                "mrn": _text(ds, "PatientID").upper(),
                "admission_id": _text(ds, "AdmissionID").upper() or None,
                "sop_instance_uid": _text(ds, "SOPInstanceUID"),
                "modality": _text(ds, "Modality").upper() or None,
            }
        )
    index = pl.DataFrame(accepted, schema=INDEX_SCHEMA) if accepted else empty_index()
    reject_frame = pl.DataFrame(rejects, schema=empty_rejects().schema) if rejects else empty_rejects()
    by_reason = dict(Counter(r["reason"] for r in rejects))
    folder_sha = hashlib.sha256("\n".join(sorted(shas)).encode()).hexdigest()
    outcome = FileOutcome(
        **common, status="accepted", file=f"{IMAGING_FOLDER}/", sha256=folder_sha, n_bytes=total,
        rows_in=len(names), rows_accepted=index.height, rows_rejected=reject_frame.height,
        rejected_by_reason=dict(sorted(by_reason.items())), warnings=dict(sorted(warnings_.items())),
        data_version=_data_version(folder_sha, upstream),
    )  # fmt: skip
    write_parquet(index, acc_path)
    write_parquet(reject_frame, rej_path)
    write_json(outcome.ledger_row(), ledger_entry_path(zones, batch_id, IMAGING_SOURCE))
    return outcome, index


def _rules_digest() -> str:
    return hashlib.sha256(json.dumps(sorted(FILE_REASONS)).encode()).hexdigest()[:12]


def accepted_instances(zones: ZonePaths, batch_id: str) -> list[ImagingInstance]:
    """The batch's accepted DICOM files in the archive (phi zone), in delivery order, with the keys the
    index recorded at ingestion; no file is read here."""
    part = accepted_path(zones, IMAGING_SOURCE, batch_id)
    if not part.is_file():
        return []
    return [
        ImagingInstance(
            str(row["row_number"]), zones.archive / row["archived_as"], row["mrn"], row["admission_id"]
        )
        for row in pl.read_parquet(part).sort("row_number").iter_rows(named=True)
    ]


def staging_folder(folder: Path) -> Path:
    """Where a batch's de-identified files are staged before :func:`publish_imaging` moves them into
    ``folder``: a hidden sibling, so readers never see half a batch (and :func:`withdraw_imaging` and the
    readers of ``deid/imaging`` skip it)."""
    return folder.with_name(f".{folder.name}.staged")


def publish_imaging(release: ImagingRelease | None, folder: Path, *, released: bool) -> int:
    """Put a batch's staged de-identified DICOM files (:func:`clinical_ml.core.dicom.stage_imaging`) in
    ``folder`` (``<subject_id>/<name>``), replacing what an earlier run of the batch published; when the batch
    is not released or has nothing to release, remove the folder and the staged files. The staged folder is
    swapped in whole, so readers never see half a batch. Returns the number of files published."""
    staged = release.staged if release is not None else None
    written = 0
    if released and staged is not None and staged.is_dir():
        written = sum(
            1 for p in staged.rglob(f"*{DICOM_SUFFIX}") if p.is_file() and not p.name.startswith(".")
        )
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    if written and staged is not None:
        os.replace(staged, folder)
    elif staged is not None:
        shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(staging_folder(folder), ignore_errors=True)  # one a killed run left behind
    shutil.rmtree(old, ignore_errors=True)
    return written


def withdraw_imaging(root: Path, subjects: pl.Series) -> int:
    """Remove the released DICOM files of ``subjects`` (pseudonyms) from every batch under ``root``
    (``deid/imaging``); returns how many files were removed."""
    if subjects.len() == 0 or not root.is_dir():
        return 0
    removed = 0
    for batch in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for subject in subjects.cast(pl.String).to_list():
            folder = batch / subject
            if folder.is_dir():
                removed += sum(1 for p in folder.iterdir() if p.is_file())
                shutil.rmtree(folder)
    return removed
