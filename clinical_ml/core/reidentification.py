"""Re-identification risk over the quasi-identifiers, measured and remedied per batch.

Threat model (prosecutor): an attacker who knows that a given person is in the released batch, and knows
that person's age band, sex, race/ethnicity, three-digit ZIP and admission quarter, looks for the records
that match. With ``n`` distinct people in the matching equivalence class the chance of picking the right one
is ``1 / n``. k-anonymity asks every class to hold at least ``k`` people, so the maximum prosecutor risk is
``1 / k``.

Remedies, in this order, all counted:

1. **Generalization** (global, the same for every batch so that a patient seen in two batches is never
   released at two granularities): ages in bands (``RiskPolicy.age_bands``), race categories outside
   ``RiskPolicy.races_kept`` reported as ``Other``.
2. **Local suppression** of one quasi-identifier for the people still in classes below ``k``: first their
   ZIP3 becomes ``000`` (the Safe Harbor code for "not disclosed"), then their race and ethnicity become
   missing ("Unknown").
3. **Record suppression**: the people still in classes below ``k`` are withheld from this batch (their
   patient row, admissions and events).

After step 3 every class holds at least ``k`` people by construction; the release gate measures the
published frames again, independently of the remedy code.
"""

import itertools
from dataclasses import dataclass, field

import polars as pl

QUASI_IDENTIFIERS = ("age_band", "sex", "race_ethnicity", "zip3", "period")
DEFAULT_AGE_BANDS = (0, 18, 45, 65, 80)
DEFAULT_RACES_KEPT = ("White", "Black or African American", "Asian", "Unknown")
OTHER_RACE = "Other"
WITHHELD_ZIP3 = "000"
HISPANIC = "Hispanic or Latino"


@dataclass(frozen=True)
class RiskPolicy:
    """How quasi-identifiers are generalized and how small a class may be.

    Parameters
    ----------
    k
        Smallest number of distinct people allowed in an equivalence class.
    age_bands
        Lower edges of the released age bands, increasing, starting at 0 (``(0, 18, 45, 65, 80)`` gives
        0-17, 18-44, 45-64, 65-79, 80+).
    races_kept
        Race categories released as they are; any other non-missing race becomes ``Other``. ``None`` keeps
        every category.
    """

    k: int = 5
    age_bands: tuple[int, ...] = DEFAULT_AGE_BANDS
    races_kept: tuple[str, ...] | None = DEFAULT_RACES_KEPT

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be at least 1")
        if (
            not self.age_bands
            or self.age_bands[0] != 0
            or list(self.age_bands) != sorted(set(self.age_bands))
        ):
            raise ValueError("age_bands must be strictly increasing lower edges starting at 0")


@dataclass(frozen=True)
class RiskSummary:
    """k-anonymity and prosecutor risk of one release (no quasi-identifier values, only counts)."""

    records: int
    subjects: int
    classes: int
    k_min: int | None
    records_below_k: int
    share_below_k: float
    max_prosecutor_risk: float
    mean_prosecutor_risk: float

    def meets(self, k: int) -> bool:
        """True when every class holds at least ``k`` people (vacuously true for an empty release)."""
        return self.records == 0 or (self.k_min is not None and self.k_min >= k)

    def as_dict(self) -> dict[str, int | float | None]:
        """Counts as they are, shares and risks to 6 decimals (a report needs no more)."""
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Remedied:
    """A batch after generalization and suppression, with what each remedy changed."""

    patients: pl.DataFrame
    encounters: pl.DataFrame
    events: pl.DataFrame
    before: RiskSummary
    after: RiskSummary
    race_generalized: int
    zip3_suppressed: int
    race_suppressed: int
    subjects_withheld: int
    admissions_withheld: int
    events_withheld: int
    withheld_subjects: pl.Series = field(default_factory=lambda: pl.Series("subject_id", [], dtype=pl.Int64))
    """The ``subject_id`` of the people withheld (step 3), for :func:`withhold_events` on a lazy plan."""
    audited_groups: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    """Per audited attribute and group (as delivered, before any remedy): ``patients``, ``withheld`` (step
    3) and ``race_not_released`` (generalized to Other in step 1 or suppressed in step 2: released outside
    their race/ethnicity group, so outside its audit)."""


AUDITED = ("sex", "race_ethnicity", "age_band")


def audited_group_counts(
    before: pl.DataFrame, *, withheld: set[int], race_suppressed: pl.Series
) -> dict[str, dict[str, dict[str, int]]]:
    """How many patients of each audited group the privacy remedies withheld or released without their
    race (``before``: :func:`quasi_identifiers` before any remedy; counts only)."""
    people = before.unique("subject_id", keep="first").with_columns(
        pl.col("subject_id").is_in(pl.Series(list(withheld), dtype=pl.Int64).implode()).alias("_withheld"),
        pl.col("subject_id").is_in(race_suppressed.implode()).alias("_race"),
    )
    out: dict[str, dict[str, dict[str, int]]] = {}
    for attribute in AUDITED:
        groups = (
            people.group_by(pl.col(attribute).fill_null("Unknown"))
            .agg(pl.len().alias("patients"), pl.col("_withheld").sum(), pl.col("_race").sum())
            .sort(attribute)
        )
        out[attribute] = {
            str(r[attribute]): {
                "patients": int(r["patients"]),
                "withheld": int(r["_withheld"]),
                "race_not_released": int(r["_race"]),
            }
            for r in groups.iter_rows(named=True)
        }
    return out


def age_band_expr(age: pl.Expr, edges: tuple[int, ...]) -> pl.Expr:
    """Band label of an age: ``"18-44"``, ..., ``"80+"`` for the last edge; null stays null."""
    labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges)] + [f"{edges[-1]}+"]
    index = pl.sum_horizontal([(age >= e).cast(pl.Int8) for e in edges[1:]]) if len(edges) > 1 else pl.lit(0)
    return (
        pl.when(age.is_null())
        .then(None)
        .otherwise(index.replace_strict(list(range(len(labels))), labels, return_dtype=pl.String))
    )


def race_ethnicity_expr() -> pl.Expr:
    """Hispanic or Latino of any race, else the race, missing race as ``Unknown``."""
    return (
        pl.when(pl.col("ethnicity") == HISPANIC)
        .then(pl.lit(HISPANIC))
        .otherwise(pl.col("race").fill_null("Unknown"))
    )


def quasi_identifiers(
    patients: pl.DataFrame, encounters: pl.DataFrame, *, policy: RiskPolicy
) -> pl.DataFrame:
    """One row per admission (and per patient without an admission in the batch) with the quasi-identifiers
    as an attacker would read them from the release, plus ``subject_id``."""
    pat = patients.select("subject_id", "sex", "race", "ethnicity", "zip3").unique("subject_id", keep="first")
    enc = encounters.select("subject_id", "age_years", "period")
    return enc.join(pat, on="subject_id", how="full", coalesce=True).select(
        "subject_id",
        age_band_expr(pl.col("age_years"), policy.age_bands).alias("age_band"),
        "sex",
        race_ethnicity_expr().alias("race_ethnicity"),
        "zip3",
        "period",
    )


def _class_sizes(qi: pl.DataFrame) -> pl.DataFrame:
    return qi.with_columns(pl.col("subject_id").n_unique().over(QUASI_IDENTIFIERS).alias("_class_subjects"))


def measure_risk(qi: pl.DataFrame, *, k: int) -> RiskSummary:
    """k (smallest class, in distinct people), records in classes below ``k``, prosecutor risk.

    Parameters
    ----------
    qi
        Output of :func:`quasi_identifiers`.
    k
        The threshold the share below is reported against.
    """
    if qi.height == 0:
        return RiskSummary(0, 0, 0, None, 0, 0.0, 0.0, 0.0)
    sized = _class_sizes(qi)
    n = sized["_class_subjects"]
    below = int((n < k).sum())
    k_min = int(n.min())  # type: ignore[arg-type]
    return RiskSummary(
        records=qi.height,
        subjects=qi["subject_id"].n_unique(),
        classes=qi.select(QUASI_IDENTIFIERS).n_unique(),
        k_min=k_min,
        records_below_k=below,
        share_below_k=below / qi.height,
        max_prosecutor_risk=1.0 / k_min,
        mean_prosecutor_risk=float((1.0 / n).mean()),  # type: ignore[arg-type]
    )


def _subjects_below(patients: pl.DataFrame, encounters: pl.DataFrame, policy: RiskPolicy) -> pl.Series:
    sized = _class_sizes(quasi_identifiers(patients, encounters, policy=policy))
    return sized.filter(pl.col("_class_subjects") < policy.k)["subject_id"].unique()


def _suppress_until_stable(
    patients: pl.DataFrame, encounters: pl.DataFrame, policy: RiskPolicy, assign: dict[str, pl.Expr]
) -> tuple[pl.DataFrame, int]:
    """Apply ``assign`` to the patients of classes below k, again until no new patient is affected (a
    patient with two admissions moves both, which can shrink a neighbouring class). Returns the frame and
    how many patients had a value actually changed."""
    original = patients
    touched: set[int] = set()
    for _ in range(20):
        small = _subjects_below(patients, encounters, policy)
        todo = small.filter(~small.is_in(pl.Series(list(touched), dtype=pl.Int64).implode()))
        if todo.len() == 0:
            break
        touched |= set(todo.to_list())
        hit = pl.col("subject_id").is_in(todo.implode())
        patients = patients.with_columns(
            [pl.when(hit).then(value).otherwise(pl.col(col)).alias(col) for col, value in assign.items()]
        )
    changed = pl.any_horizontal([pl.col(c).ne_missing(original[c]) for c in assign])
    return patients, int(patients.select(changed.sum()).item())


def enforce_k_anonymity(
    *, patients: pl.DataFrame, encounters: pl.DataFrame, events: pl.DataFrame, policy: RiskPolicy
) -> Remedied:
    """Generalize, then suppress, until every class over the quasi-identifiers holds ``policy.k`` people.

    Parameters
    ----------
    patients, encounters, events
        De-identified frames of one batch (``DEID_COLUMNS``).
    policy
        The generalization hierarchy and ``k``.

    Returns
    -------
    Remedied
        The frames to publish, the risk before any remedy (on the generalized ages only) and after all of
        them, and how many people or records each remedy touched.
    """
    delivered_qi = quasi_identifiers(patients, encounters, policy=policy)
    before = measure_risk(delivered_qi, k=policy.k)
    admissions_in = encounters.height
    # each patient's race/ethnicity group as delivered: generalizing or suppressing it takes them from its audit
    group_before = patients.select("subject_id", race_ethnicity_expr().alias("_group"))
    race_generalized = 0
    if policy.races_kept is not None:
        moved = pl.col("race").is_not_null() & ~pl.col("race").is_in(list({*policy.races_kept, OTHER_RACE}))
        race_generalized = int(patients.select(moved.sum()).item())
        patients = patients.with_columns(
            pl.when(moved).then(pl.lit(OTHER_RACE)).otherwise("race").alias("race")
        )
    patients, zip_suppressed = _suppress_until_stable(
        patients, encounters, policy, {"zip3": pl.lit(WITHHELD_ZIP3, dtype=pl.String)}
    )
    patients, race_suppressed = _suppress_until_stable(
        patients,
        encounters,
        policy,
        {"race": pl.lit(None, dtype=pl.String), "ethnicity": pl.lit(None, dtype=pl.String)},
    )
    # whose race/ethnicity group as released ("Other", "Unknown") differs from the one delivered
    race_lost = group_before.join(
        patients.select("subject_id", race_ethnicity_expr().alias("_now")), on="subject_id"
    ).filter(pl.col("_group") != pl.col("_now"))["subject_id"]
    withheld: set[int] = set()
    for _ in range(50):
        small = _subjects_below(patients, encounters, policy)
        if small.len() == 0:
            break
        withheld |= set(small.to_list())
        keep = ~pl.col("subject_id").is_in(small.implode())
        patients, encounters = patients.filter(keep), encounters.filter(keep)
    gone = pl.col("subject_id").is_in(pl.Series(list(withheld), dtype=pl.Int64).implode())
    kept_events = events.filter(~gone) if withheld else events  # no pass over millions of events for nothing
    after = measure_risk(quasi_identifiers(patients, encounters, policy=policy), k=policy.k)
    return Remedied(
        patients=patients,
        encounters=encounters,
        events=kept_events,
        before=before,
        after=after,
        race_generalized=race_generalized,
        zip3_suppressed=zip_suppressed,
        race_suppressed=race_suppressed,
        subjects_withheld=len(withheld),
        admissions_withheld=admissions_in - encounters.height,
        events_withheld=events.height - kept_events.height,
        withheld_subjects=pl.Series("subject_id", sorted(withheld), dtype=pl.Int64),
        audited_groups=audited_group_counts(delivered_qi, withheld=withheld, race_suppressed=race_lost),
    )


def withhold_events(events: pl.LazyFrame, remedied: Remedied) -> pl.LazyFrame:
    """A lazy events plan (``DeidBatch.events_plan``) without the events of the people ``remedied`` withheld.

    ``enforce_k_anonymity`` needs only the patients and admissions to decide; the events follow.
    """
    if remedied.withheld_subjects.len() == 0:
        return events
    return events.filter(~pl.col("subject_id").is_in(remedied.withheld_subjects.implode()))
