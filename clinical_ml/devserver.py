"""``make dev``: run ``dagster dev`` so that SIGINT (Ctrl-C) or SIGTERM stops all of it within seconds.

``dagster dev`` started by a non-interactive shell in the background inherits SIGINT ignored, and its
webserver, daemon and code servers keep that ignore, so a stop request left them running (30 to 40 s, or
until SIGKILL). Here the command runs in its own process group with default signal dispositions; a SIGINT
or SIGTERM to this process (or to the group ``make`` runs it in) is passed to that whole group, and whatever
has not exited after a grace period (``CLINICAL_ML_DEV_STOP_GRACE_S``, default 6 s) is killed.

Usage: ``python -m clinical_ml.devserver <command> [args...]``
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run(command: list[str], *, grace_s: float) -> int:
    """Run ``command`` until it exits or a stop signal arrives; returns its exit status (128 + the signal's
    number when stopped by one)."""
    for s in STOP_SIGNALS:  # an inherited ignore would otherwise pass to every child
        signal.signal(s, signal.SIG_DFL)
    child = subprocess.Popen(command, process_group=0)
    received: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        received.append(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    while child.poll() is None and not received:
        time.sleep(0.1)
    if not received:
        return child.returncode
    _signal_group(child.pid, received[0])
    deadline = time.monotonic() + grace_s
    while child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # the group's other processes (webserver, daemon, code servers) may outlive dagster dev itself
    while _group_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(child.pid, signal.SIGKILL)
    child.wait()
    return 128 + received[0]


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(run(sys.argv[1:], grace_s=float(os.environ.get("CLINICAL_ML_DEV_STOP_GRACE_S", "6"))))


if __name__ == "__main__":
    main()
