"""The run spec: one digest for what a run's peers share; a mismatch names the fields, in one line."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from distributed_training.config import parse_config
from distributed_training.spec import COMPRESSIONS, MODEL_PRESETS, RunSpec, SpecMismatch
from distributed_training.swarm.compression import CODECS
from distributed_training.swarm.dht import DHTSettings, RunSpecRecords, start_dht, visible_maddrs
from distributed_training.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distributed_training.training.model import PRESETS


def _config(*flags: str):
    return parse_config("miner", ["--neuron.swarm_only", *flags], env={}, dotenv_path=Path("/nonexistent/.env"))


def _spec(*flags: str) -> RunSpec:
    return RunSpec.from_config(_config(*flags), seq_len=64, tokenizer_digest="t" * 64, data_digest="d" * 64)


def test_digest_is_stable_and_changes_with_every_shared_field() -> None:
    base = _spec()
    assert base.digest == _spec().digest and len(base.digest) == 64
    for flags in (["--neuron.lr", "1e-3"], ["--neuron.run_id", "other"], ["--model.preset", "gpt2-124m"],
                  ["--training.mode", "diloco"], ["--neuron.grad_compression", "fp16"], ["--data.seed", "7"],
                  ["--neuron.target_batch_size", "1024"], ["--neuron.seed", "1"]):
        assert _spec(*flags).digest != base.digest, flags


def test_per_peer_flags_and_the_other_modes_hyperparameters_do_not_count() -> None:
    base = _spec()
    # a local batch size, a port or a device are a peer's own; DiLoCo's H does not matter in swarm mode
    for flags in (["--neuron.batch_size", "16"], ["--dht.port", "4321"], ["--neuron.device", "cpu"],
                  ["--training.inner_steps", "7"], ["--training.outer_lr", "0.5"]):
        assert _spec(*flags).digest == base.digest, flags
    diloco = _spec("--training.mode", "diloco")
    assert _spec("--training.mode", "diloco", "--training.inner_steps", "7").digest != diloco.digest


def test_mismatch_is_one_line_naming_each_differing_field_and_both_values() -> None:
    mine, theirs = _spec(), _spec("--neuron.lr", "3e-3", "--neuron.grad_compression", "uint8")
    assert mine.differences(theirs) == ["lr 0.0004 here vs 0.003", "compression 'none' here vs 'uint8'"]
    with pytest.raises(SpecMismatch) as info:
        mine.check_matches(theirs, "peer X")
    message = str(info.value)
    assert "peer X" in message and "lr 0.0004 here vs 0.003" in message and "compression" in message
    assert "run_id" not in message and "\n" not in message
    mine.check_matches(_spec(), "itself")  # equal specs pass


def test_dict_round_trip_and_another_version_is_refused() -> None:
    spec = _spec("--training.mode", "diloco")
    assert RunSpec.from_dict(spec.as_dict()) == spec
    with pytest.raises(SpecMismatch, match="unknown fields"):
        RunSpec.from_dict({**spec.as_dict(), "new_knob": 1})
    with pytest.raises(SpecMismatch, match="missing"):
        RunSpec.from_dict({k: v for k, v in spec.as_dict().items() if k != "lr"})
    assert replace(spec, version=spec.version + 1).digest != spec.digest


def test_registries_are_one_copy() -> None:
    assert PRESETS is MODEL_PRESETS
    assert set(CODECS) == set(COMPRESSIONS)


def test_checkpoint_of_another_spec_is_refused_naming_the_field(tmp_path: Path) -> None:
    saved = _spec()
    save_checkpoint(tmp_path, {"model": {}, "spec": saved.as_dict()})
    assert load_checkpoint(tmp_path, spec=saved)["spec"] == saved.as_dict()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, spec=_spec("--neuron.lr", "1e-3"))
    assert "lr 0.001 here vs 0.0004" in str(info.value) and "\n" not in str(info.value)
    save_checkpoint(tmp_path, {"model": {}})  # neither a spec nor identity fields: refused, not resumed blindly
    with pytest.raises(CheckpointError, match="run spec of another version"):
        load_checkpoint(tmp_path, spec=saved)


def test_checkpoint_from_before_run_specs_resumes_when_its_identity_fields_match(tmp_path: Path) -> None:
    """An operator's miner auto-updated into this release keeps its checkpoint instead of crash-looping."""
    spec = _spec()
    legacy = {"run_id": spec.run_id, "preset": spec.model_preset, "seq_len": spec.seq_len, "tokenizer": spec.tokenizer}
    save_checkpoint(tmp_path, {"model": {}, **legacy})
    assert load_checkpoint(tmp_path, spec=spec)["run_id"] == spec.run_id
    save_checkpoint(tmp_path, {"model": {}, **legacy, "seq_len": 32})
    with pytest.raises(CheckpointError, match="seq_len=32"):
        load_checkpoint(tmp_path, spec=spec)


def test_a_peer_whose_spec_differs_from_every_peer_of_the_run_is_refused(dht) -> None:
    run_id = f"spec-{uuid.uuid4().hex[:8]}"
    key = RSAPrivateKey()  # another peer's key: one process shares one key unless told otherwise
    other = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=visible_maddrs(dht), timeout=60),
                      record_validators=[RSASignatureValidator(key)])
    try:
        running = replace(_spec(), run_id=run_id)
        RunSpecRecords(other, run_id, private_key=key).join(running)  # the first peer: nothing to compare

        joiner = RunSpecRecords(dht, run_id)
        with pytest.raises(SpecMismatch) as info:
            joiner.join(replace(running, lr=1e-3))
        assert "lr 0.001 here vs 0.0004" in str(info.value) and "1 peer(s) already training" in str(info.value)
        joiner.join(running)  # the same spec joins, and is published
        assert [spec.digest for spec in RunSpecRecords(other, run_id, private_key=key).fetch().values()] == [
            running.digest]
    finally:
        other.shutdown()
