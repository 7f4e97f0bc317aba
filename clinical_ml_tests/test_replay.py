"""``clinical-ml replay``: settings resolved like every entry point, the demo's manual approval recorded through
the registry, the per-day drift level, and the drift story in sentences. The replay through the real jobs is
clinical_ml_tests/e2e/test_monitoring_drift_scenario.py."""

import json
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest

from clinical_ml import cli, replay
from clinical_ml.core.artifacts import DeidStore, DriftRecord
from clinical_ml.core.locations import DATA_ROOT_ENV, USECASES_ENV
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry
from clinical_ml.core.synthetic import MANIFEST_NAME

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


def _day(batch: str, *levels: str, derivation: bool = False, retrained: str = "") -> replay.CheckedBatch:
    checks = {
        f"uc{i}": replay.UseCaseCheck(
            level,
            (("Lactate (mmol/L)", level.upper(), 4),) if level != "ok" else (),
            ("lactate__last_24h: ...",) if level != "ok" else (),
            level == "error" and bool(retrained),
            ""
            if level != "error" or retrained
            else "Retraining not requested: the champion was trained on it.",
        )
        for i, level in enumerate(levels)
    }
    again = {"uc0": replay.Retraining(f"drift ERROR in batch {batch}", retrained)} if retrained else {}
    return replay.CheckedBatch(batch, derivation, checks, again)


def test_the_story_finds_the_onset_on_time_and_says_what_came_before_and_what_was_decided():
    refused = "Refused: challenger v2 is not promoted, because X. So the champion stays v1."
    days = [
        _day("d1", "ok", "ok", derivation=True),
        _day("d2", "warn", "ok", derivation=True),
        _day("d3", "error", "ok", retrained=refused),
        _day("d4", "error", "warn"),
    ]
    assert replay.drift_story(days, injected_from="d3") == [
        "Drift onset: batch d3 is the first whose drift check reached ERROR; the drift was injected from batch "
        "d3: found on the batch it began.",
        "Before it: 2 batches checked, none at ERROR (1 at WARN: significant, not material).",
        "What moved in batch d3, uc0: ERROR (Lactate (mmol/L): ERROR in 4 predictors).",
        "What moved in batch d3, uc1: nothing (OK).",
        "After it: batch d4 ERROR.",
        f"Retraining of uc0, requested by batch d3 (drift ERROR in batch d3): {refused}",
    ]


@pytest.mark.parametrize(
    ("injected", "expected"),
    [
        ("d2", "the drift was injected from batch d2: 1 batch after it began."),
        ("d4", "the drift was injected from batch d4: 1 batch before it began: a false alarm."),
        (None, "no drift was injected in these batches, so it is a false alarm."),
    ],
)
def test_the_story_says_when_the_onset_is_late_or_a_false_alarm(injected, expected):
    days = [_day("d1", "ok"), _day("d2", "warn"), _day("d3", "error"), _day("d4", "error")]
    story = replay.drift_story(days, injected_from=injected)
    assert story[0].endswith(expected)
    assert story[1] == "Before it: 2 batches checked, none at ERROR (1 at WARN: significant, not material)."
    # an ERROR that did not ask for retraining says why
    assert (
        "Retraining of uc0: not requested. Retraining not requested: the champion was trained on it." in story
    )


def test_the_story_says_when_no_check_reached_error_and_counts_only_checked_batches():
    days = [_day("d1", "ok"), _day("d2", "warn"), replay.CheckedBatch("d3", False)]
    assert replay.drift_story(days, injected_from="d2") == [
        "No drift check reached ERROR in the 2 batches checked; the drift was injected from batch d2."
    ]
    assert days[2].level is None and replay.day_words(days[2]).startswith("not monitored")


def _record(level: str, features: list[tuple[str, str]], reasons: tuple[str, ...] = ()) -> DriftRecord:
    check = {"features": [{"feature": f, "level": lv} for f, lv in features], "reasons": list(reasons)}
    return DriftRecord("d1", level, False, "", "", "v1", {}, check)


def test_what_moved_is_told_by_measurement_errors_first_with_units():
    check = replay.UseCaseCheck.of(
        _record(
            "error",
            [
                ("heart_rate__last_24h", "warn"),
                ("lactate__min_24h", "error"),
                ("lactate__last_24h", "warn"),
                ("heart_rate__max_24h", "warn"),
                ("age_years", "warn"),
                ("sodium__last_24h", "ok"),
            ],
        )
    )
    assert check.moved == (
        ("Lactate (mmol/L)", "ERROR", 2),
        ("Heart rate (per min)", "WARN", 2),
        ("Age (years)", "WARN", 1),
    )
    assert check.words(top=2) == (
        "ERROR (Lactate (mmol/L): ERROR in 2 predictors; Heart rate (per min): WARN in 2 predictors "
        "and 1 more measurement)"
    )
    subgroup_only = replay.UseCaseCheck.of(_record("warn", [], ("subgroup sex=F: WARN (3 columns moved)",)))
    assert subgroup_only.words() == "WARN (subgroup sex=F: WARN (3 columns moved))"
    assert replay.UseCaseCheck.of(_record("ok", [("age_years", "ok")])).words() == "OK"


def test_a_manual_approval_is_not_told_as_a_passed_gate(tmp_path):
    root = tmp_path / "registry"
    _refused(root, "v1")
    replay.record_manual_approvals(root, [UC])
    words = replay.decisions_in_words(root, [UC])[UC]
    assert words.startswith("Promoted by hand: model v1 is champion (manual approval for the demo; the gate")
    assert "passed" not in words


def _landing(tmp_path: Path, drift: dict | None) -> tuple[Path, list]:
    (tmp_path / "landing").mkdir(exist_ok=True)
    (tmp_path / "landing" / MANIFEST_NAME).write_text(json.dumps({"drift": drift}))
    return tmp_path, [SimpleNamespace(batch_id=b) for b in ("2026-01-05", "2026-01-19", "2026-02-02")]


def test_the_drift_demo_derives_on_the_batches_before_the_manifest_s_onset(tmp_path):
    assert cli._drift_onset(*_landing(tmp_path, {"first_batch_id": "2026-02-02"})) == 2


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        (None, "was not written by the drift scenario"),
        ({"first_batch_id": "2026-01-05"}, "the drift begins with the first batch"),
        ({"first_batch_id": None}, "the drift begins after the last batch"),
    ],
)
def test_the_drift_demo_refuses_a_landing_zone_it_cannot_tell_the_story_of(tmp_path, drift, message):
    with pytest.raises(cli.CommandError, match=message):
        cli._drift_onset(*_landing(tmp_path, drift))


def test_the_drift_demo_refuses_a_data_root_that_already_holds_drifted_batches(tmp_path):
    root, batches = _landing(tmp_path, {"first_batch_id": "2026-01-19"})
    encounters = DeidStore(root / "deid", root / "reports").encounters
    encounters.part("2026-01-05").write(pl.DataFrame({"x": [1]}))
    assert cli._drift_onset(root, batches) == 1  # a derivation batch from a previous run is no harm
    encounters.part("2026-02-02").write(pl.DataFrame({"x": [1]}))
    with pytest.raises(
        cli.CommandError, match=r"already holds batches from the drift on \(2026-02-02, a previous"
    ):
        cli._drift_onset(root, batches)
