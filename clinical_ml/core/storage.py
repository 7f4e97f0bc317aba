"""Small file helpers shared by the stages: atomic writes and the code version for lineage."""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Literal

import polars as pl

# how a table's Parquet file is compressed: zstd (polars's default) or LZ4 (see write_parquet)
ParquetCompression = Literal["zstd", "lz4"]


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def committed(folder: Path, suffix: str) -> list[Path]:
    """Files of ``folder`` ending in ``suffix``, sorted; never a temporary file of an unfinished write (the
    writers here name those with a leading dot, and a glob such as ``*.parquet`` would match them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(suffix) and not p.name.startswith("."))


def sweep_leftovers(root: Path, *, older_than_seconds: float, now: float | None = None) -> list[Path]:
    """Remove the temporary files and folders of writes that never finished (dot-named, nothing in them
    touched for longer than any write takes) anywhere under ``root``: a killed write's temporary file, a
    killed release's staged imaging folder. Returns what was removed, so the caller can say so. Readers never
    read them (see :func:`committed`): this only gives the disk space back and makes the crash visible."""
    cutoff = (time.time() if now is None else now) - older_than_seconds
    removed = []
    for path in sorted(Path(root).rglob(".*")):
        if any(parent in removed for parent in path.parents):
            continue  # inside a folder already removed
        if path.is_file() and path.stat().st_mtime < cutoff:
            path.unlink(missing_ok=True)
            removed.append(path)
        elif path.is_dir() and _newest_mtime(path) < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return sorted(removed)


def _newest_mtime(folder: Path) -> float:
    """When anything in ``folder`` (itself included) was last written: a folder still being filled is young."""
    return max([folder.stat().st_mtime, *(p.stat().st_mtime for p in folder.rglob("*"))])


def write_parquet(df: pl.DataFrame, path: Path, *, compression: ParquetCompression = "zstd") -> Path:
    """``df`` as Parquet at ``path``, atomically; zstd by default (polars's), ``lz4`` where a table is read
    far more often than it is written (about 1.5 times the bytes, read 2 to 3 times faster)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".parquet")
    os.close(fd)
    try:
        df.write_parquet(tmp, statistics=True, compression=compression)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(obj: object, path: Path) -> Path:
    return atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


@cache
def code_version() -> str:
    """The git commit of the code (``+dirty`` when uncommitted changes exist), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return version("clinical-ml")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (delivered files can be gigabytes)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
