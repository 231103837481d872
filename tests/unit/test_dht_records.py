"""Signed miner records in hivemind's DHT, and bootstrapping that fails with a useful message.

Two DHT nodes of one "peer" run in this process. hivemind signs with one RSA key per process
(MinerRecords uses it too), so the other peer, which tries to overwrite a record it does not own,
is a third DHT node started with an RSA key of its own: exactly what a separate process has.
"""

from __future__ import annotations

import time
import uuid

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from distributed_training.swarm.dht import (
    DHTBootstrapError, DHTSettings, MinerRecord, MinerRecords, start_dht, visible_maddrs,
)

FORGED = dict(peer_id="victim", uid=1, epoch=99, samples_trained=10**9, time=2.0)


def _run_id() -> str:
    return f"rec-{uuid.uuid4().hex[:8]}"


def _record(epoch: int = 3, peer_id: str = "victim", samples: int = 40) -> MinerRecord:
    return MinerRecord(peer_id=peer_id, uid=1, epoch=epoch, samples_trained=samples, time=float(time.time()))


@pytest.fixture(scope="module")
def dhts():
    first = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
    second = None
    try:
        second = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=visible_maddrs(first),
                                       attempts=2, timeout=60))
        yield first, second
    finally:
        if second is not None:
            second.shutdown()
        first.shutdown()


def test_published_record_is_visible_from_the_other_node(dhts) -> None:
    first, second = dhts
    run_id = _run_id()
    writer, reader = MinerRecords(first, run_id), MinerRecords(second, run_id)
    assert reader.fetch() == {}

    record = _record()
    assert writer.publish(record)
    assert reader.fetch() == {"victim": record}
    assert reader.wait_for(1, timeout=5) == {"victim": record}

    updated = _record(epoch=4, samples=80)
    assert writer.publish(updated)
    assert reader.fetch() == {"victim": updated}  # one subkey per peer: the newer record replaces it
    assert MinerRecords(first, _run_id()).fetch() == {}  # other runs do not see it

    # with bindings, a record counts only if a live binding names its peer id and the key that signed it
    from distributed_training.swarm.bindings import PeerBinding

    def bound(key: str) -> dict:
        return {"victim": PeerBinding(run_id=run_id, hotkey="hk", peer_id="victim", record_key=key, issued=0.0,
                                      expires=1.0)}

    key = writer._signer.local_public_key.hex()
    assert reader.fetch(bindings=lambda ids: {}) == {}
    assert reader.fetch(bindings=lambda ids: bound("00" + key)) == {}
    assert reader.fetch(bindings=lambda ids: bound(key)) == {"victim": updated}


def test_wait_for_times_out_naming_the_count(dhts) -> None:
    first, _ = dhts
    records = MinerRecords(first, _run_id())
    with pytest.raises(TimeoutError, match="only 0 of 2 miners"):
        records.wait_for(2, timeout=0.0)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(dict(peer_id=123, uid=1, epoch=5, samples_trained=1, time=1.0), id="peer_id-not-str"),
        pytest.param(dict(peer_id="victim", uid=1, epoch=-1, samples_trained=1, time=1.0), id="negative-epoch"),
        pytest.param(dict(peer_id="victim", uid=1, epoch="5", samples_trained=1, time=1.0), id="epoch-as-str"),
        pytest.param(dict(peer_id="victim", uid=1, epoch=5, samples_trained=1.5, time=1.0), id="samples-float"),
        pytest.param(dict(peer_id="victim", uid=-2, epoch=5, samples_trained=1, time=1.0), id="negative-uid"),
        pytest.param(dict(peer_id="victim", uid=1, epoch=5, time=1.0), id="missing-field"),
        pytest.param("not a record", id="not-a-dict"),
    ],
)
def test_malformed_value_is_rejected_by_the_schema(dhts, value) -> None:
    first, second = dhts
    run_id = _run_id()
    records, reader = MinerRecords(first, run_id), MinerRecords(second, run_id)  # both nodes of the run validate
    good = _record()
    assert records.publish(good)

    stored = first.store(records.key, subkey=records._signer.local_public_key, value=value,
                         expiration_time=get_dht_time() + 60)

    assert stored is False
    assert reader.fetch() == {"victim": good}
    assert records.fetch() == {"victim": good}


def test_subkey_without_a_public_key_is_rejected(dhts) -> None:
    first, second = dhts
    run_id = _run_id()
    records, reader = MinerRecords(first, run_id), MinerRecords(second, run_id)
    value = _record(peer_id="unsigned").dict()
    assert first.store(records.key, subkey=b"no-public-key", value=value, expiration_time=get_dht_time() + 60) is False
    assert reader.fetch() == {} and records.fetch() == {}


def test_another_peer_cannot_overwrite_a_record_it_does_not_own(dhts) -> None:
    first, second = dhts
    run_id = _run_id()
    victim, reader = MinerRecords(first, run_id), MinerRecords(second, run_id)
    original = _record(epoch=3, samples=40)
    assert victim.publish(original)

    other_key = RSASignatureValidator(RSAPrivateKey())  # not the process-wide key: another peer's
    assert other_key.local_public_key != victim._signer.local_public_key
    attacker = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=visible_maddrs(first), timeout=60),
                         record_validators=[other_key])
    try:
        MinerRecords(attacker, run_id)  # the run's schema; its signer keeps the key it started with
        own = attacker.store(victim.key, subkey=other_key.local_public_key,
                             value=_record(peer_id="attacker").dict(), expiration_time=get_dht_time() + 60)
        forged = attacker.store(victim.key, subkey=victim._signer.local_public_key, value=FORGED,
                                expiration_time=get_dht_time() + 60)
    finally:
        attacker.shutdown()

    assert own is True  # the other peer may write its own record...
    assert forged is False  # ...but not under the victim's subkey
    fetched = reader.fetch()
    assert set(fetched) == {"victim", "attacker"}
    assert fetched["victim"] == original
    assert victim.fetch()["victim"] == original


# --- bootstrapping ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["closed-port", "wrong-peer-id"])
def test_unreachable_initial_peer_raises_bootstrap_error_listing_address_and_causes(dhts, case: str) -> None:
    first, _ = dhts
    if case == "closed-port":  # a real peer id on a port nothing listens on
        address = f"/ip4/127.0.0.1/tcp/1/p2p/{first.peer_id}"
    else:  # a live node's address with a peer id that is not its own (the peer restarted)
        live = visible_maddrs(first)[0].rsplit("/p2p/", 1)[0]
        address = f"{live}/p2p/12D3KooWGy9fHL4PYsf89EnsiCjsaD83GN6Zv99CK2bwycejSEUU"
    started = time.monotonic()
    with pytest.raises(DHTBootstrapError) as info:
        start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=[address], attempts=2, timeout=20))
    elapsed = time.monotonic() - started

    message = str(info.value)
    assert elapsed < 45, f"bootstrap gave up only after {elapsed:.0f}s"
    assert "after 2 attempts" in message, message
    assert address in message
    assert "Last error: attempt 2" in message, message
    for cause in ("firewall", "--dht.announce_ip", "stale", "--dht.port"):
        assert cause in message, message
    assert "\n" not in message


def test_announce_ip_without_fixed_port_fails_before_starting() -> None:
    started = time.monotonic()
    with pytest.raises(DHTBootstrapError, match="--dht.announce_ip needs a fixed --dht.port"):
        start_dht(DHTSettings(port=0, announce_ip="203.0.113.5"))
    assert time.monotonic() - started < 5  # nothing was started or retried


def test_restarted_dht_node_is_not_confused_with_the_stale_peer_file_of_the_last_run(tmp_path) -> None:
    """`dt-local-swarm --keep` reuses state dirs: the addresses must be the new node's, not the last run's."""
    import json

    from distributed_training.localnet.processes import ProcessGroup

    stale = "/ip4/127.0.0.1/tcp/1/p2p/QmStaleStaleStaleStaleStaleStaleStaleStaleStale1"
    (tmp_path / "dht").mkdir()
    (tmp_path / "dht" / "dht.json").write_text(json.dumps({"peer_id": "QmStale", "maddrs": [stale]}))
    with ProcessGroup(tmp_path / "logs") as group:
        node = group.start_dht_node("dht", tmp_path / "dht")
        peers = group.initial_peers(node)
        assert stale not in peers and peers, peers
        assert all(addr.startswith("/ip4/127.0.0.1/") for addr in peers), peers


def test_a_held_port_is_refused_before_p2pd_starts() -> None:
    """p2pd binds with SO_REUSEPORT, so a second one would start on a held port and split its traffic."""
    import socket

    from distributed_training.swarm.dht import DHTPortInUse, check_port_free

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as p2pd does
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(DHTPortInUse) as info:
            start_dht(DHTSettings(port=port))
        assert f"--dht.port {port} (tcp) is in use" in str(info.value) and "\n" not in str(info.value)
    finally:
        holder.close()
    check_port_free(DHTSettings(port=port))  # free again once the holder is gone
