"""The model: building it from a preset and the run spec, the device, and the losses verification reads.

The loss kernels and the padded vocabulary's mask are in `loss.py`; one training step's forward,
backward and checks in `step.py`.

Every peer of a run must build the very same architecture from the same seed, so sizes are named
presets of the run spec (`spec.MODEL_PRESETS`), not per-peer flags. Dropout is off in every
preset: pretraining from scratch on a stream of fresh pages barely benefits from it, and without
it the loss a miner reports on a page is a deterministic function of the model state, which is
what lets a validator recompute and check it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ..spec import MODEL_PRESETS, ModelPreset
from .loss import configure, next_token_loss, padded_vocab
from .step import autocast, loss_and_gradients

__all__ = ["PRESETS", "DeviceError", "autocast", "build_model", "count_parameters", "get_preset",
           "loss_and_gradients", "page_losses", "pick_device"]  # autocast and the checked step live in step.py

PRESETS = MODEL_PRESETS


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_model(preset: ModelPreset, vocab_size: int, seq_len: int | None = None, seed: int = 1337, *,
                vocab_multiple: int = 1, loss_kernel: str = "plain") -> GPT2LMHeadModel:
    """A freshly initialised GPT-2; the same arguments give the same weights everywhere.

    `vocab_size` is the tokenizer's; with `vocab_multiple` > 1 the embedding has rows up to the next
    multiple, whose ids the model never predicts. `vocab_multiple` and `loss_kernel` come from the
    run spec, so every peer and validator of a run builds the same shapes and computes the same loss.
    """
    config = GPT2Config(
        vocab_size=padded_vocab(vocab_size, vocab_multiple),
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
    configure(model, vocab_size, loss_kernel)
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


@torch.no_grad()
def page_losses(model: torch.nn.Module, pages: Sequence[torch.Tensor], device: torch.device,
                weights: Optional[dict[str, torch.Tensor]] = None) -> list[float]:
    """Per-page mean loss in eval mode and float32, so any two machines agree closely.

    The loss is the model's kernel (`loss.next_token_loss`, with its padded vocabulary masked), the
    one training uses: what a miner answers and a validator recomputes is the training loss.
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
                out = next_token_loss(model, page)
            else:
                named = {f"model.{name}": tensor for name, tensor in weights.items()}
                out = torch.func.functional_call(_NextTokenLoss(model), named, args=(page,))
            loss = out.float().item()
            losses.append(loss if math.isfinite(loss) else float("nan"))
        return losses
    finally:
        model.train(was_training)


class _NextTokenLoss(torch.nn.Module):
    """`next_token_loss` as a module, so `functional_call` can run it with other weights."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return next_token_loss(self.model, inputs)
