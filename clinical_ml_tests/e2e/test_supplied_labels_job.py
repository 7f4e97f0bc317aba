"""Hospital-supplied labels through the real ingestion job: a chart review delivered with a later batch, and
a revision delivered alone weeks later, reach the de-identified events as ``LABEL//<name>`` events of the
stays they name (delivered in an earlier batch), with the pseudonyms and date shift of those stays; bad rows
are rejected with reasons and counted in the ledger; nothing identifying, and no delivered text outside the
label codes, crosses the boundary or reaches the event log."""

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clinical_ml.core.deid_release import identifier_leaks
from clinical_ml.core.ledger import read_ledger, rejects_by_reason
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG = SyntheticConfig(n_patients=300, n_batches=2, seed=31)
REVIEW_BATCH = "2026-02-02"  # a batch holding only the revised chart review, weeks later
CANARY_TEXT = "CNRY Quixotla Delirium"  # a label name that is free text: rejected, never echoed
UNKNOWN_ENCOUNTER = "CNRYENC404"
TS = "%Y-%m-%d %H:%M:%S"


def _write(batch: Path, rows: list[str]) -> None:
    batch.mkdir(exist_ok=True)
    lines = ["encounter_id,label,value,event_time,recorded_time", *rows]
    (batch / "labels.csv").write_text("\n".join(lines) + "\n")
    write_completion_marker(batch)


def test_supplied_labels_cross_the_boundary_as_events_of_their_stays(tmp_path):
    from clinical_ml.defs.build import build_definitions
    from clinical_ml.resources.settings import AnonymizationSettings

    landing = tmp_path / "landing"
    first, second = generate_hospital(landing, CONFIG).batch_ids
    cases = tmp_path / "usecases"
    cases.mkdir()
    shutil.copy(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml", cases)
    enc1 = pl.read_csv(landing / first / "encounters.csv", infer_schema=False)
    enc2 = pl.read_csv(landing / second / "encounters.csv", infer_schema=False)
    review = datetime(2026, 1, 20, 9)
    revised = review + timedelta(days=14)
    early = enc1.row(0, named=True)
    early_id = early["encounter_id"]
    event = datetime.fromisoformat(early["admit_time"]) + timedelta(hours=30)
    _write(
        landing / second,
        [
            f"{early_id},delirium_chart_review,1,{event:{TS}},{review:{TS}}",  # a stay of the earlier batch
            *(f"{e},delirium_chart_review,0,,{review:{TS}}" for e in enc2["encounter_id"]),  # its own stays
            f"{UNKNOWN_ENCOUNTER},delirium_chart_review,1,,{review:{TS}}",
            f"{early_id},{CANARY_TEXT},1,,{review:{TS}}",
            f"{early_id},delirium_chart_review,1,{event:{TS}},{review:{TS}}",  # the first row again
        ],
    )
    _write(landing / REVIEW_BATCH, [f"{early_id},delirium_chart_review,0,,{revised:{TS}}"])

    defs = build_definitions(
        data_root=tmp_path,
        usecases_dir=cases,
        # each batch judged on its own, so that k-anonymity withholds some stays of the second batch and their
        # labels must be withheld with them (over the cumulative release the first batch's people cover them)
        anonymization=AnonymizationSettings(pseudonym_seed=3, risk_scope="batch"),
    )
    job = defs.resolve_job_def("batch_ingestion_job")
    results = {}
    with dg.instance_for_test() as instance:
        batches = [first, second, REVIEW_BATCH]
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
        for b in batches:
            results[b] = job.execute_in_process(instance=instance, partition_key=b, raise_on_error=False)
            assert results[b].success, b
        log = "\n".join(dg.serialize_value(e) for r in results.values() for e in instance.all_logs(r.run_id))

    def materialized(batch: str, asset: str) -> dict:
        (m,) = [
            e.event_specific_data.materialization.metadata
            for e in results[batch].get_asset_materialization_events()
            if e.asset_key.to_user_string() == asset
        ]
        return {k: getattr(v, "value", v) for k, v in m.items()}

    def check(batch: str, asset: str, name: str) -> bool:
        (passed,) = [
            e.passed
            for e in results[batch].get_asset_check_evaluations()
            if e.asset_key.to_user_string() == asset and e.check_name == name
        ]
        return passed

    # A batch without labels is complete as before: labels not delivered, nothing in the ledger about them.
    assert materialized(first, "raw_labels")["status"] == "not_delivered"
    assert check(first, "raw_labels", "delivered_file_accepted")
    ledger = read_ledger(tmp_path / "archive" / "ledger.duckdb")
    assert ledger.filter(pl.col("batch_id") == first)["source"].sort().to_list() == [
        "encounters",
        "labs",
        "patients",
        "vitals",
    ]

    # Every label row accounted for, bad ones with reasons.
    n_own = enc2.height
    row = ledger.filter((pl.col("batch_id") == second) & (pl.col("source") == "labels")).row(0, named=True)
    assert (row["status"], row["rows_in"], row["rows_accepted"]) == ("accepted", n_own + 4, n_own + 1)
    reasons = rejects_by_reason(tmp_path / "archive" / "ledger.duckdb", batch_id=second)
    assert dict(reasons.filter(pl.col("source") == "labels").select("reason", "n").iter_rows()) == {
        "unknown_encounter": 1,
        "bad_format:label": 1,
        "duplicate_row": 1,
    }
    assert check(second, "raw_labels", "matches_source_schema")
    assert materialized(second, "anonymized_events")["label_events"] == n_own + 1
    # The revision delivered alone: its stay is an earlier batch's; the four usual files are missing there.
    assert materialized(REVIEW_BATCH, "raw_labels")["status"] == "accepted"
    assert materialized(REVIEW_BATCH, "anonymized_events")["label_events"] == 1

    # The events name the stays with their pseudonyms and keep the time from admission exactly; the labels
    # of the patients that k-anonymity withheld are withheld with them.
    vault = pl.read_parquet(tmp_path / "phi" / "vault" / "encounters.parquet")
    deid = tmp_path / "deid"
    stays = {b: pl.read_parquet(deid / "encounters" / f"{b}.parquet") for b in (first, second)}
    events = {
        b: pl.read_parquet(deid / "events" / f"{b}.parquet").filter(pl.col("code").str.starts_with("LABEL//"))
        for b in (second, REVIEW_BATCH)
    }
    early_hadm = vault.filter(pl.col("encounter_id") == early_id)["hadm_id"].item()
    early_stay = stays[first].filter(pl.col("hadm_id") == early_hadm).row(0, named=True)
    early_admit = datetime.fromisoformat(early["admit_time"])
    got = events[second].filter(pl.col("hadm_id") == early_hadm).row(0, named=True)
    assert (got["subject_id"], got["code"], got["numeric_value"]) == (
        early_stay["subject_id"],
        "LABEL//delirium_chart_review",
        1.0,
    )
    assert got["time"] - early_stay["admit_time"] == event - early_admit
    assert got["available_time"] - early_stay["admit_time"] == review - early_admit

    own = events[second].filter(pl.col("hadm_id") != early_hadm)
    assert 0 < stays[second].height < n_own, "some stays released, some withheld (seeded)"
    assert sorted(own["hadm_id"]) == sorted(stays[second]["hadm_id"])
    raw_admit = enc2.select(
        pl.col("encounter_id"), pl.col("admit_time").str.strptime(pl.Datetime("us"), TS).alias("raw_admit")
    ).join(vault, on="encounter_id")
    joined = own.join(stays[second], on=["hadm_id", "subject_id"]).join(raw_admit, on="hadm_id")
    assert joined.height == own.height
    from_admission = joined.select(
        (pl.col("time") - pl.col("admit_time") == pl.lit(review) - pl.col("raw_admit")).all()
    ).item()
    assert from_admission
    assert (joined["time"] == joined["available_time"]).all() and (joined["numeric_value"] == 0.0).all()

    (later,) = events[REVIEW_BATCH].rows(named=True)
    assert (later["hadm_id"], later["subject_id"], later["numeric_value"]) == (
        early_hadm,
        early_stay["subject_id"],
        0.0,
    )
    assert later["time"] == later["available_time"]
    assert later["available_time"] - early_stay["admit_time"] == revised - early_admit

    # Nothing identifying crosses; the rejected free text and the unknown encounter number are never echoed.
    ids = {early_id, early["mrn"], UNKNOWN_ENCOUNTER, *enc2["encounter_id"], *enc2["mrn"]}
    numeric = {int(v) for v in ids if v.isdigit()}
    for table in ("patients", "encounters", "events"):
        for part in (deid / table).glob("*.parquet"):
            frame = pl.read_parquet(part)
            assert identifier_leaks(frame, table, ids, numeric) == [], part
            if table == "events":
                assert not frame["code"].str.contains("CNRY").any(), part
    scanned = [
        *deid.rglob("*"),
        *(tmp_path / "archive" / "ledger").rglob("*"),
        *(tmp_path / "quarantine").rglob("*"),
    ]
    for path in scanned:
        if path.is_file() and path.suffix != ".parquet":
            text = path.read_bytes()
            assert CANARY_TEXT.encode() not in text and UNKNOWN_ENCOUNTER.encode() not in text, path
    assert "raw_labels" in log  # the log was read
    assert CANARY_TEXT not in log and UNKNOWN_ENCOUNTER not in log and early_id not in log
