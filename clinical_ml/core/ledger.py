"""The landing ledger in DuckDB: one row per delivered file version, and the row-level rejects.

DuckDB allows one writing process per database file, so every write goes through :func:`record_batch`, which
the orchestration calls from one step at a time (a concurrency pool of 1). Readers open the file read-only.
Writes are idempotent: recording the same batch again replaces its rows.
"""

import contextlib
import json
from pathlib import Path

import duckdb
import polars as pl

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS ledger (
    batch_id VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL,
    file VARCHAR,
    bytes BIGINT,
    rows_in BIGINT,
    rows_accepted BIGINT,
    rows_rejected BIGINT,
    rejected_by_reason JSON,
    warnings JSON,
    status VARCHAR NOT NULL,
    reason_code VARCHAR,
    line BIGINT,
    byte_offset BIGINT,
    data_version VARCHAR,
    recorded_at VARCHAR,
    PRIMARY KEY (batch_id, source, sha256)
);
CREATE TABLE IF NOT EXISTS rejects (
    batch_id VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL,
    row_number BIGINT NOT NULL,
    reason VARCHAR NOT NULL
);
"""
_LEDGER_COLUMNS = [
    "batch_id", "source", "sha256", "file", "bytes", "rows_in", "rows_accepted", "rows_rejected",
    "rejected_by_reason", "warnings", "status", "reason_code", "line", "byte_offset", "data_version", "recorded_at",
]  # fmt: skip


def _row(entry: dict) -> list:
    return [
        entry["batch_id"],
        entry["source"],
        entry.get("sha256") or "",
        entry.get("file"),
        entry.get("n_bytes", entry.get("bytes")),
        entry.get("rows_in"),
        entry.get("rows_accepted"),
        entry.get("rows_rejected"),
        json.dumps(entry.get("rejected_by_reason") or {}, sort_keys=True),
        json.dumps(entry.get("warnings") or {}, sort_keys=True),
        entry["status"],
        entry.get("reason_code"),
        entry.get("line"),
        entry.get("byte_offset"),
        entry.get("data_version"),
        entry.get("recorded_at"),
    ]


def record_batch(db_path: Path, entries: list[dict], rejects: dict[tuple[str, str], pl.DataFrame]) -> None:
    """Upsert ledger entries and replace the rejects of each (source, sha256) of the batch, in one transaction.

    Parameters
    ----------
    db_path
        The DuckDB file (created with its tables on first use).
    entries
        Ledger entries as written by :meth:`clinical_ml.core.delivery.FileOutcome.ledger_row`.
    rejects
        ``(source, sha256)`` -> frame of ``row_number``, ``reason`` for each entry with row rejects.
    """
    db_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db_path))
    try:
        con.execute(LEDGER_DDL)
        con.execute("BEGIN TRANSACTION")
        placeholders = ", ".join("?" for _ in _LEDGER_COLUMNS)
        for e in entries:
            con.execute(
                f"INSERT OR REPLACE INTO ledger ({', '.join(_LEDGER_COLUMNS)}) VALUES ({placeholders})",
                _row(e),
            )
        for e in entries:
            con.execute(
                "DELETE FROM rejects WHERE batch_id = ? AND source = ? AND sha256 = ?",
                [e["batch_id"], e["source"], e.get("sha256") or ""],
            )
            frame = rejects.get((e["source"], e.get("sha256") or ""))
            if frame is not None and frame.height:
                staged = frame.select(
                    pl.lit(e["batch_id"]).alias("batch_id"),
                    pl.lit(e["source"]).alias("source"),
                    pl.lit(e.get("sha256") or "").alias("sha256"),
                    pl.col("row_number").cast(pl.Int64),
                    pl.col("reason"),
                )
                con.register("staged_rejects", staged.to_arrow())
                con.execute("INSERT INTO rejects SELECT * FROM staged_rejects")
                con.unregister("staged_rejects")
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):  # no transaction open: the original error is the one to see
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()


def read_ledger(db_path: Path, *, batch_id: str | None = None) -> pl.DataFrame:
    """Ledger rows (all, or of one batch), opened read-only."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        q = (
            "SELECT * FROM ledger"
            + (" WHERE batch_id = $b" if batch_id else "")
            + " ORDER BY batch_id, source"
        )
        return con.sql(q, params={"b": batch_id} if batch_id else None).pl()
    finally:
        con.close()


def rejects_by_reason(db_path: Path, *, batch_id: str) -> pl.DataFrame:
    """Counts of row rejects per source and reason for one batch."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        return con.sql(
            "SELECT source, reason, count(*) AS n FROM rejects WHERE batch_id = $b GROUP BY ALL ORDER BY ALL",
            params={"b": batch_id},
        ).pl()
    finally:
        con.close()
