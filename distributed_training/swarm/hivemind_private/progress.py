"""hivemind's `ProgressTracker`, counting only bound peers' records and following a robust epoch.

hivemind's tracker follows the highest epoch any record claims and sums everyone's samples, so one
record claiming epoch 10^6 makes every peer jump (or reload state) and end epochs at once. This one
reads the records through `progress.bound_progress` and estimates with `progress.estimate_epoch`
(the rule and its reasons are there). Without bindings (`--neuron.swarm_only`) it is hivemind's.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np
from hivemind.optim.progress_tracker import GlobalTrainingProgress, ProgressTracker
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from ..progress import BindingLookup, PeerProgress, bound_progress, estimate_epoch, impossible_claims

logger = logging.getLogger(__name__)


class BoundProgressTracker(ProgressTracker):
    """`ProgressTracker` whose global progress comes from bound peers only (given `bindings`)."""

    def __init__(self, *args: Any, bindings: Optional[BindingLookup] = None,
                 accuse: Optional[Callable[[str, str], None]] = None,
                 excluded: Optional[Callable[[str], bool]] = None, **kwargs: Any):
        """`accuse(peer, reason)` hears each bound peer whose record no honest peer could publish
        (`progress.impossible_claims`): the ban board, so that it is banned and named to validators.
        `excluded(peer)`: whether a peer's records count for nothing without bindings too (a peer this
        one bans: a banned poisoner that stepped on its own poison must not look like the swarm's lead)."""
        self.bindings, self.accuse, self.excluded = bindings, accuse, excluded  # before hivemind's constructor
        self._accused: set[str] = set()
        self.last_followed: Optional[int] = None
        super().__init__(*args, **kwargs)

    def _excluded(self, entry: Any) -> bool:
        value = getattr(entry, "value", None)
        try:
            return self.excluded(PeerID(value["peer_id"]).to_base58())
        except Exception:  # not a record hivemind could parse either; it skips it itself
            return False

    def _parse_swarm_progress_data(self, metadata: Any) -> GlobalTrainingProgress:
        if self.bindings is None:
            if self.excluded is not None and isinstance(metadata, dict):
                metadata = {key: entry for key, entry in metadata.items() if not self._excluded(entry)}
            return super()._parse_swarm_progress_data(metadata)
        me = self.dht.peer_id.to_base58()
        try:
            peers = bound_progress(metadata if isinstance(metadata, dict) else {}, self.bindings)
        except Exception as exc:  # reading the bindings failed: count nobody else this time
            logger.warning("could not read the run's bindings (%r); counting only this peer's progress", exc)
            peers = {}
        others = [record for peer, record in peers.items() if peer != me]
        if not others:
            self.last_followed = self.local_progress.epoch
            return super()._parse_swarm_progress_data(None)  # hivemind's estimate from this peer alone
        local = self.local_progress
        own = PeerProgress(me, local.epoch, local.samples_accumulated, self.performance_ema.samples_per_second,
                           local.client_mode, local.time)
        if self.accuse is not None:
            for peer, reason in impossible_claims(others, local.epoch, self.target_batch_size).items():
                if peer not in self._accused:
                    self._accused.add(peer)
                    logger.warning("%s: %s %s; banning it", self.prefix, peer, reason)
                    self.accuse(peer, reason)
        now = get_dht_time()
        estimate = estimate_epoch(own, others, self.target_batch_size, now, self.last_followed)
        self.last_followed = estimate.epoch
        remaining = max(0.0, self.target_batch_size - estimate.estimated_samples)
        time_to_epoch = remaining / (estimate.samples_per_second + self.performance_ema.eps)
        expected_max_peers = max(estimate.num_peers + self.expected_drift_peers,
                                 estimate.num_peers * (1 + self.expected_drift_rate))
        time_to_fetch = float(np.clip(time_to_epoch * estimate.num_peers / expected_max_peers,
                                      a_min=self.min_refresh_period, a_max=self.max_refresh_period))
        logger.log(self.status_loglevel, "%s accumulated %d samples for epoch #%d from %d bound peers",
                   self.prefix, estimate.samples_accumulated, estimate.epoch, estimate.num_peers)
        return GlobalTrainingProgress(estimate.epoch, estimate.samples_accumulated,
                                      target_batch_size=self.target_batch_size, num_peers=estimate.num_peers,
                                      num_clients=estimate.num_clients, eta_next_epoch=now + time_to_epoch,
                                      next_fetch_time=now + time_to_fetch)
