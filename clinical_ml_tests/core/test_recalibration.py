"""Recalibration as an action when calibration drifts (issue #18 item 7): the fit, the model it writes, the
out-of-fold risk the gate judges, and the offer through the gate, registry, report card and sign-off."""

from dataclasses import replace
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from clinical_ml.core.approval import GroupThresholds, SignOff, approved_group_thresholds, sign_off
from clinical_ml.core.artifacts import ParquetParts, UseCaseStore
from clinical_ml.core.champion_monitoring import load_champion
from clinical_ml.core.champion_recalibration import offer_recalibration, recalibration_view
from clinical_ml.core.evaluation import calibration_slope_intercept, choose_threshold
from clinical_ml.core.modeling import is_complete_model_text, load_model, train_model
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.promotion import GateSettings
from clinical_ml.core.recalibration import (
    CalibrationCheck,
    Recalibration,
    fit_recalibration,
    out_of_fold_recalibrations,
    out_of_fold_risk,
    recalibrated_model_text,
)
from clinical_ml.core.registry import Lineage, ModelCard, PromotionDecision, Registry
from clinical_ml.core.training import training_ranges
from clinical_ml.core.usecase import load_use_case
from clinical_ml_tests.conftest import PROJECT_ROOT

FEATURES = [f"f{i}" for i in range(4)]


def _logit(p):
    return np.log(p / (1 - p))


def test_the_fit_is_the_maximum_likelihood_recalibration_and_refuses_what_cannot_be_fitted():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.02, 0.6, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-(0.7 + 0.8 * _logit(p))))
    r = fit_recalibration(y, p)
    assert r.intercept == pytest.approx(0.7, abs=0.15) and r.slope == pytest.approx(0.8, abs=0.1)
    # its slope is the calibration slope the evaluation reports (the same maximum-likelihood fit)
    assert r.slope == pytest.approx(calibration_slope_intercept(y, p)[0], rel=1e-6)
    # the recalibrated risks are calibrated in the large on the data fitted (a property of the MLE)
    assert r.apply(p).sum() == pytest.approx(y.sum(), rel=1e-6)
    with pytest.raises(ValueError, match="events and non-events"):
        fit_recalibration(np.zeros(10), p[:10])
    with pytest.raises(ValueError, match="separate the outcomes"):
        fit_recalibration(np.r_[np.zeros(5), np.ones(5)], np.linspace(0.1, 0.9, 10))
    with pytest.raises(ValueError, match="wrong way round"):
        fit_recalibration(~y, p)


def _model(seed: int = 3, n: int = 600):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    y = (rng.random(n) < 1 / (1 + np.exp(-(-1.5 + 1.2 * x[:, 0] + 0.6 * x[:, 1])))).astype(int)
    cut = int(0.8 * n)
    params = {"num_threads": 1}  # a small model: threads only add waiting
    return train_model(
        x[:cut], y[:cut], x[cut:], y[cut:], feature_names=FEATURES, seed=seed, params=params
    ), x


def test_the_recalibrated_model_is_a_lightgbm_model_whose_risk_is_the_recalibrated_risk():
    model, x = _model()
    r = Recalibration(0.4, 0.75)
    text = recalibrated_model_text(model.to_text(), r)
    assert is_complete_model_text(text)
    new = load_model(text)
    np.testing.assert_allclose(new.predict(x), r.apply(model.predict(x)), rtol=1e-9)
    # the contributions behind the reasons shown add up to the new risk's log-odds
    contrib = new.booster.predict(x[:50], pred_contrib=True)
    np.testing.assert_allclose(contrib.sum(axis=1), _logit(new.predict(x[:50])), rtol=1e-7, atol=1e-9)
    # the same patients are flagged at the threshold carried through the recalibration
    t = 0.3
    t_new = float(r.apply(np.array([t]))[0])
    np.testing.assert_array_equal(model.predict(x) >= t, new.predict(x) >= t_new)
    with pytest.raises(ValueError, match="binary"):
        recalibrated_model_text("tree\nobjective=regression\n", r)


def test_each_patient_is_recalibrated_by_a_fit_that_did_not_see_the_patient():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.5, 1000)
    y = rng.random(1000) < np.clip(p * 1.8, 0, 1)
    subjects = np.arange(1000) + 7
    fits = out_of_fold_recalibrations(y, p, subjects, seed=5)
    risk = out_of_fold_risk(p, subjects, fits, seed=5)
    # changing the outcomes of the patients scored by fold 0 changes every fit but the one that scores them
    in_zero = risk == fits[0].apply(p)
    flipped = np.where(in_zero, ~y, y)
    again = out_of_fold_recalibrations(flipped, p, subjects, seed=5)
    assert again[0] == fits[0] and all(a != b for a, b in zip(again[1:], fits[1:], strict=True))
    assert not np.allclose(risk, fit_recalibration(y, p).apply(p))


def test_calibration_is_outside_only_when_the_whole_interval_is():
    def check(oe: tuple[float, float, float], slope: tuple[float, float, float]) -> CalibrationCheck:
        def d(t):
            return dict(zip(("value", "lower", "upper"), t, strict=True))

        return CalibrationCheck(d(oe), d(slope), (0.5, 2.0), (0.5, 2.0))

    assert check((1.9, 1.5, 2.4), (1.0, 0.8, 1.2)).outside == []
    assert check((2.6, 2.1, 3.0), (0.4, 0.3, 0.49)).outside == [
        "observed/expected ratio 2.60 (95% CI 2.10 to 3.00), wholly above the monitoring range 0.5 to 2",
        "calibration slope 0.40 (95% CI 0.30 to 0.49), wholly below the monitoring range 0.5 to 2",
    ]


CHAMPION_BATCH, RECENT = "2026-01-05", ("2026-02-02", "2026-02-16")


def _store(tmp_path, *, drift: float) -> tuple[UseCaseStore, Registry, pl.DataFrame]:
    """A use case with a champion trained on one batch and two later batches whose outcomes are known;
    ``drift`` is added to the later batches' true log-odds (more deaths than predicted)."""
    rng = np.random.default_rng(11)
    n_old, n_new = 1500, 1400
    n = n_old + n_new
    x = rng.normal(size=(n, len(FEATURES)))
    batch = np.array(
        [CHAMPION_BATCH] * n_old + [RECENT[0]] * (n_new // 2) + [RECENT[1]] * (n_new - n_new // 2)
    )
    logit = -3.4 + 1.8 * x[:, 0] + 0.9 * x[:, 1] + drift * (batch != CHAMPION_BATCH)
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    admit = [datetime(2026, 1, 1) + timedelta(hours=int(i)) for i in range(n)]
    subject, hadm = np.arange(n, dtype=np.int64) + 10_000, np.arange(n, dtype=np.int64) + 50_000
    t24 = [a + timedelta(hours=2) for a in admit]
    cohort = pl.DataFrame(
        {
            "subject_id": subject,
            "hadm_id": hadm,
            "prediction_time": t24,
            "batch_id": batch,
            "admit_time": admit,
            "discharge_time": [a + timedelta(hours=12) for a in admit],
            "death_time": [None] * n,
            "unit": ["MICU"] * n,
            "sex": np.where(rng.random(n) < 0.5, "F", "M"),
            "race_ethnicity": np.where(rng.random(n) < 0.7, "White", "Black or African American"),
            "age_band": np.where(rng.random(n) < 0.5, "45-64", "65-79"),
            "site": ["SITE_A"] * n,
        },
        schema_overrides={"death_time": pl.Datetime("us")},
    )
    features = pl.DataFrame(
        {
            "subject_id": subject,
            "hadm_id": hadm,
            "prediction_time": t24,
            **{c: x[:, j] for j, c in enumerate(FEATURES)},
        }
    )
    labels = pl.DataFrame({"hadm_id": hadm, "prediction_time": t24, "boolean_value": y})
    u = rng.random(n_old)
    splits = pl.DataFrame(
        {
            "subject_id": subject[:n_old],
            "split": np.where(u < 0.25, "held_out", np.where(u < 0.4, "tuning", "train")),
        }
    )
    store = UseCaseStore(tmp_path / "deid", tmp_path / "reports", "icu_mortality_24h")
    store.cohort.write(cohort)
    store.features.write(features)
    store.labels.write(labels)
    store.subject_splits.write(splits)
    tr, tu = (splits["split"] == "train").to_numpy(), (splits["split"] == "tuning").to_numpy()
    model = train_model(
        x[:n_old][tr],
        y[:n_old][tr],
        x[:n_old][tu],
        y[:n_old][tu],
        feature_names=FEATURES,
        seed=2,
        params={"num_threads": 1},
    )
    registry = Registry(tmp_path / "registry", "icu_mortality_24h")
    card = ModelCard(
        use_case="icu_mortality_24h",
        version="v20260110T000000000000Z",
        feature_names=tuple(FEATURES),
        training_ranges=training_ranges(x[:n_old][tr], FEATURES),
        fit={
            "n_train": int(tr.sum()),
            "n_tuning": int(tu.sum()),
            "events_train": 1,
            "events_tuning": 1,
            "best_iteration": model.best_iteration,
        },
        threshold=choose_threshold(
            y[:n_old][tu], model.predict(x[:n_old][tu]), policy="min_sensitivity", target=0.9
        ),
        lineage=Lineage(batch_ids=(CHAMPION_BATCH,)),
    )
    registry.register(card, model_text=model.to_text())
    registry.set_champion(card.version)
    return store, registry, cohort


def _offer(tmp_path, store, registry):
    uc = load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
    return offer_recalibration(
        store,
        registry,
        load_champion(registry),
        MonitoringConfig(n_bootstrap=100),
        use_case=uc,
        settings=GateSettings(n_bootstrap=100, seed=1, latency_repeats=20),
        events=ParquetParts(tmp_path / "deid" / "events"),
        run_id="test",
    )


def test_a_drifted_champion_is_recalibrated_on_recent_labels_judged_by_the_gate_and_signed_off(tmp_path):
    store, registry, cohort = _store(tmp_path, drift=1.8)
    champion = load_champion(registry)
    offer = _offer(tmp_path, store, registry)
    recent = cohort.filter(pl.col("batch_id") != CHAMPION_BATCH)
    assert offer.status == "offered", offer.reason
    assert (offer.admissions, offer.patients, offer.batches) == (recent.height, recent.height, 2)
    assert (offer.first_batch, offer.last_batch) == RECENT
    assert offer.check is not None and offer.check.outside[0].startswith("observed/expected ratio")
    assert "wholly above the monitoring range 0.5 to 2" in offer.check.outside[0]
    # more deaths than predicted: the recalibration raises the risks; out of fold, O/E comes back near 1
    assert offer.intercept is not None and offer.intercept > 0
    assert offer.before["observed_expected_ratio"]["lower"] > 1.5
    assert (
        offer.after["observed_expected_ratio"]["lower"] < 1 < offer.after["observed_expected_ratio"]["upper"]
    )
    version = offer.challenger_version
    assert (
        version is not None and registry.versions()[-1] == version and registry.champion() == champion.version
    )
    decision = registry.decisions()[-1]
    assert decision.challenger == version and not decision.promoted and decision.awaiting_sign_off, (
        decision.reasons
    )
    card = registry.card(version)
    assert (
        card.threshold == pytest.approx(offer.threshold_after)
        and card.lineage.champion_at_training == champion.version
    )
    assert card.lineage.retraining_reason.startswith(
        "recalibration because calibration drifted (observed/expected"
    )
    # the report card says what was recalibrated on how many patients, and names none
    html = store.reports.report(f"report_card_{version}").read_text()
    assert (
        f"Model {champion.version} recalibrated (intercept {offer.intercept:+.3f}, slope {offer.slope:.3f} on the "
        f"log-odds of its risk) on {recent.height:,} admissions of {recent.height:,} patients "
        f"({int(store.labels.read().join(recent, on=['hadm_id', 'prediction_time'])['boolean_value'].sum()):,} deaths) "
        f"whose outcome is known, from 2 batches it was not trained on (2026-02-02 to 2026-02-16)."
    ) in html
    assert "so the same patients are flagged as before" in html
    assert offer.check.outside[0] in html and "Observed / expected" in html
    before, after = offer.before["observed_expected_ratio"], offer.after["observed_expected_ratio"]
    assert (
        f'{before["value"]:.2f} ({before["lower"]:.2f} to {before["upper"]:.2f})</td><td class="num">'
        f"{after['value']:.2f} ({after['lower']:.2f} to {after['upper']:.2f})"
    ) in html
    assert f"--version {version}" in html
    assert not any(str(h) in html for h in cohort["hadm_id"].to_list()[::50])
    # the same admissions are not offered twice
    again = _offer(tmp_path, store, registry)
    assert again.status == "already offered" and registry.versions()[-1] == version
    # while it awaits the panel, new admissions do not bring a second recalibration
    store.recalibration.write(replace(again, fingerprint="new admissions"))
    waiting = _offer(tmp_path, store, registry)
    assert waiting.status == "not offered" and registry.versions()[-1] == version
    assert waiting.reason.endswith(
        f"but model {version}, registered after the champion {champion.version}, awaits the clinical panel's "
        "sign-off: one decision at a time."
    )
    # the panel approves it: it scores as the champion's risk recalibrated, flagging the same patients
    sign_off(registry, store, by="Dr A. Jones", approve=True, note="recalibrated for the new case mix")
    assert registry.champion() == version
    new = load_champion(registry)
    x = store.features.read().select(FEATURES).to_numpy()
    old_risk = champion.scorer.model.predict(x)
    np.testing.assert_allclose(
        new.scorer.model.predict(x), Recalibration(offer.intercept, offer.slope).apply(old_risk), rtol=1e-9
    )
    np.testing.assert_array_equal(
        new.scorer.model.predict(x) >= new.card.threshold, old_risk >= champion.card.threshold
    )


def test_the_per_group_thresholds_approved_with_the_champion_move_with_the_recalibration(tmp_path):
    """Approving a recalibrated champion keeps the per-group thresholds the panel approved with the model it
    recalibrates, moved with the risks: each group's flagged patients stay the same, and the card says so."""
    store, registry, cohort = _store(tmp_path, drift=1.8)
    champ = registry.champion()
    assert champ is not None
    approved = GroupThresholds("sex", {"F": 0.08, "M": 0.15})
    signed = SignOff("Dr B. Smith", True, "", "0" * 64, "2026-01-11T00:00:00+00:00", approved)
    registry.record_decision(PromotionDecision(True, champ, None, ("signed off",), sign_off=signed.as_dict()))
    champion = load_champion(registry)
    assert champion.group_thresholds == approved
    offer = _offer(tmp_path, store, registry)
    assert offer.status == "offered" and offer.group_thresholds is not None
    assert offer.intercept is not None and offer.slope is not None and offer.challenger_version is not None
    recal = Recalibration(offer.intercept, offer.slope)
    moved = {g: float(recal.apply(np.array([t]))[0]) for g, t in approved.thresholds.items()}
    assert offer.group_thresholds == {"attribute": "sex", "before": approved.thresholds, "after": moved}
    html = store.reports.report(f"report_card_{offer.challenger_version}").read_text()
    assert (
        f"The per-group thresholds approved with model {champ} (by sex: F 0.0800, M 0.1500) move with the risks "
        f"to F {moved['F']:.4f}, M {moved['M']:.4f}: approving this model keeps them"
    ) in html
    decision = sign_off(registry, store, by="Dr A. Jones", approve=True)
    kept = approved_group_thresholds(registry, offer.challenger_version)
    assert kept == GroupThresholds("sex", moved, carried_from=champ)
    assert "carried through its recalibration" in decision.reasons[0]
    new = load_champion(registry)
    x = store.features.read().select(FEATURES).to_numpy()
    sex = (
        store.features.read()
        .join(cohort, on=["subject_id", "hadm_id"], maintain_order="left")["sex"]
        .to_numpy()
    )
    old_risk, new_risk = champion.scorer.model.predict(x), new.scorer.model.predict(x)
    for group in ("F", "M"):
        mask = sex == group
        np.testing.assert_array_equal(
            new_risk[mask] >= kept.thresholds[group], old_risk[mask] >= approved.thresholds[group]
        )
        assert 0 < (old_risk[mask] >= approved.thresholds[group]).sum() < mask.sum()


def test_a_champion_still_calibrated_gets_no_recalibration(tmp_path):
    store, registry, _ = _store(tmp_path, drift=0.0)
    offer = _offer(tmp_path, store, registry)
    assert offer.status == "not needed" and offer.challenger_version is None
    assert offer.reason.startswith(
        "Calibration of model v20260110T000000000000Z is within its monitoring ranges"
    )
    assert registry.versions() == ["v20260110T000000000000Z"]
    assert store.recalibration.read() == offer
    with pytest.raises(ValueError, match="no recalibration was offered"):
        recalibration_view(
            offer, use_case=load_use_case(PROJECT_ROOT / "usecases" / "icu_mortality_24h.yaml")
        )
