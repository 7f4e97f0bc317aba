"""Shared machinery of the source adapters: the de-identified layer they write and the rules they share.

An adapter maps an export that is *already de-identified* (a public research database such as eICU-CRD or
MIMIC-III) straight into the de-identified layer (``deid/patients``, ``deid/encounters``, ``deid/events``,
with exactly the allowlisted columns of :data:`clinical_ml.core.anonymization.DEID_COLUMNS`), so the graph
from ``meds_dataset`` down runs on it unchanged. Source identifiers are still replaced by random surrogate
ids (the pipeline's rule: codes not derived from identifiers); the mapping is written to the phi zone only.
Coded values pass the same value allowlist as the landing zone's (:mod:`clinical_ml.core.site_mapping`): each
adapter recodes its source's values with explicit tables and declares its unit codes (with their types) and
site codes in an :func:`adapter_mapping`; anything else would leave as ``unmapped``.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from clinical_ml.core.anonymization import AGE_CAP, DEID_COLUMNS, encounter_events, year_quarter
from clinical_ml.core.site_mapping import CONTRACT, SiteMapping, UnitEntry, enforce_controlled_values
from clinical_ml.core.storage import committed, write_json, write_parquet
from clinical_ml.core.units import PLAUSIBLE_RANGES

# Plausible ranges for codes the shared vocabulary (core/units.py) does not list; same rule: outside the
# range a value is kept but flagged ``implausible`` and never used as a feature.
EXTRA_PLAUSIBLE_RANGES: dict[str, tuple[float, float]] = {
    "2744-1": (6.5, 8.0),  # arterial pH
    "2703-7": (10, 800),  # PaO2 mm[Hg]
    "2019-8": (5, 200),  # PaCO2 mm[Hg]
    "3150-0": (21, 100),  # inhaled oxygen concentration (FiO2) %
    "4544-3": (5, 75),  # hematocrit %
    "1751-7": (0.5, 7),  # albumin g/dL
    "urine_output_24h": (0, 20000),  # mL over the first 24 h
    "intubated": (0, 1),
    "mechanical_ventilation": (0, 1),
    "dialysis": (0, 1),
}

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
    "hadm_id": pl.Int64(),
    "available_time": pl.Datetime("us"),
    "implausible": pl.Boolean(),
}


# The coded discharge dispositions of the de-identified layer, shared by every adapter and the landing zone
# (clinical_ml/core/contract_vocabulary.yaml; each adapter maps its source's values onto them with an explicit
# table, a site with its mapping file). Transfers to another inpatient hospital are ``*_TRANSFER`` (or
# ``TRANSFER``) so that a readmission question can exclude them (``outcome.transfer_dispositions``).
DISCHARGE_DISPOSITIONS: tuple[str, ...] = CONTRACT.discharge_disposition
# A source value that its adapter's table does not name, and a missing one.
OTHER = "OTHER"
UNKNOWN = "UNKNOWN"


def _normalised(col: pl.Expr) -> pl.Expr:
    """Case, blanks and runs of spaces do not make a different value (exports differ in them)."""
    return col.str.strip_chars().str.replace_all(r"\s+", " ").str.to_uppercase()


def coded(col: pl.Expr, table: dict[str, str], *, missing: str = UNKNOWN) -> pl.Expr:
    """A source column recoded by an explicit ``table`` (keys compared without regard to case or blanks):
    values the table does not name become :data:`OTHER`, missing or blank ones ``missing``; never the
    source's own text, which may be free text."""
    keys = {" ".join(k.split()).upper(): v for k, v in table.items()}
    norm = _normalised(col)
    return (
        pl.when(norm.is_null() | (norm == ""))
        .then(pl.lit(missing))
        .otherwise(norm.replace_strict(keys, default=OTHER, return_dtype=pl.String))
    )


def count_unmapped(values: pl.Series, table: dict[str, str]) -> int:
    """How many present values ``table`` does not name (they became :data:`OTHER`): counted, never listed."""
    keys = {" ".join(k.split()).upper() for k in table}
    norm = values.to_frame("v").select(_normalised(pl.col("v"))).to_series().drop_nulls()
    norm = norm.filter(norm != "")
    return int((~norm.is_in(list(keys))).sum())


class AdapterError(ValueError):
    """A source export that cannot be adapted (missing table or column), with what is missing."""


@dataclass(frozen=True)
class AdaptedSource:
    """One source mapped onto the de-identified layer.

    Attributes
    ----------
    source
        Short name of the source (``eicu``, ``mimic``); batch ids start with it.
    patients, encounters, events
        Frames with exactly the allowlisted de-identified columns.
    id_map
        ``source_key``, ``kind`` (``subject`` or ``hadm``), ``surrogate_id``: the pseudonym mapping, which
        belongs in the phi zone only.
    counts
        What was dropped and why, and how values were recoded (counts only, never values).
    """

    source: str
    patients: pl.DataFrame
    encounters: pl.DataFrame
    events: pl.DataFrame
    id_map: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def read_table(
    root: Path, name: str, *, columns: list[str] | None = None, optional: list[str] | None = None
) -> pl.DataFrame:
    """Read ``<root>/tables/<name>.parquet`` (or ``<root>/<name>.parquet``), only ``columns`` if given, and
    the ``optional`` columns: empty (text) where the table does not have them.

    Raises
    ------
    AdapterError
        When the table or one of the columns is missing.
    """
    root = Path(root)
    for candidate in (root / "tables" / f"{name}.parquet", root / f"{name}.parquet"):
        if candidate.exists():
            schema = pl.read_parquet_schema(candidate)
            missing = sorted(set(columns or []) - set(schema))
            if missing:
                raise AdapterError(f"{candidate.name}: missing columns {missing}")
            present = [c for c in optional or [] if c in schema]
            frame = pl.read_parquet(candidate, columns=[*columns, *present] if columns is not None else None)
            return frame.with_columns(
                pl.lit(None, dtype=pl.String).alias(c) for c in optional or [] if c not in schema
            )
    raise AdapterError(f"table {name!r} not found under {root}")


def surrogate_ids(keys: pl.Series, *, rng: np.random.Generator) -> pl.DataFrame:
    """Random, distinct surrogate ids (not derived from the keys) for the distinct non-null ``keys``.

    Returns a frame ``source_key`` (the keys as strings), ``surrogate_id`` (int64).
    """
    distinct = keys.drop_nulls().cast(pl.String).unique().sort()
    ids: np.ndarray = np.empty(0, dtype=np.int64)
    while ids.size < distinct.len():
        ids = np.unique(
            np.concatenate([ids, rng.integers(10**9, 2**53, size=2 * distinct.len(), dtype=np.int64)])
        )
    return pl.DataFrame(
        {"source_key": distinct, "surrogate_id": rng.permutation(ids)[: distinct.len()]},
        schema={"source_key": pl.String, "surrogate_id": pl.Int64},
    )


def implausible_expr(code: pl.Expr, value: pl.Expr) -> pl.Expr:
    """True where a value lies outside the plausible range of its code (codes without a range: False)."""
    ranges = {**PLAUSIBLE_RANGES, **EXTRA_PLAUSIBLE_RANGES}
    bare = code.str.split("//").list.last()
    lo = bare.replace_strict(
        {k: float(v[0]) for k, v in ranges.items()}, default=None, return_dtype=pl.Float64
    )
    hi = bare.replace_strict(
        {k: float(v[1]) for k, v in ranges.items()}, default=None, return_dtype=pl.Float64
    )
    return ((value < lo) | (value > hi)).fill_null(False)


def finish_events(events: pl.DataFrame) -> pl.DataFrame:
    """Typed MEDS events with the implausibility flag, sorted by subject and time (static rows first)."""
    return (
        events.with_columns(
            pl.col("numeric_value").cast(pl.Float32),
            pl.col("time").cast(pl.Datetime("us")),
            pl.col("available_time").cast(pl.Datetime("us")),
        )
        .with_columns(implausible_expr(pl.col("code"), pl.col("numeric_value")).alias("implausible"))
        .select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])
        .sort("subject_id", "time", "code", nulls_last=False)
    )


def stay_events(encounters: pl.DataFrame, icu_stays: pl.DataFrame) -> pl.DataFrame:
    """The stay's own events (admission, discharge, death: :func:`encounter_events`) and one
    ``ICU_UNIT//<unit>`` event per ICU stay at its ICU admission (``icu_stays``: ``subject_id``, ``hadm_id``,
    ``time``, ``unit``), so that a prediction anchored at ICU admission finds every ICU admission of the
    hospital stay, wherever in it they fall."""
    stay = encounter_events(encounters).filter(~pl.col("code").str.starts_with("ICU_UNIT//"))
    icu = icu_stays.select(
        "subject_id",
        pl.col("time").cast(pl.Datetime("us")),
        pl.format("ICU_UNIT//{}", pl.col("unit")).alias("code"),
        pl.lit(None, dtype=pl.Float32).alias("numeric_value"),
        "hadm_id",
        pl.col("time").cast(pl.Datetime("us")).alias("available_time"),
        pl.lit(False).alias("implausible"),
    )
    return pl.concat([stay, icu], how="diagonal_relaxed")


def cap_age(age: pl.Expr) -> pl.Expr:
    """Ages at or over 90 become 90 (read "90+"), as in the anonymizer; negative ages become null."""
    return pl.when(age < 0).then(None).otherwise(pl.min_horizontal(age, pl.lit(AGE_CAP))).cast(pl.Int32)


def adapter_mapping(source: str, *, units: Mapping[str, str], sites: Iterable[str]) -> SiteMapping:
    """An adapter's declared codes as a site mapping: ``units`` (unit code -> unit type) and ``sites``."""
    return SiteMapping(
        name=source,
        units={u: UnitEntry(type=t) for u, t in units.items()},
        sites={s: s for s in sites},
    )


def finish_encounters(encounters: pl.DataFrame, *, mapping: SiteMapping) -> pl.DataFrame:
    """Encounters with the real year-quarter as ``period``, the unit's type, coded values held to their
    vocabularies (anything else ``unmapped``) and exactly the allowlisted columns."""
    out = encounters.with_columns(
        year_quarter(pl.col("admit_time")).alias("period"),
        pl.col("age_years").cast(pl.Int32),
    )
    if "payer" not in out.columns:  # a source without the stay's payer (eICU)
        out = out.with_columns(pl.lit(None, dtype=pl.String).alias("payer"))
    out, _ = enforce_controlled_values(out, "encounters", mapping)
    return out.select(DEID_COLUMNS["encounters"])


def finish_patients(patients: pl.DataFrame, *, mapping: SiteMapping) -> pl.DataFrame:
    """Patients with sex, race and ethnicity held to their vocabularies and exactly the allowlisted columns."""
    out, _ = enforce_controlled_values(patients, "patients", mapping)
    return out.select(DEID_COLUMNS["patients"])


def write_deid_layer(adapted: AdaptedSource, *, data_root: Path) -> dict[str, list[Path]]:
    """Write one Parquet file per batch and table into ``<data_root>/deid``; the id map into the phi zone.

    Existing batch files of the same source are replaced. Returns the written de-identified files by table.

    Raises
    ------
    AdapterError
        When the de-identified zone already holds batches of another source (mixing sources in one data
        root would silently train on both).
    """
    deid = Path(data_root) / "deid"
    prefix = f"{adapted.source}_"
    foreign = [p.name for p in committed(deid / "events", ".parquet") if not p.name.startswith(prefix)]
    if foreign:
        raise AdapterError(
            f"{deid} already holds {len(foreign)} batches of another source; use a separate data root"
        )
    for table in ("patients", "encounters", "events"):
        for old in (deid / table).glob(f"{prefix}*.parquet"):
            old.unlink()
    written: dict[str, list[Path]] = {"patients": [], "encounters": [], "events": []}
    batches = adapted.encounters.select("hadm_id", "subject_id", "batch_id")
    for batch_id in sorted(batches["batch_id"].unique().to_list()):
        enc = adapted.encounters.filter(pl.col("batch_id") == batch_id)
        subjects = enc["subject_id"].unique().implode()
        frames = {
            "encounters": enc,
            "patients": adapted.patients.filter(pl.col("subject_id").is_in(subjects)),
            "events": adapted.events.filter(
                pl.col("hadm_id").is_in(enc["hadm_id"].implode())
                | (pl.col("hadm_id").is_null() & pl.col("subject_id").is_in(subjects))
            ),
        }
        for table, frame in frames.items():
            written[table].append(write_parquet(frame, deid / table / f"{batch_id}.parquet"))
    phi = Path(data_root) / "phi" / "adapters" / adapted.source
    write_parquet(adapted.id_map, phi / "id_map.parquet")
    write_json(adapted.counts, Path(data_root) / "deid" / "adapters" / f"{adapted.source}.json")
    return written
