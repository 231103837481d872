"""The fast path's choices: the ones that change numbers are in the run spec, the device's are not."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch

from distributed_training.config import ConfigError, parse_config
from distributed_training.neuron.setup import trainer_settings
from distributed_training.spec import LATER_FIELDS, RunSpec, SpecMismatch
from distributed_training.training.trainer import DiLoCoSettings


def _config(*flags: str):
    return parse_config("miner", ["--neuron.swarm_only", *flags], env={}, dotenv_path=Path("/nonexistent/.env"))


def _spec(*flags: str) -> RunSpec:
    return RunSpec.from_config(_config(*flags), seq_len=64, tokenizer_digest="t" * 64, data_digest="d" * 64)


def test_padding_and_loss_kernel_are_shared_and_named_in_a_mismatch() -> None:
    base = _spec()
    fast = _spec("--model.vocab_multiple", "64", "--model.loss", "chunked")
    assert (fast.vocab_multiple, fast.loss_kernel) == (64, "chunked")
    for flags in (["--model.vocab_multiple", "64"], ["--model.loss", "chunked"]):
        assert _spec(*flags).digest != base.digest, flags
    with pytest.raises(SpecMismatch) as info:
        base.check_matches(fast, "peer X")
    assert "vocab_multiple 1 here vs 64" in str(info.value) and "loss_kernel 'plain' here vs 'chunked'" in str(info.value)
    assert RunSpec.from_dict(fast.as_dict()) == fast


def test_the_device_choices_leave_the_spec_alone() -> None:
    base = _spec()
    for flags in (["--model.compile", "on"], ["--neuron.micro_batch_size", "2"],
                  ["--training.offload_optimizer", "false"]):
        assert _spec(*flags).digest == base.digest, flags


def test_a_run_without_the_fast_path_keeps_its_version_1_digest() -> None:
    """Peers and checkpoints of a run from before these fields read the same spec and digest."""
    spec = _spec()
    data = spec.as_dict()
    assert not set(LATER_FIELDS) & set(data)
    version_1 = {f.name for f in fields(RunSpec)} - set(LATER_FIELDS)
    assert set(data) == version_1
    assert RunSpec.from_dict(data) == spec  # a record or checkpoint written without the fields


def test_fast_path_flags_parse_and_reject_bad_values() -> None:
    config = _config("--model.vocab_multiple", "64", "--model.loss", "chunked", "--model.compile", "off",
                     "--neuron.micro_batch_size", "4", "--training.offload_optimizer", "false")
    assert (config.model.vocab_multiple, config.model.loss, config.model.compile) == (64, "chunked", "off")
    assert config.neuron.micro_batch_size == 4 and config.training.offload_optimizer is False
    default = _config()
    assert (default.model.vocab_multiple, default.model.loss, default.model.compile) == (1, "plain", "auto")
    assert default.neuron.micro_batch_size == 0 and default.training.offload_optimizer is True
    for argv, flag in ((["--model.loss", "fused"], "--model.loss"), (["--model.vocab_multiple", "0"], "--model.vocab_multiple"),
                       (["--model.compile", "maybe"], "--model.compile"),
                       (["--neuron.micro_batch_size", "-1"], "--neuron.micro_batch_size")):
        with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
            _config(*argv)


def test_trainer_settings_pick_the_device_defaults() -> None:
    config = _config("--training.mode", "diloco", "--training.offload_optimizer", "false")
    cpu = trainer_settings(config, torch.device("cpu"))
    assert isinstance(cpu, DiLoCoSettings)
    assert (cpu.compile, cpu.sync_every, cpu.micro_batch_size, cpu.offload_optimizer) == (False, 0, 0, False)
    cuda = trainer_settings(config, torch.device("cuda"), micro_batch_size=16)  # nothing here touches a GPU
    assert (cuda.compile, cuda.sync_every, cuda.micro_batch_size) == (True, 1, 16)
    assert trainer_settings(_config("--model.compile", "off"), torch.device("cuda")).compile is False
    settings = trainer_settings(_config("--model.compile", "on", "--neuron.micro_batch_size", "2"))
    assert settings.compile is True and settings.micro_batch_size == 2
