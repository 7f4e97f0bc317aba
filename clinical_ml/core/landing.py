"""Finding complete batches in the landing zone without trusting half-copied files.

A batch folder is complete when its ``_SUCCESS`` marker lists every file with its size (and sha256) and the
files on disk have those sizes; or, without a marker, when the names, sizes and modification times of its files
stayed the same across two checks and nothing changed for a quiet period. A batch is identified by a content
hash over its file names, sizes and sha256s, so the same delivery copied again hashes the same and changed
content hashes differently. The landing zone is only ever read.

A folder whose marker cannot be used (empty, not JSON, a folder or a symlink, digests that are not 64 hex
digits) or whose listed files are absent or of another size is not started: :func:`inspect_batch` says why
(:class:`NotStarted`, a reason code and counts), and :func:`overdue_batches` tells the sensor which of them have
waited past the limit and must be reported. Digests are compared without regard to case (Windows tools write
them in upper case); a file listed without a digest is read, with a warning that its integrity was not checked.

Imaging (PACS) files sit one level down, in the batch's ``imaging/`` folder, and the marker lists them by
their relative path (``imaging/<name>.dcm``) like any other file: they count towards completeness and the
content hash. No other subfolder, and nothing deeper, is ever read.
"""

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from clinical_ml.core.clinical_sources import MORE_SOURCES
from clinical_ml.core.safety import safe_name
from clinical_ml.core.storage import sha256_file

COMPLETION_MARKER = "_SUCCESS"
SOURCES = ("patients", "encounters", "labs", "vitals", "labels", *MORE_SOURCES)
# Sources a batch may leave out without being incomplete: hospital-supplied labels (e.g. from chart review).
# Medications, diagnoses, procedures and device vitals (clinical_ml.core.clinical_sources) are optional too.
OPTIONAL_SOURCES = ("labels", *MORE_SOURCES)
DATA_SUFFIXES = (".csv", ".parquet", ".zip")
SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
# PACS exports: DICOM files in this one subfolder of a batch, listed in the marker as ``imaging/<name>``.
IMAGING_FOLDER = "imaging"
IMAGING_SOURCE = "imaging"
DICOM_SUFFIX = ".dcm"


@dataclass(frozen=True)
class LandingBatch:
    """A complete batch.

    Attributes
    ----------
    batch_id
        The folder name (safe as a partition key and a path part).
    content_hash
        sha256 over the sorted (name, bytes, sha256) listing of its files.
    files
        Listed plain file names, and ``imaging/<name>`` for the files of the imaging folder.
    problems
        Reason codes for entries that will not be read (``odd_file_name``, ``symlink``, ``not_regular_file``),
        one per entry; names are left out because a name can carry anything.
    has_marker
        Whether completeness came from a ``_SUCCESS`` marker (else from stable sizes and times).
    """

    batch_id: str
    content_hash: str
    files: tuple[str, ...]
    problems: tuple[str, ...] = ()
    has_marker: bool = True
    unverified_files: int = 0
    """Listed files without a sha256 in the marker: read, but their integrity was not checked."""


@dataclass(frozen=True)
class NotStarted:
    """A batch folder that cannot be started, and why.

    Attributes
    ----------
    batch_id
        The folder name.
    reason
        ``marker_symlink``, ``marker_not_a_file``, ``marker_empty``, ``marker_invalid_json``,
        ``marker_invalid_listing``, ``marker_invalid_digest``, ``listed_file_missing``, ``size_mismatch``,
        ``files_still_changing`` or ``no_data_files``.
    detail
        What an operator reads: counts only, never a file name (a name can carry anything).
    """

    batch_id: str
    reason: str
    detail: str


def _listing_hash(listing: dict[str, dict]) -> str:
    canon = sorted((name, int(info["bytes"]), str(info.get("sha256", ""))) for name, info in listing.items())
    return hashlib.sha256(json.dumps(canon).encode()).hexdigest()


def entry_problem(path: Path) -> str | None:
    """Why a folder entry will not be read, or ``None`` for a plainly named regular file."""
    if not safe_name(path.name):
        return "odd_file_name"
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "file_missing"
    if stat.S_ISLNK(mode):
        return "symlink"
    if not stat.S_ISREG(mode):
        return "not_regular_file"
    return None


def listed_name_ok(name: str) -> bool:
    """True for a name a marker may list: a plain file name, or ``imaging/<plain file name>``."""
    folder, sep, rest = name.partition("/")
    if not sep:
        return safe_name(name)
    return folder == IMAGING_FOLDER and safe_name(rest)


def imaging_names(files: "tuple[str, ...] | list[str]") -> list[str]:
    """The listed names of a batch's imaging files (``imaging/<name>``), in order."""
    return sorted(n for n in files if n.startswith(f"{IMAGING_FOLDER}/"))


def imaging_folder_problem(batch_dir: Path) -> str | None:
    """Why a batch's imaging folder will not be read (absent, a symlink or not a folder), or ``None``."""
    try:
        mode = os.lstat(batch_dir / IMAGING_FOLDER).st_mode
    except FileNotFoundError:
        return "file_missing"
    if stat.S_ISLNK(mode):
        return "symlink"
    return None if stat.S_ISDIR(mode) else "not_regular_file"


def listed_entry_problem(batch_dir: Path, name: str) -> str | None:
    """:func:`entry_problem` of a listed name (see :func:`listed_name_ok`): for an imaging file, its folder is
    checked first, so a symlinked ``imaging/`` never leads out of the batch."""
    if not listed_name_ok(name):
        return "odd_file_name"
    if "/" in name:
        problem = imaging_folder_problem(batch_dir)
        if problem is not None:
            return problem
    return entry_problem(batch_dir / name)


def _unlisted(batch_dir: Path, listing: dict[str, dict]) -> list[str]:
    """Problems of the entries that the listing does not name (one level down in ``imaging/`` too)."""
    problems = []
    for p in batch_dir.iterdir():
        if p.name == COMPLETION_MARKER or p.name in listing:
            continue
        if p.name == IMAGING_FOLDER and imaging_folder_problem(batch_dir) is None:
            problems += [
                entry_problem(q) or "unlisted_file"
                for q in p.iterdir()
                if f"{IMAGING_FOLDER}/{q.name}" not in listing
            ]
            continue
        problems.append(entry_problem(p) or "unlisted_file")
    return problems


def marker_listing(batch_dir: Path) -> dict[str, dict] | NotStarted | None:
    """The file listing of a batch's completion marker (digests in lower case, ``""`` when not given),
    :class:`NotStarted` when the marker cannot be used, ``None`` when there is none."""
    marker = batch_dir / COMPLETION_MARKER

    def refused(reason: str, detail: str) -> NotStarted:
        return NotStarted(batch_dir.name, reason, detail)

    try:
        mode = os.lstat(marker).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return refused(
            "marker_symlink", f"the {COMPLETION_MARKER} marker is a symbolic link (never followed)"
        )
    if not stat.S_ISREG(mode):
        return refused("marker_not_a_file", f"the {COMPLETION_MARKER} marker is a folder or a special file")
    try:
        data = marker.read_bytes()
    except OSError:
        return refused("marker_not_a_file", f"the {COMPLETION_MARKER} marker cannot be read")
    if not data.strip():
        return refused("marker_empty", f"the {COMPLETION_MARKER} marker is empty; it must list the files")
    try:
        doc = json.loads(data)
    except ValueError:
        return refused("marker_invalid_json", f"the {COMPLETION_MARKER} marker is not JSON")
    files = doc.get("files") if isinstance(doc, dict) else None
    listing: dict[str, dict] = {}
    bad_digests = 0
    for name, info in (files or {}).items() if isinstance(files, dict) else ():
        size = info.get("bytes") if isinstance(info, dict) else None
        size = int(size) if isinstance(size, str) and size.isdigit() else size
        digest = info.get("sha256") if isinstance(info, dict) else None
        if (
            not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
            or not isinstance(digest, str | None)
        ):
            files = None
            break
        if digest and not SHA256_HEX.match(digest):
            bad_digests += 1
        listing[str(name)] = {"bytes": size, "sha256": (digest or "").lower()}
    if not isinstance(files, dict):
        return refused(
            "marker_invalid_listing",
            'the marker has no "files" object of name -> {"bytes": <size>, "sha256": <hex digest>}',
        )
    if bad_digests:
        return refused("marker_invalid_digest", f"{bad_digests} listed sha256 value(s) are not 64 hex digits")
    return listing


def read_marker(batch_dir: Path) -> dict[str, dict] | None:
    """The file listing of a batch's completion marker, or ``None`` when absent or unusable."""
    listing = marker_listing(batch_dir)
    return listing if isinstance(listing, dict) else None


def marker_site_mapping(batch_dir: Path) -> str | None:
    """The site mapping a batch's completion marker names (``"site_mapping": "<name>"``), or ``None``."""
    marker = batch_dir / COMPLETION_MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return None
        name = json.loads(marker.read_bytes()).get("site_mapping")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def inspect_batch(batch_dir: Path) -> LandingBatch | NotStarted | None:
    """A batch with a completion marker: complete when every plainly named file it lists exists with the
    listed size; else why it is not started. ``None`` when the folder has no marker."""
    listing = marker_listing(batch_dir)
    if not isinstance(listing, dict):
        return listing
    problems = []
    missing = differing = 0
    for name, info in listing.items():
        if not listed_name_ok(name):
            problems.append("odd_file_name")  # never opened: a listed '../x' must not reach the file system
            continue
        f = batch_dir / name
        problem = listed_entry_problem(batch_dir, name)
        if problem == "file_missing":
            missing += 1
        elif problem is not None:
            problems.append(problem)
        elif f.stat().st_size != info["bytes"]:
            differing += 1
    if missing:
        return NotStarted(
            batch_dir.name,
            "listed_file_missing",
            f"{missing} of {len(listing)} listed file(s) absent: still being copied, or renamed or removed "
            "after the marker was written",
        )
    if differing:
        return NotStarted(
            batch_dir.name,
            "size_mismatch",
            f"{differing} of {len(listing)} listed file(s) differ in size from the marker: still being copied, "
            "or changed after it was written (line endings converted in transfer, for one)",
        )
    problems += _unlisted(batch_dir, listing)
    return LandingBatch(
        batch_dir.name,
        _listing_hash(listing),
        tuple(sorted(n for n in listing if listed_name_ok(n))),
        tuple(sorted(problems)),
        unverified_files=sum(1 for n, info in listing.items() if listed_name_ok(n) and not info["sha256"]),
    )


def read_batch(batch_dir: Path) -> LandingBatch | None:
    """A complete batch with a usable completion marker, else ``None`` (see :func:`inspect_batch`)."""
    b = inspect_batch(batch_dir)
    return b if isinstance(b, LandingBatch) else None


def line_ending_conversions(batch_dir: Path) -> int:
    """Listed files whose size differs from the marker's by exactly their line count: line ends converted
    between LF and CRLF in transfer (the content is otherwise the same; the batch must be sent again)."""
    listing = read_marker(batch_dir)
    n = 0
    for name, info in (listing or {}).items():
        f = batch_dir / name
        if listed_entry_problem(batch_dir, name) is not None or f.stat().st_size == info["bytes"]:
            continue
        data = f.read_bytes()
        if f.stat().st_size - info["bytes"] in (data.count(b"\r\n"), -data.count(b"\n")):
            n += 1
    return n


def overdue_batches(
    waiting: dict[str, list], observed: dict[str, NotStarted], *, now: float, limit_seconds: float
) -> tuple[dict[str, list], list[NotStarted]]:
    """Which batch folders that are not started have waited past ``limit_seconds`` and are not yet reported.

    Parameters
    ----------
    waiting
        batch id -> ``[first seen (epoch seconds), reason already reported or ""]`` from the last check.
    observed
        The folders not started at this check, with why.
    now
        The time of this check.
    limit_seconds
        How long a folder may wait before it is reported.

    Returns
    -------
    tuple
        The waiting map for the next check (folders started or gone are dropped) and the folders to report
        now: each once per reason, so a folder that changes reason is reported again.
    """
    out: dict[str, list] = {}
    report = []
    for batch_id, why in sorted(observed.items()):
        since, reported = waiting.get(batch_id, [now, ""])
        if now - since >= limit_seconds and reported != why.reason:
            report.append(why)
            reported = why.reason
        out[batch_id] = [since, reported]
    return out, report


def fingerprint(batch_dir: Path) -> tuple[str, float]:
    """Hash over names, sizes and modification times of a folder's entries, and the newest modification time."""
    rows = []
    newest = 0.0
    entries = sorted(batch_dir.iterdir())
    if imaging_folder_problem(batch_dir) is None:  # files still arriving there count too
        entries += sorted((batch_dir / IMAGING_FOLDER).iterdir())
    for p in entries:
        st = os.lstat(p)
        rows.append((str(p.relative_to(batch_dir)), st.st_size, st.st_mtime_ns))
        newest = max(newest, st.st_mtime)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest(), newest


def read_unmarked_batch(
    batch_dir: Path, *, previous_fingerprint: str | None, quiet_seconds: float, now: float | None = None
) -> tuple[LandingBatch | None, str]:
    """A batch without a marker: complete when its fingerprint equals the previous check's and nothing changed
    for ``quiet_seconds``. Returns the batch (or ``None``) and the fingerprint to remember for the next check."""
    fp, newest = fingerprint(batch_dir)
    now = time.time() if now is None else now
    if fp != previous_fingerprint or now - newest < quiet_seconds:
        return None, fp
    listing: dict[str, dict] = {}
    problems = []
    for p in sorted(batch_dir.iterdir()):
        if p.name == IMAGING_FOLDER and imaging_folder_problem(batch_dir) is None:
            for q in sorted(p.iterdir()):
                problem = entry_problem(q)
                if problem is None and q.name.lower().endswith(DICOM_SUFFIX):
                    listing[f"{IMAGING_FOLDER}/{q.name}"] = {
                        "bytes": q.stat().st_size,
                        "sha256": sha256_file(q),
                    }
                else:
                    problems.append(problem or "unlisted_file")
            continue
        problem = entry_problem(p)
        if problem is not None:
            problems.append(problem)
        elif p.name.startswith(SOURCES) and p.name.endswith(DATA_SUFFIXES):
            listing[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        else:
            problems.append("unlisted_file")
    if not any("/" not in name for name in listing):  # imaging alone is not a batch: no patients to tie it to
        return None, fp
    return LandingBatch(
        batch_dir.name, _listing_hash(listing), tuple(sorted(listing)), tuple(problems), False
    ), fp


def batch_folders(landing: Path) -> tuple[list[Path], int]:
    """Plainly named, real batch folders under ``landing`` in name order, and how many entries were skipped
    (odd names, symlinks, files)."""
    if not landing.is_dir():
        return [], 0
    out, skipped = [], 0
    for p in sorted(landing.iterdir()):
        if p.name.startswith((".", "_")):
            continue
        if safe_name(p.name) and stat.S_ISDIR(os.lstat(p).st_mode):
            out.append(p)
        elif p.name != "manifest.json":
            skipped += 1
    return out, skipped


def find_complete_batches(landing: Path) -> list[LandingBatch]:
    """Complete batches (with a completion marker) under ``landing`` in name order (ISO dates sort
    chronologically)."""
    folders, _ = batch_folders(landing)
    return [b for b in (read_batch(d) for d in folders) if b is not None]
