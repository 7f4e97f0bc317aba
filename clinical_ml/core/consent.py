"""Consent and objection: the hospital's opt-out register of patients who refused the secondary use of their
data, applied at the anonymization boundary.

The register is a CSV file in the phi zone (``phi/consent/opt_out.csv``) that the hospital's privacy office
keeps: one row per patient, ``mrn`` and ``objected_on`` (a date, ``YYYY-MM-DD``), nothing else required.

* A listed patient's rows never cross the boundary: they stay in the phi zone (nothing is lost or altered),
  are counted per batch as "withheld by consent", and no de-identified table receives them.
* A later objection withdraws what was already released: every de-identified table (the released batches,
  the MEDS export, each use case's cohort, labels, features, splits and predictions) is rewritten without the
  patient's rows, so the next training cannot see them. A model already trained on them stays in the
  registry as trained (it cannot unlearn); its successor, trained after the withdrawal, excludes them.
* Records hold counts only: never an MRN, a pseudonym or a date of a patient.
"""

import csv
import io
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from clinical_ml.core.anonymization import DeidBatch, Vault
from clinical_ml.core.pseudonyms import HmacKey, hmac_ids, normalize_identifier
from clinical_ml.core.storage import write_parquet

if TYPE_CHECKING:
    from clinical_ml.core.artifacts import DeidStore

REGISTER_COLUMNS = ("mrn", "objected_on")


class ConsentRegisterError(ValueError):
    """The register cannot be read; the message names the line and the problem, never a value."""


def read_register(path: Path) -> pl.Series:
    """The normalized MRNs of the register (empty when the file does not exist).

    Raises
    ------
    ConsentRegisterError
        A missing column, an empty MRN or a date that is not ``YYYY-MM-DD`` (by line number): a register
        that cannot be read stops anonymization rather than release someone who objected.
    """
    if not path.is_file():
        return pl.Series("mrn", [], dtype=pl.String)
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return pl.Series("mrn", [], dtype=pl.String)
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in REGISTER_COLUMNS if c not in header]
    if missing:
        raise ConsentRegisterError(
            f"the consent register {path.name} lacks the column(s) {', '.join(missing)}: it needs a header "
            f"with {', '.join(REGISTER_COLUMNS)}"
        )
    at_mrn, at_date = header.index("mrn"), header.index("objected_on")
    mrns = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        mrn = row[at_mrn].strip() if at_mrn < len(row) else ""
        when = row[at_date].strip() if at_date < len(row) else ""
        if not mrn:
            raise ConsentRegisterError(f"the consent register {path.name}, line {line}: the MRN is empty")
        try:
            date.fromisoformat(when)
        except ValueError:
            raise ConsentRegisterError(
                f"the consent register {path.name}, line {line}: objected_on is not a date (YYYY-MM-DD)"
            ) from None
        mrns.append(mrn)
    series = pl.Series("mrn", mrns, dtype=pl.String)
    return pl.select(normalize_identifier(pl.lit(series))).to_series().unique().sort()


def objecting_subjects(mrns: pl.Series, *, vault: Vault, hmac_key: HmacKey | None) -> pl.Series:
    """The pseudonyms of the register's patients (those the vault knows, in vault mode)."""
    if mrns.len() == 0:
        return pl.Series("subject_id", [], dtype=pl.Int64)
    if hmac_key is not None:
        return hmac_ids(mrns, key=hmac_key, kind="subject").alias("subject_id")
    return vault.patients.filter(pl.col("mrn").is_in(mrns.implode()))["subject_id"]


@dataclass(frozen=True)
class ConsentWithheld:
    """What one batch kept back because its patients objected (counts only)."""

    patients: int = 0
    admissions: int = 0
    events: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def withhold_objecting(deid: DeidBatch, subjects: pl.Series) -> tuple[DeidBatch, ConsentWithheld]:
    """The batch without the rows of ``subjects`` (patients, admissions, events, the streamed events plan),
    and how many were kept back."""
    if subjects.len() == 0:
        return deid, ConsentWithheld()
    out = ~pl.col("subject_id").is_in(subjects.implode())
    kept = DeidBatch(
        **{
            **deid.__dict__,
            "patients": deid.patients.filter(out),
            "encounters": deid.encounters.filter(out),
            "events": deid.events.filter(out),
            "events_plan": deid.events_plan.filter(out) if deid.events_plan is not None else None,
        }
    )
    withheld = ConsentWithheld(
        patients=deid.patients.height - kept.patients.height,
        admissions=deid.encounters.height - kept.encounters.height,
        events=deid.events.height - kept.events.height,
    )
    return kept, withheld


@dataclass(frozen=True)
class Withdrawal:
    """Rows removed from the de-identified zone for patients who objected after their data were released."""

    patients: int
    rows_removed: dict[str, int] = field(default_factory=dict)  # per kind of table: batches, meds, use case
    at: str = ""

    def as_dict(self) -> dict:
        return {"patients": self.patients, "rows_removed": dict(self.rows_removed), "at": self.at}

    @property
    def removed(self) -> int:
        return sum(self.rows_removed.values())

    def sentence(self) -> str:
        where = ", ".join(f"{n:,} from {kind}" for kind, n in sorted(self.rows_removed.items()))
        return (
            f"consent withdrawn: {self.patients} patients of the opt-out register had data already released; "
            f"{self.removed:,} rows removed from the de-identified zone ({where}). Models trained before stay as "
            "trained; the next training excludes them."
        )


def _kind(path: Path, root: Path) -> str:
    parts = path.relative_to(root).parts
    if parts[0] == "usecases" and len(parts) > 2:
        return f"use case {parts[1]}"
    return parts[0]


def withdraw_released(deid_root: Path, subjects: pl.Series, *, now: datetime | None = None) -> Withdrawal:
    """Rewrite every Parquet table of the de-identified zone without the rows of ``subjects`` (by
    ``subject_id``, or by ``hadm_id`` of their admissions for a table without it). Files are replaced
    atomically; a file without such rows is not touched."""
    root = Path(deid_root)
    files = sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))
    if subjects.len() == 0 or not files:
        return Withdrawal(0)
    ids = subjects.implode()
    encounter_files = [p for p in (root / "encounters").glob("*.parquet") if not p.name.startswith(".")]
    hadm = (
        pl.scan_parquet(encounter_files).filter(pl.col("subject_id").is_in(ids)).select("hadm_id").collect()
        if encounter_files
        else pl.DataFrame({"hadm_id": []}, schema={"hadm_id": pl.Int64})
    )["hadm_id"]
    removed: dict[str, int] = {}
    patients: set[int] = set()
    for path in files:
        columns = pl.read_parquet_schema(path)
        if "subject_id" in columns:
            hit = pl.col("subject_id").is_in(ids)
        elif "hadm_id" in columns and hadm.len():
            hit = pl.col("hadm_id").is_in(hadm.implode())
        else:
            continue
        frame = pl.read_parquet(path)
        gone = frame.filter(hit)
        if gone.height == 0:
            continue
        if path.parent.name == "patients" and path.parent.parent == root:
            patients |= set(gone["subject_id"].to_list())
        write_parquet(frame.filter(~hit), path)
        kind = _kind(path, root)
        removed[kind] = removed.get(kind, 0) + gone.height
    stamp = (now or datetime.now(UTC)).isoformat()
    return Withdrawal(len(patients), removed, stamp) if removed else Withdrawal(0)


def withdraw_objections(
    deid: "DeidStore", mrns: pl.Series, *, vault: Vault, hmac_key: HmacKey | None
) -> Withdrawal:
    """Withdraw what was released of the register's patients, if anything (a cheap look at the released
    patients first: most runs have nothing to withdraw and read nothing else)."""
    subjects = objecting_subjects(mrns, vault=vault, hmac_key=hmac_key)
    if subjects.len() == 0 or not deid.patients.files():
        return Withdrawal(0)
    released = pl.scan_parquet(deid.patients.files()).select("subject_id").collect()["subject_id"]
    if not released.is_in(subjects.implode()).any():
        return Withdrawal(0)
    return withdraw_released(deid.root, subjects)
