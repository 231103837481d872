"""The local swarm end to end: embedded chain, a validator and miners as separate processes.

Three honest miners, a dead miner and a liar in both training modes, with the attackers of the swarm
itself in swarm mode (a poisoner, an intruder, a hijacker and an inflater) and the free riders in
DiLoCo mode (a copycat, a lazy and a stale miner): the README's quick start runs them all at once,
which on two cores takes longer than a test should. The validator must rank every
honest miner above every cheater, score the dead miner 0.1 and every other cheater 0.3 or less.
DiLoCo mode reaches the neurons the way an operator passes it: after `--`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distributed_training.localnet.processes import REPO_ROOT

HANG_LIMIT = 10 * 60  # a guard against a hang, not a speed test: on two cores a run takes 4-7 minutes


# The framer is tried in the unit tier's real all-reduces (tests/unit/test_guarded_averaging.py): here, with
# epochs of ten seconds, the groups its bans split leave forked epochs that fail honest verification.
ADVERSARIES = {"swarm": ["--poisoners", "1", "--intruders", "1", "--hijackers", "1", "--inflaters", "1"],
               "diloco": ["--copycats", "1", "--lazy", "1", "--stale", "1"]}


@pytest.mark.parametrize("mode, rounds", [("swarm", 3), ("diloco", 3)])
def test_local_swarm_ranks_honest_miners_above_every_adversary(tmp_path, mode, rounds):
    summary_path, plot = tmp_path / "summary.json", tmp_path / "loss.png"
    command = [sys.executable, "-m", "distributed_training.localnet", "--miners", "3", "--dead", "1", "--liars", "1",
               *ADVERSARIES[mode], "--rounds", str(rounds),
               "--work-dir", str(tmp_path / "net"), "--summary-json", str(summary_path), "--plot", str(plot)]
    if mode == "diloco":
        command += ["--", "--training.mode", "diloco"]
    # The command stops its own children on every exit path, a timeout included (SIGTERM).
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_LIMIT, cwd=REPO_ROOT)
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]

    summary = json.loads(summary_path.read_text())
    assert summary["rounds"] == rounds
    miners = {m["uid"]: m for m in summary["miners"]}
    honest = [m for m in miners.values() if m["behaviour"] == "honest"]
    cheaters = [m for m in miners.values() if m["behaviour"] not in ("honest", "intruder")]  # unregistered: no score
    assert len(honest) == 3 and len(cheaters) == 5
    assert min(m["weight"] for m in honest) > max(m["weight"] for m in cheaters), summary
    by_kind = {m["behaviour"]: m for m in cheaters}
    assert by_kind["dead"]["last_score"] == 0.1
    assert by_kind["dead"]["answered"] == 0
    # each is caught by the validator, or by its peers, who say so to the validator (or falls behind for it)
    assert all(m["last_score"] <= 0.3 for kind, m in by_kind.items() if kind != "dead"), by_kind
    assert plot.stat().st_size > 1000
    if mode == "diloco":  # the neurons really trained with DiLoCo: its outer steps are in the honest miners' logs
        logs = [(tmp_path / "net" / "logs" / f"miner{i}.log").read_text() for i in range(3)]
        assert all("outer step" in log for log in logs)
