"""Transport tests against real uvicorn servers on 127.0.0.1.

Requests in the server tests are built by hand with httpx and signed with
bittensor's own ``http_auth.sign``, so they pin the wire contract rather than
our client's idea of it; the client tests then exercise ``MinerClient``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bittensor as bt
import httpx
import pytest
from bittensor import http_auth

from distributed_training import PROTOCOL_VERSION, __version__
from distributed_training.localnet.processes import free_port
from distributed_training.protocol import (
    IS_ALIVE_PATH,
    MAX_BODY_BYTES,
    WORK_PATH,
    IsAliveRequest,
    IsAliveResponse,
    WorkRequest,
    WorkResponse,
    response_mismatch,
)
from distributed_training.transport import (
    MinerClient,
    PortInUseError,
    ServerHandle,
    Target,
    build_app,
    serve_in_thread,
)

HOST = "127.0.0.1"
GOOD_BODY = WorkRequest(run_id="run-1", round=3, pages=[7, 1, 42]).model_dump_json().encode()


# --------------------------------------------------------------------------- helpers


def make_wallet(root: Path, name: str) -> bt.Wallet:
    """A password-less coldkey/hotkey pair under ``root`` (never ~/.bittensor)."""
    wallet = bt.Wallet(name=name, hotkey="default", path=str(root))
    wallet.create_new_coldkey(use_password=False, overwrite=True, suppress=True)
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    return wallet


@dataclass(frozen=True)
class Wallets:
    miner: bt.Wallet
    validator: bt.Wallet
    unregistered: bt.Wallet
    low_stake: bt.Wallet


@pytest.fixture(scope="module")
def wallets(tmp_path_factory: pytest.TempPathFactory) -> Wallets:
    root = tmp_path_factory.mktemp("wallets")
    return Wallets(*(make_wallet(root, n) for n in ("miner", "validator", "unregistered", "low_stake")))


@dataclass
class FakeMiner:
    """MinerHandlers double: loss = page number, can fail or block on demand."""

    hotkey: str
    release: threading.Event | None = None  # if set, work() blocks until released
    calls: list[tuple[WorkRequest, str]] = field(default_factory=list)

    def is_alive(self) -> IsAliveResponse:
        return IsAliveResponse(
            version=__version__, protocol=PROTOCOL_VERSION, hotkey=self.hotkey, peer_id="peer-x", epoch=5, uid=9
        )

    def work(self, req: WorkRequest, caller_hotkey: str) -> WorkResponse:
        self.calls.append((req, caller_hotkey))
        if req.run_id == "boom":
            raise RuntimeError("simulated training crash")
        if self.release is not None:
            self.release.wait(30)
        return WorkResponse(
            run_id=req.run_id,
            round=req.round,
            epoch=5,
            peer_id="peer-x",
            losses=[float(p) for p in req.pages],
            samples_trained=1234,
        )


def make_authorize(w: Wallets):
    """Chain-policy stand-in: only the validator passes."""

    def authorize(hotkey: str) -> str | None:
        if hotkey == w.validator.hotkey.ss58_address:
            return None
        if hotkey == w.low_stake.hotkey.ss58_address:
            return "not a validator with at least 1000 stake"
        return "hotkey not registered"

    return authorize


def start_miner(w: Wallets, handlers: FakeMiner) -> ServerHandle:
    app = build_app(self_hotkey=handlers.hotkey, authorize=make_authorize(w), handlers=handlers)
    return serve_in_thread(app, HOST, 0)


@pytest.fixture
def miner(wallets: Wallets) -> Iterator[tuple[ServerHandle, FakeMiner]]:
    handlers = FakeMiner(hotkey=wallets.miner.hotkey.ss58_address)
    handle = start_miner(wallets, handlers)
    try:
        yield handle, handlers
    finally:
        handle.stop()


def signed(
    sender: bt.Wallet, body: bytes, receiver: str, path: str = WORK_PATH, nonce_ns: int | None = None
) -> dict[str, str]:
    headers = http_auth.sign(sender, method="POST", path=path, body=body, receiver_ss58=receiver, nonce_ns=nonce_ns)
    return {**headers, "Content-Type": "application/json"}


def post(port: int, path: str, body: bytes | Iterator[bytes], headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"http://{HOST}:{port}{path}", content=body, headers=headers, timeout=10)


# --------------------------------------------------------------------------- server


def test_hand_signed_request_is_accepted(wallets: Wallets, miner: tuple[ServerHandle, FakeMiner]) -> None:
    handle, handlers = miner
    receiver = wallets.miner.hotkey.ss58_address

    resp = post(handle.port, WORK_PATH, GOOD_BODY, signed(wallets.validator, GOOD_BODY, receiver))

    assert resp.status_code == 200, resp.text
    work = WorkResponse.model_validate_json(resp.content)
    assert work.losses == [7.0, 1.0, 42.0]
    assert response_mismatch(WorkRequest.model_validate_json(GOOD_BODY), work) is None
    # The handler learns who asked, from the verified signature.
    assert handlers.calls[-1][1] == wallets.validator.hotkey.ss58_address

    alive = post(handle.port, IS_ALIVE_PATH, b"{}", signed(wallets.validator, b"{}", receiver, IS_ALIVE_PATH))
    assert alive.status_code == 200, alive.text
    assert IsAliveResponse.model_validate_json(alive.content).hotkey == receiver


def test_every_bad_request_gets_its_status_and_the_miner_keeps_serving(
    wallets: Wallets, miner: tuple[ServerHandle, FakeMiner], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distributed_training.transport.server")
    handle, handlers = miner
    me = wallets.miner.hotkey.ss58_address
    v = wallets.validator

    def good(body: bytes = GOOD_BODY, path: str = WORK_PATH) -> dict[str, str]:
        return signed(v, body, me, path)

    replay_headers = good()
    oversized = b" " * (MAX_BODY_BYTES + 1)
    cases: list[tuple[str, str, bytes, dict[str, str] | None, int, str]] = [
        # (name, path, body, headers (None: validly signed), expected status, error prefix)
        ("unsigned", WORK_PATH, GOOD_BODY, {"Content-Type": "application/json"}, 401, "MalformedAuth"),
        ("tampered body", WORK_PATH, GOOD_BODY.replace(b"run-1", b"run-2"), good(), 401, "BadSignature"),
        (
            "stale nonce",
            WORK_PATH,
            GOOD_BODY,
            signed(v, GOOD_BODY, me, nonce_ns=time.time_ns() - 60 * 10**9),
            401,
            "StaleRequest",
        ),
        ("replay, first use", WORK_PATH, GOOD_BODY, replay_headers, 200, ""),
        ("replay, second use", WORK_PATH, GOOD_BODY, replay_headers, 401, "ReplayedRequest"),
        (
            "addressed to another hotkey",
            WORK_PATH,
            GOOD_BODY,
            signed(v, GOOD_BODY, wallets.unregistered.hotkey.ss58_address),
            401,
            "WrongReceiver",
        ),
        ("signed for another path", IS_ALIVE_PATH, b"{}", good(b"{}", WORK_PATH), 401, "BadSignature"),
        ("unregistered", WORK_PATH, GOOD_BODY, signed(wallets.unregistered, GOOD_BODY, me), 403, "hotkey not"),
        ("low stake", WORK_PATH, GOOD_BODY, signed(wallets.low_stake, GOOD_BODY, me), 403, "not a validator"),
        ("over the limit", WORK_PATH, oversized, good(oversized), 413, "body of"),
        ("malformed json", WORK_PATH, b"{not json", good(b"{not json"), 422, "invalid request"),
        ("empty pages", WORK_PATH, b'{"run_id":"r","round":0,"pages":[]}', None, 422, "invalid request: pages"),
        ("negative page", WORK_PATH, b'{"run_id":"r","round":0,"pages":[-1]}', None, 422, "invalid request: pages"),
        ("extra field", WORK_PATH, b'{"run_id":"r","round":0,"pages":[1],"x":1}', None, 422, "invalid request: x"),
        ("is_alive with a field", IS_ALIVE_PATH, b'{"x":1}', None, 422, "invalid request: x"),
        ("handler raises", WORK_PATH, b'{"run_id":"boom","round":0,"pages":[1]}', None, 500, "handler failed"),
    ]
    for name, path, body, headers, status, prefix in cases:
        resp = post(handle.port, path, body, good(body, path) if headers is None else headers)
        assert resp.status_code == status, f"{name}: {resp.status_code} {resp.text}"
        if prefix:
            assert resp.json()["error"].startswith(prefix), f"{name}: {resp.text}"

    # Only the one good request (and the crashing one) ever reached the handler.
    assert [req.run_id for req, _ in handlers.calls] == ["run-1", "boom"]
    # Each rejection was logged at INFO with its status and reason.
    logged = " | ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    for status, reason in ((401, "StaleRequest"), (403, "hotkey not registered"), (413, "exceeds"), (422, "pages")):
        assert f"{status} " in logged and reason in logged

    resp = post(handle.port, WORK_PATH, GOOD_BODY, good())
    assert resp.status_code == 200, resp.text
    assert WorkResponse.model_validate_json(resp.content).run_id == "run-1"


def test_chunked_oversized_body_is_refused_without_content_length(
    wallets: Wallets, miner: tuple[ServerHandle, FakeMiner]
) -> None:
    handle, _ = miner

    def chunks() -> Iterator[bytes]:  # an iterator makes httpx send Transfer-Encoding: chunked
        for _ in range(5):
            yield b" " * (MAX_BODY_BYTES // 4)

    resp = post(handle.port, WORK_PATH, chunks(), {"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert resp.status_code == 413
    assert resp.json()["error"] == f"body exceeds {MAX_BODY_BYTES} bytes"


def test_query_string_is_part_of_the_signed_target(wallets: Wallets, miner: tuple[ServerHandle, FakeMiner]) -> None:
    handle, _ = miner
    me = wallets.miner.hotkey.ss58_address

    target = WORK_PATH + "?trace=1"
    ok = post(handle.port, target, GOOD_BODY, signed(wallets.validator, GOOD_BODY, me, target))
    assert ok.status_code == 200, ok.text
    # Signing only the bare path does not cover a request sent with a query string.
    stripped = post(handle.port, target, GOOD_BODY, signed(wallets.validator, GOOD_BODY, me))
    assert stripped.status_code == 401 and stripped.json()["error"].startswith("BadSignature")


def test_unknown_path_and_method(miner: tuple[ServerHandle, FakeMiner]) -> None:
    handle, _ = miner
    missing = post(handle.port, "/nope", b"{}", {})
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = httpx.get(f"http://{HOST}:{handle.port}{WORK_PATH}", timeout=10)
    assert wrong_method.status_code == 405


def test_busy_port_fails_clearly(miner: tuple[ServerHandle, FakeMiner], wallets: Wallets) -> None:
    handle, handlers = miner
    app = build_app(self_hotkey=handlers.hotkey, authorize=make_authorize(wallets), handlers=handlers)
    with pytest.raises(PortInUseError, match=f"--axon.port {handle.port} is in use; choose another port"):
        serve_in_thread(app, HOST, handle.port)


# --------------------------------------------------------------------------- client


def test_query_many_survives_down_and_slow_miners(wallets: Wallets) -> None:
    timeout = 1.0
    release = threading.Event()
    good = FakeMiner(hotkey=wallets.miner.hotkey.ss58_address)
    slow = FakeMiner(hotkey=wallets.unregistered.hotkey.ss58_address, release=release)
    handles: list[ServerHandle] = []
    try:
        handles = [start_miner(wallets, good), start_miner(wallets, slow)]
        targets = [
            Target(uid=1, hotkey=good.hotkey, ip=HOST, port=handles[0].port),
            Target(uid=2, hotkey=slow.hotkey, ip=HOST, port=handles[1].port),
            Target(uid=3, hotkey=wallets.low_stake.hotkey.ss58_address, ip=HOST, port=free_port()),
        ]
        client = MinerClient(wallets.validator, timeout=timeout)
        request = WorkRequest(run_id="run-1", round=0, pages=[3, 4])

        start = time.perf_counter()
        results = client.run_queries(targets, WORK_PATH, request, WorkResponse)
        elapsed = time.perf_counter() - start

        assert set(results) == {1, 2, 3}
        assert results[1].ok and results[1].response is not None, results[1]
        assert results[1].response.losses == [3.0, 4.0] and results[1].status == 200
        assert not results[2].ok and results[2].response is None and "timeout" in (results[2].error or "")
        assert not results[3].ok and results[3].status is None and results[3].error
        # Concurrent, and bounded by the per-request timeout rather than the slow miner.
        assert timeout * 0.9 <= elapsed < timeout + 1.5, elapsed
        assert slow.calls, "the slow miner did receive the request"
    finally:
        release.set()  # unblock the slow handler so its server can shut down
        for h in handles:
            h.stop()


def test_query_reports_refusals_and_bad_responses(wallets: Wallets, miner: tuple[ServerHandle, FakeMiner]) -> None:
    handle, _ = miner
    me = wallets.miner.hotkey.ss58_address

    async def scenario() -> None:
        validator = MinerClient(wallets.validator, timeout=5)
        alive = await validator.query(HOST, handle.port, me, IS_ALIVE_PATH, IsAliveRequest(), IsAliveResponse)
        assert alive.ok and alive.response is not None and alive.response.protocol == PROTOCOL_VERSION

        # A reply of the wrong shape is a failure, not an exception.
        wrong = await validator.query(HOST, handle.port, me, IS_ALIVE_PATH, IsAliveRequest(), WorkResponse)
        assert not wrong.ok and wrong.status == 200 and (wrong.error or "").startswith("invalid response")

        stranger = MinerClient(wallets.unregistered, timeout=5)
        work = WorkRequest(run_id="r", round=0, pages=[1])
        refused = await stranger.query(HOST, handle.port, me, WORK_PATH, work, WorkResponse)
        assert not refused.ok and refused.status == 403 and refused.error == "HTTP 403: hotkey not registered"

        # Per-uid requests: a uid without one is reported, not raised.
        target = Target(uid=7, hotkey=me, ip=HOST, port=handle.port)
        missing = await validator.query_many([target], WORK_PATH, {8: work}, WorkResponse)
        assert not missing[7].ok and missing[7].error == "no request for this uid"

        with pytest.raises(RuntimeError, match="await query_many"):
            validator.run_queries([target], WORK_PATH, IsAliveRequest(), IsAliveResponse)

    asyncio.run(scenario())


def test_protocol_models_are_strict() -> None:
    with pytest.raises(ValueError):
        WorkRequest(run_id="r", round=0, pages=list(range(65)))
    with pytest.raises(ValueError):
        WorkResponse(run_id="r", round=0, epoch=0, peer_id="p", losses=[float("nan")], samples_trained=0)
    req = WorkRequest(run_id="r", round=1, pages=[1, 2])
    resp = WorkResponse(run_id="r", round=1, epoch=0, peer_id="p", losses=[0.5], samples_trained=0)
    assert response_mismatch(req, resp) == "1 losses for 2 pages"
    assert json.loads(IsAliveRequest().model_dump_json()) == {}


# --------------------------------------------------------------------------- bad input never floods the log


def _logged_tracebacks(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records
            if r.exc_info or r.levelno >= logging.ERROR or "Traceback" in r.getMessage()]


def _real_miner_work(hotkey: str, num_pages: int = 100):
    """The real `Miner.work` (and its answer hooks) on a stand-in for the trained parts: no torch model."""
    from types import SimpleNamespace

    from distributed_training.neuron.miner import Miner

    miner = Miner.__new__(Miner)
    miner.config = SimpleNamespace(neuron=SimpleNamespace(run_id="run-1"))
    miner.stop_event = threading.Event()
    miner.asked_pages, miner._pages_lock = [], threading.Lock()
    miner.metrics = SimpleNamespace(write=lambda *args, **fields: None)
    miner.parts = SimpleNamespace(source=SimpleNamespace(num_pages=num_pages, page=lambda page: page),
                                  peer_id="peer-x", trainer=SimpleNamespace(samples_trained=12))
    miner.snapshots = SimpleNamespace(latest_epoch=lambda: 5, epochs=lambda: [4, 5],
                                      losses_at=lambda epoch, pages: [0.5 * p + (epoch == 4) for p in pages])
    miner.identity = SimpleNamespace(hotkey=hotkey)
    return miner


@pytest.mark.parametrize(
    "body, status, reason",
    [
        ({"run_id": "run-1", "round": 0, "pages": [10**18]}, 422, "page id 1000000000000000000 is beyond this miner's data"),
        ({"run_id": "run-1", "round": 0, "pages": [3, 100]}, 422, "page id 100 is beyond this miner's data (pages 0..99)"),
        ({"run_id": "run-2", "round": 0, "pages": [3]}, 422, "this miner trains run 'run-1', not 'run-2'"),
        ({"run_id": "run-1", "round": 0, "pages": [10**30]}, 422, "page id 1000000000000000000000000000000 is beyond"),
    ],
)
def test_a_request_the_real_miner_cannot_answer_is_4xx_and_one_log_line(
    body, status, reason, wallets: Wallets, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    me = wallets.miner.hotkey.ss58_address
    miner = _real_miner_work(me)
    app = build_app(self_hotkey=me, authorize=make_authorize(wallets), handlers=miner)
    with serve_in_thread(app, HOST, 0) as handle:
        raw = json.dumps(body).encode()
        for _ in range(3):  # each request: its status and one INFO line, never a 500 and a traceback
            resp = post(handle.port, WORK_PATH, raw, signed(wallets.validator, raw, me))
            assert resp.status_code == status, resp.text
            assert resp.json()["error"].startswith(reason) and "\n" not in resp.json()["error"], resp.text
        ok = json.dumps({"run_id": "run-1", "round": 0, "pages": [0, 99]}).encode()
        resp = post(handle.port, WORK_PATH, ok, signed(wallets.validator, ok, me))
        assert resp.status_code == 200 and WorkResponse.model_validate_json(resp.content).losses == [0.0, 49.5]
        for hint, epoch, losses in ((4, 4, [1.0, 50.5]), (3, 5, [0.0, 49.5])):  # the validator's epoch, if held
            hinted = json.dumps({"run_id": "run-1", "round": 0, "pages": [0, 99], "epoch_hint": hint}).encode()
            answer = WorkResponse.model_validate_json(post(handle.port, WORK_PATH, hinted,
                                                           signed(wallets.validator, hinted, me)).content)
            assert (answer.epoch, answer.losses) == (epoch, losses)
        miner.stop_event.set()
        resp = post(handle.port, WORK_PATH, ok, signed(wallets.validator, ok, me))
        assert resp.status_code == 503 and resp.json()["error"] == "miner is not ready to answer"
    assert not _logged_tracebacks(caplog.records), _logged_tracebacks(caplog.records)
    rejected = [r.getMessage() for r in caplog.records if "rejected POST /work" in r.getMessage()]
    assert len(rejected) == 4 and all(r.levelno == logging.INFO for r in caplog.records if "rejected" in r.getMessage())


def _abort(port: int, kind: int) -> None:
    """One unauthenticated connection that gives up somewhere in the request."""
    import socket
    import struct

    sock = socket.create_connection((HOST, port), timeout=5)
    try:
        head = f"POST {WORK_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        if kind == 1:  # half a request line
            sock.sendall(b"POST /wo")
        elif kind == 2:  # the headers, half the declared body
            sock.sendall((head + "Content-Length: 1000\r\n\r\n").encode() + b'{"run_id": "r", "pa')
        elif kind == 3:  # the headers, no body yet
            sock.sendall((head + "Content-Length: 10\r\n\r\n").encode())
        elif kind == 4:  # a chunked body cut in its first chunk
            sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n100\r\n").encode() + b"{" * 20)
        if kind in (2, 4):  # and a reset instead of a close for some
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.002)  # let the server start reading
    finally:
        sock.close()  # kind 0: connect and leave at once


def test_200_aborted_unauthenticated_connections_add_no_traceback_to_the_log(
    wallets: Wallets, miner: tuple[ServerHandle, FakeMiner], caplog: pytest.LogCaptureFixture, capfd
) -> None:
    """A client that disconnects mid-body is one DEBUG line; nothing anyone sends floods the log."""
    caplog.set_level(logging.DEBUG)
    handle, handlers = miner
    for i in range(200):
        _abort(handle.port, i % 5)
    mid_body = sum(1 for i in range(200) if i % 5 in (2, 3, 4))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server notices each disconnect on its own loop
        lines = [r for r in caplog.records if "client disconnected before the body ended" in r.getMessage()]
        if len(lines) >= mid_body:
            break
        time.sleep(0.05)
    assert len(lines) == mid_body and all(r.levelno == logging.DEBUG for r in lines)
    assert not _logged_tracebacks(caplog.records), _logged_tracebacks(caplog.records)[:3]
    assert "Traceback" not in capfd.readouterr().err
    assert not handlers.calls  # nothing reached the handler
    me = wallets.miner.hotkey.ss58_address
    resp = post(handle.port, WORK_PATH, GOOD_BODY, signed(wallets.validator, GOOD_BODY, me))
    assert resp.status_code == 200, resp.text  # and the miner keeps serving
