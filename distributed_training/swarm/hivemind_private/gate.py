"""The gate at hivemind's averaging RPCs, and the averagers of both training modes that carry it."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Optional

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.timed_storage import get_dht_time

from .. import base58 as _base58
from ..robust import RobustRule

from .allreduce import ConsensusAllReduceRunner
from .state_download import CheckedStateDownload

logger = logging.getLogger(__name__)


def _clean(tensors: Any, weight: Any) -> bool:
    """Whether what this peer sends is finite under any codec (fp16 overflows past 65504): a reducer
    that says otherwise lies."""
    if not (isinstance(weight, (int, float)) and abs(weight) < float("inf")):
        return False
    return all(bool(torch.isfinite(t).all()) and (t.numel() == 0 or float(t.abs().max()) <= 65504.0) for t in tensors)


class _GatedStub:
    """`get_stub` that, called on an averager (its state download), refuses peers its guard refuses.

    hivemind calls `get_stub` on the class from the runner and matchmaking (left as they are: their
    peers were checked when the group formed) and on the averager when it downloads state.
    """

    def __get__(self, averager: Any, cls: type):
        plain = ServicerBase.__dict__["get_stub"].__get__(cls, cls)
        if averager is None:
            return plain

        def get_stub(p2p, peer, *, namespace=None):
            reason = averager.refused(peer, "state download")
            if reason is not None:
                raise PermissionError(f"not downloading state from {_base58(peer)}: {reason}")
            return plain(p2p, peer, namespace=namespace)

        return get_stub


class GuardedAveraging(CheckedStateDownload):
    """Mixed into an averager: its RPCs refuse peers the guard refuses; its all-reduce is the consensus one.

    `guard` (a `swarm.guard.AveragingGuard`, set right after construction) decides who may join a
    group this peer leads, send it parts, download its state, or be in a group with it at all; it
    hears every verdict of this peer's reducer. None admits every peer (an averager alone in a test).
    `state_check` (`swarm.state_digests.StateDigests`, or None) vets every state it downloads.
    """

    guard: Any = None
    robust_rule: RobustRule = RobustRule()
    get_stub = _GatedStub()

    def __init__(self, *args: Any, guard: Any = None, robust_rule: Optional[RobustRule] = None,
                 state_check: Any = None, **kwargs: Any):
        self.guard = guard  # before hivemind's constructor starts the averager's process, which inherits it
        self.state_check = state_check
        if robust_rule is not None:
            self.robust_rule = robust_rule
        super().__init__(*args, **kwargs)

    def refused(self, peer: Any, where: str) -> Optional[str]:
        if self.guard is None or peer == self.peer_id:
            return None
        return self.guard.refuse(_base58(peer), where)

    def inadmissible(self, peer: Any) -> Optional[str]:
        if self.guard is None or peer == self.peer_id:
            return None
        return self.guard.inadmissible(_base58(peer))

    async def _step(self, **kwargs: Any):
        # the follower's side of matchmaking: a refused peer is never asked to lead (hivemind then asks the next)
        matchmaking = self._matchmaking
        if not getattr(matchmaking, "gated", False):
            ask = matchmaking._request_join_group

            async def request_join_group(leader):
                return None if self.refused(leader, "leader") is not None else await ask(leader)

            matchmaking._request_join_group, matchmaking.gated = request_join_group, True
        return await super()._step(**kwargs)

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self.refused(context.remote_id, "matchmaking") is not None:
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for response in super().rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        # a banned sender's stream is taken and its parts counted for nothing (`_run_allreduce_inplace_`):
        # refusing it would fail the whole group
        if self.inadmissible(context.remote_id) is not None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(self, request: averaging_pb2.DownloadRequest, context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self.refused(context.remote_id, "state sharing") is not None:
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        ignored = set()
        for peer in group_info.peer_ids:
            reason = self.inadmissible(peer)
            if reason is not None:
                raise AllreduceException(f"refusing a group with {_base58(peer)}: {reason}")
            if self.guard is not None and peer != self.peer_id and self.guard.ignore(_base58(peer)) is not None:
                ignored.add(peer)
        group_id = group_info.group_id if group_id is None else group_id
        sent_clean = _clean(tensors, kwargs.get("weight", 1.0))
        runner = ConsensusAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, robust_rule=self.robust_rule, ignored=ignored, **kwargs)
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers do not receive averaged tensors")
            return
        try:
            averaged = [tensor async for tensor in runner]
        finally:
            # reducers caught lying, as only a member can: about this peer's parts, or in their averages
            caught = {peer: "called this peer's finite parts non-finite"
                      for peer in (runner.non_finite_accusers() if sent_clean else [])}
            if self.guard is not None:
                self.guard.note_named(runner.named_this_peer())
            directional = self.guard is None or not self.guard.named_recently()
            stray = runner.out_of_bound_reducers(self.robust_rule.output_bound, directional=directional)
            caught.update({peer: f"returned an average far out of bound of the parts it averaged ({why})"
                           for peer, why in stray.items()})
            if self.guard is not None:  # a liar's word on the others is void too, and so is a banned peer's
                void = [*caught, *(_base58(peer) for peer in ignored)]
                self.guard.record(runner.verdicts(ignore=void), members=[_base58(p) for p in group_info.peer_ids],
                                  own={**runner.confessions(), **runner.own_verdicts()}, caught=caught,
                                  me=_base58(self.peer_id))
        if stray:
            raise AllreduceException(f"the averages of {', '.join(stray)} are out of bound; not using them")
        failed = runner.tensor_part_container.failed_size
        if failed:
            raise AllreduceException(f"{failed} of {runner.tensor_part_container.total_size} values were not "
                                     "averaged (a reducer failed); not using a partial average")
        if not all(bool(torch.isfinite(value).all()) for value in averaged):
            raise AllreduceException("the averaged values are not finite; not using them")
        for tensor, value in zip(tensors, averaged):
            tensor.copy_(value)
        self.last_updated = get_dht_time()
        self._state_updated.set()


class GuardedGradientAverager(GuardedAveraging, GradientAverager):
    """Swarm mode's gradient averager (`hivemind.Optimizer(grad_averager_factory=...)`).

    hivemind's optimizer also downloads another peer's gradient buffers when it loads state: they
    carry no epoch to check and nothing a joiner needs (it accumulates its own), so none is taken."""

    def load_state_from_peers(self, *args: Any, **kwargs: Any) -> None:
        return None


class GuardedStateAverager(GuardedAveraging, TrainingStateAverager):
    """Swarm mode's state averager: the parameters peers serve to joiners."""

    def served_parameters(self, metadata: Any, tensors):
        return tensors[:len(self.main_parameters)]  # then extra tensors and optimizer statistics


class PseudoGradientAverager(GuardedAveraging, DecentralizedAverager):
    """Averages the pseudo-gradient buffers with `ConsensusAllReduceRunner`; serves θ_global to joiners.

    `state_source` is set by the trainer: a callable returning (metadata, tensors) of the state
    peers download. It runs in this (the host) process, on hivemind's state-fetching thread.
    """

    state_source = None

    def get_current_state(self):
        if self.state_source is None:
            return dict(format=None), [], None
        metadata, tensors = self.state_source()
        return metadata, tensors, None
