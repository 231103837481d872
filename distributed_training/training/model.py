"""Everything about the model: building it from a preset, the device, the loss, the checked backward.

Every peer of a run must build the very same architecture from the same seed, so sizes are named
presets of the run spec (`spec.MODEL_PRESETS`), not per-peer flags. Dropout is off in every
preset: pretraining from scratch on a stream of fresh pages barely benefits from it, and without
it the loss a miner reports on a page is a deterministic function of the model state, which is
what lets a validator recompute and check it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ..spec import MODEL_PRESETS, ModelPreset

PRESETS = MODEL_PRESETS


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_model(preset: ModelPreset, vocab_size: int, seq_len: int | None = None, seed: int = 1337) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2; the same (preset, vocab, seq_len, seed) gives the same weights everywhere."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len or preset.seq_len,
        n_embd=preset.n_embd,
        n_layer=preset.n_layer,
        n_head=preset.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # transformers warns on every forward when this is unset
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (the tied embedding and LM head count once)."""
    return sum(param.numel() for param in {id(p): p for p in model.parameters()}.values())


class DeviceError(RuntimeError):
    """The requested torch device is not there; the operator picks another or fixes the driver."""


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--neuron.device {requested}: no CUDA device is visible; use cpu or fix the driver")
    return torch.device(requested)


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
def page_losses(model: torch.nn.Module, pages: Sequence[torch.Tensor], device: torch.device,
                weights: Optional[dict[str, torch.Tensor]] = None) -> list[float]:
    """Per-page mean loss in eval mode and float32, so any two machines agree closely.

    With `weights` (parameters and buffers by name, on `device`), `model`'s module runs with those
    instead of its own, which stay untouched (DiLoCo evaluates θ_global through the local model).
    """
    was_training = model.training
    model.eval()
    try:
        losses = []
        for page in pages:
            page = page.to(device)
            if weights is None:
                out = model(input_ids=page, labels=page)
            else:
                out = torch.func.functional_call(model, weights, args=(), kwargs=dict(input_ids=page, labels=page))
            loss = out.loss.float().item()
            losses.append(loss if math.isfinite(loss) else float("nan"))
        return losses
    finally:
        model.train(was_training)
