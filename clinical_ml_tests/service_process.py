"""Waiting for a `clinical-ml serve` subprocess started by a test to answer."""

import subprocess
import time
from pathlib import Path

import httpx


def wait_until_serving(base: str, proc: subprocess.Popen, log: Path, *, seconds: float = 90) -> None:
    """Return once ``{base}/healthz`` answers 200; fail with the service's log if it exits first, or after
    ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"the service did not start in {seconds:g} s"
        time.sleep(0.3)
