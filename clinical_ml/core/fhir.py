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

from fhir.resources.R4B.riskassessment import RiskAssessment

MODEL_SYSTEM = "urn:clinical-ml:model"
OUTCOME_SYSTEM = "urn:clinical-ml:outcome"
SUBJECT_SYSTEM_PSEUDONYM = "urn:clinical-ml:pseudonym"


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
) -> dict:
    """One validated ``RiskAssessment`` as a JSON-ready dict.

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
            {"system": f"{MODEL_SYSTEM}:{use_case}", "value": f"{row.encounter_id}-{model_version}"}
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
                "outcome": {"coding": [{"system": OUTCOME_SYSTEM, "code": outcome}], "text": outcome},
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
                model_version=model_version,
                threshold=threshold,
                subject_system=subject_system,
            )
            f.write(json.dumps(res, separators=(",", ":")) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_ndjson(path: Path) -> list[RiskAssessment]:
    """Parse and validate every line of an NDJSON export."""
    return [RiskAssessment.model_validate_json(line) for line in path.read_text().splitlines() if line]
