"""Gradient-averaging training (`--training.mode swarm`): AdamW inside `hivemind.Optimizer`.

Each peer accumulates gradients on its own batches and reports how many samples it processed;
when the swarm together reaches `target_batch_size`, the peers all-reduce their gradients and
every one applies the same AdamW step, so their parameters stay equal. One global epoch is one
optimizer step.

Rules that keep the shared step honest:
- progress counts the samples actually processed (`opt.step(batch_size=n)`), never a nominal size;
- a non-finite loss or gradient is skipped and counted, never sent to the swarm;
- gradient clipping is applied to the *averaged* gradient, right before the shared AdamW step.

Where the AdamW runs (`offload_optimizer`, this peer's choice): by default hivemind keeps a host copy
of the parameters and steps it on the CPU, then copies the parameters back to the device, once per
epoch. With `offload_optimizer=False` hivemind steps the model's own parameters where they are, with
torch's fused AdamW on CUDA. Both apply the same update to the same averaged gradient (rounded in
another order on another device), so peers of either kind stay in step.

hivemind creates the AdamW's state by running one real step on zero gradients: the weights are
decayed once and the step count starts at 1, so every early update gets the bias correction of the
step after it (the first about a quarter too small). `_undo_initial_step` restores the seeded
weights and zeroes the step counts (the moments are still zero), so the swarm's first step is plain
AdamW's first step. Which is faster on a GPU is `bench/gpu_step.py`'s two swarm rows.
The host copy's gradients *are* hivemind's averager buffers; on the device, hivemind 1.1.12 copies
them into `.grad` only after a successful all-reduce, so a lone peer would step on its last batch's
gradient instead of the epoch's mean. `_epoch_gradient_into_model` copies them first in that case,
so the device step applies exactly what the host copy would.

Every step's check reads the loss and the gradient norm on the host before `opt.step`: a non-finite
gradient accumulated into hivemind's buffers would reach the all-reduce, and hivemind's step reads the
host's progress counters anyway. On CUDA it is one sync (`sync_every` 1) instead of three.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from ..swarm.compression import codec
from ..swarm.hivemind_private import GroupRecordingOptimizer
from .model import page_losses
from .step import ForwardBackward, checked
from .trainer import ClippedAdamW, StepReport, Trainer, TrainerSettings, cpu_state


NEVER = 2**62  # hivemind averages state at epochs divisible by this


class GradientAveragingTrainer(Trainer):
    """One peer's side of gradient averaging: local steps, global epochs, state loading."""

    def __init__(self, model: torch.nn.Module, dht: Any, settings: TrainerSettings, device: torch.device):
        super().__init__(dht, settings, device)
        self.model = model.to(device)
        self.forward_backward = ForwardBackward(self.model, device, compile=settings.compile,
                                                micro_batch_size=settings.micro_batch_size)
        fused = not settings.offload_optimizer and device.type == "cuda"
        seeded = [param.detach().clone() for param in self.model.parameters()]
        self.optimizer = GroupRecordingOptimizer(
            dht=dht,
            run_id=settings.run_id,
            target_batch_size=settings.target_batch_size,
            batch_size_per_step=settings.batch_size,
            optimizer=partial(ClippedAdamW, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay,
                              max_grad_norm=settings.grad_clip, fused=True if fused else None,
                              before_step=None if settings.offload_optimizer else self._epoch_gradient_into_model),
            params=self.model.parameters(),
            offload_optimizer=settings.offload_optimizer,
            matchmaking_time=settings.matchmaking_time,
            averaging_timeout=settings.averaging_timeout,
            # hivemind's default waits only matchmaking_time for each chunk of an all-reduce, so a
            # briefly starved peer fails the epoch and drifts out of sync; allow a third of the timeout.
            next_chunk_timeout=max(settings.matchmaking_time, settings.averaging_timeout / 3),
            load_state_timeout=settings.load_state_timeout,
            grad_compression=codec(settings.compression),
            state_averaging_compression=codec(settings.compression),
            use_local_updates=False,
            # no state averaging: members of a gradient all-reduce already hold the same bits (which the
            # state digests vouch for), and a peer that falls out of step reloads the swarm's state instead
            # of mixing its own into everyone's; it also saves a full state all-reduce every epoch
            average_state_every=NEVER,
            # hivemind warns (and risks rare deadlocks) when a request may outlast matchmaking
            averager_opts={"request_timeout": max(0.5, min(3.0, settings.matchmaking_time / 2))},
            verbose=False,
            timing=self.timing,
            guards=settings.guard,
            robust_rule=settings.robust,
            bindings=settings.bindings,  # bound peers' progress only
            state_check=settings.state_digests, accuse=settings.accuse, excluded=settings.excluded,
        )
        self._undo_initial_step(seeded)
        self.optimizer.publish_digest()

    @torch.no_grad()
    def _undo_initial_step(self, seeded: Sequence[torch.Tensor]) -> None:
        for param, value in zip(self.model.parameters(), seeded):
            param.copy_(value)
        self.optimizer.copy_parameters_to_offloaded()
        for state in self.optimizer.opt.state.values():
            step = state.get("step")
            if torch.is_tensor(step):
                step.zero_()
            elif step is not None:
                state["step"] = 0

    @torch.no_grad()
    def _epoch_gradient_into_model(self) -> None:
        """On the device: the epoch's gradient (averaged, or this peer's own mean) into `.grad` before the step.

        After an all-reduce hivemind has copied the average there already; otherwise its averager's
        buffers hold the mean of the accumulated gradients. Before `self.optimizer` exists (hivemind's
        initial zero-gradient step) there is nothing to copy.
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None or (optimizer.last_group is not None and len(optimizer.last_group) > 1):
            return
        averager = optimizer.grad_averager
        with averager.get_tensors() as epoch_gradient:
            for param, grad in zip(averager.parameters, epoch_gradient):
                if param.grad is None:
                    param.grad = grad.to(param.device, copy=True)
                else:
                    param.grad.copy_(grad, non_blocking=True)

    # -- progress -------------------------------------------------------------------------------
    @property
    def local_epoch(self) -> int:
        return self.optimizer.local_epoch

    @property
    def tracker(self) -> Any:
        return self.optimizer.tracker

    # -- training -------------------------------------------------------------------------------
    def _load_state_from_peers(self) -> bool:
        self.optimizer.load_state_from_peers()
        return True

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _train_batch(self, inputs: torch.Tensor) -> StepReport:
        epoch_before = self.local_epoch
        loss, problem = checked(self.forward_backward, inputs, one_sync=self.settings.sync_every > 0)
        if problem:
            return self._skip(problem, epoch_before)
        samples = int(inputs.shape[0])
        self.optimizer.step(batch_size=samples)
        self._zero_grad()
        self.samples_trained += samples
        changed = self.local_epoch != epoch_before
        group = self.optimizer.last_group if changed else None
        return StepReport(loss=loss, samples=samples, skipped=False, epoch=self.local_epoch,
                          epoch_changed=changed, group_size=None if group is None else len(group), group=group)

    # -- the model every peer holds this epoch ----------------------------------------------------
    @torch.no_grad()
    def page_losses(self, pages: Sequence[torch.Tensor]) -> list[float]:
        return page_losses(self.model, pages, self.device)

    def shared_state(self) -> dict[str, torch.Tensor]:
        return cpu_state(self.model)

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "trainer": "swarm",
            "model": cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "local_epoch": self.local_epoch,
            "samples_trained": self.samples_trained,
        }

    def restore(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state["model"])
        self.optimizer.copy_parameters_to_offloaded()
        self.optimizer.load_state_dict(state["optimizer"])
        self.samples_trained = int(state.get("samples_trained", 0))
        self.optimizer.publish_digest()

    def shutdown(self) -> None:
        self.optimizer.shutdown()
