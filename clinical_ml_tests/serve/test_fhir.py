"""The strict FHIR R4 reader: what is not FHIR is refused by place (never by value); what is FHIR but cannot
be used as a measurement is counted, not used."""

import copy

import pytest

from clinical_ml.serve.chart import PrefetchError, chart_from_prefetch
from clinical_ml_tests.serve.conftest import NOW, UTC_TZ, stay_request

OBS = ("observations", "entry", 0, "resource")


def _chart(req, site_mapping):
    return chart_from_prefetch(
        req["prefetch"], context=req["context"], prediction_time=NOW, site_mapping=site_mapping, tz=UTC_TZ
    )


def _set(req: dict, path: tuple, value) -> dict:
    node = req["prefetch"]
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return req


def _drop(req: dict, path: tuple) -> dict:
    node = req["prefetch"]
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return req


SECRET = "Jane-Doe-4711"


@pytest.mark.parametrize(
    ("path", "value", "place"),
    [
        ((*OBS, "effectivedateTime"), "2026-03-02T17:00:00Z", "observations.entry.0.resource"),  # misspelt
        ((*OBS, "valueQuantity", "value"), "4.5", "valueQuantity.value"),  # a decimal is a JSON number
        ((*OBS, "valueQuantity", "value"), True, "valueQuantity.value"),
        ((*OBS, "valueQuantity", "unit"), 4, "valueQuantity.unit"),
        ((*OBS, "status"), None, "resource.status"),  # null is no FHIR value
        ((*OBS, "status"), " final", "resource.status"),  # a code has no leading blank
        ((*OBS, "effectiveDateTime"), "2026-03-02T17:00:00", "effectiveDateTime"),  # a time needs a zone
        ((*OBS, "effectiveDateTime"), "2026-03-02T17:00Z", "effectiveDateTime"),  # and seconds
        ((*OBS, "effectiveDateTime"), "2026-02-30T17:00:00Z", "effectiveDateTime"),  # no such day
        ((*OBS, "effectiveDateTime"), SECRET, "effectiveDateTime"),
        ((*OBS, "issued"), "2026-03-02", "resource.issued"),  # an instant has a time
        ((*OBS, "effectivePeriod"), {"start": "2026-03-02T17:00:00Z"}, "observations.entry.0.resource"),
        ((*OBS, "code", "coding", 0, "system"), "http://loinc .org", "code.coding.0.system"),
        ((*OBS, "code", "coding"), {"code": "2160-0"}, "code.coding"),
        (("observations", "entry", 0), [SECRET], "observations.entry.0"),
        (("patient", "gender"), "female ", "patient.gender"),
        (("patient", "birthDate"), "1950-13-01", "patient.birthDate"),
        (("patient", "id"), "has a blank", "patient.id"),
        (("encounter", "period", "start"), 20260302, "encounter.period.start"),
        (("encounter", "location", 0, "location", "identifier"), [SECRET], "location.0.location.identifier"),
        (("encounter", "nonsense"), SECRET, "prefetch.encounter"),
    ],
)
def test_what_is_not_fhir_r4_is_refused_by_place(site_mapping, path, value, place) -> None:
    req = _set(stay_request(), path, value)
    with pytest.raises(PrefetchError) as exc:
        _chart(req, site_mapping)
    assert not exc.value.missing
    (issue,) = exc.value.issues
    assert place in issue.location
    assert SECRET not in str(exc.value) and "4.5" not in str(exc.value)


@pytest.mark.parametrize(
    "path",
    [
        ("encounter", "status"),
        ("encounter", "class"),
        (*OBS, "status"),
        (*OBS, "code"),
        ("observations", "type"),
    ],
)
def test_required_elements_are_required(site_mapping, path) -> None:
    with pytest.raises(PrefetchError) as exc:
        _chart(_drop(stay_request(), path), site_mapping)
    assert exc.value.issues[0].location.endswith(".".join(str(p) for p in path))


def test_what_fhir_allows_but_a_model_cannot_use_is_counted(site_mapping) -> None:
    req = stay_request()
    entries = req["prefetch"]["observations"]["entry"]
    modified = copy.deepcopy(entries[0])
    modified["resource"]["modifierExtension"] = [{"url": "http://example.org/not-done", "valueBoolean": True}]
    below = copy.deepcopy(entries[0])
    below["resource"]["valueQuantity"]["comparator"] = "<"
    day_only = copy.deepcopy(entries[0])
    day_only["resource"]["effectiveDateTime"] = "2026-03-02"
    extended = copy.deepcopy(entries[0])
    extended["resource"]["_status"] = {"extension": []}  # a primitive's extension is FHIR
    other = {"resource": {"resourceType": "OperationOutcome", "issue": []}}
    entries += [modified, below, day_only, extended, other]
    base = _chart(stay_request(), site_mapping)
    chart = _chart(req, site_mapping)
    assert len(chart.measurements) == len(base.measurements)  # the copy of entry 0 is one repeated result
    assert chart.not_used == {"modifier_extension": 1, "value_with_comparator": 1, "no_time": 1}


def test_a_partial_birth_date_leaves_the_age_unknown(site_mapping) -> None:
    chart = _chart(_set(stay_request(), ("patient", "birthDate"), "1950-05"), site_mapping)
    assert chart.stay["age_years"] is None
    with pytest.raises(PrefetchError) as exc:
        _chart(_drop(stay_request(), ("patient", "birthDate")), site_mapping)
    assert exc.value.issues[0].location == "prefetch.patient.birthDate"
