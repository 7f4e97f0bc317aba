"""What the point-of-care service served, taken across the anonymization boundary so monitoring sees it.

The CDS Hooks service (:mod:`clinical_ml.serve`) records in the phi zone each card it served (the EHR's
patient and encounter ids, the hook call, the card's uuid, model version, risk, band, guardrail code, the
top reasons' feature values) and each call it answered (route, HTTP status, milliseconds, outcome code).
Two de-identified tables leave:

* :func:`pseudonymise_predictions`: one row per card, with the pseudonyms anonymization gives the patient
  and the stay (the feedback path's own machinery, :func:`clinical_ml.core.clinician_feedback.with_pseudonyms`:
  vault or keyed HMAC, pairs or none, the opt-out register honoured), the model version, what the card said
  (``scored``, ``abstained``, ``not_eligible``), the risk, its band, whether it was at or above the operating
  threshold, the guardrail's reason code, and the real year-quarter it was served in. Nothing else crosses:
  no EHR id, hook instance, card uuid, time stamp, feature value or reason;
* :func:`service_requests`: one row per call answered, with its UTC day, route, status, milliseconds and the
  outcome's code (its kind only: ``auth``, not which check refused), for the system-health page. These carry
  no patient at all.

Both are rebuilt from the whole phi record each time: same records, same rows.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from clinical_ml.core.anonymization import Vault
from clinical_ml.core.clinician_feedback import BANDS, quarter, with_pseudonyms
from clinical_ml.core.pseudonyms import HmacKey

CARD_OUTCOMES = ("scored", "abstained", "not_eligible")
# guardrail reason codes of clinical_ml.core.scoring
REASON_CODES = ("ABSTAIN_OUT_OF_RANGE", "ABSTAIN_MISSINGNESS", "WARN_OUT_OF_RANGE", "WARN_MISSINGNESS")
SERVED_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "hadm_id": pl.Int64(),
    "model_version": pl.String(),
    "outcome": pl.String(),
    "risk": pl.Float64(),
    "risk_band": pl.String(),
    "flagged": pl.Boolean(),
    "reason_code": pl.String(),
    "period": pl.String(),
}
# the kinds of outcome code the service logs (clinical_ml.serve.app): anything else is "other"
REQUEST_OUTCOMES = (
    *CARD_OUTCOMES,
    "no_model",
    "no_encounter",
    "feedback",
    "bad_request",
    "bad_feedback",
    "bad_fhir",
    "prefetch_missing",
    "wrong_hook",
    "not_json",
    "too_large",
    "unknown_service",
    "auth",
    "error",
)
ROUTES = ("hook", "feedback")
REQUEST_SCHEMA: dict[str, pl.DataType] = {
    "day": pl.Date(),
    "route": pl.String(),
    "status": pl.Int32(),
    "ms": pl.Float64(),
    "outcome": pl.String(),
}


@dataclass(frozen=True)
class ServedRelease:
    """The de-identified served predictions and where every phi record went (counts only)."""

    frame: pl.DataFrame
    received: int = 0
    released: int = 0
    withheld_by_consent: int = 0
    without_pseudonym: int = 0  # released without subject_id/hadm_id: the vault does not know the stay yet

    def as_dict(self) -> dict[str, int]:
        return {f"served_{k}": v for k, v in self.__dict__.items() if k != "frame"}

    def sentence(self) -> str:
        return (
            f"{self.released} of {self.received} served predictions released ({self.withheld_by_consent} "
            f"withheld by consent); {self.without_pseudonym} released without pseudonyms (stay not yet known "
            "to the vault)."
        )


def _column(records: Sequence[dict], key: str) -> list:
    return [r.get(key) for r in records]


def _strings(values: list) -> list[str | None]:
    return [v if isinstance(v, str) else None for v in values]


def _numbers(values: list) -> list[float | None]:
    return [float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None for v in values]


def pseudonymise_predictions(
    predictions: Sequence[dict], *, vault: Vault, hmac_key: HmacKey | None, opted_out: pl.Series
) -> ServedRelease:
    """The service's prediction records as de-identified rows (:data:`SERVED_SCHEMA`), oldest first.

    Parameters
    ----------
    predictions
        The service's records (:mod:`clinical_ml.serve.records`), in any order; a card recorded twice
        counts once (the last record).
    vault, hmac_key, opted_out
        As for :func:`clinical_ml.core.clinician_feedback.pseudonymise_feedback`.
    """
    rows = pl.DataFrame(
        {
            "card_uuid": _strings(_column(predictions, "card_uuid")),
            "patient_id": _strings(_column(predictions, "patient_id")),
            "encounter_id": _strings(_column(predictions, "encounter_id")),
            "model_version": _strings(_column(predictions, "model_version")),
            "outcome": _strings(_column(predictions, "outcome")),
            "risk": _numbers(_column(predictions, "risk")),
            "indicator": _strings(_column(predictions, "indicator")),
            "flagged": [v if isinstance(v, bool) else None for v in _column(predictions, "flagged")],
            "reason_code": _strings(_column(predictions, "reason_code")),
            "served_at": _strings(_column(predictions, "served_at")),
        },
        schema={
            "card_uuid": pl.String,
            "patient_id": pl.String,
            "encounter_id": pl.String,
            "model_version": pl.String,
            "outcome": pl.String,
            "risk": pl.Float64,
            "indicator": pl.String,
            "flagged": pl.Boolean,
            "reason_code": pl.String,
            "served_at": pl.String,
        },
    )
    received = rows.height
    rows = rows.with_row_index("_order").unique("card_uuid", keep="last", maintain_order=True)
    rows, withheld = with_pseudonyms(rows, vault=vault, hmac_key=hmac_key, opted_out=opted_out)
    scored = pl.col("outcome") == "scored"
    out = rows.sort("served_at", "_order", nulls_last=True).select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("hadm_id").cast(pl.Int64),
        pl.col("model_version"),
        pl.when(pl.col("outcome").is_in(CARD_OUTCOMES)).then(pl.col("outcome")).otherwise(pl.lit("other")),
        pl.when(scored).then(pl.col("risk")).otherwise(None).alias("risk"),
        pl.when(scored & pl.col("indicator").is_in(BANDS)).then(pl.col("indicator")).alias("risk_band"),
        pl.when(scored).then(pl.col("flagged")).alias("flagged"),
        pl.when(pl.col("reason_code").is_in(REASON_CODES)).then(pl.col("reason_code")).alias("reason_code"),
        quarter(pl.col("served_at")).alias("period"),
    )
    out = out.cast(SERVED_SCHEMA)  # type: ignore[arg-type]
    return ServedRelease(
        frame=out,
        received=received,
        released=out.height,
        withheld_by_consent=withheld,
        without_pseudonym=int(out["subject_id"].is_null().sum()),
    )


def no_served_predictions() -> pl.DataFrame:
    return pl.DataFrame(schema=SERVED_SCHEMA)


def service_requests(records: Sequence[dict]) -> pl.DataFrame:
    """The calls the service answered (:data:`REQUEST_SCHEMA`), oldest first: route and outcome kept only
    as their controlled codes, a record that is not one (no status or time) left out."""
    rows = []
    for r in records:
        status, ms, at = r.get("status"), r.get("ms"), r.get("at")
        if not isinstance(status, int) or isinstance(status, bool) or not isinstance(at, str):
            continue
        kind = str(r.get("outcome") or "").partition(":")[0]
        route = r.get("route")
        rows.append(
            {
                "at": at,
                "route": route if route in ROUTES else "other",
                "status": status,
                "ms": float(ms) if isinstance(ms, int | float) and not isinstance(ms, bool) else None,
                "outcome": kind if kind in REQUEST_OUTCOMES else "other",
            }
        )
    frame = pl.DataFrame(
        rows,
        schema={
            "at": pl.String,
            "route": pl.String,
            "status": pl.Int32,
            "ms": pl.Float64,
            "outcome": pl.String,
        },
    )
    return (
        frame.with_columns(pl.col("at").str.to_datetime(time_zone="UTC", strict=False).alias("_t"))
        .filter(pl.col("_t").is_not_null())
        .sort("_t", maintain_order=True)
        .select(pl.col("_t").dt.date().alias("day"), "route", "status", "ms", "outcome")
        .cast(REQUEST_SCHEMA)  # type: ignore[arg-type]
    )
