"""Bans made public: each peer's signed list of the peers its averagers refuse, for validators to read.

A reducer sees what a sender put into the all-reduce; a validator does not. So a poisoner that
answers validators honestly would score like a trainer unless the peers that caught it say so.
Each peer publishes, under `<run_id>_bans` and signed with the key its binding names, the peers
its guards banned and why (`guard.AveragingGuard` posts them on the process's ban board). A record
counts only when its signing key and its peer id are those of a live binding, and the validator
acts on an accusation only when `QUORUM` distinct bound peers, none of them the accused, make it:
one bound peer cannot frame another alone. A record holds only what its peer saw itself: a ban
adopted from another reducer's word (`guard.HEARD`) is ignored but not published, or one lying
reducer would have every member of its group accuse its victim. The single verdicts behind them go out with each
publication too, under a key of their own (`verdict_reports`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Optional

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from .bindings import PeerBinding, spoken_by_bound
from .guard import board_entry
from .record_bounds import RecordBounds, bounded_entries, record_keys
from .verdict_reports import VerdictsSchema, publish_verdicts

logger = logging.getLogger(__name__)

BAN_TTL = 300.0  # seconds a published list lives unless republished (every epoch)
MAX_BANS = 64  # entries one record may hold: a record's size is bounded
QUORUM = 2  # distinct bound accusers before a validator believes a ban

_PeerId = pydantic.constr(strict=True, max_length=128)
_Reason = pydantic.constr(strict=True, max_length=200)


class _BanRecord(pydantic.BaseModel):
    peer_id: _PeerId  # the accuser: must be the peer id its binding names
    banned: dict[_PeerId, _Reason]

    @pydantic.validator("banned")
    def _bounded(cls, banned):
        if len(banned) > MAX_BANS:
            raise ValueError(f"at most {MAX_BANS} bans per record")
        return banned


class _BansSchema(pydantic.BaseModel):
    bans: dict[BytesWithPublicKey, Optional[_BanRecord]]


def read_board(board: Path) -> dict[str, str]:
    """The bans this process's guards posted (`<averager>-<peer>` files holding the reason), by peer."""
    bans: dict[str, str] = {}
    for posted in sorted(board.glob("*-*")) if board.is_dir() else ():
        averager, peer, kind = board_entry(posted.name)
        if kind == "heard":
            continue  # another reducer's word: not this peer's to publish
        try:
            reason = posted.read_text().strip() or "banned"
        except OSError:  # lifted meanwhile
            continue
        bans.setdefault(peer, f"{averager}: {reason}"[:200])
    return dict(list(bans.items())[:MAX_BANS])


class BanRecords:
    """This peer's published bans, and everyone's, under `<run_id>_bans`."""

    def __init__(self, dht: hivemind.DHT, run_id: str, private_key: Optional[RSAPrivateKey] = None):
        """`private_key`: the key this peer's binding names (default: the process-wide key, see
        dht.MinerRecords); only several peers in one process, as in tests, need keys of their own."""
        self.dht, self.run_id, self.key = dht, run_id, f"{run_id}_bans"
        self._signer = RSASignatureValidator(private_key)
        dht.add_validators([SchemaValidator(_BansSchema, prefix=run_id),
                            SchemaValidator(VerdictsSchema, prefix=run_id), self._signer, RecordBounds(run_id)])

    def publish(self, board: Path) -> dict[str, str]:
        """Store what the board holds now (an empty list withdraws earlier bans), and its newest verdict
        reports (`verdict_reports.publish_verdicts`); returns the bans."""
        bans = read_board(board)
        value = _BanRecord(peer_id=self.dht.peer_id.to_base58(), banned=bans).dict()
        if not self.dht.store(self.key, subkey=self._signer.local_public_key, value=value,
                              expiration_time=get_dht_time() + BAN_TTL):
            logger.warning("this peer's bans could not be stored in the DHT; retrying next epoch")
        publish_verdicts(self.dht, self.run_id, self._signer.local_public_key, board, BAN_TTL)
        return bans


def read_bans(dht: hivemind.DHT, run_id: str, bound: Mapping[str, PeerBinding]) -> dict[str, dict[str, str]]:
    """Accused peer -> {bound accuser peer: reason}, from records signed by the key of a live binding."""
    found = dht.get(f"{run_id}_bans", latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    entries = bounded_entries(found.value, prefer=record_keys(bound.values()), what=f"{run_id}_bans")
    return accusations_in({subkey: getattr(entry, "value", None) for subkey, entry in entries.items()}, bound)


def accusations_in(records: Mapping[bytes, object], bound: Mapping[str, PeerBinding]) -> dict[str, dict[str, str]]:
    """`read_bans` on records already read ({signing subkey: value})."""
    accusations: dict[str, dict[str, str]] = {}
    for accuser, record in spoken_by_bound(records, bound, _BanRecord):
        for peer, reason in record.banned.items():
            if peer != accuser:
                accusations.setdefault(peer, {})[accuser] = reason
    return accusations


def believed_ban(accusations: Mapping[str, Mapping[str, str]], peer: str, quorum: int = QUORUM) -> Optional[str]:
    """Why `peer` is banned, if `quorum` distinct bound peers other than it say so; else None."""
    accusers = accusations.get(peer, {})  # `accusations_in` leaves out a peer's word against itself
    if len(accusers) < quorum:
        return None
    reasons = sorted(set(accusers.values()))
    return f"banned by {len(accusers)} bound peers ({'; '.join(reasons)[:160]})"
