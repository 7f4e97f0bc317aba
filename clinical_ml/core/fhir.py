"""Scored admissions as FHIR R4 ``RiskAssessment`` resources in NDJSON, for an EHR interface engine.

Each resource carries the risk (``prediction.probabilityDecimal``), the operating-point flag
(``prediction.qualitativeRisk``: high / not high), the model and its version (``method.coding``), the top
reasons and guardrail flags (``note``), the subject (the pseudonym, or the site's own patient id when the
export runs inside the PHI boundary) and the encounter. Resources are validated with ``fhir.resources``
(its R4B module: RiskAssessment is unchanged between R4 and R4B) before they are written.
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from fhir.resources.R4B.riskassessment import RiskAssessment

MODEL_SYSTEM = "urn:clinical-ml:model"
OUTCOME_SYSTEM = "urn:clinical-ml:outcome"
SUBJECT_SYSTEM_PSEUDONYM = "urn:clinical-ml:pseudonym"
SUBJECT_SYSTEM_SITE = "urn:site:mrn"  # default; a site sets its own (its MRN's identifier system)


@dataclass(frozen=True)
class ScoredAdmission:
    """One admission's score, ready for delivery (no identifiers beyond the subject and encounter ids)."""

    subject_id: str
    encounter_id: str
    prediction_time: datetime
    risk: float
    flagged: bool
    reasons: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()


def _iso(ts: datetime) -> str:
    return (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()


def risk_assessment(
    row: ScoredAdmission,
    *,
    use_case: str,
    outcome: str,
    model_version: str,
    threshold: float,
    subject_system: str = SUBJECT_SYSTEM_PSEUDONYM,
    outcome_text: str | None = None,
    clinical_action: str | None = None,
) -> dict:
    """One validated ``RiskAssessment`` as a JSON-ready dict; a flagged admission carries the use case's
    ``clinical_action`` (what the team does at the operating point) as its ``mitigation``.

    Raises
    ------
    pydantic.ValidationError
        When the resource does not conform to FHIR (the message names fields, never values).
    """
    notes = [{"text": f"Top reasons: {'; '.join(row.reasons)}"}] if row.reasons else []
    if row.flags:
        notes.append({"text": f"Guardrail flags: {', '.join(row.flags)}"})
    notes.append({"text": f"Operating threshold {threshold:.4f}; flagged = risk at or above it."})
    resource = {
        "resourceType": "RiskAssessment",
        "status": "final",
        "identifier": [
            {
                "system": f"{MODEL_SYSTEM}:{use_case}",
                # one per encounter and prediction time (a use case may predict a stay several times)
                "value": f"{row.encounter_id}-{model_version}-{_iso(row.prediction_time)}",
            }
        ],
        "method": {
            "coding": [{"system": MODEL_SYSTEM, "code": use_case, "version": model_version}],
            "text": f"clinical_ml model {use_case} version {model_version}",
        },
        "subject": {
            "reference": f"Patient/{row.subject_id}",
            "identifier": {"system": subject_system, "value": row.subject_id},
        },
        "encounter": {"reference": f"Encounter/{row.encounter_id}"},
        "occurrenceDateTime": _iso(row.prediction_time),
        "prediction": [
            {
                "outcome": {
                    "coding": [{"system": OUTCOME_SYSTEM, "code": outcome}],
                    "text": outcome_text or outcome,
                },
                "probabilityDecimal": round(float(row.risk), 6),
                "qualitativeRisk": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/risk-probability",
                            "code": "high" if row.flagged else "low",
                        }
                    ],
                    "text": "at or above the operating threshold" if row.flagged else "below the threshold",
                },
            }
        ],
        "note": notes,
    }
    if row.flagged and clinical_action:
        resource["mitigation"] = clinical_action
    return json.loads(RiskAssessment.model_validate(resource).model_dump_json(exclude_none=True))


def write_ndjson(
    rows: Iterable[ScoredAdmission],
    path: Path,
    *,
    use_case: str,
    outcome: str,
    model_version: str,
    threshold: float,
    subject_ids: Mapping[str, str] | None = None,
    subject_system: str = SUBJECT_SYSTEM_PSEUDONYM,
    outcome_text: str | None = None,
    clinical_action: str | None = None,
) -> int:
    """Write one validated resource per line; returns how many were written.

    ``subject_ids`` maps pseudonyms to the site's own ids (with the site's ``subject_system``) when the
    export is delivered inside the PHI boundary; without it the pseudonym is the subject.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            if subject_ids is not None:
                row = ScoredAdmission(**{**row.__dict__, "subject_id": subject_ids[row.subject_id]})
            res = risk_assessment(
                row,
                use_case=use_case,
                outcome=outcome,
                outcome_text=outcome_text,
                model_version=model_version,
                threshold=threshold,
                subject_system=subject_system,
                clinical_action=clinical_action,
            )
            f.write(json.dumps(res, separators=(",", ":")) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_ndjson(path: Path) -> list[RiskAssessment]:
    """Parse and validate every line of an NDJSON export."""
    return [RiskAssessment.model_validate_json(line) for line in path.read_text().splitlines() if line]


def reidentify_for_ehr(
    predictions: pl.DataFrame, vault_patients: pl.DataFrame, vault_encounters: pl.DataFrame
) -> pl.DataFrame:
    """Inside the PHI boundary only: scored admissions back to the site's own patient and encounter ids,
    and the prediction time back to the hospital's clock (de-identified times are shifted per patient), so
    the EHR can file each result against the right chart.

    ``predictions`` has ``subject_id``, ``hadm_id`` and ``prediction_time`` (de-identified); the vault
    frames map ``subject_id`` to ``mrn`` and ``shift_days``, ``hadm_id`` to ``encounter_id``. The result has
    ``mrn``, ``encounter_id`` and the real ``prediction_time`` in place of the pseudonyms.

    Raises
    ------
    ValueError
        When a scored admission has no vault entry (counts only: no identifier in the message).
    """
    out = predictions.join(
        vault_patients.select("subject_id", "mrn", "shift_days"), on="subject_id", how="left"
    ).join(
        vault_encounters.select("hadm_id", pl.col("encounter_id").alias("site_encounter_id")),
        on="hadm_id",
        how="left",
    )
    missing = out.filter(pl.col("mrn").is_null() | pl.col("site_encounter_id").is_null()).height
    if missing:
        raise ValueError(
            f"{missing} of {out.height} scored admissions have no entry in the pseudonym vault: "
            "cannot deliver them under the site's ids"
        )
    return (
        out.with_columns(
            (pl.col("prediction_time") - pl.duration(days=pl.col("shift_days"))).alias("prediction_time")
        )
        .drop("subject_id", "hadm_id", "shift_days")
        .rename({"site_encounter_id": "encounter_id"})
    )
