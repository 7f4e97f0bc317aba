"""Cohort, labels and windowed features at the prediction time, from the de-identified MEDS layer.

The leakage rule is enforced here and nowhere else: an event contributes to a feature only when its
``available_time`` (result time for labs, stored time for vitals) is at or before the prediction time.
A value drawn before the prediction time but resulted after it is not known to the clinician at that
moment, so it is not known to the model either.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from clinical_ml.core.units import feature_stem
from clinical_ml.core.usecase import UseCase

STATIC_CATEGORIES: dict[str, tuple[str, ...]] = {
    "sex": ("F", "M"),
    "admission_type": ("ELECTIVE", "EMERGENCY", "URGENT"),
    "unit": ("CCU", "MICU", "NEURO_ICU", "SICU"),
}
COHORT_KEYS = ("subject_id", "hadm_id", "prediction_time")


@dataclass(frozen=True)
class CohortFlow:
    """Participant flow: how many admissions entered, were excluded and why, and remain."""

    admissions: int
    excluded_under_age: int
    excluded_stay_ended_before_prediction: int
    excluded_missing_demographics: int
    included: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def age_band_expr(age: pl.Expr, bands: list[int]) -> pl.Expr:
    """Label ages by the use case's band edges, e.g. [18, 45, 65, 80] -> 18-44, 45-64, 65-79, 80+."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(bands)] + [f"{bands[-1]}+"]
    expr = pl.lit(None, dtype=pl.String)
    for lo, label in reversed(list(zip(bands, labels, strict=True))):
        expr = pl.when(age >= lo).then(pl.lit(label)).otherwise(expr)
    return expr


def race_ethnicity_expr() -> pl.Expr:
    """One attribute as reported in US clinical audits: Hispanic or Latino of any race, else race."""
    return (
        pl.when(pl.col("ethnicity") == "Hispanic or Latino")
        .then(pl.lit("Hispanic or Latino"))
        .otherwise(pl.col("race").fill_null("Unknown"))
    )


def build_cohort(
    encounters: pl.DataFrame, patients: pl.DataFrame, use_case: UseCase
) -> tuple[pl.DataFrame, CohortFlow]:
    """Eligible admissions with their prediction time and audit attributes.

    Parameters
    ----------
    encounters, patients
        De-identified encounters and patients of every batch (re-deliveries collapse onto ``hadm_id``).
    use_case
        Supplies the minimum age, the prediction time offset and the age bands.
    """
    enc = encounters.unique("hadm_id", keep="last").sort("admit_time", "hadm_id")
    pat = patients.unique("subject_id", keep="last").select("subject_id", "sex", "race", "ethnicity")
    offset = pl.duration(minutes=round(use_case.prediction_time.offset_hours * 60))
    df = enc.join(pat, on="subject_id", how="left").with_columns(
        (pl.col("admit_time") + offset).alias("prediction_time")
    )
    n0 = df.height
    under_age = df["age_years"] < use_case.population.min_age_years
    df = df.filter(~under_age)
    end = pl.min_horizontal(
        pl.col("discharge_time"), pl.col("death_time").fill_null(pl.col("discharge_time"))
    )
    ended = df.select(end <= pl.col("prediction_time")).to_series()
    df = df.filter(~ended)
    missing = df["sex"].is_null()
    df = df.filter(~missing)
    cohort = df.with_columns(
        race_ethnicity_expr().alias("race_ethnicity"),
        age_band_expr(pl.col("age_years"), use_case.subgroups.age_bands).alias("age_band"),
    ).select(
        *COHORT_KEYS,
        "admit_time",
        "discharge_time",
        "death_time",
        "age_years",
        "age_band",
        "sex",
        "race",
        "ethnicity",
        "race_ethnicity",
        "admission_type",
        "unit",
        "site",
        "period",
        "batch_id",
    )
    flow = CohortFlow(
        admissions=n0,
        excluded_under_age=int(under_age.sum()),
        excluded_stay_ended_before_prediction=int(ended.sum()),
        excluded_missing_demographics=int(missing.sum()),
        included=cohort.height,
    )
    return cohort, flow


def build_labels(cohort: pl.DataFrame) -> pl.DataFrame:
    """MEDS labels: ``boolean_value`` is true when death is recorded before or at hospital discharge."""
    died = pl.col("death_time").is_not_null() & (pl.col("death_time") <= pl.col("discharge_time"))
    return cohort.select(
        "subject_id",
        pl.col("prediction_time").cast(pl.Datetime("us")),
        died.alias("boolean_value"),
        "hadm_id",
    )


def feature_columns(use_case: UseCase) -> list[str]:
    """The model's feature columns in a fixed order, derived from the use case alone."""
    cols: list[str] = []
    for w in use_case.features.window_hours:
        for code in use_case.features.codes:
            for agg in use_case.features.aggregations:
                cols.append(f"{feature_stem(code)}__{agg}_{w:g}h")
    for s in use_case.features.static:
        if s in STATIC_CATEGORIES:
            cols += [f"{s}__{c.lower()}" for c in STATIC_CATEGORIES[s]]
        else:
            cols.append(s)
    return cols


def _window_aggregates(events: pl.DataFrame, window_h: float, aggs: Sequence[str]) -> pl.DataFrame:
    t_h = (pl.col("time") - pl.col("prediction_time")).dt.total_seconds() / 3600.0
    v = pl.col("numeric_value").cast(pl.Float64)
    exprs = {
        "last": v.sort_by("time").last(),
        "min": v.min(),
        "max": v.max(),
        "mean": v.mean(),
        "count": pl.len().cast(pl.Float64),
        "slope": (pl.cov(t_h, v) / t_h.var()).fill_nan(None),
        "time_since_last": -(t_h.max()),
    }
    in_window = events.filter(
        pl.col("time") >= pl.col("prediction_time") - pl.duration(minutes=round(window_h * 60))
    )
    agg = in_window.group_by("hadm_id", "stem").agg(*[exprs[a].alias(a) for a in aggs])
    long = agg.unpivot(index=["hadm_id", "stem"], on=list(aggs), variable_name="agg", value_name="value")
    return long.select(
        "hadm_id",
        pl.format("{}__{}_{}h", "stem", "agg", pl.lit(f"{window_h:g}")).alias("feature"),
        pl.col("value").cast(pl.Float64),
    )


def build_features(events: pl.DataFrame, cohort: pl.DataFrame, use_case: UseCase) -> pl.DataFrame:
    """One row per cohort admission: keys plus :func:`feature_columns`, nulls where nothing was measured.

    Only events with ``available_time <= prediction_time`` and not flagged implausible contribute.
    """
    codes = use_case.features.codes
    stems = {c: feature_stem(c) for c in codes}
    ev = (
        events.filter(
            pl.col("code").is_in(codes) & ~pl.col("implausible") & pl.col("numeric_value").is_not_null()
        )
        .join(cohort.select("hadm_id", "prediction_time"), on="hadm_id", how="inner")
        .filter(pl.col("available_time") <= pl.col("prediction_time"))
        .with_columns(pl.col("code").replace_strict(stems).alias("stem"))
    )
    aggs = list(use_case.features.aggregations)
    long = pl.concat([_window_aggregates(ev, w, aggs) for w in use_case.features.window_hours])
    wide = (
        long.pivot(on="feature", index="hadm_id", values="value")
        if long.height
        else pl.DataFrame(schema={"hadm_id": pl.Int64})
    )
    out = cohort.select(
        *COHORT_KEYS, *[s for s in use_case.features.static if s not in STATIC_CATEGORIES]
    ).join(wide, on="hadm_id", how="left")
    for s in use_case.features.static:
        if s in STATIC_CATEGORIES:
            out = out.with_columns(
                (cohort[s] == c).cast(pl.Float64).alias(f"{s}__{c.lower()}") for c in STATIC_CATEGORIES[s]
            )
    cols = feature_columns(use_case)
    count_cols = [c for c in cols if "__count_" in c]
    out = out.with_columns(
        *[pl.lit(None, dtype=pl.Float64).alias(c) for c in cols if c not in out.columns],
    ).with_columns(pl.col(count_cols).fill_null(0.0))
    return out.select(*COHORT_KEYS, *[pl.col(c).cast(pl.Float64) for c in cols])


def patient_grouped_split(
    cohort: pl.DataFrame, *, validation_fraction: float, tuning_fraction: float, seed: int
) -> pl.DataFrame:
    """Assign each subject to ``train``, ``tuning`` (both: derivation cohort) or ``held_out`` (validation).

    Splitting by subject, not admission, keeps a readmitted patient on one side only. The tuning part
    (early stopping, threshold choice) is carved from the derivation cohort.
    """
    subjects = np.sort(cohort["subject_id"].unique().to_numpy())
    rng = np.random.default_rng(seed)
    perm = rng.permutation(subjects)
    n_val = round(len(perm) * validation_fraction)
    n_tune = round((len(perm) - n_val) * tuning_fraction)
    split = np.array(["train"] * len(perm), dtype=object)
    split[:n_val] = "held_out"
    split[n_val : n_val + n_tune] = "tuning"
    return pl.DataFrame({"subject_id": perm, "split": split.astype(str)}).sort("subject_id")


def feature_matrix(features: pl.DataFrame, columns: list[str]) -> np.ndarray:
    """Float matrix in ``columns`` order; NaN for missing (LightGBM treats it as missing)."""
    return features.select([pl.col(c).cast(pl.Float64) for c in columns]).to_numpy().astype(np.float64)
