"""Sloppy feeds that used to pass silently or cost rows they should not (issue 17 classes 6 and 7): formula
text is counted and neutralised where exported, never a reason to drop a row; implausible birth dates, ids
that differ only in case with other facts, numeric identifiers, zoned timestamps and a batch replaced in place
with fewer rows each get a reason a person sees."""

import shutil
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinical_ml.core.delivery import ZonePaths, process_batch, process_file, replacement_entries
from clinical_ml.core.ingestion import SOURCE_COLUMNS, ingest_file
from clinical_ml.core.safety import FORMULA_START, neutralize_formula
from clinical_ml.core.site_mapping import SiteMapping
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker

NOW = datetime(2026, 3, 1)
BATCH = "2026-01-05"


def _patient(**overrides: str) -> dict[str, str]:
    row = {
        "mrn": "MRN0001", "first_name": "Ann", "last_name": "Lee", "birth_date": "1950-02-03", "sex": "F",
        "race": "White", "ethnicity": "Not Hispanic or Latino", "address": "1 Main St", "zip": "02115",
        "phone": "555-0100", "email": "a@example.org",
    }  # fmt: skip
    return row | overrides


def _patients_csv(tmp_path: Path, rows: list[dict[str, str]], extra: dict[str, str] | None = None) -> Path:
    frame = pl.DataFrame(rows).with_columns(**{k: pl.lit(v) for k, v in (extra or {}).items()})
    p = tmp_path / "patients.csv"
    frame.write_csv(p)
    return p


FORMULA_TEXT = st.builds(
    lambda start, rest: start + rest,
    st.sampled_from(["=", "+", "-", "@", "\t", "\r", "＝", "+1 617 ", "- ", "=HYPERLINK(", "<script>"]),
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00\n"), max_size=20),
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    column=st.sampled_from(["first_name", "last_name", "address", "phone", "email", "note"]),
    text=FORMULA_TEXT,
)
def test_formula_text_in_a_column_that_never_crosses_costs_no_row(column: str, text: str, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formula")
    rows = [_patient(mrn=f"MRN{i:04d}") for i in range(3)]
    if column == "note":
        path = _patients_csv(tmp, rows, extra={"note": text})
    else:
        rows[1][column] = text
        path = _patients_csv(tmp, rows)
    r = ingest_file(path, "patients", now=NOW)
    assert r.rows_rejected == 0, r.rejected_by_reason
    assert r.rows_accepted == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("=1+1", "'=1+1"),
        ("+1 617 555 0100", "'+1 617 555 0100"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("＝1", "'＝1"),
        ("plain", "plain"),
        ("a=1", "a=1"),
        (None, None),
    ],
)
def test_exported_text_is_neutralised_the_owasp_way(text: str | None, expected: str | None):
    out = pl.DataFrame({"v": [text]}, schema={"v": pl.String}).select(neutralize_formula(pl.col("v")))
    assert out.item() == expected
    if expected is not None and expected != text:
        assert not pl.Series([expected]).str.contains(FORMULA_START).item()


@pytest.mark.parametrize(
    ("birth_date", "rejected"),
    [
        ("1870-01-01", True),
        ("0001-01-01", True),
        ("1900-01-01", True),
        ("1906-03-02", False),
        ("1950-02-03", False),
    ],
)
def test_an_implausible_birth_date_is_rejected_with_its_reason(
    birth_date: str, rejected: bool, tmp_path: Path
):
    path = _patients_csv(tmp_path, [_patient(birth_date=birth_date), _patient(mrn="MRN0002")])
    r = ingest_file(path, "patients", now=NOW)
    assert r.rejected_by_reason == ({"implausible_birth_date": 1} if rejected else {})


@pytest.mark.parametrize(
    ("source", "column", "first", "second", "other", "reasons"),
    [
        # the same MRN in two cases with a different sex: which is right is unknown; both rows go, with why
        ("patients", "mrn", "ab1234", "AB1234", {"sex": "M"}, {"conflicting_case_variant:mrn": 2}),
        (
            "patients",
            "mrn",
            " AB1234",
            "ab1234",
            {"birth_date": "1951-01-01"},
            {"conflicting_case_variant:mrn": 2},
        ),
        # the same facts in another case: one patient, the repeat is a duplicate
        ("patients", "mrn", "ab1234", "AB1234", {}, {"duplicate_row": 1}),
        (
            "encounters",
            "encounter_id",
            "enc-0001",
            "ENC-0001",
            {"unit": "MICU"},
            {"conflicting_case_variant:encounter_id": 2},
        ),
        ("encounters", "encounter_id", "enc-0001", "ENC-0001", {}, {"duplicate_row": 1}),
    ],
)
def test_ids_that_differ_only_in_case_are_one_key(
    source, column, first, second, other, reasons, tmp_path: Path
):
    if source == "patients":
        rows = [_patient(mrn=first), _patient(mrn=second, **other)]
    else:
        base = {"mrn": "MRN0001", "admit_time": "2026-01-05 10:00:00", "discharge_time": "2026-01-07 10:00:00",
                "admission_type": "EMERGENCY", "unit": "SICU", "site": "SITE_A",
                "discharge_disposition": "HOME", "death_time": ""}  # fmt: skip
        rows = [base | {"encounter_id": first}, base | {"encounter_id": second} | other]
    path = tmp_path / f"{source}.csv"
    pl.DataFrame(rows).write_csv(path)
    r = ingest_file(path, source, now=NOW)
    assert r.rejected_by_reason == reasons
    assert r.rows_accepted == 2 - sum(reasons.values())


def _vitals_frame(n: int = 3) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "encounter_id": [f"E{i:04d}" for i in range(n)],
            "code": ["heart_rate"] * n,
            "value": [80.0] * n,
            "unit": ["/min"] * n,
            "charted_time": [datetime(2026, 1, 5, 10, i) for i in range(n)],
            "stored_time": [datetime(2026, 1, 5, 10, i + 5) for i in range(n)],
        }
    )


@pytest.mark.parametrize("dtype", [pl.Int64, pl.Int32, pl.UInt64, pl.Float64])
@pytest.mark.parametrize(
    ("source", "column"), [("patients", "mrn"), ("patients", "zip"), ("encounters", "mrn")]
)
def test_an_identifier_typed_as_a_number_in_parquet_is_refused(dtype, source, column, tmp_path: Path):
    frame = pl.DataFrame({c: ["1"] for c in SOURCE_COLUMNS[source]}).with_columns(
        pl.lit(42).cast(dtype).alias(column)
    )
    path = tmp_path / f"{source}.parquet"
    frame.write_parquet(path)
    with pytest.raises(Exception) as err:
        ingest_file(path, source, now=NOW)
    assert getattr(err.value, "reason_code", None) == "numeric_identifier"
    assert column in str(err.value)


@pytest.mark.parametrize(
    ("zone", "site_zone", "expected"),
    [
        (None, None, "2026-01-05 10:00:00"),  # naive: the hospital's wall clock, as a CSV's
        ("UTC", "America/New_York", "2026-01-05 05:00:00"),
        ("Europe/Paris", "America/New_York", "2026-01-05 04:00:00"),
        ("America/New_York", "America/New_York", "2026-01-05 10:00:00"),
        ("UTC", None, "time_zone_undeclared"),
    ],
)
def test_zoned_parquet_timestamps_are_converted_to_the_site_zone_or_refused(
    zone, site_zone, expected, tmp_path
):
    frame = _vitals_frame(1)
    if zone is not None:
        frame = frame.with_columns(pl.col("charted_time", "stored_time").dt.replace_time_zone(zone))
    path = tmp_path / "vitals.parquet"
    frame.write_parquet(path)
    mapping = SiteMapping(name="site", time_zone=site_zone)
    if expected == "time_zone_undeclared":
        with pytest.raises(Exception) as err:
            ingest_file(path, "vitals", now=NOW, mapping=mapping)
        assert getattr(err.value, "reason_code", None) == expected
        return
    r = ingest_file(path, "vitals", now=NOW, mapping=mapping)
    assert r.accepted["charted_time"].dt.strftime("%Y-%m-%d %H:%M:%S").to_list() == [expected]
    assert r.warnings.get("time_zone_converted:charted_time", 0) == (1 if zone else 0)


def test_a_site_time_zone_must_be_a_real_one():
    with pytest.raises(ValueError, match="IANA"):
        SiteMapping(name="x", time_zone="Mars/Olympus")
    assert SiteMapping(name="x").digest() == SiteMapping(name="x", time_zone=None).digest()


@pytest.fixture(scope="module")
def clean_batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    generate_hospital(out, SyntheticConfig(n_patients=40, n_batches=1, seed=11))
    return out / BATCH


def _zones(root: Path) -> ZonePaths:
    return ZonePaths(landing=root / "l", archive=root / "a", quarantine=root / "q", phi=root / "p")


@pytest.mark.parametrize(
    ("source", "drop"), [("encounters", 3), ("patients", 1), ("labs", 5), ("encounters", 0)]
)
def test_a_batch_replaced_in_place_with_fewer_rows_is_refused_and_the_first_kept(
    source: str, drop: int, clean_batch: Path, tmp_path: Path
):
    zones = _zones(tmp_path)
    batch = zones.landing / BATCH
    shutil.copytree(clean_batch, batch)
    first = process_batch(zones=zones, batch_id=BATCH, now=NOW)
    kept = pl.read_parquet(zones.phi / first[source].accepted_path)
    frame = pl.read_csv(batch / f"{source}.csv", infer_schema=False)
    key = "mrn" if source == "patients" else "encounter_id"
    gone = frame[key].unique(maintain_order=True).head(drop)
    replacement = frame.filter(~pl.col(key).is_in(gone.implode()))
    if drop == 0:  # the same rows in another order: a real replacement, accepted
        replacement = replacement.reverse()
    replacement.write_csv(batch / f"{source}.csv")
    write_completion_marker(batch)
    again = process_file(zones=zones, batch_id=BATCH, source=source, now=NOW)[0]
    if drop == 0:
        assert again.status == "accepted"
        assert replacement_entries(zones, BATCH) == []
        return
    assert (again.status, again.reason_code) == ("quarantined", "replacement_drops_rows")
    assert f"{drop} of " in (again.detail or "")
    assert again.data_version == first[source].data_version  # nothing downstream changes
    still = pl.read_parquet(zones.phi / first[source].accepted_path)
    assert still.equals(kept)
    [refused] = replacement_entries(zones, BATCH)
    assert (refused["source"], refused["status"], refused["sha256"]) == (source, "quarantined", again.sha256)
    assert not any(v in (again.detail or "") for v in gone.to_list())


def test_birth_date_limit_moves_with_the_ingestion_date(tmp_path: Path):
    path = _patients_csv(tmp_path, [_patient(birth_date="1906-03-02")])
    assert ingest_file(path, "patients", now=NOW).rows_rejected == 0
    assert ingest_file(path, "patients", now=datetime(2030, 1, 1)).rejected_by_reason == {
        "implausible_birth_date": 1
    }
