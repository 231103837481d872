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
  or pseudo-gradient (DiLoCo) to the all-reduce: `--cheat.poison nan|scale|noise`, or (`average`)
  sends honest parts but, as the reducer of its span, returns the average x -100 to every member;
- intruder: no registration, no binding: a stranger on the DHT that trains and tries to join the
  run's all-reduce and to download its state;
- hijacker: registered and bound, trains honestly, but serves a random model as its epoch + 3 at
  state-sharing priority 1e9 (and, in DiLoCo, signs that state's digest);
- inflater: registered and bound, trains honestly, but keeps its signed progress record claiming
  epoch 10^6 and 10^9 samples (stored with a longer lifetime than its tracker's, so it stays);
- framer: registered and bound, trains honestly, but its reducer tells each group that another
  member's parts were not finite (the verdicts every member adopts), to have an honest miner banned.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

from ..data.pages import assign_pages
from ..neuron.miner import Miner
from ..protocol import WorkRequest
from .processes import free_port

LIAR_FACTOR = 0.7  # a liar claims a loss 30 % lower than its model's
POISONS = ("nan", "scale", "noise", "average")
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
    elif kind != "average":  # `average` corrupts this peer's reducer, not what it sends (`install_average_poison`)
        raise ValueError(f"unknown poison {kind!r}; one of {', '.join(POISONS)}")


class PoisonerMiner(Miner):
    """Trains and answers like an honest miner, but corrupts its contribution to the all-reduce."""

    kind = "poisoner"

    def __init__(self, config: SimpleNamespace, poison_kind: str = "scale", poison_from: int = 3):
        if poison_kind not in POISONS:
            raise ValueError(f"--cheat.poison must be one of {', '.join(POISONS)}, not {poison_kind!r}")
        if poison_kind == "average":  # before the trainer starts its averager processes, which inherit it
            install_average_poison(poison_from)
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


HIJACK_LEAD = 3  # a hijacker announces its state this many epochs ahead of its own
HIJACK_PRIORITY = 1e9  # and asks to be downloaded from first


class HijackerMiner(Miner):
    """A bound miner that serves a forged state: random parameters as epoch + `lead` (3; 0 forges the swarm's
    own epoch, which only the state digests catch), first in every joiner's list."""

    kind = "hijacker"
    lead = HIJACK_LEAD

    def train(self) -> None:
        self._install_forgery()
        super().train()

    def _install_forgery(self) -> None:
        trainer = self.parts.trainer
        averaging = getattr(trainer, "averaging", None)
        if averaging is None:
            return self._install_swarm_forgery(trainer)
        generator = torch.Generator().manual_seed(1234)
        forged = [torch.randn(p.shape, generator=generator) for p in trainer._global_params]
        forged += [torch.zeros_like(b) for b in trainer._momentum_buffers()]
        count = len(trainer._global_params)

        def forged_state():
            metadata, _ = trainer._state_for_peers()
            metadata["epoch"] = trainer.local_epoch + self.lead
            return metadata, [tensor.clone() for tensor in forged]

        def sign_forgery() -> None:  # a lone liar: it signs only its forged state
            if trainer.settings.state_digests is not None:
                trainer.settings.state_digests.publish(trainer.local_epoch + self.lead, forged[:count])

        start_epoch = averaging.start_epoch

        def start_epoch_first_in_line(epoch: int) -> None:
            start_epoch(epoch)
            averaging.averager.state_sharing_priority = HIJACK_PRIORITY

        averaging.averager.state_source = forged_state
        averaging.start_epoch = start_epoch_first_in_line
        trainer._publish_digest = sign_forgery
        averaging.averager.state_sharing_priority = HIJACK_PRIORITY
        sign_forgery()
        self.metrics.write("hijack", epoch=trainer.local_epoch + self.lead, priority=HIJACK_PRIORITY)

    def __init__(self, config: SimpleNamespace, lead: int = HIJACK_LEAD):
        self.lead = lead
        if config.training.mode != "diloco":  # swarm mode: hivemind holds `get_current_state` from construction on
            from ..swarm.hivemind_private import optimizer as private_optimizer

            private_optimizer.GuardedStateAverager = _forging_state_averager(lead)
        super().__init__(config)

    def _install_swarm_forgery(self, trainer) -> None:
        """Swarm mode: the state averager (`_forging_state_averager`) serves random tensors as epoch + lead;
        its priority stays 1e9 (hivemind resets it to the epoch at every epoch)."""
        state_averager = trainer.optimizer.state_averager

        def first_in_line() -> None:
            while not self.stop_event.is_set():
                state_averager.state_sharing_priority = HIJACK_PRIORITY
                self.stop_event.wait(0.5)

        threading.Thread(target=first_in_line, name="hijacker", daemon=True).start()
        self.metrics.write("hijack", epoch=trainer.local_epoch + self.lead, priority=HIJACK_PRIORITY)


def _forging_state_averager(lead: int):
    from ..swarm.hivemind_private import GuardedStateAverager

    class ForgingStateAverager(GuardedStateAverager):
        def get_current_state(self):
            metadata, tensors, infos = super().get_current_state()
            metadata["epoch"] = self.local_epoch + lead
            generator = torch.Generator().manual_seed(1234)
            return metadata, [torch.randn(t.shape, generator=generator).to(t.dtype) for t in tensors], infos

    # hivemind names a servicer's RPC protocols after its class: under another name no peer could ask it
    ForgingStateAverager.__name__ = ForgingStateAverager.__qualname__ = GuardedStateAverager.__name__
    return ForgingStateAverager


INFLATED_EPOCH, INFLATED_SAMPLES = 10**6, 10**9
INFLATE_EVERY = 5.0  # seconds between re-stores of the lie; it lives 90 s, the tracker's true record 60 s


class InflaterMiner(Miner):
    """A bound miner whose progress record, signed with its own bound key, claims epoch 10^6."""

    kind = "inflater"

    def train(self) -> None:
        from ..swarm.progress import PeerProgress, publish_progress

        def inflate() -> None:
            parts = self.parts
            while not self.stop_event.is_set():
                lie = PeerProgress(parts.peer_id, INFLATED_EPOCH, INFLATED_SAMPLES, 1e9, False, time.time())
                if publish_progress(parts.dht, parts.spec.run_id, lie, lifetime=90.0):
                    self.metrics.write("inflated", epoch=INFLATED_EPOCH)
                self.stop_event.wait(INFLATE_EVERY)

        threading.Thread(target=inflate, name="inflater", daemon=True).start()
        super().train()


def install_average_poison(from_round: int = 0, scale: float = POISON_SCALE) -> Callable[[], None]:
    """From the `from_round`-th all-reduce of each averager process on, this peer's reducer returns the
    robust average x `scale` (-100) for its span, to every member alike; returns the undo."""
    from ..swarm.hivemind_private import allreduce

    runner, honest_average = allreduce.ConsensusAllReduceRunner, allreduce.robust_average
    honest_init, rounds = runner.__init__, [0]

    def counting_init(self, *args, **kwargs) -> None:
        rounds[0] += 1
        honest_init(self, *args, **kwargs)

    def poisoned_average(parts, weights, rule, **kwargs):
        average, verdicts = honest_average(parts, weights, rule, **kwargs)
        return (average * scale if rounds[0] > from_round else average), verdicts

    runner.__init__, allreduce.robust_average = counting_init, poisoned_average

    def undo() -> None:
        runner.__init__, allreduce.robust_average = honest_init, honest_average

    return undo


def install_framing() -> Callable[[], None]:
    """From now on every all-reduce of this process, and of the averager processes it starts, sends back
    verdicts that also call one other sender's parts non-finite (the first in the group's order);
    returns the undo (for a test that starts honest averagers in the same process afterwards)."""
    from ..swarm.hivemind_private import allreduce
    from ..swarm.robust import NON_FINITE, encode_verdicts

    runner = allreduce.ConsensusAllReduceRunner
    honest_init = runner.__init__

    def framing_init(self, *args, **kwargs) -> None:
        honest_init(self, *args, **kwargs)
        me = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else -1
        victims = [index for index in range(len(self.sender_peer_ids)) if index != me]
        reducer = self.tensor_part_reducer
        check = reducer.check_current_part_finished

        def framing_check() -> None:
            index, done = reducer.current_part_index, reducer.current_part_accumulated_from == reducer.num_current_senders
            check()
            if done and victims:
                reducer.part_masks[index] = encode_verdicts({**reducer.verdicts, victims[0]: NON_FINITE})

        reducer.check_current_part_finished = framing_check

    runner.__init__ = framing_init

    def undo() -> None:
        runner.__init__ = honest_init

    return undo


class FramerMiner(Miner):
    """Trains honestly; its reducer accuses another member of non-finite parts in every round."""

    kind = "framer"

    def __init__(self, config: SimpleNamespace):
        install_framing()  # before the trainer starts its averager processes, which inherit it
        super().__init__(config)


CHEATS: dict[str, type[Miner]] = {cls.kind: cls for cls in (DeadMiner, LiarMiner, CopycatMiner, LazyMiner,
                                                            StaleMiner, PoisonerMiner, IntruderMiner, HijackerMiner,
                                                            InflaterMiner, FramerMiner)}


def make_cheat(kind: str, config: SimpleNamespace, copy_uid: Optional[int] = None, poison_kind: str = "scale",
               poison_from: int = 3, hijack_lead: int = HIJACK_LEAD) -> Miner:
    if kind == "copycat":
        if copy_uid is None:
            raise ValueError("a copycat needs --cheat.copy_uid (the uid to copy)")
        return CopycatMiner(config, copy_uid)
    if kind == "poisoner":
        return PoisonerMiner(config, poison_kind, poison_from)
    if kind == "hijacker":
        return HijackerMiner(config, hijack_lead)
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
    parser.add_argument("--cheat.hijack_lead", dest="hijack_lead", type=int, default=HIJACK_LEAD,
                        help="how many epochs past its own a hijacker's forged state claims (0: the swarm's own)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.cheat == "copycat" and args.copy_uid is None:
        parser.error("--cheat copycat needs --cheat.copy_uid")
    return run_neuron("miner", lambda config: make_cheat(args.cheat, config, args.copy_uid, args.poison,
                                                         args.poison_from, args.hijack_lead), rest)


if __name__ == "__main__":
    sys.exit(main())
