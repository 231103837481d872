"""One local step's forward and backward on this peer's device, and the checks that keep it honest.

What is whose: the loss kernel and the padded vocabulary change the numbers every peer computes, so
they are the run spec's and live on the model (`loss.py`). How a device gets there is its own:
bf16 autocast on CUDA, `torch.compile` (`--model.compile`, on by default only on CUDA: compiling
takes minutes on a CPU and gains little there), micro-batches (`--neuron.micro_batch_size`: a step
of `batch_size` sequences runs as equal micro-batches whose gradients accumulate, sized to the GPU's
memory by `choose_micro_batch`), and how often the host waits for the device.

Host syncs: every `.item()` or `bool(tensor)` waits for the GPU to drain its queue, so a check per
step costs a bubble per step. `checked` has two strengths: each micro-batch's loss before its
backward and then the gradient norm (the CPU default: a bad batch costs no backward pass), or the loss
and the norm together after the backward, one sync. DiLoCo's inner steps can go further: the fused
AdamW skips a non-finite step on the device (`ClippedAdamW.checked_step`), `StepTally` counts it
there, and the host reads the tally once per window.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import torch

from .loss import kernel_of, next_token_loss

DEFAULT_CUDA_HEADROOM = 0.85  # of the GPU memory free at start that micro-batches may plan to use


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_compile(choice: str, device: torch.device) -> bool:
    """`--model.compile`: on, off, or auto (on exactly on CUDA)."""
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"--model.compile must be auto, on or off, not {choice!r}")
    return device.type == "cuda" if choice == "auto" else choice == "on"


def grad_norm(model: torch.nn.Module) -> Optional[torch.Tensor]:
    """One fused L2 norm of every gradient: finite exactly when each element is (and the norm does not overflow)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


class ForwardBackward:
    """Forward and backward of one batch in the model's loss kernel, in micro-batches; gradients accumulate.

    The micro-batches' losses are weighted by their share of the rows, so the gradient is that of
    the batch's mean loss whatever the micro-batch size.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, *, compile: bool = False,
                 micro_batch_size: int = 0, chunk_rows: int = 0):
        self.model, self.device = model, device
        self.micro_batch_size, self.chunk_rows = micro_batch_size, chunk_rows
        self.runner: Optional[Callable[..., Any]] = None
        if compile:  # a compiled view of the same module: the model, its state dict and its copies stay plain
            self.runner = torch.compile(model if kernel_of(model) == "plain" else model.transformer)

    def __call__(self, inputs: torch.Tensor, check_loss_first: bool = False) -> tuple[Optional[torch.Tensor], Optional[str]]:
        """(mean loss, detached, on the device; None) or, with `check_loss_first`, (None, why) before a bad backward."""
        self.model.train()
        inputs = inputs.to(self.device, non_blocking=True)
        rows = int(inputs.shape[0])
        micro = min(self.micro_batch_size or rows, rows)
        total: Optional[torch.Tensor] = None
        for start in range(0, rows, micro):
            part = inputs[start:start + micro]
            with autocast(self.device):
                loss = next_token_loss(self.model, part, self.runner, self.chunk_rows)
            if check_loss_first and not torch.isfinite(loss):
                return None, f"non-finite loss {loss.item()}"
            share = part.shape[0] / rows
            (loss if share == 1 else loss * share).backward()
            loss = loss.detach().float() * share
            total = loss if total is None else total + loss
        return total, None


def checked(step: ForwardBackward, inputs: torch.Tensor, one_sync: bool) -> tuple[Optional[float], Optional[str]]:
    """Forward and backward; (loss, None), or (None, why) if the loss or a gradient is not finite.

    Checked before anything reaches an optimizer, so a bad batch never touches the swarm; the caller
    drops the gradients of a bad batch.
    """
    if not one_sync:
        loss, problem = step(inputs, check_loss_first=True)
        if problem:
            return None, problem
        norm = grad_norm(step.model)
        if norm is not None and not torch.isfinite(norm):
            return None, "non-finite gradient"
        return float(loss.item()), None
    loss, _ = step(inputs)
    norm = grad_norm(step.model)
    values = torch.stack([loss, loss.new_zeros(()) if norm is None else norm.float()]).tolist()  # the one sync
    if not math.isfinite(values[0]):
        return None, f"non-finite loss {values[0]}"
    if not math.isfinite(values[1]):
        return None, "non-finite gradient"
    return values[0], None


def loss_and_gradients(model: torch.nn.Module, inputs: torch.Tensor,
                       device: torch.device) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """Forward and backward on one batch: (loss, None), or (None, why) if the loss or a gradient is not finite.

    The plain loop's step (benchmarks, references): the whole batch at once, eager, checked on the host.
    """
    step = ForwardBackward(model, device)
    loss, problem = step(inputs, check_loss_first=True)
    if problem:
        return None, problem
    norm = grad_norm(model)
    if norm is not None and not torch.isfinite(norm):
        return None, "non-finite gradient"
    return loss, None


class StepTally:
    """A window of steps counted on the device: finite steps' loss sum and samples, and skipped steps.

    `add` queues a few tiny kernels and never waits; `read` is the window's one host sync.
    """

    def __init__(self) -> None:
        self.steps = 0
        self._sums: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor, skipped: torch.Tensor, rows: int) -> None:
        bad = skipped.float()
        entry = torch.stack([torch.where(bad > 0, torch.zeros_like(loss, dtype=torch.float32), loss.float()),
                             (1 - bad) * rows, bad])
        self._sums = entry if self._sums is None else self._sums + entry
        self.steps += 1

    def read(self) -> tuple[Optional[float], int, int, int]:
        """(mean loss of the finite steps or None, their samples, skipped steps, steps); then empty."""
        steps = self.steps
        if self._sums is None:
            return None, 0, 0, 0
        loss_sum, samples, skipped = self._sums.tolist()
        self.steps, self._sums = 0, None
        good = steps - int(round(skipped))
        return (loss_sum / good if good else None), int(round(samples)), int(round(skipped)), steps


def fit_micro_batch(batch_size: int, per_sequence: float, fixed: float, free: float) -> int:
    """The largest divisor of `batch_size` whose micro-batch fits in `free` bytes (at least 1).

    A divisor, so every micro-batch has the same shape (one compiled graph, equal shares).
    """
    room = max(0.0, free - fixed)
    fits = int(room // per_sequence) if per_sequence > 0 else batch_size
    return max([d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fits] or [1])


def choose_micro_batch(model: torch.nn.Module, device: torch.device, batch_size: int, seq_len: int,
                       requested: int = 0, optimizer_bytes_per_param: int = 8) -> int:
    """Sequences per micro-batch: `requested` if given; on CUDA what fits; elsewhere the whole batch (0).

    On CUDA one eager forward and backward of 1 and of 2 sequences measures the bytes a sequence
    adds and those that stay fixed (gradients, workspaces); the optimizer's state is reserved on
    top. Compiled steps use less memory than eager ones, so the estimate errs on the safe side.
    """
    if requested:
        return min(requested, batch_size)
    if device.type != "cuda":
        return 0
    home = next(model.parameters()).device  # where the model goes back to (a trainer moves or copies it itself)
    model.to(device)
    step = ForwardBackward(model, device)
    free_at_start = torch.cuda.mem_get_info(device)[0]
    peaks = []
    for rows in (1, 2):  # each from no gradients, so both peaks hold the gradients' allocation
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(torch.zeros(rows, seq_len, dtype=torch.long))
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    model.zero_grad(set_to_none=True)
    model.to(home)
    torch.cuda.empty_cache()
    per_sequence = max(1, peaks[1] - peaks[0])
    params = sum(p.numel() for p in model.parameters())
    fixed = peaks[0] - per_sequence + optimizer_bytes_per_param * params
    return fit_micro_batch(batch_size, per_sequence, fixed, DEFAULT_CUDA_HEADROOM * free_at_start)
