"""Hospital-supplied labels as an optional landing source: validated row by row like every source, tied to
an encounter of the batch or of an earlier one, and released as ``LABEL//<name>`` MEDS events of that stay
with the patient's pseudonym and date shift; nothing of the delivered text crosses but the label's code."""

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.anonymization import DEID_COLUMNS, Vault, anonymize_batch
from clinical_ml.core.deid_release import identifier_leaks, raw_identifier_values
from clinical_ml.core.delivery import ZonePaths, accepted_path, process_batch, read_ledger_entry
from clinical_ml.core.ingestion import BatchContext, empty_accepted, ingest_file
from clinical_ml.core.landing import read_unmarked_batch
from clinical_ml.core.pseudonyms import HmacKey
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker
from clinical_ml.core.units import is_known_code

NOW = datetime(2026, 3, 1)
HEADER = "encounter_id,label,value,event_time,recorded_time"
ENCOUNTERS = pl.DataFrame({"encounter_id": ["E-1001", "E-1002"], "mrn": ["M0001", "M0002"]})
EARLIER = pl.DataFrame({"encounter_id": ["E-0901"], "mrn": ["M0009"]})
GOOD = "E-1001,delirium_chart_review,1,2026-01-03 10:00:00,2026-01-20 09:00:00"


def _ingest(tmp_path: Path, *rows: str, batch: BatchContext | None = None):
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    context = batch if batch is not None else BatchContext(encounters=ENCOUNTERS, earlier_encounters=EARLIER)
    return ingest_file(path, "labels", batch=context, now=NOW)


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("E-1002,Delirium,1,,2026-01-20 09:00:00", "bad_format:label"),
        ("E-1002,john smith delirium,1,,2026-01-20 09:00:00", "bad_format:label"),
        ("E-1002,9delirium,1,,2026-01-20 09:00:00", "bad_format:label"),
        ("E-1002," + "a" * 41 + ",1,,2026-01-20 09:00:00", "bad_format:label"),
        ("E-1002,=HYPERLINK(1),1,,2026-01-20 09:00:00", "bad_format:label"),
        ("E-1002,sepsis,yes,,2026-01-20 09:00:00", "unparseable_value"),
        ("E-1002,sepsis,2,,2026-01-20 09:00:00", "unparseable_value"),
        ("E-1002,sepsis,,,2026-01-20 09:00:00", "missing_value:value"),
        ("E-1002,sepsis,1,,", "missing_value:recorded_time"),
        ("E-1002,sepsis,1,2026-01-21 10:00:00,2026-01-20 09:00:00", "recorded_before_event"),
        ("E-1002,sepsis,1,,2027-01-20 09:00:00", "future_date:recorded_time"),
        ("E-7777,sepsis,1,,2026-01-20 09:00:00", "unknown_encounter"),
        ("1001,sepsis,1,,2026-01-20 09:00:00", "unknown_encounter"),
        ("E-1002,NA,1,,2026-01-20 09:00:00", "missing_value_sentinel:label"),
    ],
)
def test_a_bad_label_row_is_rejected_with_its_reason_and_never_echoed(tmp_path, row, reason):
    result = _ingest(tmp_path, GOOD, row)
    assert result.rejects.rows() == [(2, reason)]
    assert result.accepted["row_number"].to_list() == [1]
    assert result.rows_in == result.rows_accepted + result.rows_rejected
    delivered = set(row.split(",")) - {""}
    assert not any(v in r for v in delivered for r in result.rejected_by_reason), "reasons carry no values"


def test_values_and_times_parse_and_the_patient_is_found_in_the_batch_or_an_earlier_one(tmp_path):
    result = _ingest(
        tmp_path,
        "E-1001,delirium_chart_review,1,2026-01-03 10:00:00,2026-01-20 09:00:00",
        "E-1002,delirium_chart_review,false,,2026-01-20 09:00:00",
        " e-0901 ,delirium_chart_review,TRUE,,2026-01-20 09:00:00",  # an earlier batch's, spelled otherwise
        "E-1002,sepsis, 0 ,2026-01-02 00:00:00,2026-01-20 09:00:00",
    )
    assert result.rows_rejected == 0
    got = result.accepted.select("value", "event_time", "mrn").rows()
    assert got == [
        (True, datetime(2026, 1, 3, 10), "M0001"),
        (False, None, "M0002"),
        (True, None, "M0009"),
        (False, datetime(2026, 1, 2), "M0002"),
    ]
    assert result.accepted.columns == empty_accepted("labels").columns


def test_an_encounter_of_the_batch_wins_over_an_earlier_delivery_of_the_same_number(tmp_path):
    earlier = pl.DataFrame({"encounter_id": ["E-1001"], "mrn": ["M-OLD"]})
    result = _ingest(tmp_path, GOOD, batch=BatchContext(encounters=ENCOUNTERS, earlier_encounters=earlier))
    assert result.accepted["mrn"].to_list() == ["M0001"]


def test_without_the_batch_the_encounter_is_not_checked_and_that_is_said(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(f"{HEADER}\nE-7777,sepsis,1,,2026-01-20 09:00:00\n")
    result = ingest_file(path, "labels", now=NOW)
    assert result.rows_accepted == 1 and result.accepted["mrn"].to_list() == [None]
    assert result.warnings["cross_file_checks_skipped"] == 1


def test_the_latest_review_wins_and_a_conflict_at_the_latest_review_keeps_no_row(tmp_path):
    result = _ingest(
        tmp_path,
        "E-1001,sepsis,1,,2026-01-10 09:00:00",  # 1 revised by row 2
        "E-1001,sepsis,0,,2026-01-20 09:00:00",  # 2 latest: kept
        "E-1002,sepsis,1,,2026-01-10 09:00:00",  # 3 superseded by rows 4 and 5, which disagree
        "E-1002,sepsis,0,,2026-01-20 09:00:00",  # 4
        "E-1002,sepsis,1,,2026-01-20 09:00:00",  # 5
        "E-1002,aki,0,,2026-01-20 09:00:00",  # 6 kept
        "E-1002,aki,0,,2026-01-20 09:00:00",  # 7 the same row again
        "E-1001,aki,1,,2026-01-20 09:00:00",  # 8 another encounter: its own key
    )
    assert result.rejects.rows() == [
        (1, "superseded"),
        (3, "superseded"),
        (4, "conflicting_duplicate"),
        (5, "conflicting_duplicate"),
        (7, "duplicate_row"),
    ]
    assert result.accepted["row_number"].to_list() == [2, 6, 8]


def test_duplicates_are_found_whatever_their_key_hashes_to(tmp_path):
    """Each of 64 keys delivered twice: every second copy is a duplicate. The duplicate rule compared sorted
    key hashes with diff(), which goes through Int64 and missed every key hashing above 2**63 (about half)."""
    rows = [f"E-{1000 + i},sepsis,1,,2026-01-20 09:00:00" for i in range(64)]
    encounters = pl.DataFrame({"encounter_id": [f"E-{1000 + i}" for i in range(64)], "mrn": ["M0001"] * 64})
    result = _ingest(tmp_path, *rows, *rows, batch=BatchContext(encounters=encounters))
    assert result.rejected_by_reason == {"duplicate_row": 64}
    assert result.accepted["row_number"].to_list() == list(range(1, 65))


def test_a_parquet_delivery_with_typed_columns_reads_like_the_csv(tmp_path):
    frame = pl.DataFrame(
        {
            "encounter_id": ["E-1001", "E-1002"],
            "label": ["delirium_chart_review"] * 2,
            "value": [True, False],
            "event_time": [datetime(2026, 1, 3, 10), None],
            "recorded_time": [datetime(2026, 1, 20, 9)] * 2,
        }
    )
    frame.write_parquet(tmp_path / "labels.parquet")
    result = ingest_file(
        tmp_path / "labels.parquet", "labels", batch=BatchContext(encounters=ENCOUNTERS), now=NOW
    )
    assert result.rows_rejected == 0
    assert result.accepted.select(frame.columns).equals(frame)


def test_the_vocabulary_accepts_label_codes_as_events_not_as_measurements():
    assert is_known_code("LABEL//delirium_chart_review")
    assert not is_known_code("LABEL//delirium_chart_review", measurements_only=True)


# --- the landing zone ----------------------------------------------------------------------------------


def _zones(root: Path) -> ZonePaths:
    z = ZonePaths(
        landing=root / "landing", archive=root / "archive", quarantine=root / "quarantine", phi=root / "phi"
    )
    for p in (z.landing, z.archive, z.quarantine, z.phi):
        p.mkdir(parents=True, exist_ok=True)
    return z


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[str, ...]]:
    out = tmp_path_factory.mktemp("hospital")
    h = generate_hospital(out, SyntheticConfig(n_patients=120, n_batches=3, seed=5))
    return out, h.batch_ids


def _delivered(hospital, tmp_path: Path) -> tuple[ZonePaths, tuple[str, ...]]:
    src, batch_ids = hospital
    zones = _zones(tmp_path)
    for b in batch_ids:
        shutil.copytree(src / b, zones.landing / b)
    return zones, batch_ids


def _encounters(zones: ZonePaths, batch_id: str) -> pl.DataFrame:
    return pl.read_csv(zones.landing / batch_id / "encounters.csv", infer_schema=False)


def _write_labels(zones: ZonePaths, batch_id: str, rows: list[str], *, header: str = HEADER) -> None:
    (zones.landing / batch_id / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    write_completion_marker(zones.landing / batch_id)


def test_a_batch_without_labels_is_complete_as_today(hospital, tmp_path):
    zones, (first, *_) = _delivered(hospital, tmp_path)
    outcomes = process_batch(zones=zones, batch_id=first, now=NOW)
    assert set(outcomes) == {"patients", "encounters", "labs", "vitals"}
    assert all(o.status == "accepted" for o in outcomes.values())
    assert read_ledger_entry(zones, first, "labels") is None
    labels = pl.read_parquet(accepted_path(zones, "labels", first))
    assert labels.height == 0 and labels.schema == empty_accepted("labels").schema


def test_labels_name_encounters_of_their_batch_or_an_earlier_one_never_a_later_one(hospital, tmp_path):
    zones, (first, second, third) = _delivered(hospital, tmp_path)
    enc1, enc2, enc3 = (_encounters(zones, b) for b in (first, second, third))
    _write_labels(
        zones,
        second,
        [
            f"{enc1['encounter_id'][0]},delirium_chart_review,1,,2026-02-01 09:00:00",  # earlier batch
            f"{enc2['encounter_id'][0]},delirium_chart_review,0,,2026-02-01 09:00:00",  # this batch
            f"{enc3['encounter_id'][0]},delirium_chart_review,1,,2026-02-01 09:00:00",  # a later batch
            "X-UNKNOWN-1,delirium_chart_review,1,,2026-02-01 09:00:00",
        ],
    )
    for b in (first, second, third):
        outcomes = process_batch(zones=zones, batch_id=b, now=NOW)
    outcomes = process_batch(zones=zones, batch_id=second, now=NOW)  # again, after the later batch
    labels = outcomes["labels"]
    assert labels.status == "accepted"
    assert (labels.rows_in, labels.rows_accepted, labels.rejected_by_reason) == (
        4,
        2,
        {"unknown_encounter": 2},
    )
    accepted = pl.read_parquet(zones.phi / labels.accepted_path)
    assert accepted["mrn"].to_list() == [enc1["mrn"][0], enc2["mrn"][0]]
    entry = json.dumps(read_ledger_entry(zones, second, "labels"))
    assert not any(e in entry for e in [*enc1["encounter_id"], *enc3["encounter_id"], *enc1["mrn"]])


def test_a_new_earlier_batch_changes_the_labels_data_version(hospital, tmp_path):
    zones, (first, second, _) = _delivered(hospital, tmp_path)
    _write_labels(
        zones, second, [f"{_encounters(zones, second)['encounter_id'][0]},aki,1,,2026-02-01 09:00:00"]
    )
    alone = process_batch(zones=zones, batch_id=second, now=NOW)["labels"]
    again = process_batch(zones=zones, batch_id=second, now=NOW)["labels"]
    process_batch(zones=zones, batch_id=first, now=NOW)
    after = process_batch(zones=zones, batch_id=second, now=NOW)["labels"]
    assert alone.data_version == again.data_version != after.data_version


def test_a_bad_labels_file_is_quarantined_with_a_reason_and_the_batch_proceeds(hospital, tmp_path):
    zones, (first, *_) = _delivered(hospital, tmp_path)
    _write_labels(
        zones, first, ["E-1,sepsis,1,2026-02-01 09:00:00"], header="encounter_id,label,value,recorded_time"
    )
    outcomes = process_batch(zones=zones, batch_id=first, now=NOW)
    assert outcomes["labels"].status == "quarantined" and outcomes["labels"].reason_code == "missing_columns"
    reason = json.loads((zones.quarantine / f"{outcomes['labels'].quarantined_as}.reason.json").read_text())
    assert reason["reason_code"] == "missing_columns" and "event_time" in reason["detail"]
    assert (zones.quarantine / first / "labels.csv").read_bytes() == (
        zones.landing / first / "labels.csv"
    ).read_bytes()
    assert all(outcomes[s].status == "accepted" for s in ("patients", "encounters", "labs", "vitals"))


def test_an_unmarked_batch_lists_its_labels_file(hospital, tmp_path):
    zones, (first, *_) = _delivered(hospital, tmp_path)
    _write_labels(zones, first, [GOOD])
    (zones.landing / first / "_SUCCESS").unlink()
    batch_dir = zones.landing / first
    _, fp = read_unmarked_batch(batch_dir, previous_fingerprint=None, quiet_seconds=0)
    batch, _ = read_unmarked_batch(batch_dir, previous_fingerprint=fp, quiet_seconds=0)
    assert batch is not None and "labels.csv" in batch.files and batch.problems == ()


# --- across the anonymization boundary -----------------------------------------------------------------


def _raw(zones: ZonePaths, batch_id: str) -> dict[str, pl.DataFrame]:
    return {
        s: pl.read_parquet(accepted_path(zones, s, batch_id))
        for s in ("patients", "encounters", "labs", "vitals", "labels")
    }


@pytest.fixture(scope="module")
def labelled(hospital, tmp_path_factory: pytest.TempPathFactory):
    """Two batches ingested; the second delivers labels of a stay of each batch (one without event time)."""
    zones, (first, second, _) = _delivered(hospital, tmp_path_factory.mktemp("labelled"))
    enc1, enc2 = _encounters(zones, first), _encounters(zones, second)
    review = datetime(2026, 2, 1, 9)
    event1 = datetime.fromisoformat(enc1["admit_time"][0]) + timedelta(hours=30)
    _write_labels(
        zones,
        second,
        [
            f"{enc1['encounter_id'][0]},delirium_chart_review,1,{event1:%Y-%m-%d %H:%M:%S},{review:%Y-%m-%d %H:%M:%S}",
            f"{enc2['encounter_id'][0]},delirium_chart_review,0,,{review:%Y-%m-%d %H:%M:%S}",
        ],
    )
    for b in (first, second):
        process_batch(zones=zones, batch_id=b, now=NOW)
    return zones, first, second, enc1, enc2, event1, review


def _stay(out, vault: Vault, encounter_id: str) -> dict:
    hadm = vault.encounters.filter(pl.col("encounter_id") == encounter_id.strip().upper())["hadm_id"].item()
    return out.encounters.filter(pl.col("hadm_id") == hadm).row(0, named=True)


@pytest.mark.parametrize("mode", ["vault", "hmac"])
def test_labels_become_meds_events_of_their_stay_with_the_patients_shift(labelled, mode):
    zones, first, second, enc1, enc2, event1, review = labelled
    key = HmacKey(b"k" * 32) if mode == "hmac" else None
    out1 = anonymize_batch(
        **_raw(zones, first), vault=Vault.empty(), batch_id=first, rng=np.random.default_rng(1), hmac_key=key
    )
    vault = out1.vault
    out2 = anonymize_batch(
        **_raw(zones, second), vault=vault, batch_id=second, rng=np.random.default_rng(2), hmac_key=key
    )
    mapping = out2.vault  # vault mode: every stay so far; HMAC: this batch's keys, the labelled stays too
    labels = out2.events.filter(pl.col("code").str.starts_with("LABEL//"))
    assert tuple(labels.columns) == DEID_COLUMNS["events"]
    assert (out2.label_events, out2.orphan_labels) == (2, 0)
    assert labels["code"].to_list() == ["LABEL//delirium_chart_review"] * 2

    early = labels.filter(pl.col("numeric_value") == 1.0).row(0, named=True)
    stay1 = _stay(out1, mapping, enc1["encounter_id"][0])
    assert (early["subject_id"], early["hadm_id"]) == (stay1["subject_id"], stay1["hadm_id"])
    admit1 = datetime.fromisoformat(enc1["admit_time"][0])
    assert early["time"] - stay1["admit_time"] == event1 - admit1  # the same per-patient shift
    assert early["available_time"] - early["time"] == review - event1
    assert not early["implausible"]

    late = labels.filter(pl.col("numeric_value") == 0.0).row(0, named=True)
    stay2 = _stay(out2, mapping, enc2["encounter_id"][0])
    assert (late["subject_id"], late["hadm_id"]) == (stay2["subject_id"], stay2["hadm_id"])
    admit2 = datetime.fromisoformat(enc2["admit_time"][0])
    assert late["time"] == late["available_time"]  # no event time: the review's
    assert late["time"] - stay2["admit_time"] == review - admit2

    raw = _raw(zones, second)
    ids, numeric = raw_identifier_values(raw["patients"], raw["encounters"], raw["labels"])
    assert {enc1["encounter_id"][0], enc1["mrn"][0]} <= ids
    assert identifier_leaks(out2.events, "events", ids, numeric) == []


def test_a_label_without_a_patient_or_with_a_name_that_is_not_a_code_never_crosses(labelled):
    zones, first, _, enc1, _, _, review = labelled
    raw = _raw(zones, first)
    labels = pl.DataFrame(
        {
            "encounter_id": [enc1["encounter_id"][0], enc1["encounter_id"][0], "X-NOWHERE"],
            "label": ["john smith has delirium", "delirium_chart_review", "delirium_chart_review"],
            "value": [True, True, True],
            "event_time": [None, None, None],
            "recorded_time": [review] * 3,
            "row_number": [1, 2, 3],
            "mrn": [None, None, None],
        },
        schema=empty_accepted("labels").schema,
    )
    out = anonymize_batch(**{**raw, "labels": labels}, vault=Vault.empty(), batch_id=first)
    codes = out.events.filter(pl.col("code").str.starts_with("LABEL//"))["code"].to_list()
    assert codes == ["LABEL//delirium_chart_review"]  # its own batch's stay, found without the mrn
    assert (out.label_events, out.orphan_labels) == (1, 2)
    assert not out.events["code"].str.contains("smith").any()
