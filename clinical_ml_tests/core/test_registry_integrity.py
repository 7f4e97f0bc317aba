"""The registry after a crash or a damaged disk: every file is checked on load and named when it fails, a
registration cut short is not a version, and a torn or altered decision record is skipped and reported while
every other record (and the next one) stays readable."""

import json
import re

import numpy as np
import pytest

from clinical_ml.core.modeling import train_model
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry, RegistryIntegrityError


@pytest.fixture(scope="module")
def model_text() -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = (x[:, 0] + rng.normal(size=300) > 0.5).astype(int)
    return train_model(
        x[:200], y[:200], x[200:], y[200:], feature_names=["a", "b"], seed=0, max_rounds=20
    ).to_text()


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"\x00\xffnot a model at all" * 10)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "one_byte":
        i = len(data) // 3
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()


@pytest.mark.parametrize("how", ["garbage", "truncated", "one_byte", "empty", "deleted"])
@pytest.mark.parametrize("file", ["model.txt", "card.json"])
def test_a_damaged_registry_file_is_named_on_load(tmp_path, model_text, file, how):
    registry = Registry(tmp_path, "uc")
    registry.register(ModelCard("uc", "v1", threshold=0.3), model_text=model_text)
    assert registry.model("v1").predict(np.zeros((1, 2))).shape == (1,)
    _damage(tmp_path / "uc" / "models" / "v1" / file, how)
    with pytest.raises(RegistryIntegrityError, match=re.escape(f"uc/models/v1/{file}")):
        registry.model("v1") if file == "model.txt" else registry.card("v1")


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_an_unverified_older_version_still_fails_with_the_file_named(tmp_path, model_text, how):
    registry = Registry(tmp_path, "uc")
    registry.register(ModelCard("uc", "v1"), model_text=model_text)
    (tmp_path / "uc" / "models" / "v1" / "SHA256SUMS").unlink()  # as registered before the checksums
    assert registry.card("v1").version == "v1" and registry.versions() == ["v1"]
    _damage(tmp_path / "uc" / "models" / "v1" / "model.txt", how)
    with pytest.raises(RegistryIntegrityError, match=re.escape("uc/models/v1/model.txt")):
        registry.model("v1")


def test_a_registration_cut_short_is_not_a_version(tmp_path, model_text):
    registry = Registry(tmp_path, "uc")
    registry.register(ModelCard("uc", "v1"), model_text=model_text)
    cut = tmp_path / "uc" / "models" / "v2"
    cut.mkdir()
    (cut / "model.txt").write_text(model_text)  # the process died before the card and the checksums
    assert registry.versions() == ["v1"] and registry.newest_card().version == "v1"


def _decision(i: int) -> PromotionDecision:
    return PromotionDecision(i % 2 == 0, f"v{i}", None, (f"reason {i}",))


@pytest.mark.parametrize("keep", [1, 7, 20, 0.5, 0.99])
def test_a_torn_last_record_is_skipped_and_reported_and_the_next_record_is_kept(tmp_path, keep):
    registry = Registry(tmp_path, "uc")
    first = registry.record_decision(_decision(0), move_pointer=False)
    registry.record_decision(_decision(1), move_pointer=False)
    log = tmp_path / "uc" / "decisions.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    cut = int(len(lines[1]) * keep) if isinstance(keep, float) else keep
    log.write_bytes(lines[0] + lines[1][:cut])  # the second append was torn by a crash
    assert registry.decisions() == [first]
    (problem,) = registry.decision_log_problems()
    assert "decisions.jsonl line 2" in problem and "torn" in problem
    third = registry.record_decision(_decision(2), move_pointer=False)
    assert registry.decisions() == [first, third]  # the new record did not merge into the fragment
    assert len(registry.decision_log_problems()) == 1


def test_the_same_decision_recorded_again_is_kept_once_and_a_later_one_is_appended(tmp_path):
    """A step run again after a crash between its decision and the champion pointer records the same decision:
    the log keeps one, and the pointer still moves; the same decision after another one is a new record."""
    registry = Registry(tmp_path, "uc")
    (tmp_path / "uc" / "models" / "v0").mkdir(parents=True)
    (tmp_path / "uc" / "models" / "v0" / "model.txt").write_text("model")
    promoted = PromotionDecision(True, "v0", None, ("passed",), ({"group": "all", "ci": (0.7, 0.9)},))
    first = registry.record_decision(promoted, move_pointer=False)
    again = registry.record_decision(promoted, move_pointer=True)  # the rerun
    (kept,) = registry.decisions()
    assert kept.at == first.at == again.at and kept.challenger == "v0"
    assert registry.champion() == "v0"
    refused = registry.record_decision(_decision(1), move_pointer=False)
    third = registry.record_decision(promoted, move_pointer=False)
    assert [d.at for d in registry.decisions()] == [first.at, refused.at, third.at]


def test_an_altered_record_is_skipped_and_reported(tmp_path):
    registry = Registry(tmp_path, "uc")
    registry.record_decision(_decision(1), move_pointer=False)  # refused
    kept = registry.record_decision(_decision(2), move_pointer=False)
    log = tmp_path / "uc" / "decisions.jsonl"
    first, second = log.read_text().splitlines()
    forged = json.loads(first)
    forged["promoted"] = True
    log.write_text(json.dumps(forged) + "\n" + second + "\n")
    assert registry.decisions() == [kept]
    assert "line 1" in registry.decision_log_problems()[0] and "sha256" in registry.decision_log_problems()[0]


def test_records_written_before_framing_still_read(tmp_path):
    log = tmp_path / "uc" / "decisions.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"at": "2026-01-01T00:00:00", **_decision(0).as_dict()}) + "\n")
    registry = Registry(tmp_path, "uc")
    assert [d.challenger for d in registry.decisions()] == ["v0"] and registry.decision_log_problems() == []


def test_no_truncation_of_a_model_file_reaches_lightgbm(model_text):
    """LightGBM aborts the whole process on some truncated models: every cut is refused before parsing."""
    from clinical_ml.core.modeling import is_complete_model_text, load_model

    assert is_complete_model_text(model_text)
    cuts = sorted({*range(0, len(model_text), max(len(model_text) // 400, 1)), len(model_text) - 2})
    for cut in cuts:
        assert not is_complete_model_text(model_text[:cut]), cut
    with pytest.raises(ValueError, match="not a complete LightGBM text model"):
        load_model(model_text[: len(model_text) // 2])


@pytest.mark.parametrize("how", ["garbage", "truncated", "one_byte", "empty"])
def test_a_challenger_changed_since_training_is_refused_before_lightgbm_reads_it(tmp_path, model_text, how):
    from clinical_ml.core.artifacts import ChallengerStore
    from clinical_ml.core.training import ChallengerFit, FitSummary

    store = ChallengerStore(tmp_path / "challenger")
    store.write(
        model_text, ChallengerFit("v1", FitSummary(200, 100, 20, 1, 20, {"a": (0.0, 1.0)}), ("a", "b"))
    )
    assert store.model_text() == model_text
    _damage(tmp_path / "challenger" / "model.txt", how)
    with pytest.raises(RegistryIntegrityError, match=r"challenger/model\.txt"):
        store.model_text()
