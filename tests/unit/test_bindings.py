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


def test_chain_admission_reads_the_metagraph_in_whichever_process_asks(tmp_path, wallets) -> None:
    import multiprocessing

    from distributed_training.chain import LocalChain
    from distributed_training.chain.admission import ChainAdmission

    db = tmp_path / "chain.sqlite"
    with LocalChain(db) as chain:
        chain.create_subnet(1)
        chain.register(1, wallets[0].hotkey.ss58_address, wallets[0].coldkeypub.ss58_address)
    admission = ChainAdmission("embedded", None, db, 1, ttl=60.0)
    assert admission(wallets[0].hotkey.ss58_address) is None
    assert "is not registered on netuid 1" in admission(wallets[1].hotkey.ss58_address)

    # a hotkey registered after the metagraph was cached is admitted on the retry read
    with LocalChain(db) as chain:
        chain.register(1, wallets[1].hotkey.ss58_address, wallets[1].coldkeypub.ss58_address)
    admission._read_at -= 10  # older than the retry interval; the cache itself is still fresh
    assert admission(wallets[1].hotkey.ss58_address) is None

    # a forked copy (as in an averager's process) opens its own client
    context = multiprocessing.get_context("fork")
    answers = context.Queue()
    child = context.Process(target=lambda: answers.put((admission(wallets[0].hotkey.ss58_address),
                                                        admission(wallets[2].hotkey.ss58_address))))
    child.start()
    try:
        admitted, refused = answers.get(timeout=30)
    finally:
        child.join(timeout=30)
    assert admitted is None and "not registered" in refused


def test_bound_peers_admit_a_published_binding_and_refuse_strangers(dht, wallets) -> None:
    from distributed_training.swarm.bindings import BoundPeers, PeerBinder

    run_id = f"bind-{uuid.uuid4().hex[:8]}"
    binder = PeerBinder(dht, run_id, wallets[0].hotkey, ttl=600)
    first = binder.renew()
    assert binder.renew() is first  # young: not renewed
    assert binder.renew(force=True).issued >= first.issued
    peers = BoundPeers(dht, run_id, admit_registered(_metagraph(wallets[0].hotkey.ss58_address)), retry=0.0)
    deadline = time.monotonic() + 10
    while peers(dht.peer_id.to_base58()) is not None and time.monotonic() < deadline:
        time.sleep(0.1)  # polling the DHT until the record is readable
    assert peers(dht.peer_id.to_base58()) is None
    assert "no valid binding" in peers("12D3KooWstranger")
    # the hotkey's registration lapses: its peer is refused from the next read on
    lapsed = BoundPeers(dht, run_id, admit_registered(_metagraph()), retry=0.0)
    assert "no valid binding" in lapsed(dht.peer_id.to_base58())


# --- the chain commitment: which one peer a hotkey runs -------------------------------------------


def _chain_with(tmp_path, *registered):
    """A real embedded chain file with `registered` wallets on netuid 1, and an admission reading it afresh."""
    from distributed_training.chain import LocalChain
    from distributed_training.chain.admission import ChainAdmission

    db = tmp_path / "chain.sqlite"
    with LocalChain(db) as chain:
        chain.create_subnet(1)
        for wallet in registered:
            chain.register(1, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
    return LocalChain(db), ChainAdmission("embedded", None, db, 1, ttl=0.0)


def test_binding_commitment_is_short_stable_and_names_peer_and_record_key(dht) -> None:
    from distributed_training.swarm.bindings import binding_commitment

    peer, key = dht.peer_id.to_base58(), RSASignatureValidator(RSAPrivateKey()).local_public_key.hex()
    text = binding_commitment(peer, key)
    assert text == binding_commitment(peer, key) and text.startswith(f"dt-peer/1 {peer} ")
    assert len(text.encode()) <= 128
    assert binding_commitment(peer, KEY.hex()) != text  # a new record key after a restart
    assert binding_commitment("12D3KooWother", key) != text  # a new peer id
    with pytest.raises(ValueError):
        binding_commitment(peer, "not hex")


def test_a_binding_counts_only_while_its_hotkeys_chain_commitment_names_it(tmp_path, wallets) -> None:
    from distributed_training.swarm.bindings import binding_commitment

    chain, admission = _chain_with(tmp_path, wallets[0])
    with chain:
        binding = bind(wallets[0].hotkey, "run-a", "12D3KooWpeer", KEY, ttl=600, now=NOW)
        assert "has no chain commitment" in binding.check(run_id="run-a", admit=admission, now=NOW + 1)
        chain.commit(wallets[0], 1, binding_commitment("12D3KooWolder", KEY.hex()))
        refused = binding.check(run_id="run-a", admit=admission, now=NOW + 1)  # validly signed, unexpired
        assert "chain commitment names another peer" in refused
        chain.commit(wallets[0], 1, binding_commitment(binding.peer_id, binding.record_key))
        assert binding.check(run_id="run-a", admit=admission, now=NOW + 1) is None
        # a plain admission callable checks registration only, as before
        assert binding.check(run_id="run-a", admit=lambda hotkey: None, now=NOW + 1) is None


def test_a_restarted_neuron_replaces_its_old_peer_at_once_whatever_the_timestamps(dht, tmp_path, wallets) -> None:
    from distributed_training.swarm.bindings import BoundPeers, binding_commitment

    run_id = f"bind-{uuid.uuid4().hex[:8]}"
    chain, admission = _chain_with(tmp_path, wallets[0])
    old = BindingRecords(dht, run_id)
    other_key = RSAPrivateKey()  # the restarted process: another DHT node, another record key
    other = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=visible_maddrs(dht), timeout=60),
                      record_validators=[RSASignatureValidator(other_key)])
    try:
        new = BindingRecords(other, run_id, private_key=other_key)
        now = get_dht_time()
        new_peer = other.peer_id.to_base58()
        # the old process renewed its binding after the new one started: newer, valid and unexpired
        assert new.publish(bind(wallets[0].hotkey, run_id, new_peer, new.record_key, ttl=600, now=now - 20))
        assert old.publish(bind(wallets[0].hotkey, run_id, "12D3KooWold", old.record_key, ttl=600, now=now))
        deadline = time.monotonic() + 10
        while len(getattr(dht.get(old.key, latest=True), "value", None) or {}) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the DHT until both records are readable
        chain.commit(wallets[0], 1, binding_commitment("12D3KooWold", old.record_key.hex()))
        assert set(old.live(admission)) == {"12D3KooWold"}
        chain.commit(wallets[0], 1, binding_commitment(new_peer, new.record_key.hex()))  # the restart commits
        assert set(old.live(admission)) == {new_peer}  # no wait: the chain says which one peer it is
        peers = BoundPeers(dht, run_id, admission, retry=0.0)
        assert peers(new_peer) is None and "no valid binding" in peers("12D3KooWold")
    finally:
        other.shutdown()
        chain.close()


def test_peer_binder_commits_once_per_text_and_survives_a_failing_commit(dht, wallets, caplog) -> None:
    from distributed_training.chain import ChainError
    from distributed_training.swarm.bindings import PeerBinder, binding_commitment

    commits, failures = [], [ChainError("cannot reach subtensor")]

    def commit(text: str) -> None:
        if failures:
            raise failures.pop()
        commits.append(text)

    binder = PeerBinder(dht, f"bind-{uuid.uuid4().hex[:8]}", wallets[0].hotkey, ttl=600, commit=commit)
    with caplog.at_level("WARNING"):
        first = binder.renew()  # the commit fails: logged, the DHT binding still goes out
    assert first is binder.current and commits == [] and "could not commit" in caplog.text
    binder.renew()
    binder.renew(force=True)
    binder.renew()
    expected = binding_commitment(dht.peer_id.to_base58(), binder.records.record_key.hex())
    assert commits == [expected]  # retried once, then never again while nothing changed
    binder.dht = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "12D3KooWrestarted"))
    binder.renew()
    assert commits == [expected, binding_commitment("12D3KooWrestarted", binder.records.record_key.hex())]
