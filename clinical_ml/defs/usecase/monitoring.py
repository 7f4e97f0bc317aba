"""Monitoring of one use case: each batch scored and checked for drift (one partition per batch), the FHIR
export for the EHR, and performance over time; the newest-batch drift report is kept for the report set."""

import hashlib
import json
import os
import pickle
from datetime import date, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from clinical_ml.core import plots, registry
from clinical_ml.core.drift import PSI_ERROR, PSI_WARN, feature_drift
from clinical_ml.core.explain import feature_label
from clinical_ml.core.features import feature_matrix
from clinical_ml.core.fhir import ScoredAdmission, reidentify_for_ehr, write_ndjson
from clinical_ml.core.modeling import load_model
from clinical_ml.core.monitoring import (
    PREDICTION_COLUMN,
    ConfidenceBasedEstimator,
    MonitoringConfig,
    MonitoringReference,
    label_maturity,
    load_monitoring_config,
    monitor_batch,
    monitoring_report,
    performance_by_period,
    prepare_reference,
)
from clinical_ml.core.reports import drift_report, write_report
from clinical_ml.core.scoring import Scorer
from clinical_ml.core.storage import code_version, read_json, write_json, write_parquet
from clinical_ml.core.usecase import UseCase
from clinical_ml.defs.anonymization.assets import load_vault
from clinical_ml.defs.conventions import (
    ML_OWNERS,
    PRIVACY_OWNERS,
    DataClass,
    Stage,
    batch_partitions,
    tags,
)
from clinical_ml.defs.usecase.paths import UseCasePaths, md_table, use_case_key
from clinical_ml.resources.zones import DataZones

PER_BATCH_TAG = {"monitoring": "per_batch"}
SUBGROUP_COLUMNS = ("sex", "age_band", "race_ethnicity")
PROJECT_ROOT = Path(__file__).resolve().parents[3]


def monitoring_config_path(uc: UseCase) -> Path:
    """``usecases/monitoring/<name>.yaml``: the use case contract forbids extra sections, so monitoring
    levels live beside it in a file of their own (defaults when absent)."""
    base = Path(os.environ.get("CLINICAL_ML_USECASES") or PROJECT_ROOT / "usecases")
    return base / "monitoring" / f"{uc.name}.yaml"


def _champion(zones: DataZones, uc: UseCase) -> tuple[str, dict, Scorer]:
    version = registry.champion(zones.registry, uc.name)
    if version is None:
        raise dg.Failure(f"{uc.name} has no champion model yet: run lifecycle_job first.")
    card = registry.read_card(zones.registry, uc.name, version)
    model = load_model(registry.read_model_text(zones.registry, uc.name, version))
    ranges = {k: (float(v[0]), float(v[1])) for k, v in card.get("training_ranges", {}).items()}
    return version, card, Scorer(model=model, threshold=float(card["threshold"]), training_ranges=ranges)


def _frame(paths: UseCasePaths, zones: DataZones, batch: str | None = None) -> pl.DataFrame:
    """Features with batch, subgroup attributes, split and label of every admission (of ``batch`` only when
    given: the filter is pushed into the Parquet scans)."""
    cohort = pl.scan_parquet(paths.deid(zones, "cohort.parquet")).select(
        "hadm_id", "batch_id", "admit_time", "discharge_time", "death_time", *SUBGROUP_COLUMNS
    )
    if batch is not None:
        cohort = cohort.filter(pl.col("batch_id") == batch)
    labels = pl.scan_parquet(paths.deid(zones, "labels.parquet")).select(
        "hadm_id", pl.col("boolean_value").alias("label")
    )
    return (
        pl.scan_parquet(paths.deid(zones, "features.parquet"))
        .join(cohort, on="hadm_id")
        .join(labels, on="hadm_id", how="left")
        # patients first seen after the last training have no split yet: they are monitored all the same
        .join(pl.scan_parquet(paths.deid(zones, "subject_splits.parquet")), on="subject_id", how="left")
        .collect()
    )


def _reference(
    frame: pl.DataFrame, card: dict, scorer: Scorer, config: MonitoringConfig, exclude_batch: str
) -> tuple[MonitoringReference, str]:
    """The champion's derivation cohort (train and tuning patients of the batches it was trained on), from
    the batch where a drift it was retrained for began when that window is large enough; with a sentence
    saying which."""
    lineage = card.get("lineage", {}).get("batch_ids") or frame["batch_id"].unique().to_list()
    ref = frame.filter(
        pl.col("split").is_in(["train", "tuning"])
        & pl.col("batch_id").is_in(lineage)
        & (pl.col("batch_id") != exclude_batch)
    )
    since = card.get("drift_reference_from")
    described = f"the derivation cohort of model {card.get('version', '?')} ({ref.height} admissions)"
    if since:
        recent = ref.filter(pl.col("batch_id") >= since)
        if recent.height >= config.min_reference_rows:
            ref = recent
            described = (
                f"the derivation cohort of model {card.get('version', '?')} from batch {since}, where the drift "
                f"it was retrained for began ({ref.height} admissions: the accepted new normal)"
            )
        else:
            described += (
                f"; only {recent.height} admissions since the drift of {since}, fewer than "
                f"{config.min_reference_rows}, so the whole cohort is the reference"
            )
    names = scorer.model.feature_names
    ref = ref.with_columns(pl.Series(PREDICTION_COLUMN, scorer.model.predict(feature_matrix(ref, names))))
    labels = ref["label"].cast(pl.Boolean).fill_null(False).to_numpy()
    return prepare_reference(ref, names, config=config, labels=labels), described


def _cached_reference(
    paths: UseCasePaths, zones: DataZones, card: dict, scorer: Scorer, config: MonitoringConfig, batch: str
) -> tuple[MonitoringReference, str]:
    """The champion's reference profile, built once per champion (and drift baseline) and kept beside the
    batch records; rebuilt without the batch when the champion was trained on it (a re-check)."""
    if batch in card.get("lineage", {}).get("batch_ids", []):
        return _reference(_frame(paths, zones), card, scorer, config, batch)
    levels = hashlib.sha256(repr(config).encode()).hexdigest()[:12]  # new monitoring levels: a new profile
    since = card.get("drift_reference_from") or "all"
    cache = paths.deid(zones, f"monitoring/reference/{card['version']}_{since}_{levels}.pkl")
    if cache.exists():
        with cache.open("rb") as f:
            reference, described = pickle.load(f)
        return reference, described
    built = _reference(_frame(paths, zones), card, scorer, config, batch)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(built, f)
    tmp.replace(cache)
    return built


def _hold_unless_drift_passed(paths: UseCasePaths, zones: DataZones, batch: str, what: str) -> None:
    """A later run (a manual materialization, a backfill) must not release what a failed blocking drift check
    held: the record written by batch_drift is the judge, whatever run wrote it."""
    checked = paths.deid(zones, f"monitoring/{batch}.json")
    drift_level = read_json(checked)["level"] if checked.exists() else None
    if drift_level not in ("ok", "warn"):
        raise dg.Failure(
            f"{what} of batch {batch} held: its drift check "
            + ("has not run" if drift_level is None else f"is at {str(drift_level).upper()}")
            + "; rerun batch_drift for this batch (after retraining, with the new champion) first."
        )


def _batch_predictions(
    paths: UseCasePaths, zones: DataZones, uc: UseCase, batch: str
) -> tuple[pl.DataFrame, str, float]:
    """The batch's scored admissions, the model version that scored them and its operating threshold."""
    preds = pl.read_parquet(paths.deid(zones, f"predictions/{batch}.parquet"))
    if preds.height == 0:
        return preds, "none", 0.5
    version = str(preds["model_version"][0])
    return preds, version, float(registry.read_card(zones.registry, uc.name, version)["threshold"])


def _scored(preds: pl.DataFrame, subject: str, encounter: str) -> list[ScoredAdmission]:
    return [
        ScoredAdmission(
            subject_id=str(r[subject]),
            encounter_id=str(r[encounter]),
            prediction_time=r["prediction_time"],
            risk=r[PREDICTION_COLUMN],
            flagged=r["flagged"],
            reasons=tuple(str(x.get("label", x.get("feature", x))) for x in json.loads(r["reasons"])),
            flags=tuple(json.loads(r["flags"])),
        )
        for r in preds.iter_rows(named=True)
    ]


def build_ehr_delivery_asset(uc: UseCase, site_system: str) -> dg.AssetsDefinition:
    """Opt-in (``CLINICAL_ML_FHIR_SUBJECT=site``): the batch's RiskAssessments under the site's own patient and
    encounter ids and real times, written to the phi zone's outbox for the EHR interface engine. The one
    asset outside ingestion that reads the pseudonym vault: it re-crosses the boundary on purpose, and
    only into the phi zone."""
    paths = UseCasePaths(uc.name)

    @dg.asset(
        key=use_case_key(uc, "ehr_delivery"),
        deps=[use_case_key(uc, "risk_assessment_export")],
        partitions_def=batch_partitions,
        group_name=Stage.DELIVERY,
        kinds={"fhir", "ndjson"},
        tags={**tags(DataClass.PHI), **PER_BATCH_TAG},
        description="FHIR R4 RiskAssessments of the batch with the site's patient id (its MRN system) and "
        "encounter id and the real prediction time, in the phi zone's outbox for the EHR interface engine.",
        owners=PRIVACY_OWNERS,
    )
    def ehr_delivery(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        batch = context.partition_key
        _hold_unless_drift_passed(paths, zones, batch, "EHR delivery")
        preds, version, threshold = _batch_predictions(paths, zones, uc, batch)
        vault = load_vault(zones)
        if preds.height and vault.patients.height == 0:
            raise dg.Failure(
                "No pseudonym vault in the phi zone: site ids need the vault pseudonym mode (HMAC mode keeps no "
                "mapping). Set CLINICAL_ML_FHIR_SUBJECT=pseudonym or use the vault mode."
            )
        site = reidentify_for_ehr(preds, vault.patients, vault.encounters)
        out = zones.phi / "outbox" / uc.name / f"{batch}.ndjson"
        n = write_ndjson(
            _scored(site, "mrn", "encounter_id"),
            out,
            use_case=uc.name,
            outcome=uc.outcome.name,
            model_version=version,
            threshold=threshold,
            subject_system=site_system,
        )
        # counts only: the file holds identifiers, its metadata does not
        return dg.MaterializeResult(metadata={"dagster/row_count": n, "subject_system": site_system})

    return ehr_delivery


def build_monitoring_assets(uc: UseCase) -> list[dg.AssetsDefinition | dg.AssetChecksDefinition]:
    paths = UseCasePaths(uc.name)
    config = load_monitoring_config(monitoring_config_path(uc))

    def key(name: str) -> dg.AssetKey:
        return use_case_key(uc, name)

    @dg.asset(
        key=key("batch_predictions"),
        deps=[key("patient_features"), key("model_registry")],
        partitions_def=batch_partitions,
        group_name=Stage.MONITORING,
        kinds={"lightgbm", "parquet"},
        tags={**tags(DataClass.DEIDENTIFIED), **PER_BATCH_TAG},
        description="The batch's eligible admissions scored by the champion at their prediction time: risk, "
        "operating-point flag, top reasons, guardrail flags, model version.",
        owners=ML_OWNERS,
    )
    def batch_predictions(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        batch = context.partition_key
        version, _, scorer = _champion(zones, uc)
        frame = _frame(paths, zones, batch)
        scores = scorer.score(feature_matrix(frame, scorer.model.feature_names)) if frame.height else []
        out = frame.select(
            "subject_id", "hadm_id", "prediction_time", "batch_id", *SUBGROUP_COLUMNS
        ).with_columns(
            pl.Series(PREDICTION_COLUMN, [s.risk for s in scores], dtype=pl.Float64),
            pl.Series("flagged", [s.flagged for s in scores], dtype=pl.Boolean),
            pl.Series("reasons", [json.dumps(s.reasons, default=str) for s in scores], dtype=pl.String),
            pl.Series("flags", [json.dumps(list(s.flags)) for s in scores], dtype=pl.String),
            pl.lit(version).alias("model_version"),
        )
        write_parquet(out, paths.deid(zones, f"predictions/{batch}.parquet"))
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": out.height,
                "model_version": version,
                "risk_mean": float(np.nan_to_num(out[PREDICTION_COLUMN].to_numpy().mean()))
                if out.height
                else 0.0,
                "flagged_share": float(out["flagged"].to_numpy().mean()) if out.height else 0.0,
                "guardrail_flagged_share": float(np.mean([bool(s.flags) for s in scores])) if scores else 0.0,
            }
        )

    @dg.asset(
        key=key("batch_drift"),
        deps=[key("batch_predictions")],
        partitions_def=batch_partitions,
        group_name=Stage.MONITORING,
        kinds={"numpy"},
        tags={**tags(DataClass.AGGREGATE), **PER_BATCH_TAG},
        description="The batch against the champion's derivation cohort: every predictor (PSI, chi-square, KS, "
        "missingness), the prediction distribution, label prevalence once known, overall and per subgroup.",
        owners=ML_OWNERS,
        check_specs=[
            dg.AssetCheckSpec(
                "drift_below_error_level",
                asset=key("batch_drift"),
                blocking=True,
                description="No predictor or prediction drift at ERROR level (significant after Bonferroni and "
                "material); an ERROR requests retraining and holds the FHIR export of this batch.",
            )
        ],
    )
    def batch_drift(context: dg.AssetExecutionContext, zones: DataZones):
        batch = context.partition_key
        version, card, scorer = _champion(zones, uc)
        reference, described = _cached_reference(paths, zones, card, scorer, config, batch)
        preds = pl.read_parquet(paths.deid(zones, f"predictions/{batch}.parquet")).select(
            "hadm_id", PREDICTION_COLUMN
        )
        current = _frame(paths, zones, batch).join(preds, on="hadm_id")
        as_of = datetime.combine(date.fromisoformat(batch) + timedelta(days=1), datetime.min.time())
        matured = current.filter(label_maturity(current, as_of=as_of) & pl.col("label").is_not_null())
        result = monitor_batch(
            batch_id=batch,
            reference=reference,
            current=current,
            config=config,
            current_labels=matured["label"].to_numpy() if matured.height else None,
        )
        requested, note = result.retraining_requested, ""
        tried = registry.refused_drift_retraining(zones.registry, uc.name) if requested else None
        if requested and batch in card.get("lineage", {}).get("batch_ids", []):
            requested = False
            note = f"Retraining not requested: the champion ({version}) was already trained on this batch."
        elif tried is not None:
            requested = False
            note = (
                f"Retraining not requested again: model {tried['version']}, retrained for the drift that began "
                f"in batch {tried['drift_reference_from']}, was refused by the promotion gate. The check fails "
                "until a model passes; the nightly schedule retrains when newly labelled admissions arrive."
            )
        record = {
            **result.as_dict(),
            "retraining_requested": requested,
            "retraining_note": note,
            "reference": described,
            "model_version": version,
            "thresholds": config.drift.__dict__,
        }
        write_json(record, paths.deid(zones, f"monitoring/{batch}.json"))
        moved = [d for d in result.features if d.level != "ok"][:10]
        md = (
            f"**Batch {batch}: {result.level.upper()}**"
            + (" (retraining requested)" if requested else "")
            + (f"\n\n{note}" if note else "")
            + f"\n\nReference: {described}.\n\n{config.drift.describe()}\n\n| Predictor | PSI | KS | p (min) | Level |\n|---|---|---|---|---|\n"
            + "".join(
                f"| {feature_label(d.feature)} | {d.psi:.2f} | {d.ks_statistic:.2f} | {d.p_min:.2g} | {d.level} |\n"
                for d in moved
            )
        )
        context.log.info(f"batch {batch}: drift level {result.level}")
        yield dg.MaterializeResult(
            metadata={
                "level": result.level,
                "retraining_requested": requested,
                "reference": described,
                "features_drift_error": sum(d.level == "error" for d in result.features),
                "features_drift_warn": sum(d.level == "warn" for d in result.features),
                "psi_max": max((d.psi for d in result.features), default=0.0),
                "prediction_psi": result.prediction.psi if result.prediction else 0.0,
                "n_current": result.n_current,
                "n_reference": reference.profile.n_rows,
                "model_version": version,
                "report": dg.MetadataValue.md(md),
            }
        )
        yield dg.AssetCheckResult(
            check_name="drift_below_error_level",
            passed=result.level != "error",
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"level": result.level, "reasons": dg.MetadataValue.json(list(result.reasons))},
        )

    @dg.asset(
        key=key("risk_assessment_export"),
        deps=[key("batch_drift")],
        partitions_def=batch_partitions,
        group_name=Stage.MONITORING,
        kinds={"fhir", "ndjson"},
        tags={**tags(DataClass.DEIDENTIFIED), **PER_BATCH_TAG},
        description="FHIR R4 RiskAssessment resources (NDJSON, validated with fhir.resources) for the EHR "
        "interface engine; subject = pseudonym. Held when the batch's drift check fails.",
        owners=ML_OWNERS,
    )
    def risk_assessment_export(context: dg.AssetExecutionContext, zones: DataZones) -> dg.MaterializeResult:
        batch = context.partition_key
        _hold_unless_drift_passed(paths, zones, batch, "FHIR export")
        preds, version, threshold = _batch_predictions(paths, zones, uc, batch)
        rows = _scored(preds, "subject_id", "hadm_id")
        out = paths.deid(zones, f"fhir/{batch}.ndjson")
        n = write_ndjson(
            rows,
            out,
            use_case=uc.name,
            outcome=uc.outcome.name,
            model_version=version,
            threshold=threshold,
        )
        return dg.MaterializeResult(
            metadata={"dagster/row_count": n, "path": str(out.relative_to(zones.deid))}
        )

    @dg.asset(
        key=key("monitoring_report"),
        deps=[key("batch_drift"), key("model_registry")],
        group_name=Stage.MONITORING,
        kinds={"html"},
        tags=tags(DataClass.AGGREGATE),
        description="Trends over batches: drift, prediction distribution, realised performance where labels "
        "have matured and a label-free estimate where not, per subgroup, and the decisions taken.",
        owners=ML_OWNERS,
        check_specs=[
            dg.AssetCheckSpec(
                "realised_performance_meets_minimums",
                asset=key("monitoring_report"),
                description="In every mature period, realised AUROC, sensitivity, O/E and calibration slope are "
                "not wholly below their minimums (95% CI), overall and per subgroup.",
            )
        ],
    )
    def monitoring_report_asset(context: dg.AssetExecutionContext, zones: DataZones):
        files = sorted(paths.deid(zones, "predictions").glob("*.parquet"))
        if registry.champion(zones.registry, uc.name) is None:
            yield dg.MaterializeResult(
                metadata={"report": dg.MetadataValue.md("No champion yet: nothing deployed.")}
            )
            yield dg.AssetCheckResult(
                check_name="realised_performance_meets_minimums",
                passed=True,
                metadata={"note": "no champion model deployed yet"},
            )
            return
        version, card, scorer = _champion(zones, uc)
        frame = _frame(paths, zones)
        held = frame.filter((pl.col("split") == "held_out") & pl.col("label").is_not_null())
        estimator = (
            ConfidenceBasedEstimator.fit(
                scorer.model.predict(feature_matrix(held, scorer.model.feature_names)),
                held["label"].cast(pl.Boolean).to_numpy(),
                threshold=float(card["threshold"]),
            )
            if held.height >= 20
            else None
        )
        batches = [read_json(p) for p in sorted(paths.deid(zones, "monitoring").glob("*.json"))]
        rows: list[dict] = []
        if files:
            preds = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
            newest = max(preds["batch_id"].to_list())
            as_of = datetime.combine(date.fromisoformat(newest) + timedelta(days=1), datetime.min.time())
            info = frame.select("hadm_id", "label", "admit_time", "discharge_time", "death_time")
            preds = preds.join(info, on="hadm_id", how="left")
            preds = preds.with_columns(label_maturity(preds, as_of=as_of).alias("matured"))
            rows = performance_by_period(
                preds, threshold=float(card["threshold"]), estimator=estimator, config=config
            )
        decisions_file = zones.registry / uc.name / "decisions.jsonl"
        decisions = (
            [json.loads(line) for line in decisions_file.read_text().splitlines() if line]
            if decisions_file.exists()
            else []
        )
        for d in decisions:
            card_file = zones.registry / uc.name / "models" / str(d.get("challenger")) / "card.json"
            if card_file.exists():
                d["why"] = read_json(card_file).get("lineage", {}).get("retraining_reason")
        html, md = monitoring_report(
            use_case=uc,
            batches=batches,
            performance=rows,
            decisions=decisions,
            config=config,
            model_version=version,
            code_version=code_version(),
        )
        out = write_report(paths.reports(zones, "monitoring_report.html"), html)
        failing = [r for r in rows if r["level"] == "error"]
        # retrain for periods the champion itself scored badly, once: not when the newest registered model
        # (promoted or refused) was already trained on them
        newest = registry.registered_versions(zones.registry, uc.name)[-1]
        seen = set(
            registry.read_card(zones.registry, uc.name, newest).get("lineage", {}).get("batch_ids", [])
        )
        retrain_for = sorted(
            {
                r["period"]
                for r in failing
                if version in r.get("model_versions", []) and r["period"] not in seen
            }
        )
        yield dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "retraining_requested": bool(retrain_for),
                "retraining_reason": (
                    f"realised performance below its minimums in {', '.join(retrain_for)} (model {version})"
                    if retrain_for
                    else ""
                ),
                "batches_monitored": len(batches),
                "batches_drift_error": sum(b["level"] == "error" for b in batches),
                "periods_mature": sum(r["status"] == "mature" for r in rows if r["attribute"] == "all"),
            }
        )
        yield dg.AssetCheckResult(
            check_name="realised_performance_meets_minimums",
            passed=not failing,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={
                "failing": dg.MetadataValue.json(
                    [
                        {
                            "period": r["period"],
                            "group": f"{r['attribute']}={r['group']}",
                            "reasons": r["reasons"],
                        }
                        for r in failing
                    ][:20]
                )
            },
        )

    @dg.asset(
        key=key("feature_drift_report"),
        deps=[key("patient_features"), key("subject_splits"), key("model_registry")],
        group_name=Stage.MONITORING,
        kinds={"numpy", "html"},
        tags=tags(DataClass.AGGREGATE),
        description="PSI and KS of each predictor in the newest batch against the derivation cohort.",
        owners=ML_OWNERS,
    )
    def feature_drift_report(zones: DataZones) -> dg.MaterializeResult:
        feats = pl.read_parquet(paths.deid(zones, "features.parquet"))
        cohort_df = pl.read_parquet(paths.deid(zones, "cohort.parquet"), columns=["hadm_id", "batch_id"])
        splits = pl.read_parquet(paths.deid(zones, "subject_splits.parquet"))
        feats = feats.join(cohort_df, on="hadm_id").join(splits, on="subject_id", how="left")
        newest = max(cohort_df["batch_id"].unique().to_list())
        reference = feats.filter(pl.col("split").is_in(["train", "tuning"]) & (pl.col("batch_id") != newest))
        if reference.height == 0:
            reference = feats.filter(pl.col("split").is_in(["train", "tuning"]))
        current = feats.filter(pl.col("batch_id") == newest)
        cols = [
            c
            for c in feats.columns
            if "__" in c and not c.startswith(("sex__", "unit__", "admission_type__"))
        ]
        drift = feature_drift(
            feature_matrix(reference, cols), feature_matrix(current, cols), cols, thresholds=config.drift
        )
        rows = [{**d.__dict__, "label": feature_label(d.feature)} for d in drift]
        write_json({"batch_id": newest, "features": rows}, paths.deid(zones, "feature_drift.json"))
        top = sorted(rows, key=lambda r: -r["psi"])[:15]
        png = plots.drift_plot(
            [r["label"] for r in top], [r["psi"] for r in top], warn=PSI_WARN, error=PSI_ERROR
        )
        champ = registry.champion(zones.registry, uc.name) or "none"
        html, md = drift_report(
            use_case=uc,
            batch_id=newest,
            rows=rows,
            n_reference=reference.height,
            n_current=current.height,
            plot=png,
            warn=PSI_WARN,
            error=PSI_ERROR,
            model_version=champ,
            code_version=code_version(),
        )
        out = write_report(paths.reports(zones, "feature_drift_report.html"), html)
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "report_path": dg.MetadataValue.path(str(out)),
                "batch_id": newest,
                "psi_max": float(np.max([r["psi"] for r in rows])) if rows else 0.0,
                "features_drift_error": sum(r["level"] == "error" for r in rows),
                "features_drift_warn": sum(r["level"] == "warn" for r in rows),
                "thresholds": dg.MetadataValue.md(md_table(list(config.drift.__dict__.items()))),
            }
        )

    return [
        batch_predictions,
        batch_drift,
        risk_assessment_export,
        monitoring_report_asset,
        feature_drift_report,
    ]
