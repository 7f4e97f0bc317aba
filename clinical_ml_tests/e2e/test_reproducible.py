"""Same landing data, code and configuration: the same cohorts, split, model file and numbers (issue #18 item 3).

Each test runs ``clinical-ml run`` (what ``make demo`` calls) twice on fresh data roots and compares what the
two runs wrote. The vault's surrogate ids used to come from operating-system entropy even in the demo, and the
patient split hashes those ids: three fresh demos gave validation cohorts of 901, 885 and 922 admissions.
"""

import json
from pathlib import Path

import polars as pl
import pytest

from clinical_ml import cli
from clinical_ml.core.artifacts import DeidStore
from clinical_ml.core.pseudonyms import SECRET_ENV_VAR
from clinical_ml.resources.pseudonym_secret import MODE_ENV_VAR
from clinical_ml_tests.conftest import PROJECT_ROOT

USE_CASE = "icu_mortality_24h"


def _run(root: Path) -> dict:
    argv = ["run", "--usecase", USE_CASE, "--data-root", str(root), "--patients", "400", "--batches", "2"]
    assert cli.main([*argv, "--usecases-dir", str(PROJECT_ROOT / "usecases")]) == 0
    store = DeidStore(root / "deid", root / "reports").use_case(USE_CASE)
    evaluation = store.evaluation.read().as_dict()
    evaluation.pop("model_version")  # a registration time, not a result
    fairness = json.loads(store.fairness.path.read_text())
    fairness.pop("model_version", None)
    return {
        "cohort": store.cohort.read().sort(["hadm_id", "prediction_time"]),
        "splits": store.subject_splits.read().sort("subject_id"),
        "model_sha256": store.challenger.model_sha256(),
        "evaluation": evaluation,
        "fairness": fairness,
        "threshold": store.threshold.read().threshold,
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["cohort"].equals(b["cohort"])
    assert a["splits"].equals(b["splits"])
    assert a["model_sha256"] == b["model_sha256"]
    assert a["threshold"] == b["threshold"]
    assert a["evaluation"] == b["evaluation"]
    assert a["fairness"] == b["fairness"]


@pytest.fixture(scope="module")
def vault_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Two fresh runs in vault mode (the default): what the first test compares, and the vault reference of the
    second (the same run either way: read only, so shared instead of run a third time)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(MODE_ENV_VAR, raising=False)
        return _run(tmp_path_factory.mktemp("vault_a")), _run(tmp_path_factory.mktemp("vault_b"))


@pytest.mark.slow
def test_two_fresh_demo_runs_in_vault_mode_give_identical_cohorts_model_and_metrics(vault_runs):
    first, second = vault_runs
    _assert_same(first, second)
    # the split is by patient and has both cohorts: the comparison above is not of empty tables
    assert set(first["splits"]["split"].unique()) == {"train", "tuning", "held_out"}
    assert first["evaluation"]["n_validation"] > 0


@pytest.mark.slow
def test_two_fresh_runs_in_hmac_mode_give_identical_results_keyed_differently_from_the_vault(
    tmp_path, monkeypatch, vault_runs
):
    vault, _ = vault_runs
    monkeypatch.setenv(MODE_ENV_VAR, "hmac")
    monkeypatch.setenv(SECRET_ENV_VAR, "a-test-key-that-is-long-enough-for-hmac-0123456789")
    first, second = _run(tmp_path / "a"), _run(tmp_path / "b")
    _assert_same(first, second)
    # the keyed pseudonyms are not the vault's surrogates: the runs above really ran in another mode
    overlap = first["splits"].join(vault["splits"], on="subject_id", how="inner")
    assert overlap.height == 0
    assert pl.Series(first["splits"]["subject_id"]).n_unique() == vault["splits"].height
