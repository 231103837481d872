"""Judging one miner's answer: 1.0 / 0.3 / 0.1.

"Acceptable" is absolute, never relative to the other responders (then a miner that echoed a
constant would score 1.0, and if all did, all would): the validator
recomputes the loss on a sample of the miner's own pages with the swarm's model state and the
reported loss must agree within a stated tolerance; the miner must also be on the swarm's epoch
and must have contributed samples to the swarm recently.

This module is pure (no model, no network): the validator gathers the facts, this decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

SCORE_ACCEPTABLE = 1.0
SCORE_UNACCEPTABLE = 0.3
SCORE_NO_RESPONSE = 0.1


@dataclass(frozen=True)
class Tolerance:
    """How close a reported loss must be to the validator's own recomputation.

    `rel` covers float reordering across machines (CPU vs GPU kernels): measured differences
    between two peers with equal parameters are ~1e-6 relative, so 2 % leaves a wide margin
    while a fabricated or copied loss is typically off by far more.
    """

    rel: float = 0.02
    max_epoch_lag: int = 1


@dataclass(frozen=True)
class Verdict:
    score: float
    reason: str

    @property
    def responded(self) -> bool:
        return self.score > SCORE_NO_RESPONSE


def no_response(reason: str) -> Verdict:
    return Verdict(SCORE_NO_RESPONSE, reason)


def losses_agree(reported: float, recomputed: float, tolerance: Tolerance) -> bool:
    if not (math.isfinite(reported) and math.isfinite(recomputed)):
        return False
    return abs(reported - recomputed) <= tolerance.rel * max(abs(recomputed), 1e-6)


def matching_epoch(reported: Sequence[float], recomputed_by_epoch: Mapping[int, Sequence[float]],
                   tolerance: Tolerance) -> Optional[int]:
    """The epoch whose model state reproduces every reported loss, if any."""
    for epoch, recomputed in sorted(recomputed_by_epoch.items(), reverse=True):
        if len(recomputed) == len(reported) and all(
            losses_agree(r, c, tolerance) for r, c in zip(reported, recomputed)
        ):
            return epoch
    return None


def behind_the_swarm(held_epochs: Sequence[int], swarm_epoch: int, tolerance: Tolerance) -> Optional[str]:
    """Why this validator can judge no answer this round, if so: it holds no model within
    `max_epoch_lag` of the swarm's epoch (it could not load one: forked epochs whose digests no two
    bound peers share load nothing). Honest miners answer at the swarm's epoch, and a stale
    validator would score them stale or mismatched; the swarm's epoch comes from bound progress
    records, not from any miner's answer, so no miner can claim its way out of a round."""
    newest = max(held_epochs, default=None)
    if newest is not None and newest >= swarm_epoch - tolerance.max_epoch_lag:
        return None
    held = "no model" if newest is None else f"the model of epoch {newest}"
    return f"this validator holds {held}, the swarm is at epoch {swarm_epoch}"


def judge(*, claimed_epoch: int, swarm_epoch: int, sampled_reported: Sequence[float],
          recomputed_by_epoch: Mapping[int, Sequence[float]], contributed: bool,
          tolerance: Tolerance, latest_epoch: Optional[int] = None, banned: Optional[str] = None) -> Verdict:
    """Score a miner that answered with a well-formed, signed response in time.

    `banned` is why the swarm refuses the miner's peer (a quorum of bound peers caught what it sent
    into the all-reduce, `swarm.ban_records`): answering validators well does not undo that.

    `swarm_epoch` is the swarm's epoch when the miner was asked; `latest_epoch` (default: the
    same) is the newest the validator knows of, which a miner may legitimately have reached by
    the time it answered.
    """
    latest = swarm_epoch if latest_epoch is None else max(latest_epoch, swarm_epoch)
    lag = swarm_epoch - claimed_epoch
    if lag > tolerance.max_epoch_lag:
        return Verdict(SCORE_UNACCEPTABLE, f"stale: epoch {claimed_epoch}, swarm at {swarm_epoch}")
    if claimed_epoch > latest + tolerance.max_epoch_lag:
        return Verdict(SCORE_UNACCEPTABLE, f"claims epoch {claimed_epoch} ahead of the swarm's {latest}")
    if not recomputed_by_epoch:
        return Verdict(SCORE_UNACCEPTABLE, "no model state to verify against")
    epoch = matching_epoch(sampled_reported, recomputed_by_epoch, tolerance)
    if epoch is None:
        best = recomputed_by_epoch.get(claimed_epoch) or next(iter(recomputed_by_epoch.values()))
        detail = ", ".join(f"{r:.4f} vs {c:.4f}" for r, c in zip(sampled_reported, best))
        return Verdict(SCORE_UNACCEPTABLE, f"loss mismatch ({detail})")
    if swarm_epoch - epoch > tolerance.max_epoch_lag:
        return Verdict(SCORE_UNACCEPTABLE, f"stale: its losses match epoch {epoch}, swarm at {swarm_epoch}")
    if not contributed:
        return Verdict(SCORE_UNACCEPTABLE, "no samples contributed to the swarm recently")
    if banned:
        return Verdict(SCORE_UNACCEPTABLE, banned)
    return Verdict(SCORE_ACCEPTABLE, f"verified at epoch {epoch}")
