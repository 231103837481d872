"""The swarm itself attacked: an intruder, a hijacker and an inflater beside two honest miners, both modes.

The intruder (no registration) never joins a group and gets no state; the hijacker's forged state
(priority 1e9) is refused by the late joiner, who loads an honest one: in DiLoCo mode a random
θ_global as epoch + 3 with its own forged digest (the epoch rule), in swarm mode random parameters
as the swarm's own epoch (only the digests tell it apart); the inflater's record (epoch 10^6) moves
no honest epoch and gets it banned.
See `localnet/drills_closed.py`.
"""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from distributed_training.localnet.drills_closed import run_closed_swarm_drill
from distributed_training.logs import read_metrics


def downloads_from(log: str, peer: str, since: float) -> list[str]:
    """The log's "Finished downloading state ... from `peer`" lines stamped at or after unix time `since`."""
    found = re.finditer(rf"^(\S+ \S+) .*Finished downloading state in \S+ from {peer}", log, re.MULTILINE)
    return [m.group(0) for m in found if datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() >= since]

# The late joiner's start-up (importing torch beside four training peers) spans 3-4 of the swarm's epochs
# here and more on a slower machine; it needs some left after it loads (DiLoCo's epochs are short).
EPOCHS = {"swarm": 9, "diloco": 10}
HIJACK_LEAD = {"swarm": 0, "diloco": 3}


@pytest.mark.parametrize("mode", ["swarm", "diloco"])
def test_strangers_forgers_and_inflaters_change_nothing_honest(tmp_path, mode):
    MAX_EPOCHS = EPOCHS[mode]
    drill = run_closed_swarm_drill(tmp_path, mode, max_epochs=MAX_EPOCHS, hijack_lead=HIJACK_LEAD[mode])
    ids, honest_logs = drill.peers, "\n".join(drill.logs[name] for name in ("m0", "m1"))
    # from the moment its forgery is in place: from the start in swarm mode (its state averager's class);
    # in DiLoCo mode once it trains (before that it serves its honest initial θ_global)
    forged_since = 0.0 if mode == "swarm" else read_metrics(tmp_path / "hijacker" / "metrics.jsonl", "hijack")[0]["time"]
    for index, (name, last) in enumerate((("m0", MAX_EPOCHS), ("m1", MAX_EPOCHS - 1))):
        epochs = [e["epoch"] for e in drill.epochs(index)]
        # one by one to the end: no jump towards the inflater's epoch, no step back
        assert epochs and epochs == list(range(epochs[0], last + 1)), (name, epochs)
        assert all(ids["intruder"] not in (e["group"] or ()) for e in drill.epochs(index)), name
        assert not downloads_from(drill.logs[name], ids["hijacker"], forged_since), name
    assert drill.epochs(0)[0]["epoch"] == 1

    # the intruder: refused with the reason, never averaged, never received state
    assert f"refusing {ids['intruder']}" in honest_logs and "no valid binding" in honest_logs
    intruder_epochs = drill.epochs_of(tmp_path / "intruder")
    assert all((e["group_size"] or 1) == 1 for e in intruder_epochs), intruder_epochs
    assert "Finished downloading state" not in drill.logs["intruder"]
    # the hijacker: the late joiner refused its state, and loaded another peer's
    late = drill.logs["m1"]
    refusal = re.search(rf"refusing state from {ids['hijacker']}: (.*)", late)
    assert refusal, late[-3000:]
    expected = "signed this state|signed another digest" if mode == "swarm" else "claims epoch"
    assert re.search(expected, refusal.group(1)), refusal.group(1)
    assert re.search(r"Finished downloading state in \S+ from (?!%s)" % ids["hijacker"], late), late[-3000:]
    # the inflater: named a liar by its record, and banned
    assert re.search(rf"{ids['inflater']} published (epoch 1000000|\d+ samples in one epoch).*banning it", honest_logs)
    # what the late joiner trained on was the swarm's model, not the random forgery (loss ~10.8 at init, far more for randn)
    assert drill.epochs(1)[-1]["loss"] < drill.epochs(0)[0]["loss"], (drill.epochs(0)[0], drill.epochs(1)[-1])
