"""Bounded DHT records: a run's nodes refuse oversized or long-lived records; readers parse a few signers only."""

from __future__ import annotations

import time
import uuid
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from distributed_training.config import parse_config
from distributed_training.spec import RunSpec
from distributed_training.swarm import ban_records, bindings, dht as dht_module, progress, state_digests
from distributed_training.swarm.ban_records import MAX_BANS, BanRecords, read_bans
from distributed_training.swarm.bindings import PeerBinding
from distributed_training.swarm.dht import MinerRecord, MinerRecords, visible_maddrs
from distributed_training.swarm.progress import bound_progress
from distributed_training.swarm.record_bounds import (ANY_KEY, CLOCK_SLACK, MAX_SIGNERS, RUN_RECORDS, RecordBounds,
                                                      bounded_entries, record_keys, run_keys)
from distributed_training.swarm.verdict_reports import MAX_REPORTS, _VerdictRecord

SIGNER = RSASignatureValidator(RSAPrivateKey())
PEER = PeerID.from_base58("12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN")


def _signed(name: str, value, subkey: bytes = SIGNER.local_public_key, lifetime: float = 60.0) -> DHTRecord:
    """The record a node would validate: key id, serialized subkey, value with its RSA signature."""
    record = DHTRecord(DHTID.generate(source=name).to_bytes(), MSGPackSerializer.dumps(subkey),
                       MSGPackSerializer.dumps(value), get_dht_time() + lifetime)
    return DHTRecord(record.key, record.subkey, SIGNER.sign_value(record), record.expiration_time)


def _fullest_values() -> dict[str, object]:
    """The largest value an honest peer writes under each kind of key (longest fields, most entries)."""
    key_hex = SIGNER.local_public_key.hex()
    peer = "12D3KooW" + "x" * 44
    binding = PeerBinding(run_id="r" * 64, hotkey="5" * 48, peer_id=peer, record_key=key_hex, issued=1.7e9,
                          expires=1.7e9 + 3600, signature="0x" + "ab" * 64).as_dict()
    config = parse_config("miner", ["--neuron.swarm_only"], env={}, dotenv_path=Path("/nonexistent/.env"))
    spec = RunSpec.from_config(config, seq_len=1024, tokenizer_digest="t" * 64, data_digest="d" * 64)
    report = dict(peer_id="q" * 128, kind="non-finite", averager="pseudo-gradients", round=2**40, time=1.7e9,
                  reason="r" * 200)
    return {
        "progress": LocalTrainingProgress(peer_id=PEER.to_bytes(), epoch=2**40, samples_accumulated=2**40,
                                          samples_per_second=1e9, time=1.7e9, client_mode=False).dict(),
        "bindings": binding,
        "bans": ban_records._BanRecord(peer_id="p" * 128, banned={f"{i:03d}" + "q" * 125: "r" * 200
                                                                  for i in range(MAX_BANS)}).dict(),
        "verdicts": _VerdictRecord(peer_id="p" * 128, reports=[report] * MAX_REPORTS).dict(),
        "state_digests": {"entries": [{"epoch": 2**40 + i, "digest": "f" * 64}
                                      for i in range(state_digests.KEPT_EPOCHS)]},
        "miners": MinerRecord(peer_id=peer, uid=255, epoch=2**40, samples_trained=2**50, time=1.7e9).dict(),
        "spec": {"digest": spec.digest, "spec": spec.as_dict()},
    }


def test_the_fullest_honest_record_of_every_kind_passes_and_every_ttl_fits() -> None:
    bounds = RecordBounds("run")
    values = _fullest_values()
    assert set(values) == set(RUN_RECORDS)
    for kind, value in values.items():
        assert bounds.validate(_signed(f"run_{kind}", value)), kind
    lifetimes = {"progress": progress.MAX_LIFETIME, "bindings": bindings.MAX_TTL, "bans": ban_records.BAN_TTL,
                 "verdicts": ban_records.BAN_TTL, "state_digests": state_digests.DIGEST_TTL,
                 "miners": dht_module.RECORD_TTL, "spec": dht_module.SPEC_TTL}
    for kind, lifetime in lifetimes.items():
        assert bounds.validate(_signed(f"run_{kind}", None, lifetime=lifetime)), kind


def test_oversized_and_long_lived_records_are_refused_by_their_kind() -> None:
    bounds = RecordBounds("run")
    too_big = "x" * RUN_RECORDS["miners"].value_bytes
    assert not bounds.validate(_signed("run_miners", {"peer_id": too_big}))
    assert bounds.validate(_signed("other-run_miners", {"peer_id": too_big}))  # another run's key: ANY_KEY
    assert not bounds.validate(_signed("any key", "x" * ANY_KEY.value_bytes))
    lifetime = RUN_RECORDS["bans"].lifetime
    assert bounds.validate(_signed("run_bans", None, lifetime=lifetime + CLOCK_SLACK / 2))  # clock slack
    assert not bounds.validate(_signed("run_bans", None, lifetime=lifetime + 2 * CLOCK_SLACK))
    assert not bounds.validate(_signed("run_bans", None, subkey=b"[owner:" + b"k" * 4096 + b"]"))
    assert not bounds.validate(_signed("run_diloco.0b", "x" * 1024))  # an averager's key holds a bool or a float
    assert bounds.validate(_signed("run_diloco.all_averagers", 1e9, subkey=b"peer id bytes"))
    # merged, one validator keeps every run's bounds
    merged = RecordBounds()
    assert merged.merge_with(RecordBounds("run")) and merged.merge_with(RecordBounds("other"))
    assert not merged.merge_with(RSASignatureValidator())
    assert not merged.validate(_signed("other_miners", {"peer_id": too_big}))
    assert merged.priority > RSASignatureValidator().priority  # checked before a signature is verified
    assert len(run_keys("run")) == len(RUN_RECORDS) + 6


def test_a_node_with_the_bounds_neither_stores_nor_believes_an_oversized_or_immortal_record(dht) -> None:
    """`dht` (started by `start_dht`, and a run's node) next to a node of hivemind without our validators."""
    other_key = RSAPrivateKey()
    bare = hivemind.DHT(initial_peers=visible_maddrs(dht), host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True,
                        record_validators=[RSASignatureValidator(other_key)])
    try:
        subkey = RSASignatureValidator(other_key).local_public_key
        cases = {"oversized": (dict(peer_id="x" * 10_000), 60.0), "immortal": ({}, 10 * 86400.0),
                 "honest": ({}, 60.0)}
        runs = {}
        for case, (fields, lifetime) in cases.items():
            runs[case] = run_id = f"bounds-{case}-{uuid.uuid4().hex[:6]}"
            MinerRecords(dht, run_id)  # the run's schema, signer and bounds
            value = {**MinerRecord(peer_id="honest", uid=1, epoch=1, samples_trained=1, time=1.0).dict(), **fields}
            stored = bare.store(f"{run_id}_miners", subkey=subkey, value=value,
                                expiration_time=get_dht_time() + lifetime)
            assert stored or case != "honest"  # says the run's node refused the others (the bare node keeps them)
        deadline = time.monotonic() + 10
        while "honest" not in MinerRecords(dht, runs["honest"]).fetch() and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the DHT, which another node writes
        assert set(MinerRecords(dht, runs["honest"]).fetch()) == {"honest"}
        for case in ("oversized", "immortal"):
            assert MinerRecords(dht, runs[case]).fetch() == {}, case  # neither stored here nor believed from there
            found = bare.get(f"{runs[case]}_miners", latest=True)
            assert found is not None and len(found.value) == 1, case  # what the bare node holds
    finally:
        bare.shutdown()


def test_bounded_entries_keeps_preferred_subkeys_and_says_so_once(caplog) -> None:
    found = {f"s{i}".encode(): i for i in range(10)}
    assert bounded_entries(found, limit=10) == found
    kept = bounded_entries(found, limit=3, prefer=lambda key: key in (b"s8", b"s9"), what="test key")
    assert list(kept) == [b"s8", b"s9", b"s0"]
    bounded_entries(found, limit=3, what="test key")
    assert sum("test key holds records of 10 signers" in r.message for r in caplog.records) == 1
    binding = SimpleNamespace(record_key=b"s9".hex())
    assert record_keys([binding, SimpleNamespace(record_key="not hex")])(b"s9")
    assert not record_keys([binding])(["unhashable"])


async def _plant(_dht, node, key: str, entries: list) -> None:
    """Store raw entries in a node's own storage, past its validators (as a node without them would hold)."""
    for subkey, value, expiration in entries:
        node.protocol.storage.store_subkey(DHTID.generate(source=key), subkey, MSGPackSerializer.dumps(value),
                                           expiration)


def test_bound_signers_are_read_first_when_strangers_mint_more_keys_than_the_cap(dht, tmp_path) -> None:
    run_id = f"cap-{uuid.uuid4().hex[:8]}"
    mine = BanRecords(dht, run_id)
    me = dht.peer_id.to_base58()
    strangers = [(f"[owner:stranger-{i}]".encode(), {"peer_id": f"s{i}", "banned": {"victim": "framed"}},
                  get_dht_time() + 60) for i in range(MAX_SIGNERS + 20)]
    dht.run_coroutine(partial(_plant, key=f"{run_id}_bans", entries=strangers))
    (tmp_path / "gradients-12D3KooWpoisoner").write_text("sent non-finite values")
    mine.publish(tmp_path)  # stored after every stranger's record: last in the dictionary
    found = dht.get(f"{run_id}_bans", latest=True).value
    assert len(found) == MAX_SIGNERS + 21 and mine._signer.local_public_key not in bounded_entries(found)
    bound = {me: PeerBinding(run_id=run_id, hotkey="hk", peer_id=me, record_key=mine._signer.local_public_key.hex(),
                             issued=0.0, expires=1.0)}
    assert read_bans(dht, run_id, bound) == {"12D3KooWpoisoner": {me: "gradients: sent non-finite values"}}

    # progress records: the same order of preference, from metadata as the tracker reads it
    peer = PEER
    record = dict(peer_id=peer.to_bytes(), epoch=3, samples_accumulated=1, samples_per_second=1.0, time=0.0)
    metadata = {key: SimpleNamespace(value={**record, "epoch": 99}, expiration_time=0.0) for key, _, _ in strangers}
    metadata[b"[owner:bound]"] = SimpleNamespace(value=record, expiration_time=0.0)
    binding = PeerBinding(run_id="r", hotkey="hk", peer_id=peer.to_base58(), record_key=b"[owner:bound]".hex(),
                          issued=0.0, expires=1.0)
    assert bound_progress(metadata, lambda seen: {binding.peer_id: binding})[binding.peer_id].epoch == 3
