"""Derivation/validation split, the challenger model, the registry, and the champion/challenger gate.

The gate is three steps so that a refused challenger still gets its reports: ``model_registry`` registers
every challenger and judges it (decision with reasons, shown on its page and in the reports);
``promotion_decision`` carries the blocking checks, one per part of the gate; ``champion_model`` moves
the champion pointer and, being downstream of those checks, never runs for a refused challenger.
A refusal therefore fails the run on purpose: the failed check is the alert.
"""

import dagster as dg
import polars as pl

from clinical_ml.core import registry
from clinical_ml.core.features import derivation_validation_split, feature_matrix
from clinical_ml.core.modeling import load_model
from clinical_ml.core.reports import md_escape
from clinical_ml.core.storage import code_version, read_json, sha256_file, write_json, write_parquet
from clinical_ml.core.training import GateInputs, fit_model, judge_challenger, training_frame
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import (
    DRIFT_FROM_TAG,
    ML_OWNERS,
    RETRAIN_REASON_TAG,
    DataClass,
    Stage,
    tags,
)
from clinical_ml.defs.usecase.paths import UseCasePaths, load_challenger, use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones

GATE_CHECKS = {
    "minimums": "challenger_meets_minimums_on_lower_ci_bound",
    "non_inferiority": "challenger_non_inferior_to_champion",
    "subgroups": "challenger_meets_subgroup_minimums",
    "latency": "challenger_scoring_latency_within_slo",
}


def refused_by_gate_only(result: dg.ExecuteInProcessResult) -> bool:
    """True when a run failed only because a promotion gate refused a challenger (the expected outcome for a
    model that is not better), so callers such as the demo CLI can report "not promoted" instead of a failure."""
    failed = {e.step_key for e in result.all_events if e.is_step_failure and e.step_key}
    return bool(failed) and all(
        any(k.endswith(f"__promotion_decision_{name}") for name in GATE_CHECKS.values()) for k in failed
    )


def _gate_markdown(decision: dict, champion_now: str | None) -> str:
    verdict = "Promoted" if decision["promoted"] else "Not promoted"
    rows = "".join(
        f"| {c['group'].replace('_', ' ')} | {'pass' if c['passed'] else '**FAIL**'} | {md_escape(c['reason'])} |\n"
        for c in decision.get("criteria", [])
    )
    return (
        f"**{verdict}**: challenger {decision['challenger']} "
        f"(champion before: {decision['champion_before'] or 'none'}; now: {champion_now or 'none'})\n\n"
        f"| part of the gate | result | reason |\n|---|---|---|\n{rows}"
    )


def build_training_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    paths = UseCasePaths(uc.name)

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
        v = uc.validation
        splits, info = derivation_validation_split(
            pl.read_parquet(paths.deid(zones, "cohort.parquet")),
            strategy=v.strategy,
            validation_periods=v.validation_periods,
            fraction=v.fraction,
            tuning_fraction=v.tuning_fraction,
            seed=v.seed,
        )
        write_parquet(splits, paths.deid(zones, "subject_splits.parquet"))
        write_json(info.as_dict(), paths.deid(zones, "split_info.json"))
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
        frame = training_frame(
            pl.read_parquet(paths.deid(zones, "features.parquet")),
            pl.read_parquet(paths.deid(zones, "labels.parquet")),
            pl.read_parquet(paths.deid(zones, "subject_splits.parquet")),
        )
        model, fit = fit_model(frame, uc)
        version = registry.new_version()
        challenger = paths.deid(zones, "challenger")
        challenger.mkdir(parents=True, exist_ok=True)
        (challenger / "model.txt").write_text(model.to_text())
        write_json(
            {"version": version, "fit": fit.as_dict(), "feature_names": model.feature_names},
            challenger / "fit.json",
        )
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
        deps=[key("model_evaluation"), key("shap_explanations")],
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
        model, fit = load_challenger(paths, zones)
        ev = read_json(paths.deid(zones, "evaluation.json"))
        version = fit["version"]
        cohort_df = pl.read_parquet(paths.deid(zones, "cohort.parquet"))
        batches = sorted(cohort_df["batch_id"].unique().to_list())
        split_info = read_json(paths.deid(zones, "split_info.json"))
        root = paths.registry(zones)
        champ_version = registry.champion(root, uc.name)
        if champ_version == version:
            raise dg.Failure(f"model {version} is already registered; materialize risk_model first")
        champ_card = registry.read_card(root, uc.name, champ_version) if champ_version else None

        held = pl.read_parquet(paths.deid(zones, "validation_predictions.parquet")).filter(
            pl.col("split") == "held_out"
        )
        rows = held.select("hadm_id", "label", *uc.subgroups.attributes).join(
            pl.read_parquet(paths.deid(zones, "features.parquet")), on="hadm_id", how="inner"
        )
        champion = (
            load_model(registry.read_model_text(root, uc.name, champ_version)) if champ_version else None
        )
        champion_x = (
            feature_matrix(rows, champion.feature_names)
            if champion is not None and set(champion.feature_names) <= set(rows.columns)
            else None
        )
        gate, extras = judge_challenger(
            GateInputs(
                y=rows["label"].cast(pl.Int8).to_numpy(),
                x=feature_matrix(rows, model.feature_names),
                groups={
                    a: rows[a].cast(pl.String).fill_null("Unknown").to_numpy()
                    for a in uc.subgroups.attributes
                },
                metrics=ev["metrics"],
                challenger=model,
                threshold=ev["threshold"],
                training_ranges={k: tuple(v) for k, v in fit["fit"]["training_ranges"].items()},
                champion=champion,
                champion_card=champ_card,
                champion_x=champion_x,
            ),
            uc,
            n_boot=evaluation.n_bootstrap,
            seed=evaluation.bootstrap_seed,
            latency_repeats=evaluation.latency_repeats,
            auroc_margin=evaluation.auroc_non_inferiority_margin,
        )
        card = {
            "use_case": uc.name,
            "version": version,
            "feature_names": fit["feature_names"],
            "training_ranges": fit["fit"]["training_ranges"],
            "fit": {k: v for k, v in fit["fit"].items() if k != "training_ranges"},
            "threshold": ev["threshold"],
            "metrics": ev["metrics"],
            "n_validation": ev["n_validation"],
            "events_validation": ev["events_validation"],
            "validation": split_info,
            "guardrails": uc.guardrails.model_dump(),
            "gate": gate.as_dict(),
            **extras,
            "lineage": {
                "batch_ids": batches,
                "batch_data_versions": {
                    b: sha256_file(zones.deid / "events" / f"{b}.parquet")
                    for b in batches
                    if (zones.deid / "events" / f"{b}.parquet").exists()
                },
                "code_version": code_version(),
                "use_case_sha256": uc.source_sha256,
                "dagster_run_id": context.run.run_id,
                "champion_at_training": champ_version,
                "retraining_reason": context.run.tags.get(RETRAIN_REASON_TAG, "manual or scheduled"),
            },
            # where this model's drift reference starts: the batch of the drift episode it was retrained for,
            # else inherited from the champion it would replace (None: the whole derivation cohort)
            "drift_reference_from": context.run.tags.get(DRIFT_FROM_TAG)
            or (champ_card or {}).get("drift_reference_from"),
        }
        registry.register_model(
            root,
            uc.name,
            version,
            model_text=(paths.deid(zones, "challenger") / "model.txt").read_text(),
            card=card,
        )
        decision = registry.PromotionDecision(
            gate.passed,
            version,
            champ_version,
            tuple(gate.reasons()),
            tuple(c.as_dict() for c in gate.criteria),
        )
        # the pointer moves in champion_model, after the blocking gate checks
        registry.record_decision(root, uc.name, decision, move_pointer=False)
        write_json(decision.as_dict(), paths.deid(zones, "decision.json"))
        history = registry.decision_history(root, uc.name)[-10:]
        hist_md = "| decided at | challenger | promoted |\n|---|---|---|\n" + "".join(
            f"| {h['at'][:19]} | {h['challenger']} | {'yes' if h['promoted'] else 'no'} |\n"
            for h in reversed(history)
        )
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "gate_passed": gate.passed,
                "champion_version": champ_version or "none",
                "auroc_validation": ev["metrics"]["auroc"]["value"],
                "auroc_validation_lower": ev["metrics"]["auroc"]["lower"],
                "scoring_latency_p99_ms": extras["latency_ms"]["p99_ms"],
                "abstention_rate_validation": extras["abstention_rate_validation"],
                "models_registered": len(registry.registered_versions(root, uc.name)),
                "report": dg.MetadataValue.md(
                    _gate_markdown(decision.as_dict(), champ_version) + "\n**Recent decisions**\n\n" + hist_md
                ),
                "lineage": dg.MetadataValue.json(card["lineage"]),
            }
        )

    @dg.asset(
        key=key("promotion_decision"),
        deps=[key("model_registry")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="The champion/challenger decision with its reasons; its blocking checks stop a challenger "
        "that fails any part of the gate from becoming champion.",
        owners=ML_OWNERS,
    )
    def promotion_decision(zones: DataZones) -> dg.MaterializeResult:
        decision = read_json(paths.deid(zones, "decision.json"))
        return dg.MaterializeResult(
            metadata={
                "model_version": decision["challenger"],
                "promoted": decision["promoted"],
                "report": dg.MetadataValue.md(
                    _gate_markdown(decision, registry.champion(paths.registry(zones), uc.name))
                ),
            }
        )

    def gate_check(group: str, name: str) -> dg.AssetChecksDefinition:
        @dg.asset_check(
            asset=key("promotion_decision"),
            name=name,
            blocking=True,
            description=f"Promotion gate, {group.replace('_', ' ')}: blocks the champion pointer when it fails.",
        )
        def _check(zones: DataZones) -> dg.AssetCheckResult:
            decision = read_json(paths.deid(zones, "decision.json"))
            crit = [c for c in decision["criteria"] if c["group"] == group]
            passed = all(c["passed"] for c in crit)
            return dg.AssetCheckResult(
                passed=passed,
                severity=dg.AssetCheckSeverity.ERROR,
                metadata={
                    "model_version": decision["challenger"],
                    "report": dg.MetadataValue.md("".join(f"- {md_escape(c['reason'])}\n" for c in crit)),
                },
            )

        return _check

    @dg.asset(
        key=key("champion_model"),
        deps=[key("promotion_decision")],
        group_name=Stage.TRAINING,
        kinds={"lightgbm"},
        tags=tags(DataClass.AGGREGATE),
        description="The champion pointer: moved to the challenger only after every blocking gate check passed.",
        owners=ML_OWNERS,
    )
    def champion_model(zones: DataZones) -> dg.MaterializeResult:
        decision = read_json(paths.deid(zones, "decision.json"))
        if not decision["promoted"]:
            raise dg.Failure(f"challenger {decision['challenger']} did not pass the promotion gate")
        registry.set_champion(paths.registry(zones), uc.name, decision["challenger"])
        return dg.MaterializeResult(
            metadata={
                "champion_version": decision["challenger"],
                "champion_before": decision["champion_before"] or "none",
            },
            data_version=dg.DataVersion(decision["challenger"]),
        )

    return [
        subject_splits,
        risk_model,
        model_registry,
        promotion_decision,
        *[gate_check(g, n) for g, n in GATE_CHECKS.items()],
        champion_model,
    ]
