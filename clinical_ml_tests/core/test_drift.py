import numpy as np
import pytest
from scipy import stats

from clinical_ml.core.drift import batch_drift, psi, reference_profile
from clinical_ml.core.drift_statistics import DriftThresholds, chi2_homogeneity_pvalue, ks_two_sample


@pytest.mark.parametrize(("n", "m"), [(500, 80), (2000, 2000), (60, 3000)])
def test_ks_statistic_matches_scipy_with_ties(n, m):
    rng = np.random.default_rng(n + m)
    a = np.round(rng.normal(size=n), 1)
    b = np.round(rng.normal(0.2, 1.0, size=m), 1)
    prof = reference_profile(a[:, None], ["x"])
    d, p = ks_two_sample(prof.columns[0], np.sort(b))
    ref = stats.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=0.2, abs=1e-6)


def test_ks_searches_the_batch_below_a_grid_point_again_only_where_it_holds_that_value():
    rng = np.random.default_rng(8)
    a = np.concatenate([rng.normal(size=3000), np.round(rng.normal(size=3000), 1)])
    b = np.sort(np.concatenate([rng.normal(0.1, 1.0, size=900), np.round(rng.normal(size=900), 1)]))
    col = reference_profile(a[:, None], ["x"]).columns[0]
    right = np.searchsorted(b, col.grid, side="right") / b.size
    left = np.searchsorted(b, col.grid, side="left") / b.size
    both_searches = max(np.abs(col.cdf_right - right).max(), np.abs(col.cdf_left - left).max())
    assert (left != right).any()  # the batch holds some of the grid's values
    assert ks_two_sample(col, b)[0] == both_searches
    assert ks_two_sample(col, b, at_grid=np.searchsorted(b, col.grid, side="right"))[0] == both_searches


def test_psi_is_zero_for_identical_samples_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x = rng.lognormal(size=5000)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)
    assert psi(x, x * 1.1) < psi(x, x * 1.5)


def test_missing_values_count_as_drift():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=4000)
    cur = rng.normal(size=4000)
    cur[:2000] = np.nan
    drift = batch_drift(reference_profile(ref[:, None], ["x"]), cur[:, None])[0]
    assert drift.missing_current == pytest.approx(0.5)
    assert drift.level == "error"


def test_chi2_homogeneity_is_not_significant_for_identical_shares():
    assert chi2_homogeneity_pvalue(np.array([100, 200, 300, 0]), np.array([10, 20, 30, 0])) > 0.9
    assert chi2_homogeneity_pvalue(np.array([100, 200, 300, 0]), np.array([60, 0, 0, 0])) < 1e-6


def test_only_shifted_columns_are_flagged_among_many():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(20000, 40))
    cur = rng.normal(size=(20000, 40))
    cur[:, [3, 17]] += 0.2
    cats_ref = {"unit": rng.integers(0, 4, 20000)}
    cats_cur = {"unit": rng.choice(4, 20000, p=[0.4, 0.2, 0.2, 0.2])}
    prof = reference_profile(ref, [f"x{j}" for j in range(40)], categorical=cats_ref)
    out = batch_drift(prof, cur, categorical=cats_cur, workers=2)
    flagged = {d.feature for d in out if d.drifted}
    assert {"x3", "x17", "unit"} <= flagged
    # the family-wise false alarm rate is 5% per batch: at most a stray column, never many
    assert len(flagged - {"x3", "x17", "unit"}) <= 1
    # a 0.2 SD shift is real but not material at the default ERROR levels
    assert {d.feature for d in out if d.level == "error"} <= {"unit"}


def test_small_stable_batches_stay_quiet():
    rng = np.random.default_rng(3)
    ref = rng.lognormal(size=(600, 60))
    prof = reference_profile(ref, [f"x{j}" for j in range(60)], thresholds=DriftThresholds())
    levels = [d.level for _ in range(30) for d in batch_drift(prof, rng.lognormal(size=(80, 60)))]
    assert levels.count("error") == 0


def test_categorical_unseen_category_is_drift():
    rng = np.random.default_rng(4)
    prof = reference_profile(np.zeros((3000, 0)), [], categorical={"unit": rng.integers(0, 3, 3000)})
    cur = {"unit": np.where(rng.random(500) < 0.5, 7, rng.integers(0, 3, 500))}
    assert batch_drift(prof, np.zeros((500, 0)), categorical=cur)[0].level == "error"


def test_ks_on_a_large_reference_is_within_its_stated_resolution_below_the_exact_statistic():
    rng = np.random.default_rng(5)
    a = rng.normal(size=60_000)  # more distinct values than the grid keeps
    b = rng.normal(0.05, 1.0, size=5_000)
    col = reference_profile(a[:, None], ["x"]).columns[0]
    assert col.grid.size < np.unique(a).size and col.ks_resolution > 0
    d, _ = ks_two_sample(col, np.sort(b))
    exact = stats.ks_2samp(a, b).statistic
    assert exact - col.ks_resolution - 1e-12 <= d <= exact + 1e-12


def test_missing_and_infinite_values_are_missing_and_sorting_keeps_the_rest():
    ref = np.array([1.0, 2.0, 3.0, 4.0, np.nan] * 40)
    cur = np.array([1.0, 2.0, np.inf, -np.inf, np.nan] * 40)
    d = batch_drift(reference_profile(ref[:, None], ["x"]), cur[:, None])[0]
    assert d.missing_reference == pytest.approx(0.2)
    assert d.missing_current == pytest.approx(0.6)
    assert d.mean_current == pytest.approx(1.5)


def test_a_drift_reason_names_the_measurement_clinically_then_the_column_and_reads_as_a_sentence():
    from clinical_ml.core.drift import drift_reason
    from clinical_ml.core.drift_statistics import STATISTICS

    rng = np.random.default_rng(0)
    ref = rng.normal(2.0, 0.5, size=(4000, 1))
    cur = np.where(rng.random((4000, 1)) < 0.3, np.nan, ref + 1.5)  # shifted, and more often missing
    profile = reference_profile(ref, ["lactate__min_24h"], thresholds=DriftThresholds())
    (drift,) = batch_drift(profile, cur)
    words = drift_reason(drift, statistics=list(STATISTICS))
    assert words.startswith("Lactate, lowest in 24 h (mmol/L) [lactate__min_24h]: ERROR (p = ")
    assert "; PSI " in words and "; change in share not measured +" in words and "Change" not in words


def _awkward(rng: np.random.Generator, n: int, *, wide: bool = False) -> np.ndarray:
    """Columns of every shape a batch may have: normal and lognormal with missing, infinite, signed zeros and
    ties; counts; constant; all missing; a far outlier; a subnormal range; a range too wide for a double when
    ``wide`` (the reference's mean would overflow: not for a profile)."""
    cols: list[np.ndarray] = []
    for j in range(4):
        v = rng.normal(size=n) if j % 2 == 0 else rng.lognormal(size=n)
        v[rng.random(n) < 0.08] = np.nan
        v[rng.random(n) < 0.02] = np.inf
        v[rng.random(n) < 0.02] = -np.inf
        v[rng.random(n) < 0.05] = -0.0
        v[rng.random(n) < 0.05] = 0.0
        v[: n // 3] = np.round(v[: n // 3], 1)  # ties
        cols.append(v)
    cols.append(rng.poisson(4.0, n).astype(float))
    cols.append(np.full(n, 2.5))
    cols.append(np.full(n, np.nan))
    outlier = rng.normal(size=n)
    outlier[7] = 1e15
    cols.append(outlier)
    cols.append(rng.integers(1, 50, n) * 5e-324)  # subnormals: the scale overflows
    if wide:
        v = rng.normal(size=n) * 1e307
        v[:2] = [-1.7e308, 1.7e308]  # max - min overflows
        cols.append(v)
    return np.column_stack(cols)


def test_the_batch_columns_sorted_in_chunks_are_numpy_s_column_by_column_sort_of_their_finite_values():
    from clinical_ml.core import drift

    rng = np.random.default_rng(5)
    cur = np.asfortranarray(_awkward(rng, 3000, wide=True))
    cur[::7, 0] = -np.nan  # NaN with its sign bit set, as arithmetic can make it
    for first, chunk in ((2, 6), (1, 1), (3, 4), (20, 20)):
        for matrix in (cur, np.ascontiguousarray(cur)):
            got = list(drift._observed_columns(matrix, first=first, chunk=chunk))
            assert len(got) == cur.shape[1]
            reused = drift._observed_columns(matrix, first=first, chunk=chunk, reuse=True)
            for j, (obs, one_at_a_time) in enumerate(zip(got, reused, strict=True)):
                assert np.array_equal(one_at_a_time, obs) and np.array_equal(
                    np.signbit(one_at_a_time), np.signbit(obs)
                )
                assert np.array_equal(obs, np.sort(cur[np.isfinite(cur[:, j]), j]))  # 0.0 == -0.0 here
                signs = np.signbit(obs[obs == 0]).astype(np.int8)
                assert signs.sum() == np.signbit(cur[cur[:, j] == 0, j]).sum()  # every -0.0 kept,
                assert not (np.diff(signs) > 0).any()  # and before every 0.0
    assert list(drift._observed_columns(np.zeros((5, 0)))) == []
    for rows in (0, 1):
        m = np.array([[3.0, np.nan, -np.inf]])[:rows]
        assert [v.tolist() for v in drift._observed_columns(m)] == [[3.0][:rows], [], []]


@pytest.mark.parametrize("n_rows", [40, 2500, 12_000])
def test_a_batch_gives_what_numpy_s_column_by_column_sort_gives_every_statistic_and_field(n_rows):
    from dataclasses import asdict

    from clinical_ml.core import drift

    rng = np.random.default_rng(11)
    ref, cur = _awkward(rng, 3000), np.asfortranarray(_awkward(rng, n_rows))
    cur[:, 0] += 0.1
    names = [f"x{j}" for j in range(ref.shape[1])]
    cats_ref = {"c0": rng.choice([-1, 0, 1, 2], 3000), "c1": rng.choice([0, 3], 3000)}
    cats_cur = {"c0": rng.choice([-1, 0, 1, 2, 5], n_rows), "c1": rng.choice([0, 3], n_rows, p=[0.3, 0.7])}
    profile = reference_profile(ref, names, categorical=cats_ref)
    got = batch_drift(profile, cur, categorical=cats_cur)
    # the definitions: numpy's sort, column by column, one column after the other
    m, th = drift.n_tests_for(profile), profile.thresholds
    expected = []
    for j, col in enumerate(profile.columns):
        raw = cur[:, j] if col.kind == "numeric" else cats_cur[col.name]
        sample = drift._column_sample(col, raw)
        values = drift._measure(col, sample, th.selected)
        p_min, drifted, level = drift._level(values, sample, col, th, th.selected, m)
        obs = sample.observed
        expected.append(
            drift.FeatureDrift(
                feature=col.name,
                kind=col.kind,
                values=values,
                missing_reference=col.n_missing / max(col.n_total, 1),
                missing_current=(sample.n_total - sample.n_observed) / max(sample.n_total, 1),
                mean_reference=col.mean,
                mean_current=float(obs.mean()) if obs.size else float("nan"),
                n_current=sample.n_total,
                p_min=p_min,
                drifted=drifted,
                level=level,
            )
        )
    rank = {lvl: i for i, lvl in enumerate(drift.LEVELS)}
    expected.sort(key=lambda d: (-rank[d.level], d.p_min, -np.nan_to_num(d.value("psi"))))
    assert [d.feature for d in got] == [d.feature for d in expected]
    for a, b in zip(got, expected, strict=True):
        for key, value in asdict(b).items():
            mine = asdict(a)[key]
            if isinstance(value, dict):
                assert mine.keys() == value.keys()
                for k, v in value.items():  # bit for bit, NaN where NaN
                    assert np.float64(mine[k]).tobytes() == np.float64(v).tobytes() or (
                        np.isnan(v) and np.isnan(mine[k])
                    )
            elif isinstance(value, float):
                assert np.float64(mine).tobytes() == np.float64(value).tobytes() or (
                    np.isnan(value) and np.isnan(mine)
                )
            else:
                assert mine == value
