"""Fault injection in anonymization (issue 17): the release of a batch (:func:`publish_batch`, what the
anonymization asset runs: continuity check, release, vault, privacy record, row account, de-identified tables,
consent record) is killed with SIGKILL just before or just after the k-th atomic rename, then run again. The
second batch is the one killed, so returning patients meet the vault the first batch left. The result must
equal an uninterrupted run's: the same vault, the same pseudonyms and rows in every de-identified table, the
same records; no reader lists a half-written file; every released patient has one pseudonym."""

import json
import shutil
import signal
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from clinical_ml.core.artifacts import DeidStore, PhiStore
from clinical_ml.core.deid_publish import ReleaseSettings, publish_batch
from clinical_ml.core.deid_release import (
    DEID_TABLE_NAMES,
    released_subject_ids,
)
from clinical_ml.core.delivery import ZonePaths, process_batch
from clinical_ml.core.reidentification import RiskPolicy
from clinical_ml.core.storage import committed
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml_tests.kill_points import count_boundaries, run_killed

pytestmark = pytest.mark.slow

NOW = datetime(2026, 3, 1)
SEED = 7  # AnonymizationSettings.pseudonym_seed: surrogates reproducible, so two runs can be compared
# AnonymizationSettings' defaults (risk_scope: cumulative)
POLICY = RiskPolicy(
    k=5, age_bands=(0, 18, 45, 65, 80), races_kept=("White", "Black or African American", "Asian", "Unknown")
)
CHILD = """
from pathlib import Path
from clinical_ml_tests.e2e.test_fault_injection_anonymization import release_one_batch
release_one_batch(Path(ARGS[0]), ARGS[1])
"""


def _zones(root: Path) -> ZonePaths:
    return ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine", phi=root / "phi"
    )


def release_one_batch(root: Path, batch_id: str) -> None:
    """What the anonymization asset runs for one batch (:func:`publish_batch`), with the settings' defaults
    (without imaging, which the synthetic batches here do not hold)."""
    publish_batch(
        paths=_zones(root),
        deid=DeidStore(root / "deid", root / "reports"),
        batch_id=batch_id,
        settings=ReleaseSettings(
            policy=POLICY, pseudonym_mode="vault", hmac_key=None, max_shift_weeks=52, seed=SEED
        ),
    )


def _state(root: Path) -> dict[str, object]:
    """Everything a reader of the zones sees through the stores: the vault, every committed de-identified
    part (its rows in a set order), every committed record."""
    phi, deid = PhiStore(root / "phi"), DeidStore(root / "deid", root / "reports")
    vault = phi.read_vault()
    out: dict[str, object] = {
        "vault/patients": vault.patients.sort("mrn").to_dicts(),
        "vault/encounters": vault.encounters.sort("encounter_id").to_dicts(),
    }
    for table in DEID_TABLE_NAMES:
        for p in deid.table(table).files():
            frame = pl.read_parquet(p)  # events leave unsorted (the MEDS writer sorts): compared as sets
            out[f"{table}/{p.name}"] = frame.sort(frame.columns, nulls_last=True).to_dicts()
    for kind in ("privacy", "accounting", "consent"):
        for p in committed(deid.root / kind, ".json"):
            out[f"{kind}/{p.name}"] = json.loads(p.read_text())
    for p in phi.held.files():  # whom each batch holds back (core.holdback)
        out[f"held/{p.name}"] = pl.read_parquet(p).to_dicts()
    return out


def _listed(root: Path) -> set[Path]:
    """Every file the readers of the de-identified zone and the vault would open."""
    phi, deid = PhiStore(root / "phi"), DeidStore(root / "deid", root / "reports")
    files = {phi.vault_patients.path, phi.vault_encounters.path}
    files |= {p for t in DEID_TABLE_NAMES for p in deid.table(t).files()} | set(phi.held.files())
    return files | {
        p for kind in ("privacy", "accounting", "consent") for p in committed(deid.root / kind, ".json")
    }


def _one_pseudonym_each(root: Path) -> None:
    phi, deid = PhiStore(root / "phi"), DeidStore(root / "deid", root / "reports")
    vault = phi.read_vault().patients
    assert vault["mrn"].is_unique().all() and vault["subject_id"].is_unique().all()
    released = released_subject_ids(deid)
    assert released.is_in(vault["subject_id"].implode()).all()
    for p in deid.patients.files():  # one row per released patient and batch
        assert pl.read_parquet(p)["subject_id"].is_unique().all()


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, object], int]:
    """Two ingested batches, the first released; the reference release of the second and its rename count."""
    base = tmp_path_factory.mktemp("base")
    hospital = generate_hospital(
        base / "landing", SyntheticConfig(n_patients=200, n_batches=2, seed=17, days_per_batch=10)
    )
    first, second = hospital.batch_ids
    for batch in (first, second):
        process_batch(zones=_zones(base), batch_id=batch, now=NOW)
    release_one_batch(base, first)
    reference = tmp_path_factory.mktemp("reference")
    shutil.copytree(base, reference, dirs_exist_ok=True)
    n = count_boundaries(CHILD, args=[str(reference), second], script=reference.parent / "reference_child.py")
    return base, second, _state(reference), n


def _subjects(state: dict[str, object], batch: str) -> set[int]:
    rows = state[f"patients/{batch}.parquet"]
    assert isinstance(rows, list)
    return {r["subject_id"] for r in rows}


def test_the_reference_release_writes_through_renames_and_releases_returning_patients(hospital):
    base, second, reference, n_renames = hospital
    (first,) = (p.name.removesuffix(".parquet") for p in committed(base / "deid" / "patients", ".parquet"))
    assert n_renames >= 8
    record = reference[f"privacy/{second}.json"]
    assert isinstance(record, dict) and record["released"] is True
    assert _subjects(reference, first) & _subjects(reference, second)  # returning patients, one pseudonym


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.5, 0.95])
def test_a_release_killed_at_a_write_then_run_again_gives_the_same_data(hospital, when, fraction, tmp_path):
    base, second, reference, n_renames = hospital
    k = min(int(fraction * n_renames), n_renames - 1)
    root = tmp_path / "zones"
    shutil.copytree(base, root)
    killed = run_killed(CHILD, k=k, when=when, args=[str(root), second], script=tmp_path / "child.py")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [p for p in root.rglob(".*") if p.is_file()]
    assert len(leftovers) <= (1 if when == "before" else 0)
    assert not set(leftovers) & _listed(root)  # no reader lists the killed write's temporary file
    _one_pseudonym_each(root)  # what a reader sees between the kill and the rerun
    release_one_batch(root, second)  # the rerun
    assert _state(root) == reference
    _one_pseudonym_each(root)


def _of_batch(state: dict[str, object], batch: str) -> dict[str, object]:
    return {
        name: value
        for name, value in state.items()
        if name.endswith(f"/{batch}.parquet") or name.endswith(f"/{batch}.json")
    }


def test_a_batch_run_again_counts_the_batches_its_first_run_counted(hospital, tmp_path):
    """A parallel backfill may release a later batch before an earlier one: the later batch's risk was then
    counted without the earlier one. Run again once the earlier batch is out, it counts the same batches as
    its first run did (its privacy record names them), so it gives the same release and the same record."""
    base, second, _, _ = hospital
    (first,) = (p.name.removesuffix(".parquet") for p in committed(base / "deid" / "patients", ".parquet"))
    root = tmp_path / "zones"
    shutil.copytree(base, root)
    shutil.rmtree(root / "deid")  # nothing released yet: the second batch goes out first
    release_one_batch(root, second)
    alone = _of_batch(_state(root), second)
    assert alone[f"privacy/{second}.json"]["batches_counted"] == []  # type: ignore[index]
    release_one_batch(root, first)
    release_one_batch(root, second)  # the rerun, with the first batch now released
    assert _of_batch(_state(root), second) == alone
    # A first run with the first batch out counts it: without its record, the second batch is judged anew.
    (root / "deid" / "privacy" / f"{second}.json").unlink()
    release_one_batch(root, second)
    record = _state(root)[f"privacy/{second}.json"]
    assert record["batches_counted"] == [first] and record["batches_released_before"] == 1  # type: ignore[index]
    _one_pseudonym_each(root)
