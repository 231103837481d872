"""The one interface both training modes implement, and what they share.

The miner, the validator's follower and the benchmarks hold a `Trainer` and never ask which mode
it is: `train_batch` takes one local step and may end a global epoch; `catch_up` loads the swarm's
state when this peer is behind; `shared_state` and `page_losses` are the model every peer holds
this epoch (what validators reproduce); `state`/`restore` are what checkpoints keep.
"""

from __future__ import annotations

import abc
import logging
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..swarm.guard import NEVER, AveragingGuard, BanRule, PeerAdmission, board_refuses, unbanned
from ..swarm.robust import RobustRule
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
    # how this peer's device runs the step (none of it changes what the swarm computes; see step.py)
    compile: bool = False  # torch.compile the step
    micro_batch_size: int = 0  # sequences per forward/backward (0: the whole batch)
    # host syncs: 0 checks each loss before its backward, then the gradient (a bad batch costs no
    # backward); 1 reads the loss and the gradient norm together, one sync per step; N > 1 (DiLoCo)
    # checks on the device and reads once every N steps, reporting the window with its last step
    sync_every: int = 0
    offload_optimizer: bool = True  # swarm mode: hivemind's AdamW on a host copy (False: on the device)
    # what every reducer computes and whom this peer bans (both modes; see swarm/robust.py, swarm/guard.py)
    robust: RobustRule = RobustRule()
    bans: BanRule = BanRule()
    admit: Optional[PeerAdmission] = None  # who may average at all (`swarm.bindings.BoundPeers`); None: any peer
    # signed digests of the served state, and the check of downloaded state (`swarm.state_digests`); None: none
    state_digests: Optional[Any] = None
    # hears (peer, reason) for a peer caught lying outside the all-reduce (the ban board; `guard.post_ban`)
    accuse: Optional[Callable[[str, str], None]] = None

    @property
    def bindings(self) -> Optional[Callable]:
        """Whose progress counts (a `swarm.progress.BindingLookup`: `BoundPeers.bindings`, less the peers
        this process bans); None: nobody binds."""
        lookup = getattr(self.admit, "bindings", None)
        return None if lookup is None else unbanned(lookup, ban_board())

    @property
    def bound(self) -> Optional[Callable]:
        """Who is bound at all (`BoundPeers.bindings`, bans aside: a banned miner is still a miner); None: nobody binds."""
        return getattr(self.admit, "bindings", None)

    @property
    def excluded(self) -> Callable[[str], bool]:
        """Whose progress counts for nothing whether or not peers bind: the peers this process bans."""
        return partial(board_refuses, ban_board())

    def guard(self, name: str) -> AveragingGuard:
        """The guard of one of this peer's averagers ("gradients", "state", "pseudo-gradients").

        Parameters are averaged to pull together peers that drifted apart, so an honest peer's can be
        far from the others' and clipped; there only non-finite values earn a ban."""
        rule = replace(self.bans, clip_strikes=NEVER, ban_far_off=False) if name == "state" else self.bans
        return AveragingGuard(name, rule, admit=self.admit, board=ban_board())


_BOARD: Optional[Path] = None


def ban_board() -> Path:
    """One directory per process where its averagers' guards post their bans to each other."""
    global _BOARD
    if _BOARD is None or not _BOARD.is_dir():
        _BOARD = Path(tempfile.mkdtemp(prefix="dt-bans-"))
    return _BOARD


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
    # With `sync_every` > 1 the report of a window's last step covers its `steps` steps: loss is the
    # mean of the finite ones, samples theirs, skipped True when none was finite; the window's other
    # steps report `pending` (steps 0: nothing known yet, no loss, no samples, not skipped).
    steps: int = 1
    skipped_steps: int = 0
    pending: bool = False


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm first.

    In gradient-averaging mode hivemind calls `step` with the all-reduced gradient in place, so
    the clip sees exactly what every peer applies: clipping local gradients before averaging would
    change the average, not bound the update.
    """

    def __init__(self, params: Iterable, *, max_grad_norm: float = 0.0,
                 before_step: Optional[Callable[[], None]] = None, **kwargs: Any):
        """`before_step` runs first in every `step` (gradient averaging on the device puts the epoch's gradient in place)."""
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.before_step = before_step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if self.before_step is not None:
            self.before_step()
        if self.max_grad_norm > 0:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)

    @torch.no_grad()
    def checked_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip and step unless `loss` or the gradient is not finite, decided on the device: no host sync.

        Returns 1.0 where the step was skipped, else 0.0, as a device tensor. Needs `fused=True`:
        the fused kernel reads it as `found_inf` and leaves parameters, moments and step count alone.
        """
        if not all(group.get("fused") for group in self.param_groups):
            raise RuntimeError("checked_step needs a fused AdamW (ClippedAdamW(..., fused=True))")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        skipped = torch.logical_not(torch.isfinite(norm) & torch.isfinite(loss)).float()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        self.found_inf = skipped
        try:
            super().step()
        finally:
            del self.found_inf
        return skipped

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load moments and steps, keeping this optimizer's own kernel choice (fused or not), which is the device's."""
        kernels = [(group.get("fused"), group.get("foreach")) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (fused, foreach) in zip(self.param_groups, kernels):
            group["fused"], group["foreach"] = fused, foreach
            for param in group["params"]:
                state = self.state.get(param, {})
                if "step" in state:  # the fused kernel keeps the step count on the parameter's device
                    step = state["step"]
                    state["step"] = step.to(param.device) if fused else step.to("cpu")


def inner_adamw(params: Iterable, settings: TrainerSettings, fused: bool = False) -> ClippedAdamW:
    """The AdamW every peer of a run uses (betas 0.9/0.95, the run's lr, weight decay and clip).

    `fused` picks torch's one-kernel implementation: the same update, rounded in another order, so
    it is a device's choice (GPUs, and `checked_step`), not the run's.
    """
    return ClippedAdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay,
                        max_grad_norm=settings.grad_clip, fused=True if fused else None)


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
