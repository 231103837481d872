"""The trainers' split of time into computing and communicating (what the swarm benchmark reports)."""

from __future__ import annotations

import uuid

import torch

from distributed_training.training import timing
from distributed_training.training.model import build_model, get_preset
from distributed_training.training.gradient_averaging import GradientAveragingTrainer
from distributed_training.training.trainer import TrainerSettings
from distributed_training.training.timing import TimeSplit, communication


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_step_counts_what_it_does_not_spend_communicating_as_compute(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)

    class Peer:
        def __init__(self) -> None:
            self.timing = TimeSplit()

        @communication
        def all_reduce(self, seconds: float, nested: float = 0.0) -> None:
            clock.now += seconds
            if nested:
                self.all_reduce(nested)  # state loading after a failed round: counted once

    peer = Peer()
    with peer.timing.step():
        clock.now += 2.0  # forward and backward
        peer.all_reduce(3.0, nested=1.0)
        clock.now += 0.5  # the optimizer step
    peer.all_reduce(4.0)  # catching up outside a step
    assert peer.timing.compute_seconds == 2.5
    assert peer.timing.communicate_seconds == 8.0
    assert peer.timing.as_fields() == {"compute_seconds": 2.5, "communicate_seconds": 8.0}


def test_a_lone_swarm_trainer_only_computes(dht) -> None:
    model = build_model(get_preset("tiny"), vocab_size=512, seq_len=16)
    trainer = GradientAveragingTrainer(model, dht, TrainerSettings(run_id=f"timing-{uuid.uuid4().hex[:8]}", batch_size=2,
                                                     target_batch_size=10_000), torch.device("cpu"))
    try:
        for seed in range(2):
            trainer.train_batch(torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(seed)))
        assert trainer.timing.compute_seconds > 0
        assert trainer.timing.communicate_seconds == 0  # no epoch ended: nothing waited on the swarm
    finally:
        trainer.shutdown()
