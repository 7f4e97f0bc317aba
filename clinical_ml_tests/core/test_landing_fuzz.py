"""Fuzzing the landing zone's entry point (``process_file``) with CSV and Parquet bytes: whatever a feed
sends, the file is either accepted with every row accounted for or quarantined with a typed reason written
beside it and in its ledger entry; nothing raises. Bounded in examples so it runs in seconds."""

import io
import json
import tempfile
from datetime import date, datetime
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.core.delivery import ZonePaths, ledger_entry_path, process_file
from clinical_ml.core.ingestion import SOURCE_COLUMNS

NOW = datetime(2026, 3, 1)
BATCH = "2026-01-05"
SOURCES = tuple(SOURCE_COLUMNS)
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is a bug, not bad luck
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Cell text that has broken parsers: separators, quotes, line breaks of every kind, a BOM, NUL, formula
# starts, long runs, non-ASCII.
_CELLS = [
    "", " ", '"', '""', ",", "\r", "\n", "\r\n", "\ufeff", "\x00", "=1+1", "+1 617 555", "-x", "E0001",
    "2026-01-05 10:00:00", "1870-01-01", "0001-01-01", "NaN", "null", "é", "8e3", "0012", "x" * 300,
]  # fmt: skip
CELL = st.one_of(st.sampled_from(_CELLS), st.text(max_size=12))
LINE_END = st.sampled_from(["\n", "\r\n", "\r"])


def _zones(root: Path) -> ZonePaths:
    z = ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine", phi=root / "phi"
    )
    for p in (z.landing / BATCH, z.archive, z.quarantine, z.phi):
        p.mkdir(parents=True, exist_ok=True)
    return z


def _deliver(source: str, suffix: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        zones = _zones(Path(tmp))
        (zones.landing / BATCH / f"{source}{suffix}").write_bytes(data)
        outcome, accepted = process_file(
            zones=zones, batch_id=BATCH, source=source, now=NOW
        )  # nothing raises
        entry = json.loads(ledger_entry_path(zones, BATCH, source).read_text())
        assert entry["status"] == outcome.status
        if outcome.status == "quarantined":
            assert outcome.reason_code and outcome.reason_code == entry["reason_code"]
            reasons = list(zones.quarantine.rglob("*.reason.json"))
            assert [json.loads(r.read_text())["reason_code"] for r in reasons] == [outcome.reason_code]
        else:
            assert outcome.status == "accepted"
            assert outcome.rows_in == outcome.rows_accepted + outcome.rows_rejected
            assert sum(outcome.rejected_by_reason.values()) == outcome.rows_rejected
            assert accepted.height == outcome.rows_accepted


@st.composite
def csv_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    source = draw(st.sampled_from(SOURCES))
    names = list(SOURCE_COLUMNS[source])
    if draw(st.booleans()):
        names.append(draw(st.sampled_from([names[0], "note", "John Smith ", ""])))  # repeated or extra header
    pad = draw(st.sampled_from(["", " ", "\t", '"']))
    header = [f"{pad}{n}{pad.strip()}" if draw(st.booleans()) else n for n in names]
    end = draw(LINE_END)
    n_rows = draw(st.integers(0, 4))
    rows = [[draw(CELL) for _ in range(len(names) + draw(st.integers(-1, 1)))] for _ in range(n_rows)]
    text = end.join(",".join(r) for r in [header, *rows]) + (end if draw(st.booleans()) else "")
    data = (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + text.encode()
    cut = draw(st.integers(0, len(data)))
    data = data[:cut] if draw(st.booleans()) else data
    return source, data


def _column(dtype_kind: str, n: int) -> pl.Series:
    values: dict[str, pl.Series] = {
        "text": pl.Series(["E0001", "0042", None, "=1"][:n] + ["x"] * max(0, n - 4), dtype=pl.String),
        "int": pl.Series(range(n), dtype=pl.Int64),
        "float": pl.Series([float(i) / 3 for i in range(n)], dtype=pl.Float64),
        "bool": pl.Series([i % 2 == 0 for i in range(n)], dtype=pl.Boolean),
        "date": pl.Series([date(1870 + i, 1, 1) for i in range(n)], dtype=pl.Date),
        "naive": pl.Series([datetime(2026, 1, 5, 10, i) for i in range(n)], dtype=pl.Datetime("us")),
        "zoned": pl.Series([datetime(2026, 1, 5, 10, i) for i in range(n)], dtype=pl.Datetime("us", "UTC")),
        "list": pl.Series([[i] for i in range(n)], dtype=pl.List(pl.Int64)),
        "struct": pl.Series([{"a": i} for i in range(n)], dtype=pl.Struct({"a": pl.Int64})),
        "binary": pl.Series([b"\xff\x00"] * n, dtype=pl.Binary),
        "null": pl.Series([None] * n, dtype=pl.Null),
    }
    return values[dtype_kind]


@st.composite
def parquet_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    source = draw(st.sampled_from(SOURCES))
    n = draw(st.integers(0, 5))
    kinds = st.sampled_from(
        ["text", "int", "float", "bool", "date", "naive", "zoned", "list", "struct", "binary", "null"]
    )
    names = [n_ for n_ in SOURCE_COLUMNS[source] if draw(st.integers(0, 9)) > 0]  # sometimes one missing
    cols = {
        (name + " " if draw(st.integers(0, 5)) == 0 else name): _column(draw(kinds), n).alias(name)
        for name in names
    }
    if draw(st.booleans()):
        cols["extra"] = _column(draw(kinds), n)
    frame = pl.DataFrame([s.alias(k) for k, s in cols.items()]) if cols else pl.DataFrame()
    buf = io.BytesIO()
    frame.write_parquet(buf)
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none", "cut", "flip", "cut_keep_magic"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif damage == "cut_keep_magic":
        data = data[: draw(st.integers(4, len(data)))] + b"PAR1"
    return source, data


@FUZZ
@given(case=csv_bytes())
def test_any_csv_is_accepted_or_quarantined_with_a_reason(case: tuple[str, bytes]):
    _deliver(case[0], ".csv", case[1])


@FUZZ
@given(case=parquet_bytes())
def test_any_parquet_is_accepted_or_quarantined_with_a_reason(case: tuple[str, bytes]):
    _deliver(case[0], ".parquet", case[1])


@FUZZ
@given(data=st.binary(max_size=2_000), suffix=st.sampled_from([".csv", ".parquet", ".zip"]))
def test_any_bytes_are_accepted_or_quarantined_with_a_reason(data: bytes, suffix: str):
    _deliver("vitals", suffix, data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            b"encounter_id,code,value,unit,charted_time,stored_time\rE1,heart_rate,1,/min,x,y\r",
            "cr_line_endings",
        ),
        (b"encounter_id,code,value,unit,charted_time,stored_time\rE1\n", "cr_line_endings"),
        (b"", "empty_file"),
        (b"encounter_id,code,code,value,unit,charted_time,stored_time\n1,2,3,4,5,6,7\n", "duplicate_columns"),
        (
            b'encounter_id,code,value,unit,charted_time,stored_time\n"' + b"x" * 200_000 + b"\n",
            "malformed_csv",
        ),
    ],
    ids=["cr_only", "cr_header_lf_rows", "empty", "duplicate_header", "runaway_quote"],
)
def test_parser_errors_are_typed(data: bytes, reason: str, tmp_path: Path):
    zones = _zones(tmp_path)
    (zones.landing / BATCH / "vitals.csv").write_bytes(data)
    outcome, _ = process_file(zones=zones, batch_id=BATCH, source="vitals", now=NOW)
    assert (outcome.status, outcome.reason_code) == ("quarantined", reason)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("list", "wrong_column_type"), ("struct", "wrong_column_type"), ("binary", "wrong_column_type")],
)
@pytest.mark.parametrize("column", ["encounter_id", "value", "unit", "charted_time"])
def test_parquet_columns_that_hold_no_value_are_typed(kind: str, reason: str, column: str, tmp_path: Path):
    frame = pl.DataFrame({c: _column("text", 2) for c in SOURCE_COLUMNS["vitals"]})
    frame = frame.with_columns(_column(kind, 2).alias(column))
    zones = _zones(tmp_path)
    frame.write_parquet(zones.landing / BATCH / "vitals.parquet")
    outcome, _ = process_file(zones=zones, batch_id=BATCH, source="vitals", now=NOW)
    assert (outcome.status, outcome.reason_code) == ("quarantined", reason)
    assert column in (outcome.detail or "")


@pytest.mark.parametrize(
    "header", [" encounter_id", "encounter_id ", "\ufeffencounter_id", '"encounter_id "']
)
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_blanks_and_a_bom_around_a_header_name_are_not_part_of_it(header: str, suffix: str, tmp_path: Path):
    row = {"encounter_id": "E0001", "code": "heart_rate", "value": "80", "unit": "/min",
           "charted_time": "2026-01-05 10:00:00", "stored_time": "2026-01-05 10:05:00"}  # fmt: skip
    zones = _zones(tmp_path)
    path = zones.landing / BATCH / f"vitals{suffix}"
    if suffix == ".csv":
        names = [header, *list(row)[1:]]
        path.write_text(",".join(names) + "\n" + ",".join(row.values()) + "\n", encoding="utf-8")
    else:
        pl.DataFrame(
            {header.strip('"'): ["E0001"]} | {k: [v] for k, v in list(row.items())[1:]}
        ).write_parquet(path)
    outcome, accepted = process_file(zones=zones, batch_id=BATCH, source="vitals", now=NOW)
    assert outcome.status == "accepted", (outcome.reason_code, outcome.detail)
    assert accepted["encounter_id"].to_list() == ["E0001"]
