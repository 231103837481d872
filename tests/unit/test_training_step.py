"""One peer's training step through a real hivemind DHT and hivemind.Optimizer, in this process.

Covers: a normal local step, skipping a batch whose loss or gradient is not finite (nothing of it
may reach the swarm's progress or the next global step), a single-peer global epoch (checked
against a hand-computed AdamW step), ClippedAdamW, and page_losses.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from distributed_training.training.model import build_model, get_preset
from distributed_training.training.gradient_averaging import GradientAveragingTrainer
from distributed_training.training.model import page_losses
from distributed_training.training.trainer import ClippedAdamW, TrainerSettings

VOCAB, SEQ_LEN, BATCH = 512, 16, 4
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-2, 0.1, 1.0
CPU = torch.device("cpu")


def _model() -> torch.nn.Module:
    return build_model(get_preset("tiny"), vocab_size=VOCAB, seq_len=SEQ_LEN)


def _batch(seed: int, rows: int = BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _assert_params_equal(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), f"{name} changed"


def _samples_accumulated(trainer: GradientAveragingTrainer) -> int:
    return trainer.optimizer.tracker.local_progress.samples_accumulated


def _trainer(dht, target_batch_size: int) -> GradientAveragingTrainer:
    settings = TrainerSettings(run_id=f"step-{uuid.uuid4().hex[:8]}", batch_size=BATCH,
                             target_batch_size=target_batch_size, matchmaking_time=1.0, averaging_timeout=10.0,
                             lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP, load_state_timeout=10.0)
    return GradientAveragingTrainer(_model(), dht, settings, CPU)


@pytest.fixture(scope="module")
def trainer(dht):
    """A peer whose target batch is out of reach: no global epoch happens in these tests."""
    peer = _trainer(dht, target_batch_size=100_000)
    try:
        yield peer
    finally:
        peer.shutdown()


# --- local steps without an epoch ---------------------------------------------------------------
def test_normal_batch_counts_its_samples(trainer: GradientAveragingTrainer) -> None:
    samples_before, progress_before = trainer.samples_trained, _samples_accumulated(trainer)
    params = _snapshot(trainer.model)

    report = trainer.train_batch(_batch(1))

    assert not report.skipped
    assert report.loss is not None and torch.isfinite(torch.tensor(report.loss))
    assert 4.0 < report.loss < 9.0  # about ln(512) = 6.2 for a fresh model
    assert report.samples == BATCH
    assert (report.epoch, report.epoch_changed, report.group_size) == (0, False, None)
    assert trainer.samples_trained == samples_before + BATCH
    assert _samples_accumulated(trainer) == progress_before + BATCH
    _assert_params_equal(trainer.model, params)  # gradients accumulate; weights change only at an epoch
    assert all(p.grad is None for p in trainer.model.parameters())


def test_batch_with_nan_loss_is_skipped(trainer: GradientAveragingTrainer) -> None:
    samples_before, progress_before = trainer.samples_trained, _samples_accumulated(trainer)
    skipped_before = trainer.skipped_batches
    params = _snapshot(trainer.model)

    backward_calls = []
    handle = trainer.model.lm_head.register_forward_hook(lambda module, args, output: output * float("nan"))
    grad_handle = trainer.model.transformer.wpe.weight.register_hook(lambda grad: backward_calls.append(1))
    try:
        report = trainer.train_batch(_batch(2))
    finally:
        handle.remove()
        grad_handle.remove()

    assert report.skipped and report.loss is None and report.samples == 0 and not report.epoch_changed
    assert backward_calls == []  # skipped on the loss itself, before any backward pass
    assert trainer.skipped_batches == skipped_before + 1
    assert trainer.samples_trained == samples_before
    assert _samples_accumulated(trainer) == progress_before
    _assert_params_equal(trainer.model, params)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_batch_with_non_finite_gradient_is_skipped(trainer: GradientAveragingTrainer) -> None:
    samples_before, progress_before = trainer.samples_trained, _samples_accumulated(trainer)
    skipped_before = trainer.skipped_batches
    params = _snapshot(trainer.model)

    weight = trainer.model.transformer.h[0].mlp.c_fc.weight
    handle = weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        report = trainer.train_batch(_batch(3))
    finally:
        handle.remove()

    assert report.skipped and report.loss is None and report.samples == 0
    assert trainer.skipped_batches == skipped_before + 1
    assert trainer.samples_trained == samples_before
    assert _samples_accumulated(trainer) == progress_before
    _assert_params_equal(trainer.model, params)
    # the bad gradient is dropped, so the next backward does not add onto it
    assert all(p.grad is None for p in trainer.model.parameters())


def test_page_losses_one_finite_deterministic_value_per_page(trainer: GradientAveragingTrainer) -> None:
    pages = [_batch(10 + i, rows=2) for i in range(3)]
    trainer.model.train()
    first = trainer.page_losses(pages)
    second = trainer.page_losses(pages)

    assert len(first) == len(pages)
    assert all(isinstance(loss, float) and torch.isfinite(torch.tensor(loss)) for loss in first)
    assert first == second
    assert len(set(first)) == len(pages)  # a loss per page, not one value repeated
    assert trainer.model.training  # the mode is restored
    with torch.no_grad():
        trainer.model.eval()
        direct = [trainer.model(input_ids=page, labels=page).loss.item() for page in pages]
        trainer.model.train()
    assert first == pytest.approx(direct, rel=1e-6)
    assert page_losses(trainer.model, pages[:1], CPU) == pytest.approx(first[:1], rel=1e-6)


# --- a global epoch with one peer ----------------------------------------------------------------
def _reference_step(batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What one peer's global step must do: plain ClippedAdamW's first step on the mean gradient of its
    batches (hivemind's initial zero-gradient step is undone when the trainer is built)."""
    model = _model()
    params = list(model.parameters())
    grads = [torch.zeros_like(p) for p in params]
    for inputs in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=inputs, labels=inputs).loss.backward()
        for acc, param in zip(grads, params):
            acc.add_(param.grad)
    for param, acc in zip(params, grads):
        param.grad = acc * (1.0 / len(batches))
    optimizer = ClippedAdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP)
    optimizer.step()
    return _snapshot(model)


def test_single_peer_epoch_applies_the_step_and_ignores_skipped_batches(dht) -> None:
    trainer = _trainer(dht, target_batch_size=2 * BATCH)
    try:
        initial = _snapshot(trainer.model)
        x1, x2 = _batch(21), _batch(22)

        nan_hook = trainer.model.lm_head.register_forward_hook(lambda module, args, output: output * float("nan"))
        try:
            assert trainer.train_batch(_batch(23)).skipped
        finally:
            nan_hook.remove()
        first = trainer.train_batch(x1)
        assert not first.skipped and not first.epoch_changed and trainer.local_epoch == 0
        inf_hook = trainer.model.transformer.h[1].attn.c_attn.weight.register_hook(
            lambda grad: torch.full_like(grad, float("inf")))
        try:
            assert trainer.train_batch(_batch(24)).skipped
        finally:
            inf_hook.remove()
        # had a skipped batch counted, the swarm would already be at the target
        assert trainer.local_epoch == 0 and _samples_accumulated(trainer) == BATCH
        _assert_params_equal(trainer.model, initial)

        second = trainer.train_batch(x2)

        assert not second.skipped and second.epoch_changed and second.epoch == 1
        assert trainer.local_epoch == 1 and trainer.global_epoch >= 1
        assert trainer.samples_trained == 2 * BATCH and trainer.skipped_batches == 2
        assert _samples_accumulated(trainer) == 0  # a new epoch starts from zero
        after = _snapshot(trainer.model)
        changed = max((after[name] - initial[name]).abs().max().item() for name in initial)
        assert changed > LR / 2, "the global step did not move the parameters"
        expected = _reference_step([x1, x2])
        for name, tensor in after.items():
            assert torch.isfinite(tensor).all(), name
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda message, name=name: f"{name}: {message}")
    finally:
        trainer.shutdown()


# --- ClippedAdamW -------------------------------------------------------------------------------
class _RecordingAdamW(torch.optim.AdamW):
    """Sits between ClippedAdamW and AdamW in the MRO and records the gradient norm AdamW receives."""

    seen_norms: list[float]

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.seen_norms = getattr(self, "seen_norms", []) + [torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()]
        return super().step(closure)


class _SpyClippedAdamW(ClippedAdamW, _RecordingAdamW):
    pass


def _params_with_huge_grads() -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=generator)),
              torch.nn.Parameter(torch.randn(7, generator=generator))]
    grads = [torch.randn(5, 3, generator=generator) * 1e4, torch.randn(7, generator=generator) * 1e4]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    return params, grads


def test_clipped_adamw_passes_a_clipped_gradient_to_adamw() -> None:
    params, grads = _params_with_huge_grads()
    raw_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert raw_norm > 1e4
    optimizer = _SpyClippedAdamW(params, lr=0.1, max_grad_norm=1.0)
    optimizer.step()
    assert optimizer.seen_norms == [pytest.approx(1.0, rel=1e-4)]
    # same direction, scaled down
    for param, grad in zip(params, grads):
        torch.testing.assert_close(param.grad, grad * (1.0 / raw_norm), rtol=1e-4, atol=1e-9)


def test_clipped_adamw_update_equals_adamw_on_the_clipped_gradient() -> None:
    # a large eps makes AdamW's step depend on the gradient's size, so clipping is visible in the update
    kwargs = dict(lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, eps=1.0)
    clipped_params, grads = _params_with_huge_grads()
    ClippedAdamW(clipped_params, max_grad_norm=1.0, **kwargs).step()

    reference_params, _ = _params_with_huge_grads()
    raw_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    for param, grad in zip(reference_params, grads):
        param.grad = grad / (raw_norm + 1e-6)  # clip_grad_norm_'s formula
    torch.optim.AdamW(reference_params, **kwargs).step()

    unclipped_params, _ = _params_with_huge_grads()
    torch.optim.AdamW(unclipped_params, **kwargs).step()

    for clipped, reference, unclipped in zip(clipped_params, reference_params, unclipped_params):
        torch.testing.assert_close(clipped, reference, rtol=1e-6, atol=1e-7)
        assert (clipped - unclipped).abs().max() > 1e-3


def test_clipped_adamw_leaves_small_gradients_and_zero_disables() -> None:
    params, grads = _params_with_huge_grads()
    optimizer = _SpyClippedAdamW(params, lr=0.1, max_grad_norm=0.0)
    optimizer.step()
    raw_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])).item()
    assert optimizer.seen_norms == [pytest.approx(raw_norm, rel=1e-5)]

    small = torch.nn.Parameter(torch.zeros(3))
    small.grad = torch.tensor([0.1, -0.2, 0.05])
    optimizer = _SpyClippedAdamW([small], lr=0.1, max_grad_norm=1.0)
    optimizer.step()
    assert optimizer.seen_norms == [pytest.approx(torch.linalg.vector_norm(small.grad).item())]
    torch.testing.assert_close(small.grad, torch.tensor([0.1, -0.2, 0.05]))
