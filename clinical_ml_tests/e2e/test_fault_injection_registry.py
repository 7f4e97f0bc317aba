"""Fault injection in model registration (issue 17): registering a challenger and promoting it (the model, the
card and the checksums of a version, its folder put in place, the decision appended, the champion pointer
moved) is killed with SIGKILL just before or just after each of those writes, then run again. Whatever the
kill left, a reader sees no half version and a champion that is the old or the new one; the rerun leaves
exactly one new version, whole, and the new champion."""

import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from clinical_ml.core.modeling import train_model
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry
from clinical_ml_tests.kill_points import count_boundaries, run_killed

pytestmark = pytest.mark.slow

USE_CASE, OLD, NEW = "uc", "v20260101T000000000000Z", "v20260201T000000000000Z"
POINTS = ("replace", "rename", "write")  # atomic writes, the version folder put in place, the log append
CHILD = """
from pathlib import Path
from clinical_ml_tests.e2e.test_fault_injection_registry import register_and_promote
register_and_promote(Path(ARGS[0]), Path(ARGS[1]).read_text())
"""


def _card(version: str) -> ModelCard:
    return ModelCard(USE_CASE, version, feature_names=("a", "b"), threshold=0.3)


def register_and_promote(root: Path, model_text: str, version: str = NEW) -> None:
    """A challenger registered and promoted (what an approval does after the registry asset registered it)."""
    registry = Registry(root, USE_CASE)
    before = registry.champion()
    registry.register(_card(version), model_text=model_text)
    registry.record_decision(PromotionDecision(True, version, before, ("passed",)), move_pointer=True)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A registry with a champion, the new model's text in a file, and the boundary count of its promotion."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2))
    y = (x[:, 0] + rng.normal(size=300) > 0.5).astype(int)

    def text(seed: int) -> str:
        return train_model(
            x[:200], y[:200], x[200:], y[200:], feature_names=["a", "b"], seed=seed, max_rounds=10 + seed
        ).to_text()

    base = tmp_path_factory.mktemp("registry")
    register_and_promote(base / "zone", text(0), OLD)
    model = base / "new_model.txt"
    model.write_text(text(1))
    reference = tmp_path_factory.mktemp("reference")
    shutil.copytree(base / "zone", reference / "zone")
    n = count_boundaries(
        CHILD, args=[str(reference / "zone"), str(model)], script=reference / "child.py", points=POINTS
    )
    return base / "zone", model, n


def _consistent(registry: Registry, model_text: str) -> None:
    """What any reader may rely on: every listed version whole, the champion one of them."""
    assert registry.versions() in ([OLD], [OLD, NEW])
    for version in registry.versions():
        assert registry.card(version).version == version
        registry.model(version)  # verified against its sha256, loads
    if NEW in registry.versions():
        assert registry.model_text(NEW) == model_text
    assert registry.champion() in registry.versions()
    assert registry.decision_log_problems() == []


def test_the_promotion_crosses_every_boundary(registered):
    _, _, n = registered
    assert n == 6  # model, card, checksums, the folder, the decision, the pointer


# Each state a kill can leave once (the state after boundary k is the one before k + 1, but for a temporary
# file): nothing written, the model and card staged, all staged, the version in place without a decision, the
# decision without the pointer, the new pointer written but not in place. The child imports the whole
# registry stack (seconds), so the six are sampled rather than all twelve.
KILLS = [(0, "before"), (1, "after"), (2, "after"), (3, "after"), (4, "after"), (5, "before")]


@pytest.mark.parametrize(("k", "when"), KILLS, ids=[f"{w}-{k}" for k, w in KILLS])
def test_a_registration_killed_at_a_write_leaves_no_half_version_and_a_rerun_completes_it(
    registered, k, when, tmp_path
):
    zone, model, n = registered
    assert k < n
    root = tmp_path / "zone"
    shutil.copytree(zone, root)
    killed = run_killed(
        CHILD, k=k, when=when, args=[str(root), str(model)], script=tmp_path / "child.py", points=POINTS
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    registry = Registry(root, USE_CASE)
    text = model.read_text()
    _consistent(registry, text)
    if registry.champion() == NEW:
        assert any(d.promoted and d.challenger == NEW for d in registry.decisions())
    register_and_promote(root, text)  # the rerun
    _consistent(registry, text)
    assert registry.versions() == [OLD, NEW] and registry.champion() == NEW
    assert registry.decisions()[-1].promoted and registry.decisions()[-1].challenger == NEW
    assert sum(d.promoted and d.challenger == NEW for d in registry.decisions()) == 1  # recorded once
    assert registry.card(NEW) == _card(NEW)
    hidden = [p for p in root.rglob(".*")]
    assert all(
        p.is_file() and p.parent == root / USE_CASE for p in hidden
    )  # at most a dot-named pointer draft
