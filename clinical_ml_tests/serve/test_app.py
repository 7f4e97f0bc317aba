"""The service over HTTP in process (FastAPI's TestClient): discovery, hooks, feedback, refusals."""

import copy
import json
import logging
import uuid
from datetime import UTC
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinical_ml.core.registry import Registry
from clinical_ml.serve.app import create_app
from clinical_ml.serve.records import ServingRecords
from clinical_ml.serve.settings import ServiceSettings
from clinical_ml_tests.serve.conftest import (
    BASE_URL,
    NOW,
    USE_CASE,
    Ehr,
    stay_request,
    train_and_register,
    use_case,
)

SERVICES = f"{BASE_URL}/cds-services"
HOOK = f"{SERVICES}/{USE_CASE}"


@pytest.fixture
def client(data_root: Path, usecases_dir: Path, trust_file: Path) -> TestClient:
    settings = ServiceSettings(
        data_root=data_root,
        usecases_dir=usecases_dir,
        base_url=BASE_URL,
        trust_file=trust_file,
        max_body_bytes=200_000,
    )
    app = create_app(settings, clock=lambda: NOW.replace(tzinfo=UTC))
    return TestClient(app, base_url=BASE_URL, raise_server_exceptions=False)


def _auth(ehr: Ehr, aud: str) -> dict:
    return {"Authorization": f"Bearer {ehr.token(aud)}"}


def _call(client: TestClient, ehr: Ehr, body) -> "object":
    return client.post(f"/cds-services/{USE_CASE}", json=body, headers=_auth(ehr, HOOK))


def test_discovery_lists_the_use_case_with_its_prefetch(client: TestClient, ehr: Ehr) -> None:
    r = client.get("/cds-services", headers=_auth(ehr, SERVICES))
    assert r.status_code == 200
    (service,) = r.json()["services"]
    assert (service["id"], service["hook"]) == (USE_CASE, "patient-view")
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    query = service["prefetch"]["observations"]
    assert "http://loinc.org|2160-0" in query and "http://loinc.org|8867-4" in query  # creatinine, heart rate


def test_a_hook_gets_a_card_naming_the_model_and_is_recorded_in_the_phi_zone(
    client: TestClient, ehr: Ehr, data_root: Path
) -> None:
    r = _call(client, ehr, stay_request())
    assert r.status_code == 200, r.text
    (card,) = r.json()["cards"]
    version = Registry(data_root / "registry", USE_CASE).champion()
    assert r.headers["X-Model-Version"] == version == r.json()["extension"]["clinical-ml-model-version"]
    assert card["indicator"] in ("warning", "critical") and "Risk of death" in card["detail"]
    (rec,) = ServingRecords(data_root / "phi").read(USE_CASE, "predictions")
    assert rec["card_uuid"] == card["uuid"] and rec["patient_id"] == "pat-4711" and rec["outcome"] == "scored"


def test_a_promotion_is_served_by_the_next_request(client: TestClient, ehr: Ehr, data_root: Path) -> None:
    first = _call(client, ehr, stay_request()).headers["X-Model-Version"]
    second = train_and_register(data_root / "registry", use_case(), seed=2)
    assert second != first
    assert _call(client, ehr, stay_request()).headers["X-Model-Version"] == second


def test_an_unapproved_champion_is_never_served(client: TestClient, ehr: Ehr, data_root: Path) -> None:
    rogue = train_and_register(data_root / "registry", use_case(), seed=3, approve=False)
    Registry(data_root / "registry", USE_CASE).set_champion(rogue)  # pointer moved, no decision
    r = _call(client, ehr, stay_request())
    assert r.status_code == 200 and "X-Model-Version" not in r.headers
    assert r.json()["cards"][0]["summary"].endswith("not scored")
    assert client.get("/cds-services", headers=_auth(ehr, SERVICES)).json()["services"] == []


def test_too_early_in_the_stay_is_not_scored_with_the_reason(client: TestClient, ehr: Ehr) -> None:
    req = stay_request(admit=NOW.replace(hour=0) if NOW.hour >= 1 else NOW)
    card = _call(client, ehr, req).json()["cards"][0]
    assert card["summary"].endswith("not scored") and "24 h after ICU admission" in card["detail"]


@pytest.mark.parametrize("unit", ["WARD", "ED", "A ward nobody mapped"])
def test_a_stay_outside_the_population_s_units_is_not_scored(client: TestClient, ehr: Ehr, unit: str) -> None:
    """The use case asks about ICU stays (population.unit_types): a ward, ED or unmapped unit's chart gets no
    score, as the batch cohort leaves those stays out, and the card does not echo the delivered unit."""
    card = _call(client, ehr, stay_request(unit=unit)).json()["cards"][0]
    assert (
        card["summary"].endswith("not scored")
        and "unit type is outside the model's population" in card["detail"]
    )
    assert unit not in card["detail"]
    scored = _call(client, ehr, stay_request(unit="SICU")).json()["cards"][0]
    assert not scored["summary"].endswith("not scored")


def test_feedback_is_recorded_with_the_coded_reason(client: TestClient, ehr: Ehr, data_root: Path) -> None:
    card = _call(client, ehr, stay_request()).json()["cards"][0]
    fb_url = f"{HOOK}/feedback"
    entry = {
        "card": card["uuid"],
        "outcome": "overridden",
        "outcomeTimestamp": "2026-03-03T14:05:00Z",
        "overrideReason": {"reason": card["overrideReasons"][1], "userComment": "family meeting today"},
    }
    uncoded = {**entry, "overrideReason": {"reason": {"system": "x", "code": "Mr Smith said no"}}}
    accepted = {"card": card["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-03T14:06:00Z"}
    body = {"feedback": [entry, uncoded, accepted]}
    r = client.post(f"/cds-services/{USE_CASE}/feedback", json=body, headers=_auth(ehr, fb_url))
    assert r.status_code == 200
    recs = ServingRecords(data_root / "phi").read(USE_CASE, "feedback")
    assert [x["override_reason"] for x in recs] == [card["overrideReasons"][1]["code"], "not_offered", None]
    assert [x["outcome"] for x in recs] == ["overridden", "overridden", "accepted"]
    assert all(x["card_served_here"] for x in recs)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic dXNlcjpwYXNz"}],
)
def test_no_or_bad_token_is_401_with_an_operation_outcome(client: TestClient, headers: dict) -> None:
    r = client.post(f"/cds-services/{USE_CASE}", json=stay_request(), headers=headers)
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    assert client.get("/cds-services", headers=headers).status_code == 401


def test_a_token_for_another_service_is_refused(client: TestClient, ehr: Ehr) -> None:
    r = client.post(f"/cds-services/{USE_CASE}", json=stay_request(), headers=_auth(ehr, SERVICES))
    assert r.status_code == 401 and "wrong_audience" in r.text


def test_a_body_over_the_limit_is_413(client: TestClient, ehr: Ehr) -> None:
    req = stay_request(n_vitals=1000)
    assert len(json.dumps(req)) > 200_000
    assert _call(client, ehr, req).status_code == 413


def test_missing_prefetch_is_412_and_bad_fhir_400_never_quoting_values(client: TestClient, ehr: Ehr) -> None:
    req = stay_request()
    del req["prefetch"]["patient"]
    r = _call(client, ehr, req)
    assert r.status_code == 412 and r.json()["issue"][0]["expression"] == ["prefetch.patient"]
    req = stay_request()
    req["prefetch"]["patient"]["birthDate"] = "Jane Doe, 12 Main Street"
    r = _call(client, ehr, req)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    assert "Jane" not in r.text and "Main Street" not in r.text


def test_the_log_holds_no_identifier(client: TestClient, ehr: Ehr, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="clinical_ml.serve")
    _call(client, ehr, stay_request())
    bad = stay_request()
    bad["prefetch"]["encounter"]["period"]["start"] = "pat-4711 enc-0815"
    _call(client, ehr, bad)
    text = caplog.text
    assert "hook icu_mortality_24h 200" in text and "hook icu_mortality_24h 400" in text
    for identifier in ("pat-4711", "enc-0815", "Practitioner/example"):
        assert identifier not in text


# -- property-based: whatever the body, a bad request is a 4xx with an OperationOutcome, never a 500 ---------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
_PATHS = [
    ("hook",),
    ("hookInstance",),
    ("context",),
    ("context", "patientId"),
    ("context", "encounterId"),
    ("prefetch",),
    ("prefetch", "patient"),
    ("prefetch", "patient", "birthDate"),
    ("prefetch", "patient", "gender"),
    ("prefetch", "encounter"),
    ("prefetch", "encounter", "period"),
    ("prefetch", "encounter", "location"),
    ("prefetch", "observations"),
    ("prefetch", "observations", "entry"),
    ("prefetch", "observations", "entry", 0, "resource"),
    ("prefetch", "observations", "entry", 0, "resource", "valueQuantity"),
    ("prefetch", "observations", "entry", 0, "resource", "effectiveDateTime"),
    ("prefetch", "observations", "entry", 0, "resource", "code"),
    ("prefetch", "observations", "entry", 0, "resource", "issued"),
]
_BASE = stay_request(n_vitals=2)


def _mutate(path: tuple, value) -> object:
    body = copy.deepcopy(_BASE)
    node = body
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(_PATHS), value=_json)
def test_any_bad_body_is_a_4xx_never_a_500(client: TestClient, ehr: Ehr, path: tuple, value) -> None:
    r = _call(client, ehr, _mutate(path, value))
    assert r.status_code in (200, 400, 412), r.text
    if r.status_code != 200:
        assert r.json()["resourceType"] == "OperationOutcome"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()))
def test_any_body_at_all_is_never_a_500(client: TestClient, ehr: Ehr, raw: bytes) -> None:
    for path in (f"/cds-services/{USE_CASE}", f"/cds-services/{USE_CASE}/feedback"):
        aud = HOOK if path.endswith(USE_CASE) else f"{HOOK}/feedback"
        r = client.post(path, content=raw, headers={**_auth(ehr, aud), "content-type": "application/json"})
        assert r.status_code in (200, 400, 412), r.text


def test_unknown_service_is_404(client: TestClient, ehr: Ehr) -> None:
    url = f"{SERVICES}/nope"
    r = client.post("/cds-services/nope", json=stay_request(), headers=_auth(ehr, url))
    assert r.status_code == 404 and r.json()["resourceType"] == "OperationOutcome"


def test_a_chart_outside_a_stay_gets_no_card(client: TestClient, ehr: Ehr) -> None:
    req = stay_request()
    del req["context"]["encounterId"]
    r = _call(client, ehr, {**req, "hookInstance": str(uuid.uuid4())})
    assert r.status_code == 200 and r.json()["cards"] == []


def test_report_card_link_serves_the_models_report(client: TestClient, ehr: Ehr, data_root: Path) -> None:
    version = Registry(data_root / "registry", USE_CASE).champion()
    page = data_root / "reports" / USE_CASE / f"report_card_{version}.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html>report card</html>")
    card = _call(client, ehr, stay_request()).json()["cards"][0]
    path = card["links"][0]["url"].removeprefix(BASE_URL)
    r = client.get(path)
    assert r.status_code == 200 and "report card" in r.text
    assert client.get(f"/reports/{USE_CASE}/..%2F..%2Fetc").status_code == 404


def test_nan_and_infinity_are_not_json(client: TestClient, ehr: Ehr) -> None:
    body = json.dumps(stay_request()).replace('"value": 4.5', '"value": NaN', 1)
    assert "NaN" in body
    r = client.post(
        f"/cds-services/{USE_CASE}",
        content=body,
        headers={**_auth(ehr, HOOK), "content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("encounter", "period", "start"), "0001-01-01T00:30:00+01:00"),
        (("encounter", "period", "start"), "9999-12-31T23:30:00-05:00"),
        (("observations", "entry", 0, "resource", "effectiveDateTime"), "0001-01-01T00:00:00+14:00"),
        (("observations", "entry", 0, "resource", "issued"), "9999-12-31T23:59:59-12:00"),
        (("observations", "entry", 0, "resource", "valueQuantity", "value"), 1e308),
        (("patient", "birthDate"), "0001-01-01"),
    ],
)
def test_edge_of_the_calendar_and_huge_values_are_never_a_500(
    client: TestClient, ehr: Ehr, where, value
) -> None:
    r = _call(client, ehr, _mutate(("prefetch", *where), value))
    assert r.status_code in (200, 400), r.text


def test_an_unexpected_error_is_a_500_whose_log_quotes_nothing(
    client: TestClient, ehr: Ehr, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise ValueError("pat-4711 has value 4.5")

    monkeypatch.setattr(client.app.state.service, "cards_for", broken)
    caplog.set_level(logging.INFO)
    r = _call(client, ehr, stay_request())
    assert r.status_code == 500 and r.json()["resourceType"] == "OperationOutcome"
    assert "pat-4711" not in r.text and "pat-4711" not in caplog.text
    assert "outcome=error:ValueError" in caplog.text


def test_an_error_outside_the_hook_s_work_is_a_500_whose_log_quotes_nothing(
    client: TestClient, ehr: Ehr, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise ValueError("pat-4711 has value 4.5")

    monkeypatch.setattr(client.app.state.service, "audiences", broken)
    r = _call(client, ehr, stay_request())
    assert r.status_code == 500 and r.json()["resourceType"] == "OperationOutcome"
    assert "pat-4711" not in r.text and "pat-4711" not in caplog.text
    assert "unexpected ValueError on POST" in caplog.text


def test_a_hook_is_answered_alike_by_the_shortcut_and_by_fastapi_s_route(
    client: TestClient, ehr: Ehr, monkeypatch: pytest.MonkeyPatch
) -> None:
    def answer() -> tuple[int, dict, dict]:
        r = _call(client, ehr, stay_request())
        body = r.json()
        for card in body.get("cards", []):
            card.pop("uuid")
        return r.status_code, {k: v for k, v in r.headers.items() if k != "content-length"}, body

    short = answer()
    monkeypatch.setattr(client.app, "hook_call", None)  # every call through FastAPI's routing
    assert answer() == short and short[0] == 200
    assert client.post(f"/cds-services/{USE_CASE}", content=b"{}").status_code == 401  # no token
    assert client.post(f"/cds-services/{USE_CASE}/", content=b"{}").status_code < 500  # FastAPI's
