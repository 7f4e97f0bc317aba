"""Derivation/validation split, the challenger model, and the registry with its promotion gate."""

import dagster as dg
import polars as pl

from clinical_ml.core import registry
from clinical_ml.core.features import (
    patient_grouped_split,
)
from clinical_ml.core.storage import code_version, read_json, write_json, write_parquet
from clinical_ml.core.training import (
    fit_model,
    training_frame,
)
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.conventions import ML_OWNERS, DataClass, Stage, tags
from clinical_ml.defs.usecase.paths import UseCasePaths, sha256_file, use_case_key
from clinical_ml.resources.settings import EvaluationSettings
from clinical_ml.resources.zones import DataZones


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
        description="Derivation cohort (MEDS train + tuning) and validation cohort (held_out), split by patient.",
        owners=ML_OWNERS,
    )
    def subject_splits(zones: DataZones) -> dg.MaterializeResult:
        splits = patient_grouped_split(
            pl.read_parquet(paths.deid(zones, "cohort.parquet")),
            validation_fraction=uc.validation.fraction,
            tuning_fraction=uc.validation.tuning_fraction,
            seed=uc.validation.seed,
        )
        write_parquet(splits, paths.deid(zones, "subject_splits.parquet"))
        counts = dict(splits.group_by("split").len().iter_rows())
        return dg.MaterializeResult(
            metadata={"dagster/row_count": splits.height, **{f"subjects_{k}": v for k, v in counts.items()}}
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
        description="Registers the challenger with its lineage and metrics; promotes it to champion only if it "
        "meets every minimum on the lower CI bound and is non-inferior to the current champion.",
        owners=ML_OWNERS,
    )
    def model_registry(
        context: dg.AssetExecutionContext, zones: DataZones, evaluation: EvaluationSettings
    ) -> dg.MaterializeResult:
        model_dir = paths.deid(zones, "challenger")
        fit = read_json(model_dir / "fit.json")
        ev = read_json(paths.deid(zones, "evaluation.json"))
        version = fit["version"]
        cohort_df = pl.read_parquet(paths.deid(zones, "cohort.parquet"), columns=["batch_id"])
        batches = sorted(cohort_df["batch_id"].unique().to_list())
        card = {
            "use_case": uc.name,
            "version": version,
            "feature_names": fit["feature_names"],
            "training_ranges": fit["fit"]["training_ranges"],
            "fit": {k: v for k, v in fit["fit"].items() if k != "training_ranges"},
            "threshold": ev["threshold"],
            "metrics": ev["metrics"],
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
            },
        }
        root = paths.registry(zones)
        champ_version = registry.champion(root, uc.name)
        champ_card = registry.read_card(root, uc.name, champ_version) if champ_version else None
        if champ_version == version:
            raise dg.Failure(f"model {version} is already registered; materialize risk_model first")
        registry.register_model(
            root, uc.name, version, model_text=(model_dir / "model.txt").read_text(), card=card
        )
        promoted, reasons = registry.decide_promotion(
            card,
            champ_card,
            criteria=uc.success_criteria.model_dump(),
            auroc_margin=evaluation.auroc_non_inferiority_margin,
        )
        decision = registry.PromotionDecision(promoted, version, champ_version, tuple(reasons))
        registry.record_decision(root, uc.name, decision)
        write_json(decision.as_dict(), paths.deid(zones, "decision.json"))
        now = registry.champion(root, uc.name)
        md = (
            f"**{'Promoted' if promoted else 'Not promoted'}**: challenger {version}\n\n"
            + "".join(f"- {r}\n" for r in reasons)
            + f"\nChampion now: {now}\n"
        )
        return dg.MaterializeResult(
            metadata={
                "model_version": version,
                "promoted": promoted,
                "champion_version": now or "none",
                "auroc_validation": ev["metrics"]["auroc"]["value"],
                "report": dg.MetadataValue.md(md),
                "lineage": dg.MetadataValue.json(card["lineage"]),
            }
        )

    return [subject_splits, risk_model, model_registry]
