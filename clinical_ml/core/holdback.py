"""People held back at the anonymization boundary until enough people alike have been released (streaming
k-anonymity), instead of being withheld for good.

A person still in a class below ``k`` after the remedies is not released with their batch. Under the
cumulative risk scope their rows stay in the phi zone (they always do) and the batch's *hold record* lists
them: ``phi/held/<batch>.parquet``, one row per person and delivery (``origin_batch``, the normalized
``mrn``, ``status``). Each later batch reads the hold records of the batches it counts its risk with, takes
the people still held (held by one of them, released by none), anonymizes their rows as their own delivery
would (its site mapping, its seed), and judges them again together with its own people against the
cumulative release: those whose class now holds ``k`` people are released with it, the others stay held and
are listed again in its record. So a person rare in the first delivery is released once enough people alike
have been, instead of being lost to the audit; the guarantee (every class of the cumulative release holds at
least ``k`` people) is the gate's, unchanged.

The hold record is identified data: it lives in the phi zone only, next to the raw rows it points at.
Re-running a batch counts the same earlier batches (``batches_counted``), so it reads the same hold records
and gives the same release.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from clinical_ml.core.dicom import ImagingInstance
from clinical_ml.core.pseudonyms import normalize_identifier
from clinical_ml.core.site_mapping import SiteMapping

HELD = "held"
RELEASED = "released"
HOLD_SCHEMA = {"origin_batch": pl.String, "mrn": pl.String, "status": pl.String}
MAX_HOLD_DELIVERIES = 30
"""Deliveries after which a person still held back is withheld for good: no later batch reads their rows
again (``AnonymizationSettings.max_hold_deliveries``)."""
MAX_HOLDS = 2
"""Deliveries a person may be held back by (their own, then each later one that judged them again) before
their race and ethnicity may be withheld to release them (``AnonymizationSettings.max_holds``)."""


@dataclass(frozen=True)
class HeldRows:
    """The accepted rows of one earlier delivery that belong to people it held back, to judge again."""

    batch_id: str
    """The delivery they came in: they are anonymized as it would anonymize them."""
    raw: Mapping[str, pl.DataFrame]
    rng: np.random.Generator
    mapping: SiteMapping | None = None
    imaging: tuple[ImagingInstance, ...] = ()
    """Their accepted DICOM files of that delivery (released with them, de-identified as then)."""
    overdue: pl.Series = field(default_factory=lambda: pl.Series("mrn", [], dtype=pl.String))
    """The normalized ``mrn`` of those held back by ``max_holds`` deliveries already: where the race remedy
    is to hold back, they are now released with race and ethnicity withheld if still too rare, so a person
    rare for good is not held for ever."""


def empty_hold() -> pl.DataFrame:
    return pl.DataFrame(schema=HOLD_SCHEMA)


def still_held(records: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """The (``origin_batch``, ``mrn``) pairs held back by one of ``records`` (hold records of the batches
    counted) and released by none of them, sorted, with ``holds``: by how many of them."""
    frames = [r.select(list(HOLD_SCHEMA)).cast(HOLD_SCHEMA) for r in records]  # type: ignore[arg-type]
    rows = pl.concat(frames) if frames else empty_hold()
    pairs = ["origin_batch", "mrn"]
    released = rows.filter(pl.col("status") == RELEASED).select(pairs)
    held = rows.filter(pl.col("status") == HELD).group_by(pairs).agg(pl.len().cast(pl.Int64).alias("holds"))
    return held.join(released, on=pairs, how="anti").sort(pairs)


def rows_of(raw: Mapping[str, pl.DataFrame], mrns: pl.Series) -> dict[str, pl.DataFrame]:
    """The rows of one delivery's sources that belong to the patients ``mrns`` (normalized): their patient
    rows, their admissions, and every row of the other sources on those admissions."""
    wanted = mrns.cast(pl.String).implode()
    encounters = raw["encounters"].filter(normalize_identifier(pl.col("mrn")).is_in(wanted))
    stays = encounters.select(normalize_identifier(pl.col("encounter_id")))["encounter_id"].implode()
    out = {
        "patients": raw["patients"].filter(normalize_identifier(pl.col("mrn")).is_in(wanted)),
        "encounters": encounters,
    }
    for source, frame in raw.items():
        if source not in out:
            out[source] = frame.filter(normalize_identifier(pl.col("encounter_id")).is_in(stays))
    return out


def instances_of(instances: Iterable[ImagingInstance], mrns: pl.Series) -> tuple[ImagingInstance, ...]:
    """The DICOM files of one delivery that belong to the patients ``mrns`` (normalized)."""
    wanted = set(mrns.cast(pl.String).to_list())
    return tuple(i for i in instances if i.mrn is not None and i.mrn.strip().upper() in wanted)


def hold_record(
    *,
    batch_id: str,
    encounters: pl.DataFrame,
    origins: pl.DataFrame,
    withheld: pl.Series,
    mrn_of: pl.DataFrame,
) -> pl.DataFrame:
    """The batch's hold record: every (delivery, person) of its withheld people, ``held``; and every carried
    (delivery, person) it released, ``released``.

    Parameters
    ----------
    encounters
        The de-identified admissions judged (own and carried): ``hadm_id``, ``subject_id``.
    origins
        ``hadm_id`` -> ``origin_batch`` of the carried admissions (the others are this batch's own).
    withheld
        The ``subject_id`` of the people withheld by the remedies.
    mrn_of
        ``subject_id`` -> normalized ``mrn`` (the pseudonym mapping the anonymizer returned).
    """
    rows = (
        encounters.select("hadm_id", "subject_id")
        .join(origins, on="hadm_id", how="left")
        .with_columns(pl.col("origin_batch").fill_null(pl.lit(batch_id)))
        .with_columns(
            pl.when(pl.col("subject_id").is_in(withheld.implode()))
            .then(pl.lit(HELD))
            .otherwise(pl.lit(RELEASED))
            .alias("status")
        )
        # a batch's own people it released need no record
        .filter((pl.col("status") == HELD) | (pl.col("origin_batch") != batch_id))
        .join(mrn_of.select("subject_id", "mrn").unique("subject_id"), on="subject_id", how="left")
    )
    missing = rows.filter(pl.col("mrn").is_null()).height
    if missing:  # counts only: a person held back must be findable again, else they would be lost silently
        raise ValueError(f"batch {batch_id}: {missing} held-back admissions have no patient in the vault")
    return rows.select(list(HOLD_SCHEMA)).unique().sort(list(HOLD_SCHEMA))
