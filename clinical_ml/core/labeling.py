"""Cohorts and labels of any clinical question: the prediction times of a use case and its outcome's labels.

One function per part of a use case, each owned by it: the population filters who enters, the prediction
time says when the model is asked (an anchor plus an offset, once or repeatedly), the outcome says what is
predicted, when its label is known, and by which rule. The vocabulary of the use-case file follows ACES
(predicates plus windows) where it can: an outcome is a predicate on codes and a window relative to the
prediction time.

Leakage rules, property-tested: a cohort row exists only when the stay is still going at its prediction time
(or, anchored at discharge, the patient left alive); exclusions use only what was recorded by the prediction
time (except those the question itself defines at discharge); a label looks only inside its outcome window.

Times in the de-identified layer are shifted per patient (intervals preserved), so a label's window is
measured within one patient's timeline, and "known by" for monitoring is the batch's real delivery date
plus the preserved interval (see :func:`label_known_at`).
"""

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from clinical_ml.core.usecase import (
    DeathOutcome,
    EventOutcome,
    LengthOfStayOutcome,
    ReadmissionOutcome,
    SuppliedLabelOutcome,
    UseCase,
)

COHORT_KEYS = ("subject_id", "hadm_id", "prediction_time")
# The row key of a cohort, labels and features: a stay may be predicted at several times.
ROW_KEY = ["hadm_id", "prediction_time"]
LABEL_WINDOW_END = "label_window_end"
COHORT_COLUMNS = (
    *COHORT_KEYS,
    "admit_time",
    "discharge_time",
    "death_time",
    LABEL_WINDOW_END,
    "age_years",
    "age_band",
    "sex",
    "race",
    "ethnicity",
    "race_ethnicity",
    "admission_type",
    "unit",
    "site",
    "payer",
    "period",
    "batch_id",
)


@dataclass(frozen=True)
class CohortFlow:
    """Participant flow: stays that entered, each exclusion in order with its count, stays and prediction
    rows that remain (one row per stay unless the use case repeats its prediction)."""

    admissions: int
    steps: tuple[tuple[str, int], ...]
    included: int
    predictions: int

    def rows(self) -> list[tuple[str, int]]:
        """The flow as (label, count) rows for a report table."""
        rows = [("Admissions in the de-identified data", self.admissions)]
        rows += [(f"Excluded: {label}", n) for label, n in self.steps]
        rows.append(("Included admissions", self.included))
        if self.predictions != self.included:
            rows.append(("Prediction times (several per admission)", self.predictions))
        return rows

    def excluded(self, label_start: str) -> int:
        """Admissions excluded by the steps whose label starts with ``label_start``."""
        return sum(n for label, n in self.steps if label.startswith(label_start))

    def as_dict(self) -> dict:
        return {
            "admissions": self.admissions,
            "steps": [list(s) for s in self.steps],
            "included": self.included,
            "predictions": self.predictions,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CohortFlow":
        if "steps" not in d:  # written before exclusions were a list (fixed fields)
            steps = (
                ("under the minimum age", int(d.get("excluded_under_age", 0))),
                (
                    "stay ended before the prediction time",
                    int(d.get("excluded_stay_ended_before_prediction", 0)),
                ),
                ("demographics missing", int(d.get("excluded_missing_demographics", 0))),
            )
            return cls(int(d["admissions"]), steps, int(d["included"]), int(d["included"]))
        return cls(
            int(d["admissions"]),
            tuple((str(label), int(n)) for label, n in d["steps"]),
            int(d["included"]),
            int(d["predictions"]),
        )


def age_band_expr(age: pl.Expr, bands: list[int]) -> pl.Expr:
    """Label ages by the use case's band edges, e.g. [18, 45, 65, 80] -> 18-44, 45-64, 65-79, 80+."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(bands)] + [f"{bands[-1]}+"]
    expr = pl.lit(None, dtype=pl.String)
    # The outermost condition must test the highest edge first, so wrap from the lowest band upwards.
    for lo, label in zip(bands, labels, strict=True):
        expr = pl.when(age >= lo).then(pl.lit(label)).otherwise(expr)
    return expr


def race_ethnicity_expr() -> pl.Expr:
    """One attribute as reported in US clinical audits: Hispanic or Latino of any race, else race."""
    return (
        pl.when(pl.col("ethnicity") == "Hispanic or Latino")
        .then(pl.lit("Hispanic or Latino"))
        .otherwise(pl.col("race").fill_null("Unknown"))
    )


def _stay_end() -> pl.Expr:
    return pl.min_horizontal(
        pl.col("discharge_time"), pl.col("death_time").fill_null(pl.col("discharge_time"))
    )


def _code_filter(codes: Sequence[str]) -> pl.Expr:
    """Rows whose code is one of ``codes``; a code ending in ``//`` matches every code with that prefix."""
    exact = [c for c in codes if not c.endswith("//")]
    prefixes = [c for c in codes if c.endswith("//")]
    expr = pl.col("code").is_in(exact) if exact else pl.lit(False)
    for p in prefixes:
        expr = expr | pl.col("code").str.starts_with(p)
    return expr


def events_of(events: pl.DataFrame | pl.LazyFrame | None, codes: Sequence[str]) -> pl.DataFrame:
    """The events of ``codes`` (plausible ones), read once; empty when no events were given."""
    cols: dict[str, pl.DataType] = {
        "subject_id": pl.Int64(),
        "hadm_id": pl.Int64(),
        "time": pl.Datetime("us"),
        "code": pl.String(),
        "numeric_value": pl.Float64(),
        "available_time": pl.Datetime("us"),
    }
    if events is None or not codes:
        return pl.DataFrame(schema=cols)
    lf = events.lazy()
    keep = _code_filter(codes)
    if "implausible" in lf.collect_schema().names():
        keep = keep & ~pl.col("implausible").fill_null(False)
    return (
        lf.filter(keep)
        .select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("hadm_id").cast(pl.Int64),
            pl.col("time").cast(pl.Datetime("us")),
            "code",
            pl.col("numeric_value").cast(pl.Float64),
            pl.col("available_time").cast(pl.Datetime("us")),
        )
        .collect()
    )


def _last_per(df: pl.DataFrame, key: str) -> pl.DataFrame:
    """The last row of each ``key`` (re-deliveries collapse onto it); ``df`` itself when the key is unique
    already, as it usually is (the same rows, without copying every column)."""
    # a count of distinct ids (null counts as one value) is half the work of marking each row unique
    return df if df[key].n_unique() == df.height else df.unique(key, keep="last")


def _anchor_time(
    df: pl.DataFrame, use_case: UseCase, events: pl.DataFrame | pl.LazyFrame | None
) -> pl.DataFrame:
    """``anchor_time`` per stay (null where the stay has no anchor, e.g. no ICU unit event)."""
    pt = use_case.prediction_time
    if pt.anchor == "admission":
        return df.with_columns(pl.col("admit_time").alias("anchor_time"))
    if pt.anchor == "discharge":
        return df.with_columns(pl.col("discharge_time").alias("anchor_time"))
    code = "ICU_UNIT//" if pt.anchor == "icu_admission" else str(pt.code)
    ev = events_of(events, [code])
    # an ICU unit event is a fact of the stay (its time); a measurement anchors when its value is available
    when = pl.col("time") if pt.anchor == "icu_admission" else pl.max_horizontal("time", "available_time")
    first = ev.group_by("hadm_id").agg(when.min().alias("anchor_time"))
    return df.join(first, on="hadm_id", how="left")


def _prediction_times(df: pl.DataFrame, use_case: UseCase) -> pl.DataFrame:
    """One row per prediction time: anchor + offset, then every ``every_hours`` while the stay goes on."""
    pt = use_case.prediction_time
    first = pl.col("anchor_time") + pl.duration(minutes=round(pt.offset_hours * 60))
    if pt.every_hours is None:
        return df.with_columns(first.alias("prediction_time"))
    step_us = round(pt.every_hours * 3600e6)
    span_us = (_stay_end() - first).dt.total_microseconds()
    # times strictly before the end of the stay: a prediction at the moment it ends predicts nothing
    n = pl.when(span_us > 0).then((span_us - 1) // step_us + 1).otherwise(0).clip(0, pt.max_predictions)
    return (
        df.with_columns(first.alias("_first"), pl.int_ranges(0, n.cast(pl.Int64)).alias("_k"))
        .explode("_k")
        .filter(pl.col("_k").is_not_null())
        .with_columns(
            (pl.col("_first") + pl.duration(microseconds=pl.col("_k") * step_us)).alias("prediction_time")
        )
        .drop("_first", "_k")
    )


def _prior_code_stays(
    df: pl.DataFrame, codes: Sequence[str], events: pl.DataFrame | pl.LazyFrame | None
) -> pl.Series:
    """True for rows whose patient had one of ``codes`` at or before the prediction time (any stay)."""
    ev = events_of(events, codes).select("subject_id", pl.col("time").alias("_t"))
    first = ev.group_by("subject_id").agg(pl.col("_t").min())
    hit = df.select("subject_id", "prediction_time").join(first, on="subject_id", how="left")
    return hit.select((pl.col("_t") <= pl.col("prediction_time")).fill_null(False)).to_series()


class _Flow:
    """Applies exclusions in order and counts the admissions each removes."""

    def __init__(self, df: pl.DataFrame) -> None:
        self.df = df
        # one row per stay (the encounters made unique by hadm_id): the height is the count of stays
        self.admissions = self.stays = df.height
        self.steps: list[tuple[str, int]] = []
        # one row per stay until repeated prediction times are laid out: the height is then the count
        self.repeated = False

    def exclude(self, label: str, mask: pl.Series | pl.Expr) -> None:
        before = self.stays
        self.df = self.df.filter(~mask.fill_null(False))
        self.stays = self.df["hadm_id"].n_unique() if self.repeated else self.df.height
        self.steps.append((label, before - self.stays))

    def exclude_each(self, steps: Sequence[tuple[str, pl.Expr]]) -> None:
        """Exclusions in order, each a row-wise expression: counted as one by one (each step the stays it
        removes that no earlier step removed), filtered once (one copy of the rows instead of one per step)."""
        if self.repeated or len(steps) < 2:  # a step's count of stays needs the rows left by the one before
            for label, mask in steps:
                self.exclude(label, mask)
            return
        masks = self.df.select(mask.fill_null(False).alias(str(i)) for i, (_, mask) in enumerate(steps))
        removed: pl.Series | None = None
        for (label, _), hit in zip(steps, masks.get_columns(), strict=True):
            self.steps.append((label, int((hit if removed is None else hit & ~removed).sum())))
            removed = hit if removed is None else removed | hit
        assert removed is not None
        self.df = self.df.filter(~removed)
        self.stays = self.df.height

    @staticmethod
    def values_step(column: str, values: Sequence[str] | None, label: str) -> list[tuple[str, pl.Expr]]:
        """The step keeping the stays whose ``column`` is one of ``values`` (none when ``values`` is None)."""
        # a stay without a value is not in a list of values
        return [] if values is None else [(label, ~pl.col(column).is_in(list(values)).fill_null(False))]

    def result(self) -> CohortFlow:
        included = self.df["hadm_id"].n_unique() if self.repeated else self.df.height
        return CohortFlow(self.admissions, tuple(self.steps), included, self.df.height)


def build_cohort(
    encounters: pl.DataFrame,
    patients: pl.DataFrame,
    use_case: UseCase,
    events: pl.DataFrame | pl.LazyFrame | None = None,
) -> tuple[pl.DataFrame, CohortFlow]:
    """Eligible prediction rows with their prediction time, label window end and audit attributes.

    Parameters
    ----------
    encounters, patients
        De-identified encounters and patients of every batch (re-deliveries collapse onto ``hadm_id``).
    use_case
        Its population, prediction time and outcome decide who enters and when.
    events
        De-identified MEDS events (a LazyFrame is read only for the codes needed); needed for ICU or code
        anchors, ``no_prior_codes`` and event outcomes, unused otherwise.
    """
    pop, pt, outcome = use_case.population, use_case.prediction_time, use_case.outcome
    # one read of the events the question needs (anchor, prior history, event outcome), then filters in memory
    needed = [*pop.no_prior_codes]
    if pt.anchor in ("icu_admission", "first_code"):
        needed.append("ICU_UNIT//" if pt.anchor == "icu_admission" else str(pt.code))
    if isinstance(outcome, (EventOutcome, SuppliedLabelOutcome)):
        needed.append(outcome.code)
    events = events_of(events, needed) if needed and events is not None else None
    enc = _last_per(encounters, "hadm_id")
    if "payer" not in enc.columns:  # de-identified before the contract had a payer: not known
        enc = enc.with_columns(pl.lit(None, dtype=pl.String).alias("payer"))
    pat = patients.select("subject_id", "sex", "race", "ethnicity")
    try:  # the join checks that a patient has one row as it builds its table (no check of its own)
        joined = enc.join(pat, on="subject_id", how="left", validate="m:1")
    except pl.exceptions.ComputeError:  # re-delivered patients collapse onto their last row
        joined = enc.join(pat.unique("subject_id", keep="last"), on="subject_id", how="left")
    flow = _Flow(joined)
    # the exclusions on what the stay row holds, in this order, counted one by one and filtered at once
    steps = [(f"under {pop.min_age_years} years", pl.col("age_years") < pop.min_age_years)]
    if pop.max_age_years is not None:
        steps.append((f"over {pop.max_age_years} years", pl.col("age_years") > pop.max_age_years))
    if isinstance(outcome, ReadmissionOutcome):
        # before the population's disposition list, so that a death is counted as a death
        died_in_hospital = pl.col("death_time").is_not_null() & (
            pl.col("death_time") <= pl.col("discharge_time")
        )
        steps.append(("died in hospital (no readmission possible)", died_in_hospital))
        steps.append(
            (
                "transferred to another hospital",
                pl.col("discharge_disposition").is_in(outcome.transfer_dispositions),
            )
        )
    steps += _Flow.values_step("unit", pop.units, "unit not in the population")
    flow.exclude_each(steps)
    if pop.unit_types is not None and "unit_type" not in flow.df.columns:  # data from before unit types
        flow.df = flow.df.with_columns(pl.lit(None, dtype=pl.String).alias("unit_type"))
    steps = []
    if pop.unit_types is not None and flow.df["unit_type"].null_count():
        # a stay released before units had types cannot be told apart: say so rather than "not in the population"
        steps.append(
            (
                "no unit type recorded (released before the site mapping typed its units: run its batch's "
                "anonymization again)",
                pl.col("unit_type").is_null(),
            )
        )
    steps += _Flow.values_step("unit_type", pop.unit_types, "unit type not in the population")
    steps += _Flow.values_step("admission_type", pop.admission_types, "admission type not in the population")
    steps += _Flow.values_step("site", pop.sites, "site not in the population")
    steps += _Flow.values_step(
        "discharge_disposition", pop.discharge_dispositions, "discharge disposition not in the population"
    )
    flow.exclude_each(steps)
    flow.df = _anchor_time(flow.df, use_case, events)
    if pt.anchor in ("icu_admission", "first_code"):
        flow.exclude("no anchor event (" + pt.describe() + ")", pl.col("anchor_time").is_null())
    flow.df = _prediction_times(flow.df, use_case)
    # stays given no prediction time (the stay ends before the first) are counted by the next step
    flow.repeated = pt.every_hours is not None
    steps = []
    if pt.anchor == "discharge":
        if not isinstance(outcome, ReadmissionOutcome):  # a readmission cohort has counted them already
            died = pl.col("death_time").is_not_null() & (pl.col("death_time") <= pl.col("prediction_time"))
            steps.append(("died before discharge", died))
    else:
        # also removes stays whose repeated prediction times all fall after the stay
        steps.append(("stay ended before the prediction time", _stay_end() <= pl.col("prediction_time")))
    if pop.min_observed_hours:
        observed = (pl.col("prediction_time") - pl.col("admit_time")).dt.total_seconds() / 3600
        steps.append(
            (f"observed for less than {pop.min_observed_hours:g} h", observed < pop.min_observed_hours)
        )
    steps.append(("demographics missing", pl.col("sex").is_null()))
    flow.exclude_each(steps)
    if pop.no_prior_codes:
        flow.exclude(
            "earlier history of " + ", ".join(pop.no_prior_codes),
            _prior_code_stays(flow.df, pop.no_prior_codes, events),
        )
    if isinstance(outcome, EventOutcome):
        flow.df = flow.df.join(_event_exclusions(flow.df, outcome, events), on=ROW_KEY, how="left")
        if outcome.value is not None and outcome.value.at_least_times_baseline is not None:
            flow.exclude("no baseline value by the prediction time", pl.col("_baseline").is_null())
        if outcome.exclude_prevalent:
            flow.exclude(
                "outcome already present by the prediction time", pl.col("_prevalent").fill_null(False)
            )
        flow.df = flow.df.drop("_baseline", "_prevalent", strict=False)
    cohort = flow.df.with_columns(
        race_ethnicity_expr().alias("race_ethnicity"),
        age_band_expr(pl.col("age_years"), use_case.subgroups.age_bands).alias("age_band"),
        pl.col("prediction_time").cast(pl.Datetime("us")),
    )
    window_end = _window_end(outcome, cohort, encounters, events, stays=enc)
    cohort = cohort.with_columns(window_end.alias(LABEL_WINDOW_END))
    return cohort.select(COHORT_COLUMNS).sort("admit_time", *ROW_KEY), flow.result()


def _value_hits(outcome: EventOutcome) -> pl.Expr:
    """Rows meeting the outcome's absolute value bounds (true when it has none)."""
    rule, v = outcome.value, pl.col("numeric_value")
    hit = pl.lit(True)
    if rule is not None and rule.at_least is not None:
        hit = hit & (v >= rule.at_least)
    if rule is not None and rule.at_most is not None:
        hit = hit & (v <= rule.at_most)
    return hit


def _stay_events(rows: pl.DataFrame, ev: pl.DataFrame) -> pl.DataFrame:
    """The outcome's events of each prediction row's own stay (``ROW_KEY`` beside each event)."""
    return rows.select(ROW_KEY).join(ev.drop("subject_id"), on="hadm_id", how="inner")


def _baseline(stay_ev: pl.DataFrame) -> pl.DataFrame:
    """Per prediction row: the lowest value of its stay available by the prediction time (``_baseline``)."""
    before = stay_ev.filter(pl.col("available_time") <= pl.col("prediction_time"))
    return before.group_by(ROW_KEY).agg(pl.col("numeric_value").min().alias("_baseline"))


def _event_exclusions(
    rows: pl.DataFrame, outcome: EventOutcome, events: pl.DataFrame | pl.LazyFrame | None
) -> pl.DataFrame:
    """What the cohort's exclusions need, per prediction row: the patient's baseline (lowest value available
    by the prediction time in the stay; only with a rule relative to it) and whether the event is already
    present by then (in the stay; only when the outcome excludes prevalent events). ``ROW_KEY`` and the
    columns asked for, one row per prediction row that has them."""
    rule = outcome.value
    ratio = rule.at_least_times_baseline if rule is not None else None
    stay_ev = _stay_events(rows, events_of(events, [outcome.code]))
    parts = []
    if ratio is not None:
        parts.append(_baseline(stay_ev))
    if outcome.exclude_prevalent:
        # prevalent: an event by the prediction time; against a baseline, a value >= ratio x the lowest
        # earlier one
        prior = stay_ev.filter(pl.col("time") <= pl.col("prediction_time"))
        if ratio is not None:  # a result without a value has no place in a running minimum
            prior = prior.filter(pl.col("numeric_value").is_not_null())
        prior = prior.sort(*ROW_KEY, "time")
        prior_hit = _value_hits(outcome)
        if ratio is not None:
            running_min = pl.col("numeric_value").cum_min().shift(1).over(ROW_KEY)
            prior_hit = prior_hit & (pl.col("numeric_value") >= ratio * running_min).fill_null(False)
        parts.append(prior.filter(prior_hit).group_by(ROW_KEY).agg(pl.lit(True).alias("_prevalent")))
    status = rows.select(ROW_KEY)
    for part in parts:
        status = status.join(part, on=ROW_KEY, how="left")
    return status


def _first_event(
    rows: pl.DataFrame, outcome: EventOutcome, events: pl.DataFrame | pl.LazyFrame | None
) -> pl.DataFrame:
    """What the label needs, per prediction row: the first event time after it (any stay of the patient,
    inside the outcome window; against a baseline, the lowest value available by the prediction time in the
    stay). ``ROW_KEY`` and ``_event_time``, one row per prediction row that has an event."""
    ev = events_of(events, [outcome.code])
    keys = rows.select("subject_id", "hadm_id", "prediction_time")
    rule = outcome.value
    ratio = rule.at_least_times_baseline if rule is not None else None
    horizon = pl.duration(minutes=round(outcome.window_hours * 60))
    after = keys.join(ev.drop("hadm_id"), on="subject_id", how="inner").filter(
        (pl.col("time") > pl.col("prediction_time")) & (pl.col("time") <= pl.col("prediction_time") + horizon)
    )
    hit = _value_hits(outcome)
    if ratio is not None:
        after = after.join(_baseline(_stay_events(rows, ev)), on=ROW_KEY, how="left")
        hit = hit & (pl.col("numeric_value") >= ratio * pl.col("_baseline")).fill_null(False)
    return after.filter(hit).group_by(ROW_KEY).agg(pl.col("time").min().alias("_event_time"))


def _readmit_times(cohort: pl.DataFrame, stays: pl.DataFrame, outcome: ReadmissionOutcome) -> pl.Series:
    """Per cohort row, in its order: the first later admission of the same patient counted by the outcome
    (its admit time; null when none). ``stays`` holds one row per stay (the encounters made unique by
    ``hadm_id``).

    One hash join of the cohort's rows with the patient's stays; the calendar-day window is compared as dates
    computed once per side (a stay's last counted day beside each index row, each later stay's admit day),
    and the earliest admission is grouped by the row's position, so the result needs no join back on the
    row key."""
    later = stays.select("subject_id", "hadm_id", "admit_time", "admission_type")
    if outcome.unplanned_only:
        later = later.filter(
            ~pl.col("admission_type").is_in(outcome.planned_admission_types).fill_null(False)
        )
    later = later.select(
        "subject_id",
        pl.col("hadm_id").alias("_next"),
        pl.col("admit_time").alias("_next_admit"),
        pl.col("admit_time").dt.date().alias("_next_day"),
    )
    # day N after the discharge counts: whole days between the dates, at most within_days (none for a row
    # without a prediction time, as a join on the row key found none)
    last_day = pl.when(pl.col("prediction_time").is_not_null()).then(
        pl.col("discharge_time").dt.date() + pl.duration(days=math.floor(outcome.within_days))
    )
    rows = cohort.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_i"),
        "subject_id",
        "hadm_id",
        "discharge_time",
        last_day.alias("_last_day"),
    )
    first = (
        rows.join(later, on="subject_id", how="inner")
        .filter(
            (pl.col("_next") != pl.col("hadm_id"))
            & (pl.col("_next_admit") > pl.col("discharge_time"))
            & (pl.col("_next_day") <= pl.col("_last_day"))
        )
        .group_by("_i")
        .agg(pl.col("_next_admit").min().alias("_readmit_time"))
    )
    return rows.select("_i").join(first, on="_i", how="left", maintain_order="left")["_readmit_time"]


def _subject_deaths(encounters: pl.DataFrame) -> pl.DataFrame:
    """The earliest recorded death of each patient, on any of their stays."""
    return (
        encounters.filter(pl.col("death_time").is_not_null())
        .group_by("subject_id")
        .agg(pl.col("death_time").min().alias("_death_any"))
    )


def _window_end(
    outcome: object,
    cohort: pl.DataFrame,
    encounters: pl.DataFrame,
    events: pl.DataFrame | pl.LazyFrame | None = None,
    stays: pl.DataFrame | None = None,
) -> pl.Series:
    """When each row's label becomes final (the outcome window closes, or the event happens first).
    ``stays``: ``encounters`` made unique by ``hadm_id`` when the caller has them (else made here)."""
    pt = pl.col("prediction_time")
    if isinstance(outcome, DeathOutcome):
        if outcome.within_days is None:
            return cohort.select(_stay_end()).to_series()
        horizon = pt + pl.duration(minutes=round(outcome.within_days * 1440))
        deaths = cohort.select("subject_id").join(_subject_deaths(encounters), on="subject_id", how="left")
        return (
            cohort.with_columns(deaths["_death_any"])
            .select(
                pl.when((pl.col("_death_any") > pt) & (pl.col("_death_any") <= horizon))
                .then(pl.col("_death_any"))
                .otherwise(horizon)
            )
            .to_series()
        )
    if isinstance(outcome, ReadmissionOutcome):
        # readmission counts by calendar day: the window closes at the end of day N after discharge, or
        # earlier when the patient is readmitted (the answer is then known)
        unique = stays if stays is not None else _last_per(encounters, "hadm_id")
        readmitted = _readmit_times(cohort, unique, outcome)
        return cohort.select(
            pl.min_horizontal(
                pl.col("discharge_time").dt.truncate("1d") + pl.duration(days=int(outcome.within_days) + 1),
                readmitted,
            )
        ).to_series()
    if isinstance(outcome, LengthOfStayOutcome):
        return cohort.select(
            pl.min_horizontal(_stay_end(), pt + pl.duration(minutes=round(outcome.beyond_hours * 60)))
        ).to_series()
    if isinstance(outcome, SuppliedLabelOutcome):
        # known once the hospital recorded it; until then open (a date beyond any data)
        recorded = (
            events_of(events, [outcome.code])
            .group_by("hadm_id")
            .agg(pl.col("available_time").max().alias("_rec"))
        )
        return (
            cohort.select("hadm_id")
            .join(recorded, on="hadm_id", how="left", maintain_order="left")
            .select(pl.col("_rec").fill_null(datetime(9999, 12, 31)))
            .to_series()
        )
    assert isinstance(outcome, EventOutcome)
    return cohort.select(pt + pl.duration(minutes=round(outcome.window_hours * 60))).to_series()


def build_labels(
    cohort: pl.DataFrame,
    use_case: UseCase,
    *,
    encounters: pl.DataFrame | None = None,
    events: pl.DataFrame | pl.LazyFrame | None = None,
    known_by: datetime | None = None,
) -> pl.DataFrame:
    """MEDS labels (``subject_id``, ``prediction_time``, ``boolean_value``, ``hadm_id``) of the cohort rows
    whose outcome window has closed.

    Parameters
    ----------
    cohort
        :func:`build_cohort`'s rows.
    encounters
        Every de-identified stay (readmissions and deaths on later stays); the cohort's own stays if omitted.
    events
        De-identified events (event outcomes).
    known_by
        Rows whose label is not yet known by this real date (see :func:`label_known_at`) are left out: a
        30-day readmission window still open is not a "no". ``None``: the end of the data
        (:func:`data_end`).
    """
    outcome = use_case.outcome
    enc = encounters if encounters is not None else cohort
    pt = pl.col("prediction_time")
    if isinstance(outcome, DeathOutcome):
        if outcome.within_days is None:
            died = pl.col("death_time").is_not_null() & (pl.col("death_time") <= pl.col("discharge_time"))
        else:
            deaths = cohort.select("subject_id").join(_subject_deaths(enc), on="subject_id", how="left")
            cohort = cohort.with_columns(deaths["_death_any"])
            horizon = pt + pl.duration(minutes=round(outcome.within_days * 1440))
            died = (pl.col("_death_any") > pt) & (pl.col("_death_any") <= horizon)
        value = died
    elif isinstance(outcome, ReadmissionOutcome):
        stays = _last_per(enc.select("subject_id", "hadm_id", "admit_time", "admission_type"), "hadm_id")
        cohort = cohort.with_columns(_readmit_times(cohort, stays, outcome))
        value = pl.col("_readmit_time").is_not_null()
    elif isinstance(outcome, LengthOfStayOutcome):
        horizon = pt + pl.duration(minutes=round(outcome.beyond_hours * 60))
        value = _stay_end() > horizon
    elif isinstance(outcome, SuppliedLabelOutcome):
        # only stays the hospital has labelled; the latest label recorded for the stay wins
        supplied = (
            events_of(events, [outcome.code])
            .sort("available_time", "numeric_value")
            .group_by("hadm_id")
            .agg(pl.col("numeric_value").last().alias("_supplied"))
        )
        labelled = cohort.join(supplied, on="hadm_id", how="inner")
        return labelled.select(
            "subject_id",
            pl.col("prediction_time").cast(pl.Datetime("us")),
            (pl.col("_supplied") > 0).alias("boolean_value"),
            "hadm_id",
        )
    else:
        assert isinstance(outcome, EventOutcome)
        cohort = cohort.join(_first_event(cohort, outcome, events), on=ROW_KEY, how="left")
        value = pl.col("_event_time").is_not_null()
    cutoff = known_by if known_by is not None else data_end(enc)
    # a window closing within the recorded stay is known from the stay itself (its discharge is recorded);
    # one reaching past it is known once the data cover it
    within_stay = pl.col(LABEL_WINDOW_END) <= _stay_end()
    mature = within_stay | (label_known_at(cohort) <= cutoff) if cutoff is not None else pl.lit(True)
    return cohort.filter(mature.fill_null(False)).select(
        "subject_id",
        pl.col("prediction_time").cast(pl.Datetime("us")),
        value.fill_null(False).alias("boolean_value"),
        "hadm_id",
    )


def batch_date() -> pl.Expr:
    """The batch id as a date when it is an ISO date (``2026-01-05``), else null."""
    return pl.col("batch_id").str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us"))


def label_known_at(cohort: pl.DataFrame, *, whole_export: bool = True) -> pl.Expr:
    """The real time a row's label becomes known: the batch's delivery date (its id, when it is a date)
    plus the interval from admission to the label window's end, both preserved by the per-patient date
    shift. For batches not named by date (a research export delivered whole), the window end itself when
    ``whole_export``, else null (never known)."""
    end = pl.col(LABEL_WINDOW_END) if LABEL_WINDOW_END in cohort.columns else _stay_end()
    known = batch_date() + (end - pl.col("admit_time"))
    return pl.coalesce(known, end) if whole_export else known


def data_end(encounters: pl.DataFrame) -> datetime | None:
    """The real time up to which the data are complete. Batches named by date: the latest batch's date plus
    the batch cadence (the gap between the last two batch dates; a day for a single or daily batch), as a
    batch named by its first day covers the days up to the next one. Otherwise (an export delivered whole,
    batches not dated): the latest admission or discharge in the data."""
    if encounters.height == 0:
        return None
    ids = encounters.select(pl.col("batch_id").unique())
    dates = ids.select(batch_date().drop_nulls().sort()).to_series().to_list()
    if dates:
        cadence = dates[-1] - dates[-2] if len(dates) > 1 else timedelta(days=1)
        return dates[-1] + max(cadence, timedelta(days=1))
    return encounters.select(
        pl.max_horizontal(pl.col("admit_time").max(), pl.col("discharge_time").max())
    ).item()
