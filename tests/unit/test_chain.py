"""Embedded chain (LocalChain), open_chain, wallets and the dt-chain CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from distributed_training.chain import (
    ChainError,
    LocalChain,
    NeuronInfo,
    SubtensorChain,
    open_chain,
)
from distributed_training.chain.cli import main as cli_main
from distributed_training.chain.wallets import WalletError, create_wallet, load_wallet

REPO_ROOT = Path(__file__).resolve().parents[2]
NETUID = 1


class FakeClock:
    """Wall clock under test control: blocks advance only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hotkey_wallet(address: str) -> SimpleNamespace:
    """The only part of a wallet the embedded chain reads: the hotkey address."""
    return SimpleNamespace(hotkey=SimpleNamespace(ss58_address=address))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def chain(tmp_path: Path, clock: FakeClock):
    chain = LocalChain(tmp_path / "chain.sqlite", block_time=2.0, clock=clock)
    chain.create_subnet(NETUID)
    yield chain
    chain.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


# --- blocks ------------------------------------------------------------------


def test_blocks_follow_the_injected_clock(chain: LocalChain, clock: FakeClock) -> None:
    assert chain.block() == 0
    clock.now += 1.9
    assert chain.block() == 0
    clock.now += 0.1
    assert chain.block() == 1
    clock.now += 20
    assert chain.block() == 11
    assert chain.metagraph(NETUID).block == 11


def test_genesis_and_block_time_are_fixed_by_the_first_opener(
    chain: LocalChain, clock: FakeClock
) -> None:
    clock.now += 10
    other = LocalChain(chain.db_path, block_time=0.5, clock=clock)
    try:
        assert other.block_time == 2.0
        assert other.block() == chain.block() == 5
    finally:
        other.close()


def test_rejects_non_positive_block_time(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="block_time must be a positive"):
        LocalChain(tmp_path / "c.sqlite", block_time=0)


# --- subnets and registration -------------------------------------------------


def test_create_subnet_errors_unless_exist_ok(chain: LocalChain) -> None:
    with pytest.raises(ChainError, match="subnet 1 already exists.*--exist-ok"):
        chain.create_subnet(NETUID)
    chain.create_subnet(NETUID, exist_ok=True)
    chain.create_subnet(2, tempo=10)
    assert chain.netuids() == [1, 2]


def test_register_assigns_next_uid_and_is_idempotent(chain: LocalChain, clock: FakeClock) -> None:
    assert chain.register(NETUID, "hk-a", "ck-1") == 0
    clock.now += 4
    assert chain.register(NETUID, "hk-b", "ck-1", stake=5.0, validator_permit=True) == 1
    assert chain.register(NETUID, "hk-a", "ck-1", stake=99.0) == 0  # same uid, nothing changed
    assert chain.uid_for(NETUID, "hk-b") == 1
    assert chain.uid_for(NETUID, "nobody") is None
    assert chain.is_registered(NETUID, "hk-a") and not chain.is_registered(NETUID, "nobody")

    graph = chain.metagraph(NETUID)
    assert graph.uids == [0, 1] and graph.hotkeys == ["hk-a", "hk-b"]
    assert graph.by_hotkey("hk-a") == NeuronInfo(0, "hk-a", "ck-1", 0.0, False, "", 0)
    assert graph.by_hotkey("hk-b") == NeuronInfo(1, "hk-b", "ck-1", 5.0, True, "", 0)
    assert graph.by_hotkey("nobody") is None
    assert [n.uid for n in graph.validators] == [1]


def test_register_rejects_a_hotkey_owned_by_another_coldkey(chain: LocalChain) -> None:
    chain.register(NETUID, "hk-a", "ck-1")
    with pytest.raises(ChainError, match="already registered .* under coldkey ck-1"):
        chain.register(NETUID, "hk-a", "ck-2")


def test_register_on_missing_subnet_names_the_fix(chain: LocalChain) -> None:
    with pytest.raises(ChainError, match="subnet 7 does not exist.*dt-chain --chain.db .* create-subnet --netuid 7"):
        chain.register(7, "hk", "ck")
    with pytest.raises(ChainError, match="subnet 7 does not exist"):
        chain.metagraph(7)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"netuid": -1}, "netuid must be an integer"),
        ({"netuid": 70000}, "netuid must be an integer"),
        ({"hotkey": ""}, "hotkey must be a non-empty"),
        ({"stake": -1.0}, "stake must be a finite non-negative"),
        ({"stake": float("nan")}, "stake must be a finite non-negative"),
    ],
)
def test_register_rejects_bad_input(chain: LocalChain, kwargs: dict, message: str) -> None:
    args = {"netuid": NETUID, "hotkey": "hk", "coldkey": "ck", **kwargs}
    with pytest.raises(ChainError, match=message):
        chain.register(**args)


def test_set_stake_updates_stake_and_optionally_the_permit(chain: LocalChain) -> None:
    chain.register(NETUID, "hk", "ck")
    chain.set_stake(NETUID, "hk", 42.0, validator_permit=True)
    chain.set_stake(NETUID, "hk", 43.0)  # permit untouched
    neuron = chain.metagraph(NETUID).by_hotkey("hk")
    assert neuron is not None and neuron.stake == 43.0 and neuron.validator_permit


# --- endpoints ------------------------------------------------------------------


def test_serve_endpoint_publishes_ipv4_and_ipv6(chain: LocalChain) -> None:
    chain.register(NETUID, "hk-a", "ck")
    chain.register(NETUID, "hk-b", "ck")
    chain.serve_endpoint(hotkey_wallet("hk-a"), NETUID, "10.0.0.5", 8091)
    chain.serve_endpoint(hotkey_wallet("hk-b"), NETUID, "::1", 9000)
    chain.serve_endpoint(hotkey_wallet("hk-a"), NETUID, "10.0.0.6", 8092)  # move
    graph = chain.metagraph(NETUID)
    a, b = graph.by_hotkey("hk-a"), graph.by_hotkey("hk-b")
    assert (a.ip, a.port, a.endpoint) == ("10.0.0.6", 8092, "10.0.0.6:8092")
    assert (b.ip, b.port, b.endpoint) == ("::1", 9000, "[::1]:9000")


def test_serve_endpoint_requires_registration(chain: LocalChain) -> None:
    with pytest.raises(ChainError, match="hotkey hk-x is not registered on netuid 1; register it with `dt-chain"):
        chain.serve_endpoint(hotkey_wallet("hk-x"), NETUID, "10.0.0.5", 8091)


@pytest.mark.parametrize(
    "ip, port, message",
    [
        ("localhost", 8091, "invalid ip 'localhost'"),
        ("0.0.0.0", 8091, "wildcard"),
        ("10.0.0.5", 0, "port must be an integer in 1..65535"),
        ("10.0.0.5", 70000, "port must be an integer in 1..65535"),
    ],
)
def test_serve_endpoint_rejects_undialable_endpoints(
    chain: LocalChain, ip: str, port: int, message: str
) -> None:
    chain.register(NETUID, "hk", "ck")
    with pytest.raises(ChainError, match=message):
        chain.serve_endpoint(hotkey_wallet("hk"), NETUID, ip, port)


# --- weights ---------------------------------------------------------------------


def test_set_weights_normalizes_and_replaces_the_previous_row(
    chain: LocalChain, clock: FakeClock
) -> None:
    for name in ("m0", "m1", "m2"):
        chain.register(NETUID, name, "ck")
    validator = chain.register(NETUID, "val", "ck-v", stake=10.0, validator_permit=True)
    clock.now += 6
    chain.set_weights(hotkey_wallet("val"), NETUID, [0, 1, 2], [1.0, 3.0, 0.0], version_key=7)
    assert chain.weights(NETUID) == {validator: {0: 0.25, 1: 0.75}}  # zero dropped

    clock.now += 2
    chain.set_weights(hotkey_wallet("val"), NETUID, [2], [5.0], version_key=8)
    assert chain.weights(NETUID) == {validator: {2: 1.0}}

    with sqlite3.connect(chain.db_path) as db:  # the row carries version key and block
        assert db.execute("SELECT version_key, block FROM weights").fetchall() == [(8, 4)]


def test_set_weights_requires_a_validator_permit(chain: LocalChain) -> None:
    chain.register(NETUID, "miner", "ck")
    with pytest.raises(ChainError, match="no validator permit on netuid 1; grant one with `dt-chain"):
        chain.set_weights(hotkey_wallet("miner"), NETUID, [0], [1.0], version_key=1)
    with pytest.raises(ChainError, match="not registered"):
        chain.set_weights(hotkey_wallet("ghost"), NETUID, [0], [1.0], version_key=1)


@pytest.mark.parametrize(
    "uids, weights, message",
    [
        ([0, 1], [1.0], "differ in length"),
        ([], [], "no weights given"),
        ([0, 0], [1.0, 1.0], "duplicate uids"),
        ([0], [-1.0], "finite and non-negative"),
        ([0], [float("inf")], "finite and non-negative"),
        ([0], [0.0], "all weights are zero"),
        ([5], [1.0], r"uids \[5\] are not registered"),
    ],
)
def test_set_weights_rejects_bad_vectors(
    chain: LocalChain, uids: list, weights: list, message: str
) -> None:
    chain.register(NETUID, "val", "ck", validator_permit=True)
    with pytest.raises(ChainError, match=message):
        chain.set_weights(hotkey_wallet("val"), NETUID, uids, weights, version_key=1)
    assert chain.weights(NETUID) == {}


def test_two_handles_on_one_file_see_each_others_writes(chain: LocalChain, clock: FakeClock) -> None:
    other = LocalChain(chain.db_path, clock=clock)
    try:
        other.register(NETUID, "from-other", "ck")
        assert chain.metagraph(NETUID).hotkeys == ["from-other"]
    finally:
        other.close()
    with pytest.raises(ChainError, match="is closed"):
        other.metagraph(NETUID)


def test_unreadable_database_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-db.sqlite"
    bogus.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(ChainError, match="not a database"):
        LocalChain(bogus)


# --- many OS processes on one file -------------------------------------------------

_WORKER = r"""
import json, sys
from types import SimpleNamespace
from distributed_training.chain.local import LocalChain

db, worker, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chain = LocalChain(db)
print("ready", flush=True)
sys.stdin.readline()  # start barrier: the parent releases every worker at once
validator = f"validator-{worker}"
chain.register(1, validator, f"cold-{worker}", stake=10.0, validator_permit=True)
shared = chain.register(1, "shared-hotkey", "shared-cold")
wallet = SimpleNamespace(hotkey=SimpleNamespace(ss58_address=validator))
for i in range(rounds):
    chain.register(1, f"miner-{worker}-{i}", f"cold-{worker}")
    uids = chain.metagraph(1).uids
    chain.set_weights(wallet, 1, uids, [float(u + 1) for u in uids], version_key=worker)
print(json.dumps({"validator": chain.uid_for(1, validator), "shared": shared}), flush=True)
chain.close()
"""


def test_concurrent_processes_leave_the_chain_consistent(chain: LocalChain) -> None:
    workers, rounds = 4, 8
    procs: list[subprocess.Popen] = []
    # Watchdog: a wedged worker must fail the test, not hang it.
    watchdog = threading.Timer(120, lambda: [p.kill() for p in procs])
    watchdog.start()
    try:
        for worker in range(workers):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _WORKER, str(chain.db_path), str(worker), str(rounds)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, cwd=REPO_ROOT, env=_env(),
                )
            )
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        for proc in procs:  # all workers are parked on stdin: release them together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        watchdog.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    graph = chain.metagraph(NETUID)
    expected = {"shared-hotkey"} | {f"validator-{w}" for w in range(workers)}
    expected |= {f"miner-{w}-{i}" for w in range(workers) for i in range(rounds)}
    assert graph.uids == list(range(len(expected)))  # unique and gap-free
    assert sorted(graph.hotkeys) == sorted(expected)
    assert len({r["shared"] for r in results}) == 1  # racing registrations agreed

    weights = chain.weights(NETUID)
    validator_uids = {r["validator"] for r in results}
    assert set(weights) == validator_uids == {n.uid for n in graph.validators}
    for row in weights.values():
        assert sum(row.values()) == pytest.approx(1.0)
        assert set(row) <= set(graph.uids)


# --- open_chain ---------------------------------------------------------------------


def test_open_chain_picks_the_backend(tmp_path: Path) -> None:
    LocalChain(tmp_path / "c.sqlite").close()  # dt-chain's job: a neuron's open_chain never creates the file
    embedded = open_chain("embedded", None, tmp_path / "c.sqlite")
    try:
        assert isinstance(embedded, LocalChain) and embedded.network == "embedded"
    finally:
        embedded.close()
    remote = open_chain("finney", None, tmp_path / "unused.sqlite")  # lazy: no connection
    assert isinstance(remote, SubtensorChain) and remote.network == "finney"
    assert not (tmp_path / "unused.sqlite").exists()


@pytest.mark.parametrize(
    "network, endpoint, db_path, message",
    [
        ("embedded", None, None, "pass --chain.db PATH"),
        ("embedded", "ws://127.0.0.1:9944", "x.sqlite", "drop the endpoint"),
        ("mainnet", None, None, "unknown network 'mainnet'"),
    ],
)
def test_open_chain_rejects_bad_settings(network, endpoint, db_path, message) -> None:
    with pytest.raises(ChainError, match=message):
        open_chain(network, endpoint, db_path)


# --- wallets ---------------------------------------------------------------------------


def test_load_wallet_missing_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(WalletError, match=r"wallet w/hotkey h not found under .*dt-chain wallet create"):
        load_wallet("w", "h", tmp_path)
    with pytest.raises(WalletError, match="invalid wallet name"):
        load_wallet("a/b", "h", tmp_path)


def test_create_wallet_is_idempotent_and_shares_the_coldkey(tmp_path: Path) -> None:
    first = create_wallet("w", "h1", tmp_path)
    again = create_wallet("w", "h1", tmp_path)
    sibling = create_wallet("w", "h2", tmp_path)
    assert again.hotkey.ss58_address == first.hotkey.ss58_address
    assert sibling.coldkeypub.ss58_address == first.coldkeypub.ss58_address
    assert sibling.hotkey.ss58_address != first.hotkey.ss58_address
    assert load_wallet("w", "h1", tmp_path).hotkey.ss58_address == first.hotkey.ss58_address
    assert not first.coldkey_file.is_encrypted()


# --- CLI ---------------------------------------------------------------------------------


def _dt_chain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distributed_training.chain.cli", *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=_env(), timeout=120,
    )


def test_cli_round_trip(tmp_path: Path) -> None:
    db, wallets = str(tmp_path / "chain.sqlite"), str(tmp_path / "wallets")
    created = _dt_chain("wallet", "create", "--wallet.name", "miner", "--wallet.hotkey", "h", "--wallet.path", wallets)
    assert created.returncode == 0, created.stderr
    validator = create_wallet("validator", "h", wallets)  # in-process: same files, no second import
    miner = load_wallet("miner", "h", wallets)
    assert miner.hotkey.ss58_address in created.stdout

    steps = [
        ("--chain.db", db, "create-subnet", "--netuid", "3", "--tempo", "10"),
        ("--chain.db", db, "register", "--netuid", "3", "--wallet.name", "miner", "--wallet.hotkey", "h",
         "--wallet.path", wallets),
        ("--chain.db", db, "register", "--netuid", "3", "--wallet.name", "validator", "--wallet.hotkey", "h",
         "--wallet.path", wallets, "--stake", "100", "--validator"),
    ]
    for step in steps:
        result = _dt_chain(*step)
        assert result.returncode == 0, result.stderr
    assert "as uid 1" in result.stdout

    with LocalChain(db) as chain:
        chain.serve_endpoint(miner, 3, "127.0.0.1", 8091)

    shown = _dt_chain("--chain.db", db, "metagraph", "--netuid", "3")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert "netuid 3" in lines[0] and "block" in lines[0] and "neurons 2" in lines[0]
    assert lines[1].split() == ["UID", "HOTKEY", "COLDKEY", "STAKE", "VPERMIT", "ENDPOINT"]
    row0, row1 = lines[2].split(), lines[3].split()
    assert row0[0] == "0" and row0[1] == miner.hotkey.ss58_address and row0[-1] == "127.0.0.1:8091"
    assert row1[0] == "1" and row1[1] == validator.hotkey.ss58_address
    assert row1[3:] == ["100.0000", "*", "-"]


def test_cli_error_is_one_line_and_exit_2_in_a_real_process(tmp_path: Path) -> None:
    result = _dt_chain("--chain.db", str(tmp_path / "none.sqlite"), "metagraph", "--netuid", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("dt-chain: error: no embedded chain")


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: COMMAND"),
        (["metagraph", "--netuid", "abc"], "invalid int value: 'abc'"),
        (["create-subnet", "--netuid", "70000"], "netuid must be an integer"),
        (["metagraph", "--netuid", "9"], "subnet 9 does not exist"),
        (["register", "--netuid", "1", "--wallet.name", "nope", "--wallet.hotkey", "h"], "not found under"),
        (["wallet"], "required: COMMAND"),
        (["create-subnet", "--netuid", "1"], "already exists"),
    ],
)
def test_cli_bad_input_gives_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list, message: str
) -> None:
    db = tmp_path / "chain.sqlite"
    with LocalChain(db) as chain:
        chain.create_subnet(1)
    wallet_path = ["--wallet.path", str(tmp_path / "w")] if "register" in argv else []
    assert cli_main(["--chain.db", str(db), *argv, *wallet_path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dt-chain: error: ") and message in err
