"""The one interface both training modes implement, and what they share.

The miner, the validator's follower and the benchmarks hold a `Trainer` and never ask which mode
it is: `train_batch` takes one local step and may end a global epoch; `catch_up` loads the swarm's
state when this peer is behind; `shared_state` and `page_losses` are the model every peer holds
this epoch (what validators reproduce); `state`/`restore` are what checkpoints keep.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch

from .timing import TimeSplit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerSettings:
    """What a trainer needs from the run spec and the neuron's flags (both modes)."""

    run_id: str
    batch_size: int
    target_batch_size: int
    matchmaking_time: float = 15.0
    averaging_timeout: float = 60.0
    lr: float = 4e-4
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    compression: str = "none"
    load_state_timeout: float = 120.0


@dataclass(frozen=True)
class DiLoCoSettings(TrainerSettings):
    inner_steps: int = 100  # H: at most this many local steps per epoch before waiting for the swarm (0: no cap)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9


@dataclass(frozen=True)
class StepReport:
    """What one `train_batch` did: its loss (None if skipped) and whether it ended a global epoch."""

    loss: Optional[float]
    samples: int
    skipped: bool
    epoch: int
    epoch_changed: bool
    group_size: Optional[int]  # peers in the epoch's all-reduce, when the epoch changed (None: loaded, not averaged)
    group: Optional[tuple[str, ...]] = None  # their peer ids, sorted


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm first.

    In gradient-averaging mode hivemind calls `step` with the all-reduced gradient in place, so
    the clip sees exactly what every peer applies: clipping local gradients before averaging would
    change the average, not bound the update.
    """

    def __init__(self, params: Iterable, *, max_grad_norm: float = 0.0, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self.max_grad_norm > 0:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)


def inner_adamw(params: Iterable, settings: TrainerSettings) -> ClippedAdamW:
    """The AdamW every peer of a run uses (betas 0.9/0.95, the run's lr, weight decay and clip)."""
    return ClippedAdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay,
                        max_grad_norm=settings.grad_clip)


class Trainer(abc.ABC):
    """One peer's side of training in the swarm; see the module docstring for the contract."""

    model: torch.nn.Module  # the module this peer trains (DiLoCo: the local copy)
    settings: TrainerSettings
    device: torch.device

    def __init__(self, dht: Any, settings: TrainerSettings, device: torch.device):
        self.dht, self.settings, self.device = dht, settings, device
        self.samples_trained = 0
        self.skipped_batches = 0
        self.timing = TimeSplit()  # what `train_batch` spends communicating, and the rest (compute)

    # -- progress (the swarm's, from its signed progress records) ---------------------------------
    @property
    @abc.abstractmethod
    def local_epoch(self) -> int: ...

    @property
    @abc.abstractmethod
    def tracker(self) -> Any:
        """This peer's progress tracker (hivemind's `ProgressTracker`, made in `swarm/`)."""

    @property
    def global_epoch(self) -> int:
        return self.tracker.global_epoch

    @property
    def num_peers(self) -> int:
        return self.tracker.global_progress.num_peers

    @property
    def global_samples(self) -> int:
        return self.tracker.global_progress.samples_accumulated

    # -- training -------------------------------------------------------------------------------
    def catch_up(self) -> bool:
        """Load the swarm's state if this peer is behind it; True if it loaded."""
        if self.local_epoch >= self.global_epoch:
            return False
        logger.info("behind the swarm (epoch %d < %d): loading state from peers", self.local_epoch, self.global_epoch)
        return self._load_state_from_peers()

    def train_batch(self, inputs: torch.Tensor) -> StepReport:
        """One local step on `inputs` [batch, seq_len]; may end a global epoch."""
        with self.timing.step():
            return self._train_batch(inputs)

    @abc.abstractmethod
    def _train_batch(self, inputs: torch.Tensor) -> StepReport: ...

    @abc.abstractmethod
    def _load_state_from_peers(self) -> bool: ...

    @abc.abstractmethod
    def _zero_grad(self) -> None: ...

    def _skip(self, reason: str, epoch: int) -> StepReport:
        """A batch with a non-finite loss or gradient: counted, and nothing of it reaches the swarm."""
        self._zero_grad()
        self.skipped_batches += 1
        logger.warning("skipped a batch (%s); %d skipped so far", reason, self.skipped_batches)
        return StepReport(loss=None, samples=0, skipped=True, epoch=epoch, epoch_changed=False, group_size=None)

    # -- the model every peer holds this epoch ----------------------------------------------------
    @abc.abstractmethod
    def page_losses(self, pages: Sequence[torch.Tensor]) -> list[float]:
        """Mean next-token loss of this epoch's shared model on each page, as a validator recomputes it."""

    @abc.abstractmethod
    def shared_state(self) -> dict[str, torch.Tensor]:
        """A private CPU copy of the model every peer holds this epoch."""

    # -- persistence ----------------------------------------------------------------------------
    @abc.abstractmethod
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: "model" (the shared model), "optimizer", "local_epoch", "samples_trained"."""

    @abc.abstractmethod
    def restore(self, state: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def shutdown(self) -> None: ...


def build_trainer(model: torch.nn.Module, dht: Any, settings: TrainerSettings, device: torch.device,
                  **kwargs: Any) -> Trainer:
    """The trainer for `settings`: DiLoCo for `DiLoCoSettings`, gradient averaging otherwise."""
    if isinstance(settings, DiLoCoSettings):
        from .diloco import DiLoCoTrainer

        return DiLoCoTrainer(model, dht, settings, device, **kwargs)
    from .gradient_averaging import GradientAveragingTrainer

    return GradientAveragingTrainer(model, dht, settings, device, **kwargs)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A private CPU copy of a module's state dict."""
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
