"""``clinical-ml serve --workers 2``: two processes on one port, one set of used tokens and cards served.

Started as an EHR would meet it (uvicorn in a subprocess, httpx, signed tokens): every token is accepted once
whichever worker answers, and feedback on a card served by one worker finds the card's model version when
another answers it."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from clinical_ml.serve.records import ServingRecords
from clinical_ml_tests.conftest import PROJECT_ROOT
from clinical_ml_tests.serve.conftest import USE_CASE, Ehr, stay_request
from clinical_ml_tests.service_process import wait_until_serving

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_workers_accept_each_token_once_and_share_the_cards(
    data_root: Path, usecases_dir: Path, trust_file: Path, ehr: Ehr, tmp_path: Path
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CLINICAL_ML_DATA_ROOT": str(data_root),
        "CLINICAL_ML_USECASES": str(usecases_dir),
        "CLINICAL_ML_SERVE_URL": base,
        "CLINICAL_ML_SERVE_TRUST": str(trust_file),
    }
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(PROJECT_ROOT / ".venv" / "bin" / "clinical-ml"),
                "serve",
                "--port",
                str(port),
                "--workers",
                "2",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_serving(base, proc, log)
        url = f"{base}/cds-services/{USE_CASE}"
        cards = []
        with httpx.Client(timeout=30) as first, httpx.Client(timeout=30) as second:  # two connections
            for _ in range(6):
                token = ehr.token(url)
                answer = first.post(url, json=stay_request(), headers={"Authorization": f"Bearer {token}"})
                assert answer.status_code == 200, answer.text
                cards.append(answer.json()["cards"][0])
                again = second.post(url, json=stay_request(), headers={"Authorization": f"Bearer {token}"})
                assert again.status_code == 401
            feedback = {
                "feedback": [
                    {"card": c["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-03-03T14:05:00Z"}
                    for c in cards
                ]
            }
            fb_url = f"{url}/feedback"
            r = second.post(fb_url, json=feedback, headers={"Authorization": f"Bearer {ehr.token(fb_url)}"})
            assert r.status_code == 200, r.text
        answers = ServingRecords(data_root / "phi").read(USE_CASE, "feedback")
        assert len(answers) == 6 and all(a["card_served_here"] and a["model_version"] for a in answers)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
