"""Incremental features: the cached build equals a full build, and only batches whose inputs changed recompute."""

import os

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from clinical_ml.core.anonymization import Vault, anonymize_batch
from clinical_ml.core.feature_cache import build_features_incremental
from clinical_ml.core.features import build_cohort, build_features
from clinical_ml.core.ingestion import ingest_file
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml.core.usecase import load_use_case
from clinical_ml_tests.conftest import PROJECT_ROOT

SOURCES = ("patients", "encounters", "labs", "vitals")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_cache")
    h = generate_hospital(root / "landing", SyntheticConfig(n_patients=400, n_batches=4, seed=3))
    vault, pats, encs = Vault.empty(), [], []
    (root / "events").mkdir()
    for b in h.batch_ids:
        raw = {s: ingest_file(root / "landing" / b / f"{s}.csv", s).accepted for s in SOURCES}
        out = anonymize_batch(**raw, vault=vault, batch_id=b, rng=np.random.default_rng(1))
        vault = out.vault
        pats.append(out.patients)
        encs.append(out.encounters)
        out.events.write_parquet(root / "events" / f"{b}.parquet")
    uc = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    # with the events, as the graph builds it: the question is anchored at each stay's ICU admission event
    events = pl.scan_parquet(sorted((root / "events").glob("*.parquet")))
    cohort, _ = build_cohort(pl.concat(encs), pl.concat(pats), uc, events)
    return root, cohort, uc, h.batch_ids


def _files(root):
    return sorted((root / "events").glob("*.parquet"))


def test_cached_build_equals_full_build_and_reuses_unchanged_batches(hospital, tmp_path):
    root, cohort, uc, batches = hospital
    full = build_features(pl.scan_parquet(_files(root)), cohort, uc)
    first, s1 = build_features_incremental(_files(root), cohort, uc, tmp_path, batches_per_group=3)
    assert_frame_equal(first, full)
    assert (s1.computed, s1.reused, s1.event_files_indexed) == (len(batches), 0, len(batches))

    again, s2 = build_features_incremental(_files(root), cohort, uc, tmp_path)
    assert_frame_equal(again, full)
    assert (s2.computed, s2.reused, s2.event_files_indexed) == (0, len(batches), 0)


def test_a_new_batch_computes_only_its_part(hospital, tmp_path):
    root, cohort, uc, batches = hospital
    older = cohort.filter(pl.col("batch_id") != batches[-1])
    build_features_incremental(_files(root)[:-1], older, uc, tmp_path)
    out, stats = build_features_incremental(_files(root), cohort, uc, tmp_path)
    assert (stats.computed, stats.reused) == (1, len(batches) - 1)
    assert_frame_equal(out, build_features(pl.scan_parquet(_files(root)), cohort, uc))


def test_a_changed_event_file_recomputes_the_batches_it_feeds(hospital, tmp_path):
    root, cohort, uc, batches = hospital
    work = tmp_path / "events"
    work.mkdir()
    for f in _files(root):
        (work / f.name).write_bytes(f.read_bytes())
    cache = tmp_path / "cache"
    build_features_incremental(sorted(work.glob("*.parquet")), cohort, uc, cache)
    # a corrected delivery of the second batch: every lab value doubled
    second = work / f"{batches[1]}.parquet"
    ev = pl.read_parquet(second).with_columns(pl.col("numeric_value") * 2)
    ev.write_parquet(second)
    os.utime(second, ns=(1, 1))  # a distinct modification time even on coarse clocks
    out, stats = build_features_incremental(sorted(work.glob("*.parquet")), cohort, uc, cache)
    fed = cohort.join(ev.select("hadm_id").unique(), on="hadm_id")["batch_id"].n_unique()
    assert stats.computed == fed >= 1 and stats.event_files_indexed == 1
    assert_frame_equal(out, build_features(pl.scan_parquet(sorted(work.glob("*.parquet"))), cohort, uc))


def test_a_changed_cohort_row_recomputes_its_batch_and_dropped_batches_leave_the_cache(hospital, tmp_path):
    root, cohort, uc, batches = hospital
    build_features_incremental(_files(root), cohort, uc, tmp_path)
    first = cohort["hadm_id"][0]
    moved = cohort.with_columns(
        pl.when(pl.col("hadm_id") == first)
        .then(pl.col("prediction_time") + pl.duration(hours=1))
        .otherwise(pl.col("prediction_time"))
        .alias("prediction_time")
    ).filter(pl.col("batch_id") != batches[-1])
    out, stats = build_features_incremental(_files(root), moved, uc, tmp_path)
    assert stats.computed == 1 and stats.batches == len(batches) - 1
    assert len(list((tmp_path / "parts").glob("*.parquet"))) == len(batches) - 1
    assert_frame_equal(out, build_features(pl.scan_parquet(_files(root)), moved, uc))
