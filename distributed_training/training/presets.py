"""GPT-2 model presets.

Every peer of a run must build the very same architecture from the same seed, so sizes live
here, by name, and not in per-peer flags. Dropout is off in every preset: pretraining from
scratch on a stream of fresh pages barely benefits from it, and without it the loss a miner
reports on a page is a deterministic function of the model state, which is what lets a
validator recompute and check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel


@dataclass(frozen=True)
class ModelPreset:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset("tiny", n_layer=2, n_embd=64, n_head=2, seq_len=64),
        ModelPreset("gpt2-124m", n_layer=12, n_embd=768, n_head=12, seq_len=1024),
        ModelPreset("gpt2-250m", n_layer=16, n_embd=1024, n_head=16, seq_len=1024),
        ModelPreset("gpt2-677m", n_layer=26, n_embd=1408, n_head=16, seq_len=1024),
    )
}


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
