"""Clinician feedback as Dagster assets (issue 20 item 6) on a small registry: cards served and answered
through the service's app (as an EHR would), then pseudonymised and monitored by the use case's assets.

The small registry and the EHR's keys are the service tests' fixtures, imported here by name."""
# ruff: noqa: F811

from datetime import UTC
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from fastapi.testclient import TestClient

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.pseudonyms import HmacKey, hmac_ids
from clinical_ml.defs.usecase.feedback import RISING_CHECK, build_feedback_assets
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml.resources.zones import DataZones
from clinical_ml.serve.app import create_app
from clinical_ml.serve.settings import ServiceSettings
from clinical_ml_tests.serve.conftest import (  # noqa: F401 (fixtures)
    BASE_URL,
    NOW,
    USE_CASE,
    Ehr,
    data_root,
    ehr,
    stay_request,
    trained_registry,
    trust_file,
    use_case,
    usecases_dir,
)

SECRET = "k" * 40
HOOK = f"{BASE_URL}/cds-services/{USE_CASE}"
COMMENT = "Spoke with Mrs Canaryfield, family declines"


def _serve_and_answer(data_root: Path, usecases_dir: Path, trust_file: Path, ehr: Ehr) -> list[dict]:
    settings = ServiceSettings(
        data_root=data_root, usecases_dir=usecases_dir, base_url=BASE_URL, trust_file=trust_file
    )
    client = TestClient(create_app(settings, clock=lambda: NOW.replace(tzinfo=UTC)), base_url=BASE_URL)
    cards = []
    for _ in range(3):
        r = client.post(
            f"/cds-services/{USE_CASE}",
            json=stay_request(),
            headers={"Authorization": f"Bearer {ehr.token(HOOK)}"},
        )
        assert r.status_code == 200, r.text
        cards.append(r.json()["cards"][0])
    offered = cards[0]["overrideReasons"][0]
    feedback = [
        {
            "card": cards[0]["uuid"],
            "outcome": "overridden",
            "outcomeTimestamp": "2026-03-03T14:05:00Z",
            "overrideReason": {"reason": offered, "userComment": COMMENT},
        },
        {
            "card": cards[1]["uuid"],
            "outcome": "overridden",
            "outcomeTimestamp": "2026-03-03T14:05:00Z",
            "overrideReason": {"reason": {"system": "x", "code": "pat-4711 wrong"}},
        },
        {"card": cards[2]["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-03T14:06:00Z"},
    ]
    r = client.post(
        f"/cds-services/{USE_CASE}/feedback",
        json={"feedback": feedback},
        headers={"Authorization": f"Bearer {ehr.token(f'{HOOK}/feedback')}"},
    )
    assert r.status_code == 200, r.text
    return cards


def _materialization(res: dg.ExecuteInProcessResult, stage: str) -> dg.AssetMaterialization:
    (event,) = [
        e
        for e in res.get_asset_materialization_events()
        if e.asset_key and e.asset_key.path[-1].endswith(stage)
    ]
    return event.materialization


def _materialize(data_root: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        build_feedback_assets(use_case()),
        resources={
            "zones": DataZones(root=str(data_root)),
            "anonymization": AnonymizationSettings(pseudonym_mode="hmac", hmac_secret=SECRET),
        },
    )


def test_feedback_is_pseudonymised_into_its_own_source_and_monitored(
    data_root: Path,
    usecases_dir: Path,
    trust_file: Path,
    ehr: Ehr,
) -> None:
    cards = _serve_and_answer(data_root, usecases_dir, trust_file, ehr)
    res = _materialize(data_root)
    assert res.success
    store = UseCaseStore(data_root / "deid", data_root / "reports", USE_CASE)
    released = store.clinician_feedback.read()
    subject = hmac_ids(pl.Series(["PAT-4711"]), key=HmacKey(SECRET.encode()), kind="subject")
    assert released["subject_id"].to_list() == [subject[0]] * 3
    assert released["outcome"].to_list() == ["overridden", "overridden", "accepted"]
    assert released["override_reason"].to_list() == [cards[0]["overrideReasons"][0]["code"], "unmapped", None]
    assert released["risk_band"].to_list() == [c["indicator"] for c in cards]

    # nothing identifying in the de-identified zone or in the event log
    deid_bytes = b"".join(p.read_bytes() for p in (data_root / "deid").rglob("*") if p.is_file())
    events = str([e.event_specific_data for e in res.all_events if e.event_specific_data is not None]) + str(
        res.get_asset_materialization_events()
    )
    for secret in ("Canaryfield", "pat-4711", "enc-0815", cards[0]["uuid"]):
        assert secret.encode() not in deid_bytes and secret not in events

    # three answers (< min_cell_size 11): every count masked, the rule not judged and said so
    (check,) = res.get_asset_check_evaluations()
    assert check.check_name == RISING_CHECK and check.passed
    assert check.description is not None and check.description.startswith("override rate not judged")
    report = _materialization(res, "feedback_monitoring").metadata["report"].value
    assert isinstance(report, str) and r"| all | \<11 | masked |" in report

    # the patient objects: at the next run none of their feedback is in the de-identified zone
    (data_root / "phi" / "consent").mkdir(parents=True)
    (data_root / "phi" / "consent" / "opt_out.csv").write_text("mrn,objected_on\nPAT-4711,2026-03-04\n")
    res = _materialize(data_root)
    assert res.success and store.clinician_feedback.read().height == 0
    assert _materialization(res, "clinician_feedback").metadata["withheld_by_consent"].value == 3


def test_hmac_mode_without_a_secret_stops_with_a_clear_error(data_root: Path) -> None:
    with pytest.raises(Exception, match="CLINICAL_ML_PSEUDONYM_KEY"):
        dg.materialize(
            build_feedback_assets(use_case())[:1],
            resources={
                "zones": DataZones(root=str(data_root)),
                "anonymization": AnonymizationSettings(pseudonym_mode="hmac", hmac_secret=None),
            },
        )
