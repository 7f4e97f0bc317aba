"""Honest comparison on eICU: the pipeline's model vs a plain LightGBM on the same split and variables.

Not a speed benchmark (``make bench`` does not collect it): a check that the pipeline's feature windows,
leakage rule, early stopping and threshold policy cost no discrimination against the simplest competent
model. Both models see the same first-24 h variables of the same hospital stays:

* **pipeline**: the eICU adapter -> cohort -> windowed features -> LightGBM with early stopping, i.e. the
  core functions the graph's assets call, with ``usecases/eicu_mortality_24h.yaml``;
* **plain LightGBM**: features written by hand straight from the raw eICU tables (APACHE day-1 values with
  -1 as missing, GCS sum, non-invasive BP min/max/mean/last/count over minutes 0-1440, age, sex, unit type,
  admission source), ``lightgbm.LGBMClassifier`` defaults, fitted on the whole derivation cohort.

Splits, both from ``clinical_ml.core.features.derivation_validation_split`` (the graph's own): ``temporal``
(the use case's: validation = patients with a stay discharged in 2015, derivation = everyone else) and
``patient`` (a random 30% of patients). For each: AUROC with 95% bootstrap CIs for both models and the paired
difference on the same resampled validation stays.

    .venv/bin/python benchmarks/baseline_eicu.py [--source DIR] [--n-boot 1000]

Writes ``benchmarks/results/baseline_eicu.md`` and ``.json``.
"""

import argparse
import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl

from clinical_ml.core.adapters import eicu
from clinical_ml.core.evaluation import auroc, bootstrap_metrics
from clinical_ml.core.features import (
    build_cohort,
    build_features,
    build_labels,
    derivation_validation_split,
    validation_rows,
)
from clinical_ml.core.training import fit_model
from clinical_ml.core.usecase import load_use_case
from clinical_ml.core.validation import (
    choose_operating_threshold,
    evaluate_validation,
    out_of_fold_risk,
    predict_frame,
)

ROOT = Path(__file__).resolve().parents[1]
SEED = 7


def plain_features(source: Path, hadm_map: pl.DataFrame) -> pl.DataFrame:
    """Hand-written first-24 h features per hospital stay (index unit stay), keyed by surrogate hadm_id."""
    t = source / "tables" if (source / "tables").exists() else source
    patient = pl.read_parquet(t / "patient.parquet")
    index = (
        patient.sort("patienthealthsystemstayid", -pl.col("hospitaladmitoffset"), "unitvisitnumber")
        .unique("patienthealthsystemstayid", keep="first", maintain_order=True)
        .select(
            "patientunitstayid",
            pl.col("patienthealthsystemstayid").cast(pl.String).alias("source_key"),
            pl.col("age").str.replace("> 89", "90").cast(pl.Float64, strict=False).alias("age"),
            (pl.col("gender") == "Female").cast(pl.Float64).alias("female"),
            pl.col("unittype").cast(pl.Categorical).to_physical().cast(pl.Float64).alias("unit_type"),
            pl.col("unitadmitsource")
            .cast(pl.Categorical)
            .to_physical()
            .cast(pl.Float64)
            .alias("admit_source"),
        )
    )
    aps = pl.read_parquet(t / "apacheapsvar.parquet").drop("apacheapsvarid", "meanbp", strict=False)
    value_cols = [c for c in aps.columns if c != "patientunitstayid"]
    aps = aps.with_columns(
        [
            pl.when(pl.col(c) == -1).then(None).otherwise(pl.col(c)).cast(pl.Float64).alias(c)
            for c in value_cols
        ]
    ).with_columns((pl.col("eyes") + pl.col("motor") + pl.col("verbal")).alias("gcs"))
    nibp = (
        pl.read_parquet(t / "vitalaperiodic.parquet")
        .filter(pl.col("observationoffset").is_between(0, 1440))
        .sort("observationoffset")
        .group_by("patientunitstayid")
        .agg(
            *[
                getattr(pl.col(c), agg)().alias(f"{c}_{agg}")
                for c in ("noninvasivesystolic", "noninvasivediastolic", "noninvasivemean")
                for agg in ("min", "max", "mean", "last")
            ],
            pl.col("noninvasivemean").count().alias("nibp_count"),
        )
    )
    return (
        index.join(aps, on="patientunitstayid", how="left")
        .join(nibp, on="patientunitstayid", how="left")
        .join(hadm_map, on="source_key", how="inner")
        .drop("patientunitstayid", "source_key")
    )


def paired_auroc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, *, n_boot: int) -> dict:
    rng = np.random.default_rng(SEED)
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            reps.append(auroc(y[idx], a[idx]) - auroc(y[idx], b[idx]))
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return {"value": auroc(y, a) - auroc(y, b), "lower": float(lo), "upper": float(hi)}


def compare(
    name: str, frame: pl.DataFrame, cohort: pl.DataFrame, plain: pl.DataFrame, uc, n_boot: int
) -> dict:
    model, _ = fit_model(frame, uc)
    # the graph's way: the threshold on out-of-fold risk of the derivation cohort
    deriv_rows = frame.filter(pl.col("split") != "held_out")
    oof = out_of_fold_risk(deriv_rows, model, seed=uc.validation.seed)
    preds = pl.concat(
        [
            predict_frame(model, deriv_rows, cohort, risk=oof),
            predict_frame(model, frame.filter(pl.col("split") == "held_out"), cohort),
        ]
    )
    threshold = choose_operating_threshold(preds, uc, model_version="baseline")
    ours = evaluate_validation(preds, threshold, n_boot=n_boot, seed=SEED).as_dict()
    val = preds.filter(pl.col("split") == "held_out").select("hadm_id", "label", "risk")
    data = frame.select("hadm_id", "split", "boolean_value").join(plain, on="hadm_id", how="inner")
    cols = [c for c in plain.columns if c != "hadm_id"]
    deriv = data.filter(pl.col("split").is_in(["train", "tuning"]))
    clf = lgb.LGBMClassifier(random_state=SEED, verbosity=-1, n_jobs=2)
    clf.fit(deriv.select(cols).to_numpy(), deriv["boolean_value"].cast(pl.Int8).to_numpy())
    held = data.filter(pl.col("split") == "held_out")
    base = held.select(
        "hadm_id", pl.Series("risk_plain", clf.predict_proba(held.select(cols).to_numpy())[:, 1])
    )
    both = val.join(base, on="hadm_id", how="inner")
    y = both["label"].cast(pl.Int8).to_numpy()
    plain_ci = bootstrap_metrics(y, both["risk_plain"].to_numpy(), 0.5, n_boot=n_boot, seed=SEED)["auroc"]
    return {
        "split": name,
        "n_derivation": deriv.height,
        "events_derivation": int(deriv["boolean_value"].sum()),
        "n_validation": len(y),
        "events_validation": int(y.sum()),
        "excluded_earlier_stays_of_validation_patients": int(
            (frame["split"] == "excluded_earlier_stay_of_validation_patient").sum()
        ),
        "pipeline_auroc": ours["metrics"]["auroc"],
        "plain_lightgbm_auroc": plain_ci.as_dict(),
        "difference_pipeline_minus_plain": paired_auroc_difference(
            y, both["risk"].to_numpy(), both["risk_plain"].to_numpy(), n_boot=n_boot
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=eicu.default_source())
    parser.add_argument("--use-case", type=Path, default=ROOT / "usecases" / "eicu_mortality_24h.yaml")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "baseline_eicu")
    args = parser.parse_args()
    source = args.source if args.source.exists() else eicu.committed_subset()
    uc = load_use_case(args.use_case)
    adapted = eicu.adapt(source, rng=np.random.default_rng(SEED))
    cohort, flow = build_cohort(adapted.encounters, adapted.patients, uc, adapted.events)
    labels = build_labels(cohort, uc, encounters=adapted.encounters, events=adapted.events)
    feats = build_features(adapted.events, cohort, uc).join(
        labels.select("hadm_id", "boolean_value"), on="hadm_id"
    )
    hadm_map = adapted.id_map.filter(pl.col("kind") == "hadm").select(
        "source_key", pl.col("surrogate_id").alias("hadm_id")
    )
    plain = plain_features(source, hadm_map).join(cohort.select("hadm_id"), on="hadm_id", how="semi")
    frames = {}
    for strategy in ("temporal", "patient"):
        splits, info = derivation_validation_split(
            cohort,
            strategy=strategy,
            validation_periods=uc.validation.validation_periods,
            fraction=uc.validation.fraction,
            tuning_fraction=uc.validation.tuning_fraction,
            seed=uc.validation.seed,
        )
        frame = (
            feats.join(splits, on="subject_id")
            .join(cohort.select("hadm_id", "period"), on="hadm_id")
            .with_columns(
                pl.when(validation_rows(info))
                .then(pl.col("split"))
                .otherwise(pl.lit("excluded_earlier_stay_of_validation_patient"))
                .alias("split")
            )
        )
        frames[info.note] = frame
    rows = [compare(name, frame, cohort, plain, uc, args.n_boot) for name, frame in frames.items()]
    result = {"source": source.name, "cohort_flow": flow.as_dict(), "comparisons": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))

    def ci(d: dict) -> str:
        return f"{d['value']:.3f} ({d['lower']:.3f} to {d['upper']:.3f})"

    lines = [
        f"# eICU: pipeline vs plain LightGBM ({source.name}, {flow.included} stays in the cohort)",
        "",
        "| split | derivation (deaths) | validation (deaths) | pipeline AUROC (95% CI) | plain LightGBM AUROC "
        "(95% CI) | difference (paired 95% CI) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['split']} | {r['n_derivation']} ({r['events_derivation']}) | {r['n_validation']} "
            f"({r['events_validation']}) | {ci(r['pipeline_auroc'])} | {ci(r['plain_lightgbm_auroc'])} | "
            f"{ci(r['difference_pipeline_minus_plain'])} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
