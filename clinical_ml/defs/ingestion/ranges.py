"""Per-batch assets over a range of batch partitions, keeping per-batch semantics.

A new batch is one run of one partition (the landing sensor). A rebuild or a backfill of many batches would
pay Dagster's fixed cost per run (run record, events, step launch: seconds) once per batch, more than the
work of a daily batch; with `BATCH_BACKFILL_POLICY` a backfill launched from the UI (assets or
`batch_ingestion_job`) runs up to `MAX_BATCHES_PER_RUN` batches per run instead. The asset bodies loop over
`context.partition_keys` and handle each batch exactly as a run of that one batch would (validated,
quarantined, anonymized and gated on its own), then report:

* one materialization per batch with that batch's own metadata (`context.add_asset_metadata(...,
  partition_key=batch)`), plus `batches_in_run`;
* one result per asset check for the run, since Dagster accepts one result per check and step: it passes
  when the check passed for every batch of the run, and its metadata names the batches that failed with their
  own figures. A run of one batch reports exactly what it reported before.

What a run of several batches changes: a failing blocking check fails the run's step (as for one batch), so
the run is marked failed although the other batches of the range were released and recorded; the batch that
failed is withheld by the asset body itself (nothing written), whichever way it ran. An exception (not a
check failure: a bug, a full disk) fails the step for the whole range and records none of its batches;
rerun the range, or its batches one by one. A source's data version is then the range's (a hash of each
batch's version), since Dagster records one per asset and step.
"""

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

# backfill_policy on @asset is marked beta in Dagster 1.13; we pin the version and test ranged runs, so the
# warning (printed once per asset on every load, in `make demo` and the UI's logs) says nothing to a user
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)

MAX_BATCHES_PER_RUN = 30  # about a month of daily batches: 13 runs for a year instead of 365
BATCH_BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_BATCHES_PER_RUN)
MAX_FAILURES_LISTED = 20


@dataclass(frozen=True)
class BatchOutcome:
    """What one asset reports for one batch: materialization metadata, check results, data version."""

    metadata: Mapping[str, Any]
    checks: Sequence[dg.AssetCheckResult] = field(default_factory=tuple)
    data_version: str | None = None


def log_batches(context: dg.AssetExecutionContext, lines: Sequence[str]) -> None:
    """One log entry for the batches of a run instead of one per batch: each entry is an event written to
    the instance's event log, a fixed cost per entry that a ranged backfill would pay per batch."""
    if lines:
        context.log.info("\n".join(lines))


def _plain(value: object) -> object:
    return value.value if isinstance(value, dg.MetadataValue) else value


def merge_checks(per_batch: Mapping[str, Sequence[dg.AssetCheckResult]]) -> list[dg.AssetCheckResult]:
    """One result per check for a run of several batches: passed when every batch passed; the failing
    batches are named with their own figures (at most MAX_FAILURES_LISTED of them)."""
    by_check: dict[tuple[dg.AssetKey | None, str | None], list[tuple[str, dg.AssetCheckResult]]] = {}
    for batch, results in per_batch.items():
        for r in results:
            by_check.setdefault((r.asset_key, r.check_name), []).append((batch, r))
    merged = []
    for (asset_key, check_name), evaluated in by_check.items():
        failed = [(b, r) for b, r in evaluated if not r.passed]
        listed = failed[:MAX_FAILURES_LISTED]
        descriptions = [f"{b}: {r.description}" for b, r in listed if r.description]
        merged.append(
            dg.AssetCheckResult(
                asset_key=asset_key,
                check_name=check_name,
                passed=not failed,
                severity=(failed or evaluated)[0][1].severity,
                description=(
                    f"{len(failed)} of {len(evaluated)} batches failed"
                    + (": " + "; ".join(descriptions) if descriptions else "")
                )
                if failed
                else None,
                metadata={
                    "batches": len(evaluated),
                    "batches_failed": dg.MetadataValue.json([b for b, _ in failed]),
                    "failures": dg.MetadataValue.json(
                        {b: {k: _plain(v) for k, v in r.metadata.items()} for b, r in listed}
                    ),
                },
            )
        )
    return merged


def range_data_version(versions: Mapping[str, str]) -> str:
    text = "\n".join(f"{b}={v}" for b, v in sorted(versions.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def batch_result(
    context: dg.AssetExecutionContext,
    per_batch: Mapping[str, BatchOutcome],
    asset_key: dg.AssetKey | str | None = None,
) -> dg.MaterializeResult:
    """The materialization of one asset for the batches of this run (see the module's docstring)."""
    if len(per_batch) == 1:
        (only,) = per_batch.values()
        return dg.MaterializeResult(
            asset_key=asset_key,
            metadata=dict(only.metadata),
            data_version=None if only.data_version is None else dg.DataVersion(only.data_version),
            check_results=list(only.checks),
        )
    for batch, outcome in per_batch.items():
        context.add_asset_metadata(dict(outcome.metadata), asset_key=asset_key, partition_key=batch)
    versions = {b: o.data_version for b, o in per_batch.items() if o.data_version is not None}
    return dg.MaterializeResult(
        asset_key=asset_key,
        metadata={"batches_in_run": len(per_batch)},
        data_version=dg.DataVersion(range_data_version(versions)) if versions else None,
        check_results=merge_checks({b: o.checks for b, o in per_batch.items()}),
    )
