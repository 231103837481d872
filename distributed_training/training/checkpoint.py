"""Atomic local checkpoints.

A miner killed mid-write must never lose its last good checkpoint: torch.save goes to a
temporary file in the same directory, which is fsynced and renamed over the old one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says why and what to do."""


def save_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Save `state` (model/optimizer state dicts, epoch, identity of the run) atomically."""
    path = Path(directory) / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"format": FORMAT_VERSION, **state}, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(directory: Path, expect: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
    """Load the checkpoint in `directory`, or None if there is none.

    `expect` holds identity fields (run id, preset, tokenizer digest...) that must match, so a
    miner never resumes a different run's weights after an operator changes flags.
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
    for key, value in (expect or {}).items():
        if state.get(key) != value:
            raise CheckpointError(
                f"{path} belongs to {key}={state.get(key)!r}, this run has {key}={value!r}; "
                "point --neuron.state_dir elsewhere or move the checkpoint aside"
            )
    return state
