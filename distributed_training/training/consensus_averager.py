"""The all-reduce DiLoCo rounds run on: every member of a group ends with the very same bits.

hivemind's butterfly all-reduce lets every member add a *delta* (average − own part) to its own
buffer, compressed relative to what *it* sent, and silently keeps the local part of a reducer that
failed. Both would leave DiLoCo peers with slightly (compression) or grossly (failure) different
averages, and so with θ_global drifting apart; see `diloco.py` for how the trainer uses this.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.partition import BannedException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished
from hivemind.utils.timed_storage import get_dht_time

from .compression import fix_8bit_decoding

logger = logging.getLogger(__name__)

fix_8bit_decoding()  # without it 8-bit parts decode wrongly under numpy 2
_deserialize = deserialize_torch_tensor


class ConsensusAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce, changed so that every member of the group gets the same bits.

    hivemind returns to each sender `average - its own part`, compressed, and lets a failed reducer's
    parts silently keep the local values. Here a reducer returns the average itself, compressed
    once (the same bytes for every sender), its own part goes through the same compression, and
    outputs are absolute values; `failed_size` tells the averager whether any part failed.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._compressed_results: dict[int, Any] = {}

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
                return _deserialize(msg.tensor_part)

            part_index = 0
            async for averaged_part in amap_in_executor(_decode, aiter_with_timeout(stream, self.reducer_timeout),
                                                        max_prefetch=self.tensor_part_container.prefetch):
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged_part)
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
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


class PseudoGradientAverager(DecentralizedAverager):
    """Averages the pseudo-gradient buffers with `ConsensusAllReduceRunner`; serves θ_global to joiners.

    `state_source` is set by the trainer: a callable returning (metadata, tensors) of the state
    peers download. It runs in this (the host) process, on hivemind's state-fetching thread.
    """

    state_source = None

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        runner = ConsensusAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors, group_id=group_id,
            ordered_peer_ids=group_info.peer_ids, **kwargs)
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers do not receive averaged tensors")
            return
        averaged = [tensor async for tensor in runner]
        failed = runner.tensor_part_container.failed_size
        if failed:
            raise AllreduceException(f"{failed} of {runner.tensor_part_container.total_size} values were not "
                                     "averaged (a reducer failed); not using a partial average")
        for tensor, value in zip(tensors, averaged):
            tensor.copy_(value)
        self.last_updated = get_dht_time()
        self._state_updated.set()

    def get_current_state(self):
        if self.state_source is None:
            return dict(format=None), [], None
        metadata, tensors = self.state_source()
        return metadata, tensors, None
