"""Drift statistics as registered objects: the Wasserstein distance against scipy, the registry, and the
generic presentation (tables and the stated thresholds follow the registered statistics and the config)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from clinical_ml.core.drift import batch_drift, n_tests_for, reference_profile
from clinical_ml.core.drift_statistics import (
    STATISTICS,
    DriftThresholds,
    Missingness,
    Wasserstein,
    registered,
)
from clinical_ml.core.reports import drift_markdown, drift_report
from clinical_ml.core.usecase import parse_use_case

USECASE = Path(__file__).resolve().parents[2] / "usecases" / "icu_mortality_24h.yaml"


def _wasserstein(a: np.ndarray, b: np.ndarray, **kwargs) -> float:
    profile = reference_profile(a[:, None], ["x"], **kwargs)
    return batch_drift(profile, b[:, None])[0].value("wasserstein")


@pytest.mark.parametrize(
    ("n", "m", "decimals"),
    [(500, 80, 1), (3000, 2000, None), (60, 3000, 0), (2000, 2000, 2), (1, 50, None)],
)
def test_wasserstein_equals_scipy_over_the_reference_sd(n, m, decimals):
    rng = np.random.default_rng(n * 7 + m)
    a, b = rng.lognormal(size=n + 1), rng.lognormal(0.3, 1.2, size=m)
    if decimals is not None:  # ties, as recorded values rounded to the assay's precision
        a, b = np.round(a, decimals), np.round(b, decimals)
    expected = stats.wasserstein_distance(a, b) / a.std()
    assert _wasserstein(a, b) == pytest.approx(expected, rel=1e-9)


def test_wasserstein_on_a_large_reference_is_within_its_stated_resolution():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=60_000), rng.normal(0.1, 1.1, size=5_000)  # more distinct values than the grid
    col = reference_profile(a[:, None], ["x"]).columns[0]
    assert col.grid.size < np.unique(a).size
    bound = col.ks_resolution * (a.max() - a.min()) / a.std()
    assert abs(_wasserstein(a, b) - stats.wasserstein_distance(a, b) / a.std()) <= bound


def test_wasserstein_ignores_missing_values_and_is_nan_for_a_constant_reference():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=1000), rng.normal(size=800)
    b_missing = np.concatenate([b, [np.nan] * 300])
    assert _wasserstein(a, b_missing) == pytest.approx(stats.wasserstein_distance(a, b) / a.std())
    assert np.isnan(_wasserstein(np.ones(100), b))


def test_wasserstein_is_zero_for_identical_samples_and_grows_with_the_shift():
    rng = np.random.default_rng(7)
    a = rng.lognormal(size=4000)
    assert _wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    distances = [_wasserstein(a, a + shift) for shift in (0.1, 0.3, 0.9)]
    assert distances == sorted(distances) and distances[0] > 0
    # a pure shift moves every value by the same amount: the distance is the shift in reference SDs
    assert distances[-1] == pytest.approx(0.9 / a.std(), rel=1e-9)


def test_wasserstein_is_reported_only_and_leaves_the_levels_unchanged():
    rng = np.random.default_rng(8)
    ref, cur = rng.normal(size=(3000, 6)), rng.normal(size=(3000, 6))
    cur[:, :3] += np.array([0.3, 0.6, 1.2])
    names = [f"x{j}" for j in range(6)]
    without = DriftThresholds(statistics=("psi", "ks", "missingness"))
    with_w = batch_drift(reference_profile(ref, names), cur)
    without_w = batch_drift(reference_profile(ref, names, thresholds=without), cur)
    assert [(d.feature, d.level, d.p_min) for d in with_w] == [
        (d.feature, d.level, d.p_min) for d in without_w
    ]
    assert all(np.isfinite(d.value("wasserstein")) for d in with_w)
    assert all(np.isnan(d.value("wasserstein")) for d in without_w)
    assert Wasserstein.pvalue_key is None


def test_every_registered_statistic_explains_itself_and_has_its_own_keys():
    keys = [k for s in STATISTICS for k in (s.key, s.pvalue_key) if k is not None]
    assert len(keys) == len(set(keys))
    assert len({s.name for s in STATISTICS}) == len(STATISTICS)
    for s in STATISTICS:
        assert s.label and s.meaning and s.method and s.kinds
    with pytest.raises(ValueError, match="nope"):
        registered(["psi", "nope"])
    assert DriftThresholds(statistics=["ks", "psi"]).statistics == ("psi", "ks")  # registry order, a tuple


def test_a_statistic_not_applying_to_a_kind_is_nan_there():
    rng = np.random.default_rng(9)
    prof = reference_profile(rng.normal(size=(500, 1)), ["x"], categorical={"unit": rng.integers(0, 3, 500)})
    out = {
        d.feature: d
        for d in batch_drift(prof, rng.normal(size=(400, 1)), categorical={"unit": rng.integers(0, 3, 400)})
    }
    assert np.isnan(out["unit"].value("wasserstein")) and np.isnan(out["unit"].value("ks_statistic"))
    assert np.isfinite(out["unit"].value("psi")) and np.isfinite(out["x"].value("wasserstein"))


def _drift():
    rng = np.random.default_rng(10)
    ref, cur = rng.normal(size=(2000, 3)), rng.normal(size=(2000, 3))
    cur[:, 0] += 1.0
    return batch_drift(reference_profile(ref, ["a", "b", "c"]), cur)


@pytest.mark.parametrize("names", [None, ("psi", "missingness")])
def test_markdown_table_has_one_column_per_selected_statistic(names):
    th = DriftThresholds() if names is None else DriftThresholds(statistics=names)
    drift = _drift()
    table = drift_markdown(drift, thresholds=th, label=str.upper).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head == ["Predictor", *(s.label for s in registered(names)), "p (min)", "Level"]
    assert len(table) == 2 + len(drift)
    first = [c.strip() for c in table[2].strip("|").split("|")]
    assert first[0] == drift[0].feature.upper() and first[-1] == drift[0].level


def test_drift_report_states_the_configured_thresholds_it_judges_by():
    use_case = parse_use_case(USECASE.read_text(), source="test.yaml")
    th = dataclasses.replace(DriftThresholds(), alpha_warn=0.07, alpha_error=0.003, psi_error=0.31)
    html, md = drift_report(
        use_case=use_case,
        batch_id="2024-01-01",
        drift=_drift(),
        thresholds=th,
        n_reference=2000,
        n_current=2000,
        model_version="v1",
        code_version="c1",
    )
    assert "0.07/m" in html and "0.003/m" in html and "0.31" in html
    assert "0.05/m" not in html and "0.01/m" not in html
    for s in STATISTICS:
        assert f"<th>{s.label}</th>" in html and s.meaning in html.replace("&#39;", "'")
    assert "Wasserstein (SD): reported only" in html
    n_error = sum(d.level == "error" for d in _drift())
    assert f"{n_error} predictors at ERROR" in md
    assert "m tests" in html  # m not given: named, never invented


def test_drift_report_says_how_many_tests_m_counts_and_the_p_value_each_level_needs():
    rng = np.random.default_rng(3)
    profile = reference_profile(rng.normal(size=(500, 3)), ["a", "b", "c"])
    m = n_tests_for(profile)
    th = profile.thresholds
    html, _ = drift_report(
        use_case=parse_use_case(USECASE.read_text(), source="test.yaml"),
        batch_id="b1",
        drift=batch_drift(profile, rng.normal(size=(500, 3)), n_tests=m),
        thresholds=th,
        n_reference=500,
        n_current=500,
        model_version="v1",
        code_version="c1",
        n_tests=m,
    )
    assert m == 9  # KS, chi-square and missingness for each of the 3 numeric predictors
    assert (
        f"m = {m} tests: p below {th.alpha_warn / m:.2g} for warn, {th.alpha_error / m:.2g} for error" in html
    )


def test_the_former_drift_report_call_still_renders_and_states_its_psi_levels():
    use_case = parse_use_case(USECASE.read_text(), source="test.yaml")
    rows = [{**d.as_dict(), "label": d.feature.upper()} for d in _drift()]
    html, md = drift_report(
        use_case=use_case,
        batch_id="2024-01-01",
        rows=rows,
        n_reference=2000,
        n_current=2000,
        plot=b"png",
        warn=0.12,
        error=0.27,
        model_version="v1",
        code_version="c1",
    )
    assert "0.12 to 0.27" in html and rows[0]["label"] in md


def test_jensen_shannon_equals_scipy_on_the_psi_bins_and_is_bounded():
    from scipy.spatial import distance

    rng = np.random.default_rng(9)
    a = rng.normal(size=2000)
    b = np.concatenate([rng.normal(0.5, 1.3, size=900), [np.nan] * 100])
    profile = reference_profile(a[:, None], ["x"])
    col = profile.columns[0]
    observed = np.bincount(np.searchsorted(col.edges, b[np.isfinite(b)]), minlength=col.counts.size - 1)
    expected = distance.jensenshannon(col.counts, np.append(observed, np.isnan(b).sum()), base=2)
    assert batch_drift(profile, b[:, None])[0].value("jensen_shannon") == pytest.approx(expected, rel=1e-9)
    assert batch_drift(profile, a[:, None])[0].value("jensen_shannon") == pytest.approx(0.0, abs=1e-7)
    # nothing in common (every value missing against a fully measured reference): the maximum, 1
    assert batch_drift(profile, np.full((50, 1), np.nan))[0].value("jensen_shannon") == pytest.approx(1.0)


def test_the_drift_table_is_in_the_order_its_report_says():
    """The report says ERROR first, then WARN, then the others, each by smallest p-value: the rows are."""
    import re

    drift = _drift()
    html, _ = drift_report(
        use_case=parse_use_case(USECASE.read_text()),
        batch_id="b1",
        drift=drift,
        thresholds=DriftThresholds(),
        n_reference=3000,
        n_current=3000,
        model_version="v1",
        code_version="test",
    )
    assert "smallest p-value) first" in html
    rank = {"error": 0, "warn": 1, "ok": 2}
    keys = [(rank[d.level], d.p_min) for d in drift]
    assert keys == sorted(keys)
    shown = re.findall(r"<tr><td>(\w+)</td><td class=\"num\">", html)
    assert shown == [d.feature for d in drift]


@pytest.mark.parametrize(
    ("change", "words"),
    [(-0.002, "+0 points"), (0.004, "+0 points"), (-0.126, "-13 points"), (0.2, "+20 points")],
)
def test_a_change_in_the_share_not_measured_is_written_in_whole_points_never_minus_zero(change, words):
    assert Missingness().format(change) == words
