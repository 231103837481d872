"""The local swarm's cheating miners: each a `Miner` that overrides one hook to earn without the work.

They exist to prove that the validator tells them apart from honest miners, as real processes in
the local swarm (`dt-local-swarm --liars 1 ...`). They are not reachable from `dt-miner`: the local
swarm starts them with `python -m distributed_training.localnet.cheats --cheat KIND <miner flags>`.

- dead: registers and publishes an endpoint, then never answers (crashed, unplugged);
- liar: trains honestly but reports losses 30 % lower than its model gives;
- copycat: trains nothing and answers with the losses of another uid's pages;
- lazy: trains nothing, follows the swarm's model and answers from it;
- stale: trains nothing and answers from the model it started with.
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace
from typing import Optional

from ..data.pages import assign_pages
from ..neuron.miner import Miner
from ..protocol import WorkRequest
from .processes import free_port

LIAR_FACTOR = 0.7  # a liar claims a loss 30 % lower than its model's
FOLLOW_INTERVAL = 1.0  # seconds between catch-ups of miners that do not train


class DeadMiner(Miner):
    kind = "dead"

    def run(self) -> int:
        if self.identity is not None:
            self.identity.publish_endpoint(port=self.config.axon.port or free_port())
        self.metrics.write("start", kind=self.kind, uid=self.uid)
        self.stop_event.wait()
        return 0


class LiarMiner(Miner):
    kind = "liar"

    def answer_losses(self, epoch: int, page_ids: list[int]) -> list[float]:
        return [loss * LIAR_FACTOR for loss in super().answer_losses(epoch, page_ids)]


class LazyMiner(Miner):
    kind = "lazy"

    def train(self) -> None:
        while not self.stop_event.wait(FOLLOW_INTERVAL):
            if self.parts.trainer.catch_up():
                self.snapshot()


class StaleMiner(Miner):
    kind = "stale"

    def train(self) -> None:
        self.stop_event.wait()


class CopycatMiner(LazyMiner):
    """Answers with what the copied uid answers: the losses on *its* pages of this round."""

    kind = "copycat"

    def __init__(self, config: SimpleNamespace, copy_uid: int):
        super().__init__(config)
        self.copy_uid = copy_uid

    def answer_pages(self, req: WorkRequest) -> list[int]:
        return assign_pages(self.copy_uid, req.round, self.config.data.seed, pages_per_uid=len(req.pages),
                            num_pages=self.parts.source.num_pages)


CHEATS: dict[str, type[Miner]] = {cls.kind: cls for cls in (DeadMiner, LiarMiner, CopycatMiner, LazyMiner,
                                                            StaleMiner)}


def make_cheat(kind: str, config: SimpleNamespace, copy_uid: Optional[int] = None) -> Miner:
    if kind == "copycat":
        if copy_uid is None:
            raise ValueError("a copycat needs --cheat.copy_uid (the uid to copy)")
        return CopycatMiner(config, copy_uid)
    return CHEATS[kind](config)


def main(argv: Optional[list[str]] = None) -> int:
    """`--cheat KIND [--cheat.copy_uid N]`, then every dt-miner flag."""
    from ..neuron.entry import run_neuron

    parser = argparse.ArgumentParser(prog="cheating-miner", allow_abbrev=False)
    parser.add_argument("--cheat", choices=sorted(CHEATS), required=True)
    parser.add_argument("--cheat.copy_uid", dest="copy_uid", type=int, default=None)
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.cheat == "copycat" and args.copy_uid is None:
        parser.error("--cheat copycat needs --cheat.copy_uid")
    return run_neuron("miner", lambda config: make_cheat(args.cheat, config, args.copy_uid), rest)


if __name__ == "__main__":
    sys.exit(main())
