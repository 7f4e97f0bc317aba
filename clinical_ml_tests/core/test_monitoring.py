import pickle
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.artifacts import PickleCache, UnexpectedPickleContent
from clinical_ml.core.batch_monitoring import (
    categorical_codes,
    monitor_batch,
    prepare_reference,
    split_columns,
)
from clinical_ml.core.bootstrap import resample_counts
from clinical_ml.core.evaluation import (
    auroc,
    calibration_slope_intercept,
    calibration_slopes_weighted,
    confusion,
)
from clinical_ml.core.monitoring_config import MonitoringConfig, load_monitoring_config
from clinical_ml.core.performance_estimation import ConfidenceBasedEstimator
from clinical_ml.core.performance_monitoring import (
    label_maturity,
    metric_replicates,
    metrics_with_ci,
    newly_labelled,
    performance_by_period,
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


def _loop_metrics_with_ci(y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int, seed: int) -> dict:
    """Reference: one Python-loop bootstrap per metric, each replicate through the scalar metric functions."""

    def sens(yy: np.ndarray, pp: np.ndarray) -> float:
        tp, _, _, fn = confusion(yy, pp, threshold)
        return tp / (tp + fn) if tp + fn else float("nan")

    def oe(yy: np.ndarray, pp: np.ndarray) -> float:
        return float(yy.sum() / pp.sum()) if pp.sum() > 0 else float("nan")

    def slope(yy: np.ndarray, pp: np.ndarray) -> float:
        return calibration_slope_intercept(yy, pp)[0]

    out = {}
    for name, fn in (
        ("auroc", auroc),
        ("sensitivity", sens),
        ("observed_expected", oe),
        ("calibration_slope", slope),
    ):
        rng = np.random.default_rng(seed)
        vals = []
        for _ in range(n_boot):
            idx = rng.integers(0, y.size, y.size)
            v = fn(y[idx], p[idx])
            if np.isfinite(v):
                vals.append(v)
        value = fn(y, p)
        if not np.isfinite(value) or len(vals) < max(10, n_boot // 4):
            lo, hi = np.nan, np.nan
        else:
            lo, hi = np.quantile(vals, [0.025, 0.975])
        out[name] = {"value": float(value), "lower": float(lo), "upper": float(hi)}
    return out


def _case(kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "calibrated":
        p, y = _calibrated(500, 11)
    elif kind == "overconfident":
        p, y = _calibrated(300, 12)
        p = 1 / (1 + np.exp(-1.5 * np.log(p / (1 - p))))  # slope ~0.6; steeper diverges in the Newton fit
    elif kind == "tied_risks":
        p, y = _calibrated(400, 13)
        p = np.round(p, 2)
    else:  # rare: two events in 25 rows, so many replicates have one class only
        p, y = _calibrated(25, 14)
        y = np.zeros(25, dtype=bool)
        y[[3, 17]] = True
    return p, y


@pytest.mark.parametrize("kind", ["calibrated", "overconfident", "tied_risks", "rare"])
def test_vectorized_bootstrap_equals_the_per_replicate_loop_on_the_same_resamples(kind):
    p, y = _case(kind)
    got = metrics_with_ci(y, p, 0.2, n_boot=200, seed=3)
    want = _loop_metrics_with_ci(y, p, 0.2, n_boot=200, seed=3)
    for name, m in want.items():
        for key, v in m.items():
            assert got[name][key] == pytest.approx(v, rel=1e-9, abs=1e-9, nan_ok=True), (name, key)
    assert np.isfinite(got["auroc"]["lower"])


def test_vectorized_bootstrap_auroc_ci_agrees_with_an_independent_loop_within_monte_carlo_error():
    p, y = _calibrated(500, 21)
    got = metrics_with_ci(y, p, 0.2, n_boot=2000, seed=1)["auroc"]
    rng = np.random.default_rng(2)  # other resamples: agreement is up to Monte-Carlo error only
    reps = [auroc(y[idx], p[idx]) for idx in (rng.integers(0, y.size, y.size) for _ in range(2000))]
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert got["lower"] == pytest.approx(lo, abs=0.02) and got["upper"] == pytest.approx(hi, abs=0.02)
    assert got["lower"] < got["value"] < got["upper"]


def test_bootstrap_is_deterministic_for_a_seed_and_does_not_depend_on_the_block_size():
    p, y = _calibrated(300, 22)
    a = metrics_with_ci(y, p, 0.2, n_boot=100, seed=5)
    assert a == metrics_with_ci(y, p, 0.2, n_boot=100, seed=5)
    assert a != metrics_with_ci(y, p, 0.2, n_boot=100, seed=6)
    small = np.concatenate(
        list(resample_counts(300, n_boot=100, rng=np.random.default_rng(5), max_cells=7 * 300))
    )
    whole = np.concatenate(list(resample_counts(300, n_boot=100, rng=np.random.default_rng(5))))
    assert small.shape == (100, 300) and (small == whole).all() and (whole.sum(axis=1) == 300).all()


def test_batched_calibration_slope_equals_the_fit_on_each_resample():
    p, y = _calibrated(200, 23)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, y.size, (60, y.size))
    idx[0] = np.flatnonzero(~y)[0]  # one outcome class only
    counts = np.stack([np.bincount(i, minlength=y.size) for i in idx])
    got = calibration_slopes_weighted(y, p, counts)
    want = np.array([calibration_slope_intercept(y[i], p[i])[0] for i in idx])
    assert np.isnan(got[0]) and np.isnan(want[0])
    np.testing.assert_allclose(got[1:], want[1:], rtol=0, atol=1e-6)


def test_replicates_with_one_outcome_class_are_undefined_and_dropped():
    y = np.zeros(40, dtype=bool)
    y[7] = True  # one event: a resample without it has one class
    p = np.linspace(0.05, 0.6, 40)
    reps = metric_replicates(y, p, 0.2, n_boot=300, seed=0)
    without_event = next(resample_counts(40, n_boot=300, rng=np.random.default_rng(0)))[:, 7] == 0
    assert 0 < without_event.sum() < 300
    for name in ("auroc", "sensitivity", "calibration_slope"):
        assert np.isnan(reps[name][without_event]).all(), name
        assert np.isfinite(reps[name][~without_event]).all(), name
    assert np.isfinite(reps["observed_expected"]).all()


@pytest.mark.parametrize(("rows", "n_boot"), [(3, 16), (3, 60), (40, 200), (12, 40)])
def test_an_interval_needs_a_quarter_of_the_replicates_finite_and_at_least_ten(rows, n_boot):
    p = np.linspace(0.05, 0.6, rows)
    y = np.zeros(rows, dtype=bool)
    y[-1] = True  # one event: a resample without it has no AUROC
    finite = int(np.isfinite(metric_replicates(y, p, 0.2, n_boot=n_boot, seed=4)["auroc"]).sum())
    m = metrics_with_ci(y, p, 0.2, n_boot=n_boot, seed=4)["auroc"]
    assert np.isfinite(m["lower"]) == (finite >= max(10, n_boot // 4)), finite


def test_a_slice_with_one_outcome_class_has_no_auroc_slope_or_sensitivity():
    p, _ = _calibrated(50, 24)
    m = metrics_with_ci(np.zeros(50, dtype=bool), p, 0.2, n_boot=100, seed=0)
    for name in ("auroc", "sensitivity", "calibration_slope"):
        assert np.isnan([m[name]["value"], m[name]["lower"], m[name]["upper"]]).all(), name
    assert m["observed_expected"]["value"] == 0.0 and m["observed_expected"]["upper"] == 0.0


class _Planted:
    """A pickle that, when loaded by ``pickle.load``, would create a file (any call would do)."""

    def __init__(self, target) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_kept_drift_profile_is_read_back_whole_and_a_planted_file_runs_nothing(tmp_path):
    cfg = MonitoringConfig(subgroup_attributes=("sex",))
    cache = PickleCache(tmp_path / "reference" / "v1.pkl")
    built = cache.get_or_build(
        lambda: prepare_reference(
            _frame(800, 0), ["lactate__max_24h", "age_years", "sex__f", "sex__m"], config=cfg
        )
    )
    kept = cache.get_or_build(lambda: pytest.fail("a kept profile is not rebuilt"))
    batch = _frame(120, 2, 0.8)
    from_kept, from_built = (
        monitor_batch(batch_id="b", reference=r, current=batch, config=cfg) for r in (kept, built)
    )
    assert repr(from_kept) == repr(from_built)  # every value equal, NaN included (NaN != NaN under ==)

    ran = tmp_path / "code_ran"
    cache.path.write_bytes(pickle.dumps(_Planted(ran)))
    with pytest.raises(UnexpectedPickleContent, match=r"v1\.pkl was not written by clinical_ml"):
        cache.get_or_build(lambda: pytest.fail("a planted file is not silently rebuilt over"))
    assert not ran.exists()
    assert pickle.loads(cache.path.read_bytes()) is None and ran.exists()  # what plain pickle.load would do
