from datetime import date, datetime

import numpy as np
import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from clinical_ml.core.anonymization import (
    DEID_COLUMNS,
    RESTRICTED_ZIP3,
    Vault,
    age_in_years,
    anonymize_batch,
    generalize_zip,
)
from clinical_ml.core.ingestion import ingest_file
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital


def _batches(tmp_path, n_batches=2):
    h = generate_hospital(tmp_path, SyntheticConfig(n_patients=400, n_batches=n_batches, seed=21))
    return [
        {
            s: ingest_file(tmp_path / b / f"{s}.csv", s).accepted
            for s in ("patients", "encounters", "labs", "vitals")
        }
        for b in h.batch_ids
    ], h.batch_ids


def test_only_allowlisted_columns_leave_and_the_same_patient_keeps_one_pseudonym(tmp_path):
    raws, ids = _batches(tmp_path)
    vault = Vault.empty()
    outs = []
    for raw, bid in zip(raws, ids, strict=True):
        out = anonymize_batch(**raw, vault=vault, batch_id=bid, rng=np.random.default_rng(0))
        vault = out.vault
        outs.append(out)
        assert tuple(out.patients.columns) == DEID_COLUMNS["patients"]
        assert tuple(out.encounters.columns) == DEID_COLUMNS["encounters"]
        assert "note" in out.dropped_columns["encounters"]
    both = set(raws[0]["patients"]["mrn"]) & set(raws[1]["patients"]["mrn"])
    assert both, "the synthetic hospital readmits some patients in a later batch"
    mapping = dict(zip(vault.patients["mrn"], vault.patients["subject_id"], strict=True))
    assert vault.patients["subject_id"].n_unique() == vault.patients.height
    for mrn in both:
        sid = mapping[mrn]
        assert sid in set(outs[0].patients["subject_id"]) and sid in set(outs[1].patients["subject_id"])


def test_dates_shift_by_whole_weeks_and_intervals_are_preserved(tmp_path):
    raws, ids = _batches(tmp_path, 1)
    out = anonymize_batch(**raws[0], vault=Vault.empty(), batch_id=ids[0])
    raw = raws[0]["encounters"].join(out.vault.encounters, on="encounter_id")
    joined = raw.join(out.encounters, on="hadm_id", suffix="_deid")
    shift = (joined["admit_time_deid"] - joined["admit_time"]).dt.total_seconds()
    assert (shift % (7 * 86400) == 0).all() and (shift != 0).all()
    assert (
        (joined["discharge_time_deid"] - joined["admit_time_deid"])
        == (joined["discharge_time"] - joined["admit_time"])
    ).all()
    assert (joined["admit_time_deid"].dt.weekday() == joined["admit_time"].dt.weekday()).all()


@given(st.integers(min_value=0, max_value=120), st.integers(min_value=1, max_value=364))
def test_age_is_completed_years_capped_at_90(age, day_of_year):
    at = datetime(2026, 1, 1) + (datetime(2026, 12, 31) - datetime(2026, 1, 1)) * (day_of_year / 365)
    birth = date(at.year - age, at.month, min(at.day, 28))
    got = pl.select(age_in_years(pl.lit(birth), pl.lit(at))).item()
    assert got == min(age, 90)


def test_zip_generalization():
    zips = ["02139", "03601", "90210-1234", "abcde", None, *[f"{z}12" for z in sorted(RESTRICTED_ZIP3)]]
    got = pl.select(generalize_zip(pl.Series(zips, dtype=pl.String))).to_series().to_list()
    assert got[:5] == ["021", "000", "902", None, None]
    assert set(got[5:]) == {"000"}
