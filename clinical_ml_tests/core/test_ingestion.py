import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinical_ml.core.ingestion import FileRejected, ingest_file

LABS_HEADER = "encounter_id,loinc_code,lab_name,value,unit,specimen_time,result_time\n"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_creatinine_in_umol_per_l_is_harmonized_and_raw_value_kept(tmp_path):
    p = _write(
        tmp_path,
        "labs.csv",
        LABS_HEADER
        + "E0001,2160-0,Creatinine,88.42,umol/L,2026-01-05 10:00:00,2026-01-05 11:00:00\n"
        + "E0001,2160-0,Creatinine,1.5,mg/dL,2026-01-05 12:00:00,2026-01-05 13:00:00\n",
    )
    r = ingest_file(p, "labs")
    assert r.rows_accepted == 2
    assert r.accepted["value"].to_list() == pytest.approx([1.0, 1.5])
    assert r.accepted["value_raw"].to_list() == [88.42, 1.5]
    assert r.accepted["unit"].to_list() == ["mg/dL", "mg/dL"]


def test_bad_rows_are_rejected_with_reasons_and_accounted_for(tmp_path):
    p = _write(
        tmp_path,
        "labs.csv",
        LABS_HEADER
        + "E0001,2160-0,Creatinine,1.1,mg/dL,2026-01-05 10:00:00,2026-01-05 11:00:00\n"
        + "E0001,2160-0,Creatinine,1.1,mmol/mol,2026-01-05 10:00:00,2026-01-05 11:00:00\n"
        + "E0001,2160-0,Creatinine,abc,mg/dL,2026-01-05 10:00:00,2026-01-05 11:00:00\n"
        + "E0001,9999-9,Mystery,1.0,mg/dL,2026-01-05 10:00:00,2026-01-05 11:00:00\n"
        + "E0001,2160-0,Creatinine,1.2,mg/dL,2026-01-05 10:00:00,2026-01-05 09:00:00\n",
    )
    r = ingest_file(p, "labs")
    assert r.rows_in == 5
    assert r.rows_accepted + r.rows_rejected == r.rows_in
    assert dict(zip(r.rejects["row_number"], r.rejects["reason"], strict=True)) == {
        2: "unknown_unit",
        3: "unparseable_value",
        4: "not_allowed:loinc_code",
        5: "result_before_specimen",
    }


def test_implausible_values_are_flagged_not_dropped(tmp_path):
    p = _write(
        tmp_path,
        "vitals.csv",
        "encounter_id,code,value,unit,charted_time,stored_time\n"
        "E0001,heart_rate,950,/min,2026-01-05 10:00:00,2026-01-05 10:05:00\n"
        "E0001,temperature,98.6,[degF],2026-01-05 10:00:00,2026-01-05 10:05:00\n",
    )
    r = ingest_file(p, "vitals")
    assert r.accepted["implausible"].to_list() == [True, False]
    assert r.accepted["value"][1] == pytest.approx(37.0)


def test_missing_columns_reject_the_whole_file_without_values(tmp_path):
    p = _write(tmp_path, "labs.csv", "encounter_id,value\nE0001,secret-value\n")
    with pytest.raises(FileRejected) as err:
        ingest_file(p, "labs")
    assert err.value.reason_code == "missing_columns"
    assert "secret-value" not in str(err.value)


def test_clean_synthetic_batch_is_fully_accepted(tmp_path):
    from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital

    h = generate_hospital(tmp_path, SyntheticConfig(n_patients=100, n_batches=1, seed=1))
    for source in ("patients", "encounters", "labs", "vitals"):
        r = ingest_file(tmp_path / h.batch_ids[0] / f"{source}.csv", source)
        assert r.rows_rejected == 0, (source, r.rejected_by_reason)
        assert isinstance(r.accepted, pl.DataFrame)


@settings(max_examples=50, deadline=None)
@given(
    keys=st.lists(st.text("0123456789AB-", min_size=1, max_size=6), unique=True, max_size=30),
    values=st.lists(st.one_of(st.none(), st.text("0123456789AB-", min_size=1, max_size=6)), max_size=60),
)
def test_encounter_lookup_finds_each_known_id_and_nothing_else(keys, values):
    from clinical_ml.core.ingestion import _row_index_in

    found = _row_index_in(pl.Series(values, dtype=pl.String), pl.Series(keys, dtype=pl.String)).to_list()
    assert found == [keys.index(v) if v in keys else None for v in values]


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(0, 40),
    drop=st.lists(st.integers(1, 40), max_size=15),
    max_slices=st.sampled_from([0, 3, 10_000]),
    shuffled=st.booleans(),
)
def test_rejected_rows_leave_the_accepted_frame_in_order(n, drop, max_slices, shuffled):
    from clinical_ml.core.ingestion import _without_rows

    frame = pl.DataFrame({"row_number": pl.int_range(1, n + 1, dtype=pl.Int64, eager=True)})
    frame = frame.with_columns((pl.col("row_number") * 10).alias("v"))
    if shuffled:
        frame = frame.reverse()
    out = _without_rows(frame, pl.Series(drop, dtype=pl.Int64), max_slices=max_slices)
    expected = frame.filter(~pl.col("row_number").is_in(drop))
    assert out.equals(expected)
