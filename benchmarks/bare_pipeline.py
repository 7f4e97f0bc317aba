"""The whole lifecycle as a plain script: the same core functions, files and order as the Dagster graph, with
no orchestrator. `bench_graph` times it against the graph on the same batches, so the ratio is what Dagster
costs (run and event storage, step launch, metadata), not what the computation costs.

Keep it in step with `clinical_ml/defs/`: every asset body has its counterpart below, in the same order. The
benchmark compares the outputs of both (features, evaluation) and reports when they differ, which is how a
drift between the two shows up.
"""

import shutil
from pathlib import Path

import numpy as np
import polars as pl

from clinical_ml.core import plots, registry
from clinical_ml.core.anonymization import Vault, anonymize_batch, k_anonymity
from clinical_ml.core.drift import PSI_ERROR, PSI_WARN, feature_drift
from clinical_ml.core.explain import feature_label, global_importance, shap_values
from clinical_ml.core.fairness import subgroup_table, verdict
from clinical_ml.core.features import (
    age_band_expr,
    build_cohort,
    build_features,
    build_labels,
    feature_matrix,
    patient_grouped_split,
    race_ethnicity_expr,
)
from clinical_ml.core.ingestion import SCHEMAS, SOURCE_COLUMNS, ingest_file
from clinical_ml.core.meds_layout import read_meds_events, write_meds_dataset
from clinical_ml.core.reports import drift_report, fairness_report, performance_report, write_report
from clinical_ml.core.storage import code_version, write_json, write_parquet
from clinical_ml.core.training import (
    evaluate_validation,
    fit_model,
    operating_threshold,
    predict_frame,
    training_frame,
)
from clinical_ml.core.usecase import UseCase, load_use_cases

QUASI_IDENTIFIERS = ["age_band", "sex", "race_ethnicity", "zip3", "period"]
DEID_TABLES = ("patients", "encounters", "events")


def _zone(root: Path, name: str) -> Path:
    p = root / name
    p.mkdir(parents=True, exist_ok=True)
    return p


def ingest_batch(root: Path, batch_id: str) -> None:
    """raw_patients, raw_encounters, raw_labs, raw_vitals for one batch."""
    phi, archive = _zone(root, "phi"), _zone(root, "archive")
    for source in SOURCE_COLUMNS:
        path = next(
            p
            for ext in (".csv", ".parquet")
            if (p := root / "landing" / batch_id / f"{source}{ext}").exists()
        )
        result = ingest_file(path, source)
        out = write_parquet(result.accepted, phi / "raw" / source / f"{batch_id}.parquet")
        write_parquet(result.rejects, phi / "rejects" / source / f"{batch_id}.parquet")
        dest = archive / "files" / f"{result.sha256}{path.suffix}"
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            dest.chmod(0o444)
        write_json(
            {
                "source": source,
                "batch_id": batch_id,
                "sha256": result.sha256,
                "rows_in": result.rows_in,
                "rows_accepted": result.rows_accepted,
                "rows_rejected": result.rows_rejected,
                "rejected_by_reason": result.rejected_by_reason,
                "status": "accepted",
            },
            archive / "ledger" / batch_id / f"{source}.json",
        )
        SCHEMAS[source].validate(pl.read_parquet(out), lazy=True)  # the matches_source_schema check


def anonymize(root: Path, batch_id: str, *, pseudonym_seed: int, max_shift_weeks: int = 52) -> None:
    """anonymized_patients / _encounters / _events for one batch, with the no_direct_identifiers check."""
    from clinical_ml.defs.anonymization.assets import _raw_identifier_values, identifier_leaks

    phi, deid = _zone(root, "phi"), _zone(root, "deid")
    raw = {s: pl.read_parquet(phi / "raw" / s / f"{batch_id}.parquet") for s in SOURCE_COLUMNS}
    vp, ve = phi / "vault" / "patients.parquet", phi / "vault" / "encounters.parquet"
    vault = Vault(pl.read_parquet(vp), pl.read_parquet(ve)) if vp.exists() else Vault.empty()
    result = anonymize_batch(
        patients=raw["patients"],
        encounters=raw["encounters"],
        labs=raw["labs"],
        vitals=raw["vitals"],
        vault=vault,
        batch_id=batch_id,
        max_shift_weeks=max_shift_weeks,
        rng=np.random.default_rng([pseudonym_seed, *map(int, batch_id.encode())]),
    )
    write_parquet(result.vault.patients, vp)
    write_parquet(result.vault.encounters, ve)
    ids, numeric_ids = _raw_identifier_values(raw["patients"], raw["encounters"])
    qi = result.encounters.join(result.patients, on="subject_id", how="left").with_columns(
        age_band_expr(pl.col("age_years"), [0, 18, 30, 40, 50, 60, 70, 80, 90]).alias("age_band"),
        race_ethnicity_expr().alias("race_ethnicity"),
    )
    k_anonymity(qi, QUASI_IDENTIFIERS, k=5)
    frames = {"patients": result.patients, "encounters": result.encounters, "events": result.events}
    for table, frame in frames.items():
        write_parquet(frame, deid / table / f"{batch_id}.parquet")
        if identifier_leaks(frame, table, ids, numeric_ids):
            raise RuntimeError(f"anonymized {table} of a batch failed the identifier check")


def meds(root: Path) -> None:
    deid = _zone(root, "deid")
    events = pl.concat([pl.read_parquet(f) for f in sorted((deid / "events").glob("*.parquet"))])
    write_meds_dataset(events, deid / "meds", dataset_version=code_version())


def use_case_lifecycle(root: Path, uc: UseCase, *, n_bootstrap: int, seed: int = 20261129) -> None:
    """cohort -> labels -> features -> splits -> model -> predictions -> evaluation -> SHAP -> registry ->
    performance, fairness and drift reports, for one use case."""
    deid, reports, reg = _zone(root, "deid"), _zone(root, "reports"), _zone(root, "registry")
    d = deid / "usecases" / uc.name
    plot_dir = reports / uc.name / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)

    enc = pl.read_parquet(deid / "encounters" / "*.parquet")
    pat = pl.read_parquet(deid / "patients" / "*.parquet")
    cohort, flow = build_cohort(enc, pat, uc)
    write_parquet(cohort, d / "cohort.parquet")
    write_json(flow.as_dict(), d / "cohort_flow.json")
    labels = build_labels(cohort)
    write_parquet(labels, d / "labels.parquet")
    feats = build_features(read_meds_events(deid / "meds"), cohort, uc)
    write_parquet(feats, d / "features.parquet")
    splits = patient_grouped_split(
        cohort,
        validation_fraction=uc.validation.fraction,
        tuning_fraction=uc.validation.tuning_fraction,
        seed=uc.validation.seed,
    )
    write_parquet(splits, d / "subject_splits.parquet")

    frame = training_frame(feats, labels, splits)
    model, fit = fit_model(frame, uc)
    version = registry.new_version()
    (d / "challenger").mkdir(parents=True, exist_ok=True)
    (d / "challenger" / "model.txt").write_text(model.to_text())
    fit_json = {"version": version, "fit": fit.as_dict(), "feature_names": model.feature_names}
    write_json(fit_json, d / "challenger" / "fit.json")

    preds = predict_frame(model, frame.filter(pl.col("split").is_in(["tuning", "held_out"])), cohort)
    threshold = operating_threshold(preds, uc)
    preds = preds.with_columns((pl.col("risk") >= threshold).alias("flagged"))
    write_parquet(preds, d / "validation_predictions.parquet")
    write_json({"threshold": threshold, "model_version": version}, d / "threshold.json")

    ev = evaluate_validation(preds, threshold, n_boot=n_bootstrap, seed=seed)
    ev["model_version"] = version
    write_json(ev, d / "evaluation.json")
    val = preds.filter(pl.col("split") == "held_out")
    (plot_dir / "roc.png").write_bytes(
        plots.roc_plot(val["label"].to_numpy(), val["risk"].to_numpy(), threshold=threshold)
    )
    (plot_dir / "calibration.png").write_bytes(plots.calibration_plot(ev["calibration_curve"]))
    (plot_dir / "decision_curve.png").write_bytes(plots.decision_curve_plot(ev["decision_curve"]))

    x = feature_matrix(feats.join(val.select("hadm_id"), on="hadm_id", how="semi"), model.feature_names)
    _, values = shap_values(model, x, max_rows=2000, seed=seed)
    importance = global_importance(values, model.feature_names)
    write_json({"model_version": version, "importance": importance}, d / "shap.json")
    (plot_dir / "shap_importance.png").write_bytes(plots.importance_plot(importance))

    batches = sorted(cohort["batch_id"].unique().to_list())
    card = {
        "use_case": uc.name,
        "version": version,
        "feature_names": fit_json["feature_names"],
        "training_ranges": fit_json["fit"]["training_ranges"],
        "fit": {k: v for k, v in fit_json["fit"].items() if k != "training_ranges"},
        "threshold": threshold,
        "metrics": ev["metrics"],
        "lineage": {
            "batch_ids": batches,
            "code_version": code_version(),
            "use_case_sha256": uc.source_sha256,
        },
    }
    champ_version = registry.champion(reg, uc.name)
    champ_card = registry.read_card(reg, uc.name, champ_version) if champ_version else None
    registry.register_model(reg, uc.name, version, model_text=model.to_text(), card=card)
    promoted, reasons = registry.decide_promotion(
        card, champ_card, criteria=uc.success_criteria.model_dump(), auroc_margin=0.02
    )
    decision = registry.PromotionDecision(promoted, version, champ_version, tuple(reasons))
    registry.record_decision(reg, uc.name, decision)
    write_json(decision.as_dict(), d / "decision.json")

    html, _ = performance_report(
        use_case=uc,
        evaluation=ev,
        plots={
            "roc": (plot_dir / "roc.png").read_bytes(),
            "calibration": (plot_dir / "calibration.png").read_bytes(),
            "decision": (plot_dir / "decision_curve.png").read_bytes(),
            "importance": (plot_dir / "shap_importance.png").read_bytes(),
        },
        importance=importance,
        decision=decision.as_dict(),
        flow=flow.as_dict(),
        fit=fit_json["fit"],
        model_version=version,
        code_version=code_version(),
    )
    write_report(reports / uc.name / "performance_report.html", html)

    sg = uc.subgroups
    rows = subgroup_table(
        val["label"].cast(pl.Int8).to_numpy(),
        val["risk"].to_numpy(),
        threshold,
        {a: val[a].fill_null("Unknown").to_numpy() for a in sg.attributes},
        min_cell_size=sg.min_cell_size,
        auroc_min=sg.auroc_min,
        sensitivity_min=sg.sensitivity_min,
        n_boot=min(n_bootstrap, 300),
        seed=seed,
    )
    v, why = verdict(rows)
    forests = {
        str(a): plots.forest_plot(
            [
                {
                    "label": r.group,
                    "value": r.metrics["sensitivity"][0],
                    "lower": r.metrics["sensitivity"][1],
                    "upper": r.metrics["sensitivity"][2],
                    "flagged": bool(r.flags),
                }
                for r in rows
                if r.attribute == a and not r.suppressed
            ],
            metric="sensitivity",
            overall=rows[0].metrics["sensitivity"],
            minimum=sg.sensitivity_min,
        )
        for a in sg.attributes
    }
    html, _ = fairness_report(
        use_case=uc,
        rows=rows,
        verdict=v,
        reasons=why,
        threshold=threshold,
        forest_plots=forests,
        model_version=version,
        code_version=code_version(),
    )
    write_report(reports / uc.name / "subcohort_fairness_report.html", html)

    joined = feats.join(cohort.select("hadm_id", "batch_id"), on="hadm_id").join(splits, on="subject_id")
    newest = max(batches)
    reference = joined.filter(pl.col("split").is_in(["train", "tuning"]) & (pl.col("batch_id") != newest))
    if reference.height == 0:
        reference = joined.filter(pl.col("split").is_in(["train", "tuning"]))
    current = joined.filter(pl.col("batch_id") == newest)
    cols = [
        c for c in feats.columns if "__" in c and not c.startswith(("sex__", "unit__", "admission_type__"))
    ]
    drift = feature_drift(feature_matrix(reference, cols), feature_matrix(current, cols), cols)
    drows = [{**x.__dict__, "label": feature_label(x.feature)} for x in drift]
    write_json({"batch_id": newest, "features": drows}, d / "feature_drift.json")
    top = drows[:15]
    png = plots.drift_plot([r["label"] for r in top], [r["psi"] for r in top], warn=PSI_WARN, error=PSI_ERROR)
    html, _ = drift_report(
        use_case=uc,
        batch_id=newest,
        rows=drows,
        n_reference=reference.height,
        n_current=current.height,
        plot=png,
        warn=PSI_WARN,
        error=PSI_ERROR,
        model_version=registry.champion(reg, uc.name) or "none",
        code_version=code_version(),
    )
    write_report(reports / uc.name / "feature_drift_report.html", html)


def ingest_and_anonymize(root: Path, batch_ids: list[str], *, pseudonym_seed: int) -> None:
    """What one `batch_ingestion_job` run per batch does."""
    for b in batch_ids:
        ingest_batch(root, b)
        anonymize(root, b, pseudonym_seed=pseudonym_seed)


def lifecycle(root: Path, usecases_dir: Path, *, n_bootstrap: int) -> None:
    """What one `lifecycle_job` run does."""
    meds(root)
    for uc in load_use_cases(usecases_dir):
        use_case_lifecycle(root, uc, n_bootstrap=n_bootstrap)
