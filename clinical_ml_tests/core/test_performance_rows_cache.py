"""The monitoring report's performance rows kept per period: the report built from the kept rows is the report
computed afresh over the whole history, and a new batch recomputes only the periods whose inputs changed."""

import re
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.core import performance_monitoring
from clinical_ml.core.artifacts import DeidStore, UseCaseStore
from clinical_ml.core.champion_monitoring import (
    Champion,
    performance_rows_cache,
    realised_performance,
    score_batch,
)
from clinical_ml.core.modeling import train_model
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.registry import Lineage, ModelCard
from clinical_ml.core.reports import monitoring_report
from clinical_ml.core.scoring import Scorer
from clinical_ml.core.usecase import load_use_case
from clinical_ml_tests.conftest import PROJECT_ROOT

FIRST = date(2026, 1, 5)
CONFIG = MonitoringConfig(n_bootstrap=40, min_subgroup_rows=5)
TRAINED_DAYS = 3  # the champion's batches: their patients have a split, later ones none yet


def _champion() -> Champion:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] + rng.normal(size=400) > 1).astype(int)
    model = train_model(x[:300], y[:300], x[300:], y[300:], feature_names=["a__last", "b__last"], seed=0)
    trained_on = tuple(str(FIRST + timedelta(days=i)) for i in range(TRAINED_DAYS))
    card = ModelCard("uc", "v1", lineage=Lineage(batch_ids=trained_on))
    return Champion(card, Scorer(model=model, threshold=0.3, training_ranges={}))


def _frame(n_batches: int) -> pl.DataFrame:
    """Daily batches of 60 admissions whose outcomes become known 0 to 12 days after they land, with
    subgroups, derivation and validation patients (of the champion's batches), and outcomes unknown."""
    rng = np.random.default_rng(1)
    per = 60
    n = n_batches * per
    batches = [str(FIRST + timedelta(days=i // per)) for i in range(n)]
    admit = datetime(2020, 3, 1)
    x0 = rng.normal(size=n)
    return pl.DataFrame(
        {
            "subject_id": np.arange(n) + 1000,
            "hadm_id": np.arange(n),
            "prediction_time": [admit] * n,
            "batch_id": batches,
            "split": [
                s if i < TRAINED_DAYS * per else None
                for i, s in enumerate(rng.choice(["train", "tuning", "held_out"], size=n).tolist())
            ],
            "a__last": x0,
            "b__last": rng.normal(size=n),
            "label": pl.Series((x0 + rng.normal(size=n) > 1).tolist()).set(
                pl.Series(rng.random(n) < 0.1), None
            ),
            "admit_time": [admit] * n,
            "discharge_time": [admit + timedelta(days=int(d)) for d in rng.integers(0, 12, size=n)],
            "death_time": pl.Series([None] * n, dtype=pl.Datetime("us")),
            "sex": rng.choice(["F", "M"], size=n).tolist(),
            "age_band": rng.choice(["18-44", "45-64", "65+"], size=n).tolist(),
            "race_ethnicity": rng.choice(["White", "Black", "Asian"], size=n).tolist(),
        }
    )


def _score(store: UseCaseStore, frame: pl.DataFrame, champion: Champion, batches: list[str]) -> None:
    for b in batches:
        store.batch_predictions.part(b).write(score_batch(frame.filter(pl.col("batch_id") == b), champion))


def _report(rows: list[dict]) -> tuple[str, ...]:
    """The report and its summary, less the minute they were written (two reports may straddle one)."""
    parts = monitoring_report(
        use_case=load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml"),
        batches=[],
        performance=rows,
        decisions=[],
        config=CONFIG,
        model_version="v1",
        code_version="c",
    )
    return tuple(re.sub(r"Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC", "Generated <minute>", p) for p in parts)


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The periods whose rows are computed (not read back), in order."""
    periods: list[str] = []
    compute = performance_monitoring._period_rows

    def counted(period, *args, **kwargs):
        periods.append(period)
        return compute(period, *args, **kwargs)

    monkeypatch.setattr(performance_monitoring, "_period_rows", counted)
    return periods


def test_the_report_from_kept_rows_is_the_report_computed_afresh(tmp_path, computed):
    store = DeidStore(tmp_path / "deid", tmp_path / "reports").use_case("uc")
    champion, frame = _champion(), _frame(20)
    batches = sorted(frame["batch_id"].unique().to_list())
    _score(store, frame, champion, batches[:19])
    history = frame.filter(pl.col("batch_id") != batches[19])

    fresh = realised_performance(store, champion, history, CONFIG, cache=False)
    assert len(computed) == 19 and not performance_rows_cache(store).folder.exists()
    first = realised_performance(store, champion, history, CONFIG)
    again = realised_performance(store, champion, history, CONFIG)
    assert len(computed) == 38  # the second call with the cache read every period back
    assert repr(first) == repr(again) == repr(fresh)
    assert {r["status"] for r in fresh} == {"mature", "maturing"} and any(r["realised"] for r in fresh)
    assert all(r["estimated"] for r in fresh)  # the label-free estimate too
    assert _report(again) == _report(fresh)

    # a new batch: its own period and those whose outcomes matured since are recomputed, no other
    computed.clear()
    _score(store, frame, champion, batches[19:])
    incremental = realised_performance(store, champion, frame, CONFIG)
    assert computed[-1] == batches[19] and 1 < len(computed) < 20, computed
    assert set(computed) < set(batches)
    assert repr(incremental) == repr(realised_performance(store, champion, frame, CONFIG, cache=False))
    assert _report(incremental) == _report(realised_performance(store, champion, frame, CONFIG, cache=False))


def test_new_levels_or_a_new_model_recompute_every_period(tmp_path, computed):
    store = DeidStore(tmp_path / "deid", tmp_path / "reports").use_case("uc")
    champion, frame = _champion(), _frame(4)
    _score(store, frame, champion, sorted(frame["batch_id"].unique().to_list()))
    realised_performance(store, champion, frame, CONFIG)
    computed.clear()
    stricter = MonitoringConfig(n_bootstrap=40, min_subgroup_rows=5, auroc_min=0.9)
    rows = realised_performance(store, champion, frame, stricter)
    assert len(computed) == 4
    assert repr(rows) == repr(realised_performance(store, champion, frame, stricter, cache=False))
    computed.clear()
    other = Champion(champion.card, Scorer(model=champion.scorer.model, threshold=0.6, training_ranges={}))
    rows = realised_performance(store, other, frame, CONFIG)
    assert len(computed) == 4
    assert repr(rows) == repr(realised_performance(store, other, frame, CONFIG, cache=False))


def test_a_damaged_kept_period_is_recomputed(tmp_path, computed):
    store = DeidStore(tmp_path / "deid", tmp_path / "reports").use_case("uc")
    champion, frame = _champion(), _frame(3)
    batches = sorted(frame["batch_id"].unique().to_list())
    _score(store, frame, champion, batches)
    fresh = realised_performance(store, champion, frame, CONFIG)
    performance_rows_cache(store).path(batches[1]).write_bytes(b"not a pickle")
    computed.clear()
    assert repr(realised_performance(store, champion, frame, CONFIG)) == repr(fresh)
    assert computed == [batches[1]]


@pytest.mark.parametrize("n", [1, 40, 41, 364])
def test_plots_over_batches_name_every_batch_up_to_forty_and_every_kth_beyond(n):
    from clinical_ml.core.plots import MAX_BATCH_LABELS, _tick_step

    named = range(0, n, _tick_step(n))
    assert (
        len(named) == n if n <= MAX_BATCH_LABELS else MAX_BATCH_LABELS // 2 < len(named) <= MAX_BATCH_LABELS
    )
