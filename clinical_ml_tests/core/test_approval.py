"""The clinical panel's sign-off (issue #18 item 6): a model that passed the gate becomes champion only after a
recorded approval (who, when, decision, note, the sha256 of the report card read), unless the use case says
``approval: automatic`` and the fairness verdict is pass; from core, the CLI, and the report card's words."""

import hashlib
from datetime import UTC, datetime

import pytest

from clinical_ml import cli
from clinical_ml.core.approval import (
    SIGNED_REPORT_CARD,
    SignOffError,
    apply_approval_policy,
    pending_version,
    sign_off,
)
from clinical_ml.core.artifacts import DeidStore
from clinical_ml.core.registry import ModelCard, PromotionDecision, Registry
from clinical_ml.core.reports import decision_in_words

PASSED = PromotionDecision(True, "v2", "v1", ("AUROC lower 95% bound 0.81 meets the minimum 0.75",))
REFUSED = PromotionDecision(
    False, "v2", "v1", ("sensitivity lower 95% bound 0.61 is below the minimum 0.65",)
)


@pytest.mark.parametrize(
    ("approval", "verdict", "promoted", "words"),
    [
        ("automatic", "pass", True, None),
        ("automatic", "review", False, "verdict is 'review', so automatic promotion is blocked"),
        ("automatic", "insufficient data", False, "verdict is 'insufficient data'"),
        ("automatic", None, False, "no subcohort fairness verdict was recorded"),
        ("panel", "pass", False, "when the clinical panel signs off (promotion.approval: panel)"),
    ],
)
def test_a_passed_gate_waits_for_the_panel_unless_automatic_and_fair(approval, verdict, promoted, words):
    decision = apply_approval_policy(PASSED, approval=approval, fairness_verdict=verdict)
    assert decision.promoted is promoted
    assert decision.awaiting_sign_off is (not promoted)
    if words:
        assert words in decision.reasons[-1]
        sentence = decision_in_words(decision.as_dict())
        assert sentence.startswith("Awaiting sign-off: challenger v2 passed the promotion gate")
        assert "Until then the champion stays v1." in sentence


@pytest.mark.parametrize("approval", ["automatic", "panel"])
def test_a_refusal_stays_a_refusal_whatever_the_approval_rule(approval):
    assert apply_approval_policy(REFUSED, approval=approval, fairness_verdict="pass") == REFUSED


def _awaiting(tmp_path, *, card_text: str | None = "<html>report card of v2</html>", model_text: str = ""):
    registry = Registry(tmp_path / "registry", "uc")
    store = DeidStore(tmp_path / "deid", tmp_path / "reports").use_case("uc")
    for version in ("v1", "v2"):
        registry.register(
            ModelCard("uc", version, threshold=0.18), model_text=model_text or f"tree {version}\n"
        )
    registry.record_decision(PromotionDecision(True, "v1", None, ("first",)))
    waiting = registry.record_decision(
        apply_approval_policy(PASSED, approval="panel", fairness_verdict="pass"), move_pointer=False
    )
    store.decision.write(waiting)
    if card_text is not None:
        store.reports.write_report("report_card_v2", card_text)
    return registry, store


def test_an_approval_records_who_when_the_note_and_the_card_read_and_moves_the_pointer(tmp_path):
    registry, store = _awaiting(tmp_path)
    assert pending_version(registry) == "v2" and registry.champion() == "v1"
    card = store.reports.report("report_card_v2").read_bytes()
    when = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)

    decision = sign_off(
        registry, store, by="  Dr A. Jones,  ICU panel ", approve=True, note="approved for adults", now=when
    )

    assert decision.promoted and registry.champion() == "v2"
    signed = decision.sign_off
    assert signed is not None
    assert (
        signed["by"] == "Dr A. Jones, ICU panel"
        and signed["approved"]
        and signed["at"].startswith("2026-12-06")
    )
    assert signed["report_card_sha256"] == hashlib.sha256(card).hexdigest()
    # the exact card read is kept beside the version, and the log and the store say the same
    assert (registry.version_dir("v2") / SIGNED_REPORT_CARD).read_bytes() == card
    assert registry.decisions()[-1] == decision and store.decision.read() == decision
    words = decision_in_words(decision.as_dict())
    assert words == (
        "Promoted: challenger v2 replaces v1; the promotion gate passed and Dr A. Jones, ICU panel approved it for "
        "the clinical panel on 2026-12-06."
    )
    assert pending_version(registry) is None
    with pytest.raises(SignOffError, match="already signed off"):
        sign_off(registry, store, by="Dr B", approve=True, version="v2")


def test_a_rejection_keeps_the_champion_and_says_so(tmp_path):
    registry, store = _awaiting(tmp_path)
    decision = sign_off(registry, store, by="Dr B. Smith", approve=False, note="wait for the 2027 data")
    assert not decision.promoted and registry.champion() == "v1"
    assert decision_in_words(decision.as_dict()).startswith("Rejected: Dr B. Smith rejected challenger v2")
    assert "wait for the 2027 data. So the champion stays v1." in decision_in_words(decision.as_dict())


def test_nothing_is_signed_without_a_name_a_card_read_or_a_model_awaiting_it(tmp_path):
    registry, store = _awaiting(tmp_path / "a", card_text=None)
    with pytest.raises(SignOffError, match="report card of model v2 has not been written"):
        sign_off(registry, store, by="Dr A", approve=True)
    registry, store = _awaiting(tmp_path / "b")
    with pytest.raises(SignOffError, match="needs the name"):
        sign_off(registry, store, by="   ", approve=True)
    with pytest.raises(SignOffError, match="at most"):
        sign_off(registry, store, by="Dr A", approve=True, note="x" * 5000)
    # a model the gate refused cannot be approved
    registry.register(ModelCard("uc", "v3"), model_text="tree v3\n")
    registry.record_decision(PromotionDecision(False, "v3", "v1", ("sensitivity too low",)))
    with pytest.raises(SignOffError, match="the promotion gate refused it"):
        sign_off(registry, store, by="Dr A", approve=True, version="v3")
    assert registry.champion() == "v1"
    registry, store = Registry(tmp_path / "c", "uc"), DeidStore(tmp_path / "c", tmp_path / "c").use_case("uc")
    with pytest.raises(SignOffError, match="no model of uc awaits sign-off"):
        sign_off(registry, store, by="Dr A", approve=True)


def test_the_cli_signs_off_and_fails_clearly(tmp_path, capsys):
    registry, _ = _awaiting(tmp_path)
    argv = ["approve", "uc", "--data-root", str(tmp_path), "--by", "Dr A. Jones"]
    assert cli.main([*argv, "--approve", "--note", "ok"]) == 0
    out = capsys.readouterr().out
    assert "uc: model v2 signed off: approved by Dr A. Jones" in out and "champion: v2" in out
    assert registry.champion() == "v2"
    assert cli.main([*argv, "--reject"]) == 2
    assert "no model of uc awaits sign-off" in capsys.readouterr().err


def _fairness(store, version: str) -> None:
    from clinical_ml.core.artifacts import FairnessSummary

    rows = [
        {"attribute": "sex", "group": "F", "suppressed": False, "threshold": 0.12},
        {"attribute": "sex", "group": "M", "suppressed": False, "threshold": 0.25},
        {"attribute": "age_band", "group": "18-44", "suppressed": True, "threshold": float("nan")},
    ]
    store.fairness.write(FairnessSummary(version, "review", {"group_thresholds": rows}))


def test_approved_group_thresholds_are_recorded_and_applied_in_scoring(tmp_path):
    import numpy as np
    import polars as pl

    from clinical_ml.core.approval import approved_group_thresholds
    from clinical_ml.core.champion_monitoring import load_champion, score_batch
    from clinical_ml.core.modeling import train_model

    # a real model, so that the champion scores
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2))
    y = (x[:, 0] + rng.normal(size=600) > 0.5).astype(int)
    model = train_model(x[:400], y[:400], x[400:], y[400:], feature_names=["a__last", "b__last"], seed=0)
    registry, store = _awaiting(tmp_path, model_text=model.to_text())
    _fairness(store, "v2")
    with pytest.raises(SignOffError, match="not with a rejection"):
        sign_off(registry, store, by="Dr A", approve=False, group_thresholds_for="sex")
    with pytest.raises(SignOffError, match="audited: age_band, sex"):
        sign_off(registry, store, by="Dr A", approve=True, group_thresholds_for="site")
    with pytest.raises(SignOffError, match="every group of 'age_band' is too small"):
        sign_off(registry, store, by="Dr A", approve=True, group_thresholds_for="age_band")

    decision = sign_off(registry, store, by="Dr A", approve=True, group_thresholds_for="sex")
    assert "approved with per-group thresholds by sex (F 0.120, M 0.250) by Dr A" in decision.reasons[0]
    groups = approved_group_thresholds(registry, "v2")
    assert groups is not None and groups.thresholds == {"F": 0.12, "M": 0.25}

    # score the same rows as F, M and U: each flagged at its own group's threshold, U at the single one
    champion = load_champion(registry)
    assert champion.version == "v2" and champion.group_thresholds == groups
    frame = pl.DataFrame(
        {
            "subject_id": [1, 2, 3] * 50,
            "hadm_id": list(range(150)),
            "prediction_time": [None] * 150,
            "batch_id": ["b"] * 150,
            "sex": ["F", "M", "U"] * 50,
            "age_band": ["45-64"] * 150,
            "race_ethnicity": ["White"] * 150,
            "a__last": np.repeat(np.linspace(-2, 2, 50), 3),
            "b__last": [0.0] * 150,
        }
    )
    scored = score_batch(frame, champion)
    for sex, threshold in (("F", 0.12), ("M", 0.25), ("U", 0.18)):
        rows = scored.filter(pl.col("sex") == sex)
        assert (rows["threshold_applied"] == threshold).all()
        assert (rows["flagged"] == (rows["predicted_risk"] >= threshold)).all()
    assert (
        scored.filter(pl.col("sex") == "F")["flagged"].sum()
        > scored.filter(pl.col("sex") == "M")["flagged"].sum()
    )
