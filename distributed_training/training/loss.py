"""The next-token loss, in the run spec's kernel, and the padded vocabulary's mask.

Two kernels (`spec.LOSS_KERNELS`), which every peer of a run shares because they round differently:
- `plain`: transformers' own `labels=` loss, on the full logits of the batch upcast to fp32;
- `chunked`: the transformer body, then the LM head and the cross-entropy over chunks of rows. For
  GPT-2 at 8 x 1024 tokens the full logits are 412 M values, 1.65 GB in fp32 and as much again for
  their gradient; here at most one chunk's logits exist at a time. Each chunk's gradient is computed
  in the forward pass (softmax minus one-hot is all the backward needs), so the LM head costs the same
  three matmuls as in the plain kernel and nothing is recomputed; the backward pass only scales the
  two gradients saved. Both give the mean over every next-token prediction of the batch.

The padded vocabulary: a matmul whose sizes are multiples of 64 runs on the tensor cores' full tiles,
and GPT-2's 50,257 ids are not (50,304 = 786 x 64 are). The tokenizer never emits a pad id, so none is
a target, and no pad id may ever be predicted: `MaskedLMHead` sets their logits to -inf, so the softmax
gives them probability exactly 0 and no gradient reaches their rows through the head, in either kernel
and in anything that reads the model's logits (generation, argmax).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..spec import LOSS_KERNELS

CHUNK_LOGITS = 1 << 25  # logits per chunk (128 MiB in fp32): 667 rows of GPT-2's padded 50,304


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """The embedding's rows: `vocab_size` rounded up to a multiple of `multiple`."""
    if vocab_size < 1 or multiple < 1:
        raise ValueError("vocab_size and multiple must be positive")
    return -(-vocab_size // multiple) * multiple


class MaskedLMHead(nn.Linear):
    """The tied LM head of a padded vocabulary: the logits of ids >= `vocab_size` are -inf.

    It keeps the model's `lm_head.weight` Parameter (tied to the token embedding) and its state-dict
    name, so checkpoints and the all-reduce see the same tensors as an `nn.Linear` head.
    """

    def __init__(self, weight: nn.Parameter, vocab_size: int):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", None)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(hidden, self.weight)
        logits[..., self.vocab_size:] = float("-inf")  # linear's backward does not need its output
        return logits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, predicts ids < {self.vocab_size}"


def configure(model: nn.Module, vocab_size: int, loss_kernel: str) -> None:
    """Record the tokenizer's vocabulary and the loss kernel on `model`, and mask its pad logits.

    Kept on the model's config, so every copy of the model (DiLoCo's θ_global, the epoch snapshots
    miners answer from and validators recompute with) computes the loss the same way.
    """
    if loss_kernel not in LOSS_KERNELS:
        raise ValueError(f"unknown loss kernel {loss_kernel!r}; choose one of {', '.join(LOSS_KERNELS)}")
    model.config.tokenizer_vocab_size = vocab_size
    model.config.loss_kernel = loss_kernel
    if model.config.vocab_size > vocab_size:
        model.lm_head = MaskedLMHead(model.transformer.wte.weight, vocab_size)


def tokenizer_vocab(model: nn.Module) -> int:
    """The ids the model may predict (the embedding may have more rows: padding)."""
    return int(getattr(model.config, "tokenizer_vocab_size", model.config.vocab_size))


def kernel_of(model: nn.Module) -> str:
    return getattr(model.config, "loss_kernel", "plain")


def next_token_loss(model: nn.Module, inputs: torch.Tensor, runner: Optional[Callable[..., Any]] = None,
                    chunk_rows: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of `inputs` [batch, seq] under the model's kernel.

    `runner` stands in for the part the kernel calls, e.g. a compiled copy: the whole model for
    `plain`, `model.transformer` for `chunked`. `chunk_rows` 0 sizes chunks by `CHUNK_LOGITS`.
    """
    if kernel_of(model) == "plain":
        return (model if runner is None else runner)(input_ids=inputs, labels=inputs).loss
    hidden = (model.transformer if runner is None else runner)(input_ids=inputs).last_hidden_state
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return chunked_cross_entropy(rows, model.lm_head.weight, inputs[:, 1:].reshape(-1), tokenizer_vocab(model),
                                 chunk_rows)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          chunk_rows: int = 0) -> torch.Tensor:
    """mean_i CE(hidden_i @ weight.T, targets_i) over logits < `vocab_size`, one chunk of rows at a time.

    Under autocast the matmuls run in the autocast dtype, as `nn.Linear` would, and the softmax in fp32.
    """
    chunk_rows = chunk_rows or max(1, CHUNK_LOGITS // weight.shape[0])
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_rows, dtype)
    with torch.autocast(device_type, enabled=False):
        return _chunks(hidden, weight, targets, vocab_size, chunk_rows, dtype, False, False)[0]


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk_rows: int,
            dtype: torch.dtype, grad_hidden: bool, grad_weight: bool):
    """(mean loss, d loss / d hidden or None, d loss / d weight in fp32 or wider, or None)."""
    rows = hidden.shape[0]
    w = weight.to(dtype)
    wide = torch.promote_types(dtype, torch.float32)  # the softmax's and the sums' precision: fp32 at least
    total = torch.zeros((), dtype=wide, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if grad_weight else None
    for start in range(0, rows, chunk_rows):
        h = hidden[start:start + chunk_rows].to(dtype)
        t = targets[start:start + chunk_rows]
        logits = (h @ w.t()).to(wide)
        if vocab_size < logits.shape[1]:
            logits[:, vocab_size:] = float("-inf")
        lse = torch.logsumexp(logits, dim=1)
        total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if grad_hidden or grad_weight:
            probs = logits.sub_(lse[:, None]).exp_()  # the softmax, in place of the logits
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            g = probs.mul_(1.0 / rows).to(dtype)
            if grad_hidden:
                d_hidden[start:start + chunk_rows] = g @ w
            if grad_weight:
                d_weight += (g.t() @ h).to(wide)
    return total / rows, d_hidden, d_weight


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size, chunk_rows, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            loss, d_hidden, d_weight = _chunks(hidden, weight, targets, vocab_size, chunk_rows, dtype,
                                               ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(d_hidden, d_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        d_hidden, d_weight = ctx.saved_tensors
        grad_hidden = None if d_hidden is None else d_hidden * grad_loss.to(d_hidden.dtype)
        grad_weight = None if d_weight is None else (d_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None
