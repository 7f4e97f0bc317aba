"""``clinical-ml replay``: settings resolved like every entry point, the demo's manual approval recorded through
the registry, the per-day drift level, and a short replay through the real jobs."""

import shutil
from pathlib import Path

import dagster as dg
import pytest

from clinical_ml import cli, replay
from clinical_ml.core.artifacts import DeidStore, DriftRecord
from clinical_ml.core.locations import DATA_ROOT_ENV, USECASES_ENV
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry
from clinical_ml.core.synthetic import SyntheticConfig, generate_hospital
from clinical_ml_tests.conftest import PROJECT_ROOT

UC = "icu_mortality_24h"


def _refused(registry_root: Path, version: str) -> Registry:
    models = Registry(registry_root, UC)
    models.register(ModelCard(UC, version), model_text="tree")
    models.record_decision(PromotionDecision(False, version, None, ("AUROC lower bound below 0.7",)))
    return models


def test_manual_approval_promotes_the_refused_first_model_and_keeps_the_refusal(tmp_path):
    root = tmp_path / "registry"
    models = _refused(root, "v1")

    assert replay.record_manual_approvals(root, [UC, "no_model_yet"]) == [UC]

    assert models.champion() == "v1"
    refusal, approval = models.decisions()
    assert not refusal.promoted and refusal.reasons == ("AUROC lower bound below 0.7",)
    assert approval.promoted and approval.challenger == "v1"
    assert approval.reasons == (replay.MANUAL_APPROVAL,)
    assert Registry(root, "no_model_yet").decisions() == []


def test_manual_approval_leaves_a_use_case_with_a_champion_alone(tmp_path):
    root = tmp_path / "registry"
    models = _refused(root, "v1")
    models.set_champion("v1")

    assert replay.record_manual_approvals(root, [UC]) == []
    assert len(models.decisions()) == 1


def test_batch_drift_level_is_the_worst_over_use_cases_and_none_when_unmonitored(tmp_path):
    deid = DeidStore(tmp_path / "deid", tmp_path / "reports")
    for use_case, batch, level in (
        ("a", "2026-01-05", "warn"),
        ("b", "2026-01-05", "error"),
        ("a", "2026-01-06", "ok"),
    ):
        deid.use_case(use_case).drift_records.part(batch).write(
            DriftRecord(batch, level, False, "", "", "v1", {})
        )

    assert replay.batch_drift_level(deid, ["a", "b"], "2026-01-05") == "error"
    assert replay.batch_drift_level(deid, ["a", "b"], "2026-01-06") == "ok"
    assert replay.batch_drift_level(deid, ["a"], "2026-01-07") is None
    assert replay.batch_drift_level(deid, ["a"], "2026-01-05") == "warn"  # only the use cases named


def test_the_subcommand_resolves_the_data_root_and_use_cases_like_every_entry_point(tmp_path, monkeypatch):
    calls: dict = {}
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "from_env"))
    monkeypatch.setenv(USECASES_ENV, str(tmp_path / "cases"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setattr(
        cli, "generate_hospital", lambda landing, config: calls.update(hospital=(landing, config))
    )

    def fake_replay(root, instance, **options):
        calls.update(root=root, instance=instance, **options)
        return []

    monkeypatch.setattr(replay, "replay", fake_replay)

    assert cli.main(["replay", "--warmup", "3", "--patients", "40", "--approve-first-model"]) == 0

    landing, config = calls["hospital"]
    assert landing == tmp_path / "from_env" / "landing"
    assert (config.scenario, config.n_patients, config.n_batches, config.drift_from_batch) == (
        "drift",
        40,
        30,
        20,
    )
    assert calls["root"] == tmp_path / "from_env"
    assert calls["usecases_dir"] == tmp_path / "cases"
    assert calls["warmup"] == 3 and calls["approve_first_model"] is True
    assert isinstance(calls["instance"], dg.DagsterInstance)

    monkeypatch.chdir(tmp_path)
    cli.main(["replay", "--data-root", "relative", "--usecases-dir", "mine"])
    assert calls["root"] == tmp_path / "relative"  # absolute, whatever directory the steps run in
    assert calls["usecases_dir"] == tmp_path / "mine"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_short_replay_trains_the_first_champion_then_monitors_each_later_day(tmp_path):
    root = tmp_path / "data"
    generate_hospital(
        root / "landing",
        SyntheticConfig(n_patients=1200, n_batches=4, seed=11, scenario="drift", drift_from_batch=3),
    )
    cases = tmp_path / "usecases"
    (cases / "monitoring").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "usecases" / f"{UC}.yaml", cases)

    with dg.instance_for_test() as instance:
        days = replay.replay(root, instance, warmup=3, usecases_dir=cases, approve_first_model=True)

    assert [d["level"] for d in days[:3]] == ["warmup"] * 3
    assert [d["retrained"] for d in days[:3]] == [False, False, True]
    assert Registry(root / "registry", UC).champion() is not None
    assert days[3]["level"] in ("ok", "warn", "error")
    deid = DeidStore(root / "deid", root / "reports")
    assert days[3]["level"] == replay.batch_drift_level(deid, [UC], days[3]["batch_id"])
