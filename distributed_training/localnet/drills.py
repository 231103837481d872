"""Attack drills: two honest miners and one adversary as real processes, read back from their state dirs.

The swarm tier's attack tests and `bench/poisoning.py` run the same drill, so the figures the bench
publishes are those of the code the tests check. A drill without an adversary is the reference.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import parse_config
from ..logs import read_metrics
from ..neuron.setup import build_data
from ..training.checkpoint import load_checkpoint
from ..training.model import build_model, get_preset, page_losses
from .processes import ProcessGroup

HONEST = ("m0", "m1")
POISON_FROM = 3  # the first epoch whose contribution a poisoner corrupts
DRILL_FLAGS = [
    "--neuron.swarm_only", "--model.preset", "tiny", "--model.seq_len", "32", "--neuron.batch_size", "4",
    "--neuron.matchmaking_time", "4", "--neuron.averaging_timeout", "30", "--neuron.lr", "3e-3",
    "--neuron.torch_threads", "1", "--dht.bootstrap_timeout", "120", "--wandb.off",
]
MODE_FLAGS = {
    "swarm": ["--training.mode", "swarm", "--neuron.target_batch_size", "240"],
    "diloco": ["--training.mode", "diloco", "--neuron.target_batch_size", "120"],
}


@dataclass
class Drill:
    dirs: list[Path]  # the honest miners' state dirs
    logs: dict[str, str]  # their logs
    adversary: Optional[str]  # the adversary's peer id

    def epochs(self, index: int) -> list[dict]:
        return read_metrics(self.dirs[index] / "metrics.jsonl", "epoch")

    @staticmethod
    def epochs_of(state_dir: Path) -> list[dict]:
        return read_metrics(state_dir / "metrics.jsonl", "epoch")

    def skips(self, index: int) -> list[dict]:
        return read_metrics(self.dirs[index] / "metrics.jsonl", "skip")

    def largest_difference(self) -> float:
        """The largest parameter difference between the honest miners' final models."""
        first, second = (load_checkpoint(d)["model"] for d in self.dirs)
        return max((first[name] - second[name]).abs().max().item() for name in first)


def _wait_for_honest(group: ProcessGroup, timeout: float) -> None:
    """Until every honest miner ended; one that failed is an error with its log's tail."""
    for name in HONEST:
        code = group.wait(name, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}:\n{group.members[name].log_tail()}")


def run_poison_drill(work: Path, mode: str, poison: Optional[str], max_epochs: int = 6, timeout: float = 400,
                     third_honest: bool = False) -> Drill:
    """Two honest miners, and a poisoner from `POISON_FROM` on (`poison` None: a reference run, of the two
    alone or, with `third_honest`, with an honest miner in the poisoner's place: the same split of each
    epoch's samples three ways, so that the only difference from a poisoned run is the poison)."""
    if poison and third_honest:
        raise ValueError("a drill has a poisoner or a third honest miner, not both")
    run_id = f"drill-{uuid.uuid4().hex[:8]}"
    with ProcessGroup(work / "logs") as group:
        peers = group.initial_peers(group.start_dht_node("dht", work / "dht"))
        common = [*DRILL_FLAGS, *MODE_FLAGS[mode], "--neuron.max_epochs", str(max_epochs), "--neuron.run_id", run_id,
                  "--dht.initial_peers", ",".join(peers),
                  "--neuron.wait_for_peers", "3" if poison or third_honest else "2"]
        for uid, name in enumerate(HONEST):
            group.start(name, "miner.py", [*common, "--neuron.uid", str(uid)], work / name)
        if third_honest:
            group.start("m2", "miner.py", [*common, "--neuron.uid", "2"], work / "m2")
        if poison:
            group.start("poisoner", "distributed_training.localnet.cheats",
                        [*common, "--neuron.uid", "2", "--cheat", "poisoner", "--cheat.poison", poison,
                         "--cheat.poison_from", str(POISON_FROM)], work / "poisoner")
        _wait_for_honest(group, timeout)
    adversary = None
    if poison:
        adversary = next(e["peer_id"] for e in read_metrics(work / "poisoner" / "metrics.jsonl", "dht"))
    return Drill(dirs=[work / name for name in HONEST], adversary=adversary,
                 logs={name: (work / "logs" / f"{name}.log").read_text() for name in HONEST})


def held_out_loss(state_dir: Path, pages: int = 32) -> float:
    """Mean loss of a drill miner's final model on held-out pages no miner trains on."""
    config = parse_config("miner", ["--model.preset", "tiny", "--model.seq_len", "32"], env={},
                          dotenv_path=Path(os.devnull))
    _, _, tokenizer, source = build_data(config)
    eval_pages = [source.page(p) for p in source.eval_page_ids()[:pages]]
    model = build_model(get_preset("tiny"), tokenizer.vocab_size, 32)
    model.load_state_dict(load_checkpoint(state_dir)["model"])
    losses = page_losses(model, eval_pages, torch.device("cpu"))
    return sum(losses) / len(losses)
