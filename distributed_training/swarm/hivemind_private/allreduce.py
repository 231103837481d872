"""The consensus all-reduce of both modes: every member decodes the same bits; each part is a robust mean."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished

from ..robust import (FAR_OFF, NON_FINITE, NothingToAverage, RobustRule, credible_mask, decode_verdicts,
                      encode_verdicts, robust_average, round_verdicts, stray_averages, worse)

logger = logging.getLogger(__name__)


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
        self.ignored: set[int] = set()  # senders whose parts count with weight 0 (banned by this peer)
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
            self._received.append((sender_index, tensor_part, 0.0 if sender_index in self.ignored else weight))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from != self.num_current_senders:
            return
        senders = [sender for sender, _, _ in self._received]
        try:
            average, verdicts = robust_average(
                [part for _, part, _ in self._received], [weight for _, _, weight in self._received], self.rule,
                ignored=[row for row, (sender, _, _) in enumerate(self._received) if sender in self.ignored])
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

    def __init__(self, *args: Any, robust_rule: RobustRule, ignored: Any = (), **kwargs: Any):
        """`ignored`: the peers (PeerID) whose parts this peer's reducer counts for nothing (its bans)."""
        super().__init__(*args, **kwargs)
        self._compressed_results: dict[int, Any] = {}
        self._remote_verdicts: dict[int, dict[int, str]] = {}  # reducer index -> its verdicts
        # reducer index -> [|own parts|^2, |averages|^2, own . average] over its span
        self._span_norms: dict[int, list[float]] = {}
        self.tensor_part_reducer = RobustPartReducer(self.tensor_part_reducer.part_shapes,
                                                     len(self.sender_peer_ids), robust_rule)
        self.tensor_part_reducer.ignored = {index for index, peer in enumerate(self.sender_peer_ids) if peer in ignored}

    def _credible_remote(self, ignore: Sequence[str] = ()) -> dict[int, dict[int, str]]:
        """The remote reducers' verdicts (by their index in `ordered_peer_ids`) that `credible_mask` takes,
        less those of the reducers in `ignore` (base58 ids)."""
        credible = {}
        for reducer, found in self._remote_verdicts.items():
            peer = self.ordered_peer_ids[reducer]
            if peer.to_base58() in ignore:
                continue
            as_sender = self.sender_peer_ids.index(peer) if peer in self.sender_peer_ids else -1
            if credible_mask(found, as_sender, len(self.sender_peer_ids)):
                credible[reducer] = found
            elif found:
                logger.warning("ignoring the verdicts of %s: they name %d of %d senders", peer.to_base58(),
                               len(found), len(self.sender_peer_ids))
        return credible

    def verdicts(self, ignore: Sequence[str] = ()) -> dict[str, str]:
        """What any reducer of the round found wrong with each sender's parts (this peer's and the credible
        ones sent back with the averages, but not those of the reducers in `ignore`), by base58 peer id;
        non-finite outranks clipped."""
        merged: dict[int, str] = {}
        for found in [self.tensor_part_reducer.verdicts, *self._credible_remote(ignore).values()]:
            for i, verdict in found.items():
                merged[i] = worse(merged.get(i), verdict)
        return {self.sender_peer_ids[i].to_base58(): verdict for i, verdict in merged.items()}

    def confessions(self) -> dict[str, str]:
        """What remote reducers said about their own parts, by base58 id: a peer's word against itself
        frames nobody, so it counts as if this peer had seen it."""
        found = {}
        for reducer, verdicts in self._remote_verdicts.items():
            peer = self.ordered_peer_ids[reducer]
            if peer in self.sender_peer_ids and self.sender_peer_ids.index(peer) in verdicts:
                found[peer.to_base58()] = verdicts[self.sender_peer_ids.index(peer)]
        return found

    def named_this_peer(self) -> bool:
        """Whether a remote reducer called this peer's parts non-finite or far off this round (credible or
        not): the members that took its word count this peer's parts for nothing while their ban lasts."""
        return bool(self._accusers((NON_FINITE, FAR_OFF)))

    def non_finite_accusers(self) -> list[str]:
        """The remote reducers that said this peer's parts were not finite (base58 ids)."""
        return self._accusers((NON_FINITE,))

    def _accusers(self, kinds: Sequence[str]) -> list[str]:
        """The remote reducers whose verdict on this peer's parts is one of `kinds` (base58 ids)."""
        if self.peer_id not in self.sender_peer_ids:
            return []
        me = self.sender_peer_ids.index(self.peer_id)
        return [self.ordered_peer_ids[reducer].to_base58() for reducer, found in self._remote_verdicts.items()
                if found.get(me) in kinds and self.ordered_peer_ids[reducer] != self.peer_id]

    def own_verdicts(self) -> dict[str, str]:
        """What this peer's reducer found, by base58 peer id: what it reports as its own (`verdict_reports`)."""
        found = self.tensor_part_reducer.verdicts
        return {self.sender_peer_ids[i].to_base58(): verdict for i, verdict in found.items()}

    def _measure(self, reducer: int, part_index: int, averaged_part: torch.Tensor) -> None:
        own = self.tensor_part_container._input_parts_by_peer[reducer][part_index][0]
        norms = self._span_norms.setdefault(reducer, [0.0, 0.0, 0.0])
        own, averaged = own.double().reshape(-1), averaged_part.double().reshape(-1)
        norms[0] += float(own.square().sum())
        norms[1] += float(averaged.square().sum())
        norms[2] += float(own @ averaged)

    def out_of_bound_reducers(self, factor: float, directional: bool = True) -> dict[str, str]:
        """`robust.stray_averages` over this round's reducers, against this peer's own parts of their span
        (never this peer's own reducer). Every member sees the same bytes, so every member finds it alike.
        Returns {base58 id: the figures that put it out of bound}."""
        spans = {self.ordered_peer_ids[reducer].to_base58(): tuple(values)
                 for reducer, values in self._span_norms.items()}
        me = self.peer_id.to_base58()
        return {peer: why for peer, why in stray_averages(spans, factor, directional).items() if peer != me}

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
                self._measure(peer_index, part_index, as_sent)
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
                self._measure(peer_index, part_index, averaged_part)
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


