"""Scoring API: risk equals the model's, reasons in plain words, guardrails flag or abstain."""

import numpy as np
import pytest

from clinical_ml.core.modeling import train_model
from clinical_ml.core.scoring import (
    ABSTAIN_MISSINGNESS,
    ABSTAIN_OUT_OF_RANGE,
    WARN_OUT_OF_RANGE,
    Guardrails,
    Scorer,
    abstention_rate,
    score_rows,
    scoring_latency_ms,
)
from clinical_ml.core.training import training_ranges

NAMES = [f"code{j}__mean_24h" for j in range(6)] + ["code0__count_24h", "age_years"]


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1500, len(NAMES)))
    y = (rng.random(1500) < 1 / (1 + np.exp(-(1.5 * x[:, 0] - x[:, 1] - 1)))).astype(int)
    model = train_model(x[:1000], y[:1000], x[1000:], y[1000:], feature_names=NAMES, seed=1, max_rounds=80)
    return model, x, training_ranges(x[:1000], NAMES)


def test_risk_matches_the_model_and_reasons_are_plain_words(fitted):
    model, x, ranges = fitted
    scores = Scorer(model, 0.3, ranges).score(x[:50])
    assert np.allclose([s.risk for s in scores], model.predict(x[:50]), atol=1e-9)
    assert all(s.flagged == (s.risk >= 0.3) for s in scores)
    high = max(scores, key=lambda s: s.risk)
    assert high.reasons and all(r["contribution"] > 0 for r in high.reasons)
    assert high.reasons[0]["label"].startswith("average code")
    assert (
        high.reasons[0]["text"].startswith(high.reasons[0]["label"])
        and "raises the risk" in high.reasons[0]["text"]
    )


def test_positional_three_argument_scorer_still_scores_everything(fitted):
    model, x, ranges = fitted
    extreme = x[:1].copy()
    extreme[0, :6] = 50.0
    s = Scorer(model, 0.5, ranges).score(extreme)[0]
    assert not s.abstained and np.isfinite(s.risk)
    assert sum(f.startswith("out_of_range:") for f in s.flags) == 6


def test_out_of_range_patient_abstains_with_a_reason_code(fitted):
    model, x, ranges = fitted
    rows = x[:20].copy()
    rows[3, :4] = 40.0
    scores = Scorer(model, 0.5, ranges, Guardrails(max_out_of_range=3)).score(rows)
    assert scores[3].abstained and scores[3].reason_code == ABSTAIN_OUT_OF_RANGE
    assert np.isnan(scores[3].risk) and scores[3].reasons == []
    assert abstention_rate(scores) == pytest.approx(1 / 20)


def test_warn_policy_scores_with_a_warning(fitted):
    model, x, ranges = fitted
    row = x[:1].copy()
    row[0, :4] = -40.0
    s = Scorer(model, 0.5, ranges, Guardrails(policy="warn")).score(row)[0]
    assert not s.abstained and s.reason_code == WARN_OUT_OF_RANGE and np.isfinite(s.risk)


def test_too_much_missingness_abstains(fitted):
    model, x, ranges = fitted
    row = x[:1].copy()
    row[0, :5] = np.nan  # 5 of the 6 windowed values missing; the count and age are never "missing"
    s = Scorer(model, 0.5, ranges, Guardrails(max_missing_fraction=0.5)).score(row)[0]
    assert s.abstained and s.reason_code == ABSTAIN_MISSINGNESS
    assert any(f.startswith("missing_fraction:") for f in s.flags)


def test_tolerance_widens_the_range(fitted):
    model, x, ranges = fitted
    lo, hi = ranges[NAMES[0]]
    row = x[:1].copy()
    row[0, 0] = hi + 0.05 * (hi - lo)
    strict = Scorer(model, 0.5, ranges, Guardrails(range_tolerance=0.0)).score(row)[0]
    loose = Scorer(model, 0.5, ranges, Guardrails(range_tolerance=0.1)).score(row)[0]
    assert f"out_of_range:{NAMES[0]}" in strict.flags
    assert f"out_of_range:{NAMES[0]}" not in loose.flags


def test_latency_measurement_reports_percentiles(fitted):
    model, x, ranges = fitted
    lat = scoring_latency_ms(Scorer(model, 0.5, ranges, Guardrails()), x[:10], repeats=30, warmup=2)
    assert 0 < lat["p50_ms"] <= lat["p99_ms"]


def test_score_rows_takes_a_feature_frame_in_any_column_order(fitted):
    import polars as pl

    model, x, ranges = fitted
    scorer = Scorer(model, 0.3, ranges, Guardrails())
    frame = pl.DataFrame(x[:5], schema=NAMES).select(list(reversed(NAMES))).drop(NAMES[5])
    by_frame = score_rows(scorer, frame)
    expected = x[:5].copy()
    expected[:, 5] = np.nan
    assert [s.risk for s in by_frame] == [s.risk for s in scorer.score(expected)]
