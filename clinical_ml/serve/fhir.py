"""A strict reader of the few FHIR R4 elements the service uses, for JSON as an EHR sends it.

Validating a whole prefetch with ``fhir.resources`` cost about 60% of a hook call (pydantic models of every
element of ~150 Observations). This reader checks what the service reads, by FHIR R4's own rules, and the
names of every other element:

* element names: a resource, or a datatype the service reads, may only hold the elements FHIR R4 defines for
  it (``_`` primitive extensions and ``fhir_comments`` allowed); a misspelt ``effectivedateTime`` is an
  error, never a silently missing time. Elements the service does not read are not checked further;
* required elements (``Observation.status``/``code``, ``Encounter.status``/``class``, ``Bundle.type``);
  ``null`` is never a value (FHIR JSON has none); at most one ``effective[x]`` and one ``value[x]``;
* primitive types: ``id`` (``[A-Za-z0-9\\-.]{1,64}``), ``code`` (no leading, trailing or double blanks),
  ``uri`` (no blanks), ``string`` (not empty), ``decimal`` (a JSON number, never a string or a boolean),
  ``date``, ``dateTime`` and ``instant`` by FHIR's regular expressions (a time has seconds and a zone), and a
  date or time that does not exist in the calendar is an error too.

A problem is an :class:`Issue` naming the place (``prefetch.observations.entry.3.resource.valueQuantity.value``)
and the rule broken, never the value: values are patient data.

The readers return plain tuples of the values used (:class:`PatientFacts`, :class:`EncounterFacts`,
:class:`ObservationFacts`); :mod:`clinical_ml.serve.chart` turns them into the batch path's frames.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from typing import Any, NamedTuple

# FHIR R4 datatype rules (https://hl7.org/fhir/R4/datatypes.html)
_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]{1,9})?"
DATE_RE = re.compile(rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?")
DATETIME_RE = re.compile(rf"{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T{_TIME}{_ZONE})?)?)?")
INSTANT_RE = re.compile(rf"{_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T{_TIME}{_ZONE}")
ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
CODE_RE = re.compile(r"[^\s]+( [^\s]+)*")
URI_RE = re.compile(r"\S*")

_COMMON = frozenset({"id", "meta", "implicitRules", "language", "text", "contained", "extension"})
_RESOURCE = _COMMON | {"resourceType", "modifierExtension", "fhir_comments"}
# element names of FHIR R4 (R4B alike) for the resources and datatypes read here
OBSERVATION_ELEMENTS = _RESOURCE | {
    "identifier", "basedOn", "partOf", "status", "category", "code", "subject", "focus", "encounter",
    "effectiveDateTime", "effectivePeriod", "effectiveTiming", "effectiveInstant", "issued", "performer",
    "valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger", "valueRange",
    "valueRatio", "valueSampledData", "valueTime", "valueDateTime", "valuePeriod", "dataAbsentReason",
    "interpretation", "note", "bodySite", "method", "specimen", "device", "referenceRange", "hasMember",
    "derivedFrom", "component",
}  # fmt: skip
PATIENT_ELEMENTS = _RESOURCE | {
    "identifier", "active", "name", "telecom", "gender", "birthDate", "deceasedBoolean", "deceasedDateTime",
    "address", "maritalStatus", "multipleBirthBoolean", "multipleBirthInteger", "photo", "contact",
    "communication", "generalPractitioner", "managingOrganization", "link",
}  # fmt: skip
ENCOUNTER_ELEMENTS = _RESOURCE | {
    "identifier", "status", "statusHistory", "class", "classHistory", "type", "serviceType", "priority",
    "subject", "episodeOfCare", "basedOn", "participant", "appointment", "period", "length", "reasonCode",
    "reasonReference", "diagnosis", "account", "hospitalization", "location", "serviceProvider", "partOf",
}  # fmt: skip
BUNDLE_ELEMENTS = frozenset(
    {"resourceType", "id", "meta", "implicitRules", "language", "identifier", "type", "timestamp", "total"}
    | {"link", "entry", "signature", "fhir_comments"}
)
ENTRY_ELEMENTS = frozenset(
    {"id", "extension", "modifierExtension", "link", "fullUrl", "resource", "search", "request", "response"}
    | {"fhir_comments"}
)
_ELEMENT = frozenset({"id", "extension", "fhir_comments"})
CODING = _ELEMENT | {"system", "version", "code", "display", "userSelected"}
CODEABLE_CONCEPT = _ELEMENT | {"coding", "text"}
QUANTITY = _ELEMENT | {"value", "comparator", "unit", "system", "code"}
REFERENCE = _ELEMENT | {"reference", "type", "identifier", "display"}
IDENTIFIER = _ELEMENT | {"use", "type", "system", "value", "period", "assigner"}
PERIOD = _ELEMENT | {"start", "end"}
ENCOUNTER_LOCATION = _ELEMENT | {"modifierExtension", "location", "status", "physicalType", "period"}


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


class _Fault(Exception):
    """A rule broken at ``path`` (element names and indexes from the resource down): raised by the readers
    without building any location, which is assembled only on the way out of a bad request."""

    def __init__(self, rule: str, key: str | int | None = None, *, code: str = "invalid") -> None:
        super().__init__(rule)
        self.rule, self.code = rule, code
        self.path: list[str | int] = [] if key is None else [key]

    def within(self, *keys: str | int) -> "_Fault":
        self.path[:0] = keys
        return self

    def issue(self, where: str) -> PrefetchError:
        place = ".".join([where, *(str(p) for p in self.path)])
        return PrefetchError([Issue(place, self.code, f"not valid FHIR R4 ({self.rule})")])


# primitives: each returns the value (None when absent) or raises a _Fault naming its element --------------
# Codes, systems and units repeat across Observations: their checks are remembered, for short strings only
# (a long one is checked each time, so a request cannot fill the memory with what it sends).
REMEMBERED_LENGTH = 128
MEMO_ENTRIES = 4096


def short(*parts: Any) -> bool:
    """Whether every string among ``parts`` is short enough to be remembered (other values always are)."""
    return all(not isinstance(v, str) or len(v) <= REMEMBERED_LENGTH for v in parts)


def remember(memo: dict, key: Any, value: Any) -> None:
    """``memo[key] = value``, the memo emptied first when full (``MEMO_ENTRIES``)."""
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = value


@lru_cache(maxsize=8192)
def _short_code(s: str) -> bool:
    return CODE_RE.fullmatch(s) is not None


@lru_cache(maxsize=8192)
def _short_uri(s: str) -> bool:
    return URI_RE.fullmatch(s) is not None


def is_code(s: str) -> bool:
    return _short_code(s) if len(s) <= REMEMBERED_LENGTH else CODE_RE.fullmatch(s) is not None


def is_uri(s: str) -> bool:
    return _short_uri(s) if len(s) <= REMEMBERED_LENGTH else URI_RE.fullmatch(s) is not None


def _object(raw: Any, elements: frozenset[str], key: str | int | None = None) -> dict:
    """``raw`` as a JSON object holding only ``elements`` (and ``_`` primitive extensions)."""
    if type(raw) is not dict:
        raise _Fault("expected an object", key, code="structure")
    if not raw.keys() <= elements:
        for k in raw:
            if k not in elements and not (isinstance(k, str) and k.startswith("_")):
                raise _Fault("an element FHIR R4 does not define here", key, code="structure")
    return raw


def _absent(obj: dict, key: str) -> None:
    if key in obj:
        raise _Fault("null is not a value", key)


def _list(obj: dict, key: str) -> list:
    v = obj.get(key)
    if v is None:
        _absent(obj, key)
        return []
    if type(v) is not list:
        raise _Fault("expected an array", key, code="structure")
    return v


def _text(obj: dict, key: str, rule: str, ok: Callable[[str], bool]) -> str | None:
    """A string element that ``ok`` accepts (None when absent), else a _Fault naming ``rule``."""
    v = obj.get(key)
    if v is None:
        _absent(obj, key)
    elif type(v) is not str or not ok(v):
        raise _Fault(rule, key)
    return v


def is_id(s: str) -> bool:
    return ID_RE.fullmatch(s) is not None


def non_blank(s: str) -> bool:  # a string of white space alone is not a value
    return bool(s.strip())


def string(obj: dict, key: str) -> str | None:
    return _text(obj, key, "string", non_blank)


def code(obj: dict, key: str) -> str | None:
    return _text(obj, key, "code", is_code)


def uri(obj: dict, key: str) -> str | None:
    return _text(obj, key, "uri", is_uri)


def fhir_id(obj: dict, key: str) -> str | None:
    return _text(obj, key, "id", is_id)


def decimal(obj: dict, key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        _absent(obj, key)
        return None
    t = type(v)
    if t is float:
        if v != v or v in (_INF, -_INF):
            raise _Fault("decimal", key)
        return v
    if t is not int:  # a bool is not an int here: type() is exact
        raise _Fault("decimal", key)
    try:
        return float(v)
    except OverflowError:  # an integer beyond any float
        raise _Fault("decimal", key) from None


_INF = float("inf")


def date_value(obj: dict, key: str) -> date | None:
    """A FHIR ``date``: the day, or None for a partial date (a year, a year and month)."""
    v = obj.get(key)
    if v is None:
        _absent(obj, key)
        return None
    if type(v) is not str or DATE_RE.fullmatch(v) is None:
        raise _Fault("date", key)
    if len(v) != 10:
        return None
    try:
        return date.fromisoformat(v)
    except ValueError:  # 2026-02-30
        raise _Fault("not a day of the calendar", key) from None


def datetime_value(obj: dict, key: str, *, instant: bool = False) -> datetime | None:
    """A FHIR ``dateTime`` (``instant``: with a time, always): aware when it has a time, else None (a date or
    a partial date places nothing before or after a moment)."""
    v = obj.get(key)
    if v is None:
        _absent(obj, key)
        return None
    if type(v) is not str or (INSTANT_RE if instant else DATETIME_RE).fullmatch(v) is None:
        raise _Fault("instant" if instant else "dateTime", key)
    try:
        if len(v) > 10:
            return datetime.fromisoformat(v)
        if len(v) == 10:
            date.fromisoformat(v)
    except ValueError:  # matches the pattern but is no day or time: 2026-02-30, a leap second
        raise _Fault("not a date or time of the calendar", key) from None
    return None


# datatypes ------------------------------------------------------------------------------------------------
Codings = list[tuple[str | None, str | None]]


def _concept(raw: Any) -> Codings:
    """``(system, code)`` of each Coding of a CodeableConcept."""
    concept = _object(raw, CODEABLE_CONCEPT)
    if "text" in concept:
        string(concept, "text")
    out = []
    for i, c in enumerate(_list(concept, "coding")):
        try:
            c = _object(c, CODING)
            out.append((uri(c, "system"), code(c, "code")))
            if "display" in c:
                string(c, "display")
        except _Fault as f:
            raise f.within("coding", i) from None
    return out


def codings(obj: dict, key: str) -> Codings:
    """The codings of a CodeableConcept element (none when absent)."""
    raw = obj.get(key)
    if raw is None:
        _absent(obj, key)
        return []
    try:
        return _concept(raw)
    except _Fault as f:
        raise f.within(key) from None


def concepts(obj: dict, key: str) -> Codings:
    """The codings of every CodeableConcept of an array element."""
    out: Codings = []
    for i, raw in enumerate(_list(obj, key)):
        try:
            out += _concept(raw)
        except _Fault as f:
            raise f.within(key, i) from None
    return out


class ReferenceFacts(NamedTuple):
    reference: str | None
    identifier: str | None  # the identifier's value
    display: str | None


def _reference(raw: Any) -> ReferenceFacts:
    ref = _object(raw, REFERENCE)
    value = None
    ident = ref.get("identifier")
    if ident is not None:
        try:
            ident = _object(ident, IDENTIFIER)
            uri(ident, "system")
            value = string(ident, "value")
        except _Fault as f:
            raise f.within("identifier") from None
    elif "identifier" in ref:
        _absent(ref, "identifier")
    return ReferenceFacts(string(ref, "reference"), value, string(ref, "display"))


def reference(obj: dict, key: str) -> ReferenceFacts | None:
    raw = obj.get(key)
    if raw is None:
        _absent(obj, key)
        return None
    try:
        return _reference(raw)
    except _Fault as f:
        raise f.within(key) from None


def reference_id(ref: ReferenceFacts | None, resource_type: str) -> str | None:
    """The id of a literal reference to ``resource_type`` (``Patient/123``, or an absolute URL ending so)."""
    text = ref.reference if ref is not None else None
    if not text:
        return None
    kind, _, rid = text.rpartition("/")
    return rid if kind.endswith(resource_type) and rid else None


def period_start(obj: dict, key: str) -> datetime | None:
    """The start of a Period element (its end checked too)."""
    raw = obj.get(key)
    if raw is None:
        _absent(obj, key)
        return None
    try:
        p = _object(raw, PERIOD)
        datetime_value(p, "end")
        return datetime_value(p, "start")
    except _Fault as f:
        raise f.within(key) from None


def _modifier_extensions(obj: dict) -> bool:
    """Whether the element carries modifier extensions (which may change its meaning: FHIR says a reader
    that does not know them must not use it)."""
    v = obj.get("modifierExtension")
    if v is None:
        _absent(obj, "modifierExtension")
        return False
    if type(v) is not list:
        raise _Fault("expected an array", "modifierExtension", code="structure")
    return bool(v)


# resources ------------------------------------------------------------------------------------------------
def _resource(raw: Any, where: str, resource_type: str, elements: frozenset[str]) -> dict:
    if not isinstance(raw, dict):
        raise PrefetchError([Issue(where, "structure", f"expected a FHIR {resource_type} object")])
    if raw.get("resourceType") != resource_type:
        raise PrefetchError(
            [Issue(f"{where}.resourceType", "invalid", f"expected resourceType {resource_type}")]
        )
    try:
        obj = _object(raw, elements)
        fhir_id(obj, "id")
    except _Fault as f:
        raise f.issue(where) from None
    return obj


def _unsupported(where: str) -> PrefetchError:
    return PrefetchError(
        [
            Issue(
                f"{where}.modifierExtension", "not-supported", "a modifier extension this service cannot read"
            )
        ]
    )


class PatientFacts(NamedTuple):
    id: str | None
    gender: str | None
    birth_date: date | None  # None also for a partial birth date


def read_patient(raw: Any, where: str) -> PatientFacts:
    p = _resource(raw, where, "Patient", PATIENT_ELEMENTS)
    try:
        if _modifier_extensions(p):
            raise _unsupported(where)
        return PatientFacts(p.get("id"), code(p, "gender"), date_value(p, "birthDate"))
    except _Fault as f:
        raise f.issue(where) from None


class EncounterFacts(NamedTuple):
    id: str | None
    subject: ReferenceFacts | None
    start: datetime | None
    types: Codings  # codings of Encounter.type
    priority: Codings
    locations: list[ReferenceFacts]
    service_provider: ReferenceFacts | None


def _required(obj: dict, key: str) -> None:
    if obj.get(key) is None:
        raise _Fault("required", key, code="required")


def read_encounter(raw: Any, where: str) -> EncounterFacts:
    e = _resource(raw, where, "Encounter", ENCOUNTER_ELEMENTS)
    try:
        if _modifier_extensions(e):
            raise _unsupported(where)
        _required(e, "status")
        code(e, "status")
        _required(e, "class")
        try:
            cls = _object(e["class"], CODING)
            uri(cls, "system")
            code(cls, "code")
        except _Fault as f:
            raise f.within("class") from None
        locations = []
        for i, item in enumerate(_list(e, "location")):
            try:
                loc = _object(item, ENCOUNTER_LOCATION)
                _required(loc, "location")
                ref = reference(loc, "location")
                assert ref is not None  # required above
                locations.append(ref)
            except _Fault as f:
                raise f.within("location", i) from None
        return EncounterFacts(
            id=e.get("id"),
            subject=reference(e, "subject"),
            start=period_start(e, "period"),
            types=concepts(e, "type"),
            priority=codings(e, "priority"),
            locations=locations,
            service_provider=reference(e, "serviceProvider"),
        )
    except _Fault as f:
        raise f.issue(where) from None


class ObservationFacts(NamedTuple):
    """What the service reads of one Observation."""

    codings: Codings
    status: str
    encounter: ReferenceFacts | None
    value: float | None
    unit: str | None  # the UCUM code when the system is UCUM, else the unit as written, else the code
    comparator: str | None
    effective: datetime | None
    issued: datetime | None
    modifier_extension: bool


_VALUE_KEYS = frozenset(k for k in OBSERVATION_ELEMENTS if k.startswith("value"))
_EFFECTIVE_KEYS = frozenset(k for k in OBSERVATION_ELEMENTS if k.startswith("effective"))
UCUM = "http://unitsofmeasure.org"


def _observation(o: Any) -> ObservationFacts:
    o = _object(o, OBSERVATION_ELEMENTS)
    if "id" in o:
        fhir_id(o, "id")
    _required(o, "status")
    status = code(o, "status")
    _required(o, "code")
    found = codings(o, "code")
    if len(_VALUE_KEYS.intersection(o)) > 1 or len(_EFFECTIVE_KEYS.intersection(o)) > 1:
        raise _Fault("more than one value[x] or effective[x]")
    value = unit = comparator = None
    q = o.get("valueQuantity")
    if q is not None:
        try:
            q = _object(q, QUANTITY)
            value = decimal(q, "value")
            comparator = code(q, "comparator")
            u, system, c = string(q, "unit"), uri(q, "system"), code(q, "code")
        except _Fault as f:
            raise f.within("valueQuantity") from None
        unit = c if (system == UCUM and c) else (u or c)
    if "effectiveDateTime" in o:
        effective = datetime_value(o, "effectiveDateTime")
    elif "effectiveInstant" in o:
        effective = datetime_value(o, "effectiveInstant", instant=True)
    else:
        effective = period_start(o, "effectivePeriod")
    return ObservationFacts(
        codings=found,
        status=status,  # type: ignore[arg-type]  # required above
        encounter=reference(o, "encounter"),
        value=value,
        unit=unit,
        comparator=comparator,
        effective=effective,
        issued=datetime_value(o, "issued", instant=True),
        modifier_extension=_modifier_extensions(o),
    )


def read_observation(raw: Any, where: str) -> ObservationFacts:
    try:
        return _observation(raw)
    except _Fault as f:
        raise f.issue(where) from None


def bundle_resources(raw: Any, where: str) -> Iterator[tuple[str, str, dict]]:
    """``(place, resourceType, resource)`` of each entry of a Bundle (entries without a resource skipped),
    the place built only for the entries this yields."""
    b = _resource(raw, where, "Bundle", BUNDLE_ELEMENTS)
    try:
        _required(b, "type")
        code(b, "type")
        entries = _list(b, "entry")
    except _Fault as f:
        raise f.issue(where) from None
    for i, item in enumerate(entries):
        try:
            entry = _object(item, ENTRY_ELEMENTS)
            res = entry.get("resource")
            if res is None:
                _absent(entry, "resource")
                continue
            if type(res) is not dict:
                raise _Fault("expected an object", "resource", code="structure")
            kind = res.get("resourceType")
            if type(kind) is not str or not kind:
                raise _Fault("required", "resourceType", code="required").within("resource")
        except _Fault as f:
            raise f.within("entry", i).issue(where) from None
        yield f"{where}.entry.{i}.resource", kind, res
