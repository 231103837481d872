"""Progress records: only bound ones count, and a lying one moves neither the followed epoch nor a verdict."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

import torch
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time

from distributed_training.swarm.bindings import PeerBinding
from distributed_training.swarm.hivemind_private import BoundProgressTracker
from distributed_training.swarm.progress import (PeerProgress, bound_progress, capped, estimate_epoch,
                                                 followed_epoch)
from distributed_training.validation.follower import SwarmFollower

HUGE = 10**6


def test_followed_epoch_ignores_one_liar_yet_lets_a_joiner_see_the_swarm() -> None:
    assert followed_epoch(5, [5, HUGE]) == 5  # me, an honest peer, an inflater
    assert followed_epoch(0, [50, 50]) == 50  # a fresh joiner sees the swarm's epoch (and loads state)
    assert followed_epoch(0, [50, 50, HUGE]) == 50
    assert followed_epoch(5, [6]) == 6  # two peers, one a step ahead
    assert followed_epoch(6, [5]) == 6  # never behind this peer's own epoch (hivemind would reload)
    assert followed_epoch(5, [6, 5]) == 5  # one peer ahead alone does not drag the others
    assert followed_epoch(5, [6, 6, 5]) == 6
    assert followed_epoch(5, [HUGE, HUGE, 5, 5, 5]) == 5  # up to (k-1)//2 liars among k others
    assert followed_epoch(3, []) == 3


def test_the_followed_epoch_moves_at_most_one_past_this_peers_or_its_last() -> None:
    assert followed_epoch(5, [50, 50], last_followed=5) == 6
    assert followed_epoch(5, [50, 50], last_followed=6) == 7
    assert followed_epoch(50, [50, 51], last_followed=50) == 50
    assert followed_epoch(5, [HUGE], last_followed=5) == 6  # a lone other peer: no majority, still capped


def test_capped_claims_and_a_record_cannot_end_an_epoch_at_once() -> None:
    assert capped([10.0, 10.0, 1e9]) == [10.0, 10.0, 40.0]
    assert capped([0.0, 0.0, 1e9], floor=30.0) == [0.0, 0.0, 30.0]
    own = PeerProgress("me", 5, 10, 2.0, False, 100.0)
    honest = PeerProgress("honest", 5, 10, 2.0, False, 100.0)
    greedy = PeerProgress("greedy", 5, 10**9, 1e9, False, 100.0)  # at the current epoch, claiming everything
    estimate = estimate_epoch(own, [honest, greedy], target_batch_size=300, now=100.0)
    assert estimate.epoch == 5 and estimate.samples_accumulated == 10 + 10 + 100  # floor: target / 3 peers
    assert estimate.samples_per_second == 2.0 + 2.0 + 8.0 and estimate.num_peers == 3
    inflater = PeerProgress("inflater", HUGE, 10**9, 1e9, False, 100.0)
    estimate = estimate_epoch(own, [honest, inflater], target_batch_size=300, now=100.0)
    assert (estimate.epoch, estimate.samples_accumulated, estimate.samples_per_second) == (5, 20, 4.0)


def _peer(name: str) -> str:
    return PeerID(name.encode().ljust(34, b"_")).to_base58()


def _record(peer: str, epoch: int, samples: int) -> ValueWithExpiration:
    value = dict(peer_id=PeerID.from_base58(peer).to_bytes(), epoch=epoch, samples_accumulated=samples,
                 samples_per_second=1.0, time=get_dht_time(), client_mode=False)
    return ValueWithExpiration(value, get_dht_time() + 60)


def _binding(peer: str, key: bytes) -> PeerBinding:
    return PeerBinding(run_id="r", hotkey=f"hk-{peer[-6:]}", peer_id=peer, record_key=key.hex(), issued=0.0,
                       expires=get_dht_time() + 600)


HONEST, INFLATER, STRANGER, ME = (_peer(name) for name in ("honest", "inflater", "stranger", "me"))
KEYS = {peer: f"[owner:{peer[-8:]}]".encode() for peer in (HONEST, INFLATER, STRANGER, ME)}
BOUND = {peer: _binding(peer, KEYS[peer]) for peer in (HONEST, INFLATER, ME)}


def _metadata(inflate: bool) -> dict:
    return {KEYS[HONEST]: _record(HONEST, 3, 40),
            KEYS[INFLATER]: _record(INFLATER, HUGE if inflate else 3, 10**9 if inflate else 40),
            KEYS[STRANGER]: _record(STRANGER, HUGE, 10**9),  # unbound
            KEYS[ME] + b"x": _record(ME, HUGE, 10**9)}  # a record naming my peer id, not signed by my key


def test_only_records_signed_by_the_key_bound_to_their_peer_id_count() -> None:
    assert set(bound_progress(_metadata(True), lambda seen: BOUND)) == {HONEST, INFLATER}
    assert set(bound_progress(_metadata(True))) == {HONEST, INFLATER, STRANGER, ME}  # nobody binds: all count


class _FakeDHT:
    def __init__(self, peer: str, metadata: dict):
        self.peer_id, self.metadata, self.client_mode = PeerID.from_base58(peer), metadata, False

    def add_validators(self, validators) -> None:
        pass

    def get(self, key, latest=False, return_future=False):
        return ValueWithExpiration(self.metadata, get_dht_time() + 60)


def _tracker(metadata: dict) -> BoundProgressTracker:
    tracker = BoundProgressTracker(_FakeDHT(ME, metadata), prefix="r", target_batch_size=1000,
                                   bindings=lambda seen: BOUND, start=False)
    tracker.local_progress = tracker._get_local_progress(local_epoch=3, samples_accumulated=40)
    return tracker


def test_an_inflated_record_changes_neither_the_epoch_peers_follow_nor_a_verdict() -> None:
    verdicts = []
    for inflate in (False, True):
        metadata = _metadata(inflate)
        tracker = _tracker(metadata)
        tracker.global_progress = tracker._parse_swarm_progress_data(metadata)
        assert tracker.global_epoch == 3 and not tracker.ready_to_update_epoch
        trainer = SimpleNamespace(model=torch.nn.Linear(2, 2), dht=tracker.dht, local_epoch=3,
                                  global_epoch=tracker.global_epoch,
                                  settings=SimpleNamespace(run_id=f"r-{uuid.uuid4().hex[:6]}",
                                                           bindings=lambda seen: BOUND))
        follower = SwarmFollower(trainer)
        seen = follower.poll_progress()
        assert STRANGER not in seen
        verdicts.append((follower.swarm_epoch, follower.contributed(HONEST, 3), tracker.global_progress.num_peers))
    assert verdicts[0] == verdicts[1] == (3, True, 3)


def test_a_record_no_honest_peer_could_publish_is_named_a_lie() -> None:
    from distributed_training.swarm.progress import impossible_claims

    def peer(name: str, epoch: int, samples: int = 10) -> PeerProgress:
        return PeerProgress(name, epoch, samples, 1.0, False)

    honest = [peer("a", 7), peer("b", 6)]
    assert impossible_claims(honest, own_epoch=7, target_batch_size=100) == {}
    assert impossible_claims([*honest, peer("c", 10)], 7, 100) == {}  # 3 ahead: a fast peer, maybe
    lies = impossible_claims([*honest, peer("inflater", 10 ** 6, 10 ** 9)], 7, 100)
    assert set(lies) == {"inflater"} and "samples in one epoch" in lies["inflater"]
    assert "published epoch 1000000 while the swarm is at 7" in impossible_claims([*honest, peer("x", 10 ** 6)], 7, 100)["x"]
    # with a single other peer there is no majority to call its epoch a lie (its samples still can be)
    assert impossible_claims([peer("x", 10 ** 6)], 7, 100) == {}
    assert set(impossible_claims([peer("x", 8, 10 ** 6)], 7, 100)) == {"x"}
