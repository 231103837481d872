"""The local swarm end to end: embedded chain, a validator and miners as separate processes.

Three honest miners and one of each cheating kind, in both training modes (in swarm mode also a
poisoner, an intruder, a hijacker and an inflater, as the README's quick start runs); the validator
must rank every honest miner above every cheater, score the dead miner 0.1 and the liar, the stale
miner and the swarm's attackers 0.3 or less. DiLoCo mode reaches the neurons the way an operator passes it: after `--`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from distributed_training.localnet.processes import REPO_ROOT

TIME_LIMIT = 8 * 60


@pytest.mark.parametrize("mode, rounds", [("swarm", 4), ("diloco", 3)])
def test_local_swarm_ranks_honest_miners_above_every_adversary(tmp_path, mode, rounds):
    summary_path, plot = tmp_path / "summary.json", tmp_path / "loss.png"
    command = [sys.executable, "-m", "distributed_training.localnet", "--miners", "3", "--dead", "1", "--liars", "1",
               "--copycats", "1", "--lazy", "1", "--stale", "1", "--rounds", str(rounds),
               "--work-dir", str(tmp_path / "net"), "--summary-json", str(summary_path), "--plot", str(plot)]
    if mode == "swarm":  # the README's quick start: the adversaries that attack the swarm itself too
        command += ["--poisoners", "1", "--intruders", "1", "--hijackers", "1", "--inflaters", "1"]
    if mode == "diloco":
        command += ["--", "--training.mode", "diloco"]
    started = time.monotonic()
    # The command stops its own children on every exit path, a timeout included (SIGTERM).
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIME_LIMIT + 60, cwd=REPO_ROOT)
    elapsed = time.monotonic() - started
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < TIME_LIMIT, f"local swarm took {elapsed:.0f}s"

    summary = json.loads(summary_path.read_text())
    assert summary["rounds"] == rounds
    miners = {m["uid"]: m for m in summary["miners"]}
    honest = [m for m in miners.values() if m["behaviour"] == "honest"]
    cheaters = [m for m in miners.values() if m["behaviour"] not in ("honest", "intruder")]  # unregistered: no score
    assert len(honest) == 3 and len(cheaters) == (8 if mode == "swarm" else 5)
    assert min(m["weight"] for m in honest) > max(m["weight"] for m in cheaters), summary
    by_kind = {m["behaviour"]: m for m in cheaters}
    assert by_kind["dead"]["last_score"] == 0.1
    assert by_kind["dead"]["answered"] == 0
    assert by_kind["liar"]["last_score"] <= 0.3
    assert by_kind["stale"]["last_score"] <= 0.3
    if mode == "swarm":  # each is caught by its peers, who say so to the validator (or falls behind for it)
        assert all(by_kind[kind]["last_score"] <= 0.3 for kind in ("poisoner", "hijacker", "inflater")), by_kind
    assert plot.stat().st_size > 1000
    if mode == "diloco":  # the neurons really trained with DiLoCo: its outer steps are in the honest miners' logs
        logs = [(tmp_path / "net" / "logs" / f"miner{i}.log").read_text() for i in range(3)]
        assert all("outer step" in log for log in logs)
