"""Chain commitments on the embedded chain (a real SQLite file), and ChainAdmission vouching for bindings by them."""

from __future__ import annotations

import pickle
import sqlite3

import pytest

from distributed_training.chain import ChainError, LocalChain
from distributed_training.chain.admission import ChainAdmission
from distributed_training.chain.cli import main as cli_main
from distributed_training.chain.wallets import create_wallet

NETUID = 1


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wallets")
    return [create_wallet("commit", f"h{i}", root) for i in range(3)]


@pytest.fixture
def db(tmp_path, wallets):
    path = tmp_path / "chain.sqlite"
    with LocalChain(path) as chain:
        chain.create_subnet(NETUID)
        for wallet in wallets[:2]:
            chain.register(NETUID, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
    return path


def test_a_commit_replaces_the_last_one_and_every_handle_on_the_file_sees_it(db, wallets) -> None:
    hotkey = wallets[0].hotkey.ss58_address
    with LocalChain(db) as chain, LocalChain(db) as other:
        assert chain.commitments(NETUID) == {}
        chain.commit(wallets[0], NETUID, "dt-peer/1 first")
        other.commit(wallets[1], NETUID, "dt-peer/1 theirs")
        chain.commit(wallets[0], NETUID, "dt-peer/1 second")  # replaces, not appends
        expected = {hotkey: "dt-peer/1 second", wallets[1].hotkey.ss58_address: "dt-peer/1 theirs"}
        assert other.commitments(NETUID) == expected
    with LocalChain(db, create=False) as reopened:  # survives closing every handle
        assert reopened.commitments(NETUID) == expected
    with sqlite3.connect(db) as raw:  # one row per hotkey in the file itself, dated by block
        rows = raw.execute("SELECT hotkey, data FROM commitments WHERE netuid = ?", (NETUID,)).fetchall()
    assert dict(rows) == expected


def test_an_unregistered_hotkey_cannot_commit(db, wallets) -> None:
    with LocalChain(db) as chain:
        with pytest.raises(ChainError, match=f"hotkey {wallets[2].hotkey.ss58_address} is not registered"
                                             r".*dt-chain --chain.db .* register --netuid 1"):
            chain.commit(wallets[2], NETUID, "dt-peer/1 intruder")
        with pytest.raises(ChainError, match="subnet 9 does not exist"):
            chain.commit(wallets[0], 9, "dt-peer/1 x")
        assert chain.commitments(NETUID) == {}


@pytest.mark.parametrize("data, message", [
    ("x" * 129, "at most 128 bytes of utf-8, got 129"),
    ("é" * 65, "at most 128 bytes of utf-8, got 130"),  # bytes, not characters
    (b"dt-peer/1", "a commitment is text, got bytes"),
    ("", "cannot be empty"),
])
def test_bad_commitments_are_refused_in_one_line(db, wallets, data, message) -> None:
    with LocalChain(db) as chain:
        with pytest.raises(ChainError, match=message) as info:
            chain.commit(wallets[0], NETUID, data)
        assert "\n" not in str(info.value)
        chain.commit(wallets[0], NETUID, "é" * 64)  # 128 bytes fit
        assert chain.commitments(NETUID) == {wallets[0].hotkey.ss58_address: "é" * 64}


def test_dt_chain_prints_the_commitments(db, wallets, capsys) -> None:
    with LocalChain(db) as chain:
        chain.commit(wallets[1], NETUID, "dt-peer/1 shown")
    assert cli_main(["--chain.db", str(db), "commitments", "--netuid", str(NETUID)]) == 0
    out = capsys.readouterr().out
    assert f"   1  {wallets[1].hotkey.ss58_address}  dt-peer/1 shown" in out.splitlines()


def test_chain_admission_vouches_only_for_the_committed_text(db, wallets) -> None:
    admission = ChainAdmission("embedded", None, db, NETUID, ttl=60.0)
    hotkey = wallets[0].hotkey.ss58_address
    assert "has no chain commitment on netuid 1; the neuron commits at start-up" in admission.vouches(hotkey, "a")
    assert "is not registered on netuid 1" in admission.vouches(wallets[2].hotkey.ss58_address, "a")
    with LocalChain(db) as chain:
        chain.commit(wallets[0], NETUID, "dt-peer/1 old")
    admission._committed_at -= 10  # older than the retry interval
    assert admission.vouches(hotkey, "dt-peer/1 old") is None
    assert "commitment names another peer" in admission.vouches(hotkey, "dt-peer/1 other")
    assert admission(hotkey) is None  # the plain admission asks no commitment

    # a restart commits a new text: the new one is read on the retry, and the old one refused from then on
    with LocalChain(db) as chain:
        chain.commit(wallets[0], NETUID, "dt-peer/1 new")
    assert "names another peer" in admission.vouches(hotkey, "dt-peer/1 new")  # cache younger than the retry
    admission._committed_at -= 10
    assert admission.vouches(hotkey, "dt-peer/1 new") is None
    assert "names another peer" in admission.vouches(hotkey, "dt-peer/1 old")

    copy = pickle.loads(pickle.dumps(admission))  # as handed to another process: opens its own client
    assert copy._commitments is None and copy._chain is None
    assert copy.vouches(hotkey, "dt-peer/1 new") is None


def test_chain_admission_refuses_while_the_chain_cannot_be_read(tmp_path, wallets) -> None:
    admission = ChainAdmission("embedded", None, tmp_path / "missing.sqlite", NETUID)
    assert "could not be read" in admission.vouches(wallets[0].hotkey.ss58_address, "dt-peer/1 x")
