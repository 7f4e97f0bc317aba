"""Cohort, labels and windowed features at the prediction time, from the de-identified MEDS layer.

The leakage rule is enforced here and nowhere else: an event contributes to a feature only when its
``available_time`` (result time for labs, stored time for vitals) is at or before the prediction time.
A value drawn before the prediction time but resulted after it is not known to the clinician at that
moment, so it is not known to the model either.
"""

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal

import numpy as np
import polars as pl

from clinical_ml.core.labeling import (  # noqa: F401  (re-exported: the cohort's home was this module)
    COHORT_KEYS,
    ROW_KEY,
    CohortFlow,
    age_band_expr,
    build_cohort,
    build_labels,
    events_of,
    race_ethnicity_expr,
)
from clinical_ml.core.units import feature_code_members, feature_stem
from clinical_ml.core.usecase import UseCase

# Static attributes one-hot encoded with categories taken from the data (see :func:`learn_categories`).
CATEGORICAL_STATIC = ("sex", "admission_type", "unit", "site")
# A category value becomes a feature column only when it is a short code (no free text: a value typed into
# a coded field never becomes a column name) seen on at least this many admissions.
CATEGORY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _./+\-]{0,39}$"
MIN_CATEGORY_ADMISSIONS = 11
# Most prediction rows built at once when a use case predicts each stay several times (memory bound).
MAX_ROWS_PER_PART = 100_000


def category_slug(value: str) -> str:
    """Column-safe form of a category value: ``NEURO ICU`` -> ``neuro_icu``."""
    return re.sub(r"[^a-z0-9]+", "_", value.lower()).strip("_") or "blank"


def learn_categories(cohort: pl.DataFrame, use_case: UseCase) -> dict[str, list[str]]:
    """Categories of each categorical static feature: values that look like codes, seen on at least
    ``MIN_CATEGORY_ADMISSIONS`` admissions, the ``features.max_categories`` most frequent, sorted. Other
    values get no column (all of the attribute's columns are 0: "other")."""
    out: dict[str, list[str]] = {}
    for attr in use_case.features.static:
        if attr not in CATEGORICAL_STATIC or attr not in cohort.columns:
            continue
        counts = (
            cohort.unique("hadm_id")
            .filter(pl.col(attr).is_not_null() & pl.col(attr).str.contains(CATEGORY_PATTERN))
            .group_by(attr)
            .agg(pl.len().alias("n"))
            .filter(pl.col("n") >= MIN_CATEGORY_ADMISSIONS)
            .sort(["n", attr], descending=[True, False])
            .head(use_case.features.max_categories)
        )
        # two values with the same slug would give one column twice: keep the first
        seen: dict[str, str] = {}
        for v in sorted(counts[attr].to_list()):
            seen.setdefault(category_slug(v), v)
        out[attr] = sorted(seen.values())
    return out


def one_hot_columns(categories: dict[str, list[str]]) -> list[str]:
    return [f"{attr}__{category_slug(v)}" for attr, values in categories.items() for v in values]


def history_columns(use_case: UseCase) -> list[str]:
    cols = []
    for h in use_case.features.history:
        what = "admissions" if h.code is None else feature_stem(h.code)
        cols.append(f"history__{what}_{h.days:g}d")
    return cols


def feature_columns(use_case: UseCase, frame: pl.DataFrame | None = None) -> list[str]:
    """The model's feature columns in a fixed order: windowed aggregates of each code, numeric static
    attributes, history features and, given a feature ``frame`` (the derivation rows), the one-hot columns
    of categories set on at least ``MIN_CATEGORY_ADMISSIONS`` of its admissions (learned on them)."""
    cols: list[str] = []
    for w in use_case.features.window_hours:
        for code in use_case.features.codes:
            for agg in _aggregations(use_case):
                cols.append(f"{feature_stem(code)}__{agg}_{w:g}h")
    cols += [s for s in use_case.features.static if s not in CATEGORICAL_STATIC]
    cols += history_columns(use_case)
    if frame is not None:
        prefixes = tuple(f"{s}__" for s in use_case.features.static if s in CATEGORICAL_STATIC)
        one_hot = [c for c in frame.columns if prefixes and c.startswith(prefixes)]
        if one_hot:
            sums = frame.unique("hadm_id").select(pl.col(one_hot).fill_null(0).sum()).row(0)
            cols += [c for c, n in zip(one_hot, sums, strict=True) if n >= MIN_CATEGORY_ADMISSIONS]
    return cols


# Hours per microsecond, multiplied rather than divided by: polars divides a column of three values or more by
# a number as a product with its reciprocal, but one or two exactly, so the same stay's hours differed in the
# last bit with the number of rows aggregated with it (a boundary event could even leave a window). The product
# is what the batch path always computed; now every stay gets it, alone or with others.
HOURS_PER_US = 1 / 3.6e9


def _aggregations(use_case: UseCase) -> list[str]:
    aggs: list[str] = list(use_case.features.aggregations)
    return [*aggs, "missing"] if use_case.features.missing_indicators else aggs


def _window_aggregates(events: pl.LazyFrame, window_h: float, aggs: Sequence[str]) -> pl.LazyFrame:
    """Aggregates of one window per (admission, code stem), one row per admission, ``<stem>__<agg>_<w>h``.

    The slope is the least-squares slope cov(t, v) / var(t) from polars' native group aggregations: no
    per-group regression, and stable where raw running sums (n sum tv - sum t sum v) cancel catastrophically
    (centring by hand in the aggregation was as stable and 3x slower); ``last`` takes the value at the latest
    charted time.
    """
    t = pl.col("t_h")
    v = pl.col("v")
    exprs = {
        # ties at the latest time (same charted minute) resolve to the highest value, whatever the row order
        "last": v.sort_by(t, v).last(),
        "min": v.min(),
        "max": v.max(),
        "mean": v.mean(),
        "count": pl.len().cast(pl.Float64),
        "time_since_last": -pl.col("t_us").max() * HOURS_PER_US,
        # 0 where the code has a value in the window; the join leaves null elsewhere, filled with 1 below
        "missing": pl.lit(0.0),
    }
    wanted = [a for a in aggs if a != "slope"]
    sums = (
        [
            pl.len().cast(pl.Float64).alias("_n"),
            pl.cov(t, v, ddof=0).alias("_cov"),
            t.var(ddof=0).alias("_var"),
        ]
        if "slope" in aggs
        else []
    )
    in_window = events.filter(pl.col("t_h") >= -window_h)
    # maintain_order keeps each group's rows in the sorted order (and the groups in a fixed order)
    agg = in_window.group_by(*ROW_KEY, "stem", maintain_order=True).agg(
        *[exprs[a].alias(a) for a in wanted], *sums
    )
    if "slope" in aggs:
        # slope = cov(t, v) / var(t); a window whose times are (nearly) all equal has no slope
        n, var = pl.col("_n"), pl.col("_var")
        agg = agg.with_columns(
            pl.when((n >= 2) & (var > 1e-9)).then(pl.col("_cov") / var).otherwise(None).alias("slope")
        ).drop("_n", "_cov", "_var")
    suffix = f"_{window_h:g}h"
    return agg.select(*ROW_KEY, "stem", *[pl.col(a).cast(pl.Float64).alias(f"{a}{suffix}") for a in aggs])


def build_features(
    events: pl.DataFrame | pl.LazyFrame,
    cohort: pl.DataFrame,
    use_case: UseCase,
    categories: dict[str, list[str]] | None = None,
) -> pl.DataFrame:
    """One row per cohort admission: keys plus :func:`feature_columns`, nulls where nothing was measured.

    Only events with ``available_time <= prediction_time`` and not flagged implausible contribute.
    Aggregates: ``last``, ``min``, ``max``, ``mean``, ``count``, ``slope`` (least-squares change per hour),
    ``time_since_last`` (hours from the last charted value to the prediction time) and, when the use case
    asks for them, ``missing`` indicators (1 when the code has no value in the window).
    Polars was measured against hand-written DuckDB SQL and pandas on the same Parquet
    (``benchmarks/bench_features.py``); polars is kept as it was at least as fast. ``events`` may be a
    LazyFrame (``pl.scan_parquet``): only the columns and rows used are then read. ``categories`` are the
    one-hot categories (:func:`learn_categories` of the whole cohort, so that parts built apart agree;
    learned from ``cohort`` when not given). History features are added apart (:func:`history_features`).
    One row per cohort row (a stay predicted at several times has several).
    """
    if categories is None:
        categories = learn_categories(cohort, use_case)
    stays = cohort["hadm_id"].n_unique()
    if cohort.height > stays and cohort.height > MAX_ROWS_PER_PART:
        # repeated predictions: every event meets every prediction time of its stay, so the intermediate
        # grows with stays x times; built a slice of rows at a time, each reading only its stays' events
        # a feature row depends only on its own stay's events: any slice of the cohort's rows can be built
        # alone, and slices taken in order are the output in order (no sort, no copy into one block)
        parts = []
        for start in range(0, cohort.height, MAX_ROWS_PER_PART):
            sub = cohort.slice(start, MAX_ROWS_PER_PART)
            ids = sub["hadm_id"].unique().implode()
            parts.append(
                _build_features(events.lazy().filter(pl.col("hadm_id").is_in(ids)), sub, use_case, categories)
            )
        return pl.concat(parts, rechunk=False)
    return _build_features(events, cohort, use_case, categories)


def stem_aggregates(
    events: pl.DataFrame | pl.LazyFrame, cohort: pl.DataFrame, use_case: UseCase
) -> pl.DataFrame:
    """The windowed aggregates in long form: one row per cohort row and code stem with a value available by
    the prediction time (``hadm_id``, ``prediction_time``, ``stem``, ``<agg>_<w>h`` per window). The numbers
    of every feature row, batch or point of care; :func:`build_features` widens them."""
    codes = use_case.features.codes
    members = _members(tuple(codes))
    ev = (
        events.lazy()
        .select("hadm_id", "code", "numeric_value", "implausible", "time", "available_time")
        .filter(
            pl.col("code").is_in(list(members))
            & ~pl.col("implausible")
            & pl.col("numeric_value").is_not_null()
        )
    )
    if any(m != (c,) for c, m in members.items()):
        # a narrower code (an arterial-line pressure) counts for the broader feature code too
        pairs = [(c, f) for c, m in members.items() for f in m]
        counts_for = pl.LazyFrame({"code": [c for c, _ in pairs], "feature_code": [f for _, f in pairs]})
        ev = ev.join(counts_for, on="code", how="inner").drop("code").rename({"feature_code": "code"})
    ev = (
        ev.join(cohort.lazy().select(ROW_KEY), on="hadm_id", how="inner")
        .filter(
            (pl.col("available_time") <= pl.col("prediction_time"))
            & (pl.col("time") <= pl.col("prediction_time"))
        )
        .select(
            "hadm_id",
            "prediction_time",
            pl.col("code").alias("stem"),  # grouped by code; renamed to the stem after aggregation
            pl.col("numeric_value").cast(pl.Float64).alias("v"),
            (pl.col("time") - pl.col("prediction_time")).dt.total_microseconds().alias("t_us"),
        )
    )
    stems = {c: _stem(c) for c in codes}
    return _aggregated(ev, use_case).with_columns(
        pl.col("stem").replace_strict(stems, return_dtype=pl.String)
    )


def _aggregated(ev: pl.LazyFrame, use_case: UseCase) -> pl.DataFrame:
    """The windowed aggregates of the events that count (``hadm_id``, ``prediction_time``, ``stem`` = the
    code, ``v``, ``t_us``), per code: the batch path's and the point of care's."""
    ev = (
        ev.with_columns((pl.col("t_us") * HOURS_PER_US).alias("t_h"))
        # Same inputs, same outputs: slopes and means are sums of floats whose rounding follows the row order,
        # and the events arrive in the order of a parallel join; in a fixed order every run agrees bit for bit
        .sort(*ROW_KEY, "stem", "t_us", "v")
    )
    aggs = _aggregations(use_case)
    # one scan of the filtered events serves every window
    ev = ev.cache() if len(use_case.features.window_hours) > 1 else ev
    windows = [_window_aggregates(ev, w, aggs) for w in use_case.features.window_hours]
    per_stem = windows[0]
    for window in windows[1:]:
        per_stem = per_stem.join(window, on=[*ROW_KEY, "stem"], how="full", coalesce=True)
    return per_stem.collect()


@lru_cache(maxsize=256)
def _members(codes: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Event code -> the feature codes its values count for (:func:`feature_code_members`), per code set."""
    return feature_code_members(codes)


@lru_cache(maxsize=4096)
def _stem(code: str) -> str:
    # the vocabulary is fixed for the process: feature_stem rebuilds a table of every code on each call
    return feature_stem(code)


_EPOCH = datetime(1970, 1, 1)


def stay_aggregates(
    events: Iterable[tuple[str, datetime, datetime, float | None, bool]],
    prediction_time: datetime,
    use_case: UseCase,
) -> dict[str, float | None]:
    """:func:`stem_aggregates` of one stay whose events are plain rows (``code``, ``time``,
    ``available_time``, ``numeric_value`` as a Float32 value, ``implausible``): ``<stem>__<agg>_<w>h`` ->
    value for each stem with a value in a window (what the point-of-care service computes per request).
    :func:`stays_aggregates` of the one stay.
    """
    return stays_aggregates([(events, prediction_time)], use_case)[0]


def stays_aggregates(
    stays: Sequence[tuple[Iterable[tuple[str, datetime, datetime, float | None, bool]], datetime]],
    use_case: UseCase,
) -> list[dict[str, float | None]]:
    """:func:`stay_aggregates` of several stays at once (``(events, prediction_time)`` each, in order): one
    polars aggregation for all, as the batch path aggregates many stays (the point-of-care service scores
    the hook calls that arrive together in one batch).

    The same rule as :func:`stem_aggregates` (available and taken by the prediction time, not implausible,
    a value) applied in Python: for a few stays the lazy filter and join cost several times the aggregation.
    Then the same aggregation (:func:`_aggregated`), grouped by stay: selections and counts are the batch
    path's exactly; means and slopes, sums of floats, agree to about 1e-15 (polars' own result for the same
    rows differs in the last bits between plans and engines, the batch path's included). Tests hold the two
    equal, and a stay's aggregates the same whichever stays it is aggregated with.
    """
    members = _members(tuple(use_case.features.codes))
    us = timedelta(microseconds=1)
    ids: list[int] = []
    times: list[int] = []  # the prediction time in microseconds since 1970 (naive), as polars stores it
    stems: list[str] = []
    values: list[float] = []
    offsets: list[int] = []
    for i, (events, prediction_time) in enumerate(stays):
        kept = [
            (feature_code, float(value), (time - prediction_time) // us)
            for code, time, available, value, implausible in events
            if code in members
            and not implausible
            and value is not None
            and available <= prediction_time
            and time <= prediction_time
            for feature_code in members[code]
        ]
        ids += [i] * len(kept)
        # as integers: polars converts a column of Python datetimes one by one (most of building the frame)
        times += [(prediction_time - _EPOCH) // us] * len(kept)
        stems += [k[0] for k in kept]
        values += [k[1] for k in kept]
        offsets += [k[2] for k in kept]
    rows = pl.DataFrame(
        {"hadm_id": ids, "prediction_time": times, "stem": stems, "v": values, "t_us": offsets},
        schema={
            "hadm_id": pl.Int64,
            "prediction_time": pl.Int64,
            "stem": pl.String,
            "v": pl.Float64,
            "t_us": pl.Int64,
        },
    ).with_columns(pl.col("prediction_time").cast(pl.Datetime("us")))
    long = _aggregated(rows.lazy(), use_case)
    names = [c for c in long.columns if c not in (*ROW_KEY, "stem")]
    out: list[dict[str, float | None]] = [{} for _ in stays]
    for r in long.iter_rows(named=True):
        stem = _stem(r["stem"])
        out[r["hadm_id"]] |= {f"{stem}__{n}": r[n] for n in names}
    return out


def _build_features(
    events: pl.DataFrame | pl.LazyFrame,
    cohort: pl.DataFrame,
    use_case: UseCase,
    categories: dict[str, list[str]],
) -> pl.DataFrame:
    long = stem_aggregates(events, cohort, use_case)
    values = [c for c in long.columns if c not in (*ROW_KEY, "stem")]
    # wide by one join per code stem on the row key: several times faster than DataFrame.pivot
    wide = cohort.select(ROW_KEY)
    for (stem,), part in long.partition_by("stem", as_dict=True, include_key=False).items():
        wide = wide.join(
            part.rename({v: f"{stem}__{v}" for v in values}), on=ROW_KEY, how="left", coalesce=True
        )
    out = cohort.select(
        *COHORT_KEYS, *[s for s in use_case.features.static if s not in CATEGORICAL_STATIC]
    ).join(wide, on=ROW_KEY, how="left", maintain_order="left")
    for attr, values_ in categories.items():
        out = out.with_columns(
            (cohort[attr] == v).fill_null(False).cast(pl.Float64).alias(f"{attr}__{category_slug(v)}")
            for v in values_
        )
    cols = [c for c in feature_columns(use_case) if c not in history_columns(use_case)]
    cols += one_hot_columns(categories)
    count_cols = [c for c in cols if "__count_" in c]
    missing_cols = [c for c in cols if "__missing_" in c]
    out = out.with_columns(
        *[pl.lit(None, dtype=pl.Float64).alias(c) for c in cols if c not in out.columns],
    ).with_columns(pl.col(count_cols).fill_null(0.0), pl.col(missing_cols).fill_null(1.0))
    return out.select(*COHORT_KEYS, *[pl.col(c).cast(pl.Float64) for c in cols])


def stable_uniform(subject_ids: np.ndarray, *, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per subject from a seeded splitmix64 hash of its id.

    A patient keeps the same number, hence the same cohort, however many new patients later batches
    bring: a champion and a challenger trained months apart are compared on patients neither has seen.
    """
    with np.errstate(over="ignore"):
        z = np.asarray(subject_ids).astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def patient_grouped_split(
    cohort: pl.DataFrame, *, validation_fraction: float, tuning_fraction: float, seed: int
) -> pl.DataFrame:
    """Assign each subject to ``train``, ``tuning`` (both: derivation cohort) or ``held_out`` (validation).

    Splitting by subject, not admission, keeps a readmitted patient on one side only. The tuning part
    (early stopping, threshold choice) is carved from the derivation cohort. Assignment is a seeded hash of
    the subject id (:func:`stable_uniform`), so it does not change when the cohort grows.
    """
    subjects = np.sort(cohort["subject_id"].unique().to_numpy())
    u = stable_uniform(subjects, seed=seed)
    tune_edge = validation_fraction + (1 - validation_fraction) * tuning_fraction
    split = np.where(u < validation_fraction, "held_out", np.where(u < tune_edge, "tuning", "train"))
    return pl.DataFrame({"subject_id": subjects, "split": split.astype(str)})


@dataclass(frozen=True)
class SplitInfo:
    """How the validation cohort was formed, for reports and for restricting temporal validation rows."""

    strategy: str  # the strategy applied: "patient" or "temporal"
    requested: str  # the strategy the use case asked for
    validation_periods: tuple[str, ...]  # periods whose admissions form the validation cohort (temporal)
    derivation_periods: tuple[str, ...]
    note: str

    @classmethod
    def from_dict(cls, d: dict) -> "SplitInfo":
        return cls(
            **{
                **d,
                "validation_periods": tuple(d["validation_periods"]),
                "derivation_periods": tuple(d["derivation_periods"]),
            }
        )

    def as_dict(self) -> dict:
        return {
            **self.__dict__,
            "validation_periods": list(self.validation_periods),
            "derivation_periods": list(self.derivation_periods),
        }


def temporal_split(
    cohort: pl.DataFrame, *, validation_periods: Sequence[str], tuning_fraction: float, seed: int
) -> pl.DataFrame:
    """Patients admitted in ``validation_periods`` form the validation cohort (``held_out``); everyone else
    forms the derivation cohort, whose tuning part is drawn by a seeded hash of the patient id.

    A patient with admissions both before and in a validation period is held out, so nobody is in both
    cohorts; their earlier admissions are not validation rows (see :func:`validation_rows`).
    """
    in_val = cohort.filter(pl.col("period").is_in(list(validation_periods)))["subject_id"].unique()
    subjects = np.sort(cohort["subject_id"].unique().to_numpy())
    held = np.isin(subjects, in_val.to_numpy())
    tuning = stable_uniform(subjects, seed=seed) < tuning_fraction
    split = np.where(held, "held_out", np.where(tuning, "tuning", "train"))
    return pl.DataFrame({"subject_id": subjects, "split": split.astype(str)})


def derivation_validation_split(
    cohort: pl.DataFrame,
    *,
    strategy: str,
    validation_periods: Sequence[str] | None,
    fraction: float,
    tuning_fraction: float,
    seed: int,
) -> tuple[pl.DataFrame, SplitInfo]:
    """The use case's split: by patient at random, or temporal on the latest period.

    Temporal falls back to the patient split when the cohort holds a single period (nothing to validate
    over time) or when no period matches the requested ones (a requested ``"2015"`` matches ``"2015Q1"``...).
    """
    periods = sorted(cohort["period"].drop_nulls().unique().to_list())
    if strategy == "temporal":
        wanted = list(validation_periods) if validation_periods else periods[-1:]
        # "2015" names every period of 2015 ("2015Q1" ... "2015Q4"); "2015Q3" names one
        val = [p for p in periods if any(p == w or p.startswith(w) for w in wanted)]
        if val and len(val) < len(periods):
            splits = temporal_split(
                cohort, validation_periods=val, tuning_fraction=tuning_fraction, seed=seed
            )
            info = SplitInfo(
                "temporal",
                strategy,
                tuple(val),
                tuple(p for p in periods if p not in val),
                f"validation cohort: patients admitted in {', '.join(val)} (temporal validation)",
            )
            return splits, info
        note = "temporal validation requested but the data do not span the periods needed; split by patient"
    else:
        note = f"validation cohort: a random {fraction:.0%} of patients"
    splits = patient_grouped_split(
        cohort, validation_fraction=fraction, tuning_fraction=tuning_fraction, seed=seed
    )
    return splits, SplitInfo("patient", strategy, (), tuple(periods), note)


DESIGN_NOT_RECORDED = (
    "How the validation cohort was chosen is not recorded with this model: check it before relying on these "
    "numbers at another hospital or in a later period."
)


def validation_design(info: SplitInfo, *, fraction: float | None = None) -> str:
    """The validation design in a clinician's words, named from the split that was applied (not the one
    asked for), with what it cannot tell."""
    if info.strategy == "temporal":
        derived = _period_span(info.derivation_periods)
        validated = _period_span(info.validation_periods)
        return (
            f"Temporal validation: derived on patients admitted in {derived} and validated on patients admitted "
            f"in {validated}, at the same hospitals. It shows how the model holds up over time; performance at "
            "another hospital must be checked before use there."
        )
    share = (
        f"a random {fraction:.0%} of the patients" if fraction is not None else "a random share of patients"
    )
    fallback = (
        " (temporal validation was asked for, but the data do not span the periods it needs)"
        if info.requested == "temporal"
        else ""
    )
    return (
        f"Internal validation: {share} of the same hospitals and period as the derivation cohort, held out "
        f"before fitting{fallback}. Performance in a later period or at another hospital must be checked before "
        "use there."
    )


def _period_span(periods: Sequence[str]) -> str:
    ordered = sorted(periods)
    if not ordered:
        return "the periods of the data"
    return ordered[0] if len(ordered) == 1 else f"{ordered[0]} to {ordered[-1]}"


def validation_rows(info: SplitInfo) -> pl.Expr:
    """Predicate keeping derivation rows and, under temporal validation, only held-out rows admitted in a
    validation period (a held-out patient's earlier admission is neither derivation nor validation)."""
    held = pl.col("split") == "held_out"
    if info.strategy != "temporal":
        return pl.lit(True)
    return ~held | pl.col("period").is_in(list(info.validation_periods))


def feature_matrix(
    features: pl.DataFrame, columns: list[str], *, order: Literal["fortran", "c"] = "fortran"
) -> np.ndarray:
    """Float matrix in ``columns`` order; NaN for missing (LightGBM treats it as missing). A new writable
    array, column-major by default; ``order="c"``: row-major (LightGBM bins a row-major matrix faster)."""
    x = features.select([pl.col(c).cast(pl.Float64) for c in columns]).to_numpy(order=order, writable=True)
    return x.astype(np.float64, copy=False)


def history_features(
    cohort: pl.DataFrame,
    encounters: pl.DataFrame,
    events: pl.DataFrame | pl.LazyFrame | None,
    use_case: UseCase,
) -> pl.DataFrame:
    """The use case's history features per cohort row (:func:`history_columns`), from the patient's other
    stays and events: the number of earlier admissions begun in the ``days`` before the prediction time, or
    1 when ``code`` was available in those days (0 otherwise). Only what was known by the prediction time
    counts: an earlier stay by its admission time, a code by its available time."""
    out = cohort.select(*ROW_KEY, "subject_id", "admit_time")
    stays = encounters.unique("hadm_id", keep="last").select(
        "subject_id", pl.col("hadm_id").alias("_other"), pl.col("admit_time").alias("_admit")
    )
    for h, col in zip(use_case.features.history, history_columns(use_case), strict=True):
        since = pl.col("prediction_time") - pl.duration(minutes=round(h.days * 1440))
        if h.code is None:
            hits = (
                out.join(stays, on="subject_id", how="inner")
                .filter(
                    (pl.col("_other") != pl.col("hadm_id"))
                    & (pl.col("_admit") < pl.col("admit_time"))
                    & (pl.col("_admit") >= since)
                )
                .group_by(ROW_KEY)
                .agg(pl.len().cast(pl.Float64).alias(col))
            )
        else:
            ev = events_of(events, [h.code]).select("subject_id", "time", "available_time")
            hits = (
                out.join(ev, on="subject_id", how="inner")
                .filter((pl.col("available_time") <= pl.col("prediction_time")) & (pl.col("time") >= since))
                .group_by(ROW_KEY)
                .agg(pl.lit(1.0).alias(col))
            )
        out = out.join(hits, on=ROW_KEY, how="left").with_columns(pl.col(col).fill_null(0.0))
    return out.select(*ROW_KEY, *history_columns(use_case))
