"""`make dev` as a developer runs it, started the way a non-interactive shell starts a background job
(SIGINT ignored): SIGINT or SIGTERM to its process group stops the webserver, daemon and code servers within
10 s. It uses its own Dagster home, data root and a free port."""

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from clinical_ml_tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
STOP_WITHIN_S = 10


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _running(pids: set[int]) -> set[int]:
    alive = set()
    for p in pids:
        stat = Path(f"/proc/{p}/stat")
        try:
            if stat.read_text().rsplit(") ", 1)[1].split()[0] != "Z":
                alive.add(p)
        except (OSError, IndexError):
            pass
    return alive


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_make_dev_stops_within_10_s_of_a_signal_to_its_process_group(tmp_path, signum):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    venv_synced = PROJECT_ROOT / ".venv" / ".synced"
    log = (tmp_path / "make.log").open("wb")
    make = subprocess.Popen(
        [
            "make",
            "-C",
            str(PROJECT_ROOT),
            "-o",
            str(venv_synced),  # the environment is the one running this test: never re-sync it here
            f"DAGSTER_HOME={tmp_path / 'home'}",
            f"CLINICAL_ML_DATA_ROOT={tmp_path / 'data'}",
            f"PORT={port}",
            "dev",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_ignore_sigint,
    )
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert make.poll() is None, (tmp_path / "make.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "make dev did not serve within 180 s"
            time.sleep(0.5)
        time.sleep(2)
        tree = _descendants(make.pid)
        assert len(tree) >= 4  # wrapper, dagster dev, webserver, daemon (and code servers)
        started = time.monotonic()
        os.killpg(make.pid, signum)
        while (make.poll() is None or _running(tree)) and time.monotonic() - started < 30:
            time.sleep(0.2)
        took = time.monotonic() - started
        assert make.poll() is not None and not _running(tree), f"still running after {took:.0f} s"
        assert took <= STOP_WITHIN_S, f"stopped after {took:.1f} s"
    finally:
        for p in _running(tree | {make.pid}):
            os.kill(p, signal.SIGKILL)
        make.wait(timeout=10)
        log.close()
