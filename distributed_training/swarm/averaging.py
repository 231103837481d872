"""DiLoCo's side of the swarm: progress records, one pseudo-gradient all-reduce per epoch, state for joiners.

Which hivemind pieces, and why:
- `ProgressTracker` (prefix = run id) counts the samples each peer trained in the current epoch and
  publishes them as the signed `<run_id>_progress` records the validator reads, exactly as in
  gradient-averaging mode. Its global epoch is the robust epoch of the bound peers (`progress.py`).
- One `PseudoGradientAverager` (prefix `<run_id>_diloco`) whose averaged tensors are fp32
  pseudo-gradient buffers, one per parameter. It also serves this peer's state to joiners (what
  `state_source` returns) and downloads it, with the epoch as state-sharing priority so joiners
  load from the most advanced peer. `TrainingStateAverager` is not used: it averages parameters
  and optimizer statistics; in DiLoCo the only thing to average is the pseudo-gradient.

The trainer (`training/diloco.py`) decides what to average and what to do with the result; this
class only moves tensors and progress through hivemind. Every blocking call counts as
communication in the trainer's `timing`.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional, Sequence

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from .compression import codec, uncompressed
from . import by_peer_id
from .hivemind_private import BoundProgressTracker, PseudoGradientAverager
from .robust import RobustRule
from .progress import BindingLookup, read_peer_progress

logger = logging.getLogger(__name__)

StateSource = Callable[[], tuple[dict[str, Any], list[torch.Tensor]]]


class OuterAveraging:
    """The pseudo-gradient all-reduce of one DiLoCo peer, with its progress tracker."""

    def __init__(self, dht: hivemind.DHT, buffers: Sequence[torch.Tensor], *, run_id: str, target_batch_size: int,
                 matchmaking_time: float, averaging_timeout: float, compression: str, state_source: StateSource,
                 timing: Any, progress_key: Optional[RSAPrivateKey] = None, guard: Any = None,
                 robust_rule: Optional[RobustRule] = None, bindings: Optional[BindingLookup] = None,
                 state_check: Any = None, accuse: Optional[Callable[[str, str], None]] = None,
                 excluded: Optional[Callable[[str], bool]] = None):
        """`progress_key` signs this peer's progress records (default: the process-wide key, as hivemind
        does); only several peers in one process, as in tests, need keys of their own. `guard` and
        `robust_rule` go to the averager (see `hivemind_private.GuardedAveraging`); `bindings` (None: no
        bindings) is whose progress records count (see `hivemind_private.BoundProgressTracker`)."""
        self.dht, self.run_id, self.timing = dht, run_id, timing
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, averaging_timeout
        self._scheduled: Optional[StepControl] = None  # matchmaking started ahead of the epoch's end
        self._scheduled_epoch = -1
        self.bindings = bindings
        self.tracker = BoundProgressTracker(dht=dht, prefix=run_id, target_batch_size=target_batch_size,
                                            private_key=progress_key, bindings=bindings, accuse=accuse,
                                            excluded=excluded, start=True)
        try:
            self.averager = PseudoGradientAverager(
                list(buffers), dht, prefix=f"{run_id}_diloco", start=False, guard=guard, robust_rule=robust_rule,
                min_matchmaking_time=matchmaking_time,
                request_timeout=min(3.0, matchmaking_time / 2),
                allreduce_timeout=averaging_timeout,
                # per-chunk patience in the all-reduce and in state downloads (hivemind's default, the
                # request timeout, is too short for a busy peer to start streaming θ_global)
                next_chunk_timeout=max(5.0, averaging_timeout / 3),
                compression=codec(compression),
                state_compression=uncompressed(),  # joiners need θ_global exactly
            )
            self.averager.state_source = state_source
            self.averager.state_check = state_check  # before the fork below (see `swarm.state_digests`)
            self.averager.run_in_background(await_ready=True)
        except BaseException:
            self.tracker.shutdown(5.0)
            raise

    # -- progress (the trainer reads the swarm's epoch and peers from `tracker` itself) ----------
    @property
    def epoch_due(self) -> bool:
        """The swarm's samples for this epoch reached the target (every peer reads the same records)."""
        return self.tracker.ready_to_update_epoch

    def report_progress(self, epoch: int, samples: int) -> None:
        self.tracker.report_local_progress(epoch, samples)

    def not_training_time(self) -> AbstractContextManager:
        """Time inside this block is not training speed (the tracker's ETA estimates leave it out)."""
        return self.tracker.performance_ema.pause()

    def start_epoch(self, epoch: int) -> None:
        self.cancel_scheduled()  # a group matched for another epoch must not wait for this peer
        with self.tracker.pause_updates():
            self.tracker.update_epoch(epoch)
        self.averager.state_sharing_priority = epoch

    def buffers(self) -> AbstractContextManager:
        """The averaged tensors, locked: fill them before `average`, read the result after it."""
        return self.averager.get_tensors()

    # -- matchmaking and the all-reduce -----------------------------------------------------------
    def schedule(self, epoch: int) -> None:
        """Start matchmaking for `epoch` while the last inner steps still run.

        Forming a group takes `matchmaking_time`. Started only once the epoch is due, every peer
        would sit that long idle each epoch (at 15 s and H = 100 tiny-model steps, ~13 % of wall
        time). Started when the swarm's estimated end of the epoch is that close, the group forms
        meanwhile and waits for the trigger `average` pulls when the epoch is due.
        """
        if self._scheduled is not None and not self._scheduled.done():
            return
        if self.tracker.global_progress.num_peers <= 1:
            return  # alone: nobody to match with, and no polling the DHT for nobody
        now, wait = get_dht_time(), self.matchmaking_time
        if self.tracker.estimated_next_update_time - now > wait:
            return
        self._scheduled = self.averager.step(
            gather=dict(epoch=epoch), scheduled_time=now + wait, timeout=wait + self.averaging_timeout,
            allow_retries=True, require_trigger=True, wait=False)
        self._scheduled_epoch = epoch

    def _take_scheduled(self, epoch: int) -> Optional[StepControl]:
        """The matchmaking started ahead for `epoch`, if it is still usable; any other is cancelled."""
        control = self._scheduled
        if control is not None and self._scheduled_epoch == epoch and not control.done():
            self._scheduled = None
            return control
        self.cancel_scheduled()
        return None

    def cancel_scheduled(self) -> None:
        """Drop matchmaking started ahead, so that a group formed with this peer does not wait for it."""
        control, self._scheduled = self._scheduled, None
        if control is not None and not control.done():
            control.cancel()

    def partners(self, epoch: int) -> int:
        """Other peers training at `epoch` or later.

        Read from the DHT now, since the tracker's cache may predate a peer that just joined; the
        cache still counts, so that a failed read never makes this peer step alone (and fork θ_global).
        """
        with self.timing.communicating():
            me = self.dht.peer_id.to_base58()
            progress = read_peer_progress(self.dht, self.run_id, self.bindings)
            fresh = sum(1 for peer, record in progress.items()
                        if peer != me and not record.client_mode and record.epoch >= epoch)
            return max(fresh, self.tracker.global_progress.num_peers - 1)

    def average(self, weight: float, epoch: int) -> Optional[dict[str, Any]]:
        """One all-reduce of the buffers; the gathered {peer id: {"epoch": ...}}, or None if it failed."""
        with self.timing.communicating():
            control = self._take_scheduled(epoch)
            if control is not None:  # the group is (being) formed already: set this epoch's weight and go
                control.weight = weight
                control.allow_allreduce()
            else:
                control = self.averager.step(weight=weight, gather=dict(epoch=epoch), timeout=self.averaging_timeout,
                                             allow_retries=True, wait=False)
            deadline = time.monotonic() + 2 * self.averaging_timeout + self.matchmaking_time
            while True:
                try:
                    return by_peer_id(control.result(timeout=0.5))
                except TimeoutError:
                    pass
                except BaseException as exc:  # matchmaking or all-reduce failed; hivemind already logged why
                    logger.warning("outer all-reduce of epoch %d failed: %r", epoch, exc)
                    return None
                behind = self.tracker.global_epoch > epoch and control.stage in (AveragingStage.IDLE,
                                                                         AveragingStage.LOOKING_FOR_GROUP)
                if behind or time.monotonic() > deadline:
                    logger.warning("outer all-reduce of epoch %d abandoned (%s)", epoch,
                                   "the swarm moved on without this peer" if behind else "timed out")
                    control.cancel()
                    return None

    def download_state(self, timeout: float) -> Optional[tuple[Any, list[torch.Tensor]]]:
        """(metadata, tensors) from the peer with the highest state-sharing priority, or None."""
        with self.timing.communicating():
            return self.averager.load_state_from_peers(timeout=timeout)

    def shutdown(self) -> None:
        self.cancel_scheduled()
        try:
            self.tracker.shutdown(5.0)
        finally:
            self.averager.shutdown()
