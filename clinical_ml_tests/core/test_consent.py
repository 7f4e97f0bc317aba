"""The opt-out register (issue #16 item 4): read strictly, applied at the boundary, withdrawn after release."""

from datetime import datetime

import polars as pl
import pytest

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.consent import (
    ConsentRegisterError,
    objecting_subjects,
    read_register,
    withdraw_released,
)
from clinical_ml.core.pseudonyms import HmacKey, hmac_ids
from clinical_ml.core.storage import write_parquet


def test_the_register_is_read_with_normalized_mrns_and_a_missing_file_is_empty(tmp_path):
    path = tmp_path / "opt_out.csv"
    assert read_register(path).len() == 0
    path.write_text(
        "\ufeffMRN,Objected_On,comment\n mrn-001 ,2026-01-05,by letter\n\nMRN-001,2026-02-01,\nq77,2026-03-01,x\n"
    )
    assert read_register(path).to_list() == ["MRN-001", "Q77"]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("mrn\nA1\n", "lacks the column(s) objected_on"),
        ("mrn,objected_on\n,2026-01-01\n", "line 2: the MRN is empty"),
        ("mrn,objected_on\nSECRET-MRN-9,yesterday\n", "line 2: objected_on is not a date"),
    ],
)
def test_a_register_that_cannot_be_read_stops_with_the_line_never_the_value(tmp_path, text, words):
    path = tmp_path / "opt_out.csv"
    path.write_text(text)
    with pytest.raises(ConsentRegisterError) as err:
        read_register(path)
    assert words in str(err.value) and "SECRET" not in str(err.value) and "yesterday" not in str(err.value)


def test_objecting_patients_are_found_by_their_pseudonym_in_either_mode():
    vault = Vault(
        pl.DataFrame({"mrn": ["A1", "B2"], "subject_id": [11, 22], "shift_days": [7, -7]}),
        pl.DataFrame(
            {"encounter_id": [], "hadm_id": []}, schema={"encounter_id": pl.String, "hadm_id": pl.Int64}
        ),
    )
    mrns = pl.Series("mrn", ["B2", "ZZ"])
    assert objecting_subjects(mrns, vault=vault, hmac_key=None).to_list() == [22]  # ZZ never delivered
    key = HmacKey(b"k" * 40)
    assert (
        objecting_subjects(mrns, vault=vault, hmac_key=key).to_list()
        == hmac_ids(mrns, key=key, kind="subject").to_list()
    )


def test_withdrawal_removes_the_patients_rows_from_every_table_and_touches_no_other_file(tmp_path):
    root = tmp_path / "deid"
    write_parquet(pl.DataFrame({"subject_id": [1, 2, 3]}), root / "patients" / "b1.parquet")
    write_parquet(
        pl.DataFrame({"subject_id": [1, 3], "hadm_id": [10, 30]}), root / "encounters" / "b1.parquet"
    )
    write_parquet(
        pl.DataFrame({"subject_id": [2, 3], "hadm_id": [20, 31]}), root / "encounters" / "b2.parquet"
    )
    write_parquet(
        pl.DataFrame({"subject_id": [1, 1, 2], "code": ["a", "b", "c"]}), root / "meds" / "data" / "0.parquet"
    )
    # a use-case table keyed by admission only, and one without the patient
    write_parquet(
        pl.DataFrame({"hadm_id": [10, 20, 30], "x": [1.0, 2.0, 3.0]}),
        root / "usecases" / "uc" / "features.parquet",
    )
    untouched = root / "usecases" / "uc" / "other.parquet"
    write_parquet(pl.DataFrame({"subject_id": [2]}), untouched)
    before = untouched.stat().st_mtime_ns

    out = withdraw_released(root, pl.Series([1, 3]), now=datetime(2026, 12, 6))

    assert out.patients == 2 and out.at.startswith("2026-12-06")
    assert out.rows_removed == {"patients": 2, "encounters": 3, "meds": 2, "use case uc": 2}
    for path in root.rglob("*.parquet"):
        frame = pl.read_parquet(path)
        if "subject_id" in frame.columns:
            assert not frame["subject_id"].is_in([1, 3]).any()
    assert pl.read_parquet(root / "usecases" / "uc" / "features.parquet")["hadm_id"].to_list() == [20]
    assert untouched.stat().st_mtime_ns == before
    assert "4 from" not in out.sentence() and "2 patients" in out.sentence()
    assert withdraw_released(root, pl.Series([1, 3])).removed == 0  # nothing left: idempotent
