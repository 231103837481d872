"""DiLoCo training (`--training.mode diloco`).

In one process: the flags; the outer Nesterov step checked against a hand computation; skipped batches;
evaluation and checkpoints of θ_global; a joiner loading θ_global, momentum and epoch from a peer, then
both averaging to identical bits; the all-reduce giving every member the same bits under fp16 and 8-bit
compression. Miners in separate processes are in `tests/swarm/test_diloco_swarm.py`."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from distributed_training.swarm.dht import DHTSettings, start_dht, visible_maddrs
from distributed_training.swarm.hivemind_private import PseudoGradientAverager
from distributed_training.training.diloco import DiLoCoTrainer
from distributed_training.training.trainer import DiLoCoSettings
from distributed_training.training.model import build_model, get_preset
from distributed_training.swarm.progress import read_peer_progress
from distributed_training.training.model import page_losses
from distributed_training.training.trainer import ClippedAdamW
from distributed_training.swarm.compression import CODECS

VOCAB, SEQ_LEN, BATCH = 512, 16, 4
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-2, 0.1, 1.0
OUTER_LR, OUTER_MOMENTUM, INNER_STEPS = 0.7, 0.9, 3
CPU = torch.device("cpu")


def _model() -> torch.nn.Module:
    return build_model(get_preset("tiny"), vocab_size=VOCAB, seq_len=SEQ_LEN)


def _batch(seed: int, rows: int = BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def _trainer(dht, **overrides) -> DiLoCoTrainer:
    settings = dict(run_id=f"diloco-{uuid.uuid4().hex[:8]}", batch_size=BATCH, target_batch_size=100_000,
                    matchmaking_time=1.0, averaging_timeout=10.0, lr=LR, weight_decay=WEIGHT_DECAY,
                    grad_clip=GRAD_CLIP, load_state_timeout=10.0, inner_steps=INNER_STEPS, outer_lr=OUTER_LR,
                    outer_momentum=OUTER_MOMENTUM)
    settings.update(overrides)
    return DiLoCoTrainer(_model(), dht, DiLoCoSettings(**settings), CPU)


# --- flags ---------------------------------------------------------------------------------------------
def test_training_flags_parse_and_reject_bad_values(tmp_path) -> None:
    from distributed_training.config import ConfigError, parse_config

    def parse(argv):
        return parse_config("miner", argv, env={}, dotenv_path=tmp_path / "absent.env")

    default = parse([])
    assert default.training.mode == "swarm"
    assert (default.training.inner_steps, default.training.outer_lr, default.training.outer_momentum) == (100, 0.7, 0.9)
    config = parse(["--training.mode", "diloco", "--training.inner_steps", "0", "--training.outer_momentum", "0"])
    assert config.training.mode == "diloco" and config.training.inner_steps == 0
    assert parse_config("validator", ["--training.mode", "diloco"], env={},
                        dotenv_path=tmp_path / "absent.env").training.mode == "diloco"
    for argv, flag in ((["--training.mode", "async"], "--training.mode"),
                       (["--training.outer_momentum", "1"], "--training.outer_momentum"),
                       (["--training.outer_lr", "0"], "--training.outer_lr"),
                       (["--training.inner_steps", "-1"], "--training.inner_steps")):
        with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
            parse(argv)


# --- one peer: the outer step's math, skipping, evaluation, state -------------------------------------
def test_single_peer_rounds_follow_nesterov_on_the_pseudo_gradient(dht) -> None:
    """With no partner a round is the outer step on this peer's own Δ = θ_global − θ_local.

    The reference repeats the inner AdamW steps on its own model and applies SGD with Nesterov
    momentum by hand: buf = μ·buf + Δ; θ ← θ − lr·(Δ + μ·buf). Two rounds, so the momentum carries.
    The inner optimizer keeps its state across rounds; the local model restarts from θ_global.
    """
    trainer = _trainer(dht)
    try:
        reference = _model()
        params = list(reference.parameters())
        inner = ClippedAdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP)
        theta = [p.detach().clone() for p in params]
        buffers = [torch.zeros_like(p) for p in params]
        seed = 0
        for round_ in (1, 2):
            for step in range(INNER_STEPS):
                seed += 1
                if step == 1:  # a NaN loss (round 1), an infinite gradient (round 2): skipped, counted, no step
                    if round_ == 1:
                        hook = trainer.model.lm_head.register_forward_hook(lambda m, a, out: out * float("nan"))
                    else:
                        hook = trainer.model.transformer.h[1].attn.c_attn.weight.register_hook(
                            lambda grad: torch.full_like(grad, float("inf")))
                    try:
                        skipped = trainer.train_batch(_batch(1000 + seed))
                    finally:
                        hook.remove()
                    assert skipped.skipped and skipped.samples == 0 and not skipped.epoch_changed
                    assert all(p.grad is None for p in trainer.model.parameters())
                report = trainer.train_batch(_batch(seed))
                inner.zero_grad(set_to_none=True)
                reference(input_ids=_batch(seed), labels=_batch(seed)).loss.backward()
                inner.step()
                last = step == INNER_STEPS - 1
                assert not report.skipped and report.epoch_changed == last
                assert report.epoch == (round_ if last else round_ - 1)
            assert report.group_size == 1 and trainer.local_epoch == round_
            with torch.no_grad():
                for i, param in enumerate(params):
                    delta = theta[i] - param
                    buffers[i] = OUTER_MOMENTUM * buffers[i] + delta
                    theta[i] = theta[i] - OUTER_LR * (delta + OUTER_MOMENTUM * buffers[i])
                    param.copy_(theta[i])

            saved = trainer.state()["model"]
            for (name, _), expected in zip(reference.named_parameters(), theta):
                torch.testing.assert_close(saved[name], expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, name=name: f"round {round_}, {name}: {m}")
            # every peer restarts its local model from θ_global
            for (name, local), expected in zip(trainer.model.named_parameters(), theta):
                torch.testing.assert_close(local.detach(), expected, rtol=1e-5, atol=1e-6)
            # Continue from the trainer's bits: AdamW turns float noise in gradients that are zero in exact
            # arithmetic (the attention key biases) into lr-sized steps, which would hide the next round's check.
            with torch.no_grad():
                for i, (name, param) in enumerate(reference.named_parameters()):
                    theta[i] = saved[name].clone()
                    param.copy_(theta[i])
        assert trainer.skipped_batches == 2 and trainer.samples_trained == 2 * INNER_STEPS * BATCH
        assert trainer.global_epoch >= 2

        # the validator's evidence: a signed `<run_id>_progress` record of this peer
        deadline = time.monotonic() + 20
        trainer.train_batch(_batch(77))
        me = dht.peer_id.to_base58()
        while True:
            record = read_peer_progress(dht, trainer.settings.run_id).get(me)
            if record is not None and record.epoch == 2 and record.samples_accumulated == BATCH:
                break
            assert time.monotonic() < deadline, f"no progress record for epoch 2: {record}"
            time.sleep(0.2)  # the tracker publishes from its own thread
    finally:
        trainer.shutdown()


def test_page_losses_evaluate_theta_global_and_state_round_trips(dht) -> None:
    trainer = _trainer(dht)
    other = None
    try:
        for seed in range(INNER_STEPS + 1):  # one round, then one more inner step: local != global
            trainer.train_batch(_batch(200 + seed))
        assert trainer.local_epoch == 1
        pages = [_batch(300 + i, rows=2) for i in range(3)]
        state = trainer.state()
        global_model = _model()
        global_model.load_state_dict(state["model"])

        shared = trainer.shared_state()  # what the miner's and the validator's snapshots hold: θ_global
        assert shared.keys() == state["model"].keys()
        assert all(torch.equal(shared[name], tensor) for name, tensor in state["model"].items())
        losses = trainer.page_losses(pages)
        assert losses == pytest.approx(page_losses(global_model, pages, CPU), rel=1e-6)
        assert losses != pytest.approx(page_losses(trainer.model, pages, CPU), rel=1e-4)  # not the inner weights
        # the cuda path: θ_global through the local model's module, which keeps its own weights
        local_before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
        weights = {**dict(global_model.named_parameters()), **dict(global_model.named_buffers())}
        assert page_losses(trainer.model, pages, CPU, weights=weights) == pytest.approx(losses, rel=1e-5)
        assert all(torch.equal(local_before[n], v) for n, v in trainer.model.state_dict().items())
        assert trainer.model.training

        other = _trainer(dht)
        other.restore(state)
        assert other.local_epoch == 1 and other.samples_trained == trainer.samples_trained
        for name, tensor in other.state()["model"].items():
            assert torch.equal(tensor, state["model"][name]), name
        for name, tensor in other.model.state_dict().items():
            assert torch.equal(tensor, state["model"][name]), name  # the local model restarts from θ_global
        assert other.page_losses(pages) == losses
    finally:
        trainer.shutdown()
        if other is not None:
            other.shutdown()


# --- two peers in one process: a joiner loads the state, then both average every round --------------
def test_joiner_loads_state_then_two_peers_average_to_identical_theta(dht) -> None:
    second = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=[visible_maddrs(dht)[-1]]))
    run_id = f"diloco-{uuid.uuid4().hex[:8]}"
    first = _trainer(dht, run_id=run_id, averaging_timeout=30.0)
    joiner = None
    try:
        for seed in range(2 * INNER_STEPS):  # alone: two outer steps on its own pseudo-gradient
            first.train_batch(_batch(400 + seed))
        assert first.local_epoch == 2

        # its own signing key: two peers in one process would otherwise overwrite each other's progress record
        joiner = DiLoCoTrainer(_model(), second, first.settings, CPU, progress_key=RSAPrivateKey())
        deadline = time.monotonic() + 30
        while joiner.global_epoch < 2:  # its tracker reads the first peer's progress record
            assert time.monotonic() < deadline, "the joiner never saw the swarm's epoch"
            time.sleep(0.2)  # the tracker refreshes from its own thread
        assert joiner.catch_up() and not joiner.catch_up()
        assert joiner.local_epoch == 2
        mine, theirs = first.state(), joiner.state()
        for name, tensor in mine["model"].items():
            assert torch.equal(tensor, theirs["model"][name]), name
        for name, tensor in joiner.model.state_dict().items():
            assert torch.equal(tensor, mine["model"][name]), name  # the local model starts from θ_global
        momentum = lambda state: [s["momentum_buffer"] for s in state["optimizer"]["outer"]["state"].values()]  # noqa: E731
        assert all(torch.equal(a, b) for a, b in zip(momentum(mine), momentum(theirs)))
        assert any(a.abs().sum() > 0 for a in momentum(mine))

        reports: dict[str, list] = {"first": [], "joiner": []}

        def train(name: str, trainer: DiLoCoTrainer, seed: int) -> None:
            # normally 2·H steps; more if a round failed on a busy machine and had to be retried
            for step in range(10 * INNER_STEPS):
                if trainer.local_epoch >= 4:
                    return
                reports[name].append(trainer.train_batch(_batch(seed + step)))

        threads = [threading.Thread(target=train, args=("first", first, 500)),
                   threading.Thread(target=train, args=("joiner", joiner, 600))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for name in ("first", "joiner"):
            rounds = [(r.epoch, r.group_size) for r in reports[name] if r.epoch_changed]
            print(name, "epoch, group size:", rounds)
            # every outer step averaged both peers (None: it loaded the other's state after a failed round)
            assert [epoch for epoch, _ in rounds] == [3, 4] and rounds[0][1] == 2, (name, rounds)
            assert rounds[1][1] in (2, None), (name, rounds)
        mine, theirs = first.state(), joiner.state()
        for name, tensor in mine["model"].items():
            assert torch.equal(tensor, theirs["model"][name]), f"θ_global differs in {name}"
        assert all(torch.equal(a, b) for a, b in zip(momentum(mine), momentum(theirs)))
        assert first.local_epoch == joiner.local_epoch == 4
    finally:
        first.shutdown()
        if joiner is not None:
            joiner.shutdown()
        second.shutdown()


# --- the all-reduce: every member ends with the same bits, also with lossy compression ----------------
@pytest.mark.parametrize("compression", ["fp16", "uint8"])
def test_consensus_all_reduce_gives_every_peer_the_same_weighted_average(dht, compression) -> None:
    second = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=[visible_maddrs(dht)[-1]]))
    prefix = f"avg-{uuid.uuid4().hex[:8]}"
    generator = torch.Generator().manual_seed(3)
    shapes = [(300, 70), (70,), (5, 5)]
    inputs = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(2)]
    weights = [1.0, 3.0]
    averagers = []
    try:
        for node, tensors in zip((dht, second), inputs):
            averagers.append(PseudoGradientAverager(
                [torch.zeros_like(t) for t in tensors], node, prefix=prefix, start=True, min_matchmaking_time=2.0,
                request_timeout=1.0, allreduce_timeout=20.0, compression=CODECS[compression](),
                part_size_bytes=4096))  # several parts per tensor
        results: list = [None, None]

        def run(i: int) -> None:
            try:
                results[i] = averagers[i].step(weight=weights[i], timeout=20.0)
            except Exception as exc:  # a failed round leaves the tensors as they were; it is tried again
                results[i] = exc

        for attempt in range(3):  # on two busy cores a round can time out
            for averager, tensors in zip(averagers, inputs):
                with averager.get_tensors() as buffers:
                    for buffer, tensor in zip(buffers, tensors):
                        buffer.copy_(tensor)
            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            if all(isinstance(result, dict) for result in results):
                break
        assert all(isinstance(result, dict) and len(result) == 2 for result in results), results

        with averagers[0].get_tensors() as first, averagers[1].get_tensors() as other:
            for index, (a, b) in enumerate(zip(first, other)):
                assert torch.equal(a, b), f"tensor {index} differs by {(a - b).abs().max().item()}"
                expected = (inputs[0][index] * weights[0] + inputs[1][index] * weights[1]) / sum(weights)
                error = (a - expected).abs()
                if compression == "fp16":
                    assert error.max().item() < 2e-3, error.max().item()
                else:  # 8-bit: most values within a few bins, outliers beyond ±3σ clipped
                    assert error.mean().item() < 0.05 and error.max().item() < 1.5, (error.mean(), error.max())
    finally:
        for averager in averagers:
            averager.shutdown()
        second.shutdown()
