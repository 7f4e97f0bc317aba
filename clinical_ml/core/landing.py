"""Finding complete batches in the landing zone without trusting half-copied files."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

COMPLETION_MARKER = "_SUCCESS"


@dataclass(frozen=True)
class LandingBatch:
    batch_id: str
    content_hash: str  # sha256 over the marker, which lists every file's sha256 and size
    files: tuple[str, ...]


def read_batch(batch_dir: Path) -> LandingBatch | None:
    """A batch is complete when its completion marker exists, parses, and every file it lists exists with
    the listed size. Returns ``None`` for an incomplete batch."""
    marker = batch_dir / COMPLETION_MARKER
    if not marker.is_file():
        return None
    raw = marker.read_bytes()
    try:
        listing = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError):
        return None
    for name, info in listing.items():
        f = batch_dir / name
        if Path(name).name != name or not f.is_file() or f.stat().st_size != int(info["bytes"]):
            return None
    return LandingBatch(batch_dir.name, hashlib.sha256(raw).hexdigest(), tuple(sorted(listing)))


def find_complete_batches(landing: Path) -> list[LandingBatch]:
    """Complete batches under ``landing`` in name order (ISO dates sort chronologically)."""
    if not landing.is_dir():
        return []
    out = []
    for d in sorted(p for p in landing.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        b = read_batch(d)
        if b is not None:
            out.append(b)
    return out
