"""The bad-input catalogue: every case gives its reason code, nothing crashes, the landing zone is untouched,
every row is accounted for, and no reason or ledger entry carries a patient value."""

import hashlib
import json
import os
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from clinical_ml.core.delivery import ZonePaths, process_batch
from clinical_ml.core.landing import read_batch
from clinical_ml.core.ledger import read_ledger, record_batch
from clinical_ml.core.safety import Limits
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker
from clinical_ml_tests.fixtures.landing.cases import CASES, Case

NOW = datetime(2026, 3, 1)
BASE_BATCH = "2026-01-05"


@pytest.fixture(scope="module")
def clean_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    generate_hospital(out, SyntheticConfig(n_patients=50, n_batches=1, seed=7))
    return out / BASE_BATCH


def _zones(root: Path) -> ZonePaths:
    z = ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine", phi=root / "phi"
    )
    for p in (z.landing, z.archive, z.quarantine, z.phi):
        p.mkdir(parents=True, exist_ok=True)
    return z


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: content hash of files, target of symlinks (never followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = "link:" + os.readlink(p)
            else:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _identifier_values(clean: Path) -> set[str]:
    pts = pl.read_csv(clean / "patients.csv", infer_schema=False)
    values: set[str] = set()
    for col in ("mrn", "phone", "email", "address"):
        values |= {v for v in pts[col].drop_nulls().to_list() if len(v) >= 6}
    return values


def _deliver(clean: Path, root: Path, case: Case) -> ZonePaths:
    zones = _zones(root)
    batch = zones.landing / BASE_BATCH
    shutil.copytree(clean, batch)
    case.damage(batch)
    if case.rewrite_marker:
        write_completion_marker(batch)
    return zones


def test_catalogue_is_large_enough():
    assert len({c.name for c in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_its_reason_and_loses_nothing(case: Case, clean_batch: Path, tmp_path: Path):
    zones = _deliver(clean_batch, tmp_path, case)
    before = _tree(zones.landing)

    outcomes = process_batch(
        zones=zones, batch_id=BASE_BATCH, limits=replace(Limits(), **case.limits), now=NOW
    )  # nothing raises

    assert _tree(zones.landing) == before, "the landing zone must never be modified"
    for o in outcomes.values():
        assert o.rows_in == o.rows_accepted + o.rows_rejected
        assert sum(o.rejected_by_reason.values()) == o.rows_rejected
        assert pl.read_parquet(zones.phi / o.accepted_path).height == o.rows_accepted
        assert pl.read_parquet(zones.phi / o.rejects_path).height == o.rows_rejected
    outcome = outcomes[case.source]
    if case.level == "file":
        assert outcome.status == "quarantined"
        assert outcome.reason_code == case.reason
        reason = json.loads((zones.quarantine / f"{outcome.quarantined_as}.reason.json").read_text())
        assert reason["reason_code"] == case.reason
        assert reason["line"] is not None or reason["byte_offset"] is not None or reason["detail"]
        # The other sources of the batch proceed.
        assert any(o.status == "accepted" and o.rows_accepted > 0 for o in outcomes.values())
    elif case.level == "row":
        assert outcome.status == "accepted"
        assert outcome.rejected_by_reason.get(case.reason, 0) >= 1, outcome.rejected_by_reason
    elif case.level == "warning":
        assert outcome.status == "accepted"
        assert outcome.warnings.get(case.reason, 0) >= 1
        assert outcome.rows_rejected == 0, outcome.rejected_by_reason  # a warning costs no row
    elif case.level == "status":
        assert outcome.status == case.reason
        assert outcome.rows_accepted > 0 and outcome.rows_rejected == 0
    elif case.level == "batch":
        batch = read_batch(zones.landing / BASE_BATCH)
        assert batch is not None and case.reason in batch.problems
        assert all(o.status == "accepted" for o in outcomes.values())

    written = [p for p in (zones.quarantine.rglob("*.json"))] + list(
        (zones.archive / "ledger").rglob("*.json")
    )
    text = "\n".join(p.read_text() for p in written)
    leaked = [v for v in _identifier_values(clean_batch) if v in text]
    assert not leaked, "reason files and ledger entries must not carry identifier values"


def test_same_file_twice_is_ingested_once(clean_batch: Path, tmp_path: Path):
    zones = _zones(tmp_path)
    shutil.copytree(clean_batch, zones.landing / "2026-01-05")
    shutil.copytree(clean_batch, zones.landing / "2026-01-06")
    first = process_batch(zones=zones, batch_id="2026-01-05", now=NOW)
    again = process_batch(zones=zones, batch_id="2026-01-05", now=NOW)  # a rerun of the same batch
    second = process_batch(zones=zones, batch_id="2026-01-06", now=NOW)  # the same files delivered again
    for s in first:
        assert first[s].status == again[s].status == "accepted"
        assert first[s].data_version == again[s].data_version
        assert second[s].status == "duplicate_delivery"
        assert second[s].rows_accepted == 0 and second[s].rows_rejected == second[s].rows_in
    assert len(list((zones.archive / "files").glob("*.csv"))) == 4


def test_corrected_redelivery_is_picked_up(clean_batch: Path, tmp_path: Path):
    zones = _zones(tmp_path)
    batch = zones.landing / BASE_BATCH
    shutil.copytree(clean_batch, batch)
    good = (batch / "labs.csv").read_bytes()
    (batch / "labs.csv").write_bytes(good[:-30])
    write_completion_marker(batch)
    bad = process_batch(zones=zones, batch_id=BASE_BATCH, now=NOW)
    assert bad["labs"].status == "quarantined"
    bad_hash = read_batch(batch).content_hash
    (batch / "labs.csv").write_bytes(good)
    write_completion_marker(batch)
    assert read_batch(batch).content_hash != bad_hash  # the sensor starts a new run for the new content
    fixed = process_batch(zones=zones, batch_id=BASE_BATCH, now=NOW)
    assert fixed["labs"].status == "accepted" and fixed["labs"].rows_accepted > 0
    assert fixed["labs"].data_version != bad["labs"].data_version


def test_ledger_in_duckdb_keeps_every_file_version(clean_batch: Path, tmp_path: Path):
    zones = _zones(tmp_path)
    batch = zones.landing / BASE_BATCH
    shutil.copytree(clean_batch, batch)
    db = zones.archive / "ledger.duckdb"
    for damaged in (True, False):
        if damaged:
            (batch / "vitals.csv").write_bytes(b"")
        else:
            shutil.copyfile(clean_batch / "vitals.csv", batch / "vitals.csv")
        write_completion_marker(batch)
        outcomes = process_batch(zones=zones, batch_id=BASE_BATCH, now=NOW)
        rejects = {
            (s, o.sha256 or ""): pl.read_parquet(zones.phi / o.rejects_path) for s, o in outcomes.items()
        }
        record_batch(db, [o.ledger_row() for o in outcomes.values()], rejects)
        record_batch(db, [o.ledger_row() for o in outcomes.values()], rejects)  # idempotent
    ledger = read_ledger(db, batch_id=BASE_BATCH)
    vitals = ledger.filter(pl.col("source") == "vitals")
    assert sorted(vitals["status"].to_list()) == ["accepted", "quarantined"]
    assert ledger.filter(pl.col("source") != "vitals").height == 3
    assert (ledger["rows_in"] == ledger["rows_accepted"] + ledger["rows_rejected"]).all()
