"""Starting and stopping neuron processes as a group (the local swarm, multi-process tests).

Each neuron runs in its own session so that stopping it also stops what it spawned (hivemind's
DHT process and its p2pd daemon); a group always stops every member, even when the caller
failed half-way, which is what keeps a failed test from leaving miners behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for a neuron that must be told one, or never to answer on)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class ProcessFailed(RuntimeError):
    """A neuron process exited while something was waiting on it; the message carries its log tail."""


@dataclass
class Neuron:
    name: str
    process: subprocess.Popen
    log_path: Path
    state_dir: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class ProcessGroup:
    """A set of neuron processes that are all stopped on exit."""

    log_dir: Path
    members: dict[str, Neuron] = field(default_factory=dict)

    def start(self, name: str, script: str, args: Sequence[str], state_dir: Path,
              env: Optional[dict[str, Optional[str]]] = None, prefix: Sequence[str] = (),
              before_exec: Optional[Callable[[], None]] = None) -> Neuron:
        """Start `neurons/<script>` (a `.py` name) or the module `script` with `args`, its state in `state_dir`.

        `prefix` goes before the interpreter, e.g. `ip netns exec <namespace>` (it must exec the command,
        so that the process stopped is the neuron itself); `before_exec` runs in the child before it
        starts (resource limits)."""
        target = [str(REPO_ROOT / "neurons" / script)] if script.endswith(".py") else ["-m", script]
        command = [*prefix, sys.executable, *target, *args, "--neuron.state_dir", str(state_dir)]
        return self._spawn(name, command, state_dir, env, before_exec)

    def start_dht_node(self, name: str, state_dir: Path, args: Sequence[str] = (),
                       prefix: Sequence[str] = ()) -> Neuron:
        """Start a routing-only DHT node (`dt-dht`); its addresses land in `state_dir/dht.json`."""
        peer_file = Path(state_dir) / "dht.json"
        peer_file.unlink(missing_ok=True)  # a kept state dir's file names a node that is gone; wait for the new one
        command = [*prefix, sys.executable, "-m", "distributed_training.ops.dht_node", *args, "--peer-file", str(peer_file)]
        return self._spawn(name, command, state_dir, None)

    def _spawn(self, name: str, command: list[str], state_dir: Path, env: Optional[dict[str, Optional[str]]],
               before_exec: Optional[Callable[[], None]] = None) -> Neuron:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        # A None value removes the variable (e.g. to run a neuron as if no API key were set).
        full_env = {key: value for key, value in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items()
                    if value is not None}
        with open(log_path, "ab") as log:
            # Each process runs in its own state dir, so a `.env` in the caller's directory does not leak in.
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                       start_new_session=True, cwd=str(state_dir), preexec_fn=before_exec)
        neuron = Neuron(name, process, log_path, Path(state_dir))
        self.members[name] = neuron
        return neuron

    def wait_for_file(self, neuron: Neuron, relative: str, timeout: float) -> Path:
        """Wait until the neuron has written `relative` in its state dir (it writes atomically)."""
        path = neuron.state_dir / relative
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not neuron.alive:
                raise ProcessFailed(f"{neuron.name} exited with {neuron.process.returncode}:\n{neuron.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{neuron.name} did not write {relative} within {timeout:.0f}s:\n{neuron.log_tail()}")
            time.sleep(0.1)  # polling a file another process writes
        return path

    def initial_peers(self, neuron: Neuron, timeout: float = 90.0) -> list[str]:
        """The DHT addresses a started neuron published, loopback first (everything here is local)."""
        peer_file = json.loads(self.wait_for_file(neuron, "dht.json", timeout).read_text())
        local = [addr for addr in peer_file["maddrs"] if "/127.0.0.1/" in addr]
        return local or peer_file["maddrs"]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        neuron = self.members[name]
        try:
            os.killpg(neuron.process.pid, sig)
        except ProcessLookupError:
            pass
        neuron.process.wait(timeout=30)

    def wait(self, name: str, timeout: float) -> int:
        neuron = self.members[name]
        try:
            return neuron.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} still running after {timeout:.0f}s:\n{neuron.log_tail()}") from None

    def stop_all(self, grace: float = 15.0) -> None:
        """SIGTERM every live member's session, then SIGKILL what is left after `grace` seconds."""
        for neuron in self.members.values():
            if neuron.alive:
                try:
                    os.killpg(neuron.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for neuron in self.members.values():
            try:
                neuron.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for neuron in self.members.values():
            try:  # the session may hold orphans (p2pd) even after the leader exited
                os.killpg(neuron.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if neuron.alive:
                neuron.process.wait(timeout=10)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_all()
