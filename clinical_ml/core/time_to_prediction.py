"""Time to prediction on the batch path: from a batch landing to its predictions being written.

A batch lands when ingestion records its first file in the ledger (each entry's ``recorded_at``, UTC:
:func:`clinical_ml.core.delivery.read_ledger_entry`); its predictions are available when the monitoring
stage writes them. The time between is kept per batch beside its predictions and judged against the use
case's ``operations.max_hours_to_prediction``.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class PredictionTiming:
    """How long a batch waited, from landing to its predictions being written.

    ``landed_at``: when ingestion recorded the batch's first file in the ledger (``recorded_at``, UTC);
    ``predicted_at``: when its predictions were first written after that landing (a later re-scoring of the
    same delivery keeps the first time; a re-delivery starts a new measurement).
    """

    batch_id: str
    landed_at: str | None
    predicted_at: str
    limit_hours: float

    @property
    def hours(self) -> float | None:
        if self.landed_at is None:
            return None
        delta = datetime.fromisoformat(self.predicted_at) - datetime.fromisoformat(self.landed_at)
        return delta.total_seconds() / 3600.0

    @property
    def within_limit(self) -> bool | None:
        h = self.hours
        return None if h is None else h <= self.limit_hours

    def sentence(self) -> str:
        h = self.hours
        if h is None:
            return f"batch {self.batch_id}: time to prediction not measured (no ledger entry records its landing)"
        verdict = "within" if h <= self.limit_hours else "over"
        return (
            f"batch {self.batch_id}: predictions written {h:.2f} h after the batch landed, {verdict} the "
            f"use case's limit of {self.limit_hours:g} h"
        )

    def as_dict(self) -> dict:
        return {
            "batch_id": self.batch_id,
            "landed_at": self.landed_at,
            "predicted_at": self.predicted_at,
            "limit_hours": self.limit_hours,
            "hours_to_prediction": self.hours,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PredictionTiming":
        return cls(str(d["batch_id"]), d.get("landed_at"), str(d["predicted_at"]), float(d["limit_hours"]))


def landed_at(ledger_entries: Iterable[dict]) -> str | None:
    """The earliest ``recorded_at`` of a batch's ledger entries (ISO, with its zone), ``None`` without one."""
    times = []
    for e in ledger_entries:
        try:
            t = datetime.fromisoformat(str(e.get("recorded_at")))
        except ValueError:
            continue
        if t.tzinfo is not None:
            times.append(t)
    return min(times).isoformat() if times else None


def prediction_timing(
    *,
    batch_id: str,
    landed: str | None,
    now: datetime,
    limit_hours: float,
    previous: PredictionTiming | None,
) -> PredictionTiming:
    """This scoring's timing: the first scoring after the landing keeps its time (a re-score does not move it)."""
    if previous is not None and previous.landed_at == landed and landed is not None:
        return PredictionTiming(batch_id, landed, previous.predicted_at, limit_hours)
    return PredictionTiming(batch_id, landed, now.isoformat(), limit_hours)
