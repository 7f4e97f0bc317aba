"""The CDS Hooks service against the real pipeline's outputs (the shared synthetic graph run).

1. No training-serving skew: stays of the batch cohort, rendered as FHIR from the raw rows the hospital
   delivered (phi zone: delivered units, site clock), give the batch path's features and scores exactly.
2. As an EHR calls it: ``clinical-ml serve`` started with uvicorn in a subprocess on a free loopback port,
   called with httpx and signed JWTs: discovery, a hook with prefetch, a card, feedback, a promotion during
   the test served without a restart, and no identifier in the service's log.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import numpy as np
import polars as pl
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from clinical_ml.core.artifacts import DeidStore, PhiStore
from clinical_ml.core.features import feature_matrix
from clinical_ml.core.pseudonyms import normalize_identifier
from clinical_ml.core.registry import PromotionDecision, Registry, new_version
from clinical_ml.core.scoring import Scorer
from clinical_ml.core.site_mapping import load_site_mapping
from clinical_ml.core.usecase import load_use_case
from clinical_ml.serve.chart import chart_from_prefetch
from clinical_ml.serve.examples import example_request, hook_request
from clinical_ml.serve.models import ChampionWatch, served_model
from clinical_ml.serve.records import ServingRecords
from clinical_ml_tests.conftest import PROJECT_ROOT, GraphRun
from clinical_ml_tests.serve.conftest import ISSUER, Ehr
from clinical_ml_tests.service_process import wait_until_serving

pytestmark = pytest.mark.slow
USE_CASE = "icu_mortality_24h"
SITE_CLOCK = ZoneInfo("UTC")
N_STAYS = 40


def _approved_registry(root: Path) -> Registry:
    """The run's registry; when the gate refused the only model of this small run, a manual approval is
    recorded (as the demo's --approve-first-model does) so that there is a champion to serve."""
    registry = Registry(root / "registry", USE_CASE)
    if registry.champion() is None:
        registry.record_decision(PromotionDecision(True, registry.versions()[-1], None, ("manual approval",)))
    return registry


def _world(run: GraphRun, tmp: Path) -> Path:
    """A copy of the run's zones the service may change (the graph run is shared by other tests)."""
    root = tmp / "data"
    for zone in ("registry", "reports", "usecases"):
        if (run.data_root / zone).exists():
            shutil.copytree(run.data_root / zone, root / zone)
    _approved_registry(root)
    return root


def _stays(run: GraphRun, n: int) -> list[dict]:
    """``n`` cohort rows with their raw rows (phi zone) and their prediction time on the site's clock."""
    root = run.data_root
    store = DeidStore(root / "deid", root / "reports").use_case(USE_CASE)
    cohort = store.cohort.read().sample(n, seed=3, shuffle=True)
    phi = PhiStore(root / "phi")
    vault = phi.read_vault()
    raw = {s: phi.raw(s).read_all() for s in ("patients", "encounters", "labs", "vitals")}
    wanted = vault.encounters.filter(pl.col("hadm_id").is_in(cohort["hadm_id"].implode()))["encounter_id"]
    for s in ("encounters", "labs", "vitals"):
        raw[s] = (
            raw[s]
            .with_columns(normalize_identifier(pl.col("encounter_id")).alias("_enc"))
            .filter(pl.col("_enc").is_in(wanted.implode()))
        )
    raw["patients"] = raw["patients"].with_columns(normalize_identifier(pl.col("mrn")).alias("_mrn"))
    out = []
    for row in cohort.iter_rows(named=True):
        enc_id = vault.encounters.filter(pl.col("hadm_id") == row["hadm_id"])["encounter_id"][0]
        pat = vault.patients.filter(pl.col("subject_id") == row["subject_id"]).row(0, named=True)
        encounter = raw["encounters"].filter(pl.col("_enc") == enc_id).row(-1, named=True)
        patient = raw["patients"].filter(pl.col("_mrn") == pat["mrn"]).row(-1, named=True)
        value, unit = ("value_raw", "unit_raw")
        labs = (
            raw["labs"]
            .filter(pl.col("_enc") == enc_id)
            .select(
                "loinc_code",
                pl.col(value).alias("value"),
                pl.col(unit).alias("unit"),
                "specimen_time",
                "result_time",
            )
            .to_dicts()
        )
        vitals = (
            raw["vitals"]
            .filter(pl.col("_enc") == enc_id)
            .select(
                "code",
                pl.col(value).alias("value"),
                pl.col(unit).alias("unit"),
                "charted_time",
                "stored_time",
            )
            .to_dicts()
        )
        out.append(
            {
                "key": (row["hadm_id"], row["prediction_time"]),
                "predicted_at": row["prediction_time"] - timedelta(days=pat["shift_days"]),
                "request": hook_request(
                    hook="patient-view",
                    patient=patient,
                    encounter={**encounter, "discharge_time": None},
                    labs=labs,
                    vitals=vitals,
                    tz=SITE_CLOCK,
                    patient_id=f"canary-patient-{len(out)}",
                    encounter_id=f"canary-stay-{len(out)}",
                ),
            }
        )
    return out


def test_served_features_and_scores_equal_the_batch_path(graph_run: GraphRun) -> None:
    root = graph_run.data_root
    uc = load_use_case(root / "usecases" / f"{USE_CASE}.yaml")
    registry = Registry(root / "registry", USE_CASE)
    version = registry.champion() or registry.versions()[-1]
    served = served_model(registry, uc, version)
    names = list(served.card.feature_names)
    batch = DeidStore(root / "deid", root / "reports").use_case(USE_CASE).features.read()
    plain = Scorer(served.scorer.model, served.card.threshold, served.card.training_ranges)
    mapping = load_site_mapping()
    stays = _stays(graph_run, N_STAYS)
    compared = 0
    for stay in stays:
        req = stay["request"]
        chart = chart_from_prefetch(
            req["prefetch"],
            context=req["context"],
            prediction_time=stay["predicted_at"],
            site_mapping=mapping,
            tz=SITE_CLOCK,
        )
        mine = feature_matrix(served.features(chart), names)
        hadm, at = stay["key"]
        theirs = feature_matrix(
            batch.filter((pl.col("hadm_id") == hadm) & (pl.col("prediction_time") == at)), names
        )
        assert theirs.shape == (1, len(names))
        differ = [
            n
            for n, a, b in zip(names, mine[0], theirs[0], strict=True)
            if not (np.isnan(a) and np.isnan(b)) and a != b
        ]
        assert not differ, f"stay {hadm}: features differ from the batch path: {differ}"
        assert plain.score(mine)[0].risk == plain.score(theirs)[0].risk
        compared += 1
    assert compared == N_STAYS
    # the stays measured something: the comparison is not one of empty rows
    assert sum(len(s["request"]["prefetch"]["observations"]["entry"]) for s in stays) > N_STAYS * 20


def test_the_documentations_example_stay_is_scored_by_a_champion_of_the_synthetic_hospital(
    graph_run: GraphRun,
) -> None:
    """The README's curl example (``python -m clinical_ml.serve.examples``) gets a risk from a model trained on
    the synthetic hospital, not "not scored": its chart is within the derivation ranges."""
    root = graph_run.data_root
    uc = load_use_case(root / "usecases" / f"{USE_CASE}.yaml")
    registry = Registry(root / "registry", USE_CASE)
    served = served_model(registry, uc, registry.champion() or registry.versions()[-1])
    req = example_request(tz=SITE_CLOCK)
    admitted = req["prefetch"]["encounter"]["period"]["start"]
    chart = chart_from_prefetch(
        req["prefetch"],
        context=req["context"],
        prediction_time=datetime.fromisoformat(admitted).replace(tzinfo=None) + timedelta(hours=24),
        site_mapping=load_site_mapping(),
        tz=SITE_CLOCK,
    )
    (score,) = served.scorer.score(feature_matrix(served.features(chart), list(served.card.feature_names)))
    assert not score.abstained, score.flags
    assert 0 < score.risk < 1


# -- the service as an EHR calls it ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ehr() -> Ehr:
    return Ehr(ec.generate_private_key(ec.SECP384R1()), "ehr-key-1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def service(graph_run: GraphRun, tmp_path: Path, ehr: Ehr):
    root = _world(graph_run, tmp_path)
    (tmp_path / "jwks.json").write_text(json.dumps(ehr.jwks()))
    trust = tmp_path / "trust.yaml"
    trust.write_text(f"issuers:\n  - iss: {ISSUER}\n    jwks_file: jwks.json\n")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CLINICAL_ML_DATA_ROOT": str(root),
        "CLINICAL_ML_USECASES": str(root / "usecases"),
        "CLINICAL_ML_SERVE_URL": base,
        "CLINICAL_ML_SERVE_TRUST": str(trust),
        "CLINICAL_ML_SITE_TIMEZONE": "UTC",
    }
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(PROJECT_ROOT / ".venv" / "bin" / "clinical-ml"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_serving(base, proc, log)
        yield base, root, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _auth(ehr: Ehr, aud: str) -> dict:
    return {"Authorization": f"Bearer {ehr.token(aud)}"}


def test_an_ehr_calls_the_service_and_a_promotion_is_served_without_restart(
    graph_run: GraphRun, service, ehr: Ehr
) -> None:
    base, root, log = service
    services = f"{base}/cds-services"
    assert httpx.get(services, timeout=10).status_code == 401  # no token
    found = httpx.get(services, headers=_auth(ehr, services), timeout=10)
    assert found.status_code == 200
    listed = {s["id"]: s for s in found.json()["services"]}
    assert listed[USE_CASE]["hook"] == "patient-view"
    assert set(listed[USE_CASE]["prefetch"]) >= {"patient", "encounter", "observations"}
    assert "http://loinc.org|2524-7" in listed[USE_CASE]["prefetch"]["observations"]

    registry = Registry(root / "registry", USE_CASE)
    first = registry.champion()
    stay = _stays(graph_run, 1)[0]
    url = f"{services}/{USE_CASE}"
    request = stay["request"]
    answer = httpx.post(url, json=request, headers=_auth(ehr, url), timeout=30)
    assert answer.status_code == 200, answer.text
    card = answer.json()["cards"][0]
    assert answer.headers["X-Model-Version"] == first
    assert card["extension"]["clinical-ml-model-version"] == first
    assert card["indicator"] in ("info", "warning", "critical")
    # a token is used once
    token = ehr.token(url)
    assert (
        httpx.post(url, json=request, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code
        == 200
    )
    assert (
        httpx.post(url, json=request, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code
        == 401
    )

    feedback_url = f"{url}/feedback"
    fb = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": card["overrideReasons"][0], "userComment": "spoke with family"},
                "outcomeTimestamp": "2026-03-03T14:05:00Z",
            }
        ]
    }
    assert httpx.post(feedback_url, json=fb, headers=_auth(ehr, feedback_url), timeout=10).status_code == 200
    recorded = ServingRecords(root / "phi").read(USE_CASE, "feedback")
    assert recorded[-1]["override_reason"] == card["overrideReasons"][0]["code"]
    assert recorded[-1]["model_version"] == first and recorded[-1]["card_served_here"]

    # promotion while the service runs: a new version approved by a recorded decision is served next
    second = new_version()
    old = registry.card(first)
    registry.register(type(old)(**{**old.__dict__, "version": second}), model_text=registry.model_text(first))
    registry.record_decision(PromotionDecision(True, second, first, ("gate passed",)))
    again = httpx.post(
        url, json={**request, "hookInstance": str(uuid.uuid4())}, headers=_auth(ehr, url), timeout=30
    )
    assert again.status_code == 200 and again.headers["X-Model-Version"] == second

    served = ServingRecords(root / "phi").read(USE_CASE, "predictions")
    assert [r["model_version"] for r in served][-1] == second
    text = log.read_text()
    for identifier in (
        request["context"]["patientId"],
        request["context"]["encounterId"],
        "spoke with family",
    ):
        assert identifier not in text
    assert f"model={second}" in text


def test_a_pointer_moved_without_a_decision_is_not_served(graph_run: GraphRun, tmp_path: Path) -> None:
    root = _world(graph_run, tmp_path)
    uc = load_use_case(root / "usecases" / f"{USE_CASE}.yaml")
    registry = Registry(root / "registry", USE_CASE)
    watch = ChampionWatch(root / "registry", uc)
    assert watch.current().version == registry.champion()
    rogue = new_version()
    old = registry.card(registry.champion())
    registry.register(
        type(old)(**{**old.__dict__, "version": rogue}), model_text=registry.model_text(old.version)
    )
    registry.set_champion(rogue)  # no decision recorded
    assert not watch.servable()
