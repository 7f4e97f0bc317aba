"""The HTTP face of the CDS Hooks service (FastAPI under uvicorn): size limit, JSON, the EHR's JWT, routes.

Routes: ``GET /cds-services`` (discovery), ``POST /cds-services/{id}`` (a hook call),
``POST /cds-services/{id}/feedback`` (the feedback API), ``GET /reports/{use case}/{version}`` (the model's
report card, aggregate data only, linked from cards) and ``GET /healthz``. Everything else is
:mod:`clinical_ml.serve.service`.

The log says per request: the route (service id, never the path as sent), the status, the time taken, the
model version and an outcome code. It never holds an identifier, a value or a token: uvicorn's own access log
is turned off, as it would print the path as sent.
"""

import contextlib
import dataclasses
import gc
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

from clinical_ml.core.site_mapping import load_site_mapping
from clinical_ml.core.usecase import load_use_cases
from clinical_ml.serve.auth import AuthError, JwtVerifier, SharedReplay, load_trust
from clinical_ml.serve.batching import MicroBatcher
from clinical_ml.serve.chart import Issue
from clinical_ml.serve.fhir import ObservationFacts
from clinical_ml.serve.hookbody import read_hook_body
from clinical_ml.serve.records import ServingRecords
from clinical_ml.serve.service import (
    CdsService,
    PendingCall,
    Reply,
    failed,
    operation_outcome,
    rejected,
    settings_summary,
)
from clinical_ml.serve.settings import ServiceSettings, SettingsError, settings_from_env

log = logging.getLogger("clinical_ml.serve")
R = TypeVar("R")
FHIR_JSON = "application/json"
# Requests being worked on at once (beyond: HTTP 503 from uvicorn), so a burst never grows without bound.
MAX_CONCURRENCY = 64
# A hook call is Python from its JSON to its card (a few milliseconds, bounded by the body size limit): it
# runs on the event loop, read up to its chart, then scored with the calls that reached that point with it
# (:mod:`clinical_ml.serve.batching`). Threads bought nothing for it under the GIL
# and cost switching: a call in a thread waited up to the interpreter's 5 ms switch interval each time the
# loop took the GIL back, and the calls of a burst finished late together (measured: more CPU per call and a
# higher median at a load of 3.5 to 6; within the noise at 7 to 9). Feedback may read the day's records of the cards served (files): it runs in a thread.
FEEDBACK_THREADS = 2


class BodyTooLarge(Exception):
    pass


async def read_limited(declared: str | None, stream: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, refused as soon as it exceeds ``limit`` bytes (whatever ``declared``, the
    Content-Length header, says)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class _Disconnected(Exception):
    """The client went away before its request's body was read (nothing is answered)."""


async def _asgi_body(receive: Receive) -> AsyncIterator[bytes]:
    """The body's chunks as an ASGI server hands them (Starlette's ``Request.stream`` without a Request)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


HOOK_PREFIX = "/cds-services/"


class CdsHooksApp(FastAPI):
    """FastAPI, but a hook call (``POST /cds-services/{id}``, most of the service's traffic) goes straight to
    :attr:`hook_call` as plain ASGI: FastAPI's and Starlette's layers (middleware, routing, the request
    object, the endpoint's dependencies) cost a tenth of a call's Python again and add nothing to it. The
    route stays declared to FastAPI (its OpenAPI, and any call the shortcut does not take)."""

    hook_call: Callable[[str, Scope, Receive, Send], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self.hook_call is not None:
            path: str = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if path.startswith(HOOK_PREFIX):
                service_id = path[len(HOOK_PREFIX) :]
                if service_id and "/" not in service_id:
                    await self.hook_call(service_id, scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or None when it is not (deep nesting, bad encodings and NaN/Infinity included: JSON
    has no such numbers, though Python's parser accepts them)."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError):
        return None


def _no_constant(name: str) -> Any:
    raise ValueError("not a JSON number")


def create_app(
    settings: ServiceSettings,
    *,
    service: CdsService | None = None,
    verifier: JwtVerifier | None = None,
    clock: Callable[[], datetime] | None = None,
) -> CdsHooksApp:
    """The ASGI app. ``service``/``verifier``/``clock`` replace the ones built from ``settings`` (tests)."""
    if service is None:
        service = CdsService(
            settings,
            load_use_cases(settings.usecases_dir),
            site_mapping=load_site_mapping(settings.site_mapping),
            records=ServingRecords(settings.data_root / "phi"),
        )
    if verifier is None and settings.auth == "jwt":
        assert settings.trust_file is not None
        # tokens already used are kept where every worker process sees them (and a restart keeps them)
        replay = SharedReplay(settings.data_root / "phi" / "serving" / "used_tokens.sqlite")
        verifier = JwtVerifier(load_trust(settings.trust_file), replay=replay)
    app = CdsHooksApp(title="clinical_ml CDS Hooks service", version="2.0", docs_url=None, redoc_url=None)
    app.state.service = service
    limiters: list[anyio.CapacityLimiter] = []  # made on first use: a limiter belongs to the running loop

    async def in_thread(work: Callable[[], Reply]) -> Reply:
        if not limiters:
            limiters.append(anyio.CapacityLimiter(FEEDBACK_THREADS))
        return await anyio.to_thread.run_sync(lambda: guarded(work), limiter=limiters[0])

    def guarded(work: Callable[[], R]) -> R | Reply:
        # an unexpected error is answered here, by its type only: left to the server, its traceback (which may
        # quote a value of the request) would reach the log
        try:
            return work()
        except Exception as exc:
            return failed(exc)

    # hook calls read up to their charts are scored together (one batcher per app: the app runs on one loop)
    batcher: MicroBatcher[PendingCall, Reply] = MicroBatcher(service.answer, failed=failed)
    app.state.batcher = batcher

    def reply(r: Reply, route: str, t0: float, *, use_case: str | None = None) -> Response:
        ms = (time.perf_counter() - t0) * 1000
        log.info("%s %d %.1f ms model=%s outcome=%s", route, r.status, ms, r.model_version or "-", r.outcome)
        if use_case in service.use_cases:
            try:
                service.records.request(
                    use_case,
                    {
                        "route": route.partition(" ")[0],
                        "status": r.status,
                        "ms": round(ms, 3),
                        "outcome": r.outcome,
                        "model_version": r.model_version,
                    },
                )
            except OSError as exc:  # the answer matters more than its record
                log.error("request record not written (%s)", type(exc).__name__)
        return JSONResponse(r.body, status_code=r.status, headers=r.headers)

    def authenticate(authorization: str | None, audience: list[str]) -> Reply | None:
        if verifier is None:
            return None
        try:
            verifier.verify(authorization, audience=audience)
        except AuthError as exc:
            r = rejected(
                401,
                [Issue("Authorization", "security", f"not accepted ({exc.reason})")],
                f"auth:{exc.reason}",
            )
            return Reply(401, r.body, outcome=r.outcome, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def body_of(declared: str | None, stream: AsyncIterator[bytes]) -> tuple[bytes, Reply | None]:
        try:
            return await read_limited(declared, stream, settings.max_body_bytes), None
        except BodyTooLarge:
            issue = Issue("request", "too-long", f"the body exceeds {settings.max_body_bytes} bytes")
            return b"", rejected(413, [issue], "too_large")

    def parsed(raw: bytes, answer: Callable[[Any], R]) -> Callable[[], R | Reply]:
        """The work of a request: the body as JSON, then ``answer``."""

        def work() -> R | Reply:
            body = parse_json(raw)
            if body is None:
                return rejected(400, [Issue("request", "structure", "the body is not JSON")], "not_json")
            return answer(body)

        return work

    def hook_work(
        raw: bytes, answer: Callable[[Any, list[ObservationFacts] | None], R]
    ) -> Callable[[], R | Reply]:
        """The work of a hook call: the body and its Observations read at once in compiled code where it
        can (:func:`read_hook_body`), else as any body (:func:`parsed`), then ``answer``."""

        def work() -> R | Reply:
            fast = read_hook_body(raw)
            if fast is None:
                return parsed(raw, lambda body: answer(body, None))()
            return answer(*fast)

        return work

    @app.get("/cds-services")
    def discovery(request: Request) -> Response:
        t0 = time.perf_counter()
        denied = authenticate(request.headers.get("authorization"), service.audiences(None))
        return reply(denied if denied is not None else guarded(service.discovery), "discovery", t0)

    async def hook_call(
        service_id: str, authorization: str | None, declared: str | None, stream: AsyncIterator[bytes]
    ) -> Response:
        t0 = time.perf_counter()
        route = f"hook {service_id if service_id in service.use_cases else '<unknown>'}"
        denied = authenticate(authorization, service.audiences(service_id))
        if denied:
            return reply(denied, route, t0, use_case=service_id)
        raw, bad = await body_of(declared, stream)
        if bad:
            return reply(bad, route, t0, use_case=service_id)
        now = clock() if clock else None
        prepared = guarded(
            hook_work(raw, lambda body, obs: service.prepare(service_id, body, now=now, observations=obs))
        )
        r = prepared if isinstance(prepared, Reply) else await batcher.submit(prepared)
        return reply(r, route, t0, use_case=service_id)

    @app.post("/cds-services/{service_id}")
    async def hook(service_id: str, request: Request) -> Response:
        headers = request.headers
        return await hook_call(
            service_id, headers.get("authorization"), headers.get("content-length"), request.stream()
        )

    async def hook_asgi(service_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = declared = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-length" and declared is None:
                declared = value.decode("latin-1")
        try:
            response = await hook_call(service_id, authorization, declared, _asgi_body(receive))
        except _Disconnected:
            return
        except Exception as exc:
            response = unexpected_error(exc, scope["method"])
        await response(scope, receive, send)

    app.hook_call = hook_asgi

    @app.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, request: Request) -> Response:
        t0 = time.perf_counter()
        route = f"feedback {service_id if service_id in service.use_cases else '<unknown>'}"
        denied = authenticate(
            request.headers.get("authorization"), service.audiences(service_id, feedback=True)
        )
        if denied:
            return reply(denied, route, t0, use_case=service_id)
        raw, bad = await body_of(request.headers.get("content-length"), request.stream())
        if bad:
            return reply(bad, route, t0, use_case=service_id)
        now = clock() if clock else None
        r = await in_thread(parsed(raw, lambda body: service.feedback(service_id, body, now=now)))
        return reply(r, route, t0, use_case=service_id)

    @app.get("/reports/{use_case}/{version}")
    def report_card(use_case: str, version: str) -> Response:
        html = service.report_card(use_case, version)
        if html is None:
            return JSONResponse(
                operation_outcome([Issue("report", "not-found", "no report card for this model")]),
                status_code=404,
            )
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
            },
        )

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    def unexpected_error(exc: Exception, method: str) -> Response:
        # the type only: a message may quote a value of the request
        log.error("unexpected %s on %s", type(exc).__name__, method)
        return JSONResponse(
            operation_outcome([Issue("request", "exception", "the service failed; the error was logged")]),
            status_code=500,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return unexpected_error(exc, request.method)

    if verifier is None:
        log.warning("authentication is OFF (CLINICAL_ML_SERVE_AUTH=off): for a local trial only")
    log.info("CDS Hooks service ready: %s", settings_summary(settings))
    return app


def app_from_env() -> CdsHooksApp:
    """ASGI factory for ``uvicorn clinical_ml.serve.app:app_from_env --factory`` (settings from the
    environment). It cannot know the address uvicorn listens on, so it never runs without authentication."""
    settings = settings_from_env()
    settings.check(host="0.0.0.0")  # as if public: CLINICAL_ML_SERVE_AUTH=off is refused
    return create_app(settings)


def ready(app: FastAPI) -> FastAPI:
    """The app of a serving process, made ready before its first call: each use case's champion loaded (the
    first call does not pay for it), then what start-up made set aside from the garbage collector
    (``gc.freeze``): the modules, the models and the site mapping live as long as the process, and a full
    collection no longer walks them (some 400,000 objects: a pause of 100 ms or more, measured, in the middle of a call)."""
    service: CdsService = app.state.service
    for name, watch in service.watches.items():
        try:
            watch.servable()
        except Exception as exc:  # the call will say so; the service still starts
            log.error("champion of %s not loaded at start-up (%s)", name, type(exc).__name__)
    gc.collect()
    gc.freeze()
    return app


SETTINGS_ENV = "CLINICAL_ML_SERVE_WORKER_SETTINGS"  # the parent's checked settings, for its worker processes
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _worker_app() -> FastAPI:
    """ASGI factory of a worker process started by :func:`run` (settings as the parent checked them)."""
    raw = json.loads(os.environ[SETTINGS_ENV])
    for key in ("data_root", "usecases_dir", "trust_file"):
        raw[key] = Path(raw[key]) if raw[key] is not None else None
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return ready(create_app(ServiceSettings(**raw)))


def run(settings: ServiceSettings, *, host: str, port: int, workers: int = 1) -> None:
    """Serve under uvicorn until stopped (SIGINT or SIGTERM), with uvloop and httptools when installed (as
    uvicorn picks them). ``workers`` processes share the port: each scores with its own copy of the models,
    and what must be shared is on disk (the tokens already used, the cards served), so a token is accepted
    once whichever process it reaches. One process runs Python on one core at a time: on a machine with
    more cores, more workers answer more calls at once. On Linux this process accepts every connection and
    hands it to the worker that holds the fewest (:mod:`clinical_ml.serve.balance`), so an EHR's keep-alive
    connections are spread evenly; uvicorn's supervisor still starts the workers, restarts one that dies and
    stops them gracefully."""
    import uvicorn

    from clinical_ml.serve.balance import (
        BalancedMultiprocess,
        ConnectionBalancer,
        balances_connections,
        bind_address,
    )

    settings.check(host=host)
    if workers < 1:
        raise SettingsError("--workers must be at least 1")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "access_log": False,
        "limit_concurrency": MAX_CONCURRENCY,
        "timeout_keep_alive": 5,
        "log_level": "info",
        "server_header": False,
    }
    if workers == 1:
        uvicorn.run(ready(create_app(settings)), **options)
        return
    fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(settings).items()}
    os.environ[SETTINGS_ENV] = json.dumps(fields)
    if not balances_connections():
        uvicorn.run("clinical_ml.serve.app:_worker_app", factory=True, workers=workers, **options)
        return
    try:
        sock = bind_address(host, port)
    except OSError as exc:
        raise SettingsError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    options["port"] = sock.getsockname()[1]
    config = uvicorn.Config("clinical_ml.serve.app:_worker_app", factory=True, workers=workers, **options)
    log.info("%d worker processes behind one listening socket on %s:%d", workers, host, options["port"])
    with contextlib.suppress(KeyboardInterrupt):
        BalancedMultiprocess(config, ConnectionBalancer(sock)).run()
