"""Operating a neuron: post_install.py, wandb without a key or network, dt-monitor on a live swarm, and a
miner with another run spec refused at start."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import hivemind

from distributed_training.logs import read_metrics
from distributed_training.localnet.processes import REPO_ROOT, ProcessGroup

P2PD = Path(hivemind.__file__).parent / "hivemind_cli" / "p2pd"


def _post_install() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "post_install.py")], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)


def test_post_install_repairs_then_reports_no_changes():
    mode = P2PD.stat().st_mode
    try:
        P2PD.chmod(mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
        first = _post_install()
        assert first.returncode == 0, first.stdout + first.stderr
        assert "made" in first.stdout and "p2pd" in first.stdout and "executable" in first.stdout
        assert os.access(P2PD, os.X_OK)
    finally:
        P2PD.chmod(mode)
    second = _post_install()
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.strip().splitlines()[-1] == "post_install: no changes"


def test_miners_without_wandb_key_train_and_monitor_shows_the_swarm(tmp_path):
    run_id = f"ops-{uuid.uuid4().hex[:8]}"
    # No key, no mode: the miner must pick offline itself; any upload attempt would hit a closed port.
    env = {"WANDB_API_KEY": None, "WANDB_MODE": None, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    flags = ["--neuron.swarm_only", "--model.preset", "tiny", "--model.seq_len", "32", "--neuron.batch_size", "4",
             "--neuron.target_batch_size", "100000", "--neuron.torch_threads", "1", "--neuron.run_id", run_id,
             "--neuron.max_steps", "1000000"]
    with ProcessGroup(tmp_path / "logs") as group:
        peers = group.initial_peers(group.start_dht_node("dht", tmp_path / "dht"))
        for i in range(2):
            group.start(f"m{i}", "miner.py", [*flags, "--neuron.uid", str(i), "--dht.initial_peers", peers[0]],
                        tmp_path / f"m{i}", env=env)
        deadline = time.monotonic() + 180
        while not all(len(read_metrics(tmp_path / f"m{i}" / "metrics.jsonl", "step")) >= 5 for i in range(2)):
            assert all(n.alive for n in group.members.values()), "a miner died:\n" + "\n".join(
                n.log_tail() for n in group.members.values())
            assert time.monotonic() < deadline, "miners did not start training"
            time.sleep(0.5)  # polling metrics written by other processes

        try:
            monitor = subprocess.run(
                [sys.executable, "-m", "distributed_training.ops.monitor", "--dht.initial_peers", peers[0],
                 "--neuron.run_id", run_id, "--count", "3", "--interval", "1", "--peers"],
                capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"dt-monitor did not finish: {exc.stdout!r} {exc.stderr!r}") from None
        assert monitor.returncode == 0, monitor.stderr
        lines = [line for line in monitor.stdout.splitlines() if " peers " in line]
        assert lines, monitor.stdout
        peers_seen = max(int(re.search(r"peers (\d+)", line).group(1)) for line in lines)
        assert peers_seen == 2, monitor.stdout
        assert re.search(r"samples [1-9]\d*", monitor.stdout), monitor.stdout

        # A third miner of the same run with another learning rate would fork the model: it stops at
        # start with one line naming the differing field, and the two keep training.
        odd = group.start("odd", "miner.py", [*flags, "--neuron.uid", "2", "--neuron.lr", "3e-3",
                                              "--dht.initial_peers", peers[0]], tmp_path / "odd", env=env)
        assert group.wait("odd", timeout=180) == 2, odd.log_tail()
        errors = [line for line in odd.log_path.read_text().splitlines() if line.startswith("dt-miner: error:")]
        assert len(errors) == 1 and "lr 0.003 here vs 0.0004" in errors[0] and "2 peer(s)" in errors[0], errors
        assert "Traceback" not in odd.log_path.read_text()
        assert group.members["m0"].alive and group.members["m1"].alive

    for i in range(2):
        state = tmp_path / f"m{i}"
        assert read_metrics(state / "metrics.jsonl", "start"), (tmp_path / "logs" / f"m{i}.log").read_text()[-2000:]
        assert list((state / "wandb").glob("offline-run-*")), "wandb did not run offline"
