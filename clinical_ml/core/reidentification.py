"""Re-identification risk over the quasi-identifiers, measured over the cumulative release and remedied per batch.

Threat model (prosecutor): an attacker who knows that a given person is in the released batch, and knows
that person's age band, sex, race/ethnicity, three-digit ZIP and admission quarter, and the payer of the
stay (a weak quasi-identifier: an acquaintance may know it, and for most people over 65 it is Medicare), looks
for the records that match. With ``n`` distinct people in the matching equivalence class the chance of
picking the right one is ``1 / n``. k-anonymity asks every class to hold at least ``k`` people, so the maximum prosecutor risk is
``1 / k``.

The attacker reads the whole release, not one batch: a class counts the people of the batches released
before alike (``released``), so a group too rare in one delivery is kept once enough people like them have
been released. Only the new batch's records are remedied; what was released is never changed, so every class
of the cumulative release keeps at least ``k`` people whatever order the batches arrive in. An attacker who
knows in which delivery a person's stay arrived is outside this model: without ``released`` each batch is
judged on its own, which defends against that attacker too, at the price of rare groups.

Remedies, in this order, all counted:

1. **Generalization** (global, the same for every batch so that a patient seen in two batches is never
   released at two granularities): ages in bands (``RiskPolicy.age_bands``), race categories outside
   ``RiskPolicy.races_kept`` reported as ``Other``.
2. **Local suppression** of one quasi-identifier for the people still in classes below ``k``, what no model
   or audit needs first: their ZIP3 becomes ``000`` (the Safe Harbor code for "not disclosed"); then the
   payers too rare in a class over the other quasi-identifiers become missing (:func:`withhold_rare_payers`:
   audited only where a use case lists it, it costs no other attribute and no record); then their race and
   ethnicity become missing ("Unknown").
3. **Record suppression**: the people still in classes below ``k`` are withheld from this batch (their
   patient row, admissions and events). Under the cumulative scope they are held back, not lost: each later
   batch judges them again with its own people (``carried``; :mod:`clinical_ml.core.holdback`).

After step 3 every class holding a person of the batch holds at least ``k`` people by construction; the release gate measures the
published frames again, independently of the remedy code.
"""

import functools
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import polars as pl

QUASI_IDENTIFIERS = ("age_band", "sex", "race_ethnicity", "zip3", "period", "payer")
DEFAULT_AGE_BANDS = (0, 18, 45, 65, 80)
DEFAULT_RACES_KEPT = ("White", "Black or African American", "Asian", "Unknown")
OTHER_RACE = "Other"
WITHHELD_ZIP3 = "000"
UNKNOWN_PAYER = "Unknown"
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
    suppress_race
        Whether a person still in a class below ``k`` after the ZIP3 and payer steps is released with race
        and ethnicity withheld (``True``), or keeps them and goes on to record suppression (``False``): under
        the cumulative scope that person is held back and released with a later batch once enough people
        alike have been (:mod:`clinical_ml.core.holdback`), so the race/ethnicity audit keeps them.
    """

    k: int = 5
    age_bands: tuple[int, ...] = DEFAULT_AGE_BANDS
    races_kept: tuple[str, ...] | None = DEFAULT_RACES_KEPT
    suppress_race: bool = True

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
    """Per audited attribute and group (as delivered, before any remedy; people with an admission in the
    batch's own delivery): ``patients``, ``withheld`` (step
    3) and ``race_not_released`` (generalized to Other in step 1 or suppressed in step 2: released outside
    their race/ethnicity group, so outside its audit), or for the payer ``payer_not_released``."""
    payer_suppressed: int = 0
    """People whose payer was withheld for at least one admission (:func:`withhold_rare_payers`)."""
    subjects_delivered: int = 0
    """People of this batch's own delivery (``carried`` admissions left out)."""
    carried: "Carried" = field(default_factory=lambda: Carried())
    """What became of the admissions held back by earlier batches and judged again with this one."""


@dataclass(frozen=True)
class Carried:
    """Admissions an earlier batch held back (its people were too easy to single out then), judged again with
    a later batch: how many of them it released and how many it holds back still (counts only)."""

    patients_released: int = 0
    admissions_released: int = 0
    events_released: int = 0
    patients_held: int = 0
    admissions_held: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


AUDITED = ("sex", "race_ethnicity", "age_band", "payer")


def audited_group_counts(
    before: pl.DataFrame,
    *,
    withheld: set[int],
    race_suppressed: pl.Series,
    payer_suppressed: pl.Series | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """How many patients of each audited group the privacy remedies withheld, released without their race or
    released without their payer (``before``: :func:`quasi_identifiers` before any remedy; counts only). The
    payer is counted only when the batch delivered one."""
    people = before.unique("subject_id", keep="first").with_columns(
        pl.col("subject_id").is_in(pl.Series(list(withheld), dtype=pl.Int64).implode()).alias("_withheld"),
        pl.col("subject_id").is_in(race_suppressed.implode()).alias("_race"),
        pl.col("subject_id")
        .is_in((payer_suppressed if payer_suppressed is not None else race_suppressed.head(0)).implode())
        .alias("_payer"),
    )
    out: dict[str, dict[str, dict[str, int]]] = {}
    for attribute in AUDITED:
        if attribute == "payer" and before["payer"].null_count() == before.height:
            continue
        lost = ("payer_not_released", "_payer") if attribute == "payer" else ("race_not_released", "_race")
        groups = (
            people.group_by(pl.col(attribute).fill_null("Unknown"))
            # a patient withheld is counted once, as withheld
            .agg(
                pl.len().alias("patients"),
                pl.col("_withheld").sum(),
                (pl.col(lost[1]) & ~pl.col("_withheld")).sum(),
            )
            .sort(attribute)
        )
        out[attribute] = {
            str(r[attribute]): {
                "patients": int(r["patients"]),
                "withheld": int(r["_withheld"]),
                lost[0]: int(r[lost[1]]),
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
    payer = pl.col("payer") if "payer" in encounters.columns else pl.lit(None, dtype=pl.String).alias("payer")
    enc = encounters.select("subject_id", "age_years", "period", payer)
    return enc.join(pat, on="subject_id", how="full", coalesce=True).select(
        "subject_id",
        age_band_expr(pl.col("age_years"), policy.age_bands).alias("age_band"),
        "sex",
        race_ethnicity_expr().alias("race_ethnicity"),
        "zip3",
        "period",
        "payer",
    )


def _with_released(qi: pl.DataFrame, released: pl.DataFrame | None) -> pl.DataFrame:
    """``qi`` with the rows released before it (flagged ``_prior``), for counting classes over both."""
    rows = qi.with_columns(pl.lit(False).alias("_prior"))
    if released is None or released.height == 0:
        return rows
    prior = released.select(rows.columns[: qi.width]).with_columns(pl.lit(True).alias("_prior"))
    return pl.concat([rows, prior], how="vertical_relaxed")


def released_quasi_identifiers(
    batches: Iterable[tuple[pl.DataFrame, pl.DataFrame]], *, policy: RiskPolicy
) -> pl.DataFrame:
    """The quasi-identifiers of batches already released (their published patients and encounters), stacked:
    what an attacker reads from the cumulative release, for ``released`` of :func:`enforce_k_anonymity`."""
    parts = [quasi_identifiers(p, e, policy=policy) for p, e in batches]
    if not parts:  # every quasi-identifier is released as text
        return pl.DataFrame(schema={"subject_id": pl.Int64} | dict.fromkeys(QUASI_IDENTIFIERS, pl.String))
    return pl.concat(parts, how="vertical_relaxed")


def _class_sizes(qi: pl.DataFrame, released: pl.DataFrame | None = None) -> pl.DataFrame:
    """``qi`` with ``_class_subjects``: the distinct people of its class, over ``released`` too when given."""
    both = _with_released(qi, released)
    sized = both.with_columns(
        pl.col("subject_id").n_unique().over(QUASI_IDENTIFIERS).alias("_class_subjects")
    )
    return sized.filter(~pl.col("_prior")).drop("_prior")


def measure_risk(qi: pl.DataFrame, *, k: int, released: pl.DataFrame | None = None) -> RiskSummary:
    """k (smallest class, in distinct people), records in classes below ``k``, prosecutor risk.

    Parameters
    ----------
    qi
        Output of :func:`quasi_identifiers`.
    k
        The threshold the share below is reported against.
    released
        The quasi-identifiers of the batches released before (:func:`quasi_identifiers` of each, stacked):
        a class is then counted over the cumulative release, the people of ``qi`` and of ``released``.
        The summary describes the records of ``qi``.
    """
    if qi.height == 0:
        return RiskSummary(0, 0, 0, None, 0, 0.0, 0.0, 0.0)
    sized = _class_sizes(qi, released)
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


def _subjects_below(
    patients: pl.DataFrame, encounters: pl.DataFrame, policy: RiskPolicy, released: pl.DataFrame | None
) -> pl.Series:
    sized = _class_sizes(quasi_identifiers(patients, encounters, policy=policy), released)
    return sized.filter(pl.col("_class_subjects") < policy.k)["subject_id"].unique()


def _suppress_until_stable(
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
    policy: RiskPolicy,
    assign: dict[str, pl.Expr],
    released: pl.DataFrame | None,
    only: pl.Series | None = None,
) -> tuple[pl.DataFrame, int]:
    """Apply ``assign`` to the patients of classes below k (of ``only`` when given), again until no new
    patient is affected (a patient with two admissions moves both, which can shrink a neighbouring class).
    Returns the frame and how many patients had a value actually changed."""
    original = patients
    touched: set[int] = set()
    for _ in range(20):
        small = _subjects_below(patients, encounters, policy, released)
        if only is not None:
            small = small.filter(small.is_in(only.implode()))
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


def withhold_rare_payers(
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
    policy: RiskPolicy,
    released: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.Series]:
    """The encounters with the payer withheld (missing, read "Unknown") wherever it would split a class over
    the other quasi-identifiers into groups of fewer than ``policy.k`` people.

    In each class, the payers held by fewer than k people join the stays whose payer is not known. While
    that pool holds some but fewer than k people, it takes the people it lacks from the largest payer when
    that payer keeps k (the lowest pseudonyms, which say nothing about a person), else the smallest payers
    join it whole; a class whose payers still split below k (a patient counted under two payers) loses
    them all. Payers only move within a class, so the payer never makes a class over the other
    quasi-identifiers smaller: it costs no other attribute and no record. A payer delivered as ``Unknown``
    is released missing, as a withheld one is (one value, one class). With ``released`` (the
    quasi-identifiers of the batches released before), the people counted in a class and under a payer
    include those already released, whose values are never changed. Returns the encounters and the
    ``subject_id`` of the people whose payer was withheld.
    """
    if "payer" not in encounters.columns:
        return encounters, pl.Series("subject_id", [], dtype=pl.Int64)
    k, others = policy.k, [q for q in QUASI_IDENTIFIERS if q != "payer"]
    pat = patients.select("subject_id", "sex", "race", "ethnicity", "zip3").unique("subject_id", keep="first")
    rows = (
        encounters.select(pl.int_range(pl.len()).alias("_row"), "subject_id", "age_years", "period", "payer")
        .join(pat, on="subject_id", how="left")
        .with_columns(
            age_band_expr(pl.col("age_years"), policy.age_bands).alias("age_band"),
            race_ethnicity_expr().alias("race_ethnicity"),
        )
        .select(
            "_row",
            "subject_id",
            *others,
            # not known is one value in the release: missing
            pl.when(pl.col("payer") != UNKNOWN_PAYER).then(pl.col("payer")).alias("payer"),
        )
    )
    prior = (
        released.select(
            pl.lit(-1, dtype=rows["_row"].dtype).alias("_row"),
            "subject_id",
            *others,
            pl.when(pl.col("payer") != UNKNOWN_PAYER).then(pl.col("payer")).alias("payer"),
        )
        if released is not None
        else rows.head(0)
    )
    n, known = pl.col("_n"), pl.col("payer").is_not_null()
    small = known & (n < k)
    sub = (
        pl.concat([rows, prior])
        .group_by([*others, "payer"])
        .agg(pl.col("subject_id").n_unique().alias("_n"))
        .sort([*others, "_n", "payer"], nulls_last=True)
        .with_columns(
            # the pool: stays without a payer, and the payers held by fewer than k
            n.filter(~known | small).sum().over(others).alias("_pool"),
            n.filter(known & ~small).max().over(others).alias("_largest"),
        )
        .with_columns(
            (pl.lit(k) - pl.col("_pool")).alias("_lacking"),
            ((pl.col("_pool") > 0) & (pl.col("_pool") < k)).alias("_short"),
        )
    )
    donor_keeps_k = pl.col("_largest") - pl.col("_lacking") >= k
    # the first payer of the largest size (sorted by name) gives the people the pool lacks
    donor = known & ~small & (n == pl.col("_largest")) & (pl.int_range(pl.len()).over([*others, "_n"]) == 0)
    # the payers that may join the pool whole, smallest first
    joined = pl.when(known & ~small).then(n).otherwise(0)
    whole = known & ~small & ~donor_keeps_k & (pl.col("_pool") + joined.cum_sum().over(others) - joined < k)
    decided = sub.select(
        *others,
        "payer",
        pl.when(small | (pl.col("_short") & whole))
        .then(pl.lit(-1))  # every person of this payer
        .when(pl.col("_short") & donor_keeps_k & donor.fill_null(False))
        .then(pl.col("_lacking"))  # this many people
        .otherwise(pl.lit(0))
        .alias("_take"),
    ).filter(pl.col("payer").is_not_null() & (pl.col("_take") != 0))
    rows = rows.join(decided, on=[*others, "payer"], how="left", nulls_equal=True).with_columns(
        pl.col("subject_id").rank("dense").over([*others, "payer"]).alias("_rank")
    )
    taken = (pl.col("_take") == -1) | (pl.col("_rank") <= pl.col("_take"))
    rows = rows.with_columns(
        pl.when(taken.fill_null(False)).then(None).otherwise(pl.col("payer")).alias("_payer")
    )
    # a patient counted under two payers of one class can still leave a group below k: the class loses them all
    both = pl.concat([rows, prior.with_columns(pl.col("payer").alias("_payer"))], how="diagonal_relaxed")
    split = (pl.col("subject_id").n_unique().over([*others, "_payer"]) < k).any().over(others)
    rows = (
        both.with_columns(pl.when(split).then(None).otherwise(pl.col("_payer")).alias("_payer"))
        .filter(pl.col("_row") >= 0)
        .sort("_row")
    )
    withheld = rows.filter(pl.col("payer").is_not_null() & pl.col("_payer").is_null())["subject_id"]
    return encounters.with_columns(rows["_payer"].alias("payer")), withheld.unique().sort()


@dataclass(frozen=True)
class _Suppressed:
    """The frames after local and record suppression (steps 2 and 3), with what each step touched."""

    patients: pl.DataFrame
    encounters: pl.DataFrame
    zip3: int
    payer_lost: pl.Series
    race: int
    withheld: frozenset[int]

    def race_lost(self, group_before: pl.DataFrame) -> set[int]:
        """The people released outside the race/ethnicity group they were delivered in (kept ones only)."""
        now = self.patients.select("subject_id", race_ethnicity_expr().alias("_now"))
        moved = group_before.join(now, on="subject_id").filter(pl.col("_group") != pl.col("_now"))
        return set(moved["subject_id"].to_list())


def _suppress(
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
    policy: RiskPolicy,
    *,
    zip3_for_payer: bool,
    released: pl.DataFrame | None,
    race_suppressible: pl.Series | None = None,
) -> _Suppressed:
    """ZIP3, then rare payers, then race and ethnicity, then whole records, until every class holds k people.
    The ZIP3 step sees the payer only with ``zip3_for_payer`` (it then gives up ZIP3 to keep a payer too).
    Classes count the people of ``released`` too (never changed here)."""
    payers = encounters["payer"] if "payer" in encounters.columns else None
    no_payer = pl.lit(None, dtype=pl.String).alias("payer")
    zip_released = released
    if payers is not None and not zip3_for_payer:
        encounters = encounters.with_columns(no_payer)
        zip_released = None if released is None else released.with_columns(no_payer)
    patients, zip_suppressed = _suppress_until_stable(
        patients, encounters, policy, {"zip3": pl.lit(WITHHELD_ZIP3, dtype=pl.String)}, zip_released
    )
    if payers is not None:
        encounters = encounters.with_columns(payers)
    # race is suppressed where the other attributes, with the payers that can be kept, leave a class below k
    encounters, payer_lost = withhold_rare_payers(patients, encounters, policy, released)
    race_suppressed = 0
    if policy.suppress_race or (race_suppressible is not None and race_suppressible.len()):
        patients, race_suppressed = _suppress_until_stable(
            patients,
            encounters,
            policy,
            {"race": pl.lit(None, dtype=pl.String), "ethnicity": pl.lit(None, dtype=pl.String)},
            released,
            only=None if policy.suppress_race else race_suppressible,
        )
    if (
        payers is not None and race_suppressed
    ):  # classes that race suppression merged keep the payers they can
        encounters, payer_lost = withhold_rare_payers(
            patients, encounters.with_columns(payers), policy, released
        )
    withheld: set[int] = set()
    for _ in range(50):
        small = _subjects_below(patients, encounters, policy, released)
        if small.len() == 0:
            break
        withheld |= set(small.to_list())
        keep = ~pl.col("subject_id").is_in(small.implode())
        patients, encounters = patients.filter(keep), encounters.filter(keep)
    payer_lost = payer_lost.filter(~payer_lost.is_in(pl.Series(list(withheld), dtype=pl.Int64).implode()))
    return _Suppressed(patients, encounters, zip_suppressed, payer_lost, race_suppressed, frozenset(withheld))


def _carried_group_counts(
    carried_qi: pl.DataFrame, *, withheld: set[int], race_lost: pl.Series, payer_lost: pl.Series
) -> dict[str, dict[str, dict[str, int]]]:
    """Per audited group, the held-back people released now (``released_later``: they no longer count as
    withheld in the batch that held them back) and those of them released without their race or payer (lost
    to that audit, as a delivered person would be)."""
    counts = audited_group_counts(
        carried_qi, withheld=withheld, race_suppressed=race_lost, payer_suppressed=payer_lost
    )
    return {
        attribute: {
            group: {
                "patients": 0,
                "withheld": 0,
                "released_later": c["patients"] - c["withheld"],
                **{k: v for k, v in c.items() if k.endswith("_not_released")},
            }
            for group, c in groups.items()
        }
        for attribute, groups in counts.items()
    }


def _merge_group_counts(
    own: dict[str, dict[str, dict[str, int]]], later: dict[str, dict[str, dict[str, int]]]
) -> dict[str, dict[str, dict[str, int]]]:
    out = {a: {g: dict(c) for g, c in groups.items()} for a, groups in own.items()}
    for attribute, groups in later.items():
        for group, counts in groups.items():
            into = out.setdefault(attribute, {}).setdefault(group, {})
            for k, v in counts.items():
                into[k] = into.get(k, 0) + v
    return {a: dict(sorted(groups.items())) for a, groups in out.items()}


@dataclass(frozen=True)
class _Delivered:
    """The frames judged, split into the batch's own delivery and the admissions earlier batches held back."""

    is_carried: pl.Expr
    own_patients: pl.DataFrame
    own_encounters: pl.DataFrame
    carried_encounters: pl.DataFrame
    own_qi: pl.DataFrame
    """Quasi-identifiers of the own people with an admission in the delivery (a patient row alone is in no
    cohort, so in no audit)."""
    carried_qi: list[pl.DataFrame]
    """Per delivery the carried came in: a person held back by two deliveries is two audited memberships."""

    @classmethod
    def split(
        cls,
        patients: pl.DataFrame,
        encounters: pl.DataFrame,
        carried: pl.DataFrame | None,
        policy: RiskPolicy,
    ) -> "_Delivered":
        is_carried = (
            pl.col("hadm_id").is_in(carried["hadm_id"].implode())
            if carried is not None and carried.height
            else pl.lit(False)
        )
        own_encounters, carried_encounters = encounters.filter(~is_carried), encounters.filter(is_carried)
        own_subjects = own_encounters["subject_id"].implode()
        carried_only = carried_encounters["subject_id"].unique()
        carried_only = carried_only.filter(~carried_only.is_in(own_subjects))
        own_patients = patients.filter(~pl.col("subject_id").is_in(carried_only.implode()))
        by_origin = (
            carried_encounters.join(carried.select("hadm_id", "origin_batch"), on="hadm_id").partition_by(
                "origin_batch", include_key=False, maintain_order=True
            )
            if carried is not None and carried_encounters.height
            else []
        )
        return cls(
            is_carried,
            own_patients,
            own_encounters,
            carried_encounters,
            quasi_identifiers(
                own_patients.filter(pl.col("subject_id").is_in(own_subjects)), own_encounters, policy=policy
            ),
            [
                quasi_identifiers(
                    patients.filter(pl.col("subject_id").is_in(enc["subject_id"].implode())),
                    enc,
                    policy=policy,
                )
                for enc in by_origin
            ],
        )

    def group_counts(
        self, withheld: set[int], *, race_lost: pl.Series, payer_lost: pl.Series
    ) -> dict[str, dict[str, dict[str, int]]]:
        """The audited groups' counts: the own people's, plus ``released_later`` for the carried."""
        return functools.reduce(
            _merge_group_counts,
            [
                _carried_group_counts(qi, withheld=withheld, race_lost=race_lost, payer_lost=payer_lost)
                for qi in self.carried_qi
            ],
            audited_group_counts(
                self.own_qi, withheld=withheld, race_suppressed=race_lost, payer_suppressed=payer_lost
            ),
        )


def enforce_k_anonymity(
    *,
    patients: pl.DataFrame,
    encounters: pl.DataFrame,
    events: pl.DataFrame,
    policy: RiskPolicy,
    released: pl.DataFrame | None = None,
    carried: pl.DataFrame | None = None,
    race_suppressible: pl.Series | None = None,
) -> Remedied:
    """Generalize, then suppress, until every class over the quasi-identifiers holds ``policy.k`` people.

    Parameters
    ----------
    patients, encounters, events
        De-identified frames of one batch (``DEID_COLUMNS``).
    policy
        The generalization hierarchy and ``k``.
    released
        The quasi-identifiers of the batches released before this one (:func:`released_quasi_identifiers`):
        classes are then counted over the cumulative release, the people already released and this batch's,
        and only this batch's records are remedied. ``None`` judges the batch on its own.
    carried
        ``hadm_id`` -> ``origin_batch`` of admissions that earlier batches held back, judged again with this
        batch (their patient rows and events are in the frames too). They are remedied like the batch's own,
        but counted apart: the withheld counts and the audited groups' ``patients`` and ``withheld`` are the
        batch's own delivery's; ``Remedied.carried`` and the groups' ``released_later`` say what became of
        the carried.
    race_suppressible
        With ``policy.suppress_race`` false, the ``subject_id`` of the people whose race may be suppressed
        all the same (held back by ``max_holds`` deliveries: :mod:`clinical_ml.core.holdback`).

    Returns
    -------
    Remedied
        The frames to publish, the risk before any remedy (on the generalized ages only) and after all of
        them, and how many people or records each remedy touched.
    """
    before = measure_risk(
        quasi_identifiers(patients, encounters, policy=policy), k=policy.k, released=released
    )
    delivered = _Delivered.split(patients, encounters, carried, policy)
    # each patient's race/ethnicity group as delivered: generalizing or suppressing it takes them from its audit
    group_before = patients.select("subject_id", race_ethnicity_expr().alias("_group"))
    race_generalized = 0
    if policy.races_kept is not None:
        moved = pl.col("race").is_not_null() & ~pl.col("race").is_in(list({*policy.races_kept, OTHER_RACE}))
        race_generalized = int(patients.select(moved.sum()).item())
        patients = patients.with_columns(
            pl.when(moved).then(pl.lit(OTHER_RACE)).otherwise("race").alias("race")
        )
    payers = "payer" in encounters.columns and encounters["payer"].drop_nulls().ne(UNKNOWN_PAYER).any()
    # ZIP3 (needed by no model and no audit) is given up to keep payers too, where that costs nobody their
    # race or their record: moving a person to ZIP3 000 can leave them in a class too small there
    suppressed = _suppress(
        patients,
        encounters,
        policy,
        zip3_for_payer=payers,
        released=released,
        race_suppressible=race_suppressible,
    )
    if payers and (suppressed.withheld or suppressed.race):
        kept = _suppress(
            patients,
            encounters,
            policy,
            zip3_for_payer=False,
            released=released,
            race_suppressible=race_suppressible,
        )
        if not (
            suppressed.withheld <= kept.withheld
            and suppressed.race_lost(group_before) <= kept.race_lost(group_before)
        ):
            suppressed = kept
    patients, encounters, withheld = suppressed.patients, suppressed.encounters, suppressed.withheld
    zip_suppressed, race_suppressed, payer_lost = suppressed.zip3, suppressed.race, suppressed.payer_lost
    race_lost = pl.Series("subject_id", sorted(suppressed.race_lost(group_before)), dtype=pl.Int64)
    gone = pl.col("subject_id").is_in(pl.Series(list(withheld), dtype=pl.Int64).implode())
    kept_events = events.filter(~gone) if withheld else events  # no pass over millions of events for nothing
    after = measure_risk(
        quasi_identifiers(patients, encounters, policy=policy), k=policy.k, released=released
    )
    own_out = encounters.filter(~delivered.is_carried)
    # events of carried admissions, delivered and kept (no pass over the events when nothing was carried)
    carried_in, carried_kept = (
        (events.filter(delivered.is_carried).height, kept_events.filter(delivered.is_carried).height)
        if delivered.carried_encounters.height
        else (0, 0)
    )
    return Remedied(
        patients=patients,
        encounters=encounters,
        events=kept_events,
        before=before,
        after=after,
        race_generalized=race_generalized,
        zip3_suppressed=zip_suppressed,
        race_suppressed=race_suppressed,
        subjects_withheld=len(withheld & set(delivered.own_patients["subject_id"].to_list())),
        admissions_withheld=delivered.own_encounters.height - own_out.height,
        events_withheld=(events.height - carried_in) - (kept_events.height - carried_kept),
        withheld_subjects=pl.Series("subject_id", sorted(withheld), dtype=pl.Int64),
        audited_groups=delivered.group_counts(set(withheld), race_lost=race_lost, payer_lost=payer_lost),
        payer_suppressed=payer_lost.len(),
        subjects_delivered=delivered.own_patients["subject_id"].n_unique(),
        carried=Carried(
            patients_released=encounters.filter(delivered.is_carried)["subject_id"].n_unique(),
            admissions_released=encounters.height - own_out.height,
            events_released=carried_kept,
            patients_held=delivered.carried_encounters.filter(gone)["subject_id"].n_unique(),
            admissions_held=delivered.carried_encounters.height - (encounters.height - own_out.height),
        ),
    )


def withhold_events(events: pl.LazyFrame, remedied: Remedied) -> pl.LazyFrame:
    """A lazy events plan (``DeidBatch.events_plan``) without the events of the people ``remedied`` withheld.

    ``enforce_k_anonymity`` needs only the patients and admissions to decide; the events follow.
    """
    if remedied.withheld_subjects.len() == 0:
        return events
    return events.filter(~pl.col("subject_id").is_in(remedied.withheld_subjects.implode()))
