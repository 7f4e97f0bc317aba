"""How much data there is for a clinical question, before anything is trained.

:func:`assess_feasibility` builds a use case's cohort and labels on the de-identified data (the same
:func:`~clinical_ml.core.labeling.build_cohort` and :func:`~clinical_ml.core.labeling.build_labels` the graph
runs) and counts what a model would have to learn from: eligible stays and prediction rows, outcome events
and prevalence, rows whose label is not known yet, events per candidate feature, counts per site and per
period, and how often each feature code has a value by the prediction time. ``clinical-ml usecase check``
prints it; ``clinical-ml run`` uses :meth:`Feasibility.cannot_serve` to stop a use case the data cannot
serve with a message of its own instead of a failed training step.

Everything here is a count, a share or a coded value. Per-group cells under the use case's
``subgroups.min_cell_size`` are given as a bound (``< 11``), never as the exact small number, and a group
value that does not look like a code (free text in a coded field) is not named.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from clinical_ml.core.features import (
    CATEGORY_PATTERN,
    feature_columns,
    learn_categories,
    one_hot_columns,
)
from clinical_ml.core.labeling import ROW_KEY, CohortFlow, build_cohort, build_labels, events_of
from clinical_ml.core.usecase import EventOutcome, UseCase

# Rule of thumb for a prediction model's sample size (Peduzzi et al. 1996; Riley et al. 2020 for the fuller
# criteria): fewer outcome events than this per candidate feature and the model is likely to overfit.
EVENTS_PER_FEATURE_MIN = 10
GROUP_ATTRIBUTES = ("site", "period")
UNCODED_GROUP = "other (not a code)"
MISSING_GROUP = "missing"


@dataclass(frozen=True)
class Cell:
    """A count as it may be shown: exact from ``min_cell_size`` on, else only a bound (``text``)."""

    value: int | None
    text: str

    @classmethod
    def of(cls, n: int, *, min_cell_size: int, complement: int | None = None) -> "Cell":
        """``n`` shown when at least ``min_cell_size``; else ``< min_cell_size``. ``complement`` (the rest of
        the group, e.g. its non-events) under ``min_cell_size`` masks ``n`` too, as ``> total - size``."""
        if n < min_cell_size:
            return cls(None, f"< {min_cell_size}")
        if complement is not None and complement < min_cell_size:
            return cls(None, f"> {n + complement - min_cell_size}")
        return cls(n, f"{n:,}")

    def as_json(self) -> int | str:
        return self.value if self.value is not None else self.text


@dataclass(frozen=True)
class GroupCounts:
    """Stays, outcome events and prevalence of one site or period (labelled rows only for the last two)."""

    attribute: str
    value: str
    stays: Cell
    events: Cell
    prevalence: float | None

    def as_dict(self) -> dict:
        return {
            "attribute": self.attribute,
            "value": self.value,
            "stays": self.stays.as_json(),
            "events": self.events.as_json(),
            "prevalence": self.prevalence,
        }


@dataclass(frozen=True)
class CodeAvailability:
    """One feature code: how many events of it the data hold, and the share of eligible stays with a value
    in the longest feature window before their (first) prediction time."""

    code: str
    events_in_data: int
    share_of_stays: float

    def as_dict(self) -> dict:
        return {
            "code": self.code,
            "events_in_data": self.events_in_data,
            "share_of_stays": self.share_of_stays,
        }


@dataclass(frozen=True)
class LabelCounts:
    """What the labels of a cohort give a model to learn from."""

    eligible_stays: int
    prediction_rows: int
    labelled_rows: int
    events: int
    event_stays: int

    @property
    def label_unknown_rows(self) -> int:
        """Rows whose outcome window is still open at the end of the data (not a "no" yet)."""
        return self.prediction_rows - self.labelled_rows

    @property
    def prevalence(self) -> float | None:
        return self.events / self.labelled_rows if self.labelled_rows else None


def label_counts(cohort: pl.DataFrame, labels: pl.DataFrame) -> LabelCounts:
    """Counts of :func:`~clinical_ml.core.labeling.build_cohort`'s rows and their labels."""
    events = labels.filter(pl.col("boolean_value"))
    return LabelCounts(
        eligible_stays=cohort["hadm_id"].n_unique(),
        prediction_rows=cohort.height,
        labelled_rows=labels.height,
        events=events.height,
        event_stays=events["hadm_id"].n_unique(),
    )


def cannot_serve(counts: LabelCounts, *, flow: CohortFlow, events_word: str) -> str | None:
    """Why a model cannot be trained on these counts (plain words, counts only); ``None`` when it can."""
    if counts.eligible_stays == 0:
        steps = "; ".join(f"{label.lower()}: {n:,}" for label, n in flow.rows())
        return f"no eligible admission in these data ({steps})"
    if counts.labelled_rows == 0:
        return (
            f"no outcome is known yet: all {counts.prediction_rows:,} prediction rows have an outcome window "
            "still open at the end of the data"
        )
    if counts.events == 0:
        return f"no {events_word} among the {counts.labelled_rows:,} rows whose outcome is known"
    if counts.events == counts.labelled_rows:
        return f"every one of the {counts.labelled_rows:,} rows whose outcome is known has the outcome"
    return None


def why_not_servable(
    encounters: pl.DataFrame,
    patients: pl.DataFrame,
    events: pl.DataFrame | pl.LazyFrame | None,
    use_case: UseCase,
) -> str | None:
    """Why a model of ``use_case`` cannot be trained on these de-identified tables (:func:`cannot_serve`), from
    its cohort and labels only; ``None`` when it can."""
    cohort, flow = build_cohort(encounters, patients, use_case, events)
    labels = build_labels(cohort, use_case, encounters=encounters, events=events)
    return cannot_serve(label_counts(cohort, labels), flow=flow, events_word=use_case.words.events)


@dataclass(frozen=True)
class Feasibility:
    """How much data there is for one use case (see the module docstring)."""

    use_case: str
    event_word: str
    events_word: str
    flow: CohortFlow
    counts: LabelCounts
    candidate_features: int
    groups: tuple[GroupCounts, ...]
    codes: tuple[CodeAvailability, ...]
    longest_window_hours: float
    # (field of the use case, value or code) that the file names and the data never hold
    absent: tuple[tuple[str, str], ...]
    min_cell_size: int

    @property
    def events_per_feature(self) -> float | None:
        """Stays with the outcome per candidate feature (stays, not rows: the rows of one stay are not
        independent)."""
        return self.counts.event_stays / self.candidate_features if self.candidate_features else None

    @property
    def thin(self) -> bool:
        """Fewer than :data:`EVENTS_PER_FEATURE_MIN` events per candidate feature."""
        epf = self.events_per_feature
        return epf is not None and epf < EVENTS_PER_FEATURE_MIN

    def cannot_serve(self) -> str | None:
        return cannot_serve(self.counts, flow=self.flow, events_word=self.events_word)

    def as_dict(self) -> dict:
        c = self.counts
        return {
            "use_case": self.use_case,
            "participant_flow": [[label, n] for label, n in self.flow.rows()],
            "eligible_stays": c.eligible_stays,
            "prediction_rows": c.prediction_rows,
            "labelled_rows": c.labelled_rows,
            "label_unknown_rows": c.label_unknown_rows,
            "outcome": {"event": self.event_word, "events": self.events_word},
            "events": c.events,
            "event_stays": c.event_stays,
            "prevalence": c.prevalence,
            "candidate_features": self.candidate_features,
            "events_per_feature": self.events_per_feature,
            "events_per_feature_min": EVENTS_PER_FEATURE_MIN,
            "thin": self.thin,
            "cannot_serve": self.cannot_serve(),
            "min_cell_size": self.min_cell_size,
            "groups": [g.as_dict() for g in self.groups],
            "longest_window_hours": self.longest_window_hours,
            "codes": [a.as_dict() for a in self.codes],
            "absent_from_data": [list(a) for a in self.absent],
        }


def group_counts(
    cohort: pl.DataFrame, labels: pl.DataFrame, attribute: str, *, min_cell_size: int
) -> list[GroupCounts]:
    """Stays, events and prevalence per value of ``attribute``, masked under ``min_cell_size``. Values that
    do not look like a code are pooled as ``other (not a code)``; nulls as ``missing``."""
    value = (
        pl.when(pl.col(attribute).is_null())
        .then(pl.lit(MISSING_GROUP))
        .when(pl.col(attribute).cast(pl.String).str.contains(CATEGORY_PATTERN))
        .then(pl.col(attribute).cast(pl.String))
        .otherwise(pl.lit(UNCODED_GROUP))
        .alias("_group")
    )
    rows = cohort.select(*ROW_KEY, value).join(
        labels.select(*ROW_KEY, "boolean_value"), on=ROW_KEY, how="left"
    )
    per_group = (
        rows.group_by("_group")
        .agg(
            pl.col("hadm_id").n_unique().alias("stays"),
            pl.col("boolean_value").is_not_null().sum().alias("labelled"),
            pl.col("boolean_value").fill_null(False).sum().alias("events"),
        )
        .sort("_group")
    )
    out = []
    for group, stays, labelled, events in per_group.iter_rows():
        events_cell = Cell.of(events, min_cell_size=min_cell_size, complement=labelled - events)
        stays_cell = Cell.of(stays, min_cell_size=min_cell_size)
        shown = events_cell.value is not None and stays_cell.value is not None
        prevalence = events / labelled if shown and labelled else None
        out.append(GroupCounts(attribute, group, stays_cell, events_cell, prevalence))
    return out


def code_availability(
    cohort: pl.DataFrame, events: pl.DataFrame | pl.LazyFrame | None, use_case: UseCase
) -> list[CodeAvailability]:
    """Per feature code: its events in the whole data, and the share of eligible stays with a plausible value
    available (``available_time`` and ``time`` at or before the prediction time) in the longest feature
    window before the stay's first prediction time."""
    codes = use_case.features.codes
    window = pl.duration(minutes=round(max(use_case.features.window_hours) * 60))
    ev = events_of(events, codes).filter(pl.col("numeric_value").is_not_null())
    in_data = dict(ev.group_by("code").agg(pl.len()).iter_rows())
    first = cohort.group_by("hadm_id").agg(pl.col("prediction_time").min())
    seen = (
        first.join(ev.select("hadm_id", "code", "time", "available_time"), on="hadm_id", how="inner")
        .filter(
            (pl.col("available_time") <= pl.col("prediction_time"))
            & (pl.col("time") <= pl.col("prediction_time"))
            & (pl.col("time") >= pl.col("prediction_time") - window)
        )
        .group_by("code")
        .agg(pl.col("hadm_id").n_unique().alias("stays"))
    )
    with_value = dict(seen.iter_rows())
    n = first.height
    return [
        CodeAvailability(code, int(in_data.get(code, 0)), with_value.get(code, 0) / n if n else 0.0)
        for code in codes
    ]


def _named_codes(use_case: UseCase) -> list[tuple[str, str]]:
    """(field, code) of every code the file names outside the feature list."""
    named = [("population.no_prior_codes", c) for c in use_case.population.no_prior_codes]
    if use_case.prediction_time.code is not None:
        named.append(("prediction_time.code", use_case.prediction_time.code))
    if isinstance(use_case.outcome, EventOutcome):
        named.append(("outcome.code", use_case.outcome.code))
    named += [("features.history.code", h.code) for h in use_case.features.history if h.code is not None]
    return named


def absent_from_data(
    use_case: UseCase, encounters: pl.DataFrame, data_codes: Sequence[str]
) -> list[tuple[str, str]]:
    """(field, value) of the population's coded values and the codes the file names that the data never
    hold: a filter on a unit the hospital does not have selects nobody, silently."""
    pop = use_case.population
    absent = []
    for field, values in (
        ("units", pop.units),
        ("admission_types", pop.admission_types),
        ("sites", pop.sites),
        ("discharge_dispositions", pop.discharge_dispositions),
    ):
        column = "discharge_disposition" if field == "discharge_dispositions" else field.removesuffix("s")
        if values is None:
            continue
        present = set(encounters[column].drop_nulls().to_list()) if column in encounters.columns else set()
        absent += [(f"population.{field}", v) for v in values if v not in present]
    known = set(data_codes)
    for field, code in _named_codes(use_case):
        hit = any(c.startswith(code) for c in known) if code.endswith("//") else code in known
        if not hit:
            absent.append((field, code))
    absent += [("features.codes", c) for c in use_case.features.codes if c not in known]
    return absent


def assess_feasibility(
    encounters: pl.DataFrame,
    patients: pl.DataFrame,
    events: pl.DataFrame | pl.LazyFrame | None,
    use_case: UseCase,
) -> Feasibility:
    """How much data there is for ``use_case`` in these de-identified tables.

    Parameters
    ----------
    encounters, patients
        De-identified encounters and patients of every batch.
    events
        De-identified events; a LazyFrame (``pl.scan_parquet``) is read only for the codes and columns used.
    use_case
        The question: its cohort and labels are built exactly as the graph builds them.

    Returns
    -------
    Feasibility
        Counts, shares and coded values only; per-group cells under ``subgroups.min_cell_size`` masked.
    """
    cohort, flow = build_cohort(encounters, patients, use_case, events)
    labels = build_labels(cohort, use_case, encounters=encounters, events=events)
    k = use_case.subgroups.min_cell_size
    groups = [g for attr in GROUP_ATTRIBUTES for g in group_counts(cohort, labels, attr, min_cell_size=k)]
    n_features = len(feature_columns(use_case)) + len(one_hot_columns(learn_categories(cohort, use_case)))
    data_codes = (
        events.lazy().select(pl.col("code").unique()).collect()["code"].to_list()
        if events is not None
        else []
    )
    words = use_case.words
    return Feasibility(
        use_case=use_case.name,
        event_word=words.event,
        events_word=words.events,
        flow=flow,
        counts=label_counts(cohort, labels),
        candidate_features=n_features,
        groups=tuple(groups),
        codes=tuple(code_availability(cohort, events, use_case)),
        longest_window_hours=max(use_case.features.window_hours),
        absent=tuple(absent_from_data(use_case, encounters, data_codes)),
        min_cell_size=k,
    )
