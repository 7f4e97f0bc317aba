"""The body of a hook call read in compiled code (msgspec): the JSON and its Bundle of Observations at once.

A hook call's body is mostly its prefetch's Observations (some 160 in a day of labs and vitals, 96 kB).
Parsing it into Python objects and then walking them with the strict reader of :mod:`clinical_ml.serve.fhir`
cost about a quarter of a call. Here msgspec decodes the bytes straight into the typed structures below,
which hold the element names FHIR R4 defines for each (an unknown name fails the decoding), the required
elements, the JSON types (a decimal is a number, never a string or a boolean; a string is a string) and
never ``null`` where the reader refuses it; what is left to Python is what the reader checks of the values
read (the primitives' regular expressions, a day of the calendar, a finite decimal, at most one value[x] and
effective[x]), by the reader's own functions.

These structures accept less than the reader: a primitive extension (``_status``), a resource other than an
Observation in the Bundle, a key of the request or of the prefetch the service does not read, or anything
refused here sends the whole body to the generic path (``json.loads`` and the reader), which accepts it or
names the place at fault: an error, and its place, are always the reader's. A test holds the two paths equal.
"""

import re
from datetime import date, datetime
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from clinical_ml.serve.fhir import (
    DATETIME_RE,
    INSTANT_RE,
    UCUM,
    ObservationFacts,
    ReferenceFacts,
    is_code,
    is_id,
    is_uri,
    non_blank,
    remember,
    short,
)


class _Strict(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    pass


# Elements of the Observations the service does not read are left undecoded (any JSON, null included: the
# reader does not check them); msgspec still checks that they are JSON, but not that their strings are UTF-8,
# which read_hook_body checks of the whole body. Elements of the request the service reads as JSON values
# (the context, the Patient and the Encounter) are decoded (Any).
Unread = msgspec.Raw | UnsetType


class _Coding(_Strict, kw_only=True):
    system: str | UnsetType = UNSET
    code: str | UnsetType = UNSET
    display: str | UnsetType = UNSET
    id: Unread = UNSET
    extension: Unread = UNSET
    fhir_comments: Unread = UNSET
    version: Unread = UNSET
    userSelected: Unread = UNSET


class _Concept(_Strict, kw_only=True):
    coding: list[_Coding] | UnsetType = UNSET
    text: str | UnsetType = UNSET
    id: Unread = UNSET
    extension: Unread = UNSET
    fhir_comments: Unread = UNSET


class _Quantity(_Strict, kw_only=True):
    value: float | UnsetType = UNSET  # a JSON number (an integer too); never a bool or a string
    comparator: str | UnsetType = UNSET
    unit: str | UnsetType = UNSET
    system: str | UnsetType = UNSET
    code: str | UnsetType = UNSET
    id: Unread = UNSET
    extension: Unread = UNSET
    fhir_comments: Unread = UNSET


class _Identifier(_Strict, kw_only=True):
    system: str | UnsetType = UNSET
    value: str | UnsetType = UNSET
    id: Unread = UNSET
    extension: Unread = UNSET
    fhir_comments: Unread = UNSET
    use: Unread = UNSET
    type: Unread = UNSET
    period: Unread = UNSET
    assigner: Unread = UNSET


class _Reference(_Strict, kw_only=True):
    reference: str | UnsetType = UNSET
    identifier: _Identifier | UnsetType = UNSET
    display: str | UnsetType = UNSET
    id: Unread = UNSET
    extension: Unread = UNSET
    fhir_comments: Unread = UNSET
    type: Unread = UNSET


class _Period(_Strict, kw_only=True):
    start: str | UnsetType = UNSET
    end: str | UnsetType = UNSET
    id: Unread = UNSET
    extension: Unread = UNSET
    fhir_comments: Unread = UNSET


class _Observation(_Strict, kw_only=True):
    resourceType: Literal["Observation"]
    id: str | UnsetType = UNSET
    meta: Unread = UNSET
    implicitRules: Unread = UNSET
    language: Unread = UNSET
    text: Unread = UNSET
    contained: Unread = UNSET
    extension: Unread = UNSET
    modifierExtension: list[msgspec.Raw] | UnsetType = UNSET
    fhir_comments: Unread = UNSET
    identifier: Unread = UNSET
    basedOn: Unread = UNSET
    partOf: Unread = UNSET
    status: str
    category: Unread = UNSET
    code: _Concept
    subject: Unread = UNSET
    focus: Unread = UNSET
    encounter: _Reference | UnsetType = UNSET
    effectiveDateTime: str | UnsetType = UNSET
    effectivePeriod: _Period | UnsetType = UNSET
    effectiveTiming: Unread = UNSET
    effectiveInstant: str | UnsetType = UNSET
    issued: str | UnsetType = UNSET
    performer: Unread = UNSET
    valueQuantity: _Quantity | UnsetType = UNSET
    valueCodeableConcept: Unread = UNSET
    valueString: Unread = UNSET
    valueBoolean: Unread = UNSET
    valueInteger: Unread = UNSET
    valueRange: Unread = UNSET
    valueRatio: Unread = UNSET
    valueSampledData: Unread = UNSET
    valueTime: Unread = UNSET
    valueDateTime: Unread = UNSET
    valuePeriod: Unread = UNSET
    dataAbsentReason: Unread = UNSET
    interpretation: Unread = UNSET
    note: Unread = UNSET
    bodySite: Unread = UNSET
    method: Unread = UNSET
    specimen: Unread = UNSET
    device: Unread = UNSET
    referenceRange: Unread = UNSET
    hasMember: Unread = UNSET
    derivedFrom: Unread = UNSET
    component: Unread = UNSET


class _Entry(_Strict, kw_only=True):
    resource: _Observation | UnsetType = UNSET
    id: Unread = UNSET
    extension: Unread = UNSET
    modifierExtension: Unread = UNSET
    link: Unread = UNSET
    fullUrl: Unread = UNSET
    search: Unread = UNSET
    request: Unread = UNSET
    response: Unread = UNSET
    fhir_comments: Unread = UNSET


class _Bundle(_Strict, kw_only=True):
    resourceType: Literal["Bundle"]
    type: str
    id: str | UnsetType = UNSET
    entry: list[_Entry] | UnsetType = UNSET
    meta: Unread = UNSET
    implicitRules: Unread = UNSET
    language: Unread = UNSET
    identifier: Unread = UNSET
    timestamp: Unread = UNSET
    total: Unread = UNSET
    link: Unread = UNSET
    signature: Unread = UNSET
    fhir_comments: Unread = UNSET


class _Prefetch(_Strict, kw_only=True):
    observations: _Bundle
    patient: Any = UNSET
    encounter: Any = UNSET
    encounters: Any = UNSET


class _Hook(_Strict, kw_only=True):
    """A CDS Hooks request of the usual shape (the service's model, :class:`~clinical_ml.serve.service.
    HookRequest`, still validates what is read here as JSON values)."""

    prefetch: _Prefetch
    hook: Any = UNSET
    hookInstance: Any = UNSET
    fhirServer: Any = UNSET
    fhirAuthorization: Any = UNSET
    context: Any = UNSET


_DECODER = msgspec.json.Decoder(_Hook)


class _Declined(Exception):
    """Left to the generic path."""


def _check(ok: bool) -> None:
    if not ok:
        raise _Declined


def _optional(v: str | UnsetType, ok: Any) -> str | None:
    if v is UNSET:
        return None
    assert isinstance(v, str)
    _check(ok(v))
    return v


# What repeats across a prefetch's Observations is checked once and remembered: the parts of codings and
# quantities (a hospital's codes, systems and units) by their strings, across calls; the references and the
# times (a stay's encounter, its charting times: the patient's data) by their text within one call only, so
# nothing of a patient outlives its request. Only parts whose strings are all short are remembered across
# calls, and each such memo is emptied when full, so requests cannot fill the memory. A part that fails its
# checks is never remembered (it sends the body to the generic path). A remembered answer is the one the
# checks gave: the same strings, the same rules.


class _Call:
    """What one call's Observations share (references and times, by their text), forgotten with the call."""

    __slots__ = ("instants", "references", "times")

    def __init__(self) -> None:
        self.times: dict[str, datetime | None] = {}
        self.instants: dict[str, datetime | None] = {}
        self.references: dict[tuple, ReferenceFacts] = {}


def _time(v: str | UnsetType, pattern: "re.Pattern[str]", call: _Call) -> datetime | None:
    """``fhir.datetime_value`` of an element given as a string."""
    if v is UNSET:
        return None
    assert isinstance(v, str)
    memo = call.instants if pattern is INSTANT_RE else call.times
    try:
        return memo[v]
    except KeyError:
        pass
    _check(pattern.fullmatch(v) is not None)
    out = None
    try:
        if len(v) > 10:
            out = datetime.fromisoformat(v)
        elif len(v) == 10:
            date.fromisoformat(v)
    except ValueError:
        raise _Declined from None
    memo[v] = out
    return out


_CODINGS: dict[tuple, tuple[str | None, str | None]] = {}


def _coding(k: _Coding) -> tuple[str | None, str | None]:
    key = (k.system, k.code, k.display)
    found = _CODINGS.get(key)
    if found is not None:
        return found
    system: str | UnsetType | None = k.system
    code: str | UnsetType | None = k.code
    if system is UNSET:
        system = None
    elif not is_uri(system):  # type: ignore[arg-type]
        raise _Declined
    if code is UNSET:
        code = None
    elif not is_code(code):  # type: ignore[arg-type]
        raise _Declined
    if k.display is not UNSET:
        _check(non_blank(k.display))  # type: ignore[arg-type]
    found = (system, code)  # type: ignore[assignment]
    if short(*key):
        remember(_CODINGS, key, found)
    return found  # type: ignore[return-value]


def _codings(c: _Concept) -> list[tuple[str | None, str | None]]:
    if c.text is not UNSET:
        _check(non_blank(c.text))  # type: ignore[arg-type]
    coding = c.coding
    if coding is UNSET:
        return []
    if len(coding) == 1:  # type: ignore[arg-type]
        return [_coding(coding[0])]  # type: ignore[index]
    return [_coding(k) for k in coding]  # type: ignore[union-attr]


def _reference(r: _Reference | UnsetType, call: _Call) -> ReferenceFacts | None:
    if r is UNSET:
        return None
    assert isinstance(r, _Reference)
    i = r.identifier
    key = (r.reference, r.display) if i is UNSET else (r.reference, r.display, i.system, i.value)  # type: ignore[union-attr]
    found = call.references.get(key)
    if found is not None:
        return found
    value = None
    if i is not UNSET:
        assert isinstance(i, _Identifier)
        _optional(i.system, is_uri)
        value = _optional(i.value, non_blank)
    found = ReferenceFacts(_optional(r.reference, non_blank), value, _optional(r.display, non_blank))
    call.references[key] = found
    return found


_INF = float("inf")
_QUANTITIES: dict[tuple, tuple[str | None, str | None]] = {}


def _quantity_unit(q: _Quantity) -> tuple[str | None, str | None]:
    """The comparator and the unit of a Quantity (the reader's rule: the UCUM code, else the unit as
    written, else the code)."""
    key = (q.comparator, q.unit, q.system, q.code)
    found = _QUANTITIES.get(key)
    if found is not None:
        return found
    comparator = _optional(q.comparator, is_code)
    u = _optional(q.unit, non_blank)
    system = _optional(q.system, is_uri)
    c = _optional(q.code, is_code)
    found = (comparator, c if (system == UCUM and c) else (u or c))
    if short(*key):
        remember(_QUANTITIES, key, found)
    return found


_facts = tuple.__new__  # ObservationFacts(*fields) without the Python frame of a NamedTuple's __new__


def _observation(o: _Observation, call: _Call) -> ObservationFacts:
    """``fhir.read_observation`` of a decoded Observation (:class:`_Declined` where the reader would refuse)."""
    if o.id is not UNSET:
        _check(is_id(o.id))  # type: ignore[arg-type]
    _check(is_code(o.status))
    found = _codings(o.code)
    q = o.valueQuantity
    if (
        o.valueCodeableConcept is not UNSET
        or o.valueString is not UNSET
        or o.valueBoolean is not UNSET
        or o.valueInteger is not UNSET
        or o.valueRange is not UNSET
        or o.valueRatio is not UNSET
        or o.valueSampledData is not UNSET
        or o.valueTime is not UNSET
        or o.valueDateTime is not UNSET
        or o.valuePeriod is not UNSET
    ):
        others = (
            (o.valueCodeableConcept is not UNSET)
            + (o.valueString is not UNSET)
            + (o.valueBoolean is not UNSET)
            + (o.valueInteger is not UNSET)
            + (o.valueRange is not UNSET)
            + (o.valueRatio is not UNSET)
            + (o.valueSampledData is not UNSET)
            + (o.valueTime is not UNSET)
            + (o.valueDateTime is not UNSET)
            + (o.valuePeriod is not UNSET)
        )
        _check(others + (q is not UNSET) <= 1)
    value = unit = comparator = None
    if q is not UNSET:
        assert isinstance(q, _Quantity)
        if q.value is not UNSET:
            value = q.value
            _check(value == value and value != _INF and value != -_INF)
        comparator, unit = _quantity_unit(q)
    if o.effectiveDateTime is not UNSET:
        _check(o.effectiveInstant is UNSET and o.effectivePeriod is UNSET and o.effectiveTiming is UNSET)
        effective = _time(o.effectiveDateTime, DATETIME_RE, call)
    elif o.effectiveInstant is not UNSET:
        _check(o.effectivePeriod is UNSET and o.effectiveTiming is UNSET)
        effective = _time(o.effectiveInstant, INSTANT_RE, call)
    elif o.effectivePeriod is not UNSET:
        _check(o.effectiveTiming is UNSET)
        p = o.effectivePeriod
        assert isinstance(p, _Period)
        _time(p.end, DATETIME_RE, call)
        effective = _time(p.start, DATETIME_RE, call)
    else:
        effective = None
    return _facts(
        ObservationFacts,
        (
            found,
            o.status,
            _reference(o.encounter, call),
            value,
            unit,
            comparator,
            effective,
            None if o.issued is UNSET else _time(o.issued, INSTANT_RE, call),
            bool(o.modifierExtension) if o.modifierExtension is not UNSET else False,
        ),
    )


def _observations(b: _Bundle) -> list[ObservationFacts]:
    _optional(b.id, is_id)
    _check(is_code(b.type))
    if b.entry is UNSET:
        return []
    assert isinstance(b.entry, list)
    call = _Call()
    return [_observation(e.resource, call) for e in b.entry if isinstance(e.resource, _Observation)]


_HOOK_FIELDS = tuple(f for f in _Hook.__struct_fields__ if f != "prefetch")
_PREFETCH_FIELDS = tuple(f for f in _Prefetch.__struct_fields__ if f != "observations")


def read_hook_body(raw: bytes) -> tuple[dict, list[ObservationFacts]] | None:
    """The body as the JSON object ``json.loads`` gives, with ``prefetch.observations`` read already (the
    Observations as :func:`clinical_ml.serve.fhir.read_observation` gives them, other resources skipped; in
    the body, the key holds a placeholder), or None where the body is left to the generic path."""
    try:
        if not raw.isascii():
            raw.decode()  # the undecoded elements' strings too (msgspec checks those it decodes)
        hook = _DECODER.decode(raw)
        facts = _observations(hook.prefetch.observations)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError, _Declined):  # ValidationError included
        return None
    prefetch: dict[str, Any] = {"observations": READ_ALREADY}
    prefetch |= {k: v for k in _PREFETCH_FIELDS if (v := getattr(hook.prefetch, k)) is not UNSET}
    body = {k: v for k in _HOOK_FIELDS if (v := getattr(hook, k)) is not UNSET}
    body["prefetch"] = prefetch
    return body, facts


class _ReadAlready:
    """The placeholder of a prefetch whose Observations were read with the body."""

    def __repr__(self) -> str:
        return "<read already>"


READ_ALREADY = _ReadAlready()
