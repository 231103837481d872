"""Gradient-averaging training (`--training.mode swarm`): AdamW inside `hivemind.Optimizer`.

Each peer accumulates gradients on its own batches and reports how many samples it processed;
when the swarm together reaches `target_batch_size`, the peers all-reduce their gradients and
every one applies the same AdamW step, so their parameters stay equal. One global epoch is one
optimizer step.

Rules that keep the shared step honest:
- progress counts the samples actually processed (`opt.step(batch_size=n)`), never a nominal size;
- a non-finite loss or gradient is skipped and counted, never sent to the swarm;
- gradient clipping is applied to the *averaged* gradient, right before the shared AdamW step.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from ..swarm.compression import codec
from ..swarm.hivemind_private import GroupRecordingOptimizer
from .model import loss_and_gradients, page_losses
from .trainer import ClippedAdamW, StepReport, Trainer, TrainerSettings, cpu_state


class GradientAveragingTrainer(Trainer):
    """One peer's side of gradient averaging: local steps, global epochs, state loading."""

    def __init__(self, model: torch.nn.Module, dht: Any, settings: TrainerSettings, device: torch.device):
        super().__init__(dht, settings, device)
        self.model = model.to(device)
        self.optimizer = GroupRecordingOptimizer(
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
            # briefly starved peer fails the epoch and drifts out of sync; allow a third of the timeout.
            next_chunk_timeout=max(settings.matchmaking_time, settings.averaging_timeout / 3),
            load_state_timeout=settings.load_state_timeout,
            grad_compression=codec(settings.compression),
            state_averaging_compression=codec(settings.compression),
            use_local_updates=False,
            # hivemind warns (and risks rare deadlocks) when a request may outlast matchmaking
            averager_opts={"request_timeout": max(0.5, min(3.0, settings.matchmaking_time / 2))},
            verbose=False,
            timing=self.timing,
        )

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
        loss, problem = loss_and_gradients(self.model, inputs, self.device)
        if problem:
            return self._skip(problem, epoch_before)
        samples = int(inputs.shape[0])
        self.optimizer.step(batch_size=samples)
        self._zero_grad()
        self.samples_trained += samples
        changed = self.local_epoch != epoch_before
        group = self.optimizer.last_group if changed else None
        return StepReport(loss=float(loss.item()), samples=samples, skipped=False, epoch=self.local_epoch,
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

    def shutdown(self) -> None:
        self.optimizer.shutdown()
