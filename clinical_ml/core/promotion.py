"""Registering a challenger and judging it: the promotion gate run on the validation cohort, the model card
written with its lineage, and the decision recorded (the champion pointer moves later, only after the
blocking gate checks passed)."""

from dataclasses import dataclass

from clinical_ml.core.approval import apply_approval_policy
from clinical_ml.core.artifacts import ParquetParts, UseCaseStore
from clinical_ml.core.gate import GateInputs, GateResult, gate_inputs, judge_challenger
from clinical_ml.core.modeling import load_model
from clinical_ml.core.registry import (
    Lineage,
    ModelCard,
    PromotionDecision,
    Registry,
    build_model_card,
    decision_for,
)
from clinical_ml.core.storage import code_version
from clinical_ml.core.usecase import UseCase


@dataclass(frozen=True)
class GateSettings:
    """How the gate estimates: bootstrap replicates and seed, latency repeats, an AUROC margin override."""

    n_bootstrap: int
    seed: int
    latency_repeats: int = 300
    auroc_margin: float | None = None

    def judge(self, inputs: GateInputs, use_case: UseCase) -> tuple[GateResult, dict]:
        """The promotion gate on ``inputs`` (:func:`clinical_ml.core.gate.judge_challenger`), as set here."""
        return judge_challenger(
            inputs,
            use_case,
            n_boot=self.n_bootstrap,
            seed=self.seed,
            latency_repeats=self.latency_repeats,
            auroc_margin=self.auroc_margin,
        )


@dataclass(frozen=True)
class JudgedChallenger:
    card: ModelCard
    decision: PromotionDecision


class AlreadyRegisteredError(RuntimeError):
    """The challenger in the store is the champion already: a new one must be trained first."""


def register_challenger(
    store: UseCaseStore,
    registry: Registry,
    events: ParquetParts,
    *,
    use_case: UseCase,
    settings: GateSettings,
    run_id: str,
    retraining_reason: str,
    drift_from: str | None,
) -> JudgedChallenger:
    """Judge the store's challenger against the gate, register it with its card and record the decision
    (without moving the champion pointer); the decision is also kept in the store for the reports."""
    fit, ev = store.challenger.fit.read(), store.evaluation.read()
    champ = registry.champion_card()
    if champ is not None and champ.version == fit.version:
        raise AlreadyRegisteredError(
            f"model {fit.version} is already registered; materialize risk_model first"
        )
    model_text = store.challenger.model_text()
    inputs = gate_inputs(
        store.validation_predictions.read(),
        store.features.read(),
        use_case=use_case,
        metrics=ev.metrics_dict(),
        threshold=ev.threshold,
        challenger=load_model(model_text),
        training_ranges=fit.fit.training_ranges,
        champion=registry.model(champ.version) if champ else None,
        champion_card=champ.as_dict() if champ else None,
        alert_burden=ev.alert_burden,
    )
    gate, figures = settings.judge(inputs, use_case)
    batches = sorted(store.cohort.read(columns=["batch_id"])["batch_id"].unique().to_list())
    lineage = Lineage(
        batch_ids=tuple(batches),
        batch_data_versions=events.data_versions(batches),
        code_version=code_version(),
        use_case_sha256=use_case.source_sha256,
        dagster_run_id=run_id,
        champion_at_training=champ.version if champ else None,
        retraining_reason=retraining_reason,
    )
    card = build_model_card(
        use_case=use_case,
        fit=fit,
        evaluation=ev,
        split_info=store.split_info.read(),
        gate=gate,
        gate_figures=figures,
        lineage=lineage,
        champion=champ,
        drift_from=drift_from,
    )
    registry.register(card, model_text=model_text)
    fairness = store.fairness.read() if store.fairness.exists() else None
    decision = registry.record_decision(
        apply_approval_policy(
            decision_for(gate, challenger=fit.version, champion_before=champ.version if champ else None),
            approval=use_case.promotion.approval,
            # the verdict of this challenger's subcohort analysis (a file left by an earlier model is not it)
            fairness_verdict=fairness.verdict if fairness and fairness.model_version == fit.version else None,
        ),
        move_pointer=False,
    )
    store.decision.write(decision)
    return JudgedChallenger(card, decision)
