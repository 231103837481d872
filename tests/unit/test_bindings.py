"""Peer bindings: a hotkey signs that a hivemind peer and its record key are its own; strangers' claims fail."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from types import SimpleNamespace

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from distributed_training.chain.wallets import create_wallet
from distributed_training.swarm.bindings import MAX_TTL, BindingRecords, admit_registered, bind
from distributed_training.swarm.dht import DHTSettings, start_dht, visible_maddrs

NOW = 1_800_000_000.0
KEY = b"[owner:fake-rsa-key]"


@pytest.fixture(scope="module")
def wallets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wallets")
    return [create_wallet("bind", f"h{i}", root) for i in range(3)]


def _metagraph(*hotkeys: str):
    registered = set(hotkeys)
    return lambda: SimpleNamespace(by_hotkey=lambda hotkey: object() if hotkey in registered else None)


def test_a_signed_binding_holds_and_any_changed_field_breaks_it(wallets) -> None:
    hotkey = wallets[0].hotkey
    admit = admit_registered(_metagraph(hotkey.ss58_address))
    binding = bind(hotkey, "run-a", "12D3KooWpeer", KEY, ttl=600, now=NOW)
    assert binding.check(run_id="run-a", admit=admit, now=NOW + 1) is None
    for field, value in (("peer_id", "12D3KooWother"), ("record_key", KEY.hex() + "00"), ("expires", NOW + 700),
                         ("hotkey", wallets[1].hotkey.ss58_address)):
        forged = replace(binding, **{field: value})
        assert "not signed by that hotkey" in forged.check(run_id="run-a", admit=lambda h: None, now=NOW + 1), field


def test_expired_foreign_run_too_long_lived_and_unregistered_bindings_fail(wallets) -> None:
    hotkey = wallets[0].hotkey
    admit = admit_registered(_metagraph(hotkey.ss58_address))
    binding = bind(hotkey, "run-a", "12D3KooWpeer", KEY, ttl=600, now=NOW)
    assert "expired" in binding.check(run_id="run-a", admit=admit, now=NOW + 601)
    assert "not 'run-b'" in binding.check(run_id="run-b", admit=admit, now=NOW + 1)
    stranger = bind(wallets[2].hotkey, "run-a", "12D3KooWx", KEY, now=NOW)
    assert "is not registered" in stranger.check(run_id="run-a", admit=admit, now=NOW + 1)
    eternal = replace(binding, expires=NOW + 10 * MAX_TTL)  # even if it were signed, it would live too long
    assert "impossible lifetime" in eternal.check(run_id="run-a", admit=admit, now=NOW + 1)
    with pytest.raises(ValueError):
        bind(hotkey, "run-a", "12D3KooWpeer", KEY, ttl=2 * MAX_TTL)


def test_records_in_the_dht_one_live_peer_per_hotkey_and_only_under_their_own_key(dht, wallets) -> None:
    run_id = f"bind-{uuid.uuid4().hex[:8]}"
    mine = BindingRecords(dht, run_id)
    hotkeys = [w.hotkey for w in wallets[:2]]
    admit = admit_registered(_metagraph(*(h.ss58_address for h in hotkeys)))
    now = get_dht_time()
    assert mine.publish(bind(hotkeys[0], run_id, "12D3KooWfirst", mine.record_key, ttl=600, now=now - 10))

    other_key = RSAPrivateKey()  # another process's record key
    other = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=visible_maddrs(dht), timeout=60),
                      record_validators=[RSASignatureValidator(other_key)])
    try:
        theirs = BindingRecords(other, run_id, private_key=other_key)
        # the same hotkey binds a newer peer: it replaces the first one (one live peer id per hotkey)
        assert theirs.publish(bind(hotkeys[0], run_id, "12D3KooWnewer", theirs.record_key, ttl=600, now=now))
        assert set(_live_soon(mine, admit, {"12D3KooWnewer"})) == {"12D3KooWnewer"}
        # a binding naming the first peer's record key but stored under another key is ignored
        stolen = bind(hotkeys[1], run_id, "12D3KooWthief", mine.record_key, ttl=600, now=now)
        with pytest.raises(ValueError):
            theirs.publish(stolen)
        assert other.store(theirs.key, subkey=theirs.record_key, value=stolen.as_dict(),
                           expiration_time=get_dht_time() + 700) is True  # replaces its own "newer" record
        assert set(_live_soon(mine, admit, {"12D3KooWfirst"})) == {"12D3KooWfirst"}
        assert theirs.publish(bind(hotkeys[1], run_id, "12D3KooWsecond", theirs.record_key, ttl=1200, now=now))
        live = _live_soon(mine, admit, {"12D3KooWfirst", "12D3KooWsecond"})
        assert set(live) == {"12D3KooWfirst", "12D3KooWsecond"}, live
        assert {b.hotkey for b in live.values()} == {h.ss58_address for h in hotkeys}
    finally:
        other.shutdown()


def _live_soon(records: BindingRecords, admit, expected: set[str], timeout: float = 10.0) -> dict:
    """The live bindings, read again until they are `expected` or `timeout` passed (the DHT is eventually consistent)."""
    deadline = time.monotonic() + timeout
    while True:
        live = records.live(admit)
        if set(live) == expected or time.monotonic() > deadline:
            return live
        time.sleep(0.1)  # polling the DHT, which another node writes
