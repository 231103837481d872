"""Reading the swarm's progress from hivemind's signed per-peer records.

Every training peer's `hivemind.Optimizer` publishes (epoch, samples accumulated, samples/s)
under `<run_id>_progress`, signed with its key. Reading them needs no optimizer of one's own, so
a monitor on any machine that reaches the DHT, and the validator, can see who trains and how fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import hivemind
from hivemind.p2p import PeerID


@dataclass(frozen=True)
class PeerProgress:
    peer_id: str
    epoch: int
    samples_accumulated: int
    samples_per_second: float
    client_mode: bool


@dataclass(frozen=True)
class SwarmProgress:
    epoch: int
    samples_accumulated: int  # in the current epoch, over the peers at that epoch
    samples_per_second: float
    peers: tuple[PeerProgress, ...]

    @property
    def num_peers(self) -> int:
        return len(self.peers)


def register_progress_validators(dht: hivemind.DHT, run_id: str) -> None:
    """Let a DHT that runs no optimizer read the signed progress records.

    The records carry a signature suffix that only the signature validator strips; a node without
    it cannot even decode them. Peers with a hivemind.Optimizer have these already.
    """
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator
    from hivemind.optim.progress_tracker import TrainingProgressSchema

    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id), RSASignatureValidator()])


def read_peer_progress(dht: hivemind.DHT, run_id: str) -> dict[str, PeerProgress]:
    """Every live, well-formed progress record, by peer id."""
    found = dht.get(f"{run_id}_progress", latest=True)
    progress: dict[str, PeerProgress] = {}
    if found is None or not isinstance(found.value, dict):
        return progress
    for entry in found.value.values():
        value = getattr(entry, "value", None)
        if not isinstance(value, dict):
            continue
        try:
            peer = PeerID(value["peer_id"]).to_base58()
            progress[peer] = PeerProgress(peer, int(value["epoch"]), int(value["samples_accumulated"]),
                                          float(value["samples_per_second"]), bool(value.get("client_mode", False)))
        except (KeyError, TypeError, ValueError):
            continue
    return progress


def summarize(peers: dict[str, PeerProgress]) -> SwarmProgress:
    if not peers:
        return SwarmProgress(epoch=0, samples_accumulated=0, samples_per_second=0.0, peers=())
    epoch = max(p.epoch for p in peers.values())
    current = [p for p in peers.values() if p.epoch == epoch]
    return SwarmProgress(epoch=epoch, samples_accumulated=sum(p.samples_accumulated for p in current),
                         samples_per_second=sum(p.samples_per_second for p in peers.values()),
                         peers=tuple(sorted(peers.values(), key=lambda p: p.peer_id)))
