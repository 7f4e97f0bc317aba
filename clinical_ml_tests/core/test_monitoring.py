from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.evaluation import auroc
from clinical_ml.core.monitoring import (
    ConfidenceBasedEstimator,
    MonitoringConfig,
    categorical_codes,
    label_maturity,
    load_monitoring_config,
    monitor_batch,
    newly_labelled,
    performance_by_period,
    prepare_reference,
    split_columns,
)


def _calibrated(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(shift, 1.0, n)
    p = 1 / (1 + np.exp(-(-2.0 + 1.2 * z)))
    return p, rng.random(n) < p


def test_confidence_based_estimate_tracks_realised_auroc_under_covariate_shift():
    p_ref, y_ref = _calibrated(20000, 0)
    est = ConfidenceBasedEstimator.fit(p_ref, y_ref, threshold=0.2)
    errors = []
    for seed, shift in [(1, 0.0), (2, 0.5), (3, -0.5), (4, 1.0)]:
        p, y = _calibrated(10000, seed, shift)
        errors.append(abs(est.estimate(p)["auroc"] - auroc(y, p)))
    assert max(errors) < 0.02


def test_confidence_based_sensitivity_is_expected_share_of_deaths_flagged():
    p, y = _calibrated(50000, 5)
    est = ConfidenceBasedEstimator.fit(p, y, threshold=0.2).estimate(p)
    assert est["sensitivity"] == pytest.approx(y[p >= 0.2].sum() / y.sum(), abs=0.02)


def test_label_maturity_uses_the_batch_date_and_the_stay_length():
    admit = datetime(2020, 3, 1)  # shifted dates: only the interval counts
    cohort = pl.DataFrame(
        {
            "batch_id": ["2026-01-05", "2026-01-05"],
            "admit_time": [admit, admit],
            "discharge_time": [admit + timedelta(days=2), admit + timedelta(days=9)],
            "death_time": [None, admit + timedelta(days=3)],
        }
    )
    assert label_maturity(cohort, as_of=date(2026, 1, 7)).to_list() == [True, False]
    assert label_maturity(cohort, as_of=date(2026, 1, 8)).to_list() == [True, True]


def test_newly_labelled_counts_matured_admissions_of_batches_the_model_never_saw():
    admit = datetime(2020, 3, 1)
    cohort = pl.DataFrame(
        {
            "batch_id": ["2026-01-04", "2026-01-05", "2026-01-05", "2026-01-06"],
            "admit_time": [admit] * 4,
            "discharge_time": [admit + timedelta(days=d) for d in (1, 1, 9, 1)],
            "death_time": [None] * 4,
        }
    )
    as_of = date(2026, 1, 7)  # 01-05 + 9 days has not closed; 01-06 + 1 day has
    assert newly_labelled(cohort, trained_on=["2026-01-04"], as_of=as_of) == 2
    assert newly_labelled(cohort, trained_on=["2026-01-04", "2026-01-05", "2026-01-06"], as_of=as_of) == 0
    assert newly_labelled(cohort.head(0), trained_on=[], as_of=as_of) == 0


def test_one_hot_groups_become_categoricals():
    numeric, groups = split_columns(["lactate__max_24h", "sex__f", "sex__m", "unit__neuro_icu", "age_years"])
    assert numeric == ["lactate__max_24h", "age_years"]
    assert groups == {"sex": ["sex__f", "sex__m"], "unit": ["unit__neuro_icu"]}
    codes = categorical_codes(pl.DataFrame({"a": [1.0, 0.0, None], "b": [0.0, 1.0, None]}), ["a", "b"])
    assert codes.tolist() == [0, 1, -1]


def _frame(n: int, seed: int, lactate_shift: float = 0.0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    lac = rng.lognormal(0.4, 0.4, n) + lactate_shift
    return pl.DataFrame(
        {
            "lactate__max_24h": lac,
            "age_years": rng.normal(63, 17, n),
            "sex__f": (rng.random(n) < 0.45).astype(float),
            "predicted_risk": 1 / (1 + np.exp(-(lac - 3))),
            "sex": np.where(rng.random(n) < 0.45, "F", "M"),
        }
    ).with_columns(sex__m=1 - pl.col("sex__f"))


def test_monitor_batch_flags_the_assay_shift_and_its_prediction_drift():
    cfg = MonitoringConfig(subgroup_attributes=("sex",))
    ref = prepare_reference(_frame(800, 0), ["lactate__max_24h", "age_years", "sex__f", "sex__m"], config=cfg)
    quiet = monitor_batch(batch_id="b1", reference=ref, current=_frame(120, 1), config=cfg)
    moved = monitor_batch(batch_id="b2", reference=ref, current=_frame(120, 2, 0.8), config=cfg)
    assert quiet.level != "error" and not quiet.retraining_requested
    assert moved.level == "error" and moved.retraining_requested
    assert moved.features[0].feature == "lactate__max_24h"
    assert moved.prediction is not None and moved.prediction.drifted
    assert {s["attribute"] for s in moved.subgroups} == {"sex"}


def test_performance_by_period_marks_maturing_periods_and_judges_mature_ones():
    p1, y1 = _calibrated(400, 7)
    p2, y2 = _calibrated(400, 8)
    bad = np.random.default_rng(9).permutation(p2)  # a model that no longer ranks
    frame = pl.DataFrame(
        {
            "batch_id": ["2026-01-05"] * 400 + ["2026-01-06"] * 400 + ["2026-01-07"] * 400,
            "predicted_risk": np.concatenate([p1, bad, p2]),
            "label": np.concatenate([y1, y2, y2]),
            "matured": [True] * 800 + [False] * 400,
        }
    )
    est = ConfidenceBasedEstimator.fit(p1, y1, threshold=0.2)
    cfg = MonitoringConfig(n_bootstrap=50)
    rows = {r["period"]: r for r in performance_by_period(frame, threshold=0.2, estimator=est, config=cfg)}
    assert rows["2026-01-05"]["status"] == "mature" and rows["2026-01-05"]["level"] == "ok"
    assert rows["2026-01-06"]["level"] == "error"
    assert rows["2026-01-07"]["status"] == "maturing" and rows["2026-01-07"]["realised"] is None
    assert rows["2026-01-07"]["estimated"]["auroc"] > 0.6


def test_monitoring_config_reads_levels_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("drift:\n  alpha_error: 0.001\n  psi_error: 0.3\nmin_subgroup_rows: 50\n")
    cfg = load_monitoring_config(good)
    assert cfg.drift.alpha_error == 0.001 and cfg.drift.psi_error == 0.3 and cfg.min_subgroup_rows == 50
    assert load_monitoring_config(tmp_path / "absent.yaml") == MonitoringConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("drift:\n  psi_eror: 0.3\n")
    with pytest.raises(ValueError, match="psi_eror"):
        load_monitoring_config(bad)
