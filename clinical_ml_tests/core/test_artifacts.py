"""The typed stores: each artifact has one owner, round-trips its type, and readers see committed files only."""

import polars as pl
from polars.testing import assert_frame_equal

from clinical_ml.core.artifacts import DeidStore, PhiStore, UseCaseStore
from clinical_ml.core.evaluation import MetricWithCI
from clinical_ml.core.features import CohortFlow, SplitInfo
from clinical_ml.core.registry import PromotionDecision
from clinical_ml.core.storage import committed
from clinical_ml.core.training import ChallengerFit, FitSummary
from clinical_ml.core.validation import Evaluation, OperatingThreshold


def _store(tmp_path) -> UseCaseStore:
    return DeidStore(tmp_path / "deid", tmp_path / "reports").use_case("uc")


def test_typed_artifacts_round_trip_through_their_files(tmp_path):
    store = _store(tmp_path)
    values = {
        store.cohort_flow: CohortFlow(
            10, (("under 18 years", 1), ("stay ended before the prediction time", 2)), 7, 9
        ),
        store.split_info: SplitInfo("temporal", "temporal", ("2026Q2",), ("2026Q1",), "a note"),
        store.threshold: OperatingThreshold(0.25, "v1"),
        store.evaluation: Evaluation(
            "v1", 0.25, 100, 12, {"auroc": MetricWithCI(0.8, 0.7, 0.9)}, ({"bin": 1.0},), ({"t": 0.1},), 200
        ),
        store.decision: PromotionDecision(False, "v2", "v1", ("AUROC too low",), ({"group": "minimums"},)),
        store.challenger.fit: ChallengerFit(
            "v1", FitSummary(50, 10, 5, 1, 30, {"a__last": (0.0, 1.0)}), ("a__last",)
        ),
    }
    for handle, value in values.items():
        assert not handle.exists()
        handle.write(value)
        assert handle.read() == value
    # every artifact of the use case lives under its own folder, nothing elsewhere
    written = {p.relative_to(tmp_path).parts[:3] for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {("deid", "usecases", "uc")}


def test_readers_never_see_the_temporary_file_of_an_unfinished_write(tmp_path):
    events = DeidStore(tmp_path / "deid", tmp_path / "reports").events
    events.part("2026-01-01").write(pl.DataFrame({"subject_id": [1], "code": ["A"]}))
    # what a killed writer leaves behind: a dot-named temporary file beside the data, possibly empty
    (events.folder / ".2026-01-02.parquet.abc123.parquet").write_bytes(b"")
    assert events.batch_ids() == ["2026-01-01"]
    assert_frame_equal(events.read_all(), pl.DataFrame({"subject_id": [1], "code": ["A"]}))
    assert committed(tmp_path / "missing", ".parquet") == []


def test_batch_parts_read_all_aligns_columns_only_when_asked(tmp_path):
    preds = _store(tmp_path).batch_predictions
    preds.part("2026-01-01").write(pl.DataFrame({"hadm_id": [1], "risk": [0.1]}))
    preds.part("2026-01-02").write(pl.DataFrame({"hadm_id": [2], "risk": [0.2], "extra": ["x"]}))
    relaxed = preds.read_all(relaxed=True)
    assert relaxed.height == 2 and relaxed["extra"].to_list() == [None, "x"]
    assert pl.DataFrame().equals(_store(tmp_path / "empty").batch_predictions.read_all())


def test_the_vault_is_empty_before_the_first_batch_and_reads_back_what_was_written(tmp_path):
    from clinical_ml.core.anonymization import Vault

    phi = PhiStore(tmp_path / "phi")
    assert phi.read_vault().patients.height == 0
    empty = Vault.empty()
    grown = Vault(
        empty.patients.extend(
            pl.DataFrame([[None] * len(empty.patients.columns)], schema=empty.patients.schema, orient="row")
        ),
        empty.encounters,
    )
    phi.write_vault(grown)
    assert phi.read_vault().patients.height == 1


def test_data_versions_hash_the_committed_parts_named(tmp_path):
    events = DeidStore(tmp_path / "deid", tmp_path / "reports").events
    events.part("b1").write(pl.DataFrame({"x": [1]}))
    events.part("b2").write(pl.DataFrame({"x": [2]}))
    versions = events.data_versions(["b1", "b2", "missing"])
    assert set(versions) == {"b1", "b2"} and versions["b1"] != versions["b2"]
    events.part("b1").write(pl.DataFrame({"x": [1]}))
    assert events.data_versions(["b1"]) == {"b1": versions["b1"]}  # same data, same version


def test_leftovers_of_writes_that_never_finished_are_swept_only_when_old(tmp_path):
    import os

    from clinical_ml.core.storage import sweep_leftovers

    events = DeidStore(tmp_path / "deid", tmp_path / "reports").events
    events.part("2026-01-01").write(pl.DataFrame({"x": [1]}))
    old = events.folder / ".2026-01-02.parquet.a1.parquet"
    fresh = events.folder / ".2026-01-03.parquet.b2.parquet"  # a write in progress right now
    nested = tmp_path / "deid" / "usecases" / "uc" / "predictions" / ".2026-01-02.parquet.c3.parquet"
    for path in (old, fresh, nested):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    now = os.path.getmtime(fresh)
    for path in (old, nested):
        os.utime(path, (now - 7200, now - 7200))
    # a killed release's staged imaging folder, and one being filled right now (an old folder, a new file)
    staged = tmp_path / "deid" / "imaging" / ".2026-01-02.staged"
    filling = tmp_path / "deid" / "imaging" / ".2026-01-03.staged"
    for folder in (staged, filling):
        (folder / "study" / "series").mkdir(parents=True)
        (folder / "study" / "series" / "1.dcm").write_bytes(b"")
    for path in [*staged.rglob("*"), staged, filling, filling / "study", filling / "study" / "series"]:
        os.utime(path, (now - 7200, now - 7200))
    os.utime(filling / "study" / "series" / "1.dcm", (now, now))
    assert sweep_leftovers(tmp_path / "deid", older_than_seconds=3600, now=now) == sorted(
        [old, nested, staged]
    )
    assert fresh.exists() and events.batch_ids() == ["2026-01-01"]
    assert not staged.exists() and (filling / "study" / "series" / "1.dcm").exists()


def test_the_features_table_is_written_with_lz4_and_the_other_tables_with_zstd(tmp_path):
    """The features table, read by every model step, is LZ4 (decoded faster); the rest keep zstd. Both read
    back as written."""
    import pyarrow.parquet as pq

    store = UseCaseStore(tmp_path / "deid", tmp_path / "reports", "uc")
    frame = pl.DataFrame({"hadm_id": [1, 2, 3], "lab": [1.5, None, 2.5]})
    store.features.write(frame)
    store.labels.write(frame)

    def codecs(path):
        meta = pq.ParquetFile(path).metadata
        return {meta.row_group(0).column(j).compression for j in range(meta.num_columns)}

    assert codecs(store.features.path) == {"LZ4"}
    assert codecs(store.labels.path) == {"ZSTD"}
    assert_frame_equal(store.features.read(), frame)
    assert_frame_equal(store.labels.read(), frame)
