"""hivemind's state download, with every downloaded state checked before it is taken.

hivemind's `DecentralizedAverager._load_state_from_peers` asks peers in the order of their
state-sharing priority and returns the first state that arrives: a peer announcing priority 1e9
is always asked first and always believed. Here each downloaded (metadata, tensors) goes through
the averager's `state_check` (set before hivemind forks the averager's process, as the guard is):
`state_check(peer, epoch, parameters)` returns None to accept, else a reason, and a refused state
is dropped and the next peer asked. Without a check (None) every state is accepted, as in hivemind.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Optional, Sequence

import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture
from hivemind.utils.asyncio import aiter_with_timeout
from hivemind.utils.streaming import combine_from_streaming
from hivemind.utils.timed_storage import ValueWithExpiration

from .. import base58 as _base58

logger = logging.getLogger(__name__)


class CheckedStateDownload:
    """Mixed into an averager (before hivemind's class): downloaded state is checked, refused state skipped."""

    state_check: Any = None

    def served_parameters(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """The tensors of a downloaded state that peers digest: the first `num_params` (DiLoCo's θ_global)."""
        count = metadata.get("num_params") if isinstance(metadata, dict) else None
        return tensors[:count] if isinstance(count, int) and 0 <= count <= len(tensors) else tensors

    def state_refused(self, peer: PeerID, metadata: Any, tensors: Sequence[torch.Tensor]) -> Optional[str]:
        if self.state_check is None:
            return None
        epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
        try:
            return self.state_check(_base58(peer), epoch, self.served_parameters(metadata, tensors))
        except Exception as exc:  # a check that cannot decide refuses: the next peer may be checkable
            return f"its state could not be checked ({exc!r})"

    async def _load_state_from_peers(self, future: MPFuture, timeout: Optional[float] = None):
        # hivemind 1.1.12's loop, with the check after each download and refusals logged by the check
        if timeout is not None:
            timeout = self.next_chunk_timeout if self.next_chunk_timeout is not None else self.request_timeout
        try:
            key_manager = self._matchmaking.group_key_manager
            peer_priority, _ = self.dht.get(f"{key_manager.prefix}.all_averagers", latest=True) or ({}, None)
            peer_priority = {
                PeerID(peer_id): (float(info.value), random.random())
                for peer_id, info in peer_priority.items()
                if isinstance(info, ValueWithExpiration) and isinstance(info.value, (float, int))
            } if isinstance(peer_priority, dict) else {}
            if not peer_priority:
                logger.info("no peer announces state to download")
                future.set_result(None)
                return
            for peer in sorted(peer_priority, key=peer_priority.get, reverse=True):
                if peer == self.peer_id:
                    continue
                t0 = time.monotonic()
                try:
                    stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
                    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
                    metadata, parts, tensors = None, [], []
                    async for message in aiter_with_timeout(stream, timeout=timeout):
                        if message.metadata:
                            metadata = self.serializer.loads(message.metadata)
                        if message.tensor_part.dtype and parts:
                            tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                            parts = []
                        parts.append(message.tensor_part)
                    if parts:
                        tensors.append(deserialize_torch_tensor(combine_from_streaming(parts)))
                except PermissionError as exc:  # the guard refused this peer (it logged why)
                    logger.debug("%s", exc)
                    continue
                except Exception as exc:
                    logger.warning("failed to download state from %s: %r", _base58(peer), exc)
                    continue
                if not metadata:
                    logger.debug("peer %s did not send its state", _base58(peer))
                    continue
                if self.state_refused(peer, metadata, tensors) is not None:
                    continue
                logger.info("Finished downloading state in %.3fs from %s", time.monotonic() - t0, _base58(peer))
                future.set_result((metadata, tensors))
                return
        finally:
            if not future.done():
                future.set_result(None)
