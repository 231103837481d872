"""A stranger on the DHT, with no registration and no binding, tries to average and to load state: refused.

Two registered miners on an embedded chain bind their peer ids to their hotkeys; the intruder is an
ordinary miner process without a wallet (`localnet.cheats.IntruderMiner`). Both training modes.
"""

from __future__ import annotations

import pytest

from distributed_training.localnet.drills import run_intruder_drill
from distributed_training.logs import read_metrics

MAX_EPOCHS = 4


@pytest.mark.parametrize("mode", ["swarm", "diloco"])
def test_an_intruder_joins_no_group_and_gets_no_state(tmp_path, mode):
    drill = run_intruder_drill(tmp_path, mode, max_epochs=MAX_EPOCHS)
    intruder = drill.adversary
    for index in range(2):
        epochs = drill.epochs(index)
        assert [e["epoch"] for e in epochs] == list(range(1, MAX_EPOCHS + 1)), epochs
        assert all(intruder not in (e["group"] or ()) for e in epochs), [(e["epoch"], e["group"]) for e in epochs]
        # the honest pair trained together as without it
        assert sum(e["group_size"] == 2 for e in epochs) >= MAX_EPOCHS - 1, epochs
    refusals = "\n".join(drill.logs[name] for name in ("m0", "m1"))
    assert f"refusing {intruder}" in refusals and "no valid binding" in refusals
    assert drill.largest_difference() <= 1e-5

    # the intruder never averaged with anyone, and every state download it tried was refused
    intruder_epochs = read_metrics(tmp_path / "intruder" / "metrics.jsonl", "epoch")
    assert all((e["group_size"] or 1) == 1 for e in intruder_epochs), intruder_epochs
    assert "Finished downloading state" not in drill.logs["intruder"]
