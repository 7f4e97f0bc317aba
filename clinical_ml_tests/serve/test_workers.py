"""``clinical-ml serve --workers 2``: two processes on one port, one set of used tokens and cards served.

Started as an EHR would meet it (uvicorn in a subprocess, httpx, signed tokens): every token is accepted once
whichever worker answers, and feedback on a card served by one worker finds the card's model version when
another answers it. Connections are spread evenly over the two workers (on Linux, where the parent hands each
to the worker that holds the fewest: :mod:`clinical_ml.serve.balance`)."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from clinical_ml.serve.balance import balances_connections
from clinical_ml.serve.records import ServingRecords
from clinical_ml_tests.conftest import PROJECT_ROOT
from clinical_ml_tests.serve.conftest import USE_CASE, Ehr, stay_request
from clinical_ml_tests.service_process import wait_until_serving

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _two_workers(
    data_root: Path, usecases_dir: Path, trust_file: Path, log: Path
) -> Iterator[tuple[str, int]]:
    """``clinical-ml serve --workers 2`` on a free loopback port, serving: (its base URL, the parent's pid)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CLINICAL_ML_DATA_ROOT": str(data_root),
        "CLINICAL_ML_USECASES": str(usecases_dir),
        "CLINICAL_ML_SERVE_URL": base,
        "CLINICAL_ML_SERVE_TRUST": str(trust_file),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clinical_ml.cli", "serve", "--port", str(port), "--workers", "2"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_serving(base, proc, log)
        yield base, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_two_workers_accept_each_token_once_and_share_the_cards(
    data_root: Path, usecases_dir: Path, trust_file: Path, ehr: Ehr, tmp_path: Path
) -> None:
    with _two_workers(data_root, usecases_dir, trust_file, tmp_path / "service.log") as (base, _):
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


CONNECTIONS = 40
TAKES = re.compile(r"worker process (\d+) takes connections from its parent")


def _taking_workers(parent: int, log: Path, *, started: int) -> dict[int, psutil.Process]:
    """Wait until ``started`` workers have said (in the log) that they take connections, two of them alive
    now: those two."""
    deadline = time.monotonic() + 90
    while True:
        said = [int(m[1]) for m in TAKES.finditer(log.read_text(errors="replace"))]
        children = {c.pid: c for c in psutil.Process(parent).children()}
        workers = {pid: children[pid] for pid in said if pid in children and children[pid].is_running()}
        if len(said) >= started and len(workers) == 2:
            return workers
        assert time.monotonic() < deadline, f"{len(said)} workers took connections, {len(workers)} alive"
        time.sleep(0.2)


def _established(port: int, worker: psutil.Process) -> int:
    return sum(
        1
        for conn in worker.net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
    )


def _connections_held(port: int, workers: dict[int, psutil.Process]) -> dict[int, int]:
    """Open ``CONNECTIONS`` at once (as an EHR's pool of keep-alive connections), then ask ``/healthz`` on
    each, all answered 200: how many of them each worker holds. Returns once the workers hold none again
    (the parent has heard of every close)."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(CONNECTIONS)]
    try:
        for c in clients:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        for c in clients:
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):
                chunk = c.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), answer
        return {pid: _established(port, worker) for pid, worker in workers.items()}
    finally:
        for c in clients:
            c.close()
        deadline = time.monotonic() + 30
        while any(_established(port, w) for w in workers.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the workers' word of the closes reaches the parent


@pytest.mark.skipif(not balances_connections(), reason="connections are handed to workers on Linux")
def test_connections_are_spread_evenly_over_the_workers_and_a_dead_worker_takes_none(
    data_root: Path, usecases_dir: Path, trust_file: Path, tmp_path: Path
) -> None:
    log = tmp_path / "service.log"
    with _two_workers(data_root, usecases_dir, trust_file, log) as (base, parent):
        port = int(base.rsplit(":", 1)[1])
        workers = _taking_workers(parent, log, started=2)
        time.sleep(0.2)  # the closes of the start-up checks' connections reach the parent
        # the parent hands each connection to the worker that holds the fewest: 20 and 20
        held = _connections_held(port, workers)
        assert sorted(held.values()) == [CONNECTIONS // 2] * 2, held

        # a worker killed: the parent hears its end close, and every new connection reaches the other one
        dead, alive = workers.values()
        dead.kill()
        dead.wait(timeout=10)
        held = _connections_held(port, {alive.pid: alive})
        assert held == {alive.pid: CONNECTIONS}

        # uvicorn starts another in its place, which takes connections once its app is ready: even again
        workers = _taking_workers(parent, log, started=3)
        assert alive.pid in workers and dead.pid not in workers
        held = _connections_held(port, workers)
        assert sorted(held.values()) == [CONNECTIONS // 2] * 2, held


@pytest.mark.skipif(not balances_connections(), reason="connections are handed to workers on Linux")
def test_a_restart_replaces_every_worker_once_the_new_one_is_ready(
    data_root: Path, usecases_dir: Path, trust_file: Path, tmp_path: Path
) -> None:
    """SIGHUP (uvicorn's restart): each worker is replaced by a new one once that one's app is ready (it takes
    longer to load than uvicorn's 5 s health check), and the service answers throughout."""
    log = tmp_path / "service.log"
    with _two_workers(data_root, usecases_dir, trust_file, log) as (base, parent):
        port = int(base.rsplit(":", 1)[1])
        old = _taking_workers(parent, log, started=2)
        os.kill(parent, signal.SIGHUP)
        deadline = time.monotonic() + 300
        with httpx.Client(timeout=30) as client:
            while True:
                assert client.get(f"{base}/healthz").status_code == 200
                workers = _taking_workers(parent, log, started=2)
                if not set(workers) & set(old):
                    break
                assert time.monotonic() < deadline, "the old workers were not replaced"
                time.sleep(0.5)
        assert "aborting the restart" not in log.read_text(errors="replace")
        assert "not ready in time" not in log.read_text(errors="replace")
        held = _connections_held(port, workers)
        assert sorted(held.values()) == [CONNECTIONS // 2] * 2, held
