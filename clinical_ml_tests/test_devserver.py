"""``make dev`` stops when asked: the dev server wrapper passes SIGINT/SIGTERM to its command's whole process
group, resets inherited ignores, and kills what outlives the grace period."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# a command that starts a grandchild, writes both pids, then sleeps; with "stubborn" both ignore SIGINT/SIGTERM
_COMMAND = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[2], "w").write(f"{os.getpid()} {grandchild.pid}")
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def _ignore_sigint() -> None:
    # what a job started in the background by a non-interactive shell inherits
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(tmp_path: Path, mode: str, grace_s: float) -> tuple[subprocess.Popen, list[int]]:
    pids = tmp_path / "pids"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinical_ml.devserver", sys.executable, "-c", _COMMAND, mode, str(pids)],
        env={**os.environ, "CLINICAL_ML_DEV_STOP_GRACE_S": str(grace_s)},
        start_new_session=True,
        preexec_fn=_ignore_sigint,
    )
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the command did not start"
        time.sleep(0.1)
    return proc, [int(p) for p in pids.read_text().split()]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_reaches_every_process_although_the_shell_ignored_sigint(tmp_path, signum):
    proc, pids = _start(tmp_path, "plain", grace_s=30)
    try:
        started = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=20) == 128 + signum
        # well before the 30 s grace: the command and its child stopped on the signal itself
        assert time.monotonic() - started < 15
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        for p in [proc.pid, *pids]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_processes_that_ignore_the_signal_are_killed_after_the_grace_period(tmp_path):
    proc, pids = _start(tmp_path, "stubborn", grace_s=1)
    try:
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # the process group, as `kill -TERM -<pgid>` or make's group
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - started >= 1
        deadline = time.monotonic() + 5
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        for p in [proc.pid, *pids]:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
