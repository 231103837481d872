"""Swarm mode's `hivemind.Optimizer`, recording its groups and gated like every averager."""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import Any, Callable, Optional

import hivemind
import torch
from hivemind.optim.state_averager import TrainingStateAverager

from .. import peer_ids
from ..robust import RobustRule

logger = logging.getLogger(__name__)
from .gate import GuardedGradientAverager, GuardedStateAverager
from .progress import BoundProgressTracker


# --- gradient averaging: hivemind.Optimizer -----------------------------------------------------------
class GroupRecordingOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that remembers how many peers the last gradient all-reduce included.

    The group size is the only direct evidence that an epoch was really trained together, and
    hivemind only logs it; we keep it for the miner's metrics and for tests. It also times the two
    places where a step blocks on the swarm (the gradient all-reduce, with its wait for the group,
    and state loading); matchmaking runs on hivemind's threads meanwhile.
    """

    last_group: Optional[tuple[str, ...]] = None  # peer ids of the last epoch's all-reduce; None: not averaged

    @property
    def last_group_size(self) -> Optional[int]:
        return None if self.last_group is None else len(self.last_group)

    def __init__(self, *args: Any, timing: Any, guards: Callable[[str], Any], robust_rule: RobustRule,
                 bindings: Any = None, state_check: Any = None, accuse: Any = None, excluded: Any = None,
                 **kwargs: Any):
        """`timing` is the trainer's `TimeSplit`: the blocking calls below count as communication in it.
        `guards(name)` makes the `AveragingGuard` of each averager ("gradients", "state"); `bindings`
        (a `progress.BindingLookup`, or None: no bindings) is whose progress records count."""
        self.timing = timing  # before hivemind's constructor, which may already call the methods below
        self._guards, self._robust_rule, self._bindings = guards, robust_rule, bindings
        self._state_check, self._accuse = state_check, accuse  # see GuardedAveraging, BoundProgressTracker
        self._excluded = excluded
        super().__init__(*args, grad_averager_factory=partial(GuardedGradientAverager, guard=guards("gradients"),
                                                              robust_rule=robust_rule), **kwargs)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> BoundProgressTracker:
        return BoundProgressTracker(dht=self.dht, prefix=self.run_id, target_batch_size=target_batch_size,
                                    client_mode=self.client_mode, status_loglevel=self.status_loglevel,
                                    bindings=self._bindings, accuse=self._accuse, excluded=self._excluded,
                                    start=True, **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return GuardedStateAverager(
            guard=self._guards("state"), robust_rule=self._robust_rule, state_check=self._state_check,
            dht=self.dht, prefix=f"{self.run_id}_state_averager", min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout, shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer, custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel, next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode, auxiliary=self.auxiliary, start=True, **kwargs)

    @torch.no_grad()
    def copy_parameters_to_offloaded(self) -> None:
        """After the model's parameters were overwritten (a restored checkpoint), the copies the
        offloaded optimizer updates must hold the same values, or its next step undoes the restore."""
        offloaded = [p for group in self.opt.param_groups for p in group["params"]]
        for main, copy in zip(self.state_averager.main_parameters, offloaded):
            copy.copy_(main)

    # --- one state for the whole swarm ---------------------------------------------------------------
    # Members of an all-reduce apply the same AdamW step to the same averaged bits, so their parameters
    # stay bit-identical and a signed digest can vouch for them (`swarm.state_digests`). hivemind's
    # fallback breaks that: a peer whose all-reduce failed while others trained steps on its own
    # gradient and forks. Here it still takes that step (its model stays near the swarm's for the
    # epoch, which validators check it at), signs nothing for the epoch, and, like a peer whose signed
    # state lost to another digest, reloads the swarm's state, checked against the digests, at its next step.
    _out_of_step: Optional[str] = None  # why this peer must reload the swarm's state; None: it is in step

    def _others_trained(self) -> bool:
        return self.tracker.global_progress.num_peers > 1

    def _fall_out_of_step(self, reason: str) -> None:
        if self._out_of_step is None:
            logger.warning("%s: reloading the swarm's state at the next step", reason)
        self._out_of_step = reason

    def _load_local_gradients_into_optimizer(self) -> None:
        if self._others_trained() and self.last_group is not None and len(self.last_group) <= 1:
            self._fall_out_of_step("the gradient all-reduce failed while other peers trained")
        super()._load_local_gradients_into_optimizer()

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        began = super()._begin_averaging_gradients(grad_scaler)
        if not began and self._others_trained():  # tagged along with weight 0, or no round could start
            self._fall_out_of_step("this peer could not join the epoch's gradient all-reduce")
        return began

    def _should_load_state_from_peers(self) -> bool:
        return self._out_of_step is not None or super()._should_load_state_from_peers()

    def served_parameters(self) -> list[torch.Tensor]:
        """The parameters `get_current_state` serves (the optimizer's copies: host ones when offloaded)."""
        return [param for group in self.state_averager.optimizer.param_groups for param in group["params"]]

    def publish_digest(self) -> None:
        """Sign the digest of the parameters this peer serves now (also at start and after a restore: a
        forged state of epoch 0 must face the signers of the seeded initial model)."""
        if self._state_check is not None:
            try:
                self._state_check.publish(self.local_epoch, self.served_parameters())
            except Exception as exc:  # a DHT hiccup: the next epoch publishes again
                logger.warning("could not publish the state digest of epoch %d: %r", self.local_epoch, exc)

    def _check_fork(self) -> None:
        """After an epoch: whether the state this peer signed one epoch ago lost to another digest (its
        group averaged apart from the rest); by now every member of that epoch has published."""
        if self._state_check is None:
            return
        with contextlib.suppress(Exception):
            reason = self._state_check.fork(self.local_epoch - 1)
            if reason is not None:
                self._fall_out_of_step(reason)

    def _update_global_epoch(self, grad_scaler):
        self.last_group = (self.dht.peer_id.to_base58(),)  # alone unless the all-reduce below records a group
        super()._update_global_epoch(grad_scaler)
        if self._out_of_step is None:
            self.publish_digest()
            self._check_fork()

    # Alone, hivemind still pre-schedules an all-reduce `matchmaking_time` before each epoch, and its
    # matchmaking then polls the DHT in a tight loop (empty leader queue -> fetch again) until the
    # epoch cancels it for want of peers: with the default 15 s that is every step of a
    # short epoch, and the averager and DHT processes burned more CPU than training itself. Only
    # pre-schedule once another peer reports progress; hivemind's own epoch code starts one
    # on the spot when one has joined (`_begin_averaging_gradients`), so nobody is left out.
    def _maybe_schedule_gradient_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_state_averaging()

    def load_state_from_peers(self, **kwargs):
        self.last_group = None  # an epoch reached by loading state was not averaged by this peer
        with self.timing.communicating():
            super().load_state_from_peers(**kwargs)
        if self._out_of_step is not None:
            logger.info("reloaded the swarm's state at epoch %d (%s)", self.local_epoch, self._out_of_step)
        # whatever was loaded is what this peer now serves; if no state passed the check, it serves its own
        self._out_of_step = None
        self.publish_digest()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        with self.timing.communicating():
            super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        control = maybe_step_control
        if control is not None and control.done() and not control.cancelled():
            with contextlib.suppress(BaseException):
                self.last_group = peer_ids(control.result(0))


