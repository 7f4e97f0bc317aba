"""One patient's chart from a CDS Hooks prefetch (FHIR R4), as the frames the batch path computes features from.

The prefetch is read by :mod:`clinical_ml.serve.fhir`, a strict reader of the elements used here (FHIR R4's
datatype rules, element names, required elements), then every value takes the batch path's road, so that
the batch path's feature code (:func:`clinical_ml.core.features.stem_aggregates`) gives the features the
model was trained on (no training-serving skew):

- codes: labs by their LOINC in the vocabulary (``vocabulary.yaml``), vital signs by the LOINC of
  :data:`VITAL_LOINC` or by name under :data:`VITAL_SYSTEM`; any other Observation is not used;
- units: ingestion's harmonisation rule (the vocabulary's affine conversions into the canonical unit and its
  plausible ranges), applied per value as ingestion applies it per column; a test holds the two equal for
  every unit the vocabulary knows. A value in a unit the vocabulary does not know is not used, as ingestion
  rejects its row; so is a value with a comparator (``<0.5``: not a measured number);
- duplicates: ingestion's rule (an identical repeat is one result; results of one code at one time that
  differ are all left out);
- coded values (sex, admission type, unit, site): the site mapping, as at the anonymization boundary
  (:class:`CodedValues`, which remembers the answers for values seen before);
- age: the anonymizer's ``age_in_years`` (capped at 90);
- events in MEDS form with ``numeric_value`` as Float32, as the anonymizer writes them.

Identifiers stay in memory: the frames carry placeholder keys (subject 1, stay 1), never the EHR's ids, and
errors name the place in the prefetch (``prefetch.observations.entry.3.resource.valueQuantity``), never a
value.
"""

import threading
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl

from clinical_ml.core.anonymization import AGE_CAP
from clinical_ml.core.site_mapping import SiteMapping, enforce_controlled_values
from clinical_ml.core.units import LAB_CODES, PLAUSIBLE_RANGES, UNIT_CONVERSIONS, VITAL_CODES, canonical_unit
from clinical_ml.serve.fhir import (
    EncounterFacts,
    Issue,
    ObservationFacts,
    PrefetchError,
    ReferenceFacts,
    bundle_resources,
    read_encounter,
    read_observation,
    read_patient,
    reference_id,
    remember,
    short,
)

__all__ = ["Issue", "PrefetchError"]  # named here too: callers read them as the chart's errors

LOINC = "http://loinc.org"
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

COHORT_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "hadm_id": pl.Int64(),
    "prediction_time": pl.Datetime("us"),
    "admit_time": pl.Datetime("us"),
    "age_years": pl.Int32(),
    "sex": pl.String(),
    "admission_type": pl.String(),
    "unit": pl.String(),
    "site": pl.String(),
}


# One measurement of the stay as the anonymizer writes it: MEDS code, time, available time, numeric value
# (a Float32 value), implausible.
Measurement = tuple[str, datetime, datetime, float, bool]


@dataclass(frozen=True)
class Chart:
    """A patient's stay as the batch path sees it, with counts of what was not used (no values).

    ``stay`` is the cohort row (placeholder keys, prediction and admission times, age, coded attributes),
    ``measurements`` the stay's MEDS events, ``admissions`` the start of this and the patient's other stays;
    :attr:`cohort`, :attr:`events` and :attr:`encounters` are the same as the batch path's frames.
    """

    stay: dict[str, Any]
    measurements: tuple[Measurement, ...]
    admissions: tuple[datetime, ...]
    not_used: dict[str, int] = field(default_factory=dict)  # observations left out, by reason

    @property
    def prediction_time(self) -> datetime:
        return self.stay["prediction_time"]

    @property
    def hours_since_admission(self) -> float:
        return (self.stay["prediction_time"] - self.stay["admit_time"]).total_seconds() / 3600.0

    @cached_property
    def cohort(self) -> pl.DataFrame:
        """One row: subject_id, hadm_id, prediction_time, admit_time, age_years and the coded attributes."""
        return pl.DataFrame({k: [v] for k, v in self.stay.items()}, schema=COHORT_SCHEMA)

    @cached_property
    def events(self) -> pl.DataFrame:
        """The stay's MEDS events (:data:`EVENT_SCHEMA`)."""
        m = self.measurements
        return pl.DataFrame(
            {
                "subject_id": [SUBJECT] * len(m),
                "time": [e[1] for e in m],
                "code": [e[0] for e in m],
                "numeric_value": [e[3] for e in m],
                "hadm_id": [STAY] * len(m),
                "available_time": [e[2] for e in m],
                "implausible": [e[4] for e in m],
            },
            schema=EVENT_SCHEMA,
        )

    @cached_property
    def encounters(self) -> pl.DataFrame:
        """The patient's stays (subject_id, hadm_id, admit_time), this one first, for history features."""
        starts = list(self.admissions)
        return pl.DataFrame(
            {
                "subject_id": [SUBJECT] * len(starts),
                "hadm_id": list(range(STAY, STAY + len(starts))),
                "admit_time": starts,
            },
            schema={"subject_id": pl.Int64, "hadm_id": pl.Int64, "admit_time": pl.Datetime("us")},
        )


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


# ingestion's unit rule (clinical_ml.core.ingestion._harmonize_units), per value ------------------------------
# (code, delivered unit) -> (a, b) of the affine conversion value * a + b into the canonical unit, read off
# the vocabulary's functions exactly as ingestion reads them
_CONVERSIONS: dict[tuple[str, str], tuple[float, float]] = {
    key: (fn(1.0) - fn(0.0), fn(0.0)) for key, fn in UNIT_CONVERSIONS.items()
}
_CANONICAL: dict[str, str] = {c: canonical_unit(c) for c in (*LAB_CODES, *VITAL_CODES)}
_PLAUSIBLE: dict[str, tuple[float, float]] = {
    c: (float(PLAUSIBLE_RANGES[c][0]), float(PLAUSIBLE_RANGES[c][1])) for c in _CANONICAL
}


def harmonized(code: str, value: float, unit: str | None) -> tuple[float, bool] | None:
    """A value of a vocabulary code in its canonical unit and whether it is implausible (outside the code's
    plausible range), as ingestion harmonizes it; None when the vocabulary does not know the unit."""
    conversion = _CONVERSIONS.get((code, unit)) if unit is not None else None
    if conversion is not None:
        v = value * conversion[0] + conversion[1]
    elif unit is not None and unit == _CANONICAL.get(code):
        v = value
    else:
        return None
    lo, hi = _PLAUSIBLE[code]
    return v, bool(v < lo or v > hi)


def age_years(birth: date | None, at: datetime) -> int | None:
    """Completed years from ``birth`` to ``at``, capped at 90: the anonymizer's ``age_in_years`` for one
    stay (a test holds the two equal)."""
    if birth is None:
        return None
    had_birthday = (at.month, at.day) >= (birth.month, birth.day)
    return min(at.year - birth.year - (0 if had_birthday else 1), AGE_CAP)


class CodedValues:
    """The site mapping's recoding of a stay's coded values (:func:`enforce_controlled_values`, as at the
    anonymization boundary), remembered for values seen before: a hospital has few sexes, admission types,
    units and sites, and recoding one value through polars costs more than the rest of a hook call."""

    def __init__(self, mapping: SiteMapping, *, remember: int = 4096) -> None:
        self.mapping = mapping
        self._seen: OrderedDict[tuple, tuple[str | None, ...]] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    def _recode(self, source: str, values: dict[str, str | None]) -> tuple[str | None, ...]:
        key = (source, *values.items())
        # only short values are remembered: a request cannot fill the memory with long text
        keep = short(*values.values())
        with self._lock:
            found = self._seen.get(key) if keep else None
            if found is not None:
                self._seen.move_to_end(key)
                return found
        frame = pl.DataFrame({k: [v] for k, v in values.items()}, schema={k: pl.String for k in values})
        out = enforce_controlled_values(frame, source, self.mapping)[0]
        recoded = tuple(out[k][0] for k in values)
        if keep:
            with self._lock:
                self._seen[key] = recoded
                while len(self._seen) > self._remember:
                    self._seen.popitem(last=False)
        return recoded

    def sex(self, gender: str | None) -> str | None:
        return self._recode("patients", {"sex": gender})[0]

    def stay(
        self, *, admission_type: str | None, unit: str | None, site: str | None
    ) -> tuple[str | None, ...]:
        return self._recode("encounters", {"admission_type": admission_type, "unit": unit, "site": site})


def _measurement_code(codings: list[tuple[str | None, str | None]]) -> str | None:
    """The vocabulary code of an Observation (a LOINC lab, or a vital name), None when it is not one."""
    for system, code in codings:
        if system == LOINC and code in LAB_CODES:
            return code
        if system == LOINC and code in VITAL_LOINC:
            return VITAL_LOINC[code]
        if system == VITAL_SYSTEM and code in VITAL_CODES:
            return code
    return None


def _admission_type(enc: EncounterFacts) -> str | None:
    for system, code in enc.types:
        if system == ADMISSION_TYPE_SYSTEM and code:
            return code
    for system, code in enc.priority:
        if system == ACT_PRIORITY and code in PRIORITY_ADMISSION_TYPE:
            return PRIORITY_ADMISSION_TYPE[code]
    return None


def _unit(enc: EncounterFacts) -> str | None:
    """The stay's unit: the first location's identifier, else its display (the site's unit code)."""
    for ref in enc.locations:
        if ref.identifier:
            return ref.identifier
        if ref.display:
            return ref.display
    return None


def _site(ref: ReferenceFacts | None) -> str | None:
    if ref is None:
        return None
    return ref.identifier or ref.display


Row = tuple[str, float, str | None, datetime, datetime]  # code, value, unit, taken, available


def read_observations(raw: Any, where: str) -> list[ObservationFacts]:
    """The Observations of a search Bundle, in order (a search Bundle may carry an OperationOutcome or
    included resources: they are skipped)."""
    return [
        read_observation(res, place)
        for place, kind, res in bundle_resources(raw, where)
        if kind == "Observation"
    ]


# The vocabulary code of the codings seen before (a hospital sends few distinct ones; short strings only, and
# emptied when full, so that a request cannot fill the memory).
_CODE_OF: dict[tuple, str | None] = {}


def _code_of(codings: list[tuple[str | None, str | None]]) -> str | None:
    key = tuple(codings)
    try:
        return _CODE_OF[key]
    except KeyError:
        pass
    code = _measurement_code(codings)
    if all(short(s, c) for s, c in key):
        remember(_CODE_OF, key, code)
    return code


def _observation_rows(
    found: list[ObservationFacts], *, encounter_id: str | None, tz: ZoneInfo, mapping: SiteMapping
) -> tuple[list[Row], dict[str, int]]:
    rows: list[Row] = []
    not_used: dict[str, int] = {}

    def skip(reason: str) -> None:
        not_used[reason] = not_used.get(reason, 0) + 1

    # the site's own spellings of units (e.g. "?F" for [degF]), replaced as ingestion replaces them
    lab_units = mapping.measurement_units.get("labs", {})  # type: ignore[call-overload]
    vital_units = mapping.measurement_units.get("vitals", {})  # type: ignore[call-overload]
    # the Observations of a stay share a few times and one encounter: each converted or compared once
    clock: dict[datetime | None, datetime | None] = {}
    same_encounter: dict[ReferenceFacts, bool] = {}
    for obs in found:
        if obs.modifier_extension:
            skip("modifier_extension")  # may change what the Observation means: not used
            continue
        code = _code_of(obs.codings)
        if code is None:
            skip("code_not_in_vocabulary")
            continue
        if obs.status not in USABLE_STATUS:
            skip("status_not_final")
            continue
        enc = obs.encounter
        if enc is not None and encounter_id is not None:
            here = same_encounter.get(enc)
            if here is None:
                here = same_encounter[enc] = reference_id(enc, "Encounter") == encounter_id
            if not here:
                skip("other_encounter")
                continue
        if obs.value is None:
            skip("no_numeric_value")
            continue
        if obs.comparator is not None:
            skip("value_with_comparator")
            continue
        effective = obs.effective
        try:
            taken = clock[effective]
        except KeyError:
            taken = clock[effective] = site_clock(effective, tz)
        if taken is None:
            skip("no_time")
            continue
        issued = obs.issued
        if issued is not None:
            try:
                available = clock[issued]
            except KeyError:
                available = clock[issued] = site_clock(issued, tz)
            available = available or taken
        else:
            available = taken
        lab = code in LAB_CODES
        if available < taken:
            # ingestion's rule: refused beyond the site's declared clock skew, else known when measured
            rule = "result_before_specimen" if lab else "stored_before_charted"
            skew = mapping.clock_skew_minutes.get(rule, 0)  # type: ignore[call-overload]
            if available < taken - timedelta(minutes=skew):
                skip(rule)
                continue
            available = taken
        unit = obs.unit
        if unit is not None:
            unit = (lab_units if lab else vital_units).get(unit, unit)
        rows.append((code, obs.value, unit, taken, available))
    return rows, not_used


def _measurements(rows: list[Row], not_used: dict[str, int]) -> tuple[Measurement, ...]:
    unknown = 0
    seen: set[Row] = set()
    kept: list[tuple[str, datetime, float, bool, datetime]] = []
    conversions, canonical, plausible = _CONVERSIONS, _CANONICAL, _PLAUSIBLE
    for row in rows:
        code, value, unit, taken, available = row
        # harmonized(code, value, unit), inline (one call per Observation was a sixth of this loop)
        conversion = conversions.get((code, unit)) if unit is not None else None
        if conversion is not None:
            v = value * conversion[0] + conversion[1]
        elif unit is not None and unit == canonical.get(code):
            v = value
        else:
            unknown += 1
            continue
        # ingestion's duplicate rule among the rows it accepts: an identical repeat of a result is one result
        if row in seen:
            continue
        seen.add(row)
        lo, hi = plausible[code]
        kept.append((code, taken, v, bool(v < lo or v > hi), available))
    if unknown:
        not_used["unknown_unit"] = not_used.get("unknown_unit", 0) + unknown
    # ... and results of one code at one time that differ are all left out (which one is right is unknown)
    per_time: dict[tuple[str, datetime], int] = {}
    for k in kept:
        per_time[(k[0], k[1])] = per_time.get((k[0], k[1]), 0) + 1
    n_conflicting = sum(1 for k in kept if per_time[(k[0], k[1])] > 1)
    if n_conflicting:
        not_used["conflicting_duplicate"] = n_conflicting
        kept = [k for k in kept if per_time[(k[0], k[1])] == 1]
    # numeric_value is Float32 in the de-identified layer: each value rounded to it, as the anonymizer writes
    values = array("f", [k[2] for k in kept]).tolist()
    return tuple(
        (("LAB//" if k[0] in LAB_CODES else "VITAL//") + k[0], k[1], k[4], v, k[3])
        for k, v in zip(kept, values, strict=True)
    )


def _other_stays(raw: Any, *, current: str | None, tz: ZoneInfo) -> list[datetime]:
    starts = []
    for place, kind, res in bundle_resources(raw, "prefetch.encounters"):
        if kind != "Encounter":
            continue
        enc = read_encounter(res, place)
        if current and enc.id == current:
            continue
        start = site_clock(enc.start, tz)
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
    site_mapping: SiteMapping | CodedValues,
    tz: ZoneInfo,
    with_history: bool = False,
    observations: list[ObservationFacts] | None = None,
) -> Chart:
    """The stay of ``context.encounterId`` as the batch path's frames, predicted at ``prediction_time``
    (naive, on the site's clock). ``site_mapping`` may be a :class:`CodedValues` kept between calls.
    ``observations``: the prefetch's Observations read already (:func:`clinical_ml.serve.hookbody.
    read_hook_body`), else they are read from ``prefetch["observations"]``.

    Raises
    ------
    PrefetchError
        A prefetch the service needs is absent (``missing``: HTTP 412) or is not the FHIR expected (400),
        or the resources do not belong to the context's patient and encounter.
    """
    _require(prefetch, ("patient", "encounter", "observations", *(("encounters",) if with_history else ())))
    coded = site_mapping if isinstance(site_mapping, CodedValues) else CodedValues(site_mapping)
    patient = read_patient(prefetch["patient"], "prefetch.patient")
    encounter = read_encounter(prefetch["encounter"], "prefetch.encounter")
    if observations is None:
        observations = read_observations(prefetch["observations"], "prefetch.observations")
    rows, not_used = _observation_rows(observations, encounter_id=encounter.id, tz=tz, mapping=coded.mapping)
    issues = []
    if context.get("patientId") and patient.id and patient.id != context["patientId"]:
        issues.append(Issue("prefetch.patient.id", "conflict", "is not the patient of the hook's context"))
    if context.get("encounterId") and encounter.id and encounter.id != context["encounterId"]:
        issues.append(
            Issue("prefetch.encounter.id", "conflict", "is not the encounter of the hook's context")
        )
    subject = reference_id(encounter.subject, "Patient")
    if encounter.subject is not None and patient.id and subject != patient.id:
        issues.append(
            Issue("prefetch.encounter.subject", "conflict", "does not reference the prefetch's patient")
        )
    admit = site_clock(encounter.start, tz)
    if admit is None:
        issues.append(Issue("prefetch.encounter.period.start", "required", "the stay's start date and time"))
    if "birthDate" not in prefetch["patient"]:
        issues.append(Issue("prefetch.patient.birthDate", "required", "needed for the patient's age"))
    if issues:
        raise PrefetchError(issues)
    assert admit is not None
    measurements = _measurements(rows, not_used)
    admission_type, unit, site = coded.stay(
        admission_type=_admission_type(encounter),
        unit=_unit(encounter),
        site=_site(encounter.service_provider),
    )
    stay = {
        "subject_id": SUBJECT,
        "hadm_id": STAY,
        "prediction_time": prediction_time,
        "admit_time": admit,
        "age_years": age_years(patient.birth_date, admit),
        "sex": coded.sex(patient.gender),
        "admission_type": admission_type,
        "unit": unit,
        "site": site,
    }
    starts = [admit]
    if with_history:
        starts += _other_stays(prefetch["encounters"], current=encounter.id, tz=tz)
    return Chart(stay=stay, measurements=measurements, admissions=tuple(starts), not_used=not_used)
