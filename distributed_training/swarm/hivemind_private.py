"""hivemind's private surface: every override of a private method, private attribute and patch, in one place.

This project extends hivemind 1.1.12 where its public API has no hook:
- `fix_8bit_decoding`: 8-bit tensors decode wrongly under numpy 2 (a patch of `Quantization.extract`);
- `GroupRecordingOptimizer`: `hivemind.Optimizer` that records each all-reduce's group size, times
  its blocking calls and does not poll the DHT for partners while alone (overrides private methods);
- `ConsensusAllReduceRunner` and `RobustPartReducer`: the butterfly all-reduce changed so that every
  member of a group decodes the very same bits, each part is the robust mean of `robust.py` rather
  than a plain weighted sum, and an all-reduce in which any part failed is an error rather than a
  silent partial average (overrides the runner's and reducer's private methods);
- `GuardedAveraging`: the gate hivemind lacks at its averaging RPCs (joining a group, sending parts,
  downloading state), asking a `swarm.guard.AveragingGuard`, and the consensus all-reduce, for every
  averager of both training modes (`PseudoGradientAverager`, `GuardedGradientAverager`,
  `GuardedStateAverager`).

Each depends on code that hivemind may change in any release, so importing this module checks the
installed version first and refuses any other with one line (`HivemindVersionError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import Any, AsyncIterator, Callable, Optional

import hivemind
import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.compression import CompressionInfo, deserialize_torch_tensor, quantization
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished
from hivemind.utils.timed_storage import get_dht_time

from . import HivemindVersionError, base58 as _base58, peer_ids
from .robust import (NothingToAverage, RobustRule, decode_verdicts, encode_verdicts, robust_average,
                     round_verdicts, worse)

logger = logging.getLogger(__name__)

SUPPORTED_HIVEMIND = "1.1.12"


def check_hivemind_version(installed: str = hivemind.__version__) -> None:
    """The overrides below are written against one hivemind release; any other is refused."""
    if installed != SUPPORTED_HIVEMIND:
        raise HivemindVersionError(
            f"hivemind {installed} is installed, but this release of distributed-training supports only "
            f"hivemind {SUPPORTED_HIVEMIND}; reinstall with `bash scripts/install.sh`")


check_hivemind_version()


# --- 8-bit decoding under numpy 2 ---------------------------------------------------------------------
# hivemind's `Quantization.extract` reads the codebook size with `int()` on a one-element numpy array,
# which numpy 2 refuses; every 8-bit part then fails to decode and the all-reduce silently keeps each
# peer's local values for it (measured: 41.7 % of the values averaged). The wire format is unchanged.
def _extract(self, serialized) -> torch.Tensor:
    codebook_size = int(np.frombuffer(serialized.buffer, count=1, dtype=np.int64)[0])
    codebook = np.frombuffer(serialized.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
    indices = np.frombuffer(serialized.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
    indices = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized.size))
    values = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized.dtype))[indices]
    return values.requires_grad_(serialized.requires_grad)


def fix_8bit_decoding() -> None:
    quantization.Quantization.extract = _extract


fix_8bit_decoding()  # on import, so every path that decodes 8-bit tensors (both training modes) gets it


# --- gradient averaging: hivemind.Optimizer -----------------------------------------------------------
class GroupRecordingOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that remembers how many peers the last gradient all-reduce included.

    The group size is the only direct evidence that an epoch was really trained together, and
    hivemind only logs it; we keep it for the miner's metrics and for tests. It also times the two
    places where a step blocks on the swarm (the gradient all-reduce, with its wait for the group,
    and state loading); matchmaking and state averaging run on hivemind's threads meanwhile.
    """

    last_group: Optional[tuple[str, ...]] = None  # peer ids of the last epoch's all-reduce; None: not averaged

    @property
    def last_group_size(self) -> Optional[int]:
        return None if self.last_group is None else len(self.last_group)

    def __init__(self, *args: Any, timing: Any, guards: Callable[[str], Any], robust_rule: RobustRule, **kwargs: Any):
        """`timing` is the trainer's `TimeSplit`: the blocking calls below count as communication in it.
        `guards(name)` makes the `AveragingGuard` of each averager ("gradients", "state")."""
        self.timing = timing  # before hivemind's constructor, which may already call the methods below
        self._guards, self._robust_rule = guards, robust_rule
        super().__init__(*args, grad_averager_factory=partial(GuardedGradientAverager, guard=guards("gradients"),
                                                              robust_rule=robust_rule), **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        return GuardedStateAverager(
            guard=self._guards("state"), robust_rule=self._robust_rule,
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

    def _update_global_epoch(self, grad_scaler):
        self.last_group = (self.dht.peer_id.to_base58(),)  # alone unless the all-reduce below records a group
        super()._update_global_epoch(grad_scaler)

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

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        with self.timing.communicating():
            super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        control = maybe_step_control
        if control is not None and control.done() and not control.cancelled():
            with contextlib.suppress(BaseException):
                self.last_group = peer_ids(control.result(0))


# --- the consensus all-reduce (both modes) ----------------------------------------------------------
_deserialize = deserialize_torch_tensor



class RobustPartReducer(TensorPartReducer):
    """hivemind's reducer, holding every sender's part until all arrived, then taking `robust_average`.

    hivemind adds parts as they come, so it can never compare them; the robust mean needs them all.
    `verdicts` keeps, per sender index, the worst verdict of any of its parts (non-finite > clipped).
    """

    def __init__(self, part_shapes, num_senders: int, rule: RobustRule):
        self.rule = rule
        self.verdicts: dict[int, str] = {}  # the round's verdicts so far, by sender index
        self.part_masks: dict[int, float] = {}  # part index -> `verdicts` after it, as sent back to every sender
        self._found: dict[int, list[str]] = {}  # sender -> its verdicts on the parts reduced so far
        self._parts_done = 0
        self._received: list[tuple[int, torch.Tensor, float]] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._received = []
        super().reset_accumulators()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        assert 0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:  # earlier parts first, as in hivemind
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._received.append((sender_index, tensor_part, weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        senders = [sender for sender, _, _ in self._received]
        try:
            average, verdicts = robust_average([part for _, part, _ in self._received],
                                               [weight for _, _, weight in self._received], self.rule)
        except NothingToAverage as exc:
            self.current_part_future.set_exception(AllreduceException(str(exc)))
            verdicts = []
        else:
            self.current_part_future.set_result(average)
        self._parts_done += 1
        for sender, verdict in zip(senders, verdicts):
            if verdict is not None:
                self._found.setdefault(sender, []).append(verdict)
        self.verdicts = round_verdicts(self._found, self._parts_done)
        self.part_masks[self.current_part_index] = encode_verdicts(self.verdicts)
        self.reset_accumulators()


class ConsensusAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce, changed so that every member of the group gets the same bits.

    hivemind returns to each sender `average - its own part`, compressed, and lets a failed reducer's
    parts silently keep the local values. Here a reducer returns the average itself, compressed
    once (the same bytes for every sender), its own part goes through the same compression, and
    outputs are absolute values; `failed_size` tells the averager whether any part failed.
    """

    def __init__(self, *args: Any, robust_rule: RobustRule, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._compressed_results: dict[int, Any] = {}
        self._remote_verdicts: dict[int, dict[int, str]] = {}  # reducer index -> its verdicts
        self.tensor_part_reducer = RobustPartReducer(self.tensor_part_reducer.part_shapes,
                                                     len(self.sender_peer_ids), robust_rule)

    def verdicts(self) -> dict[str, str]:
        """What any reducer of the round found wrong with each sender's parts (this peer's and those sent
        back with the averages), by base58 peer id; non-finite outranks clipped."""
        merged: dict[int, str] = {}
        for found in [self.tensor_part_reducer.verdicts, *self._remote_verdicts.values()]:
            for i, verdict in found.items():
                merged[i] = worse(merged.get(i), verdict)
        return {self.sender_peer_ids[i].to_base58(): verdict for i, verdict in merged.items()}

    def _compress_result(self, part_index: int, averaged_part: torch.Tensor):
        cached = self._compressed_results.get(part_index)
        if cached is None:  # concurrent senders may compute it twice; the result is the same
            compression = self.tensor_part_container.compression
            cached = compression.compress(averaged_part, CompressionInfo.from_tensor(averaged_part), allow_inplace=False)
            self._compressed_results[part_index] = cached
        return cached

    async def _communicate_with_peer(self, peer_id):
        """Send our parts to `peer_id`'s reducer and register the averages it returns (ours: as others get them)."""
        loop = asyncio.get_event_loop()
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight)
                as_sent = await loop.run_in_executor(
                    None, lambda: _deserialize(self._compress_result(part_index, averaged_part)))
                self.tensor_part_container.register_processed_part(peer_index, part_index, as_sent)
            return
        try:  # hivemind's sender loop, with our decoder
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            def _decode(msg):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                return _deserialize(msg.tensor_part), msg.weight

            part_index = 0
            remote = self._remote_verdicts.setdefault(peer_index, {})
            async for averaged_part, mask in amap_in_executor(_decode, aiter_with_timeout(stream, self.reducer_timeout),
                                                              max_prefetch=self.tensor_part_container.prefetch):
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged_part)
                remote.clear()  # each reply carries the reducer's verdicts on the round so far: the last counts
                remote.update(decode_verdicts(mask, len(self.sender_peer_ids)))
                part_index += 1
            if part_index != self.tensor_part_container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, expected "
                                         f"{self.tensor_part_container.num_parts_by_peer[peer_index]}")
        except BaseException as exc:
            if isinstance(exc, Exception):
                logger.debug("all-reduce with %s failed: %r", peer_id, exc, exc_info=True)
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        """hivemind's reducer loop, returning the compressed average instead of a per-sender delta."""
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (_deserialize(msg.tensor_part), msg.weight), stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight)
                except BannedException:
                    break  # the sender was banned; its parts no longer count
                serialized = await loop.run_in_executor(None, self._compress_result, part_index, averaged_part)
                mask = self.tensor_part_reducer.part_masks.get(part_index, 0.0)
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized, weight=mask)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


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


class GuardedAveraging:
    """Mixed into an averager: its RPCs refuse peers the guard refuses; its all-reduce is the consensus one.

    `guard` (a `swarm.guard.AveragingGuard`, set right after construction) decides who may join a
    group this peer leads, send it parts, download its state, or be in a group with it at all; it
    hears every verdict of this peer's reducer. None admits every peer (an averager alone in a test).
    """

    guard: Any = None
    robust_rule: RobustRule = RobustRule()
    get_stub = _GatedStub()

    def __init__(self, *args: Any, guard: Any = None, robust_rule: Optional[RobustRule] = None, **kwargs: Any):
        self.guard = guard  # before hivemind's constructor starts the averager's process, which inherits it
        if robust_rule is not None:
            self.robust_rule = robust_rule
        super().__init__(*args, **kwargs)

    def refused(self, peer: Any, where: str) -> Optional[str]:
        if self.guard is None or peer == self.peer_id:
            return None
        return self.guard.refuse(_base58(peer), where)

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
        if self.refused(context.remote_id, "all-reduce") is not None:
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
        for peer in group_info.peer_ids:
            reason = self.refused(peer, "group")
            if reason is not None:
                raise AllreduceException(f"refusing a group with {_base58(peer)}: {reason}")
        group_id = group_info.group_id if group_id is None else group_id
        runner = ConsensusAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, robust_rule=self.robust_rule, **kwargs)
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers do not receive averaged tensors")
            return
        try:
            averaged = [tensor async for tensor in runner]
        finally:
            if self.guard is not None:
                self.guard.record(runner.verdicts(), members=[_base58(p) for p in group_info.peer_ids])
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
    """Swarm mode's gradient averager (`hivemind.Optimizer(grad_averager_factory=...)`)."""


class GuardedStateAverager(GuardedAveraging, TrainingStateAverager):
    """Swarm mode's state averager: the parameters peers average and serve to joiners."""


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
