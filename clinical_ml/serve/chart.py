"""One patient's chart from a CDS Hooks prefetch (FHIR R4), as the frames the batch path computes features from.

The prefetch is parsed and validated with ``fhir.resources`` (its R4B models: Patient, Encounter, Observation
and Bundle read R4 resources unchanged), then every value takes the batch path's road, by the batch path's
own code, so that :func:`clinical_ml.core.features.build_features` gives the features the model was trained
on (no training-serving skew):

- codes: labs by their LOINC in the vocabulary (``vocabulary.yaml``), vital signs by the LOINC of
  :data:`VITAL_LOINC` or by name under :data:`VITAL_SYSTEM`; any other Observation is not used;
- units: ingestion's harmonisation (the same conversion into the canonical unit and the same implausible
  flag); a value in a unit the vocabulary does not know is not used, as ingestion rejects its row;
- coded values (sex, admission type, unit, site): the site mapping, as at the anonymization boundary;
- age: the anonymizer's ``age_in_years`` (capped at 90);
- events in MEDS form with ``numeric_value`` as Float32, as the anonymizer writes them.

Identifiers stay in memory: the frames carry placeholder keys (subject 1, stay 1), never the EHR's ids, and
errors name the place in the prefetch (``prefetch.observations.entry.3.resource.valueQuantity``), never a
value.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.encounter import Encounter
from fhir.resources.R4B.patient import Patient
from pydantic import BaseModel, ValidationError

from clinical_ml.core.anonymization import age_in_years
from clinical_ml.core.ingestion import _harmonize_units  # the batch path's unit rule, reused as is
from clinical_ml.core.site_mapping import SiteMapping, enforce_controlled_values
from clinical_ml.core.units import LAB_CODES, VITAL_CODES

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
# Vital signs without a LOINC below, or a site's own charting, are sent under this system by vocabulary name.
VITAL_SYSTEM = "urn:clinical-ml:vital"
ADMISSION_TYPE_SYSTEM = "urn:clinical-ml:admission-type"
ACT_PRIORITY = "http://terminology.hl7.org/CodeSystem/v3-ActPriority"
# HL7 v3 ActPriority of an Encounter -> the contract's admission type
PRIORITY_ADMISSION_TYPE = {"EM": "EMERGENCY", "UR": "URGENT", "EL": "ELECTIVE", "R": "ELECTIVE"}
# LOINC of the FHIR vital-signs profile (and common ICU codes) -> vocabulary vital
VITAL_LOINC: dict[str, str] = {
    "8867-4": "heart_rate",
    "8480-6": "systolic_bp",
    "8462-4": "diastolic_bp",
    "8478-0": "mean_bp",
    "9279-1": "resp_rate",
    "59408-5": "spo2",
    "2708-6": "spo2",
    "8310-5": "temperature",
    "9269-2": "gcs_total",
    "29463-7": "weight",
    "8302-2": "height",
}
# Results a clinician may act on; preliminary, cancelled and entered-in-error ones are not used.
USABLE_STATUS = frozenset({"final", "amended", "corrected"})
SUBJECT, STAY = 1, 1  # placeholder keys of the patient and the stay in the frames (never the EHR's ids)

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
    "hadm_id": pl.Int64(),
    "available_time": pl.Datetime("us"),
    "implausible": pl.Boolean(),
}


@dataclass(frozen=True)
class Issue:
    """One problem with a request: where (a path into the request) and what (a code), never a value."""

    location: str
    code: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"location": self.location, "code": self.code, "detail": self.detail}


class PrefetchError(ValueError):
    """The prefetch cannot be read as the FHIR the service needs (HTTP 400, or 412 when data are missing)."""

    def __init__(self, issues: list[Issue], *, missing: bool = False) -> None:
        super().__init__("; ".join(f"{i.location}: {i.detail}" for i in issues))
        self.issues = issues
        self.missing = missing


@dataclass(frozen=True)
class Chart:
    """A patient's stay as the batch path's frames, with counts of what was not used (no values)."""

    cohort: pl.DataFrame  # one row: subject_id, hadm_id, prediction_time, admit_time, static attributes
    events: pl.DataFrame  # MEDS events of the stay (EVENT_SCHEMA)
    encounters: pl.DataFrame  # the patient's stays (subject_id, hadm_id, admit_time) for history features
    not_used: dict[str, int] = field(default_factory=dict)  # observations left out, by reason

    @property
    def hours_since_admission(self) -> float:
        row = self.cohort.row(0, named=True)
        return (row["prediction_time"] - row["admit_time"]).total_seconds() / 3600.0


def _validation_issues(exc: ValidationError, where: str) -> list[Issue]:
    # the location and the error type only: pydantic's message may quote the input, which is patient data
    return [
        Issue(
            ".".join([where, *(str(p) for p in e["loc"])]),
            "invalid",
            f"not valid FHIR R4 ({e['type']})",
        )
        for e in exc.errors()[:20]
    ]


def _parse(model: type[BaseModel], raw: Any, where: str) -> Any:
    name = model.__name__
    if not isinstance(raw, dict):
        raise PrefetchError([Issue(where, "structure", f"expected a FHIR {name} object")])
    if raw.get("resourceType") != name:
        raise PrefetchError([Issue(f"{where}.resourceType", "invalid", f"expected resourceType {name}")])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise PrefetchError(_validation_issues(exc, where)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # fhir.resources raises a few of its own
        raise PrefetchError([Issue(where, "invalid", f"not valid FHIR R4 ({type(exc).__name__})")]) from None


def site_clock(ts: datetime | date | None, tz: ZoneInfo) -> datetime | None:
    """A FHIR dateTime on the site's clock, naive like the landing contract's times; a date alone (no time)
    is None: it cannot place a value before or after the prediction time."""
    if not isinstance(ts, datetime):
        return None
    if ts.tzinfo is not None:
        try:
            ts = ts.astimezone(tz).replace(tzinfo=None)
        except OverflowError:  # 0001-01-01T00:30:00+01:00 is before the first representable instant
            return None
    return ts


def _ref_id(reference: Any, resource_type: str) -> str | None:
    ref = getattr(reference, "reference", None) or ""
    kind, _, rid = ref.rpartition("/")
    return rid if kind.endswith(resource_type) and rid else None


def _measurement_code(obs: Any) -> str | None:
    """The vocabulary code of an Observation (a LOINC lab, or a vital name), None when it is not one."""
    for coding in (obs.code.coding or []) if obs.code else []:
        system, code = coding.system or "", coding.code or ""
        if system == LOINC and code in LAB_CODES:
            return code
        if system == LOINC and code in VITAL_LOINC:
            return VITAL_LOINC[code]
        if system == VITAL_SYSTEM and code in VITAL_CODES:
            return code
    return None


def _effective(obs: Any) -> Any:
    if obs.effectiveDateTime is not None:
        return obs.effectiveDateTime
    if obs.effectiveInstant is not None:
        return obs.effectiveInstant
    if obs.effectivePeriod is not None:
        return obs.effectivePeriod.start
    return None


def _admission_type(enc: Any) -> str | None:
    for concept in enc.type or []:
        for coding in concept.coding or []:
            if coding.system == ADMISSION_TYPE_SYSTEM and coding.code:
                return str(coding.code)
    for coding in (enc.priority.coding or []) if enc.priority else []:
        if coding.system == ACT_PRIORITY and coding.code in PRIORITY_ADMISSION_TYPE:
            return PRIORITY_ADMISSION_TYPE[coding.code]
    return None


def _unit(enc: Any) -> str | None:
    """The stay's unit: the first location's identifier, else its display (the site's unit code)."""
    for loc in enc.location or []:
        ref = loc.location
        ident = getattr(ref, "identifier", None)
        if ident is not None and ident.value:
            return str(ident.value)
        if ref is not None and ref.display:
            return str(ref.display)
    return None


def _site(enc: Any) -> str | None:
    ref = enc.serviceProvider
    if ref is None:
        return None
    if ref.identifier is not None and ref.identifier.value:
        return str(ref.identifier.value)
    return str(ref.display) if ref.display else None


def _observation_rows(
    bundle: Any, *, encounter_id: str | None, tz: ZoneInfo
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rows: list[dict[str, Any]] = []
    not_used: dict[str, int] = {}

    def skip(reason: str) -> None:
        not_used[reason] = not_used.get(reason, 0) + 1

    for entry in bundle.entry or []:
        obs = entry.resource
        if obs is None or obs.get_resource_type() != "Observation":
            continue  # a search Bundle may carry an OperationOutcome or included resources
        code = _measurement_code(obs)
        if code is None:
            skip("code_not_in_vocabulary")
            continue
        if obs.status not in USABLE_STATUS:
            skip("status_not_final")
            continue
        enc_id = _ref_id(obs.encounter, "Encounter")
        if obs.encounter is not None and encounter_id is not None and enc_id != encounter_id:
            skip("other_encounter")
            continue
        q = obs.valueQuantity
        if q is None or q.value is None:
            skip("no_numeric_value")
            continue
        taken = site_clock(_effective(obs), tz)
        if taken is None:
            skip("no_time")
            continue
        issued = site_clock(obs.issued, tz) if obs.issued is not None else None
        available = issued or taken
        if available < taken:
            skip("result_before_specimen")
            continue
        unit = q.code if (q.system == UCUM and q.code) else (q.unit or q.code)
        rows.append(
            {"code": code, "value": float(q.value), "unit": unit, "time": taken, "available_time": available}
        )
    return rows, not_used


def _events(rows: list[dict[str, Any]], not_used: dict[str, int]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema=EVENT_SCHEMA)
    raw = pl.DataFrame(
        rows,
        schema={
            "code": pl.String,
            "value": pl.Float64,
            "unit": pl.String,
            "time": pl.Datetime("us"),
            "available_time": pl.Datetime("us"),
        },
    )
    harmonized = _harmonize_units(raw, "code")
    unknown = int((~harmonized["unit_known"]).sum())
    if unknown:
        not_used["unknown_unit"] = not_used.get("unknown_unit", 0) + unknown
    # ingestion's duplicate rule among the rows it accepts: an identical repeat of a result is one result;
    # results of one code at one time that differ are all left out (which one is right is unknown)
    kept = harmonized.filter(pl.col("unit_known")).unique(
        ["code", "time", "value_raw", "unit_raw", "available_time"], keep="first", maintain_order=True
    )
    conflicting = pl.len().over("code", "time") > 1
    n_conflicting = int(kept.select(conflicting.sum()).item())
    if n_conflicting:
        not_used["conflicting_duplicate"] = n_conflicting
        kept = kept.filter(~conflicting)
    prefix = pl.when(pl.col("code").is_in(list(LAB_CODES))).then(pl.lit("LAB//")).otherwise(pl.lit("VITAL//"))
    return kept.select(
        pl.lit(SUBJECT, dtype=pl.Int64).alias("subject_id"),
        "time",
        (prefix + pl.col("code")).alias("code"),
        pl.col("value").cast(pl.Float32).alias("numeric_value"),
        pl.lit(STAY, dtype=pl.Int64).alias("hadm_id"),
        "available_time",
        "implausible",
    )


def _other_stays(raw: Any, *, current: str | None, tz: ZoneInfo) -> list[datetime]:
    bundle = _parse(Bundle, raw, "prefetch.encounters")
    starts = []
    for entry in bundle.entry or []:
        enc = entry.resource
        if enc is None or enc.get_resource_type() != "Encounter" or (current and enc.id == current):
            continue
        start = site_clock(enc.period.start, tz) if enc.period is not None else None
        if start is not None:
            starts.append(start)
    return starts


def _require(prefetch: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if prefetch.get(k) is None]
    if missing:
        raise PrefetchError(
            [
                Issue(f"prefetch.{k}", "required", "the service needs this prefetch (see discovery)")
                for k in missing
            ],
            missing=True,
        )


def chart_from_prefetch(
    prefetch: Mapping[str, Any],
    *,
    context: Mapping[str, Any],
    prediction_time: datetime,
    site_mapping: SiteMapping,
    tz: ZoneInfo,
    with_history: bool = False,
) -> Chart:
    """The stay of ``context.encounterId`` as the batch path's frames, predicted at ``prediction_time``
    (naive, on the site's clock).

    Raises
    ------
    PrefetchError
        A prefetch the service needs is absent (``missing``: HTTP 412) or is not the FHIR expected (400),
        or the resources do not belong to the context's patient and encounter.
    """
    _require(prefetch, ("patient", "encounter", "observations", *(("encounters",) if with_history else ())))
    patient = _parse(Patient, prefetch["patient"], "prefetch.patient")
    encounter = _parse(Encounter, prefetch["encounter"], "prefetch.encounter")
    observations = _parse(Bundle, prefetch["observations"], "prefetch.observations")
    issues = []
    if context.get("patientId") and patient.id and patient.id != context["patientId"]:
        issues.append(Issue("prefetch.patient.id", "conflict", "is not the patient of the hook's context"))
    if context.get("encounterId") and encounter.id and encounter.id != context["encounterId"]:
        issues.append(
            Issue("prefetch.encounter.id", "conflict", "is not the encounter of the hook's context")
        )
    subject = _ref_id(encounter.subject, "Patient")
    if encounter.subject is not None and patient.id and subject != patient.id:
        issues.append(
            Issue("prefetch.encounter.subject", "conflict", "does not reference the prefetch's patient")
        )
    admit = site_clock(encounter.period.start, tz) if encounter.period is not None else None
    if admit is None:
        issues.append(Issue("prefetch.encounter.period.start", "required", "the stay's start date and time"))
    if patient.birthDate is None:
        issues.append(Issue("prefetch.patient.birthDate", "required", "needed for the patient's age"))
    if issues:
        raise PrefetchError(issues)
    assert admit is not None
    rows, not_used = _observation_rows(observations, encounter_id=encounter.id, tz=tz)
    events = _events(rows, not_used)

    patients = enforce_controlled_values(
        pl.DataFrame({"sex": [patient.gender]}, schema={"sex": pl.String}), "patients", site_mapping
    )[0]
    stays = enforce_controlled_values(
        pl.DataFrame(
            {
                "admission_type": [_admission_type(encounter)],
                "unit": [_unit(encounter)],
                "site": [_site(encounter)],
            },
            schema={"admission_type": pl.String, "unit": pl.String, "site": pl.String},
        ),
        "encounters",
        site_mapping,
    )[0]
    birth = patient.birthDate if isinstance(patient.birthDate, date) else None
    cohort = (
        pl.DataFrame(
            {
                "subject_id": [SUBJECT],
                "hadm_id": [STAY],
                "prediction_time": [prediction_time],
                "admit_time": [admit],
                "birth_date": [birth],
            },
            schema={
                "subject_id": pl.Int64,
                "hadm_id": pl.Int64,
                "prediction_time": pl.Datetime("us"),
                "admit_time": pl.Datetime("us"),
                "birth_date": pl.Date,
            },
        )
        .with_columns(
            age_in_years(pl.col("birth_date"), pl.col("admit_time")).alias("age_years"),
            pl.lit(patients["sex"][0], dtype=pl.String).alias("sex"),
            *[pl.lit(stays[c][0], dtype=pl.String).alias(c) for c in ("admission_type", "unit", "site")],
        )
        .drop("birth_date")
    )
    starts = [admit]
    if with_history:
        starts += _other_stays(prefetch["encounters"], current=encounter.id, tz=tz)
    encounters = pl.DataFrame(
        {
            "subject_id": [SUBJECT] * len(starts),
            "hadm_id": list(range(STAY, STAY + len(starts))),
            "admit_time": starts,
        },
        schema={"subject_id": pl.Int64, "hadm_id": pl.Int64, "admit_time": pl.Datetime("us")},
    )
    return Chart(cohort=cohort, events=events, encounters=encounters, not_used=not_used)
