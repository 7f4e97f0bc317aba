"""The body of a hook call read in compiled code is the generic path's reading, or is left to it: it never
accepts what the strict FHIR reader refuses, and what it accepts it reads as the reader does."""

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.serve.app import parse_json
from clinical_ml.serve.chart import PrefetchError, read_observations
from clinical_ml.serve.fhir import ObservationFacts
from clinical_ml.serve.hookbody import READ_ALREADY, read_hook_body
from clinical_ml_tests.serve.conftest import stay_request

OBS = ("prefetch", "observations", "entry", 0, "resource")


def _generic(raw: bytes) -> tuple[Any, list[ObservationFacts] | None]:
    """What the service reads without the compiled path: the JSON, then the strict reader's Observations
    (None where it refuses them)."""
    body = parse_json(raw)
    try:
        found = read_observations(body["prefetch"]["observations"], "prefetch.observations")
    except (PrefetchError, TypeError, KeyError):
        found = None
    return body, found


def _same_as_generic(raw: bytes) -> bool:
    """Asserts the compiled reading agrees with the generic one; says whether it read the body at all."""
    fast = read_hook_body(raw)
    body, found = _generic(raw)
    if fast is None:
        return False
    assert found is not None, "the compiled path accepted Observations the strict reader refuses"
    fast_body, facts = fast
    assert facts == found
    assert fast_body["prefetch"]["observations"] is READ_ALREADY
    expected = {**body, "prefetch": {**body["prefetch"], "observations": READ_ALREADY}}
    assert fast_body == expected
    return True


def test_the_usual_request_is_read_in_compiled_code_as_the_reader_reads_it() -> None:
    assert _same_as_generic(json.dumps(stay_request()).encode())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ((*OBS, "_status"), {"extension": []}),  # FHIR, but left to the reader
        (("prefetch", "conditions"), {"resourceType": "Bundle", "type": "searchset"}),  # a key not read
        (("extra",), 1),
        ((*OBS, "effectiveDateTime"), "2026-02-30T17:00:00Z"),  # not a day of the calendar
        ((*OBS, "valueQuantity", "value"), 1e308 * 10),  # json.dumps writes Infinity: not JSON
        ((*OBS, "status"), "final "),
        ((*OBS, "valueQuantity", "value"), True),
        ((*OBS, "effectivedateTime"), "2026-03-02T17:00:00Z"),
    ],
)
def test_what_the_compiled_path_does_not_take_goes_to_the_reader(path, value) -> None:
    body = stay_request()
    node = body
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    assert not _same_as_generic(json.dumps(body).encode())


def test_a_body_that_is_not_utf8_goes_to_the_reader_even_in_an_element_not_read() -> None:
    # elements the service does not read are left undecoded by the compiled path: their bytes are checked too
    body = stay_request()
    body["prefetch"]["observations"]["entry"][0]["resource"]["category"] = [{"text": "PLACEHOLDER"}]
    raw = json.dumps(body).encode()
    assert _same_as_generic(raw)
    bad = raw.replace(b"PLACEHOLDER", b"\xff\xfe")
    assert read_hook_body(bad) is None
    assert parse_json(bad) is None  # the generic path refuses it (HTTP 400)
    assert _same_as_generic(raw.replace(b"PLACEHOLDER", "d\u00e9j\u00e0".encode()))  # UTF-8 is read


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(["final", "2026-03-02T17:00:00Z", "2026-03-02", "2026", "http://loinc.org", " x", ""]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
_PLACES = [
    (*OBS, "id"),
    (*OBS, "status"),
    (*OBS, "code"),
    (*OBS, "code", "text"),
    (*OBS, "code", "coding", 0, "system"),
    (*OBS, "code", "coding", 0, "code"),
    (*OBS, "code", "coding", 0, "display"),
    (*OBS, "encounter"),
    (*OBS, "encounter", "reference"),
    (*OBS, "encounter", "identifier"),
    (*OBS, "effectiveDateTime"),
    (*OBS, "effectiveInstant"),
    (*OBS, "effectivePeriod"),
    (*OBS, "effectiveTiming"),
    (*OBS, "issued"),
    (*OBS, "valueQuantity"),
    (*OBS, "valueQuantity", "value"),
    (*OBS, "valueQuantity", "unit"),
    (*OBS, "valueQuantity", "system"),
    (*OBS, "valueQuantity", "code"),
    (*OBS, "valueQuantity", "comparator"),
    (*OBS, "valueString"),
    (*OBS, "modifierExtension"),
    (*OBS, "subject"),
    (*OBS, "resourceType"),
    ("prefetch", "observations", "entry", 0),
    ("prefetch", "observations", "entry", 0, "resource"),
    ("prefetch", "observations", "entry"),
    ("prefetch", "observations", "type"),
    ("prefetch", "observations", "id"),
    ("prefetch", "observations"),
    ("prefetch", "patient"),
    ("context",),
]
_BASE = stay_request(n_vitals=2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(place=st.sampled_from(_PLACES), value=_json, drop=st.booleans())
def test_the_compiled_path_reads_any_body_as_the_reader_or_leaves_it(place, value, drop) -> None:
    body = copy.deepcopy(_BASE)
    node = body
    for p in place[:-1]:
        node = node[p]
    if drop and isinstance(node, dict) and place[-1] in node:
        del node[place[-1]]
    else:
        node[place[-1]] = value
    _same_as_generic(json.dumps(body).encode())


@settings(max_examples=60, deadline=None)
@given(value=st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**80), 2**80))
def test_a_decimal_is_the_number_json_gives(value) -> None:
    body = copy.deepcopy(_BASE)
    body["prefetch"]["observations"]["entry"][0]["resource"]["valueQuantity"]["value"] = value
    assert _same_as_generic(json.dumps(body).encode())  # read in compiled code, to the same float
