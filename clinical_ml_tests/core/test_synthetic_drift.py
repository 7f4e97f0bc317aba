"""Every change the drift scenario's manifest declares is in the exports it writes.

Each declared change is found by comparing the hospital with the same hospital written without that one change
(same seed: every other draw is the same), so a change that never reaches the files (an age shift applied to
the admissions but not to the birth dates, say) fails here, and one that leaks into earlier batches too."""

import dataclasses
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.synthetic import DRIFT_CHANGES, SyntheticConfig, SyntheticHospital, generate_hospital

CFG = SyntheticConfig(
    n_patients=400, n_batches=3, seed=4, scenario="drift", drift_from_batch=1, days_per_batch=2
)
DAY = 365.25


@pytest.fixture(scope="module")
def drifted(tmp_path_factory) -> SyntheticHospital:
    return generate_hospital(tmp_path_factory.mktemp("drifted"), CFG)


def _read(root: Path, batch: str, source: str) -> pl.DataFrame:
    return pl.read_csv(root / batch / f"{source}.csv", infer_schema=False)


def _first_admissions(root: Path, batch_ids: tuple[str, ...]) -> pl.DataFrame:
    """Each patient's first admission in the exports: MRN, admission time, batch index, died in hospital."""
    enc = pl.concat(
        _read(root, b, "encounters").with_columns(pl.lit(i).alias("batch")) for i, b in enumerate(batch_ids)
    )
    return (
        enc.sort("admit_time")
        .group_by("mrn", maintain_order=True)
        .first()
        .select("mrn", "admit_time", "batch", pl.col("death_time").is_not_null().alias("died"))
        .sort("mrn")
    )


def _birth_dates(root: Path, batch_ids: tuple[str, ...]) -> pl.DataFrame:
    return (
        pl.concat(_read(root, b, "patients").select("mrn", "birth_date") for b in batch_ids)
        .unique()
        .with_columns(pl.col("birth_date").str.to_date())
        .sort("mrn")
    )


def _assay_change(change: dict, first: int, drifted: SyntheticHospital, without: Path) -> None:
    for i, batch in enumerate(drifted.batch_ids):
        with_, plain = _read(drifted.root, batch, "labs"), _read(without, batch, "labs")
        assert with_.drop("value").equals(plain.drop("value"))  # the same draws, only values move
        code = (with_["loinc_code"] == change["loinc_code"]).to_numpy()
        assert code.any()
        assert set(with_.filter(pl.Series(code))["unit"]) == {change["unit"]}
        moved = with_["value"].cast(pl.Float64).to_numpy() - plain["value"].cast(pl.Float64).to_numpy()
        expected = change["shift"] if i >= first else 0.0
        # each value is written to 2 decimals, so a difference may be off by 0.01
        np.testing.assert_allclose(moved[code], expected, atol=0.0101)
        assert not moved[~code].any()  # no other lab moves


def _age_shift(change: dict, first: int, drifted: SyntheticHospital, without: Path) -> None:
    ids = drifted.batch_ids
    admitted = _first_admissions(drifted.root, ids)
    births = _birth_dates(drifted.root, ids).join(
        _birth_dates(without, ids), on="mrn", suffix="_without", how="full", coalesce=True
    )
    assert births.null_count().sum_horizontal().item() == 0  # the same patients, one birth date each
    rows = births.join(admitted, on="mrn")
    assert rows.height == births.height
    start = date.fromisoformat(ids[0])
    age_without = np.array([(start - d).days / DAY for d in rows["birth_date_without"]])
    older = np.array(
        [(w - d).days / DAY for d, w in zip(rows["birth_date"], rows["birth_date_without"], strict=True)]
    )
    new = rows["batch"].to_numpy() >= first
    assert new.sum() > 50 and (~new).sum() > 50
    # a birth date is a whole day: the shift is exact to within two days
    expected = np.minimum(change["age_years"], change["max_age_years"] - age_without)
    np.testing.assert_allclose(older[new], expected[new], atol=2 / DAY)
    assert not older[~new].any()  # patients first admitted before the drift keep their age
    assert np.median(older[new]) == pytest.approx(change["age_years"], abs=2 / DAY)


def _severity_shift(change: dict, first: int, drifted: SyntheticHospital, without: Path) -> None:
    ids = drifted.batch_ids
    with_, plain = _first_admissions(drifted.root, ids), _first_admissions(without, ids)
    assert with_.select("mrn", "admit_time", "batch").equals(plain.select("mrn", "admit_time", "batch"))
    new = with_["batch"].to_numpy() >= first
    died, died_without = with_["died"].to_numpy(), plain["died"].to_numpy()
    assert (died[~new] == died_without[~new]).all()  # before the drift, the same admissions die
    assert died[new].sum() > died_without[new].sum()  # sicker from the drift on: more die


CHECKS: dict[str, Callable[[dict, int, SyntheticHospital, Path], None]] = {
    "assay_change": _assay_change,
    "age_shift": _age_shift,
    "severity_shift": _severity_shift,
}


def test_the_manifest_declares_every_change_injected_and_each_has_a_check(drifted):
    declared = [c["kind"] for c in drifted.manifest["drift"]["changes"]]
    assert declared == list(CFG.drift_changes) == list(DRIFT_CHANGES)
    assert set(CHECKS) == set(declared)
    assert drifted.manifest["drift"]["first_batch_id"] == drifted.batch_ids[CFG.drift_from_batch or 0]


@pytest.mark.parametrize("kind", DRIFT_CHANGES)
def test_each_declared_change_is_in_the_written_data_from_its_first_batch_only(drifted, tmp_path, kind):
    change = next(c for c in drifted.manifest["drift"]["changes"] if c["kind"] == kind)
    others = tuple(k for k in DRIFT_CHANGES if k != kind)
    without = generate_hospital(tmp_path, dataclasses.replace(CFG, drift_changes=others))
    assert [c["kind"] for c in without.manifest["drift"]["changes"]] == list(others)
    CHECKS[kind](change, drifted.manifest["drift"]["first_batch_index"], drifted, without.root)


def test_an_unknown_drift_change_is_refused():
    with pytest.raises(ValueError, match="unknown drift change"):
        SyntheticConfig(scenario="drift", drift_changes=("assay_change", "moon_phase"))  # type: ignore[arg-type]
