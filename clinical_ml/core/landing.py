"""Finding complete batches in the landing zone without trusting half-copied files.

A batch folder is complete when its ``_SUCCESS`` marker lists every file with its size (and sha256) and the
files on disk have those sizes; or, without a marker, when the names, sizes and modification times of its files
stayed the same across two checks and nothing changed for a quiet period. A batch is identified by a content
hash over its file names, sizes and sha256s, so the same delivery copied again hashes the same and changed
content hashes differently. The landing zone is only ever read.
"""

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from clinical_ml.core.safety import safe_name
from clinical_ml.core.storage import sha256_file

COMPLETION_MARKER = "_SUCCESS"
SOURCES = ("patients", "encounters", "labs", "vitals", "labels")
# Sources a batch may leave out without being incomplete: hospital-supplied labels (e.g. from chart review).
OPTIONAL_SOURCES = ("labels",)
DATA_SUFFIXES = (".csv", ".parquet", ".zip")


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
        Listed plain file names.
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


def read_marker(batch_dir: Path) -> dict[str, dict] | None:
    """The file listing of a batch's completion marker, or ``None`` when absent or unreadable."""
    marker = batch_dir / COMPLETION_MARKER
    try:
        if not stat.S_ISREG(os.lstat(marker).st_mode):
            return None  # a symlinked or special marker is not trusted
    except FileNotFoundError:
        return None
    try:
        listing = json.loads(marker.read_bytes())["files"]
        return {
            str(k): {"bytes": int(v["bytes"]), "sha256": str(v.get("sha256", ""))} for k, v in listing.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


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


def read_batch(batch_dir: Path) -> LandingBatch | None:
    """A batch with a completion marker, complete when every plainly named file it lists exists with the listed
    size. Returns ``None`` for an incomplete batch or one without a usable marker."""
    listing = read_marker(batch_dir)
    if listing is None:
        return None
    problems = []
    for name, info in listing.items():
        if not safe_name(name):
            problems.append("odd_file_name")  # never opened: a listed '../x' must not reach the file system
            continue
        f = batch_dir / name
        problem = entry_problem(f)
        if problem == "file_missing":
            return None
        if problem is not None:
            problems.append(problem)
            continue
        if f.stat().st_size != info["bytes"]:
            return None  # still being copied
    for p in batch_dir.iterdir():
        if p.name != COMPLETION_MARKER and p.name not in listing:
            problems.append(entry_problem(p) or "unlisted_file")
    return LandingBatch(
        batch_dir.name,
        _listing_hash(listing),
        tuple(sorted(n for n in listing if safe_name(n))),
        tuple(sorted(problems)),
    )


def fingerprint(batch_dir: Path) -> tuple[str, float]:
    """Hash over names, sizes and modification times of a folder's entries, and the newest modification time."""
    rows = []
    newest = 0.0
    for p in sorted(batch_dir.iterdir()):
        st = os.lstat(p)
        rows.append((p.name, st.st_size, st.st_mtime_ns))
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
        problem = entry_problem(p)
        if problem is not None:
            problems.append(problem)
        elif p.name.startswith(SOURCES) and p.name.endswith(DATA_SUFFIXES):
            listing[p.name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        else:
            problems.append("unlisted_file")
    if not listing:
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
