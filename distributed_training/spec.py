"""The run spec: everything every peer and validator of one training run must share, in one object.

Two peers that disagree on any of these do not train the same model: different model shapes fail
the all-reduce, a different tokenizer or data digest makes a validator's recomputation disagree
with an honest miner, a different learning rate forks the parameters after one step. So the spec
is one frozen, versioned value with a digest; checkpoints carry it, peers publish it in the DHT,
and a mismatch is reported as one line naming the differing fields.

The registries of names the flags accept (model presets, data sources, compressions, training
modes, loss kernels) live here too, once: `config.py` offers them as choices and the modules that implement
them look them up here. This module imports nothing heavy (no torch, no hivemind).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from types import SimpleNamespace
from typing import Any, Mapping, Optional

from . import PROTOCOL_VERSION

SPEC_VERSION = 1


@dataclass(frozen=True)
class ModelPreset:
    """A GPT-2 architecture by name (the vocabulary comes from the tokenizer)."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    seq_len: int


MODEL_PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset("tiny", n_layer=2, n_embd=64, n_head=2, seq_len=64),
        ModelPreset("gpt2-124m", n_layer=12, n_embd=768, n_head=12, seq_len=1024),
        ModelPreset("gpt2-250m", n_layer=16, n_embd=1024, n_head=16, seq_len=1024),
        ModelPreset("gpt2-677m", n_layer=26, n_embd=1408, n_head=16, seq_len=1024),
    )
}
DATA_SOURCES = ("local", "hf")
COMPRESSIONS = ("none", "fp16", "uint8")
TRAINING_MODES = ("swarm", "diloco")
LOSS_KERNELS = ("plain", "chunked")  # training/loss.py: transformers' `labels=` loss, or chunked over rows
# Fields added after SPEC_VERSION 1, with the value that means "as version 1 did": the canonical form
# leaves a field out while it has that value, so a run that does not use it keeps its digest, and a
# record or checkpoint written before the field existed still reads.
LATER_FIELDS: dict[str, Any] = {"vocab_multiple": 1, "loss_kernel": "plain"}


class SpecMismatch(ValueError):
    """Two run specs differ; the message names the fields, both values, and where the other came from."""


@dataclass(frozen=True)
class RunSpec:
    """What one run's peers share. Hyperparameters of the other training mode are None, so they never differ.

    `vocab_multiple` and `loss_kernel` are the fast path's choices that change shapes or numbers (the
    padded embedding, the chunked cross-entropy); how a device reaches them (torch.compile,
    micro-batches, where the optimizer runs) is each peer's own and not in here.
    """

    run_id: str
    protocol: int
    model_preset: str
    seq_len: int
    init_seed: int
    tokenizer: str  # the tokenizer's digest
    data_source: str
    data: str  # the page source's digest (corpus, tokenizer, page shape, held-out split)
    data_seed: int
    pages_per_round: int
    training_mode: str
    target_batch_size: int
    lr: float
    weight_decay: float
    grad_clip: float
    compression: str
    inner_steps: Optional[int] = None
    outer_lr: Optional[float] = None
    outer_momentum: Optional[float] = None
    vocab_multiple: int = 1  # the embedding is padded to a multiple of this; pad ids are never predicted
    loss_kernel: str = "plain"
    version: int = SPEC_VERSION

    @classmethod
    def from_config(cls, config: SimpleNamespace, *, seq_len: int, tokenizer_digest: str,
                    data_digest: str) -> "RunSpec":
        neuron, training = config.neuron, config.training
        diloco = training.mode == "diloco"
        return cls(
            run_id=neuron.run_id, protocol=PROTOCOL_VERSION, model_preset=config.model.preset, seq_len=seq_len,
            init_seed=neuron.seed, tokenizer=tokenizer_digest, data_source=config.data.source, data=data_digest,
            data_seed=config.data.seed, pages_per_round=neuron.pages_per_round, training_mode=training.mode,
            target_batch_size=neuron.target_batch_size, lr=neuron.lr, weight_decay=neuron.weight_decay,
            grad_clip=neuron.grad_clip, compression=neuron.grad_compression,
            inner_steps=training.inner_steps if diloco else None, outer_lr=training.outer_lr if diloco else None,
            outer_momentum=training.outer_momentum if diloco else None,
            vocab_multiple=config.model.vocab_multiple, loss_kernel=config.model.loss,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSpec":
        """A spec from `as_dict()`; unknown or missing fields are a SpecMismatch (another version wrote it)."""
        names = {f.name for f in fields(cls)}
        optional = {"version", *LATER_FIELDS}
        unknown, missing = set(data) - names, {f.name for f in fields(cls) if f.name not in data and f.name not in optional}
        if unknown or missing:
            raise SpecMismatch(f"run spec of another version (unknown fields {sorted(unknown)}, "
                               f"missing {sorted(missing)})")
        return cls(**dict(data))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name, off in LATER_FIELDS.items():
            if data[name] == off:
                del data[name]
        return data

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of every field: equal digests, equal specs."""
        canonical = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def differences(self, other: "RunSpec") -> list[str]:
        """`field: ours vs theirs` for every field that differs, in declaration order."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{name} {mine[name]!r} here vs {theirs[name]!r}" for name in mine if mine[name] != theirs[name]]

    def check_matches(self, other: "RunSpec", where: str) -> None:
        """Raise SpecMismatch naming the differing fields if `other` (from `where`) is another spec."""
        if other.digest == self.digest:
            return
        raise SpecMismatch(f"the run spec differs from {where}: {'; '.join(self.differences(other))}; "
                           "every peer and validator of a run must use the same flags for these")
