"""Copies of the shared model state of recent epochs, and the losses they give on pages.

Within one global epoch every peer holds the same model state (it changes only at the epoch's
all-reduce), so a copy taken at the epoch's start is exactly what a validator reproduces. A miner
answers validators from such a copy on its HTTP threads, without waiting for its training loop
(which may sit in an all-reduce for many seconds); a validator keeps a few epochs' copies to
check miners that answered at the previous epoch.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from .model import page_losses

StateDict = dict[str, torch.Tensor]


class ModelSnapshots:
    """Thread-safe: snapshots are added by the training side and read by request handlers."""

    def __init__(self, template: torch.nn.Module, keep: int):
        self.keep = keep
        self._states: "OrderedDict[int, StateDict]" = OrderedDict()
        self._scratch = copy.deepcopy(template).cpu().eval()
        self._states_lock = threading.Lock()
        self._scratch_lock = threading.Lock()

    def add(self, epoch: int, state: StateDict) -> None:
        """Remember `state` (already a private copy) as the model of `epoch`."""
        with self._states_lock:
            self._states[epoch] = state
            self._states.move_to_end(epoch)
            while len(self._states) > self.keep:
                self._states.popitem(last=False)

    def epochs(self) -> list[int]:
        with self._states_lock:
            return sorted(self._states)

    def latest_epoch(self) -> Optional[int]:
        with self._states_lock:
            return next(reversed(self._states)) if self._states else None

    def __contains__(self, epoch: int) -> bool:
        with self._states_lock:
            return epoch in self._states

    def losses_at(self, epoch: int, pages: Sequence[torch.Tensor]) -> list[float]:
        with self._states_lock:
            state = self._states[epoch]
        with self._scratch_lock:
            self._scratch.load_state_dict(state)
            return page_losses(self._scratch, pages, torch.device("cpu"))
