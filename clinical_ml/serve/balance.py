"""Connections handed to the worker process that holds the fewest: one accept path for ``--workers N``.

An EHR keeps a pool of keep-alive connections open, and every call of a connection goes to the worker that
took it. Where each worker listened on a socket of its own (``SO_REUSEPORT``), the kernel hashed each new
connection to one of them at random: 20 connections opened at once fell 12/8 in both quiet bench runs, and
the worker with 12 answered 60% of the calls and made the p99. With one shared socket, whichever worker woke
first took the connections that had arrived together (18/2 or worse in a fifth of tries). This is how Node's
``cluster`` module (its default on Unix) and Envoy's ``exact_balance`` connection balancer do it instead:

- the parent process listens on the address and accepts every connection in a thread of its own
  (:class:`ConnectionBalancer`); it answers nothing and reads no byte of a request;
- each worker, once its app is ready, connects to the parent over a Unix socket in a private folder
  (``SOCK_SEQPACKET``: one message per connection handed over) and tells it when a connection closes
  (:class:`BalancedServer`);
- the parent hands each accepted connection's file descriptor (``SCM_RIGHTS``) to the worker that holds the
  fewest at that moment, the one handed one longest ago among equals; the worker serves it as uvicorn serves
  a connection it accepted itself (the same protocol, the same concurrency limit and graceful shutdown).

It holds for any number of workers and connections: the counts differ by at most one while no connection
closes, and a connection that closes makes room on its worker first. A worker that dies or stops takes no
more connections (its Unix socket reads as closed); uvicorn's supervisor starts another, which connects once
ready. Nothing heavy is imported here: the worker unpickles its process object before it answers the
supervisor's health check.
"""

import asyncio
import contextlib
import logging
import os
import selectors
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.server import Server
from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = logging.getLogger("clinical_ml.serve")

CLOSED = b"-"  # a worker's message: one of the connections handed to it has closed
BYE = b"bye"  # a worker's message: it stops; hand it no more
# A worker that stops waits at most this long for the parent to confirm that it will hand it no more.
BYE_WAIT_S = 2.0
# How long a restart (SIGHUP) waits for each new worker to be ready before it keeps the old one: a worker loads
# the app (polars, LightGBM, the champions) first, ~10 s on this 2-core machine, more under load, where
# uvicorn's own restart waits its 5 s health-check timeout and so never replaced a worker of this app.
WORKER_READY_S = 120.0


def balances_connections() -> bool:
    """Whether connections can be handed between processes here (file descriptors over ``SOCK_SEQPACKET``
    Unix sockets: Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds")


def bind_address(host: str, port: int) -> socket.socket:
    """The service's TCP socket, bound as uvicorn binds it (``SO_REUSEADDR``; an address in use is refused
    with ``OSError``), not yet listening (port 0: one the system chooses)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ConnectionBalancer:
    """The parent's side: accepts on ``listener`` (bound, not yet listening) and hands each connection to
    the worker connected to :attr:`path` that holds the fewest. :meth:`start` runs it in a daemon thread;
    :meth:`close` stops it."""

    def __init__(self, listener: socket.socket, *, backlog: int = 2048) -> None:
        self.listener = listener
        self.backlog = backlog
        self.folder = tempfile.mkdtemp(prefix="clinical-ml-serve-")  # mode 0700: this user only
        self.path = os.path.join(self.folder, "workers.sock")
        self.registry = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.registry.bind(self.path)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
        self.held: dict[socket.socket, int] = {}  # a worker's channel: the connections it holds
        self._order: dict[socket.socket, int] = {}  # when it was last handed one (ties go to the oldest)
        self._handed = 0
        self._selector = selectors.DefaultSelector()
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._accepting = False

    def start(self) -> None:
        self.listener.listen(self.backlog)
        self.listener.setblocking(False)
        self.registry.listen(64)
        self.registry.setblocking(False)
        self._selector.register(self.registry, selectors.EVENT_READ, self._on_worker)
        self._selector.register(self._stop_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._loop, name="connection-balancer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop_w.send(b"x")
            self._thread.join(timeout=5)
        for channel in list(self.held):
            channel.close()
        self.held.clear()
        self._selector.close()
        for s in (self.registry, self._stop_r, self._stop_w, self.listener):
            s.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _loop(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    return
                try:
                    key.data(key.fileobj)
                except Exception as exc:  # the balancer must outlive any one connection or worker
                    log.error("connection balancer: %s", type(exc).__name__)

    def _on_worker(self, registry: socket.socket) -> None:
        while True:
            try:
                channel, _ = registry.accept()
            except (BlockingIOError, InterruptedError):
                return
            channel.setblocking(False)
            self.held[channel] = 0
            self._order[channel] = -1
            self._selector.register(channel, selectors.EVENT_READ, self._on_message)
            log.info("%d worker processes take connections", len(self.held))
            self._accept_while_workers()

    def _on_message(self, channel: socket.socket) -> None:
        while channel in self.held:  # (dropped already where an earlier event of this wake-up found it gone)
            try:
                message = channel.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if message == CLOSED:
                self.held[channel] = max(0, self.held[channel] - 1)
                continue
            # BYE, or the worker is gone (its end closed): no more connections for it
            self._drop(channel)
            return

    def _drop(self, channel: socket.socket) -> None:
        self._selector.unregister(channel)
        channel.close()  # a stopping worker reads this as the last of its connections
        self.held.pop(channel, None)
        self._order.pop(channel, None)
        log.info("%d worker processes take connections", len(self.held))
        self._accept_while_workers()

    def _accept_while_workers(self) -> None:
        """Accept only while some worker takes connections: else they wait in the listen queue."""
        if self.held and not self._accepting:
            self._selector.register(self.listener, selectors.EVENT_READ, self._on_connection)
            self._accepting = True
        elif not self.held and self._accepting:
            self._selector.unregister(self.listener)
            self._accepting = False

    def _on_connection(self, listener: socket.socket) -> None:
        while self.held:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: try again on the next wake-up
                log.error("connection not accepted (%s)", type(exc).__name__)
                return
            with conn:  # the parent's copy closes once a worker holds its own
                self.hand(conn)

    def pick(self) -> list[socket.socket]:
        """The workers in the order they are offered the next connection: fewest held first, then the one
        handed a connection longest ago."""
        return sorted(self.held, key=lambda ch: (self.held[ch], self._order[ch]))

    def hand(self, conn: socket.socket) -> bool:
        """Hand ``conn`` to the worker that holds the fewest (the next one where a worker's queue is full)."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for channel in self.pick():
            try:
                socket.send_fds(channel, [b"c"], [conn.fileno()])
            except (BlockingIOError, InterruptedError):
                continue  # its queue is full: it is stuck, the next one takes it
            except OSError:
                self._drop(channel)  # gone
                continue
            self.held[channel] += 1
            self._handed += 1
            self._order[channel] = self._handed
            return True
        log.warning("a connection was closed: no worker process could take it")
        return False


class BalancedServer(Server):
    """A worker's uvicorn server that listens on nothing: it serves the connections its parent hands it over
    the Unix socket at ``path`` (:class:`ConnectionBalancer`), and tells the parent when each closes."""

    def __init__(self, config: Config, path: str) -> None:
        super().__init__(config)
        self.path = path
        self.channel: socket.socket | None = None
        self._unsent = 0  # closes not yet told (the channel was full)
        self._taking: set[asyncio.Task[None]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app is ready, no socket listens
        if self.should_exit:
            return
        config, loop = self.config, asyncio.get_running_loop()

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            # as uvicorn's own (Server.startup), and its end told to the parent
            protocol: Any = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=_loop
            )
            lost: Callable[[Exception | None], None] = protocol.connection_lost

            def connection_lost(exc: Exception | None) -> None:
                lost(exc)
                self._closed()

            protocol.connection_lost = connection_lost
            return protocol  # type: ignore[no-any-return]

        self._create_protocol = create_protocol
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel.connect(self.path)
        channel.setblocking(False)
        self.channel = channel
        loop.add_reader(channel.fileno(), self._receive)
        log.info("worker process %d takes connections from its parent", os.getpid())

    def _receive(self) -> None:
        """Serve every connection the parent has handed over (all that are queued)."""
        assert self.channel is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.channel, 16, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            if not message and not fds:  # the parent is gone or has let this worker go
                loop.remove_reader(self.channel.fileno())
                self.channel.close()
                self.channel = None
                return
            for fd in fds:
                task = loop.create_task(self._take(socket.socket(fileno=fd)))
                self._taking.add(task)  # a reference until it is done (the loop keeps only a weak one)
                task.add_done_callback(self._taking.discard)

    async def _take(self, conn: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._create_protocol, conn)
        except OSError:  # the client went away meanwhile
            conn.close()
            self._closed()

    def _closed(self) -> None:
        self._unsent += 1
        while self._unsent and self.channel is not None:
            try:
                self.channel.send(CLOSED)
            except BlockingIOError:
                return  # told with the next one
            except OSError:
                return
            self._unsent -= 1

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Tell the parent to hand no more, serve what it handed meanwhile, then shut down as uvicorn does
        (those connections included)."""
        if self.channel is not None:
            with contextlib.suppress(OSError):
                self.channel.send(BYE)
            deadline = asyncio.get_running_loop().time() + BYE_WAIT_S
            while self.channel is not None and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)  # _receive reads until the parent closes its end
            if self.channel is not None:
                asyncio.get_running_loop().remove_reader(self.channel.fileno())
                self.channel.close()
                self.channel = None
        await super().shutdown(sockets=sockets)


class BalancedProcess(Process):
    """uvicorn's worker process, whose server is a :class:`BalancedServer`."""

    def __init__(self, config: Config, sockets: list[socket.socket], path: str) -> None:
        self.path = path  # before the process object is pickled for the child (by the parent's init)
        super().__init__(config, sockets)

    @property
    def server(self) -> Server:
        if self._server is None:
            self._server = BalancedServer(self.config, self.path)
        return self._server


class BalancedMultiprocess(Multiprocess):
    """uvicorn's supervisor (starts the workers, restarts one that dies, stops them gracefully) with every
    worker a :class:`BalancedProcess` fed by one :class:`ConnectionBalancer` in this process."""

    def __init__(self, config: Config, balancer: ConnectionBalancer) -> None:
        super().__init__(config, sockets=[])
        self.balancer = balancer

    def new_process(self) -> Process:
        process = BalancedProcess(self.config, self.sockets, self.balancer.path)
        process.start()
        return process

    def run(self) -> None:
        self.balancer.start()
        try:
            super().run()
        finally:
            self.balancer.close()

    # uvicorn's own, with a BalancedProcess where they make a Process
    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self.new_process())

    def keep_subprocess_alive(self) -> None:
        from uvicorn.config import STARTUP_FAILURE

        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker process %s failed to start: stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("worker process %s died", process.pid)
            self.processes[idx] = self.new_process()

    def restart_all(self) -> None:
        for idx, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self.new_process()
            ready_within = max(self.config.timeout_worker_healthcheck, WORKER_READY_S)
            if not new.wait_until_ready(ready_within, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error("new worker process %s not ready in time: restart aborted", new.pid)
                return
            old.terminate()
            old.join()
            self.processes[idx] = new

    def handle_ttin(self) -> None:
        self.processes_num += 1
        self.processes.append(self.new_process())
