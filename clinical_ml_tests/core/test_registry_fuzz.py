"""Fuzzing the registry's load paths (issue 17): whatever bytes a crash, a full disk or a careless hand leaves in
the decision log, a model file, a card, the checksums or the champion pointer, reading them either works or
raises :class:`RegistryIntegrityError` naming the file; the decision log never raises, reports the lines it
skips by number, and the next decision recorded reads back. Bounded in examples so it runs in seconds."""

import json
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.core.modeling import train_model
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry, RegistryIntegrityError

FUZZ = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure here is a bug, not bad luck
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VERSION = "v1"
_rng = np.random.default_rng(0)
_x = _rng.normal(size=(300, 2))
_y = (_x[:, 0] + _rng.normal(size=300) > 0.5).astype(int)
MODEL = train_model(
    _x[:200], _y[:200], _x[200:], _y[200:], feature_names=["a", "b"], seed=0, max_rounds=10
).to_text()

# Bytes that have broken readers: line ends of every kind (including the ones str.splitlines splits on), a
# BOM, NUL, invalid UTF-8, deep nesting, numbers JSON cannot hold.
_HOSTILE = [
    b"", b"\n", b"\r", b"\r\n", b"\xc2\x85", b"\xe2\x80\xa8", b"\x0b", b"\x1c", b"\xef\xbb\xbf", b"\x00",
    b"\xff\xfe", b"\x80", b"{", b"}", b'"', b"[" * 3000, b"1e999999", b"NaN", b"null", b"{}", b"[]",
    b'{"version": 1}', b'{"version": ""}', b'{"promoted": "yes"}',
]  # fmt: skip
HOSTILE = st.one_of(st.sampled_from(_HOSTILE), st.binary(max_size=40))


@contextmanager
def _registry() -> Iterator[tuple[Registry, Path]]:
    """A registry with one whole version, its champion pointer and two decisions, in a fresh folder."""
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp), "uc")
        registry.register(ModelCard("uc", VERSION, feature_names=("a", "b")), model_text=MODEL)
        registry.record_decision(PromotionDecision(True, VERSION, None, ("passed",)), move_pointer=True)
        registry.record_decision(PromotionDecision(False, "v2", VERSION, ("refused",)), move_pointer=False)
        yield registry, Path(tmp) / "uc"


def _works_or_names(read: Callable[[], object], file: str) -> None:
    try:
        read()
    except RegistryIntegrityError as e:
        assert f"uc/{file}" in str(e)


@st.composite
def damaged(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` cut, with a byte flipped, or with hostile bytes spliced in; or other bytes entirely."""
    how = draw(st.sampled_from(["cut", "flip", "splice", "other"]))
    at = draw(st.integers(0, max(len(original) - 1, 0)))
    if how == "cut":
        return original[:at]
    if how == "flip" and original:
        return original[:at] + bytes([original[at] ^ draw(st.integers(1, 255))]) + original[at + 1 :]
    if how == "splice":
        return original[:at] + draw(HOSTILE) + original[at + draw(st.integers(0, 20)) :]
    return draw(HOSTILE)


@FUZZ
@given(data=st.data())
def test_any_decision_log_reads_reports_by_line_and_takes_the_next_record(data):
    with _registry() as (registry, folder):
        log = folder / "decisions.jsonl"
        log.write_bytes(data.draw(damaged(log.read_bytes())))
        decisions, problems = registry.decision_log()  # never raises
        assert all(re.fullmatch(r"registry file uc/decisions\.jsonl line \d+: .+", p) for p in problems)
        recorded = registry.record_decision(
            PromotionDecision(False, "v3", VERSION, ("refused",)), move_pointer=False
        )
        after, _ = registry.decision_log()
        assert after == [*decisions, recorded]  # the fragment swallowed nothing, nothing earlier changed


@FUZZ
@given(data=st.data())
def test_a_damaged_model_file_is_refused_with_its_name(data):
    with _registry() as (registry, folder):
        path = folder / "models" / VERSION / "model.txt"
        damage = data.draw(damaged(path.read_bytes()))
        path.write_bytes(damage)
        if damage == MODEL.encode():
            registry.model(VERSION)
        else:
            with pytest.raises(RegistryIntegrityError, match=f"uc/models/{VERSION}/model.txt"):
                registry.model(VERSION)


@FUZZ
@given(data=st.data())
def test_damaged_checksums_are_refused_with_the_file_named(data):
    with _registry() as (registry, folder):
        path = folder / "models" / VERSION / "SHA256SUMS"
        path.write_bytes(data.draw(damaged(path.read_bytes())))
        _works_or_names(lambda: registry.model(VERSION), f"models/{VERSION}/model.txt")
        _works_or_names(lambda: registry.card(VERSION), f"models/{VERSION}/card.json")
        assert registry.versions() == [VERSION]


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
CARD_KEYS = ["metrics", "gate", "lineage", "training_ranges", "feature_names", "fit", "version", "threshold"]


@FUZZ
@given(card=st.one_of(JSON, st.dictionaries(st.sampled_from(CARD_KEYS), JSON, max_size=4)), data=st.data())
def test_a_card_that_its_checksum_vouches_for_reads_or_is_refused_with_its_name(card, data):
    """A card whose content is not a card (written by another tool, or by hand, with the checksum updated)."""
    with _registry() as (registry, folder):
        body = json.dumps(card).encode() if data.draw(st.booleans()) else data.draw(HOSTILE)
        (folder / "models" / VERSION / "card.json").write_bytes(body)
        (folder / "models" / VERSION / "SHA256SUMS").unlink()  # unverified: the content reaches the parser
        _works_or_names(lambda: registry.card(VERSION), f"models/{VERSION}/card.json")


@FUZZ
@given(data=st.data())
def test_any_champion_pointer_names_a_version_or_is_refused_with_its_name(data):
    with _registry() as (registry, folder):
        path = folder / "champion.json"
        path.write_bytes(data.draw(damaged(path.read_bytes())))
        try:
            version = registry.champion()
        except RegistryIntegrityError as e:
            assert "uc/champion.json" in str(e)
        else:
            assert isinstance(version, str) and version


@pytest.mark.parametrize(
    ("line", "how"), [("split_feature=", "deleted"), ("threshold=", "cut"), ("leaf_value=", "deleted")]
)
def test_a_damaged_model_without_checksums_is_refused_not_a_crash(line, how):
    """LightGBM aborts the process on some damaged models (a line of a tree deleted or cut): a version that
    no checksum vouches for is tried in a separate process first."""
    with _registry() as (registry, folder):
        (folder / "models" / VERSION / "SHA256SUMS").unlink()
        lines = MODEL.split("\n")
        i = next(n for n, text in enumerate(lines) if text.startswith(line))
        lines[i : i + 1] = [] if how == "deleted" else [lines[i][: len(lines[i]) // 2]]
        (folder / "models" / VERSION / "model.txt").write_text("\n".join(lines))
        with pytest.raises(RegistryIntegrityError, match=f"uc/models/{VERSION}/model.txt"):
            registry.model(VERSION)
