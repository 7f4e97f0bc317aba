"""A CDS Hooks request for a stay given as landing-contract rows: what an EHR would send for it.

Used by the parity test (the batch path's raw rows rendered as FHIR must give the batch path's features), the
end-to-end test, the service bench and the documentation's curl example. Times are the landing contract's
naive site times, written with the site's offset.
"""

import uuid
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from clinical_ml.serve.chart import ADMISSION_TYPE_SYSTEM, LOINC, VITAL_LOINC, VITAL_SYSTEM
from clinical_ml.serve.fhir import UCUM

GENDER = {"F": "female", "M": "male", "U": "unknown"}
_LOINC_OF_VITAL = {name: loinc for loinc, name in reversed(list(VITAL_LOINC.items()))}


def _ts(t: datetime, tz: ZoneInfo) -> str:
    return t.replace(tzinfo=tz).isoformat(timespec="seconds")


def patient_resource(patient_id: str, *, birth_date: date, sex: str | None) -> dict:
    res: dict[str, Any] = {"resourceType": "Patient", "id": patient_id, "birthDate": birth_date.isoformat()}
    if sex is not None:
        res["gender"] = GENDER.get(sex, sex)
    return res


def encounter_resource(
    encounter_id: str,
    patient_id: str,
    *,
    admit_time: datetime,
    discharge_time: datetime | None = None,
    admission_type: str | None = None,
    unit: str | None = None,
    site: str | None = None,
    tz: ZoneInfo,
) -> dict:
    period = {"start": _ts(admit_time, tz)}
    if discharge_time is not None:
        period["end"] = _ts(discharge_time, tz)
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": encounter_id,
        "status": "finished" if discharge_time is not None else "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "period": period,
    }
    if admission_type is not None:
        res["type"] = [{"coding": [{"system": ADMISSION_TYPE_SYSTEM, "code": admission_type}]}]
    if unit is not None:
        res["location"] = [{"location": {"identifier": {"value": unit}, "display": unit}}]
    if site is not None:
        res["serviceProvider"] = {"identifier": {"value": site}}
    return res


def observation_resource(
    *,
    code: str,
    value: float,
    unit: str,
    taken: datetime,
    available: datetime | None,
    patient_id: str,
    encounter_id: str,
    lab: bool,
    tz: ZoneInfo,
) -> dict:
    if lab:
        coding = {"system": LOINC, "code": code}
    elif code in _LOINC_OF_VITAL:
        coding = {"system": LOINC, "code": _LOINC_OF_VITAL[code]}
    else:
        coding = {"system": VITAL_SYSTEM, "code": code}
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory" if lab else "vital-signs",
                    }
                ]
            }
        ],
        "code": {"coding": [coding]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "encounter": {"reference": f"Encounter/{encounter_id}"},
        "effectiveDateTime": _ts(taken, tz),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }
    if available is not None:
        res["issued"] = _ts(available, tz)
    return res


def bundle(resources: Iterable[dict]) -> dict:
    entries = [{"resource": r} for r in resources]
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


def hook_request(
    *,
    hook: str,
    patient: Mapping[str, Any],
    encounter: Mapping[str, Any],
    labs: Iterable[Mapping[str, Any]] = (),
    vitals: Iterable[Mapping[str, Any]] = (),
    other_encounters: Iterable[Mapping[str, Any]] = (),
    tz: ZoneInfo,
    patient_id: str = "example-patient",
    encounter_id: str = "example-encounter",
) -> dict:
    """A hook request with its prefetch, from landing-contract rows: ``patient`` (``birth_date``, ``sex``),
    ``encounter`` (``admit_time``, ``discharge_time``, ``admission_type``, ``unit``, ``site``), ``labs``
    (``loinc_code``, ``value``, ``unit``, ``specimen_time``, ``result_time``), ``vitals`` (``code``,
    ``value``, ``unit``, ``charted_time``, ``stored_time``) and the patient's other stays (``admit_time``)."""

    def enc(e: Mapping[str, Any], eid: str) -> dict:
        return encounter_resource(
            eid,
            patient_id,
            admit_time=e["admit_time"],
            discharge_time=e.get("discharge_time"),
            admission_type=e.get("admission_type"),
            unit=e.get("unit"),
            site=e.get("site"),
            tz=tz,
        )

    observations = [
        observation_resource(
            code=r["loinc_code"],
            value=r["value"],
            unit=r["unit"],
            taken=r["specimen_time"],
            available=r.get("result_time"),
            patient_id=patient_id,
            encounter_id=encounter_id,
            lab=True,
            tz=tz,
        )
        for r in labs
    ] + [
        observation_resource(
            code=r["code"],
            value=r["value"],
            unit=r["unit"],
            taken=r["charted_time"],
            available=r.get("stored_time"),
            patient_id=patient_id,
            encounter_id=encounter_id,
            lab=False,
            tz=tz,
        )
        for r in vitals
    ]
    this = enc(encounter, encounter_id)
    others = [enc(e, f"{encounter_id}-{i}") for i, e in enumerate(other_encounters, start=1)]
    return {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/example", "patientId": patient_id, "encounterId": encounter_id},
        "prefetch": {
            "patient": patient_resource(patient_id, birth_date=patient["birth_date"], sex=patient.get("sex")),
            "encounter": this,
            "observations": bundle(observations),
            "encounters": bundle([this, *others]),
        },
    }


def example_request(*, now: datetime | None = None, tz: ZoneInfo | None = None) -> dict:
    """A ``patient-view`` request for a made-up stay admitted 30 h before ``now`` (the documentation's curl
    example): a septic-looking day charted as an ICU charts it (vitals every hour, temperature and GCS every
    4 h, labs every 8 h, values that move), creatinine in umol/L. A model trained on an ICU's stays scores it, where a flat chart (the same
    value every time, vitals every 2 h) had most of its counts and extremes outside the derivation ranges and
    was answered "not scored"."""
    tz = tz or ZoneInfo("UTC")
    now = (now or datetime.now(tz)).astimezone(tz).replace(tzinfo=None, microsecond=0)
    admit = now - timedelta(hours=30)
    drift = (0.0, 0.6, 1.0, 0.4, -0.3, -0.8, -0.5, 0.2)  # a repeating wobble around each value
    labs = [
        {
            "loinc_code": code,
            "value": round(value + step * drift[k % len(drift)], 1),
            "unit": unit,
            "specimen_time": admit + timedelta(hours=h),
            "result_time": admit + timedelta(hours=h, minutes=45),
        }
        for k, h in enumerate((4, 12, 20, 28))
        for code, value, step, unit in (
            ("2160-0", 132.0, 12.0, "umol/L"),
            ("3094-0", 28.0, 3.0, "mg/dL"),
            ("2951-2", 137.0, 2.0, "mmol/L"),
            ("2823-3", 4.4, 0.4, "mmol/L"),
            ("2345-7", 160.0, 25.0, "mg/dL"),
            ("6690-2", 14.2, 2.0, "10*3/uL"),
            ("718-7", 10.1, 0.6, "g/dL"),
            ("777-3", 150.0, 20.0, "10*3/uL"),
            ("2524-7", 3.4, 0.8, "mmol/L"),
            ("1975-2", 1.4, 0.2, "mg/dL"),
        )
    ]
    vitals = [
        {
            "code": code,
            "value": round(value + step * drift[h % len(drift)], 1),
            "unit": unit,
            "charted_time": admit + timedelta(hours=h),
            "stored_time": admit + timedelta(hours=h, minutes=2),
        }
        for h in range(1, 30)
        for code, value, step, unit, every in (
            ("heart_rate", 108.0, 10.0, "/min", 1),
            ("systolic_bp", 102.0, 12.0, "mm[Hg]", 1),
            ("diastolic_bp", 56.0, 6.0, "mm[Hg]", 1),
            ("mean_bp", 71.0, 7.0, "mm[Hg]", 1),
            ("resp_rate", 24.0, 4.0, "/min", 1),
            ("spo2", 94.0, 2.5, "%", 1),
            ("temperature", 37.6, 0.6, "Cel", 4),
            ("gcs_total", 13.0, 1.0, "{score}", 4),
        )
        if h % every == 2 % every
    ]
    return hook_request(
        hook="patient-view",
        patient={"birth_date": date(1948, 2, 11), "sex": "M"},
        encounter={"admit_time": admit, "admission_type": "EMERGENCY", "unit": "MICU"},
        labs=labs,
        vitals=vitals,
        tz=tz,
    )


if __name__ == "__main__":
    import json

    print(json.dumps(example_request(), indent=1))
