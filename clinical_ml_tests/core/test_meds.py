"""The de-identified layer as a MEDS dataset: meds schema plus sort order and subject contiguity."""

import json

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest

from clinical_ml.core.anonymization import Vault, anonymize_batch
from clinical_ml.core.meds_layout import MedsError, check_meds_shard, read_meds_events, write_meds_dataset
from clinical_ml_tests.core.test_anonymization import _people, raw_frames


@pytest.fixture(scope="module")
def events() -> pl.DataFrame:
    specs = [
        {
            "age_days": 15000 + 400 * i,
            "admit_min": 97 * i,
            "stay_h": 20 + i,
            "lab_offsets_h": [1.0, 3.5, 9.0],
            "died": i % 3 == 0,
        }
        for i in range(12)
    ]
    return anonymize_batch(**raw_frames(_people(specs)), vault=Vault.empty(), batch_id="b1").events


def test_written_shards_validate_with_meds_and_are_sorted_and_contiguous(tmp_path, events):
    counts = write_meds_dataset(events, tmp_path, n_shards=3, dataset_version="test")
    assert sum(counts.values()) == events.unique().height
    seen: set[int] = set()
    for shard in sorted((tmp_path / "data").glob("*.parquet")):
        table = pq.read_table(shard)
        meds.DataSchema.validate(meds.DataSchema.align(table))
        frame = pl.from_arrow(table)
        check_meds_shard(frame)
        subjects = set(frame["subject_id"])
        assert seen.isdisjoint(subjects)  # a subject lives in exactly one shard
        seen |= subjects
    assert seen == set(events["subject_id"])
    meta = json.loads((tmp_path / "metadata" / "dataset.json").read_text())
    assert meta["dataset_version"] == "test" and "available_time" in meta["other_extension_columns"]
    codes = pl.read_parquet(tmp_path / "metadata" / "codes.parquet")
    assert set(codes["code"]) == set(events["code"])
    assert read_meds_events(tmp_path).height == sum(counts.values())


def test_static_birth_event_sorts_first_and_unsorted_or_split_subjects_are_rejected(events):
    ordered = events.sort("subject_id", "time", "code", nulls_last=False)
    check_meds_shard(ordered)
    with pytest.raises(MedsError, match="sorted"):
        check_meds_shard(ordered.reverse())
    a, b = ordered["subject_id"].unique().sort()[:2]
    first, second = ordered.filter(pl.col("subject_id") == a), ordered.filter(pl.col("subject_id") == b)
    split = pl.concat([first.head(2), second, first.tail(first.height - 2)])
    with pytest.raises(MedsError):
        check_meds_shard(split)
    check_meds_shard(ordered.head(0))


def test_meds_schema_rejects_events_without_a_code(events):
    from clinical_ml.core.meds_layout import to_meds_table

    to_meds_table(events)
    with pytest.raises(Exception):  # noqa: B017 - meds raises its own error types
        to_meds_table(events.drop("code"))


def test_shards_written_in_parts_of_subjects_hold_the_rows_of_one_whole_sort(tmp_path, events, monkeypatch):
    from clinical_ml.core import meds_layout

    doubled = pl.concat([events, events.head(7)])  # duplicates, removed within their subject's part
    whole = write_meds_dataset(doubled, tmp_path / "whole", n_shards=2)
    monkeypatch.setattr(meds_layout, "ROWS_PER_PART", 5)  # several subjects' parts per shard
    parts = write_meds_dataset(doubled, tmp_path / "parts", n_shards=2)
    assert parts == whole
    for shard in ("0", "1"):
        expected = pl.read_parquet(tmp_path / "whole" / "data" / f"{shard}.parquet")
        got = pl.read_parquet(tmp_path / "parts" / "data" / f"{shard}.parquet")
        assert got.equals(expected)
        assert pq.ParquetFile(tmp_path / "parts" / "data" / f"{shard}.parquet").metadata.num_row_groups > 1
        check_meds_shard(got)
    empty = write_meds_dataset(events.head(0), tmp_path / "empty", n_shards=2)
    assert empty == {"shard_0": 0, "shard_1": 0}
    assert pl.read_parquet(tmp_path / "empty" / "data" / "0.parquet").height == 0


def test_the_same_events_in_any_order_give_the_same_shard_files(tmp_path, events):
    # rows that tie on (subject, time, code) and differ elsewhere: their order must not follow the input's
    tied = events.head(6).with_columns(pl.col("numeric_value").fill_null(0.0) + 1.5)
    both = pl.concat([events, tied])
    shuffled = both.sample(fraction=1.0, shuffle=True, seed=7)
    reversed_ = both.reverse()
    written = [
        write_meds_dataset(frame, tmp_path / name, n_shards=2, dataset_version="t")
        for name, frame in (("a", both), ("b", shuffled), ("c", reversed_))
    ]
    assert written[0] == written[1] == written[2]
    for shard in ("0", "1"):
        first = (tmp_path / "a" / "data" / f"{shard}.parquet").read_bytes()
        assert (tmp_path / "b" / "data" / f"{shard}.parquet").read_bytes() == first
        assert (tmp_path / "c" / "data" / f"{shard}.parquet").read_bytes() == first
