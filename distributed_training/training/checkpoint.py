"""Atomic local checkpoints.

A miner killed mid-write must never lose its last good checkpoint, so `torch.save` goes through
`files.atomic_write` (a temporary file beside the old one, fsynced, then renamed over it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..files import atomic_write, os_error_in, write_failure
from ..spec import RunSpec, SpecMismatch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
# checkpoint field -> run-spec field, for checkpoints saved before they carried the whole spec
LEGACY_FIELDS = {"run_id": "run_id", "preset": "model_preset", "seq_len": "seq_len", "tokenizer": "tokenizer"}


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says why and what to do."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, no permission); the last good one is kept."""


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Save `state` (model/optimizer state dicts, epoch, identity of the run) atomically."""
    path = Path(directory) / CHECKPOINT_NAME
    try:
        return atomic_write(path, lambda handle: torch.save({"format": FORMAT_VERSION, **state}, handle))
    except Exception as exc:
        if os_error_in(exc) is None:
            raise
        raise CheckpointWriteError(write_failure(path, exc)) from None


def load_checkpoint(directory: Path, expect: Optional[dict[str, Any]] = None,
                    spec: Optional[RunSpec] = None) -> Optional[dict[str, Any]]:
    """Load the checkpoint in `directory`, or None if there is none.

    `spec` is the run spec the checkpoint must have been saved under (its "spec" field), and
    `expect` any further fields that must match, so a miner never resumes another run's weights
    after an operator changes flags; a mismatch names the differing fields.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is unreadable ({type(exc).__name__}); move it aside to start fresh") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint; move it aside to start fresh")
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {state.get('format')}, expected {FORMAT_VERSION}; move it aside")
    if spec is not None and "spec" not in state and LEGACY_FIELDS.keys() <= state.keys():
        # saved by a release before run specs: its identity fields are what it can be checked on
        expect = {**{key: getattr(spec, field) for key, field in LEGACY_FIELDS.items()}, **(expect or {})}
    elif spec is not None:
        try:
            spec.check_matches(RunSpec.from_dict(state.get("spec") or {}), f"the checkpoint {path}")
        except SpecMismatch as exc:
            raise CheckpointError(f"{exc}; point --neuron.state_dir elsewhere or move the checkpoint aside") from None
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise CheckpointError(
                f"{path} belongs to {key}={state.get(key)!r}, this run has {key}={value!r}; "
                "point --neuron.state_dir elsewhere or move the checkpoint aside"
            )
    return state
