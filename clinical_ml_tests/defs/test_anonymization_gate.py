"""The anonymization multi-asset invoked on its own: the release gate blocks, empty batches pass through."""

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from clinical_ml.core import deid_release
from clinical_ml.core.anonymization import DEID_COLUMNS
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


def _no_remedy(
    *, patients, encounters, events, policy, released=None, carried=None, race_suppressible=None
) -> Remedied:
    risk = measure_risk(quasi_identifiers(patients, encounters, policy=policy), k=policy.k, released=released)
    return Remedied(patients, encounters, events, risk, risk, 0, 0, 0, 0, 0, 0)


def test_the_gate_withholds_a_batch_whose_release_is_not_k_anonymous(landed, monkeypatch):
    root, batch = landed
    _stage_raw(root, batch)
    with dg.instance_for_test() as instance:
        ok = _materialize(root, batch, instance)
        assert ok.success
        record = read_json(root / "deid" / "privacy" / f"{batch}.json")
        share = record["subjects_withheld"] / record["before_suppression"]["subjects"]
        for (_, name), passed in _checks(ok).items():  # the WARN check says whether too many were held back
            assert passed == (name != "suppression_within_limit" or share <= 0.05), name
        published = {t: root / "deid" / t / f"{batch}.parquet" for t in TABLES}
        assert all(p.exists() for p in published.values())
        enc = pl.read_parquet(published["encounters"])
        assert tuple(enc.columns) == DEID_COLUMNS["encounters"]

        # the same batch again, with the remedies switched off: the gate must measure and refuse it
        monkeypatch.setattr(deid_release, "enforce_k_anonymity", _no_remedy)
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
        assert frame.height == 0 and tuple(frame.columns) == DEID_COLUMNS[t]


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


def test_a_ranged_run_gates_each_batch_on_its_own(tmp_path, monkeypatch):
    """A backfill run over several batches (BackfillPolicy) releases exactly what one run per batch would:
    the batch that fails k-anonymity is withheld, the others are released, each batch is recorded with its
    own figures, and the run's blocking check fails naming that batch only."""
    h = generate_hospital(tmp_path / "landing", SyntheticConfig(n_patients=600, n_batches=3, seed=6))
    batches, held = h.batch_ids, h.batch_ids[1]
    real_remedy = deid_release.enforce_k_anonymity

    def remedy_all_but_one(
        *, patients, encounters, events, policy, released=None, carried=None, race_suppressible=None
    ) -> Remedied:
        frames = {"patients": patients, "encounters": encounters, "events": events}
        if encounters.height and encounters["batch_id"][0] == held:
            return _no_remedy(**frames, policy=policy, released=released)
        return real_remedy(
            **frames, policy=policy, released=released, carried=carried, race_suppressible=race_suppressible
        )

    monkeypatch.setattr(deid_release, "enforce_k_anonymity", remedy_all_but_one)
    roots = {"ranged": tmp_path / "ranged", "single": tmp_path / "single"}
    for root in roots.values():
        root.mkdir()
        (root / "landing").symlink_to(tmp_path / "landing", target_is_directory=True)
        for b in batches:
            _stage_raw(root, b)
    resources = {"anonymization": AnonymizationSettings(pseudonym_seed=3)}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(BATCH_PARTITIONS_NAME, batches)
        ranged = dg.materialize(
            [anon.anonymized_cohort],
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": batches[0],
                "dagster/asset_partition_range_end": batches[-1],
            },
            resources={**resources, "zones": DataZones(root=str(roots["ranged"]))},
            raise_on_error=False,
        )
        singles = [
            dg.materialize(
                [anon.anonymized_cohort],
                partition_key=b,
                instance=instance,
                resources={**resources, "zones": DataZones(root=str(roots["single"]))},
                raise_on_error=False,
            )
            for b in batches
        ]
    assert [s.success for s in singles] == [b != held for b in batches]
    assert not ranged.success  # the failed blocking check fails the run's step, as for the one batch

    meta = {
        (e.asset_key.to_user_string(), e.partition): e.event_specific_data.materialization.metadata
        for e in ranged.get_asset_materialization_events()
    }
    assert set(meta) == {(f"anonymized_{t}", b) for t in TABLES for b in batches}
    for t in TABLES:
        for b in batches:
            assert meta[(f"anonymized_{t}", b)]["released"].value is (b != held)
            assert (meta[(f"anonymized_{t}", b)]["dagster/row_count"].value > 0) is (b != held)
    assert meta[("anonymized_encounters", held)]["k_min"].value < 5
    assert all(meta[("anonymized_encounters", b)]["k_min"].value >= 5 for b in batches if b != held)

    checks = {(e.asset_key.to_user_string(), e.check_name): e for e in ranged.get_asset_check_evaluations()}
    assert len(checks) == len(ranged.get_asset_check_evaluations())  # one result per check for the run
    for t in TABLES:
        gate = checks[(f"anonymized_{t}", "k_anonymity_meets_minimum")]
        assert gate.passed is False and gate.metadata["batches_failed"].value == [held]
        assert gate.metadata["failures"].value[held]["k_min"] < 5
        assert checks[(f"anonymized_{t}", "no_direct_identifiers")].passed is True

    # what was released, withheld and pseudonymized is what one run per batch gives
    for t in TABLES:
        for b in batches:
            paths = [root / "deid" / t / f"{b}.parquet" for root in roots.values()]
            assert [p.exists() for p in paths] == [b != held] * 2
            if b != held:  # row order is not part of the contract (the MEDS writer sorts)
                ranged_rows, single_rows = (pl.read_parquet(p).sort(pl.all()) for p in paths)
                same = ranged_rows.equals(single_rows)
                assert same, f"{t} of batch {b} differs between the ranged run and the single runs"
    for root in roots.values():
        assert read_json(root / "deid" / "privacy" / f"{held}.json")["released"] is False


def _failure_message(res: dg.ExecuteInProcessResult) -> str:
    failure = next(e for e in res.all_events if e.is_step_failure)
    error, message = failure.step_failure_data.error, ""
    while error is not None:
        message, error = message + error.message, error.cause
    return message


@pytest.mark.parametrize("change", ["vault deleted", "vault replaced", "mode switched to hmac"])
def test_a_returning_patient_never_gets_a_second_pseudonym(tmp_path, monkeypatch, change):
    """Issue #17 class 7: a deleted or replaced vault, or a switch from vault to HMAC mode in a running
    deployment, gave returning patients a second pseudonym. The next batch now stops with what to do, writes
    nothing, and the released batches and the landing zone stay as they were."""
    h = generate_hospital(tmp_path / "landing", SyntheticConfig(n_patients=400, n_batches=2, seed=8))
    first, second = h.batch_ids
    for b in (first, second):
        _stage_raw(tmp_path, b)
    with dg.instance_for_test() as instance:
        assert _materialize(tmp_path, first, instance).success
        vault = tmp_path / "phi" / "vault"
        settings: dict = {}
        if change == "vault deleted":
            for f in vault.iterdir():
                f.unlink()
        elif change == "vault replaced":  # e.g. another deployment's vault restored by mistake
            other = tmp_path / "other"
            other.mkdir()
            (other / "landing").symlink_to(tmp_path / "landing", target_is_directory=True)
            _stage_raw(other, second)
            assert _materialize(other, second, instance).success
            for f in (other / "phi" / "vault").iterdir():
                f.replace(vault / f.name)
        else:
            monkeypatch.setenv("CLINICAL_ML_PSEUDONYM_KEY", "k" * 40)
            settings = {"pseudonym_mode": "hmac", "hmac_secret": "k" * 40}
        landing_before = sorted(p.name for p in (tmp_path / "landing" / second).iterdir())
        res = _materialize(tmp_path, second, instance, **settings)
    assert not res.success
    message = _failure_message(res)
    if change == "mode switched to hmac":
        assert (
            "pseudonym mode is 'hmac', but 1 batches already released were pseudonymised in 'vault'"
            in message
        )
        assert "CLINICAL_ML_PSEUDONYM_MODE=vault" in message
    else:
        assert "Restore data/phi/vault from the phi zone's backup" in message
        assert ("missing or empty" in message) is (change == "vault deleted")
    # nothing of the second batch was released; the first and the landing zone are untouched
    for t in TABLES:
        assert not (tmp_path / "deid" / t / f"{second}.parquet").exists()
        assert (tmp_path / "deid" / t / f"{first}.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "landing" / second).iterdir()) == landing_before


def test_race_is_kept_and_the_rare_held_back_unless_the_settings_say_suppress(landed, tmp_path):
    root, batch = landed
    records, held = {}, {}
    for remedy in ("hold_back", "suppress"):
        run = tmp_path / remedy
        run.mkdir()
        (run / "landing").symlink_to(root / "landing")
        _stage_raw(run, batch)
        with dg.instance_for_test() as instance:
            assert _materialize(run, batch, instance, race_remedy=remedy).success
        records[remedy] = read_json(run / "deid" / "privacy" / f"{batch}.json")
        held[remedy] = pl.read_parquet(run / "phi" / "held" / f"{batch}.parquet")
    assert records["hold_back"]["race_suppressed"] == 0 < records["suppress"]["race_suppressed"]
    assert records["hold_back"]["subjects_withheld"] > records["suppress"]["subjects_withheld"]
    # every person withheld is listed in the phi zone's hold record, to be judged again with the next batch
    assert held["hold_back"].height == records["hold_back"]["subjects_withheld"]
    assert set(held["hold_back"]["status"]) == {"held"}
    with dg.instance_for_test() as instance:
        bad = _materialize(tmp_path / "hold_back", batch, instance, race_remedy="drop")
    assert not bad.success
    assert "race_remedy must be 'hold_back' or 'suppress'" in str(
        bad.get_step_failure_events()[0].event_specific_data
    )
