"""The parent's accept path of ``clinical-ml serve --workers N`` (:mod:`clinical_ml.serve.balance`), with
workers played by plain Unix sockets: each connection reaches exactly one worker, the workers' counts never
differ by more than one, a closed connection makes room on its worker first, a worker that leaves takes no
more, and a connection made while no worker takes any waits for one (``test_workers.py`` shows the same with
uvicorn's worker processes)."""

import ast
import hashlib
import inspect
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from clinical_ml.serve.balance import BYE, CLOSED, ConnectionBalancer, balances_connections, bind_address
from clinical_ml_tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.skipif(not balances_connections(), reason="connections are handed over on Linux")


class FakeWorker:
    """A worker's end of the channel: it keeps the connections it is handed."""

    def __init__(self, path: str) -> None:
        self.channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel.connect(path)
        self.channel.settimeout(5)
        self.held: list[socket.socket] = []

    def take(self, n: int) -> None:
        for _ in range(n):
            message, fds, _, _ = socket.recv_fds(self.channel, 16, 1)
            assert message == b"c" and len(fds) == 1
            self.held.append(socket.socket(fileno=fds[0]))

    def pending(self) -> int:
        """How many more connections are queued for it (without waiting for any)."""
        self.channel.setblocking(False)
        n = 0
        try:
            while True:
                message, fds, _, _ = socket.recv_fds(self.channel, 16, 1)
                if not message:
                    break
                self.held.append(socket.socket(fileno=fds[0]))
                n += 1
        except BlockingIOError:
            pass
        finally:
            self.channel.settimeout(5)
        return n

    def close_one(self) -> None:
        self.held.pop().close()
        self.channel.send(CLOSED)

    def close(self) -> None:
        for c in self.held:
            c.close()
        self.channel.close()


@pytest.fixture
def balancer() -> Iterator[ConnectionBalancer]:
    b = ConnectionBalancer(bind_address("127.0.0.1", 0))
    b.start()
    yield b
    b.close()


def _workers(balancer: ConnectionBalancer, n: int) -> list[FakeWorker]:
    workers = [FakeWorker(balancer.path) for _ in range(n)]
    _settle(balancer, n)
    return workers


def _settle(balancer: ConnectionBalancer, workers: int) -> None:
    """Wait until the balancer's thread has registered (or dropped) workers down to ``workers``."""
    import time

    deadline = time.monotonic() + 5
    while len(balancer.held) != workers:
        assert time.monotonic() < deadline, len(balancer.held)
        time.sleep(0.01)


def _connect(balancer: ConnectionBalancer, n: int) -> list[socket.socket]:
    return [socket.create_connection(balancer.listener.getsockname(), timeout=5) for _ in range(n)]


def _drain(workers: list[FakeWorker], total: int) -> list[int]:
    """Every worker takes what is queued for it until ``total`` connections are taken: how many each took."""
    import time

    taken = [0] * len(workers)
    deadline = time.monotonic() + 10
    while sum(taken) < total:
        assert time.monotonic() < deadline, taken
        for i, w in enumerate(workers):
            taken[i] += w.pending()
        time.sleep(0.01)
    return taken


@pytest.mark.parametrize(("n_workers", "n_connections"), [(2, 20), (2, 21), (3, 40), (5, 7), (1, 9)])
def test_each_connection_reaches_one_worker_and_the_counts_differ_by_one_at_most(
    balancer: ConnectionBalancer, n_workers: int, n_connections: int
) -> None:
    workers = _workers(balancer, n_workers)
    clients = _connect(balancer, n_connections)
    try:
        taken = _drain(workers, n_connections)
        assert sum(taken) == n_connections
        assert max(taken) - min(taken) <= 1, taken
        # a handed connection is the client's own: what its worker writes, the client reads
        peers = {c.getsockname(): c for c in clients}
        for w in workers:
            for conn in w.held:
                conn.sendall(b"hello")
                assert peers.pop(conn.getpeername()).recv(5) == b"hello"
        assert not peers
    finally:
        for c in clients:
            c.close()
        for w in workers:
            w.close()


def test_a_closed_connection_makes_room_on_its_worker_first(balancer: ConnectionBalancer) -> None:
    workers = _workers(balancer, 2)
    clients = _connect(balancer, 10)
    try:
        assert _drain(workers, 10) == [5, 5]
        for _ in range(3):
            workers[1].close_one()
        clients += _connect(balancer, 3)
        assert _drain(workers, 3) == [0, 3]  # back to 5 and 5
        clients += _connect(balancer, 2)
        assert _drain(workers, 2) == [1, 1]
    finally:
        for c in clients:
            c.close()
        for w in workers:
            w.close()


def test_a_worker_that_leaves_takes_no_more(balancer: ConnectionBalancer) -> None:
    workers = _workers(balancer, 3)
    clients = _connect(balancer, 6)
    try:
        assert _drain(workers, 6) == [2, 2, 2]
        workers[0].channel.send(BYE)  # a worker that stops: the parent closes its end
        assert workers[0].channel.recv(16) == b""
        workers[2].close()  # a worker that dies
        _settle(balancer, 1)
        clients += _connect(balancer, 4)
        assert _drain(workers[1:2], 4) == [4]
    finally:
        for c in clients:
            c.close()
        for w in workers:
            w.close()


def test_a_connection_waits_for_a_worker_that_takes_it(balancer: ConnectionBalancer) -> None:
    clients = _connect(balancer, 2)  # no worker yet: they wait in the listen queue
    worker = FakeWorker(balancer.path)
    try:
        worker.take(2)
        assert sorted(c.getpeername() for c in worker.held) == sorted(c.getsockname() for c in clients)
    finally:
        for c in clients:
            c.close()
        worker.close()


def test_an_address_in_use_is_refused(balancer: ConnectionBalancer) -> None:
    with pytest.raises(OSError):
        bind_address("127.0.0.1", balancer.listener.getsockname()[1])  # a second service on the same port
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            bind_address("127.0.0.1", other.getsockname()[1])  # a port that something else holds


def test_a_worker_process_loads_its_side_without_the_app() -> None:
    # uvicorn kills a worker that has not answered its health check in 5 s: its process object (a
    # BalancedProcess, unpickled first) must not import the app (polars, LightGBM, FastAPI)
    probe = (
        "import sys, clinical_ml.serve.balance; "
        "print(sorted(m for m in ('clinical_ml.serve.app', 'polars', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True, cwd=PROJECT_ROOT)
    assert out.stdout.decode() == "[]\n"


# uvicorn's supervisor methods that BalancedMultiprocess copies (to make a BalancedProcess where they make a
# Process), with the hash of their code at the pinned uvicorn: a new uvicorn that changes one fails here
UVICORN_COPIED = {
    "init_processes": "9b5414dcc0809e34",
    "keep_subprocess_alive": "2fa7579c6e3fb6f3",
    "restart_all": "a828214b482ce52a",
    "handle_ttin": "83de03fd09e38dae",
}


def _tree(function: object) -> ast.Module:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]


def _code_hash(function: object) -> str:
    return hashlib.sha256(ast.dump(_tree(function)).encode()).hexdigest()[:16]


def _makes_a_process(function: object) -> bool:
    return any(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Process"
        for node in ast.walk(_tree(function))
    )


def test_every_uvicorn_supervisor_method_that_makes_a_worker_is_ours_and_unchanged_since_copied() -> None:
    """A worker made by uvicorn's own code would listen on nothing the balancer hands to: every method of
    uvicorn's supervisor that makes a ``Process`` must be one ``BalancedMultiprocess`` overrides, and the
    copies are only right while uvicorn's originals are the code they were copied from."""
    from uvicorn.supervisors.multiprocess import Multiprocess

    from clinical_ml.serve.balance import BalancedMultiprocess

    makers = {
        name
        for name, function in vars(Multiprocess).items()
        if callable(function) and not name.startswith("__") and _makes_a_process(function)
    }
    assert makers == set(UVICORN_COPIED), "uvicorn makes worker processes in other methods now: override them"
    assert all(name in vars(BalancedMultiprocess) for name in makers)
    changed = [n for n, h in UVICORN_COPIED.items() if _code_hash(getattr(Multiprocess, n)) != h]
    assert not changed, (
        f"uvicorn changed {changed}: compare BalancedMultiprocess's copies and update the hashes"
    )
    assert not any(
        _makes_a_process(vars(BalancedMultiprocess)[n]) for n in makers
    )  # ours make BalancedProcess
