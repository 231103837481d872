"""A neuron's processes end with it, a held port is one line, and a full disk neither hangs nor stops training.

Each test runs a real miner (`neurons/miner.py`, swarm only, the tiny model) as its own OS process
with its real hivemind DHT process and p2pd daemon, and watches the process table.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from distributed_training.localnet.processes import ProcessGroup, free_port
from distributed_training.logs import read_metrics

MINER_FLAGS = ["--neuron.swarm_only", "--model.preset", "tiny", "--model.seq_len", "16", "--neuron.batch_size", "2",
               "--neuron.torch_threads", "1", "--wandb.off"]
GONE_WITHIN = 5.0  # seconds


def _group_members(pgid: int) -> list[int]:
    """Pids of the live processes of a process group (zombies are gone already)."""
    members = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(proc.name))
    return members


def _wait_for(predicate, timeout: float, what: str, group: ProcessGroup) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n.name}\n{n.log_tail(8)}" for n in group.members.values())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)  # polling files and the process table, which other processes change


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_children_end_with_the_neuron(tmp_path, sig):
    with ProcessGroup(tmp_path / "logs") as group:
        miner = group.start("m", "miner.py", [*MINER_FLAGS, "--neuron.target_batch_size", "100000",
                                              "--dht.port", str(free_port())], tmp_path / "m")
        _wait_for(lambda: read_metrics(tmp_path / "m" / "metrics.jsonl", "step"), 120, "the miner's first step", group)
        pgid = miner.process.pid  # the group starts the neuron as a session (and group) leader
        children = [pid for pid in _group_members(pgid) if pid != pgid]
        assert len(children) >= 2, children  # at least the DHT process and its p2pd

        os.kill(miner.process.pid, sig)  # the neuron alone: its children must notice by themselves
        code = miner.process.wait(timeout=60)
        if sig == signal.SIGTERM:
            assert code == 0, miner.log_tail()
        stopped = time.monotonic()
        while _group_members(pgid) and time.monotonic() - stopped < GONE_WITHIN + 5:
            time.sleep(0.1)  # polling the process table
        took = time.monotonic() - stopped
        assert not _group_members(pgid), f"left after {sig.name}: {_group_members(pgid)}"
        assert took <= GONE_WITHIN, f"children took {took:.1f}s to end after {sig.name}"


def test_a_held_dht_port_is_one_line_and_exit_2(tmp_path):
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        group.initial_peers(group.start_dht_node("dht", tmp_path / "dht", args=["--dht.port", str(port)]))
        second = group.start_dht_node("dht2", tmp_path / "dht2", args=["--dht.port", str(port)])
        miner = group.start("m", "miner.py", [*MINER_FLAGS, "--dht.port", str(port)], tmp_path / "m")
        for neuron, prog in ((second, "dt-dht"), (miner, "dt-miner")):
            assert neuron.process.wait(timeout=120) == 2, neuron.log_tail()
            errors = [line for line in neuron.log_path.read_text().splitlines() if line.startswith(f"{prog}: error:")]
            assert len(errors) == 1 and f"--dht.port {port} (tcp) is in use" in errors[0], neuron.log_tail()
            assert "Traceback" not in neuron.log_path.read_text()
        assert group.members["dht"].alive  # the holder is not disturbed


def _mount_tiny_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_said_each_epoch_and_training_goes_on_until_sigterm(tmp_path):
    """The checkpoint does not fit: a 2 MB tmpfs where this machine lets root mount one, else the same
    write limit set on the miner's process (RLIMIT_FSIZE: a write past it fails with EFBIG)."""
    state = tmp_path / "full"
    mounted = _mount_tiny_tmpfs(state)
    limit = None if mounted else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20)))
    try:
        with ProcessGroup(tmp_path / "logs") as group:
            group.start("m", "miner.py", [*MINER_FLAGS, "--neuron.target_batch_size", "8"], state / "m",
                        before_exec=limit)
            miner = group.members["m"]
            log_text = lambda: miner.log_path.read_text(errors="replace")  # noqa: E731
            _wait_for(lambda: log_text().count("training goes on without a checkpoint") >= 3, 180,
                      "three epochs that could not be checkpointed", group)
            assert miner.alive
            failures = [line for line in log_text().splitlines() if "training goes on without a checkpoint" in line]
            assert all(f"cannot write {state / 'm' / 'checkpoint.pt'}" in line and "free there" in line
                       for line in failures), failures[:2]
            epochs = [int(line.rsplit("epoch ", 1)[1].split()[0]) for line in failures]
            assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)  # one line per epoch, in order
            assert "Traceback" not in log_text()

            os.kill(miner.process.pid, signal.SIGTERM)
            assert miner.process.wait(timeout=60) == 0, miner.log_tail()
            assert not [p for p in (state / "m").iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(state)], capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
