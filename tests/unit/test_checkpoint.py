"""Checkpoints and atomic writes: a failed or interrupted save never loses the last good file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from distributed_training import files
from distributed_training.files import atomic_write_bytes
from distributed_training.training import checkpoint
from distributed_training.training.checkpoint import (
    CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint,
)

IDENTITY = {"run_id": "run-a", "preset": "tiny", "tokenizer": "abc123"}


def _state(seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        **IDENTITY,
        "model": {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(3, generator=generator)},
        "optimizer": {"step": seed},
        "local_epoch": seed,
    }


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def _assert_state_equal(loaded: dict, expected: dict) -> None:
    assert loaded["local_epoch"] == expected["local_epoch"]
    assert loaded["optimizer"] == expected["optimizer"]
    for name, tensor in expected["model"].items():
        assert torch.equal(loaded["model"][name], tensor)


def test_round_trip_with_matching_identity(tmp_path: Path) -> None:
    state = _state(3)
    path = save_checkpoint(tmp_path / "nested" / "dir", state)
    assert path == tmp_path / "nested" / "dir" / CHECKPOINT_NAME
    loaded = load_checkpoint(tmp_path / "nested" / "dir", expect=IDENTITY)
    assert loaded["format"] == FORMAT_VERSION
    _assert_state_equal(loaded, state)
    assert _names(path.parent) == [CHECKPOINT_NAME]


def test_second_save_replaces_the_first(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1))
    save_checkpoint(tmp_path, _state(2))
    _assert_state_equal(load_checkpoint(tmp_path), _state(2))
    assert _names(tmp_path) == [CHECKPOINT_NAME]


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path / "does-not-exist", expect=IDENTITY) is None


@pytest.mark.parametrize("field", sorted(IDENTITY))
def test_identity_mismatch_names_the_field(tmp_path: Path, field: str) -> None:
    save_checkpoint(tmp_path, _state(1))
    expect = {**IDENTITY, field: "something-else"}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, expect=expect)
    message = str(info.value)
    assert f"{field}={IDENTITY[field]!r}" in message and f"{field}='something-else'" in message, message
    assert "--neuron.state_dir" in message


def test_identity_field_absent_from_checkpoint_is_a_mismatch(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"model": {}})
    with pytest.raises(CheckpointError, match=r"run_id=None, this run has run_id='run-a'"):
        load_checkpoint(tmp_path, expect={"run_id": "run-a"})


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda good: b"this is not a torch file", id="garbage"),
        pytest.param(lambda good: good[: len(good) // 2], id="truncated"),
        pytest.param(lambda good: b"", id="empty"),
    ],
)
def test_corrupt_file_raises_checkpoint_error(tmp_path: Path, corrupt) -> None:
    path = save_checkpoint(tmp_path, _state(1))
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match="unreadable.*move it aside"):
        load_checkpoint(tmp_path, expect=IDENTITY)


def test_wrong_format_version_raises_checkpoint_error(tmp_path: Path) -> None:
    torch.save({"format": FORMAT_VERSION + 1, **_state(1)}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1}, expected {FORMAT_VERSION}"):
        load_checkpoint(tmp_path)


def test_non_dict_torch_file_raises_checkpoint_error(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("exception", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path: Path, monkeypatch, exception) -> None:
    save_checkpoint(tmp_path, _state(1))
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    real_save = torch.save
    written: list[str] = []

    def partial_save(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)
        target.flush()  # a half-written file, then the failure
        target.truncate(os.path.getsize(target.name) // 2)
        written.append(str(target.name))
        raise exception

    monkeypatch.setattr(checkpoint.torch, "save", partial_save)
    with pytest.raises(type(exception)):
        save_checkpoint(tmp_path, _state(2))
    monkeypatch.undo()

    assert written and Path(written[0]).parent == tmp_path  # the fault happened while writing a temp file
    assert Path(written[0]).name != CHECKPOINT_NAME
    assert _names(tmp_path) == [CHECKPOINT_NAME]
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    _assert_state_equal(load_checkpoint(tmp_path, expect=IDENTITY), _state(1))


def test_failed_rename_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, _state(1))

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(CheckpointWriteError, match="rename failed"):  # an OSError: one line, not a traceback
        save_checkpoint(tmp_path, _state(2))
    monkeypatch.undo()
    assert _names(tmp_path) == [CHECKPOINT_NAME]
    _assert_state_equal(load_checkpoint(tmp_path), _state(1))


def test_full_disk_is_one_line_naming_the_path_and_the_free_space(tmp_path: Path, monkeypatch) -> None:
    save_checkpoint(tmp_path, _state(1))
    real_save = torch.save

    def full_disk(obj, target, *args, **kwargs):  # what torch raises when the disk fills mid-write
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10624 vs 10518")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, _state(2))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    message = str(info.value)
    assert str(tmp_path / CHECKPOINT_NAME) in message and "No space left on device" in message
    assert "MB free there" in message and "\n" not in message
    assert _names(tmp_path) == [CHECKPOINT_NAME]
    _assert_state_equal(load_checkpoint(tmp_path), _state(1))


def test_stale_temp_files_of_an_interrupted_write_are_removed(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _state(1))
    (tmp_path / f".{CHECKPOINT_NAME}.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".scores.json.x9.tmp").write_bytes(b"{")
    (tmp_path / "notes.tmp").write_bytes(b"an operator's file")  # not one of ours
    removed = files.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [f".{CHECKPOINT_NAME}.abc123.tmp", ".scores.json.x9.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, "notes.tmp"]


# --- atomic_write_bytes -------------------------------------------------------------------------
def test_atomic_write_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "scores.json"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer content")
    assert target.read_bytes() == b"second, longer content"
    assert _names(target.parent) == ["scores.json"]


@pytest.mark.parametrize("patched", ["fsync", "replace"])
def test_atomic_write_failure_keeps_old_content_and_no_temp_file(tmp_path: Path, monkeypatch, patched) -> None:
    target = tmp_path / "peers.json"
    atomic_write_bytes(target, b"old content")
    temp_seen: list[str] = []

    def fail(*args):
        temp_seen.extend(name for name in _names(tmp_path) if name != "peers.json")
        raise OSError(f"{patched} failed")

    monkeypatch.setattr(files.os, patched, fail)
    with pytest.raises(OSError, match=f"{patched} failed"):
        atomic_write_bytes(target, b"new content that must not appear")
    monkeypatch.undo()

    assert len(temp_seen) == 1 and temp_seen[0].endswith(".tmp")  # the data went to a temp file first
    assert target.read_bytes() == b"old content"
    assert _names(tmp_path) == ["peers.json"]
