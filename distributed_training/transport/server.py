"""The miner's signed-HTTP server (what bittensor <= 10 called the Axon).

Every request passes the same gate, cheapest and least trusting check first:

1. body size       -> 413  (never buffer more than ``max_body_bytes``)
2. btauth signature -> 401  (on the raw bytes, before any parsing)
3. authorize(hotkey) -> 403 (chain policy: registered, validator stake, ...)
4. JSON schema      -> 422
5. handler          -> 200; its RequestError's status (422: a page id beyond the
                       miner's data); 500 if it raises anything else (the server keeps serving)

Handlers are plain sync callables run in a threadpool, so a slow training
step never stalls the event loop that answers other validators. Nothing a
client sends puts a traceback in the log: every refusal is one INFO line, and a
client that disconnects mid-body one DEBUG line.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import uvicorn
from bittensor import http_auth
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from distributed_training.protocol import (
    IS_ALIVE_PATH,
    MAX_BODY_BYTES,
    WORK_PATH,
    IsAliveRequest,
    IsAliveResponse,
    WorkRequest,
    WorkResponse,
)

__all__ = [
    "Authorize",
    "MinerHandlers",
    "PortInUseError",
    "RequestError",
    "ServerHandle",
    "build_app",
    "serve_in_thread",
]

logger = logging.getLogger(__name__)

# Returns None to allow the caller's hotkey, else the reason it is refused.
Authorize = Callable[[str], str | None]

ReqT = TypeVar("ReqT", bound=BaseModel)


class MinerHandlers(Protocol):
    """What the miner implements; the transport does everything else."""

    def is_alive(self) -> IsAliveResponse: ...

    def work(self, req: WorkRequest, caller_hotkey: str) -> WorkResponse: ...


class RequestError(ValueError):
    """Raised by a handler for a well-formed request it cannot answer (a page id beyond its data, another
    run id): answered ``status`` (422 unless given) with the message, logged as one line, no traceback."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.status = status


class _Rejected(Exception):
    """Internal: stop processing a request and answer ``status`` with ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


def _request_target(request: Request) -> str:
    """Path plus ``?query`` exactly as sent: that is what the client signed."""
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else request.url.path
    query = request.scope.get("query_string", b"")
    return f"{path}?{query.decode('latin-1')}" if query else path


async def _read_body_bounded(request: Request, limit: int) -> bytes:
    """Read the body, refusing (413) once it exceeds ``limit`` bytes.

    Content-Length is checked first so honest oversized requests are refused
    unread; the running count catches chunked bodies and lying headers.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _Rejected(400, "invalid Content-Length") from None
        if size > limit:
            raise _Rejected(413, f"body of {size} bytes exceeds {limit}")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise _Rejected(413, f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    *,
    self_hotkey: str,
    authorize: Authorize,
    handlers: MinerHandlers,
    max_body_bytes: int = MAX_BODY_BYTES,
    nonce_store: http_auth.NonceStore | None = None,
) -> FastAPI:
    """Build the miner's FastAPI app serving ``/is_alive`` and ``/work``.

    ``self_hotkey`` is the miner's ss58 address: requests signed for any
    other receiver are refused, so a captured request cannot be replayed
    against a different miner. Each app gets its own nonce store unless one
    is passed, keeping replay state from leaking between apps (and tests).
    """
    store: http_auth.NonceStore = nonce_store if nonce_store is not None else http_auth.InMemoryNonceStore()
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths / wrong methods answer in the same {"error": ...} shape.
        logger.info("rejected %s %s: %d %s", request.method, request.url.path, exc.status_code, exc.detail)
        return _error(exc.status_code, str(exc.detail))

    def route(path: str, model: type[ReqT], call: Callable[[ReqT, str], BaseModel]) -> None:
        async def endpoint(request: Request) -> Response:
            target = _request_target(request)
            # Until verified, only the claimed hotkey is known; logged as such.
            caller = f"{request.headers.get(http_auth.HEADER_HOTKEY, '?')} (unverified)"
            try:
                body = await _read_body_bounded(request, max_body_bytes)
                try:
                    caller = http_auth.verify(
                        request.headers,
                        body,
                        method=request.method,
                        path=target,
                        self_hotkey_ss58=self_hotkey,
                        nonce_store=store,
                    ).hotkey_ss58
                except http_auth.AuthError as exc:
                    raise _Rejected(401, f"{type(exc).__name__}: {exc}") from None
                try:
                    refusal = await run_in_threadpool(authorize, caller)
                except Exception:
                    logger.exception("authorize(%s) raised", caller)
                    raise _Rejected(500, "authorization check failed") from None
                if refusal is not None:
                    raise _Rejected(403, refusal)
                try:
                    parsed = model.model_validate_json(body)
                except ValidationError as exc:
                    raise _Rejected(422, _summarize(exc)) from None
                try:
                    result = await run_in_threadpool(call, parsed, caller)
                    payload = result.model_dump_json()
                except RequestError as exc:
                    raise _Rejected(exc.status, " ".join(str(exc).split())) from None
                except Exception as exc:
                    logger.exception("handler for %s raised (caller %s)", path, caller)
                    raise _Rejected(500, f"handler failed: {type(exc).__name__}") from None
            except ClientDisconnect:
                # Nobody is left to answer; a traceback per aborted connection would let anyone flood the log.
                client = request.client.host if request.client else "?"
                logger.debug("POST %s from %s (hotkey %s): client disconnected before the body ended",
                             target, client, caller)
                return Response(status_code=400)
            except _Rejected as rej:
                client = request.client.host if request.client else "?"
                logger.info(
                    "rejected POST %s from %s (hotkey %s): %d %s", target, client, caller, rej.status, rej.reason
                )
                return _error(rej.status, rej.reason)
            logger.debug("served %s to %s", path, caller)
            return Response(payload, media_type="application/json")

        app.add_api_route(path, endpoint, methods=["POST"], include_in_schema=False)

    route(IS_ALIVE_PATH, IsAliveRequest, lambda _req, _caller: handlers.is_alive())
    route(WORK_PATH, WorkRequest, handlers.work)
    return app


def _summarize(exc: ValidationError) -> str:
    """One short line for a 422: the first problem and how many there were."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    loc = ".".join(str(p) for p in first.get("loc", ())) or "body"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"invalid request: {loc}: {first.get('msg', '')}{more}"


class PortInUseError(OSError):
    """The requested port is already bound by another process."""


@dataclass
class ServerHandle:
    """A running server thread; ``stop()`` shuts it down and waits for it."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int
    _stopped: bool = field(default=False, repr=False)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and join its thread (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            # Still draining connections: stop waiting for them and try once more.
            self.server.force_exit = True
            self.thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _bind(host: str, port: int) -> socket.socket:
    """Bind and listen up front so a busy port fails here, in the caller's thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Same as uvicorn: allow rebinding over TIME_WAIT, never over a live listener.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(exc.errno, f"--axon.port {port} is in use; choose another port") from exc
        raise
    return sock


def serve_in_thread(
    app: FastAPI,
    host: str,
    port: int,
    *,
    startup_timeout: float = 10.0,
    graceful_shutdown_s: float = 3.0,
) -> ServerHandle:
    """Run ``app`` under a real uvicorn server in a daemon thread.

    Returns only once uvicorn reports ``started`` (so the first request
    cannot race the listener). ``port=0`` picks a free port; read it from
    ``ServerHandle.port``. Raises :class:`PortInUseError` if the port is taken.
    """
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,  # leave the process's logging setup alone
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=graceful_shutdown_s,
    )
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # SystemExit included: uvicorn exits on startup failure
            failure.append(exc)
            logger.error("server on %s:%d died: %r", host, bound_port, exc)
        finally:
            sock.close()

    thread = threading.Thread(target=run, name=f"miner-http-{bound_port}", daemon=True)
    thread.start()
    handle = ServerHandle(server=server, thread=thread, host=host, port=bound_port)
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"server on {host}:{bound_port} failed to start: {failure[0] if failure else '?'!r}")
        if time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"server on {host}:{bound_port} did not start within {startup_timeout:g}s")
        # Short wait on the thread itself: wakes at once if it dies.
        thread.join(0.01)
    logger.info("miner HTTP server listening on %s:%d", host, bound_port)
    return handle
