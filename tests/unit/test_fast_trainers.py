"""Both trainers on the fast path's per-device options, one peer in this process, through a real DHT.

DiLoCo with `sync_every` > 1: skips decided on the device by the fused AdamW, read once per window;
the window's report counts exactly the finite steps, and the epoch ends when the finite steps reach
H. Gradient averaging with one host sync per step, and with the optimizer on the device
(`offload_optimizer=False`) against the hand-computed shared step.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from distributed_training.training.diloco import DiLoCoTrainer
from distributed_training.training.gradient_averaging import GradientAveragingTrainer
from distributed_training.training.model import build_model, get_preset
from distributed_training.training.step import ForwardBackward
from distributed_training.training.trainer import ClippedAdamW, DiLoCoSettings, TrainerSettings

VOCAB, SEQ_LEN, BATCH = 500, 16, 4
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-2, 0.1, 1.0
CPU = torch.device("cpu")


def _model() -> torch.nn.Module:
    return build_model(get_preset("tiny"), VOCAB, SEQ_LEN, seed=11, vocab_multiple=64, loss_kernel="chunked")


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _nan_loss(model: torch.nn.Module):
    return model.transformer.ln_f.register_forward_hook(lambda module, args, out: out * float("nan"))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _diloco(dht, **overrides) -> DiLoCoTrainer:
    settings = dict(run_id=f"fast-{uuid.uuid4().hex[:8]}", batch_size=BATCH, target_batch_size=100_000,
                    matchmaking_time=1.0, averaging_timeout=10.0, lr=LR, weight_decay=WEIGHT_DECAY,
                    grad_clip=GRAD_CLIP, load_state_timeout=10.0, inner_steps=4, outer_lr=0.7, outer_momentum=0.9,
                    sync_every=3, micro_batch_size=2)
    settings.update(overrides)
    return DiLoCoTrainer(_model(), dht, DiLoCoSettings(**settings), CPU)


def test_diloco_reads_its_checks_once_per_window_and_counts_only_finite_steps(dht) -> None:
    trainer = _diloco(dht)
    try:
        reference = _model()
        inner = ClippedAdamW(reference.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY,
                             max_grad_norm=GRAD_CLIP, fused=True)
        reports, losses = [], []
        for seed, bad in ((1, False), (2, True), (3, False)):
            hook = _nan_loss(trainer.model) if bad else None
            try:
                reports.append(trainer.train_batch(_batch(seed)))
            finally:
                if hook is not None:
                    hook.remove()
            if not bad:  # the reference takes only the finite steps, with the same kernel and micro-batches
                inner.zero_grad(set_to_none=True)
                loss, _ = ForwardBackward(reference, CPU, micro_batch_size=2)(_batch(seed))
                inner.step()
                losses.append(loss.item())
        first, second, window = reports
        assert first.pending and second.pending and not window.pending
        assert (first.samples, first.loss, first.skipped, second.samples) == (0, None, False, 0)
        assert (window.steps, window.skipped_steps, window.samples, window.skipped) == (3, 1, 2 * BATCH, False)
        assert window.loss == pytest.approx(sum(losses) / 2, rel=1e-5)
        assert trainer.skipped_batches == 1 and trainer.samples_trained == 2 * BATCH
        assert not window.epoch_changed and trainer.local_epoch == 0
        for name, expected in _params(reference).items():
            torch.testing.assert_close(dict(trainer.model.named_parameters())[name].detach(), expected,
                                       rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        assert all(p.grad is None for p in trainer.model.parameters())

        # H = 4 finite steps end the epoch: the 2 read so far and 2 more (the skipped one does not count)
        fourth = trainer.train_batch(_batch(4))
        assert fourth.pending and trainer.local_epoch == 0
        fifth = trainer.train_batch(_batch(5))  # the window closes early: the finite steps may reach H
        assert not fifth.pending and fifth.steps == 2 and fifth.samples == 2 * BATCH
        assert fifth.epoch_changed and fifth.epoch == 1 and fifth.group_size == 1
        assert trainer.samples_trained == 4 * BATCH

        # a window with no finite step is reported skipped and changes nothing
        before = _params(trainer.model)
        hook = _nan_loss(trainer.model)
        try:
            windows = [trainer.train_batch(_batch(10 + i)) for i in range(3)]
        finally:
            hook.remove()
        assert [w.pending for w in windows] == [True, True, False]
        assert windows[-1].skipped and windows[-1].samples == 0 and windows[-1].skipped_steps == 3
        assert trainer.skipped_batches == 4 and trainer.samples_trained == 4 * BATCH
        assert all(torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    finally:
        trainer.shutdown()


def test_diloco_state_counts_the_steps_still_on_the_device(dht) -> None:
    trainer = _diloco(dht, sync_every=10, inner_steps=0)
    try:
        assert trainer.train_batch(_batch(1)).pending
        assert trainer.state()["samples_trained"] == BATCH  # a checkpoint never loses the window's samples
        assert trainer.train_batch(_batch(2)).pending  # a new window
    finally:
        trainer.shutdown()


def _swarm(dht, target_batch_size: int, **overrides) -> GradientAveragingTrainer:
    settings = dict(run_id=f"fast-{uuid.uuid4().hex[:8]}", batch_size=BATCH, target_batch_size=target_batch_size,
                    matchmaking_time=1.0, averaging_timeout=10.0, lr=LR, weight_decay=WEIGHT_DECAY,
                    grad_clip=GRAD_CLIP, load_state_timeout=10.0, sync_every=1, micro_batch_size=2)
    settings.update(overrides)
    return GradientAveragingTrainer(_model(), dht, TrainerSettings(**settings), CPU)


@pytest.mark.parametrize("offload", [True, False])
def test_swarm_step_with_one_sync_skips_bad_batches_and_takes_the_shared_step(dht, offload) -> None:
    """One peer's epoch of two finite batches (a NaN batch between them is skipped before the swarm sees it).

    The reference is plain ClippedAdamW's first step on the mean gradient: hivemind's initial
    zero-gradient step (weights decayed once, step count 1) is undone at construction, on the host
    copy (offload) as on the device.
    """
    trainer = _swarm(dht, target_batch_size=2 * BATCH, offload_optimizer=offload)
    try:
        reference = _model()
        params = list(reference.parameters())
        optimizer = ClippedAdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP)
        for name, param in trainer.model.named_parameters():  # the seeded weights, bit for bit
            assert torch.equal(param.detach(), dict(reference.named_parameters())[name].detach()), name
        inner = trainer.optimizer.state_averager.optimizer
        assert all(float(state["step"]) == 0 for state in inner.state.values())
        first = trainer.train_batch(_batch(1))
        hook = _nan_loss(trainer.model)
        try:
            bad = trainer.train_batch(_batch(2))
        finally:
            hook.remove()
        assert not first.skipped and not first.epoch_changed
        assert bad.skipped and bad.samples == 0 and trainer.skipped_batches == 1
        assert trainer.optimizer.tracker.local_progress.samples_accumulated == BATCH
        second = trainer.train_batch(_batch(3))
        assert second.epoch_changed and trainer.local_epoch == 1

        grads = [torch.zeros_like(p) for p in params]
        for seed in (1, 3):
            reference.zero_grad(set_to_none=True)
            ForwardBackward(reference, CPU, micro_batch_size=2)(_batch(seed))
            for acc, param in zip(grads, params):
                acc.add_(param.grad)
        for param, acc in zip(params, grads):
            param.grad = acc / 2
        optimizer.step()
        for name, expected in _params(reference).items():
            torch.testing.assert_close(dict(trainer.model.named_parameters())[name].detach(), expected,
                                       rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        trainer.shutdown()
