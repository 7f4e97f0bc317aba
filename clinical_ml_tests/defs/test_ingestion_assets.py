"""The ingestion assets in process: a quarantined file fails only its own check, the good files of the batch
proceed, the ledger lands in DuckDB, and unchanged input keeps its data versions."""

import json

import dagster as dg
import polars as pl
import pytest

from clinical_ml.core.landing import IMAGING_SOURCE, OPTIONAL_SOURCES
from clinical_ml.core.ledger import read_ledger, rejects_by_reason
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital, write_completion_marker
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
from clinical_ml.defs.ingestion.assets import raw_assets
from clinical_ml.resources.zones import DataZones

SOURCES = ("patients", "encounters", "labs", "vitals")


@pytest.fixture
def delivered(tmp_path):
    h = generate_hospital(tmp_path / "landing", SyntheticConfig(n_patients=60, n_batches=1, seed=4))
    batch = tmp_path / "landing" / h.batch_ids[0]
    data = (batch / "labs.csv").read_bytes()
    (batch / "labs.csv").write_bytes(data[: len(data) - 25])  # cut mid-row
    write_completion_marker(batch)
    return tmp_path, h.batch_ids[0]


def _materialize(instance, root, batch_id):
    return dg.materialize(
        raw_assets,
        partition_key=batch_id,
        instance=instance,
        resources={"zones": DataZones(root=str(root))},
        raise_on_error=False,
    )


def test_quarantined_file_fails_its_check_and_the_rest_of_the_batch_proceeds(delivered):
    root, batch_id = delivered
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, [batch_id])
        result = _materialize(instance, root, batch_id)
        assert result.success
        checks = {
            (e.asset_key.to_user_string(), e.check_name): e.passed
            for e in result.get_asset_check_evaluations()
        }
        assert checks[("raw_labs", "delivered_file_accepted")] is False
        for s in ("patients", "encounters", "vitals"):
            assert checks[(f"raw_{s}", "delivered_file_accepted")] is True
        assert checks[("landing_ledger", "every_row_accounted_for")] is True
        meta = {
            m.asset_key.to_user_string(): m.metadata
            for m in result.get_asset_materialization_events()
            for m in [m.event_specific_data.materialization]
        }
        assert meta["raw_labs"]["status"].value == "quarantined"
        assert meta["raw_labs"]["reason_code"].value == "truncated_file"
        assert meta["raw_vitals"]["dagster/row_count"].value > 0

    # The quarantined source keeps the Parquet contract: same columns, no rows.
    labs = pl.read_parquet(root / "phi" / "raw" / "labs" / f"{batch_id}.parquet")
    vitals = pl.read_parquet(root / "phi" / "raw" / "vitals" / f"{batch_id}.parquet")
    assert labs.height == 0 and {"encounter_id", "value", "unit", "implausible"} <= set(labs.columns)
    assert set(vitals.columns) >= set(labs.columns) - {"loinc_code", "specimen_time", "result_time"}
    reason = json.loads((root / "quarantine" / batch_id / "labs.csv.reason.json").read_text())
    assert reason["reason_code"] == "truncated_file" and reason["byte_offset"] > 0

    ledger = read_ledger(root / "archive" / "ledger.duckdb", batch_id=batch_id)
    assert dict(zip(ledger["source"], ledger["status"], strict=True)) == {
        "patients": "accepted",
        "encounters": "accepted",
        "labs": "quarantined",
        "vitals": "accepted",
    }
    assert rejects_by_reason(root / "archive" / "ledger.duckdb", batch_id=batch_id).height == 0


def test_unchanged_input_keeps_its_data_versions(delivered):
    root, batch_id = delivered
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, [batch_id])
        versions = []
        for _ in range(2):
            _materialize(instance, root, batch_id)
            versions.append(
                {
                    s: instance.get_latest_data_version_record(
                        dg.AssetKey(f"raw_{s}"), partition_key=batch_id
                    ).asset_materialization.tags["dagster/data_version"]
                    for s in SOURCES
                }
            )
        assert versions[0] == versions[1]
        assert len(set(versions[0].values())) == 4


RANGE_TAGS = ("dagster/asset_partition_range_start", "dagster/asset_partition_range_end")


def test_a_ranged_run_ingests_each_batch_on_its_own(tmp_path):
    """A backfill run over several batches (BackfillPolicy): one materialization per batch with that batch's
    own figures, the quarantined file of one batch fails the check for that batch only, one ledger entry per
    file of every batch."""
    h = generate_hospital(tmp_path / "landing", SyntheticConfig(n_patients=90, n_batches=3, seed=7))
    batches, bad = h.batch_ids, h.batch_ids[1]
    labs = tmp_path / "landing" / bad / "labs.csv"
    labs.write_bytes(labs.read_bytes()[:-25])  # cut mid-row
    write_completion_marker(tmp_path / "landing" / bad)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
        result = dg.materialize(
            raw_assets,
            instance=instance,
            tags=dict(zip(RANGE_TAGS, (batches[0], batches[-1]), strict=True)),
            resources={"zones": DataZones(root=str(tmp_path))},
            raise_on_error=False,
        )
        assert result.success  # delivered_file_accepted is not blocking: the batch's other sources proceed
        assert len({r.run_id for r in instance.get_runs()}) == 1
        meta = {
            (e.asset_key.to_user_string(), e.partition): e.event_specific_data.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        delivered = (*SOURCES, *OPTIONAL_SOURCES, IMAGING_SOURCE)
        assert set(meta) == {(f"raw_{s}", b) for s in delivered for b in batches} | {
            ("landing_ledger", b) for b in batches
        }
        for b in batches:
            for optional in (*OPTIONAL_SOURCES, IMAGING_SOURCE):  # not delivered and optional: nothing wrong
                assert meta[(f"raw_{optional}", b)]["status"].value == "not_delivered"
            status = meta[("raw_labs", b)]["status"].value
            assert status == ("quarantined" if b == bad else "accepted")
            assert meta[("raw_labs", b)]["batches_in_run"].value == 3
            assert meta[("raw_vitals", b)]["dagster/row_count"].value > 0
        assert meta[("raw_labs", bad)]["reason_code"].value == "truncated_file"
        assert meta[("raw_labs", bad)]["dagster/row_count"].value == 0
        # each batch's own figures, not one copy for the range
        assert len({meta[("raw_vitals", b)]["sha256"].value for b in batches}) == 3

        checks = {
            (e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()
        }
        accepted = checks[("raw_labs", "delivered_file_accepted")]
        assert accepted.passed is False
        assert accepted.metadata["batches_failed"].value == [bad]
        assert accepted.metadata["failures"].value[bad]["reason_code"] == "truncated_file"
        assert bad in (accepted.description or "")
        for s in ("patients", "encounters", "vitals", "labels"):
            assert checks[(f"raw_{s}", "delivered_file_accepted")].passed is True
        assert checks[("landing_ledger", "every_row_accounted_for")].passed is True
        assert checks[("landing_ledger", "every_row_accounted_for")].metadata["batches"].value == 3

    for b in batches:
        ledger = read_ledger(tmp_path / "archive" / "ledger.duckdb", batch_id=b)
        assert dict(zip(ledger["source"], ledger["status"], strict=True)) == {
            "patients": "accepted",
            "encounters": "accepted",
            "labs": "quarantined" if b == bad else "accepted",
            "vitals": "accepted",
        }
