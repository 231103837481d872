"""The validator's signed-HTTP client (what bittensor <= 10 called the Dendrite).

Miners are untrusted and often offline, so a query never raises: every
failure — refused connection, timeout, non-200, oversized or malformed
reply — comes back as ``QueryResult(ok=False, error=...)`` and the validator
simply scores it. Whether a well-formed reply actually answers the question
(run id, page count) is checked by the caller, not here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import httpx
from bittensor import WalletLike, http_auth
from pydantic import BaseModel, ValidationError

from distributed_training.protocol import MAX_BODY_BYTES

__all__ = ["MinerClient", "QueryResult", "Target"]

RespT = TypeVar("RespT", bound=BaseModel)

# Error strings are stored/logged per miner per round; keep them short.
_MAX_ERROR_CHARS = 200


@dataclass(frozen=True)
class Target:
    """Where to reach one miner, as read from the metagraph."""

    uid: int
    hotkey: str
    ip: str
    port: int


@dataclass(frozen=True)
class QueryResult(Generic[RespT]):
    """Outcome of one query; ``response`` is set exactly when ``ok``."""

    ok: bool
    response: RespT | None
    status: int | None  # HTTP status, None if no response arrived
    error: str | None
    elapsed: float  # seconds, including signing


class _QueryFailed(Exception):
    """Internal: abort one query with a short reason and optional HTTP status."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _base_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip  # bare IPv6 needs brackets in a URL
    return f"http://{host}:{port}"


class MinerClient:
    """Sends hotkey-signed requests to miners.

    ``timeout`` bounds each query end to end (connect + send + wait + read),
    so ``query_many`` over any number of miners finishes in about ``timeout``.
    """

    def __init__(self, wallet: WalletLike, timeout: float, max_response_bytes: int = MAX_BODY_BYTES) -> None:
        self.wallet = wallet
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes

    async def query(
        self,
        ip: str,
        port: int,
        receiver_hotkey: str,
        path: str,
        request: BaseModel,
        response_type: type[RespT],
    ) -> QueryResult[RespT]:
        """Query one miner; never raises (except on cancellation)."""
        async with self._http_client() as client:
            return await self._query(client, ip, port, receiver_hotkey, path, request, response_type)

    async def query_many(
        self,
        targets: Sequence[Target],
        path: str,
        requests: Mapping[int, BaseModel] | BaseModel,
        response_type: type[RespT],
    ) -> dict[int, QueryResult[RespT]]:
        """Query all ``targets`` concurrently; results keyed by uid.

        ``requests`` is either one request for everyone or a per-uid mapping
        (a uid missing from it gets an ``ok=False`` result, not an exception).
        """
        async with self._http_client() as client:

            async def one(target: Target) -> QueryResult[RespT]:
                request = requests.get(target.uid) if isinstance(requests, Mapping) else requests
                if request is None:
                    return QueryResult(False, None, None, "no request for this uid", 0.0)
                return await self._query(client, target.ip, target.port, target.hotkey, path, request, response_type)

            results = await asyncio.gather(*(one(t) for t in targets))
        return {t.uid: r for t, r in zip(targets, results)}

    def run_queries(
        self,
        targets: Sequence[Target],
        path: str,
        requests: Mapping[int, BaseModel] | BaseModel,
        response_type: type[RespT],
    ) -> dict[int, QueryResult[RespT]]:
        """Blocking :meth:`query_many` for sync callers.

        Refuses to run inside a running event loop: blocking it would stall
        every other task on it; ``await query_many(...)`` there instead.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.query_many(targets, path, requests, response_type))
        raise RuntimeError("run_queries called from a running event loop; await query_many(...) instead")

    def _http_client(self) -> httpx.AsyncClient:
        # One pooled client per batch; the overall deadline is enforced in _query.
        # trust_env=False: miners are dialed directly, never via an env-configured proxy.
        return httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_connections=None), trust_env=False)

    async def _query(
        self,
        client: httpx.AsyncClient,
        ip: str,
        port: int,
        receiver_hotkey: str,
        path: str,
        request: BaseModel,
        response_type: type[RespT],
    ) -> QueryResult[RespT]:
        start = time.perf_counter()
        status: int | None = None
        try:
            if not ip or ip == "0.0.0.0" or not 0 < port < 65536:
                raise _QueryFailed(f"no reachable address ({ip}:{port})")
            try:
                async with asyncio.timeout(self.timeout):
                    status, raw = await self._post(client, ip, port, receiver_hotkey, path, request)
            except TimeoutError:
                raise _QueryFailed(f"timeout after {self.timeout:g}s") from None
            except httpx.HTTPError as exc:
                raise _QueryFailed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
            if status != 200:
                raise _QueryFailed(f"HTTP {status}: {_error_detail(raw)}", status)
            try:
                response = response_type.model_validate_json(raw)
            except ValidationError as exc:
                first = exc.errors(include_url=False, include_input=False)[0]
                loc = ".".join(str(p) for p in first["loc"]) or "body"
                raise _QueryFailed(f"invalid response: {loc}: {first['msg']} ({exc.error_count()} errors)", status)
        except _QueryFailed as fail:
            return QueryResult(False, None, fail.status, _short(fail.reason), time.perf_counter() - start)
        except Exception as exc:  # signing or anything unforeseen: still never raise
            return QueryResult(False, None, status, _short(f"{type(exc).__name__}: {exc}"), time.perf_counter() - start)
        return QueryResult(True, response, status, None, time.perf_counter() - start)

    async def _post(
        self,
        client: httpx.AsyncClient,
        ip: str,
        port: int,
        receiver_hotkey: str,
        path: str,
        request: BaseModel,
    ) -> tuple[int, bytes]:
        """Sign and send; returns (status, body), reading at most max_response_bytes."""
        body = request.model_dump_json().encode()
        # Sign the exact bytes sent: the server hashes the raw body.
        headers = http_auth.sign(self.wallet, method="POST", path=path, body=body, receiver_ss58=receiver_hotkey)
        headers["Content-Type"] = "application/json"
        url = _base_url(ip, port) + path
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            chunks: list[bytes] = []
            received = 0
            async for chunk in resp.aiter_bytes():
                received += len(chunk)
                if received > self.max_response_bytes:
                    raise _QueryFailed(f"response exceeds {self.max_response_bytes} bytes", resp.status_code)
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks)


def _error_detail(raw: bytes) -> str:
    """The server's ``{"error": ...}`` message if present, else the raw text."""
    try:
        detail = json.loads(raw)
        if isinstance(detail, dict) and "error" in detail:
            return str(detail["error"])
    except ValueError:
        pass
    return raw.decode("utf-8", "replace")
