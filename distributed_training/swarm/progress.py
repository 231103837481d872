"""Reading the swarm's progress from hivemind's signed per-peer records.

Every training peer's `hivemind.Optimizer` publishes (epoch, samples accumulated, samples/s)
under `<run_id>_progress`, signed with its key. Reading them needs no optimizer of one's own, so
a monitor on any machine that reaches the DHT, and the validator, can see who trains and how fast.

Where peers are bound (`bindings.py`), a record counts only if a live binding names its peer id and
the key that signed it (any other is a stranger's, or one peer speaking for another), and a bound
peer can still lie in its own record. So the epoch a peer follows (`followed_epoch`) is not the
highest one claimed: it is this peer's own epoch, or the epoch the other training peers reach
robustly: the (f+1)-th highest of theirs, f = max(1, (k-1)//2) liars among k >= 2 others (a lone
other peer is followed as is: there is no majority to ask). It also moves at most one epoch past
this peer's own or its last followed one, so a record never drags a peer more than one epoch at a
time. Each peer's samples and samples/s count only up to `SPREAD` times the (upper) median claim,
and samples to the target batch size, so one record cannot end an epoch at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils.timed_storage import get_dht_time

from .bindings import PeerBinding
from .record_bounds import RecordBounds, bounded_entries, record_keys

SPREAD = 4.0  # a peer's claim counts up to this many times the median claim
MAX_PEER_ID_BYTES = 128  # libp2p peer ids are ~40 bytes; longer ones are junk
MAX_LIFETIME = 300.0  # seconds a record may claim to live (hivemind's trackers store for 60 s)
MAX_LEAD = 3  # epochs a peer may be ahead of what the others reach before its record is a lie
MAX_OVERSHOOT = 16  # target batches of samples one epoch's record may claim before it is a lie

# peer ids seen in records -> the live bindings by peer id (`BoundPeers.bindings`)
BindingLookup = Callable[[Sequence[str]], Mapping[str, PeerBinding]]


@dataclass(frozen=True)
class PeerProgress:
    peer_id: str
    epoch: int
    samples_accumulated: int
    samples_per_second: float
    client_mode: bool
    time: float = 0.0  # DHT time of the record


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

    dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id), RSASignatureValidator(),
                        RecordBounds(run_id)])


def read_peer_progress(dht: hivemind.DHT, run_id: str, bindings: Optional[BindingLookup] = None
                       ) -> dict[str, PeerProgress]:
    """Every live, well-formed progress record, by peer id (only bound ones given `bindings`)."""
    found = dht.get(f"{run_id}_progress", latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    return bound_progress(found.value, bindings)


def bound_progress(metadata: Mapping[Any, Any], bindings: Optional[BindingLookup] = None
                   ) -> dict[str, PeerProgress]:
    """The well-formed records of `metadata` ({signer subkey: entry}) by peer id.

    Given `bindings`, only records signed by the key a live binding names for the record's peer id;
    without them (`--neuron.swarm_only`: nobody binds) every record counts. At most `MAX_SIGNERS`
    records are read, those of bound keys first (`record_bounds.bounded_entries`)."""
    records: list[tuple[Any, PeerProgress]] = []
    latest_expiry = get_dht_time() + MAX_LIFETIME
    prefer = record_keys(bindings(()).values()) if bindings is not None else None
    for subkey, entry in bounded_entries(metadata, prefer=prefer, what="progress records").items():
        value = getattr(entry, "value", None)
        if not isinstance(value, dict) or getattr(entry, "expiration_time", 0.0) > latest_expiry:
            continue
        try:
            raw_id = value["peer_id"]
            if len(raw_id) > MAX_PEER_ID_BYTES:
                continue
            peer = PeerID(raw_id).to_base58()
            records.append((subkey, PeerProgress(
                peer, int(value["epoch"]), int(value["samples_accumulated"]), float(value["samples_per_second"]),
                bool(value.get("client_mode", False)), float(value.get("time", 0.0)))))
        except (KeyError, TypeError, ValueError):
            continue
    if bindings is None:
        return {record.peer_id: record for _, record in records}
    bound = bindings([record.peer_id for _, record in records])
    return {record.peer_id: record for subkey, record in records
            if record.peer_id in bound and bound[record.peer_id].signs(subkey)}


def publish_progress(dht: hivemind.DHT, run_id: str, progress: PeerProgress, lifetime: float = 60.0) -> bool:
    """Store `progress` as this process's record, signed with its process-wide key (the one its
    tracker and binding use). Trackers publish on their own; this is for the local swarm's inflater."""
    from hivemind.dht.crypto import RSASignatureValidator

    value = dict(peer_id=PeerID.from_base58(progress.peer_id).to_bytes(), epoch=progress.epoch,
                 samples_accumulated=progress.samples_accumulated, samples_per_second=progress.samples_per_second,
                 time=progress.time, client_mode=progress.client_mode)
    return bool(dht.store(f"{run_id}_progress", subkey=RSASignatureValidator().local_public_key, value=value,
                          expiration_time=get_dht_time() + lifetime))


def followed_epoch(own_epoch: int, others: Sequence[int], last_followed: Optional[int] = None) -> int:
    """The epoch this peer follows: see the module docstring. `others`: the other training peers' epochs."""
    if not others:
        return own_epoch
    ranked = sorted(others, reverse=True)
    liars = 0 if len(ranked) == 1 else max(1, (len(ranked) - 1) // 2)
    robust = ranked[liars]
    if last_followed is not None:  # a fresh peer's first look is unbounded: a joiner must see the swarm's epoch
        robust = min(robust, max(own_epoch, last_followed) + 1)
    return max(own_epoch, robust)


def impossible_claims(others: Sequence[PeerProgress], own_epoch: int, target_batch_size: int) -> dict[str, str]:
    """The peers whose records no honest peer could publish, and why: a training epoch more than
    `MAX_LEAD` past what the others reach robustly (a majority of at least two others is needed to say
    so), or more samples in one epoch than `MAX_OVERSHOOT` target batches. Such a peer is a liar, not
    a fast trainer: its peers ban it (`guard.post_ban`) and say so to validators."""
    liars = {p.peer_id: f"published {p.samples_accumulated} samples in one epoch (target {target_batch_size})"
             for p in others if p.samples_accumulated > MAX_OVERSHOOT * target_batch_size}
    trainers = [p for p in others if not p.client_mode]
    if len(trainers) >= 2:
        for p in trainers:
            rest = [q.epoch for q in trainers if q.peer_id != p.peer_id]
            reached = followed_epoch(own_epoch, rest)
            if p.epoch > reached + MAX_LEAD:
                liars.setdefault(p.peer_id, f"published epoch {p.epoch} while the swarm is at {reached}")
    return liars


def capped(values: Sequence[float], floor: float = 0.0) -> list[float]:
    """Each value, at most `SPREAD` times the upper median of all (or `floor`, if higher)."""
    if not values:
        return []
    ceiling = max(floor, SPREAD * sorted(values)[len(values) // 2])
    return [min(value, ceiling) for value in values]


@dataclass(frozen=True)
class EpochEstimate:
    epoch: int  # the followed epoch
    samples_accumulated: int  # counted samples of the peers at that epoch
    estimated_samples: float  # the same, extrapolated to `now` at each peer's (counted) speed
    samples_per_second: float  # counted speeds of the peers at or behind that epoch
    num_peers: int
    num_clients: int


def estimate_epoch(own: PeerProgress, others: Sequence[PeerProgress], target_batch_size: int, now: float,
                   last_followed: Optional[int] = None) -> EpochEstimate:
    """The followed epoch and the progress towards its end, from this peer's and bound peers' records."""
    epoch = followed_epoch(own.epoch, [p.epoch for p in others if not p.client_mode], last_followed)
    peers = [own, *others]
    current = [p for p in peers if p.epoch == epoch]
    ceiling = float(target_batch_size)
    samples = [min(s, ceiling) for s in capped([float(p.samples_accumulated) for p in current],
                                               floor=target_batch_size / max(len(current), 1))]
    behind = [p for p in peers if p.epoch <= epoch]
    speeds = dict(zip((p.peer_id for p in behind), capped([max(0.0, p.samples_per_second) for p in behind])))
    estimated = sum(min(ceiling, s + max(0.0, now - p.time) * speeds[p.peer_id]) for s, p in zip(samples, current))
    return EpochEstimate(epoch=epoch, samples_accumulated=int(sum(samples)), estimated_samples=estimated,
                         samples_per_second=sum(speeds.values()), num_peers=len(peers),
                         num_clients=sum(p.client_mode for p in peers))


def summarize(peers: dict[str, PeerProgress]) -> SwarmProgress:
    if not peers:
        return SwarmProgress(epoch=0, samples_accumulated=0, samples_per_second=0.0, peers=())
    epoch = max(p.epoch for p in peers.values())
    current = [p for p in peers.values() if p.epoch == epoch]
    return SwarmProgress(epoch=epoch, samples_accumulated=sum(p.samples_accumulated for p in current),
                         samples_per_second=sum(p.samples_per_second for p in peers.values()),
                         peers=tuple(sorted(peers.values(), key=lambda p: p.peer_id)))
