"""A miner that trains, then poisons its all-reduce contribution: the honest swarm bans it and trains on.

Two honest miners and one poisoner (`localnet.cheats.PoisonerMiner`, a real process) from epoch 3 on,
in both training modes (`localnet.drills`). The held-out loss against the same run without the
poisoner, for every poison in both modes, is `bench/poisoning.py`'s table in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest

from distributed_training.localnet.drills import held_out_loss, run_poison_drill
from distributed_training.logs import read_metrics

MAX_EPOCHS = 6
BAN_WITHIN = 2  # epochs after the first poisoned one


@pytest.mark.parametrize("mode, poison", [("swarm", "nan"), ("diloco", "noise")])
def test_a_poisoner_is_banned_and_the_honest_miners_train_on_together(tmp_path, mode, poison):
    drill = run_poison_drill(tmp_path, mode, poison, max_epochs=MAX_EPOCHS)
    poisoned = read_metrics(tmp_path / "poisoner" / "metrics.jsonl", "poisoned")
    assert poisoned, "the poisoner never poisoned"
    first_poison = poisoned[0]["time"]
    for index in range(2):
        # no honest miner met a non-finite value: the poisoned parts never reached a model
        assert drill.skips(index) == []
        epochs = drill.epochs(index)
        assert [e["epoch"] for e in epochs] == list(range(1, MAX_EPOCHS + 1)), epochs
        # banned within BAN_WITHIN epochs of the first round its poison reached an honest miner (a poisoner
        # that started late counts its epochs one behind: the round is found by time, not by number)
        reached = [e for e in epochs if e["time"] >= first_poison and drill.adversary in (e["group"] or ())]
        assert reached, ("its poison never reached this miner", [(e["epoch"], e["group"]) for e in epochs])
        # (`counted`: the members whose parts this miner's reducer counts; a banned one may still sit in a
        # group another member formed, counted for nothing)
        late = [e for e in epochs if e["epoch"] >= reached[0]["epoch"] + BAN_WITHIN]
        assert all(drill.adversary not in e["counted"] for e in late), [(e["epoch"], e["counted"]) for e in epochs]
    assert any(f"banning {drill.adversary}" in log for log in drill.logs.values()), "no honest miner logged the ban"
    assert drill.largest_difference() <= 1e-5
    loss = held_out_loss(drill.dirs[0])
    print(f"\n{mode}/{poison}: honest held-out loss after {MAX_EPOCHS} epochs {loss:.4f}")
    # finite, and well below the untrained model's ~10.83 (ln 50257): an unbounded x -100 walks the model
    # back there in six epochs; the reference runs of bench/poisoning.py end near 9.5 (swarm) and 7 (DiLoCo)
    assert loss == loss and loss < 10.0
