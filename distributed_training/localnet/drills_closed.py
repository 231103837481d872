"""The closed-swarm drill: two honest miners and three adversaries that attack the swarm itself, as real processes.

All but the intruder are registered on an embedded chain and bound (`swarm/bindings.py`):
- an intruder (no registration, no binding) tries to join averaging and to download state;
- a hijacker trains honestly but serves a random model as its epoch + 3 at state-sharing priority 1e9;
- an inflater trains honestly but keeps a signed progress record claiming epoch 10^6 and 10^9 samples.
m0 trains from the start with them; m1 joins once m0 finished an epoch, so it must load the swarm's
state, with the hijacker's forgery first in its list, and stops an epoch before the others. One drill
for the three, in either mode.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..logs import read_metrics
from .drills import DRILL_FLAGS, HONEST, MODE_FLAGS, Drill, _wait_for_honest
from .processes import ProcessFailed, ProcessGroup

ADVERSARIES = ("intruder", "hijacker", "inflater")
REGISTERED = (*HONEST, "hijacker", "inflater")


@dataclass
class ClosedSwarmDrill(Drill):
    peers: dict[str, str] = None  # every member's peer id, by name


def _wait_for_epoch(group: ProcessGroup, name: str, epoch: int, timeout: float) -> None:
    """Until `name` logged reaching `epoch` in its metrics (another process writes them)."""
    neuron, deadline = group.members[name], time.monotonic() + timeout
    metrics = neuron.state_dir / "metrics.jsonl"
    while not (metrics.exists() and any(e["epoch"] >= epoch for e in read_metrics(metrics, "epoch"))):
        if not neuron.alive:
            raise ProcessFailed(f"{name} exited with {neuron.process.returncode}:\n{neuron.log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not reach epoch {epoch} within {timeout:.0f}s:\n{neuron.log_tail()}")
        time.sleep(0.2)  # polling a file another process writes


def run_closed_swarm_drill(work: Path, mode: str, max_epochs: int = 7, timeout: float = 500,
                           hijack_lead: int = 3) -> ClosedSwarmDrill:
    from ..chain import LocalChain
    from ..chain.wallets import create_wallet

    run_id = f"drill-{uuid.uuid4().hex[:8]}"
    db, wallets = work / "chain.sqlite", work / "wallets"
    with LocalChain(db, block_time=1.0) as chain:
        chain.create_subnet(1, exist_ok=True)
        for name in REGISTERED:
            wallet = create_wallet("drill", name, wallets)
            chain.register(1, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
    with ProcessGroup(work / "logs") as group:
        peers = group.initial_peers(group.start_dht_node("dht", work / "dht"))
        common = [*DRILL_FLAGS, *MODE_FLAGS[mode], "--neuron.run_id", run_id, "--dht.initial_peers", ",".join(peers),
                  "--neuron.max_epochs", str(max_epochs)]
        chain_flags = ["--subtensor.network", "embedded", "--chain.db", str(db), "--netuid", "1",
                       "--wallet.path", str(wallets), "--wallet.name", "drill", "--axon.port", "0",
                       "--axon.ip", "127.0.0.1"]
        bound = [a for a in common if a != "--neuron.swarm_only"] + chain_flags
        first, late = HONEST
        group.start(first, "miner.py", [*bound, "--wallet.hotkey", first, "--neuron.wait_for_peers", "3"], work / first)
        for name in ("hijacker", "inflater"):
            group.start(name, "distributed_training.localnet.cheats",
                        [*bound, "--wallet.hotkey", name, "--neuron.wait_for_peers", "3", "--cheat", name,
                         "--cheat.hijack_lead", str(hijack_lead)], work / name)
        group.start("intruder", "distributed_training.localnet.cheats",
                    [*common, "--neuron.uid", "7", "--cheat", "intruder"], work / "intruder")
        _wait_for_epoch(group, first, 1, timeout)
        # one epoch fewer: it may count the round it joins one behind the others, and must not end alone
        group.start(late, "miner.py", [*bound, "--wallet.hotkey", late, "--neuron.max_epochs", str(max_epochs - 1)],
                    work / late)
        _wait_for_honest(group, timeout)
    names = (*HONEST, *ADVERSARIES)
    ids = {name: next(e["peer_id"] for e in read_metrics(work / name / "metrics.jsonl", "dht")) for name in names}
    logs = {name: (work / "logs" / f"{name}.log").read_text() for name in names}
    return ClosedSwarmDrill(dirs=[work / name for name in HONEST], adversary=None, logs=logs, peers=ids)
