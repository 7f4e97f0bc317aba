"""Derivation/validation split, the challenger model, the registry, and the champion/challenger gate.

The gate is three steps so that a refused challenger still gets its reports: ``model_registry`` registers
every challenger and judges it; ``promotion_decision`` records the decision in words ("Refused: ... because
...") with one check per part of the gate (WARN when that part failed, so the run shows where); and
``champion_model`` moves the champion pointer only for a promoted challenger. A refusal is a decision, not a
failure: the run succeeds, ``champion_model`` is not materialized (the pointer stays), and the refusal alert
sensor writes the alert.
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import dagster as dg
from pydantic import Field

from clinical_ml.core.approval import sign_off
from clinical_ml.core.features import derivation_validation_split
from clinical_ml.core.gate import criterion_result, gate_markdown
from clinical_ml.core.promotion import register_challenger
from clinical_ml.core.registry import new_version
from clinical_ml.core.reports import decision_in_words, md_escape, rounded
from clinical_ml.core.training import ChallengerFit, fit_model, training_frame
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import (
    DRIFT_FROM_TAG,
    ML_OWNERS,
    RETRAIN_REASON_TAG,
    DataClass,
    Stage,
    tags,
)
from clinical_ml.defs.usecase.paths import use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones

if TYPE_CHECKING:  # the type define_asset_job returns; dagster does not export it
    from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition


class SignOffConfig(dg.Config):
    """The clinical panel's sign-off, given when launching the use case's panel sign-off job (empty in the
    lifecycle: the promotion decision alone moves the pointer)."""

    signed_off_by: str = Field("", description="who signs off, e.g. 'Dr A. Jones, for the ICU model panel'")
    decision: Literal["approve", "reject"] = Field("approve", description="approve or reject the model")
    note: str = Field("", description="the panel's note (conditions, per-group thresholds approved, ...)")
    version: str = Field("", description="the model version signed off; empty: the one awaiting sign-off")
    group_thresholds_for: str = Field(
        "",
        description="with an approval: an audited attribute (e.g. sex) whose per-group thresholds from the fairness "
        "report are approved too and applied in scoring; empty: the single threshold for everyone",
    )


def build_sign_off_job(uc: UseCase) -> "UnresolvedAssetJobDefinition":
    """The panel's sign-off from the UI: launch it with ``signed_off_by``, ``decision`` and ``note`` in the
    champion_model config (same as ``clinical-ml approve``)."""
    return dg.define_asset_job(
        f"{uc.name}__panel_sign_off",
        selection=[use_case_key(uc, "champion_model")],
        description=f"{uc.title}: record the clinical panel's sign-off of the model awaiting it (who, decision, "
        "note; the sha256 of its report card is recorded) and, on approval, make it champion. Open the "
        "Launchpad and fill the champion_model config.",
    )


GATE_CHECKS = {
    "minimums": "challenger_meets_minimums_on_lower_ci_bound",
    "non_inferiority": "challenger_non_inferior_to_champion",
    "subgroups": "challenger_meets_subgroup_minimums",
    "latency": "challenger_scoring_latency_within_slo",
}


def build_training_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("subject_splits"),
        deps=[key("cohort")],
        group_name=Stage.TRAINING,
        kinds={"polars"},
        tags=tags(DataClass.DEIDENTIFIED),
        description="Derivation cohort (MEDS train + tuning) and validation cohort (held_out), split by patient "
        f"({uc.validation.strategy} validation); the tuning part comes from the derivation cohort only.",
        owners=ML_OWNERS,
    )
    def subject_splits(zones: DataZones) -> dg.MaterializeResult:
        v, store = uc.validation, zones.use_case(uc.name)
        splits, info = derivation_validation_split(
            store.cohort.read(),
            strategy=v.strategy,
            validation_periods=v.validation_periods,
            fraction=v.fraction,
            tuning_fraction=v.tuning_fraction,
            seed=v.seed,
        )
        store.subject_splits.write(splits)
        store.split_info.write(info)
        counts = dict(splits.group_by("split").len().iter_rows())
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": splits.height,
                **{f"subjects_{k}": v for k, v in counts.items()},
                "validation_strategy": info.strategy,
                "validation_periods": ", ".join(info.validation_periods) or "random patients",
                "report": dg.MetadataValue.md(md_escape(info.note)),
            }
        )

    @dg.asset(
        key=key("risk_model"),
        deps=[key("patient_features"), key("labels"), key("subject_splits")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="The challenger: LightGBM fitted on the derivation cohort, early-stopped on its tuning part.",
        owners=ML_OWNERS,
    )
    def risk_model(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        store = zones.use_case(uc.name)
        frame = training_frame(store.features.read(), store.labels.read(), store.subject_splits.read())
        model, fit = fit_model(frame, uc)
        version = new_version()
        store.challenger.write(model.to_text(), ChallengerFit(version, fit, tuple(model.feature_names)))
        context.log.info(f"challenger {version}: {fit.best_iteration} trees")
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "best_iteration": fit.best_iteration,
                "n_train": fit.n_train,
                "n_tuning": fit.n_tuning,
                "events_train": fit.events_train,
            },
            data_version=dg.DataVersion(version),
        )

    @dg.asset(
        key=key("model_registry"),
        deps=[key("model_evaluation"), key("shap_explanations"), key("subcohort_fairness_report")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="Registers every challenger (LightGBM text model, features, training ranges, metrics with "
        "CIs, lineage) and judges it against the promotion gate: minimums on the lower CI bound, paired "
        "non-inferiority to the champion, subgroup minimums, scoring latency.",
        owners=ML_OWNERS,
    )
    def model_registry(
        context: dg.AssetExecutionContext, zones: DataZones, evaluation: EvaluationSettings
    ) -> dg.MaterializeResult:
        registry = zones.model_registry(uc.name)
        judged = register_challenger(
            zones.use_case(uc.name),
            registry,
            zones.deid_store().events,
            use_case=uc,
            settings=evaluation.gate_settings(),
            run_id=context.run.run_id,
            retraining_reason=context.run.tags.get(RETRAIN_REASON_TAG, "manual or scheduled"),
            drift_from=context.run.tags.get(DRIFT_FROM_TAG),
        )
        card, decision = judged.card, judged.decision
        decisions, problems = registry.decision_log()
        history = [d.as_dict() for d in decisions[-10:]]
        for problem in problems:  # where the line is, never its content
            context.log.warning(problem)
        return dg.MaterializeResult(
            metadata={
                "model_version": card.version,
                "gate_passed": decision.promoted,
                "champion_version": decision.champion_before or "none",
                "auroc_validation": rounded(card.metrics["auroc"].value),
                "auroc_validation_lower": rounded(card.metrics["auroc"].lower),
                "scoring_latency_p99_ms": rounded(card.latency_ms["p99_ms"], 2),
                "abstention_rate_validation": rounded(card.abstention_rate_validation),
                "models_registered": len(registry.versions()),
                "decision_log_lines_skipped": len(problems),
                "report": dg.MetadataValue.md(
                    gate_markdown(decision.as_dict(), champion_now=registry.champion(), history=history)
                ),
                "lineage": dg.MetadataValue.json(card.lineage.as_dict()),
            }
        )

    @dg.asset(
        key=key("promotion_decision"),
        deps=[key("model_registry")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="The champion/challenger decision in words, with its reasons: promoted, or refused "
        "because ... (one check per part of the gate says which part refused). A refusal keeps the champion.",
        owners=ML_OWNERS,
    )
    def promotion_decision(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        decision = zones.use_case(uc.name).decision.read()
        champion_now = zones.model_registry(uc.name).champion()
        words = decision_in_words(decision.as_dict())
        (context.log.info if decision.promoted else context.log.warning)(words)
        return dg.MaterializeResult(
            metadata={
                "decision": "promoted" if decision.promoted else "refused",
                "decision_in_words": dg.MetadataValue.text(words),
                "model_version": decision.challenger,
                "champion_before": decision.champion_before or "none",
                "promoted": decision.promoted,
                "report": dg.MetadataValue.md(
                    f"{md_escape(words)}\n\n{gate_markdown(decision.as_dict(), champion_now=champion_now)}"
                ),
            }
        )

    def gate_check(group: str, name: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(
            asset=key("promotion_decision"),
            name=name,
            blocking=True,
            description=f"Promotion gate, {group.replace('_', ' ')}: a WARN here is a reason the challenger "
            "was refused (the run still succeeds; the champion pointer does not move).",
        )
        def _check(zones: DataZones) -> dg.AssetCheckResult:
            decision = zones.use_case(uc.name).decision.read()
            crit = decision.criteria_of(group)
            passed = all(c["passed"] for c in crit)
            return dg.AssetCheckResult(
                passed=passed,
                # a refusal is a decision, not a crash: WARN shows the part that refused without failing the run
                severity=dg.AssetCheckSeverity.WARN,
                description=(
                    f"{'passed' if passed else 'refused'}: "
                    + "; ".join(f"{criterion_result(c)}, {c['reason']}" for c in crit)
                )[:1000],
                metadata={
                    "model_version": decision.challenger,
                    "decision": "promoted" if decision.promoted else "refused",
                    # a part with nothing to judge passes without being met: counted apart, never as a pass
                    "criteria_not_judged": sum(not c.get("judged", True) for c in crit),
                    "report": dg.MetadataValue.md(
                        "".join(f"- {criterion_result(c)}: {md_escape(c['reason'])}\n" for c in crit)
                    ),
                },
            )

        return _check

    @dg.asset(
        key=key("champion_model"),
        deps=[key("promotion_decision")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="The champion pointer: moved to the challenger only when the promotion decision promoted "
        "it, or when the panel approves it (the use case's panel sign-off job, launched with the sign-off in "
        "its config); after a refusal, or while a model awaits sign-off, it materializes nothing and the "
        "champion stays.",
        owners=ML_OWNERS,
        output_required=False,
    )
    def champion_model(
        context: dg.AssetExecutionContext, zones: DataZones, config: SignOffConfig
    ) -> Iterator[dg.MaterializeResult]:
        store, registry = zones.use_case(uc.name), zones.model_registry(uc.name)
        if config.signed_off_by:  # the panel's sign-off job: record it (and move the pointer on approval)
            decision = sign_off(
                registry,
                store,
                by=config.signed_off_by,
                approve=config.decision == "approve",
                note=config.note,
                version=config.version or None,
                group_thresholds_for=config.group_thresholds_for or None,
            )
        else:
            decision = store.decision.read()
        if not decision.promoted:
            context.log.warning(f"champion pointer not moved. {decision_in_words(decision.as_dict())}")
            return
        registry.set_champion(decision.challenger)
        yield dg.MaterializeResult(
            metadata={
                "champion_version": decision.challenger,
                "champion_before": decision.champion_before or "none",
            },
            data_version=dg.DataVersion(decision.challenger),
        )

    return [
        subject_splits,
        risk_model,
        model_registry,
        promotion_decision,
        *[gate_check(g, n) for g, n in GATE_CHECKS.items()],
        champion_model,
    ]
