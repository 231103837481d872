"""Signed digests of the swarm's state, so that a peer loading state can check it against what bound peers hold.

A binding says who a peer is, not that the state it serves is the swarm's: a registered, bound
peer can serve a random model announced as a later epoch with the highest state-sharing priority,
and every joiner and validator would load it. So after each epoch every peer publishes, under
`<run_id>_state_digests` and signed with its record key, the digest of the parameters it now
serves. Those are bit-identical on every member of an averaging group: the consensus all-reduce
gives all members the same bits, DiLoCo's θ_global is their mean, and in swarm mode every member
applies the same AdamW step to the same averaged gradient (a peer whose all-reduce failed signs
nothing for that epoch and reloads, see `hivemind_private.optimizer`). Optimizer statistics are not digested.

The swarm's state at an epoch (`winning`) is the digest signed by the most bound signers, ties
broken by the smaller digest, after two filters:
- a signer whose newest epoch is more than one ahead of every other bound signer's newest signs
  the future (an honest peer signs only epochs it reached, and peers end epochs together): all its
  digests are ignored, so a liar claiming "E+3" neither passes nor ties with honest signers;
- once 2 or more signers published for an epoch, the winner needs 2 of them.
A downloaded state is accepted only if its digest is that winner (`verdict`); a peer whose own
digest lost (a fork: two groups that averaged apart, or a step taken alone) reloads the winner
(`fork_reason`), so the swarm converges on one state.

Every peer signs its state from the start (the seeded initial model at epoch 0), so a state nobody
signed is refused, even when no bound peer has signed anything yet.

Weak spots (documented, not hidden): a lone liar who is the only publisher is believed; a liar one
epoch ahead of everyone is believed until an honest peer publishes that epoch; with one honest and
one lying publisher of the same epoch nothing loads, which stalls joiners rather than poisoning
them; two colluding bound hotkeys can outvote one honest peer. Without bindings
(`--neuron.swarm_only`) there is nothing to check against and every state is accepted, as before.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import pydantic.v1 as pydantic
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils.timed_storage import get_dht_time

from .bindings import Admission, PeerBinding, live_bindings
from .progress import followed_epoch, read_peer_progress
from .record_bounds import RecordBounds

logger = logging.getLogger(__name__)

KEPT_EPOCHS = 8  # digests of this many recent epochs per signer
DIGEST_TTL = 1800.0  # seconds a digest record lives unless republished (each epoch): longer than an epoch
DigestTable = dict[str, dict[int, str]]  # record key (hex) -> {epoch: digest}


def state_digest(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 over each tensor's dtype, shape and contiguous CPU bytes (the order matters)."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        value = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{value.dtype}|{tuple(value.shape)}|".encode())
        hasher.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return hasher.hexdigest()


class _DigestEntry(pydantic.BaseModel):
    epoch: pydantic.conint(ge=0, strict=True)
    digest: pydantic.constr(strict=True, regex=r"^[0-9a-f]{64}$")


class _DigestRecord(pydantic.BaseModel):
    entries: pydantic.conlist(_DigestEntry, max_items=KEPT_EPOCHS)


class _DigestsSchema(pydantic.BaseModel):
    state_digests: dict[BytesWithPublicKey, Optional[_DigestRecord]]


def _credible(table: DigestTable) -> DigestTable:
    """`table` without signers of the future: a newest epoch more than one past every other signer's newest."""
    newest = {key: max(digests) for key, digests in table.items() if digests}
    return {key: digests for key, digests in table.items()
            if not any(other != key for other in newest)
            or newest.get(key, -1) <= max(e for other, e in newest.items() if other != key) + 1}


def winning(epoch: int, table: DigestTable) -> tuple[Optional[str], Counter]:
    """The swarm's digest at `epoch` (most credible signers, ties to the smaller digest; None: nobody
    signed that epoch) and the votes of every digest signed for it."""
    votes = Counter(digests[epoch] for digests in _credible(table).values() if epoch in digests)
    if not votes:
        return None, votes
    return min(votes, key=lambda digest: (-votes[digest], digest)), votes


def verdict(epoch: int, digest: str, table: DigestTable) -> Optional[str]:
    """None if `table` (the bound signers' digests) backs `digest` at `epoch`, else why not (see the module doc)."""
    if not table:  # every bound peer signs its state from the start: an empty table means none is there
        return f"no bound peer has signed any state (epoch {epoch} was offered)"
    best, votes = winning(epoch, table)
    signers, publishers = votes.get(digest, 0), sum(votes.values())
    if signers == 0:
        return f"no bound peer signed this state at epoch {epoch} ({publishers} signed another)"
    rival = max((count for other, count in votes.items() if other != digest), default=0)
    if best != digest:
        return f"{signers} bound peer(s) signed this state at epoch {epoch}, {rival} signed another"
    needed = 2 if publishers >= 2 else 1
    if signers < needed:
        return f"{signers} of the {needed} bound signers needed at epoch {epoch} ({rival} signed another)"
    return None


def fork_reason(epoch: int, own: str, table: DigestTable) -> Optional[str]:
    """Why this peer's state at `epoch` (its digest `own`) is not the swarm's, when another digest won."""
    best, votes = winning(epoch, table)
    if best is None or best == own or votes[best] < 2:
        return None  # nobody else signed, this peer's state won, or no state has a quorum to reload
    return (f"at epoch {epoch} {votes[best]} bound peers signed another state than this peer's "
            f"({votes.get(own, 0)} signed its own)")


class StateDigests:
    """This peer's signed digest records, and the check of downloaded state against everyone's.

    `admit` is the hotkey admission of the bindings (`BoundPeers.admit`): only records whose signing
    key is the record key of a live binding count. It runs in the averager's process too (the check
    is inherited across hivemind's fork), reading the DHT there as the guard does.
    """

    def __init__(self, dht: Any, run_id: str, admit: Admission, accuse: Optional[Callable[[str, str], None]] = None):
        """`accuse(peer, reason)` hears each peer caught lying in the state it serves: a future epoch
        (the ban board: the peer is then banned here and named to validators). A state that lost to the
        others' digests, or contradicts its server's own signed digest, is refused but not reported: an
        honest peer serves one while it falls out of step or reloads."""
        self.dht, self.run_id, self.admit, self.key = dht, run_id, admit, f"{run_id}_state_digests"
        self.accuse = accuse
        # the process-wide key (as MinerRecords): the DHT merges signature validators, and the binding names it
        self._signer = RSASignatureValidator()
        dht.add_validators([SchemaValidator(_DigestsSchema, prefix=run_id), self._signer, RecordBounds(run_id)])
        self._mine: dict[int, str] = {}
        self._refused: set[str] = set()  # peers whose refusal was logged (once each)
        self._accused: set[str] = set()

    def publish(self, epoch: int, tensors: Sequence[torch.Tensor]) -> str:
        """Sign and store the digest of the parameters this peer serves at `epoch`; returns the digest."""
        digest = state_digest(tensors)
        self._mine[epoch] = digest
        for old in sorted(self._mine)[:-KEPT_EPOCHS]:
            del self._mine[old]
        entries = [dict(epoch=e, digest=d) for e, d in sorted(self._mine.items())]
        if not self.dht.store(self.key, subkey=self._signer.local_public_key, value=dict(entries=entries),
                              expiration_time=get_dht_time() + DIGEST_TTL):
            logger.warning("the state digest of epoch %d could not be stored in the DHT", epoch)
        return digest

    def table(self, bound: Optional[dict[str, PeerBinding]] = None) -> DigestTable:
        """The digests of signers that are the record key of a live binding: record key (hex) -> {epoch: digest}."""
        bound = live_bindings(self.dht, self.run_id, self.admit) if bound is None else bound
        keys = {binding.record_key for binding in bound.values()}
        found = self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        table: DigestTable = {}
        for subkey, entry in found.value.items():
            if not isinstance(subkey, bytes) or subkey.hex() not in keys:
                continue
            try:
                record = _DigestRecord.parse_obj(entry.value)
            except (pydantic.ValidationError, TypeError, AttributeError):
                continue
            table[subkey.hex()] = {item.epoch: item.digest for item in record.entries}
        return table

    def __call__(self, peer: str, epoch: Any, parameters: Sequence[torch.Tensor]) -> Optional[str]:
        """The state check of `GuardedAveraging`: None to load this peer's state, else the reason not to."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            return f"its state names no epoch ({epoch!r})"
        bound = live_bindings(self.dht, self.run_id, self.admit)
        reason = self.epoch_reason(peer, epoch, bound)
        lied = reason is not None
        if reason is None:
            table, digest = self.table(bound), state_digest(parameters)
            reason = verdict(epoch, digest, table)
            server = bound.get(peer)
            signed = table.get(server.record_key, {}).get(epoch) if server is not None else None
            if reason is not None and signed is not None and signed != digest:
                # not reported: an honest peer that reloads the swarm's state at the same epoch serves
                # it a moment before it signs it (seen framing an honest miner in the local swarm)
                reason = f"{reason}; it signed another digest for that epoch itself"
        if reason is not None and peer not in self._refused:
            self._refused.add(peer)
            logger.warning("refusing state from %s: %s", peer, reason)
        if lied and self.accuse is not None and peer not in self._accused:
            self._accused.add(peer)
            self.accuse(peer, f"served a state it could not back: {reason}")
        return reason

    def fork(self, epoch: int) -> Optional[str]:
        """Why the state this peer signed at `epoch` is not the swarm's (`fork_reason`), or None."""
        own = self._mine.get(epoch)
        return None if own is None else fork_reason(epoch, own, self.table())

    def epoch_reason(self, peer: str, epoch: int, bound: dict[str, PeerBinding]) -> Optional[str]:
        """Why a state of `epoch` served by `peer` is from the future, if it is: more than one epoch past what
        this peer and the other bound training peers robustly reached (`progress.followed_epoch`). The
        server's own record counts: a hijacker that trains reports its true epoch there, and one that
        inflates it too is outvoted like any inflater (unless it is the only other peer)."""
        me = self.dht.peer_id.to_base58()
        progress = read_peer_progress(self.dht, self.run_id, lambda _ids: bound)
        others = [p.epoch for pid, p in progress.items() if pid != me and not p.client_mode]
        own = progress[me].epoch if me in progress else 0  # this peer's own record, read here in the averager
        reached = followed_epoch(own, others)
        if epoch > reached + 1:
            return f"its state claims epoch {epoch}, the other bound peers are at {reached}"
        return None

