"""Write and validate the de-identified layer as a MEDS dataset.

``meds`` validates types and required columns; it does not check that each shard is sorted by subject and
time or that a subject's events are contiguous and in one shard, so :func:`check_meds_shard` does.
"""

import json
from datetime import UTC, datetime
from pathlib import Path

import meds
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from clinical_ml.core.storage import committed
from clinical_ml.core.units import plain_name

EXTENSION_COLUMNS = ["hadm_id", "available_time", "implausible"]


class MedsError(ValueError):
    pass


def to_meds_table(events: pl.DataFrame) -> pa.Table:
    """Validate a polars frame against ``meds.DataSchema`` (after ``align``: polars writes large strings)."""
    table = events.to_arrow()
    table = meds.DataSchema.align(table)
    meds.DataSchema.validate(table)
    return table


def check_meds_shard(events: pl.DataFrame) -> None:
    """Raise :class:`MedsError` unless rows are sorted by (subject_id, time) with nulls (static) first and
    each subject's rows are contiguous."""
    if events.height == 0:
        return
    keyed = events.select("subject_id", pl.col("time").fill_null(datetime(1, 1, 1)).alias("t"))
    sorted_ok = keyed.select(
        (
            (pl.col("subject_id").diff() > 0)
            | ((pl.col("subject_id").diff() == 0) & (pl.col("t").diff() >= pl.duration()))
        )
        .fill_null(True)
        .all()
    ).item()
    if not sorted_ok:
        raise MedsError("shard is not sorted by subject_id then time")
    runs = events.select(pl.col("subject_id").rle_id()).to_series().n_unique()
    if runs != events["subject_id"].n_unique():
        raise MedsError("a subject's events are not contiguous within the shard")


def write_meds_dataset(
    events: pl.DataFrame | pl.LazyFrame,
    root: Path,
    *,
    splits: pl.DataFrame | None = None,
    n_shards: int = 4,
    dataset_name: str = "clinical_ml_deid",
    dataset_version: str = "",
) -> dict[str, int]:
    """Write ``data/<shard>.parquet`` (subjects hashed to shards), ``metadata/codes.parquet``,
    ``metadata/dataset.json`` and, when given, ``metadata/subject_splits.parquet``.

    ``events`` may be lazy (``pl.scan_parquet`` over every batch): one shard is then in memory at a time."""
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for old in (root / "data").glob("*.parquet"):  # leftovers of an interrupted export included
        old.unlink()
    ev = events.lazy()
    counts = {
        f"shard_{shard}": _write_shard(ev, shard, n_shards, root / "data" / f"{shard}.parquet")
        for shard in range(n_shards)
    }
    codes = (
        ev.select("code")
        .unique()
        .sort("code")
        .collect()
        .with_columns(
            pl.col("code").map_elements(plain_name, return_dtype=pl.String).alias("description"),
            pl.lit(None, dtype=pl.List(pl.String)).alias("parent_codes"),
        )
    )
    codes_table = meds.CodeMetadataSchema.align(codes.to_arrow())
    pq.write_table(codes_table, root / "metadata" / "codes.parquet")
    meta = {
        "dataset_name": dataset_name,
        "dataset_version": dataset_version,
        "etl_name": "clinical_ml",
        "etl_version": dataset_version,
        "meds_version": getattr(meds, "__version__", "0.4"),
        "created_at": datetime.now(UTC).isoformat(),
        "other_extension_columns": EXTENSION_COLUMNS,
    }
    (root / "metadata" / "dataset.json").write_text(json.dumps(meta, indent=2))
    if splits is not None:
        pq.write_table(
            meds.SubjectSplitSchema.align(splits.to_arrow()), root / "metadata" / "subject_splits.parquet"
        )
    return counts


ROWS_PER_PART = 1_000_000
"""Events deduplicated, sorted and written at a time within a shard (whole subjects, in subject order): the
export's peak memory is one shard's events plus the copies sorting this many takes, rather than the several
copies of a whole shard that deduplicating and sorting it at once took (3.4 GB over 4 shards of 30M events)."""


_SORT_KEYS = ["subject_id", "time", "code"]


def _write_shard(events: pl.LazyFrame, shard: int, n_shards: int, path: Path) -> int:
    """Write one shard (its subjects' events, without duplicates, sorted by subject, time and code, then by the
    other columns), return
    its row count. The shard is read once and sorted in parts of whole subjects in subject order
    (:data:`ROWS_PER_PART`), each appended to the file as it is done: as the sort begins with the subject and a
    duplicate shares its subject, the rows are those of the whole shard sorted at once."""
    rows = events.filter(pl.col("subject_id") % n_shards == shard).collect()
    starts = _part_starts(rows, ROWS_PER_PART)
    written = 0
    with pq.ParquetWriter(path, to_meds_table(rows.head(0)).schema) as writer:
        for lo, hi in zip([None, *starts], [*starts, None], strict=True):
            within = pl.lit(True)
            if lo is not None:
                within &= pl.col("subject_id") >= lo
            if hi is not None:
                within &= pl.col("subject_id") < hi
            part = (
                rows.lazy()
                .filter(within)
                .unique()  # duplicates share a subject, so per part is the same as over all events
                # every column a key: rows that tie on (subject, time, code) come out in one order whatever
                # order unique() (several threads) and the input left them in; same events, same bytes
                .sort(_SORT_KEYS + [c for c in rows.columns if c not in _SORT_KEYS], nulls_last=False)
                .collect()
            )
            check_meds_shard(part)  # the parts' subjects ascend: the whole shard is sorted and contiguous
            writer.write_table(to_meds_table(part))
            written += part.height
    return written


def _part_starts(rows: pl.DataFrame, rows_per_part: int) -> list[int]:
    """The subject ids at which a part after the first begins: whole subjects, about ``rows_per_part`` rows
    in each part."""
    sizes = rows.group_by("subject_id").len().sort("subject_id")
    before = sizes["len"].cum_sum() - sizes["len"]
    part = before // rows_per_part
    return sizes.filter(part.diff() > 0)["subject_id"].to_list()


def read_meds_events(root: Path) -> pl.DataFrame:
    return pl.read_parquet(committed(Path(root) / "data", ".parquet"))
