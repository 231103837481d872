"""The fast path of the step on `tiny`: the chunked loss, the padded vocabulary, micro-batches, the checks.

Tolerances (fp32 on the CPU; the two paths sum the same terms in another order):
- loss: relative 1e-6; gradient norm: relative 1e-5; each gradient element: 1e-6 + 1e-4 relative;
- under bf16 autocast (the matmuls in bf16 in both paths): loss relative 1e-3, gradient norm 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch

from distributed_training.training.loss import MaskedLMHead, chunked_cross_entropy, padded_vocab
from distributed_training.training.model import build_model, get_preset, page_losses
from distributed_training.training.snapshots import ModelSnapshots
from distributed_training.training.step import (
    ForwardBackward, StepTally, checked, fit_micro_batch, grad_norm, resolve_compile)
from distributed_training.training.trainer import ClippedAdamW

VOCAB, SEQ_LEN, BATCH = 500, 16, 8  # 500 ids pad to 512 with a multiple of 64
CPU = torch.device("cpu")
LOSS_RTOL, NORM_RTOL, GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-5, 1e-6, 1e-4
BF16_LOSS_RTOL, BF16_NORM_RTOL = 1e-3, 1e-2


def _batch(seed: int, rows: int = BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A plain model and a fast one (padded, chunked) with the same weights; the pad rows are large and random."""
    plain = build_model(get_preset("tiny"), VOCAB, SEQ_LEN, seed=3)
    fast = build_model(get_preset("tiny"), VOCAB, SEQ_LEN, seed=3, vocab_multiple=64, loss_kernel="chunked")
    assert fast.config.vocab_size == 512 and isinstance(fast.lm_head, MaskedLMHead)
    assert fast.lm_head.weight is fast.transformer.wte.weight  # still tied
    source = plain.state_dict()
    with torch.no_grad():
        for name, tensor in fast.state_dict().items():
            if tensor.shape == source[name].shape:
                tensor.copy_(source[name])
            else:  # the embedding: the plain rows, then pad rows that would matter if anything read them
                rows = source[name].shape[0]
                tensor[:rows].copy_(source[name])
                tensor[rows:].normal_(0.0, 5.0, generator=torch.Generator().manual_seed(9))
    return plain, fast


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def _step(model: torch.nn.Module, inputs: torch.Tensor, **options) -> tuple[float, float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, problem = checked(ForwardBackward(model, CPU, **options), inputs, one_sync=True)
    assert problem is None
    return loss, grad_norm(model).item(), _grads(model)


def _assert_same_step(plain, fast, loss_rtol=LOSS_RTOL, norm_rtol=NORM_RTOL, elements=True) -> None:
    (plain_loss, plain_norm, plain_grads), (fast_loss, fast_norm, fast_grads) = plain, fast
    assert fast_loss == pytest.approx(plain_loss, rel=loss_rtol)
    assert fast_norm == pytest.approx(plain_norm, rel=norm_rtol)
    for name, grad in plain_grads.items():
        mine = fast_grads[name]
        if mine.shape != grad.shape:  # the embedding: its pad rows get no gradient at all
            assert torch.count_nonzero(mine[grad.shape[0]:]) == 0, name
            mine = mine[:grad.shape[0]]
        if elements:
            torch.testing.assert_close(mine, grad, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m, n=name: f"{n}: {m}")


# --- the fast path against the plain path ----------------------------------------------------------
@pytest.mark.parametrize("options", [dict(), dict(chunk_rows=7), dict(micro_batch_size=2, chunk_rows=37),
                                     dict(micro_batch_size=1)])
def test_fast_path_gives_the_plain_loss_and_gradient(options) -> None:
    plain, fast = _pair()
    x = _batch(1)
    _assert_same_step(_step(plain, x), _step(fast, x, **options))


def test_fast_path_under_bf16_autocast_stays_within_its_tolerance() -> None:
    plain, fast = _pair()
    x = _batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_step, fast_step = _step(plain, x), _step(fast, x, chunk_rows=37)
    _assert_same_step(plain_step, fast_step, BF16_LOSS_RTOL, BF16_NORM_RTOL, elements=False)


def test_chunked_cross_entropy_is_transformers_labels_loss_without_padding() -> None:
    plain = build_model(get_preset("tiny"), VOCAB, SEQ_LEN, seed=4)
    chunked = build_model(get_preset("tiny"), VOCAB, SEQ_LEN, seed=4, loss_kernel="chunked")
    assert isinstance(chunked.lm_head, torch.nn.Linear) and not isinstance(chunked.lm_head, MaskedLMHead)
    x = _batch(3)
    _assert_same_step(_step(plain, x), _step(chunked, x, chunk_rows=5))  # 8·15 rows in 24 chunks


def test_chunked_cross_entropy_gradients_pass_gradcheck_in_float64() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(16, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 13, (23,), generator=generator)
    torch.autograd.gradcheck(lambda h, w: chunked_cross_entropy(h, w, targets, 13, chunk_rows=4), (hidden, weight))
    reference = torch.nn.functional.cross_entropy((hidden @ weight.t())[:, :13], targets)
    assert chunked_cross_entropy(hidden, weight, targets, 13, chunk_rows=4).item() == pytest.approx(
        reference.item(), rel=1e-12)


# --- the padded vocabulary -------------------------------------------------------------------------
def test_a_padded_vocabulary_never_predicts_a_pad_id() -> None:
    _, fast = _pair()
    fast.eval()
    x = _batch(5)
    with torch.no_grad():
        # make pad rows win almost every argmax if they were not masked: the mask, not luck, keeps them out
        hidden = fast.transformer(input_ids=x).last_hidden_state
        fast.transformer.wte.weight[VOCAB:] = hidden.reshape(-1, hidden.shape[-1]).mean(0) * 1e3
        raw = torch.nn.functional.linear(hidden, fast.lm_head.weight)
        assert (raw.argmax(-1) >= VOCAB).float().mean() > 0.9
        logits = fast(input_ids=x).logits
        assert torch.isneginf(logits[..., VOCAB:]).all()
        assert (logits.argmax(-1) < VOCAB).all()
        assert torch.softmax(logits, -1)[..., VOCAB:].max().item() == 0.0
        greedy = fast.generate(x[:2, :4], max_new_tokens=8, do_sample=False, pad_token_id=VOCAB - 1)
        sampled = fast.generate(x[:2, :4], max_new_tokens=8, do_sample=True, top_k=0, pad_token_id=VOCAB - 1)
    assert greedy.max().item() < VOCAB and sampled.max().item() < VOCAB


def test_pad_rows_change_neither_loss_nor_gradient_in_either_kernel() -> None:
    x = _batch(6)
    for kernel in ("plain", "chunked"):
        model = build_model(get_preset("tiny"), VOCAB, SEQ_LEN, seed=5, vocab_multiple=64, loss_kernel=kernel)
        first = _step(model, x)
        with torch.no_grad():
            model.transformer.wte.weight[VOCAB:].normal_(0.0, 100.0)
        second = _step(model, x)
        assert first[0] == second[0] and first[1] == second[1], kernel
        assert torch.count_nonzero(second[2]["transformer.wte.weight"][VOCAB:]) == 0, kernel


def test_padded_vocab_rounds_up() -> None:
    assert padded_vocab(50257, 64) == 50304 and padded_vocab(50304, 64) == 50304
    assert padded_vocab(500, 1) == 500 and padded_vocab(1, 64) == 64
    with pytest.raises(ValueError):
        padded_vocab(500, 0)


# --- verification reads the same loss ---------------------------------------------------------------
def test_page_losses_and_snapshots_use_the_run_kernel() -> None:
    plain, fast = _pair()
    pages = [_batch(20 + i, rows=4) for i in range(3)]
    expected = page_losses(plain, pages, CPU)
    assert page_losses(fast, pages, CPU) == pytest.approx(expected, rel=LOSS_RTOL)
    weights = dict(fast.named_parameters()) | dict(fast.named_buffers())
    other = build_model(get_preset("tiny"), VOCAB, SEQ_LEN, seed=99, vocab_multiple=64, loss_kernel="chunked")
    assert page_losses(other, pages, CPU, weights=weights) == pytest.approx(expected, rel=LOSS_RTOL)
    snapshots = ModelSnapshots(fast, keep=1)  # what miners answer from and validators recompute with
    snapshots.add(0, {name: tensor.clone() for name, tensor in fast.state_dict().items()})
    assert snapshots.losses_at(0, pages) == pytest.approx(expected, rel=LOSS_RTOL)


# --- micro-batches and the device-side checks --------------------------------------------------------
def test_checked_with_one_sync_reports_non_finite_loss_and_gradient() -> None:
    _, fast = _pair()
    step = ForwardBackward(fast, CPU, micro_batch_size=4)
    handle = fast.transformer.ln_f.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        assert checked(step, _batch(7), one_sync=True) == (None, "non-finite loss nan")
    finally:
        handle.remove()
    fast.zero_grad(set_to_none=True)
    handle = fast.transformer.h[0].mlp.c_fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        assert checked(step, _batch(7), one_sync=True) == (None, "non-finite gradient")
    finally:
        handle.remove()


def _adamw_pair() -> tuple[list[torch.nn.Parameter], ClippedAdamW]:
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(1))),
              torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(2)))]
    return params, ClippedAdamW(params, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0, fused=True)


def test_checked_step_skips_a_non_finite_step_on_the_device_and_takes_a_finite_one() -> None:
    params, optimizer = _adamw_pair()
    before = [p.detach().clone() for p in params]
    for loss, grad_value in ((float("nan"), 1.0), (1.0, float("inf"))):
        for p in params:
            p.grad = torch.full_like(p, grad_value)
        skipped = optimizer.checked_step(torch.tensor(loss))
        assert skipped.item() == 1.0
        for p, old in zip(params, before):
            assert torch.equal(p.detach(), old)
            assert optimizer.state[p]["step"].item() == 0 and torch.count_nonzero(optimizer.state[p]["exp_avg"]) == 0

    reference = [torch.nn.Parameter(b.clone()) for b in before]
    unfused = ClippedAdamW(reference, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0)
    for p, r in zip(params, reference):
        p.grad = torch.full_like(p, 3.0)
        r.grad = torch.full_like(r, 3.0)
    assert optimizer.checked_step(torch.tensor(2.0)).item() == 0.0
    unfused.step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
        assert optimizer.state[p]["step"].item() == 1


def test_checked_step_needs_fused_and_a_loaded_state_keeps_the_kernel() -> None:
    params, fused = _adamw_pair()
    plain = ClippedAdamW(params, lr=0.1)
    with pytest.raises(RuntimeError, match="fused"):
        plain.checked_step(torch.tensor(1.0))
    for p in params:
        p.grad = torch.ones_like(p)
    plain.step()
    fused.load_state_dict(plain.state_dict())  # a checkpoint of an unfused optimizer
    assert all(group["fused"] for group in fused.param_groups)
    assert fused.checked_step(torch.tensor(1.0)).item() == 0.0
    assert fused.state[params[0]]["step"].item() == 2


def test_step_tally_reads_a_window_once() -> None:
    tally = StepTally()
    tally.add(torch.tensor(2.0), torch.tensor(0.0), rows=4)
    tally.add(torch.tensor(float("nan")), torch.tensor(1.0), rows=4)
    tally.add(torch.tensor(4.0), torch.tensor(0.0), rows=2)
    assert tally.read() == (3.0, 6, 1, 3)
    assert tally.read() == (None, 0, 0, 0)
    tally.add(torch.tensor(float("inf")), torch.tensor(1.0), rows=4)
    loss, samples, skipped, steps = tally.read()
    assert loss is None and (samples, skipped, steps) == (0, 1, 1) and not math.isnan(samples)


def test_micro_batch_fits_the_memory_and_divides_the_batch() -> None:
    gib = float(1 << 30)
    assert fit_micro_batch(64, per_sequence=1 * gib, fixed=2 * gib, free=40 * gib) == 32  # 38 fit, 32 divides 64
    assert fit_micro_batch(64, per_sequence=0.5 * gib, fixed=2 * gib, free=70 * gib) == 64
    assert fit_micro_batch(12, per_sequence=1 * gib, fixed=0, free=5.5 * gib) == 4
    assert fit_micro_batch(8, per_sequence=10 * gib, fixed=2 * gib, free=4 * gib) == 1  # nothing fits: one at a time


def test_compile_flag_is_on_by_default_only_on_cuda() -> None:
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", CPU)
    assert resolve_compile("on", CPU) and not resolve_compile("off", torch.device("cuda"))
    with pytest.raises(ValueError):
        resolve_compile("yes", CPU)
