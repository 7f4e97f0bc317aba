"""Offering a recalibrated champion when its calibration drifts (see :mod:`clinical_ml.core.recalibration`
for the method): which admissions it is fitted on, when it is offered, its registration and judgement through
the promotion gate, and the report card the panel reads before signing off."""

import hashlib
from dataclasses import replace

import polars as pl

from clinical_ml.core.approval import apply_approval_policy
from clinical_ml.core.artifacts import ParquetParts, UseCaseStore
from clinical_ml.core.champion_monitoring import Champion, known_by, monitoring_frame
from clinical_ml.core.display_names import attribute_title
from clinical_ml.core.evaluation import bootstrap_metrics
from clinical_ml.core.features import ROW_KEY, SplitInfo, feature_matrix
from clinical_ml.core.gate import criterion_result, gate_inputs
from clinical_ml.core.modeling import load_model
from clinical_ml.core.monitoring_config import MonitoringConfig
from clinical_ml.core.performance_monitoring import label_maturity
from clinical_ml.core.promotion import GateSettings
from clinical_ml.core.recalibration import (
    FOLDS,
    Recalibration,
    RecalibrationOffer,
    fit_recalibration,
    monitored_calibration,
    out_of_fold_recalibrations,
    out_of_fold_risk,
    recalibrated_model_text,
    risk_examples,
)
from clinical_ml.core.registry import Lineage, Registry, build_model_card, decision_for, new_version
from clinical_ml.core.reports import decision_in_words, md_escape, render
from clinical_ml.core.storage import code_version
from clinical_ml.core.training import ChallengerFit, FitSummary
from clinical_ml.core.usecase import UseCase
from clinical_ml.core.validation import STAY_COLUMNS, OperatingThreshold, evaluate_validation


def recent_labelled_rows(store: UseCaseStore, champion: Champion) -> pl.DataFrame:
    """Admissions of the batches the champion was not trained on whose outcome is known by the day after
    the newest batch (as the monitoring report counts maturity), sorted by row key."""
    frame = monitoring_frame(store)
    recent = frame.filter(~pl.col("batch_id").is_in(list(champion.card.lineage.batch_ids)))
    if recent.height == 0:
        return recent
    as_of = known_by(frame["batch_id"].unique().to_list())
    if as_of is None:  # batches not named by date: when an outcome became known is not known
        return recent.clear()
    return recent.filter(label_maturity(recent, as_of=as_of) & pl.col("label").is_not_null()).sort(ROW_KEY)


def _fingerprint(champion: str, rows: pl.DataFrame) -> str:
    """The same champion and the same admissions with the same outcomes give the same value."""
    h = hashlib.sha256(champion.encode())
    h.update(
        rows.select(*ROW_KEY, pl.col("label").cast(pl.Boolean)).hash_rows(seed=0).sort().to_numpy().tobytes()
    )
    return h.hexdigest()[:16]


def _waiting(registry: Registry, champion: str) -> str | None:
    """Why no recalibration should be offered now: a newer model is before the panel or being promoted."""
    newest = registry.newest_card()
    if newest is None or newest.version <= champion:
        return None
    last = [d for d in registry.decisions() if d.challenger == newest.version]
    if last and (last[-1].awaiting_sign_off or last[-1].promoted):
        state = "awaits the clinical panel's sign-off" if last[-1].awaiting_sign_off else "is being promoted"
        return f"model {newest.version}, registered after the champion {champion}, {state}: one decision at a time"
    return None


def offer_recalibration(
    store: UseCaseStore,
    registry: Registry,
    champion: Champion,
    config: MonitoringConfig,
    *,
    use_case: UseCase,
    settings: GateSettings,
    events: ParquetParts,
    run_id: str,
) -> RecalibrationOffer:
    """Decide whether to offer a recalibrated champion and, when so, register it and judge it through the
    gate (the decision is recorded; the champion pointer does not move). The offer is kept in the store."""
    rows = recent_labelled_rows(store, champion)
    champ = champion.version
    previous = store.recalibration.read() if store.recalibration.exists() else None
    base = RecalibrationOffer(champ, "not offered", "")
    if rows.height == 0:
        return _keep(
            store,
            replace(
                base,
                reason=f"No admission with a known outcome in a batch model {champ} was not trained on: nothing to recalibrate on.",
            ),
        )
    model = champion.scorer.model
    y = rows["label"].cast(pl.Int8).to_numpy()
    p = model.predict(feature_matrix(rows, model.feature_names))
    batches = sorted(rows["batch_id"].unique().to_list())
    check = monitored_calibration(y, p, threshold=champion.card.threshold, config=config)
    counts = replace(
        base,
        fingerprint=_fingerprint(champ, rows),
        admissions=rows.height,
        patients=rows["subject_id"].n_unique(),
        events=int(y.sum()),
        batches=len(batches),
        first_batch=batches[0],
        last_batch=batches[-1],
        check=check,
    )
    if not check.outside:
        return _keep(
            store,
            replace(
                counts,
                status="not needed",
                reason=f"Calibration of model {champ} is within its monitoring ranges on these admissions: no recalibration offered.",
            ),
        )
    why = "; ".join(check.outside)
    if (
        previous is not None
        and previous.champion_version == champ
        and previous.fingerprint == counts.fingerprint
        and previous.challenger_version
    ):
        return replace(
            previous,
            status="already offered",
            reason=f"These admissions were already offered as model {previous.challenger_version} for model {champ}.",
        )
    waiting = _waiting(registry, champ)
    if waiting:
        return _keep(store, replace(counts, reason=f"Calibration drifted ({why}), but {waiting}."))
    subjects = rows["subject_id"].to_numpy()
    try:
        recal = fit_recalibration(y, p)
        folds = out_of_fold_recalibrations(y, p, subjects, seed=use_case.validation.seed)
    except ValueError as e:
        return _keep(
            store,
            replace(
                counts,
                status="not possible",
                reason=f"Calibration drifted ({why}), but no recalibration: {e}.",
            ),
        )
    offer = _register(
        store,
        registry,
        champion,
        rows,
        recal,
        folds,
        counts,
        use_case=use_case,
        settings=settings,
        events=events,
        run_id=run_id,
        why=why,
    )
    if offer.status == "offered":  # the card the panel reads and signs (its sha256 is recorded at sign-off)
        html, md = recalibration_report(offer, use_case=use_case, code_version=code_version())
        store.reports.write_report(f"report_card_{offer.challenger_version}", html)
        store.reports.write_report(f"report_card_{offer.challenger_version}", md, suffix="md")
    return _keep(store, offer)


def _keep(store: UseCaseStore, offer: RecalibrationOffer) -> RecalibrationOffer:
    store.recalibration.write(offer)
    return offer


def _register(
    store: UseCaseStore,
    registry: Registry,
    champion: Champion,
    rows: pl.DataFrame,
    recal: Recalibration,
    folds: tuple[Recalibration, ...],
    counts: RecalibrationOffer,
    *,
    use_case: UseCase,
    settings: GateSettings,
    events: ParquetParts,
    run_id: str,
    why: str,
) -> RecalibrationOffer:
    """Register the recalibrated champion, judge it through the gate on ``rows`` (out-of-fold risk) and
    record the decision under the use case's approval rule (it waits for the panel)."""
    card, champ = champion.card, champion.version
    version = new_version()
    text = recalibrated_model_text(registry.model_text(champ), recal)
    model = load_model(text)
    t_before = card.threshold
    t_after = recal.one(t_before)
    approved = champion.group_thresholds
    carried = (
        None
        if approved is None
        else {
            "attribute": approved.attribute,
            "before": dict(approved.thresholds),
            "after": {g: recal.one(t) for g, t in approved.thresholds.items()},
        }
    )
    seed = use_case.validation.seed
    names = store.cohort.scan().collect_schema().names()
    attrs = [a for a in use_case.subgroups.attributes if a not in rows.columns and a in names]
    cohort = store.cohort.read(columns=[*ROW_KEY, *attrs, *[c for c in STAY_COLUMNS if c in names]])
    frame = rows.join(cohort.select(*ROW_KEY, *attrs), on=ROW_KEY, how="left").with_columns(
        # an audited attribute the cohort does not carry is unknown for everyone (as in the fairness audit)
        pl.lit(None, dtype=pl.String).alias(a)
        for a in use_case.subgroups.attributes
        if a not in rows.columns and a not in names
    )
    y = frame["label"].cast(pl.Int8).to_numpy()
    subjects = frame["subject_id"].to_numpy()
    p_champ = champion.scorer.model.predict(feature_matrix(frame, champion.scorer.model.feature_names))
    risk = out_of_fold_risk(p_champ, subjects, folds, seed=seed)
    preds = frame.select("subject_id", *ROW_KEY, "label", *use_case.subgroups.attributes).with_columns(
        pl.lit("held_out").alias("split"), pl.Series("risk", risk)
    )
    chosen = f"the champion's threshold {t_before:.4f} carried through the recalibration (the same patients are flagged)"
    ev = evaluate_validation(
        preds,
        OperatingThreshold(t_after, version, chosen),
        n_boot=settings.n_bootstrap,
        seed=settings.seed,
        stays=cohort,
        one_day_per_stay=use_case.prediction_time.anchor == "discharge",
    )
    before = bootstrap_metrics(
        y, p_champ, t_before, n_boot=settings.n_bootstrap, seed=settings.seed, groups=subjects
    )
    inputs = gate_inputs(
        preds,
        store.features.read(),
        use_case=use_case,
        metrics=ev.metrics_dict(),
        threshold=t_after,
        challenger=model,
        training_ranges=card.training_ranges,
        champion=champion.scorer.model,
        champion_card=card.as_dict(),
        alert_burden=ev.alert_burden,
    )
    # the gate judges each patient's risk from the fold that did not see the patient, in the gate's row order
    assert inputs.champion_x is not None and inputs.patients is not None
    inputs = replace(
        inputs,
        risk=out_of_fold_risk(
            champion.scorer.model.predict(inputs.champion_x), inputs.patients, folds, seed=seed
        ),
    )
    gate, figures = settings.judge(inputs, use_case)
    offer = replace(
        counts,
        status="offered",
        challenger_version=version,
        intercept=recal.intercept,
        slope=recal.slope,
        threshold_before=t_before,
        threshold_after=t_after,
        group_thresholds=carried,
        before={k: v.as_dict() for k, v in before.items()},
        after=ev.metrics_dict(),
    )
    what = offer.what(use_case.words.events)
    fit = FitSummary.from_dict(
        {**card.fit, "training_ranges": {k: list(v) for k, v in card.training_ranges.items()}}
    )
    registry.register(
        build_model_card(
            use_case=use_case,
            fit=ChallengerFit(version, fit, tuple(model.feature_names)),
            evaluation=ev,
            split_info=SplitInfo(
                "recalibration",
                "recalibration",
                (),
                (),
                f"{what} Judged on the same admissions, out of fold ({FOLDS} folds of patients).",
            ),
            gate=gate,
            gate_figures=figures,
            lineage=Lineage(
                batch_ids=card.lineage.batch_ids,
                batch_data_versions=events.data_versions(list(card.lineage.batch_ids)),
                code_version=code_version(),
                use_case_sha256=use_case.source_sha256,
                dagster_run_id=run_id,
                champion_at_training=champ,
                retraining_reason=f"recalibration because calibration drifted ({why}). {what}",
            ),
            champion=card,
            drift_from=None,
        ),
        model_text=text,
    )
    decision = registry.record_decision(
        apply_approval_policy(
            decision_for(gate, challenger=version, champion_before=champ),
            approval=use_case.promotion.approval,
            fairness_verdict=None,  # no subcohort analysis of the recalibrated model: the panel decides
        ),
        move_pointer=False,
    )
    reason = f"Calibration drifted ({why}): recalibrated model {version} offered; " + (
        "it passed the gate and awaits the clinical panel's sign-off."
        if decision.awaiting_sign_off
        else "the gate refused it: " + "; ".join(c.reason for c in gate.criteria if not c.passed) + "."
    )
    return replace(offer, reason=reason, decision=decision.as_dict())


CALIBRATION_ROWS = (
    ("observed_expected_ratio", "Observed / expected", 2),
    ("calibration_slope", "Calibration slope", 2),
    ("calibration_intercept", "Calibration-in-the-large (intercept)", 2),
    ("brier", "Brier score", 3),
)


def recalibration_view(offer: RecalibrationOffer, *, use_case: UseCase) -> dict:
    """The recalibration's report card content: every sentence written here (and tested), none in a
    template; only an offered recalibration has one."""
    if offer.status != "offered" or offer.check is None or offer.decision is None:
        raise ValueError(f"no recalibration was offered ({offer.status}): {offer.reason}")
    assert offer.intercept is not None and offer.slope is not None
    assert offer.threshold_before is not None and offer.threshold_after is not None
    words = use_case.words
    recal = Recalibration(offer.intercept, offer.slope)
    decision = offer.decision
    version = offer.challenger_version
    waiting = bool(decision.get("awaiting_sign_off"))

    def ci(m: dict, digits: int) -> str:
        return f"{m['value']:.{digits}f} ({m['lower']:.{digits}f} to {m['upper']:.{digits}f})"

    return {
        "why": f"On {offer.admissions:,} admissions whose outcome is known ({offer.events:,} {words.events}), from "
        f"batches model {offer.champion_version} was not trained on, its calibration is outside the monitoring "
        "range: " + "; ".join(offer.check.outside) + ".",
        "what": offer.what(words.events),
        "order": "Recalibration changes the risks shown, not the order of the patients: the recalibrated model "
        f"ranks them exactly as model {offer.champion_version} does, and the operating threshold moves with the "
        f"risks from {offer.threshold_before:.4f} to {offer.threshold_after:.4f}, so the same patients are "
        "flagged as before.",
        "groups": _carried_groups_sentence(offer),
        "examples": [
            {"before": f"{100 * a:.0f}%", "after": f"{100 * b:.1f}%"} for a, b in risk_examples(recal)
        ],
        "judged": f"Judged on the same {offer.admissions:,} admissions (what the gate below calls the validation "
        f"cohort): each patient's risk is recalibrated by a fit that did not see the patient ({FOLDS} folds of "
        "patients), so these figures are not those of the data the recalibration was fitted to; as the folds' fits "
        "differ slightly, patients of different folds can change order, which is all the gate's AUROC difference "
        "measures. Before: the champion's risk; after: the recalibrated risk; 95% CIs resample patients.",
        "rows": [
            {"name": name, "before": ci(offer.before[k], d), "after": ci(offer.after[k], d)}
            for k, name, d in CALIBRATION_ROWS
            if k in offer.before and k in offer.after
        ],
        "decision": decision_in_words(decision),
        "criteria": [
            {
                "part": c["group"].replace("_", " "),
                "result": criterion_result(c).strip("*"),
                "reason": c["reason"],
            }
            for c in decision.get("criteria", [])
        ],
        "sign_off": (
            f'To approve or reject it after reading this card: clinical-ml approve {use_case.name} --by "NAME" '
            f'--approve|--reject --version {version} --note "..." (or the panel sign-off job in the UI).'
            if waiting
            else "The gate refused it, so it cannot be approved; the champion stays."
        ),
        "limitations": [
            f"The trees are those of model {offer.champion_version}, derived from the batches it was trained on; "
            "recalibration cannot restore discrimination lost to drift: if AUROC fell, retraining is needed.",
            f"Realised performance on these {offer.admissions:,} admissions in the monitoring report partly reflects "
            "the recalibration fitted to them (two parameters).",
            "The promotion gate judged the subgroup minimums and calibration ranges on these admissions; no full "
            "subcohort report (intersections, new per-group thresholds) was made for the recalibrated model, so it "
            "never promotes itself: it waits for the panel.",
        ],
    }


def _carried_groups_sentence(offer: RecalibrationOffer) -> str:
    """What approving does to the per-group thresholds approved with the champion ("" when it had none)."""
    groups = offer.group_thresholds
    if not groups:
        return ""
    attribute = attribute_title(str(groups["attribute"]))

    def listed(side: str) -> str:
        return ", ".join(f"{g} {float(t):.4f}" for g, t in sorted(groups[side].items()))

    return (
        f"The per-group thresholds approved with model {offer.champion_version} (by {attribute}: "
        f"{listed('before')}) move with the risks to {listed('after')}: approving this model keeps them, so the "
        "same patients of each group are flagged as before."
    )


def recalibration_report(
    offer: RecalibrationOffer, *, use_case: UseCase, code_version: str
) -> tuple[str, str]:
    """The recalibrated model's report card (HTML, what the panel signs) and its Markdown summary."""
    v = recalibration_view(offer, use_case=use_case)
    html = render(
        "recalibration.html.j2",
        title=f"{use_case.title}: recalibration of model {offer.champion_version}",
        subtitle=f"Model {offer.challenger_version}, for the clinical review panel",
        v=v,
        use_case_name=use_case.name,
        use_case_hash=use_case.source_sha256[:12],
        model_version=offer.challenger_version or "",
        code_version=code_version,
    )
    md = (
        f"**Recalibration offered:** {md_escape(v['decision'])}\n\n{md_escape(v['why'])}\n\n{md_escape(v['what'])} "
        f"{md_escape(v['order'])}"
        + (f" {md_escape(v['groups'])}" if v["groups"] else "")
        + "\n\n| Measure | Before (95% CI) | After (95% CI) |\n|---|---|---|\n"
        + "".join(f"| {r['name']} | {r['before']} | {r['after']} |\n" for r in v["rows"])
    )
    return html, md
