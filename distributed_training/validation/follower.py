"""Following the swarm without training: the validator's copy of the global model.

A validator must recompute a miner's loss "with the same model state". Miners answer at their
own epoch, which may trail the swarm's by one while an all-reduce completes, so the follower
keeps snapshots of the last few epochs it has seen and evaluates pages against any of them.
It also watches hivemind's signed progress records, the evidence that a miner's peer actually
contributes samples to the swarm rather than only answering validators.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Sequence

import torch

from ..swarm.progress import PeerProgress, read_peer_progress
from ..training.snapshots import ModelSnapshots
from ..training.trainer import Trainer

logger = logging.getLogger(__name__)


class SwarmFollower:
    """Keeps the swarm's latest model state and snapshots of recent epochs."""

    def __init__(self, trainer: Trainer, keep_epochs: int = 4):
        self.trainer = trainer
        self.snapshots = ModelSnapshots(trainer.model, keep=keep_epochs)
        self._contributions: dict[str, dict[int, int]] = defaultdict(dict)

    @property
    def swarm_epoch(self) -> int:
        return max(self.trainer.global_epoch, self.trainer.local_epoch)

    def refresh(self) -> int:
        """Catch up with the swarm if it moved on; snapshot each epoch seen. Returns the local epoch."""
        self.trainer.catch_up()
        epoch = self.trainer.local_epoch
        if epoch not in self.snapshots:
            self.snapshots.add(epoch, self.trainer.shared_state())
        return epoch

    def epochs(self) -> list[int]:
        return self.snapshots.epochs()

    def losses_at(self, epoch: int, pages: Sequence[torch.Tensor]) -> list[float]:
        return self.snapshots.losses_at(epoch, pages)

    # -- contribution evidence --------------------------------------------------------------------
    def poll_progress(self) -> dict[str, PeerProgress]:
        """Read every (bound) peer's signed progress record and remember the most samples seen per epoch."""
        progress = read_peer_progress(self.trainer.dht, self.trainer.settings.run_id, self.trainer.settings.bindings)
        for peer, record in progress.items():
            seen = self._contributions[peer]
            seen[record.epoch] = max(seen.get(record.epoch, 0), record.samples_accumulated)
        return progress

    def contributed(self, peer_id: str, since_epoch: int) -> bool:
        """True if the peer was seen with accumulated samples in any epoch >= since_epoch."""
        return any(samples > 0 for epoch, samples in self._contributions.get(peer_id, {}).items()
                   if epoch >= since_epoch)
