"""Swarm training: AdamW inside `hivemind.Optimizer`, so many peers train as one large batch.

Each peer accumulates gradients on its own batches and reports how many samples it processed;
when the swarm together reaches `target_batch_size`, the peers all-reduce their gradients and
every one applies the same AdamW step, so their parameters stay equal. This is the only module
that imports hivemind's optimizer.

What the seed system got wrong and this module does not:
- progress counts the samples actually processed (`opt.step(batch_size=n)`), never a nominal size;
- a non-finite loss or gradient is skipped and counted, never sent to the swarm;
- gradient clipping is applied to the *averaged* gradient, right before the shared AdamW step.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Optional, Sequence

import hivemind
import torch
from hivemind.compression import Float16Compression, NoCompression, Uniform8BitQuantization

from .compression import fix_8bit_decoding
from .timing import TimeSplit, communication

fix_8bit_decoding()

logger = logging.getLogger(__name__)

COMPRESSION = {"none": NoCompression, "fp16": Float16Compression, "uint8": Uniform8BitQuantization}


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the global gradient norm first.

    hivemind calls the wrapped optimizer's `step` with the all-reduced gradient in place, so the
    clip sees exactly what every peer applies: clipping local gradients before averaging would
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


class _GroupRecordingOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that remembers how many peers the last gradient all-reduce included.

    The group size is the only direct evidence that an epoch was really trained together, and
    hivemind only logs it; we keep it for the miner's metrics and for tests. It also times the two
    places where a step blocks on the swarm (the gradient all-reduce, with its wait for the group,
    and state loading); matchmaking and state averaging run on hivemind's threads meanwhile.
    """

    last_group_size: Optional[int] = None

    def __init__(self, *args: Any, **kwargs: Any):
        self.timing = TimeSplit()  # before hivemind's constructor, which may already call the methods below
        super().__init__(*args, **kwargs)

    def _update_global_epoch(self, grad_scaler):
        self.last_group_size = 1  # alone unless the all-reduce below records a group
        super()._update_global_epoch(grad_scaler)

    # Alone, hivemind still pre-schedules a round `matchmaking_time` before each epoch, and its
    # matchmaking then polls the DHT in a tight loop (empty leader queue -> fetch again) until the
    # epoch cancels the round for want of peers: with the default 15 s that is every step of a
    # short epoch, and the averager and DHT processes burned more CPU than training itself. Only
    # pre-schedule once another peer reports progress; hivemind's own epoch code starts a round
    # on the spot when one has joined (`_begin_averaging_gradients`), so nobody is left out.
    def _maybe_schedule_gradient_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if self.tracker.global_progress.num_peers > 1:
            super()._maybe_schedule_state_averaging()

    @communication
    def load_state_from_peers(self, **kwargs):
        super().load_state_from_peers(**kwargs)

    @communication
    def _average_gradients_and_load_into_optimizer(self, maybe_step_control):
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        size = 1
        control = maybe_step_control
        if control is not None and control.done() and not control.cancelled():
            with contextlib.suppress(BaseException):
                size = len(control.result(0))
        self.last_group_size = size


@dataclass(frozen=True)
class SwarmSettings:
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
class StepReport:
    loss: Optional[float]
    samples: int
    skipped: bool
    epoch: int
    epoch_changed: bool
    group_size: Optional[int]


class DeviceError(RuntimeError):
    """The requested torch device is not there; the operator picks another or fixes the driver."""


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--neuron.device {requested}: no CUDA device is visible; use cpu or fix the driver")
    return torch.device(requested)


class SwarmTrainer:
    """One peer's side of swarm training: local steps, global epochs, state loading."""

    def __init__(self, model: torch.nn.Module, dht: hivemind.DHT, settings: SwarmSettings, device: torch.device):
        if settings.compression not in COMPRESSION:
            raise ValueError(f"unknown gradient compression {settings.compression!r}; use {', '.join(COMPRESSION)}")
        self.model, self.dht, self.settings, self.device = model.to(device), dht, settings, device
        self.samples_trained = 0
        self.skipped_batches = 0
        self.optimizer = _GroupRecordingOptimizer(
            dht=dht,
            run_id=settings.run_id,
            target_batch_size=settings.target_batch_size,
            batch_size_per_step=settings.batch_size,
            optimizer=partial(ClippedAdamW, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay,
                              max_grad_norm=settings.grad_clip),
            params=self.model.parameters(),
            matchmaking_time=settings.matchmaking_time,
            averaging_timeout=settings.averaging_timeout,
            # hivemind's default waits only matchmaking_time for each chunk of an all-reduce, so a
            # briefly starved peer fails the round and drifts out of sync; allow a third of the round.
            next_chunk_timeout=max(settings.matchmaking_time, settings.averaging_timeout / 3),
            load_state_timeout=settings.load_state_timeout,
            grad_compression=COMPRESSION[settings.compression](),
            state_averaging_compression=COMPRESSION[settings.compression](),
            use_local_updates=False,
            # hivemind warns (and risks rare deadlocks) when a request may outlast matchmaking
            averager_opts={"request_timeout": max(0.5, min(3.0, settings.matchmaking_time / 2))},
            verbose=False,
        )

    # -- progress -------------------------------------------------------------------------------
    @property
    def local_epoch(self) -> int:
        return self.optimizer.local_epoch

    @property
    def global_epoch(self) -> int:
        return self.optimizer.tracker.global_epoch

    @property
    def num_peers(self) -> int:
        return self.optimizer.tracker.global_progress.num_peers

    @property
    def global_samples(self) -> int:
        return self.optimizer.tracker.global_progress.samples_accumulated

    @property
    def timing(self) -> TimeSplit:
        """Seconds spent computing and communicating so far."""
        return self.optimizer.timing

    # -- training -------------------------------------------------------------------------------
    def catch_up(self) -> bool:
        """Load the swarm's state if this peer is behind it; True if it loaded."""
        if self.local_epoch >= self.global_epoch:
            return False
        logger.info("behind the swarm (epoch %d < %d): loading state from peers", self.local_epoch, self.global_epoch)
        self.optimizer.load_state_from_peers()
        return True

    def train_batch(self, inputs: torch.Tensor) -> StepReport:
        """One local step on `inputs` [batch, seq_len]; may trigger a global epoch."""
        with self.timing.step():
            return self._train_batch(inputs)

    def _train_batch(self, inputs: torch.Tensor) -> StepReport:
        epoch_before = self.local_epoch
        loss, problem = loss_and_gradients(self.model, inputs, self.device)
        if problem:
            return self._skip(problem, epoch_before)
        samples = int(inputs.shape[0])
        self.optimizer.step(batch_size=samples)
        self.optimizer.zero_grad(set_to_none=True)
        self.samples_trained += samples
        changed = self.local_epoch != epoch_before
        return StepReport(loss=float(loss.item()), samples=samples, skipped=False, epoch=self.local_epoch,
                          epoch_changed=changed, group_size=self.optimizer.last_group_size if changed else None)

    def _skip(self, reason: str, epoch: int) -> StepReport:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_batches += 1
        logger.warning("skipped a batch (%s); %d skipped so far", reason, self.skipped_batches)
        return StepReport(loss=None, samples=0, skipped=True, epoch=epoch, epoch_changed=False, group_size=None)

    @torch.no_grad()
    def page_losses(self, pages: Sequence[torch.Tensor]) -> list[float]:
        """Mean next-token loss of the current model on each page, as a validator recomputes it."""
        return page_losses(self.model, pages, self.device)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """A private CPU copy of the model every peer holds this epoch (what validators reproduce)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "local_epoch": self.local_epoch,
            "samples_trained": self.samples_trained,
        }

    def restore(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state["model"])
            # The offloaded copies the optimizer updates must match the restored weights.
            offloaded = [p for group in self.optimizer.opt.param_groups for p in group["params"]]
            for main, copy in zip(self.optimizer.state_averager.main_parameters, offloaded):
                copy.copy_(main)
        self.optimizer.load_state_dict(state["optimizer"])
        self.samples_trained = int(state.get("samples_trained", 0))

    def shutdown(self) -> None:
        self.optimizer.shutdown()


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_and_gradients(model: torch.nn.Module, inputs: torch.Tensor,
                       device: torch.device) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """Forward and backward on one batch: (loss, None), or (None, why) if the loss or a gradient is not finite.

    Checked here, before anything reaches an optimizer, so a bad batch never touches the swarm.
    """
    model.train()
    inputs = inputs.to(device)
    with autocast(device):
        loss = model(input_ids=inputs, labels=inputs).loss
    if not torch.isfinite(loss):
        return None, f"non-finite loss {loss.item()}"
    loss.backward()
    # One fused norm is finite exactly when every gradient element is (a gradient so large that
    # its norm overflows counts as non-finite too, as it should); isfinite on each tensor cost ~4 %
    # of a tiny model's CPU step and one device sync per tensor, the norm ~0.3 % and one sync.
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        return None, "non-finite gradient"
    return loss, None


@torch.no_grad()
def page_losses(model: torch.nn.Module, pages: Sequence[torch.Tensor], device: torch.device) -> list[float]:
    """Per-page mean loss in eval mode and float32, so any two machines agree closely."""
    was_training = model.training
    model.eval()
    try:
        losses = []
        for page in pages:
            page = page.to(device)
            loss = model(input_ids=page, labels=page).loss.float().item()
            losses.append(loss if math.isfinite(loss) else float("nan"))
        return losses
    finally:
        model.train(was_training)
