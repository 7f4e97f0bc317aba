"""Killing a piece of code at a file-write boundary, for the fault-injection tests (issue 17).

:func:`run_killed` runs a script body in a child process that wraps the named ``os`` functions (``replace``:
the commit of every atomic write; ``write``: an append) and kills itself with SIGKILL just before or just
after the k-th call, as a power cut or ``kill -9`` would. With ``k = -1`` it only counts the calls and prints
the count as its last line (:func:`count_boundaries`), so a test can sample kill points from a reference run.
"""

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = textwrap.dedent(
    """
    import os, signal, sys
    KILL_AT, WHEN, ARGS = int(sys.argv[1]), sys.argv[2], sys.argv[4:]
    CALLS = [0]
    def _at_boundary(real):
        def wrapped(*args, **kwargs):
            if CALLS[0] == KILL_AT and WHEN == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if CALLS[0] == KILL_AT and WHEN == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            CALLS[0] += 1
            return out
        return wrapped
    for _name in sys.argv[3].split(","):
        setattr(os, _name, _at_boundary(getattr(os, _name)))
    """
)


def run_killed(
    body: str,
    *,
    k: int,
    when: str,
    args: Sequence[str],
    script: Path,
    points: Sequence[str] = ("replace",),
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``body`` (Python source; it reads its arguments from ``ARGS``) in a child process killed just
    ``when`` (``before`` or ``after``) the ``k``-th call of the ``os`` functions named in ``points``
    (counted together, from 0). The script is written to ``script``; the project root is on its path."""
    script.write_text(_PRELUDE + textwrap.dedent(body) + "\nprint(CALLS[0])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(script), str(k), when, ",".join(points), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def count_boundaries(
    body: str, *, args: Sequence[str], script: Path, points: Sequence[str] = ("replace",)
) -> int:
    """Run ``body`` to the end in a child process and return how many boundary calls it made."""
    done = run_killed(body, k=-1, when="count", args=args, script=script, points=points)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])
