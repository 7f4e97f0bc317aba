"""Served predictions reach monitoring (issue 20 item 4): recorded in the phi zone as served, then released
pseudonymised into the de-identified layer by the feedback path's machinery, with the calls answered."""

from datetime import UTC
from pathlib import Path

import dagster as dg
import polars as pl

from clinical_ml.core.artifacts import UseCaseStore
from clinical_ml.core.pseudonyms import HmacKey, hmac_ids
from clinical_ml.core.registry import Registry
from clinical_ml.defs.usecase.feedback import build_feedback_assets
from clinical_ml.resources.settings import AnonymizationSettings
from clinical_ml.resources.zones import DataZones
from clinical_ml.serve.app import create_app
from clinical_ml.serve.records import ServingRecords
from clinical_ml.serve.settings import ServiceSettings
from clinical_ml_tests.serve.conftest import BASE_URL, NOW, USE_CASE, Ehr, stay_request, use_case

SECRET = "s" * 40
HOOK = f"{BASE_URL}/cds-services/{USE_CASE}"


def _release(data_root: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        build_feedback_assets(use_case())[:1],
        resources={
            "zones": DataZones(root=str(data_root)),
            "anonymization": AnonymizationSettings(pseudonym_mode="hmac", hmac_secret=SECRET),
        },
    )


def test_served_predictions_and_calls_reach_the_deidentified_layer(
    data_root: Path, usecases_dir: Path, trust_file: Path, ehr: Ehr
) -> None:
    from fastapi.testclient import TestClient

    settings = ServiceSettings(
        data_root=data_root, usecases_dir=usecases_dir, base_url=BASE_URL, trust_file=trust_file
    )
    client = TestClient(create_app(settings, clock=lambda: NOW.replace(tzinfo=UTC)), base_url=BASE_URL)
    auth = {"Authorization": f"Bearer {ehr.token(HOOK)}"}
    cards = [
        client.post(
            f"/cds-services/{USE_CASE}",
            json=stay_request(lactate=v),
            headers={"Authorization": f"Bearer {ehr.token(HOOK)}"},
        ).json()["cards"][0]
        for v in (1.0, 9.0)
    ]
    early = stay_request()
    early["prefetch"]["encounter"]["period"]["start"] = "2026-03-03T13:00:00+00:00"  # 1 h in: not eligible
    assert (
        client.post(
            f"/cds-services/{USE_CASE}", json=early, headers={"Authorization": f"Bearer {ehr.token(HOOK)}"}
        ).status_code
        == 200
    )
    bad = stay_request()
    bad["prefetch"]["patient"]["birthDate"] = "pat-4711"
    assert client.post(f"/cds-services/{USE_CASE}", json=bad, headers=auth).status_code == 400
    assert client.post(f"/cds-services/{USE_CASE}", json=bad, headers=auth).status_code == 401  # replayed

    res = _release(data_root)
    assert res.success
    store = UseCaseStore(data_root / "deid", data_root / "reports", USE_CASE)
    served = store.served_predictions.read()
    phi = ServingRecords(data_root / "phi").read(USE_CASE, "predictions")
    key = HmacKey(SECRET.encode())
    assert (
        served["subject_id"].to_list()
        == hmac_ids(pl.Series(["PAT-4711"] * 3), key=key, kind="subject").to_list()
    )
    assert (
        served["hadm_id"].to_list() == hmac_ids(pl.Series(["ENC-0815"] * 3), key=key, kind="hadm").to_list()
    )
    assert served["outcome"].to_list() == ["scored", "scored", "not_eligible"]
    assert served["risk"].to_list()[:2] == [r["risk"] for r in phi[:2]] and served["risk"][2] is None
    assert served["risk_band"].to_list() == [c["indicator"] for c in cards] + [None]
    assert served["model_version"].to_list() == [Registry(data_root / "registry", USE_CASE).champion()] * 3
    assert set(served["period"]) == {"2026Q1"}

    calls = store.service_requests.read()
    assert calls.select("status", "outcome").rows() == [
        (200, "scored"),
        (200, "scored"),
        (200, "not_eligible"),
        (400, "bad_fhir"),
        (401, "auth"),
    ]
    # no EHR id, card, hook call or value of the request crosses
    deid = b"".join(p.read_bytes() for p in (data_root / "deid").rglob("*") if p.is_file())
    for secret in ("pat-4711", "enc-0815", "PAT-4711", cards[0]["uuid"], phi[0]["hook_instance"]):
        assert secret.encode() not in deid

    # the patient objects: none of their served predictions is released at the next run
    (data_root / "phi" / "consent").mkdir(parents=True)
    (data_root / "phi" / "consent" / "opt_out.csv").write_text("mrn,objected_on\nPAT-4711,2026-03-04\n")
    res = _release(data_root)
    assert res.success and store.served_predictions.read().height == 0
    (event,) = res.get_asset_materialization_events()
    assert event.materialization.metadata["served_withheld_by_consent"].value == 3
