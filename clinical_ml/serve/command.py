"""``clinical-ml serve``: the CDS Hooks service under uvicorn (settings from the environment, see
:mod:`clinical_ml.serve.settings`). Imported by the command line at start-up: nothing heavy at module level."""

import argparse
import socket
import sys
from collections.abc import Callable


def add_serve_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "serve",
        help="answer the EHR at the point of care: a CDS Hooks 2.0 service for every use case with an approved "
        "champion (settings from CLINICAL_ML_SERVE_* variables; see docs/cds-hooks.md)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8020, help="port (default 8020)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the port (default 1; about one per core: each runs Python on one core)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from clinical_ml.core.usecase import UseCaseError
    from clinical_ml.serve.app import run
    from clinical_ml.serve.auth import TrustConfigError
    from clinical_ml.serve.settings import SettingsError, settings_from_env

    try:
        settings = settings_from_env(host=args.host, port=args.port)
        settings.check(host=args.host)
        run(settings, host=args.host, port=args.port, workers=args.workers)
    except (SettingsError, TrustConfigError, UseCaseError) as exc:
        print(f"clinical-ml: error: {exc}", file=sys.stderr)
        return 2
    return 0


class ReusePortSocket(socket.socket):
    """A TCP socket bound with ``SO_REUSEPORT`` that a worker process receives as a socket of its own.

    uvicorn's supervisor hands every worker the socket it was given (pickled when the worker starts). This
    one is pickled as its address, not its file descriptor: each worker binds and listens on a new socket of
    the same address, and Linux hashes each new connection to one of the listening sockets (at random: 20
    connections opened at once fell 10/10 to 13/7 in 90 of 100 tries, never more than 17/3). With one
    shared socket, whichever worker woke first accepted the connections that had arrived together: 18/2 or
    worse in 21 of 100 tries, all 20 to one worker in 10 (benchmarks/README.md). The parent's own socket is never listened on: it holds the address while
    workers start and restart, and takes no connection; a worker that ends closes its socket, and the kernel
    hashes new connections over the sockets left. It lives here, in a module that imports nothing heavy: a
    worker unpickles it before it answers the supervisor's health check (5 s), and importing the app first
    (polars, LightGBM, FastAPI) took longer than that on a loaded machine, so uvicorn killed every worker."""

    def __reduce__(self) -> tuple[Callable[..., socket.socket], tuple[int, str, int]]:
        host, port = self.getsockname()[:2]
        return bind_reuse_port, (int(self.family), host, port)


def bind_reuse_port(family: int, host: str, port: int) -> socket.socket:
    """A new TCP socket bound to ``(host, port)`` with ``SO_REUSEPORT`` (a worker's own listening socket)."""
    sock = ReusePortSocket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def reserve_address(host: str, port: int) -> socket.socket:
    """The parent's socket of a multi-process service: refused as uvicorn refuses an address in use (a bind
    without ``SO_REUSEPORT`` first: else a second service of the same user could share a port that a service
    listens on), then bound with ``SO_REUSEPORT`` so that the workers can bind it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))  # OSError (EADDRINUSE) where the port is taken
        port = probe.getsockname()[1]  # port 0: the one the system chose
    return bind_reuse_port(family, host, port)


def spreads_connections() -> bool:
    """Whether the kernel spreads connections over sockets bound with ``SO_REUSEPORT`` (Linux; elsewhere the
    option exists but one socket takes them all, so the workers share one socket as uvicorn makes them)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
