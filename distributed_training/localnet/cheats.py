"""The local swarm's cheating miners: each a `Miner` that overrides one hook to earn without the work.

They exist to prove that the validator tells them apart from honest miners, as real processes in
the local swarm (`dt-local-swarm --liars 1 ...`). They are not reachable from `dt-miner`: the local
swarm starts them with `python -m distributed_training.localnet.cheats --cheat KIND <miner flags>`.

- dead: registers and publishes an endpoint, then never answers (crashed, unplugged);
- liar: trains honestly but reports losses 30 % lower than its model gives;
- copycat: trains nothing and answers with the losses of another uid's pages;
- lazy: trains nothing, follows the swarm's model and answers from it;
- stale: trains nothing and answers from the model it started with;
- poisoner: trains, then from epoch `--cheat.poison_from` on sends a corrupted gradient (swarm mode)
  or pseudo-gradient (DiLoCo) to the all-reduce: `--cheat.poison nan|scale|noise`;
- intruder: no registration, no binding: a stranger on the DHT that trains and tries to join the
  run's all-reduce and to download its state.
"""

from __future__ import annotations

import argparse
import math
import sys
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from ..data.pages import assign_pages
from ..neuron.miner import Miner
from ..protocol import WorkRequest
from .processes import free_port

LIAR_FACTOR = 0.7  # a liar claims a loss 30 % lower than its model's
POISONS = ("nan", "scale", "noise")
POISON_SCALE = -100.0  # `scale`: the honest update, reversed and a hundred times larger
NOISE_NORM = 10.0  # `noise`: a random direction, ten times the honest norm
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


@torch.no_grad()
def poison(tensors: Sequence[torch.Tensor], kind: str) -> None:
    """Corrupt what is about to be sent, in place."""
    if kind == "nan":
        tensors[0].view(-1)[0] = float("nan")  # a single NaN is enough against a plain sum
    elif kind == "scale":
        for tensor in tensors:
            tensor.mul_(POISON_SCALE)
    elif kind == "noise":
        for tensor in tensors:
            norm = float(tensor.norm())
            tensor.copy_(torch.randn_like(tensor) * (NOISE_NORM * norm / math.sqrt(max(tensor.numel(), 1))))
    else:
        raise ValueError(f"unknown poison {kind!r}; one of {', '.join(POISONS)}")


class PoisonerMiner(Miner):
    """Trains and answers like an honest miner, but corrupts its contribution to the all-reduce."""

    kind = "poisoner"

    def __init__(self, config: SimpleNamespace, poison_kind: str = "scale", poison_from: int = 3):
        if poison_kind not in POISONS:
            raise ValueError(f"--cheat.poison must be one of {', '.join(POISONS)}, not {poison_kind!r}")
        super().__init__(config)
        self.poison_kind, self.poison_from = poison_kind, poison_from
        self.poisoned_rounds = 0

    def train(self) -> None:
        self._install_poison()
        super().train()

    def _install_poison(self) -> None:
        trainer = self.parts.trainer
        averaging = getattr(trainer, "averaging", None)
        if averaging is not None:  # DiLoCo: the pseudo-gradient buffers, right before the outer all-reduce
            average = averaging.average

            def poisoned_average(weight: float, epoch: int):
                if epoch >= self.poison_from:
                    with averaging.buffers() as buffers:
                        poison(buffers, self.poison_kind)
                    self.poisoned_rounds += 1
                    self.metrics.write("poisoned", epoch=epoch, poison=self.poison_kind)
                return average(weight, epoch)

            averaging.average = poisoned_average
        else:  # swarm mode: the epoch's gradient, once hivemind has loaded it into the averager
            grad_averager = trainer.optimizer.grad_averager
            load = grad_averager.load_accumulators_into_averager_

            def poisoned_load():
                load()
                if trainer.local_epoch >= self.poison_from:
                    with grad_averager.get_tensors() as tensors:
                        poison(tensors, self.poison_kind)
                    self.poisoned_rounds += 1
                    self.metrics.write("poisoned", epoch=trainer.local_epoch, poison=self.poison_kind)

            grad_averager.load_accumulators_into_averager_ = poisoned_load


class IntruderMiner(Miner):
    """A plain miner without a wallet (`--neuron.swarm_only`, whatever its flags say): it binds nothing."""

    kind = "intruder"

    def __init__(self, config: SimpleNamespace):
        config.neuron.swarm_only = True
        super().__init__(config)


CHEATS: dict[str, type[Miner]] = {cls.kind: cls for cls in (DeadMiner, LiarMiner, CopycatMiner, LazyMiner,
                                                            StaleMiner, PoisonerMiner, IntruderMiner)}


def make_cheat(kind: str, config: SimpleNamespace, copy_uid: Optional[int] = None, poison_kind: str = "scale",
               poison_from: int = 3) -> Miner:
    if kind == "copycat":
        if copy_uid is None:
            raise ValueError("a copycat needs --cheat.copy_uid (the uid to copy)")
        return CopycatMiner(config, copy_uid)
    if kind == "poisoner":
        return PoisonerMiner(config, poison_kind, poison_from)
    return CHEATS[kind](config)


def main(argv: Optional[list[str]] = None) -> int:
    """`--cheat KIND [--cheat.copy_uid N]`, then every dt-miner flag."""
    from ..neuron.entry import run_neuron

    parser = argparse.ArgumentParser(prog="cheating-miner", allow_abbrev=False)
    parser.add_argument("--cheat", choices=sorted(CHEATS), required=True)
    parser.add_argument("--cheat.copy_uid", dest="copy_uid", type=int, default=None)
    parser.add_argument("--cheat.poison", dest="poison", choices=POISONS, default="scale")
    parser.add_argument("--cheat.poison_from", dest="poison_from", type=int, default=3,
                        help="the first epoch whose contribution is poisoned")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.cheat == "copycat" and args.copy_uid is None:
        parser.error("--cheat copycat needs --cheat.copy_uid")
    return run_neuron("miner", lambda config: make_cheat(args.cheat, config, args.copy_uid, args.poison,
                                                         args.poison_from), rest)


if __name__ == "__main__":
    sys.exit(main())
