"""The listening sockets of ``clinical-ml serve --workers N`` on Linux: one per worker, on one address.

The parent reserves the address (refused where it is in use, as before); each worker receives, where uvicorn's
supervisor hands it the parent's socket, a socket of its own bound to the same address; the kernel spreads
connections over the sockets that listen (``test_workers.py`` shows it with two worker processes)."""

import pickle
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from clinical_ml.serve.command import ReusePortSocket, reserve_address, spreads_connections

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT balances on Linux")


@pytest.fixture
def parent() -> Iterator[socket.socket]:
    sock = reserve_address("127.0.0.1", 0)
    yield sock
    sock.close()


def test_linux_spreads_connections() -> None:
    assert spreads_connections()


def test_a_worker_gets_a_socket_of_its_own_on_the_parents_address(parent: socket.socket) -> None:
    worker = pickle.loads(pickle.dumps(parent))  # as the supervisor passes it to a worker process
    try:
        assert isinstance(worker, ReusePortSocket)
        assert worker.fileno() != parent.fileno()
        assert worker.getsockname() == parent.getsockname()
        assert worker.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        worker.listen()
        with socket.create_connection(parent.getsockname(), timeout=5):
            accepted, _ = worker.accept()  # the parent's own socket never listens: the worker's takes it
            accepted.close()
    finally:
        worker.close()


def test_each_worker_socket_listens_and_takes_connections(parent: socket.socket) -> None:
    workers = [pickle.loads(pickle.dumps(parent)) for _ in range(2)]
    try:
        for w in workers:
            w.listen(64)
            w.setblocking(False)
        clients = [socket.create_connection(parent.getsockname(), timeout=5) for _ in range(40)]
        taken = []
        for w in workers:
            n = 0
            while True:
                try:
                    conn, _ = w.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            taken.append(n)
        for c in clients:
            c.close()
    finally:
        for w in workers:
            w.close()
    # every connection reached a listening socket, and each socket took some (hashed: all 40 on one
    # side has a chance of 2 in 10^12)
    assert sum(taken) == 40 and min(taken) >= 1, taken


def test_an_address_in_use_is_refused(parent: socket.socket) -> None:
    worker = pickle.loads(pickle.dumps(parent))
    try:
        worker.listen()  # a service serving on the port
        with pytest.raises(OSError):
            reserve_address("127.0.0.1", parent.getsockname()[1])  # a second service on the same port
    finally:
        worker.close()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            reserve_address("127.0.0.1", other.getsockname()[1])  # a port that something else holds


def test_a_worker_gets_its_socket_without_importing_the_app(parent: socket.socket) -> None:
    # uvicorn kills a worker that has not answered its health check in 5 s; the socket comes before that
    probe = (
        "import pickle, sys; s = pickle.loads(sys.stdin.buffer.read()); "
        "print(s.getsockname()[1], sorted(m for m in ('clinical_ml.serve.app', 'polars', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], input=pickle.dumps(parent), capture_output=True, check=True
    ).stdout.decode()
    assert out.split(None, 1) == [str(parent.getsockname()[1]), "[]\n"]
