"""Fault injection in ingestion (issue 17): a batch's ingestion is killed with SIGKILL at a file-write boundary
(just before or just after the k-th atomic rename of a run: an accepted-rows file, a rejects file, a ledger
entry, an archived original), then run again; the result must equal an uninterrupted run's: every accepted and
rejected row, every ledger entry (but its time), the same archive, and no half-written file among the
committed ones."""

import json
import os
import shutil
import signal
import subprocess
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from clinical_ml.core.delivery import ZonePaths, process_batch
from clinical_ml.core.storage import committed
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml_tests.kill_points import run_killed

pytestmark = pytest.mark.slow

NOW = datetime(2026, 3, 1)
BATCH = "2026-01-05"
# The child's run of ``process_batch`` (clinical_ml_tests.kill_points kills it at the k-th ``os.replace``: before
# it, the temporary file is written, not committed; after it, committed, the next write not begun).
CHILD = """
from datetime import datetime
from pathlib import Path
from clinical_ml.core.delivery import ZonePaths, process_batch
root = Path(ARGS[0])
zones = ZonePaths(landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine",
                  phi=root / "phi")
process_batch(zones=zones, batch_id=ARGS[1], now=datetime(2026, 3, 1))
"""


def _zones(root: Path) -> ZonePaths:
    return ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine", phi=root / "phi"
    )


def _child(root: Path, k: int, when: str) -> subprocess.CompletedProcess:
    return run_killed(
        CHILD, k=k, when=when, args=[str(root), BATCH], script=root.parent / f"{root.name}_child.py"
    )


def _state(root: Path) -> dict[str, object]:
    """Everything a reader of the zones sees: committed Parquet frames, ledger entries without their time,
    the archive's file names."""
    zones = _zones(root)
    out: dict[str, object] = {}
    for kind in ("raw", "rejects", "unmapped"):
        for folder in sorted((zones.phi / kind).glob("*")):
            for p in committed(folder, ".parquet"):
                out[f"{kind}/{folder.name}/{p.name}"] = pl.read_parquet(p).to_dicts()
    for p in sorted((zones.archive / "ledger").rglob("*.json")):
        if not p.name.startswith("."):
            entry = json.loads(p.read_text())
            entry.pop("recorded_at", None)
            out[str(p.relative_to(zones.archive))] = entry
    out["archive"] = sorted(p.name for p in committed(zones.archive / "files", ""))
    return out


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object], int]:
    root = tmp_path_factory.mktemp("reference")
    generate_hospital(root / "landing", SyntheticConfig(n_patients=40, n_batches=1, seed=13))
    done = _child(root, -1, "count")
    assert done.returncode == 0, done.stderr[-2000:]
    return root / "landing", _state(root), int(done.stdout.split()[-1])


def test_the_reference_run_writes_through_renames(hospital):
    _, reference, n_renames = hospital
    assert n_renames >= 10 and any(k.startswith("raw/") for k in reference)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.45, 0.7, 0.95])
def test_a_run_killed_at_a_write_then_run_again_gives_the_same_data(hospital, when, fraction, tmp_path: Path):
    landing, reference, n_renames = hospital
    k = min(int(fraction * n_renames), n_renames - 1)
    shutil.copytree(landing, tmp_path / "landing")
    killed = _child(tmp_path, k, when)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    process_batch(zones=_zones(tmp_path), batch_id=BATCH, now=NOW)  # the rerun
    assert _state(tmp_path) == reference
    leftovers = [p for p in tmp_path.rglob(".*") if p.is_file()]
    assert all(p.name.startswith(".") for p in leftovers)  # at most the dot-named temporary file of the kill
    assert len(leftovers) <= (1 if when == "before" else 0)
    assert os.listdir(tmp_path / "landing" / BATCH) == os.listdir(
        landing / BATCH
    )  # the landing zone untouched
