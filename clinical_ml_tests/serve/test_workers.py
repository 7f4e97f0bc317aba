"""``clinical-ml serve --workers 2``: two processes on one port, one set of used tokens and cards served.

Started as an EHR would meet it (uvicorn in a subprocess, httpx, signed tokens): every token is accepted once
whichever worker answers, and feedback on a card served by one worker finds the card's model version when
another answers it. Connections that arrive together are spread over the two workers (on Linux, where each
worker listens on a socket of its own)."""

import os
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
# Each connection is hashed to one worker's socket: one of the two holds 7 or fewer of 40 with a chance of
# about 4 in 100,000 (binomial, p = 1/2). One shared socket gave the connections that arrived together to
# whichever worker woke first.
AT_LEAST = 8


def _listening_workers(parent: int, port: int) -> dict[int, psutil.Process]:
    """The parent's child processes that listen on ``port`` (the workers, once each has started)."""
    found = {}
    for child in psutil.Process(parent).children():
        try:
            conns = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
            found[child.pid] = child
    return found


def _wait_for_listening_workers(
    parent: int, port: int, log: Path, *, started: int
) -> dict[int, psutil.Process]:
    """Wait until ``started`` workers have made their app ready (the log says so) and two listen."""
    deadline = time.monotonic() + 90
    while True:
        ready = log.read_text(errors="replace").count("Application startup complete")
        workers = _listening_workers(parent, port)
        if ready >= started and len(workers) == 2:
            return workers
        assert time.monotonic() < deadline, f"{ready} workers started, {len(workers)} listening"
        time.sleep(0.2)


def _connections_held(port: int, workers: dict[int, psutil.Process]) -> dict[int, int]:
    """Open ``CONNECTIONS`` at once (as an EHR's pool of keep-alive connections), then ask ``/healthz`` on
    each, all answered 200: how many of them each worker holds."""
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
        return {
            pid: sum(
                1
                for conn in worker.net_connections(kind="tcp")
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port
            )
            for pid, worker in workers.items()
        }
    finally:
        for c in clients:
            c.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads connections on Linux")
def test_connections_are_spread_over_both_workers_and_a_dead_worker_takes_none(
    data_root: Path, usecases_dir: Path, trust_file: Path, tmp_path: Path
) -> None:
    log = tmp_path / "service.log"
    with _two_workers(data_root, usecases_dir, trust_file, log) as (base, parent):
        port = int(base.rsplit(":", 1)[1])
        workers = _wait_for_listening_workers(parent, port, log, started=2)
        held = _connections_held(port, workers)
        assert sum(held.values()) == CONNECTIONS, held
        assert min(held.values()) >= AT_LEAST, held

        # a worker killed: its socket closes with it, and every new connection reaches the other one
        dead, alive = workers.values()
        dead.kill()
        dead.wait(timeout=10)
        held = _connections_held(port, {alive.pid: alive})
        assert held == {alive.pid: CONNECTIONS}

        # uvicorn starts another in its place, on a socket of its own: the connections are spread again
        workers = _wait_for_listening_workers(parent, port, log, started=3)
        assert alive.pid in workers and dead.pid not in workers
        held = _connections_held(port, workers)
        assert sum(held.values()) == CONNECTIONS, held
        assert min(held.values()) >= AT_LEAST, held
