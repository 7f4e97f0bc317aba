"""The anonymization multi-asset invoked on its own: the release gate blocks, empty batches pass through."""

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clinical_ml.core.ingestion import empty_accepted, ingest_file
from clinical_ml.core.reidentification import Remedied, measure_risk, quasi_identifiers
from clinical_ml.core.storage import read_json, write_parquet
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml.defs.anonymization import assets as anon
from clinical_ml.defs.conventions import BATCH_PARTITIONS_NAME
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml.resources.zones import DataZones

SOURCES = ("patients", "encounters", "labs", "vitals")
TABLES = ("patients", "encounters", "events")


@pytest.fixture(scope="module")
def landed(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("gate_root")
    h = generate_hospital(root / "landing", SyntheticConfig(n_patients=500, n_batches=1, seed=5))
    return root, h.batch_ids[0]


def _stage_raw(root: Path, batch: str, *, empty: set[str] = frozenset()) -> None:
    for s in SOURCES:
        frame = (
            empty_accepted(s)
            if s in empty
            else ingest_file(root / "landing" / batch / f"{s}.csv", s).accepted
        )
        write_parquet(frame, root / "phi" / "raw" / s / f"{batch}.parquet")


def _materialize(
    root: Path, batch: str, instance: dg.DagsterInstance, **settings
) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, [batch])
    return dg.materialize(
        [anon.anonymized_cohort],
        partition_key=batch,
        instance=instance,
        resources={
            "zones": DataZones(root=str(root)),
            "anonymization": AnonymizationSettings(pseudonym_seed=3, **settings),
        },
        raise_on_error=False,
    )


def _checks(result: dg.ExecuteInProcessResult) -> dict[tuple[str, str], bool]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()
    }


def _no_remedy(*, patients, encounters, events, policy) -> Remedied:
    risk = measure_risk(quasi_identifiers(patients, encounters, policy=policy), k=policy.k)
    return Remedied(patients, encounters, events, risk, risk, 0, 0, 0, 0, 0, 0)


def test_the_gate_withholds_a_batch_whose_release_is_not_k_anonymous(landed, monkeypatch):
    root, batch = landed
    _stage_raw(root, batch)
    with dg.instance_for_test() as instance:
        ok = _materialize(root, batch, instance)
        assert ok.success
        assert all(_checks(ok).values())
        published = {t: root / "deid" / t / f"{batch}.parquet" for t in TABLES}
        assert all(p.exists() for p in published.values())
        enc = pl.read_parquet(published["encounters"])
        assert tuple(enc.columns) == anon.DEID_COLUMNS["encounters"]

        # the same batch again, with the remedies switched off: the gate must measure and refuse it
        monkeypatch.setattr(anon, "enforce_k_anonymity", _no_remedy)
        blocked = _materialize(root, batch, instance)
    assert not blocked.success  # a failed blocking check fails the run, so nothing downstream runs
    checks = _checks(blocked)
    assert not any(v for (_, name), v in checks.items() if name == "k_anonymity_meets_minimum")
    assert all(v for (_, name), v in checks.items() if name == "no_direct_identifiers")
    assert not any(p.exists() for p in published.values())  # the earlier release is withdrawn too
    record = read_json(root / "deid" / "privacy" / f"{batch}.json")
    assert record["released"] is False and record["published"]["k_min"] < 5


def test_an_empty_partition_is_anonymized_to_empty_tables(landed):
    root, batch = landed
    _stage_raw(root, batch, empty=set(SOURCES))
    with dg.instance_for_test() as instance:
        res = _materialize(root, batch, instance)
    assert res.success and all(_checks(res).values())
    for t in TABLES:
        frame = pl.read_parquet(root / "deid" / t / f"{batch}.parquet")
        assert frame.height == 0 and tuple(frame.columns) == anon.DEID_COLUMNS[t]


def test_a_quarantined_file_leaves_the_rest_of_the_batch_anonymized(landed):
    root, batch = landed
    _stage_raw(root, batch)
    (root / "phi" / "raw" / "vitals" / f"{batch}.parquet").unlink()  # as when ingestion quarantined it
    with dg.instance_for_test() as instance:
        res = _materialize(root, batch, instance)
    assert res.success
    events = pl.read_parquet(root / "deid" / "events" / f"{batch}.parquet")
    assert events.height > 0 and not events["code"].str.starts_with("VITAL//").any()


def test_the_page_tells_a_privacy_officer_what_happened(landed):
    root, batch = landed
    _stage_raw(root, batch)
    with dg.instance_for_test() as instance:
        res = _materialize(root, batch, instance)
        mat = instance.get_latest_materialization_event(dg.AssetKey("anonymized_encounters"))
    assert res.success
    md = mat.asset_materialization.metadata["report"].value
    for words in (
        "Removed",
        "Generalized",
        "Suppressed",
        "k (smallest class)",
        "max risk",
        "`note`",
        "Released",
    ):
        assert words in md
    meta = mat.asset_materialization.metadata
    assert meta["k_min"].value >= meta["k_required"].value
    assert 0 < meta["max_prosecutor_risk"].value <= 1 / meta["k_required"].value


def test_hmac_mode_without_a_secret_fails_before_reading_any_data(landed):
    root, batch = landed
    _stage_raw(root, batch)
    with dg.instance_for_test() as instance:
        res = _materialize(root, batch, instance, pseudonym_mode="hmac")
    assert not res.success
    failure = next(e for e in res.all_events if e.is_step_failure)
    error, message = failure.step_failure_data.error, ""
    while error is not None:
        message, error = message + error.message, error.cause
    assert "CLINICAL_ML_PSEUDONYM_KEY" in message and "no default" in message.lower()
