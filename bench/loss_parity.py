"""(c) Loss parity: the swarm versus one process at equal samples seen.

For each training mode (`swarm`: one AdamW step per global epoch on the all-reduced gradient;
`diloco`: inner AdamW steps and an outer Nesterov step on the all-reduced pseudo-gradient), N miner
processes train together on 127.0.0.1 through a DHT node until a fixed number of global epochs.
The reference is one process of plain torch: the same preset, initialisation seed, optimizer
(AdamW, betas, weight decay, clipping, constant learning rate: what `GradientAveragingTrainer` wraps), the same
pages (the miners' own `assign_pages` streams for uids 0..N-1, interleaved), gradient accumulation
to the swarm's `target_batch_size`, and exactly as many samples as the swarm's miners trained in
total. Every final model is loaded from its checkpoint and evaluated by the same `page_losses` on
held-out pages that no run trained on. A last in-process check runs one `GradientAveragingTrainer` alone
against plain AdamW on the same batches, which isolates the wrapper from the swarm.

    python bench/loss_parity.py [--peers 3] [--epochs 12] [--diloco-epochs 6] [--lr 5e-3] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import torch  # noqa: E402

from report import record, table  # noqa: E402

TARGETS = {"swarm": 0.03, "diloco": 0.05}  # issue 5 (c): relative excess of the swarm's final loss


@dataclass
class SwarmRun:
    mode: str
    samples: int  # summed over peers: every sample a miner trained on
    per_peer: list[int]
    epochs: int
    full_groups: int  # global epochs whose all-reduce included every peer (as seen by peer 0)
    inner_steps: int  # local optimizer steps over all peers (diloco); local batches (swarm)
    models: list[dict[str, torch.Tensor]]  # each peer's final (global) model, from its checkpoint
    max_peer_diff: float
    wall_s: float
    peer_loss_spread: float = 0.0


def miner_args(args: argparse.Namespace, mode: str, uid: int, run_id: str, peers: Sequence[str]) -> list[str]:
    target = args.target_batch_size if mode == "swarm" else args.diloco_target_batch_size
    epochs = args.epochs if mode == "swarm" else args.diloco_epochs
    return [
        "--neuron.swarm_only", "--wandb.off", "--training.mode", mode, "--model.preset", args.preset,
        "--model.seq_len", str(args.seq_len), "--neuron.seed", str(args.seed), "--data.seed", str(args.data_seed),
        "--neuron.pages_per_round", str(args.pages_per_round), "--neuron.batch_size", str(args.batch_size),
        "--neuron.target_batch_size", str(target), "--neuron.lr", str(args.lr),
        "--neuron.matchmaking_time", str(args.matchmaking_time), "--neuron.averaging_timeout", "30",
        "--neuron.torch_threads", "1", "--neuron.checkpoint_every", "0",  # the miner saves at exit anyway
        "--dht.bootstrap_timeout", "120", "--neuron.uid", str(uid), "--neuron.run_id", run_id,
        "--dht.initial_peers", ",".join(peers), "--neuron.max_epochs", str(epochs),
        "--neuron.wait_for_peers", str(args.peers),
    ]


def run_swarm(args: argparse.Namespace, mode: str, work: Path) -> SwarmRun:
    """N miner processes in `mode` until their epoch limit; their checkpoints and metrics."""
    from distributed_training.logs import read_metrics
    from distributed_training.localnet.processes import ProcessGroup
    from distributed_training.training.checkpoint import load_checkpoint

    run_id = f"parity-{mode}-{uuid.uuid4().hex[:6]}"
    names = [f"{mode}-m{uid}" for uid in range(args.peers)]
    started = time.monotonic()
    with ProcessGroup(work / "logs") as group:
        peers = group.initial_peers(group.start_dht_node(f"{mode}-dht", work / f"{mode}-dht"))
        for uid, name in enumerate(names):
            # the miners log hivemind's warnings (failed all-reduces), not this process's ERROR level
            group.start(name, "miner.py", miner_args(args, mode, uid, run_id, peers), work / name,
                        env={"HIVEMIND_LOGLEVEL": None})
        for name in names:
            code = group.wait(name, timeout=max(1.0, args.timeout - (time.monotonic() - started)))
            if code != 0:
                raise RuntimeError(f"{name} exited with {code}:\n{group.members[name].log_tail()}")
    wall = time.monotonic() - started
    states = [load_checkpoint(work / name) for name in names]
    if any(state is None for state in states):
        raise RuntimeError(f"a {mode} miner left no checkpoint; see {work / 'logs'}")
    reference = states[0]["model"]
    diff = max(((state["model"][k] - v).abs().max().item() for state in states[1:] for k, v in reference.items()),
               default=0.0)
    epochs = read_metrics(work / names[0] / "metrics.jsonl", "epoch")
    steps = sum(len(read_metrics(work / name / "metrics.jsonl", "step")) for name in names)
    per_peer = [int(state["samples_trained"]) for state in states]
    return SwarmRun(mode=mode, samples=sum(per_peer), per_peer=per_peer, epochs=int(states[0]["local_epoch"]),
                    full_groups=sum(1 for e in epochs if e.get("group_size") == args.peers), inner_steps=steps,
                    models=[state["model"] for state in states], max_peer_diff=diff, wall_s=wall)


def uid_stream(source, uid: int, data_seed: int, pages_per_round: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The batches a miner of `uid` trains on when no validator asks it about pages (as the miner does)."""
    from distributed_training.data.pages import batches, training_pages

    return batches(source, training_pages(uid, data_seed, pages_per_round=pages_per_round,
                                          num_pages=source.num_pages), batch_size)


def reference_batches(args: argparse.Namespace, source, samples: int) -> list[torch.Tensor]:
    """`samples` sequences in batches, round-robin over the uids' streams: each step mixes every peer's data."""
    streams = [uid_stream(source, uid, args.data_seed, args.pages_per_round, args.batch_size)
               for uid in range(args.peers)]
    return [next(streams[i % len(streams)]) for i in range(samples // args.batch_size)]


@dataclass
class ReferencePoint:
    steps: int
    samples: int
    model: dict[str, torch.Tensor]


def train_reference(args: argparse.Namespace, source, vocab_size: int, samples: int) -> list[ReferencePoint]:
    """Plain AdamW on exactly `samples` samples in n = round(samples / target) steps; also after n-1 and n+1.

    The samples are spread evenly over the n steps (so each is within target / 2n of the target):
    a short last step instead would still move AdamW by a full step, however few its samples.
    The points one step before and after show how far one step moves the loss there.
    """
    from distributed_training.training.model import build_model, get_preset
    from distributed_training.training.model import loss_and_gradients
    from distributed_training.training.trainer import ClippedAdamW

    cpu = torch.device("cpu")
    model = build_model(get_preset(args.preset), vocab_size, args.seq_len, seed=args.seed)
    optimizer = ClippedAdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                             max_grad_norm=args.grad_clip)
    total = samples // args.batch_size
    steps = max(1, round(samples / args.target_batch_size))
    sizes = [total // steps + (1 if i < total % steps else 0) for i in range(steps)]  # batches per step
    sizes.append(sizes[-1])
    batches = reference_batches(args, source, sum(sizes) * args.batch_size)
    points, done = [], 0
    for number, size in enumerate(sizes, start=1):
        for batch in batches[done:done + size]:
            _, problem = loss_and_gradients(model, batch, cpu)
            assert problem is None, problem
        for param in model.parameters():  # the mean gradient over the step's samples, as hivemind averages it
            if param.grad is not None:
                param.grad.div_(size)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done += size
        if number >= steps - 1:
            points.append(ReferencePoint(number, done * args.batch_size,
                                         {k: v.detach().clone() for k, v in model.state_dict().items()}))
        if number % 5 == 0:
            print(f"reference: {done * args.batch_size} samples, {number} steps", file=sys.stderr)
    if steps == 1:  # no "one step fewer": the initial model stands in
        points.insert(0, ReferencePoint(0, 0, build_model(get_preset(args.preset), vocab_size, args.seq_len,
                                                          seed=args.seed).state_dict()))
    return points


def eval_loss(args: argparse.Namespace, vocab_size: int, state: dict[str, torch.Tensor], pages) -> float:
    """Mean next-token loss over the held-out pages, by the trainers' own `page_losses`."""
    from distributed_training.training.model import build_model, get_preset
    from distributed_training.training.model import page_losses

    model = build_model(get_preset(args.preset), vocab_size, args.seq_len, seed=args.seed)
    model.load_state_dict(state)
    losses = page_losses(model, pages, torch.device("cpu"))
    return sum(losses) / len(losses)


def optimizer_check(args: argparse.Namespace, source, vocab_size: int, steps: int = 3,
                    accumulate: int = 2) -> tuple[float, list[float]]:
    """One `GradientAveragingTrainer` alone against plain AdamW on the same batches, in this process.

    With no peers the swarm optimizer's step is the plain one, so any difference is the wrapper's:
    returns the offloaded optimizer's step count before training, and the largest parameter
    difference after each step.
    """
    from distributed_training.swarm.dht import DHTSettings, start_dht
    from distributed_training.training.model import build_model, get_preset
    from distributed_training.training.gradient_averaging import GradientAveragingTrainer
    from distributed_training.training.model import loss_and_gradients
    from distributed_training.training.trainer import ClippedAdamW, TrainerSettings

    cpu = torch.device("cpu")
    stream = uid_stream(source, 0, args.data_seed, args.pages_per_round, args.batch_size)
    batches = [next(stream) for _ in range(steps * accumulate)]
    plain = build_model(get_preset(args.preset), vocab_size, args.seq_len, seed=args.seed)
    optimizer = ClippedAdamW(plain.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                             max_grad_norm=args.grad_clip)
    dht = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
    trainer = GradientAveragingTrainer(build_model(get_preset(args.preset), vocab_size, args.seq_len, seed=args.seed), dht,
                           TrainerSettings(run_id=f"parity-check-{uuid.uuid4().hex[:6]}", batch_size=args.batch_size,
                                         target_batch_size=args.batch_size * accumulate, matchmaking_time=1.0,
                                         lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip), cpu)
    try:
        inner = trainer.optimizer.state_averager.optimizer  # the AdamW hivemind steps (offloaded copies)
        started_at = max((float(state["step"]) for state in inner.state.values()), default=0.0)
        diffs = []
        for i, batch in enumerate(batches):
            trainer.train_batch(batch)
            loss_and_gradients(plain, batch, cpu)
            if (i + 1) % accumulate == 0:
                for param in plain.parameters():
                    param.grad.div_(accumulate)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                diffs.append(max((a - b).abs().max().item() for a, b in zip(plain.parameters(),
                                                                             trainer.model.parameters())))
        assert trainer.local_epoch == steps, f"the swarm optimizer took {trainer.local_epoch} steps, not {steps}"
        return started_at, diffs
    finally:
        trainer.shutdown()
        dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--modes", default="swarm,diloco")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--target-batch-size", type=int, default=192)
    parser.add_argument("--epochs", type=int, default=12, help="global epochs in the default (swarm) mode")
    parser.add_argument("--diloco-target-batch-size", type=int, default=384)
    parser.add_argument("--diloco-epochs", type=int, default=6, help="outer steps in DiLoCo mode")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--matchmaking-time", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--pages-per-round", type=int, default=16)
    parser.add_argument("--eval-pages", type=int, default=64, help="held-out pages to evaluate on (0: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one swarm run may take")
    parser.add_argument("--work-dir", default=None, help="keep miners' state and logs here (default: a temp dir)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.target_batch_size % args.batch_size:
        parser.error("--target-batch-size must be a multiple of --batch-size")
    torch.set_num_threads(args.threads)

    from distributed_training.neuron.setup import build_data
    from distributed_training.config import parse_config
    from distributed_training.training.trainer import TrainerSettings

    # The optimizer's fixed hyper-parameters come from the miner's own defaults, so the reference follows them.
    defaults = parse_config("miner", [], env={}, dotenv_path=Path(os.devnull))
    args.weight_decay, args.grad_clip = defaults.neuron.weight_decay, defaults.neuron.grad_clip
    assert (TrainerSettings.weight_decay, TrainerSettings.grad_clip) == (args.weight_decay, args.grad_clip)
    config = parse_config("miner", ["--model.preset", args.preset, "--model.seq_len", str(args.seq_len)], env={},
                          dotenv_path=Path(os.devnull))
    _, _, tokenizer, source = build_data(config)
    eval_ids = source.eval_page_ids()[:args.eval_pages or None]
    eval_pages = [source.page(p) for p in eval_ids]

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dt-parity-"))
    runs: list[SwarmRun] = []
    try:
        for mode in args.modes.split(","):
            print(f"{mode}: {args.peers} miners", file=sys.stderr)
            run = run_swarm(args, mode, work)
            print(f"{mode}: {run.samples} samples in {run.epochs} epochs, {run.wall_s:.0f}s", file=sys.stderr)
            runs.append(run)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    references = {run.mode: train_reference(args, source, tokenizer.vocab_size, run.samples) for run in runs}
    reference_s = time.monotonic() - started

    check_step, check_diffs = optimizer_check(args, source, tokenizer.vocab_size)

    from distributed_training.training.model import build_model, get_preset

    vocab = tokenizer.vocab_size
    initial = eval_loss(args, vocab, build_model(get_preset(args.preset), vocab, args.seq_len, seed=args.seed)
                        .state_dict(), eval_pages)
    rows = []
    for run in runs:
        points = references[run.mode]
        fewer, ref_loss, more = (eval_loss(args, vocab, point.model, eval_pages) for point in points)
        peer_losses = [eval_loss(args, vocab, model, eval_pages) for model in run.models]
        swarm_loss = peer_losses[0]
        run.peer_loss_spread = max(peer_losses) - min(peer_losses)
        excess = (swarm_loss - ref_loss) / ref_loss
        target = TARGETS[run.mode]
        ok = excess <= target  # a swarm that ends lower than the reference has lost nothing
        steps = (f"{run.epochs} global" if run.mode == "swarm"
                 else f"{run.epochs} outer, {run.inner_steps} inner (all peers)")
        rows.append([run.mode, f"{run.samples} ({' + '.join(map(str, run.per_peer))})", steps,
                     f"{points[1].samples} ({points[1].steps} steps)", f"{swarm_loss:.4f}", f"{ref_loss:.4f}",
                     f"{fewer:.4f} / {more:.4f}", f"{excess:+.2%}", f"+{target:.0%}",
                     "**met**" if ok else "**missed**"])
    body = table(["mode", "swarm samples (per peer)", "swarm steps", "reference samples (steps)",
                  "swarm eval loss", "reference eval loss", "reference 1 step fewer / more", "difference",
                  "target", "result"], rows)
    notes = [f"- Eval loss of the initial model: {initial:.4f}; {len(eval_pages)} held-out pages "
             f"({len(eval_pages) * source.page_size} sequences of {args.seq_len} tokens) that no run trained on, "
             "through the trainers' `page_losses`. Difference: (swarm - reference) / reference; the target is "
             "met when the swarm's loss is at most that much above the reference's (lower is better)."]
    for run in runs:
        target = args.target_batch_size if run.mode == "swarm" else args.diloco_target_batch_size
        notes.append(f"- `{run.mode}`: {args.peers} miner processes, target_batch_size {target}, "
                     f"{run.samples / max(run.epochs, 1):.0f} samples per global epoch on average; "
                     f"{run.full_groups} of {run.epochs} epochs averaged all {args.peers} peers (peer 0's view); "
                     f"largest parameter difference between the peers' final models {run.max_peer_diff:.2g}, "
                     f"between their eval losses {run.peer_loss_spread:.2g} (the table shows peer 0's); "
                     f"{run.wall_s:.0f} s from start to the last exit.")
    notes.append(f"- Reference: one process, plain torch AdamW (`ClippedAdamW`, what the swarm wraps), lr {args.lr:g} "
                 f"constant (the miners have no schedule or warm-up), betas 0.9/0.95, weight decay "
                 f"{args.weight_decay:g}, gradient norm clipped to {args.grad_clip:g}; {args.target_batch_size} "
                 f"samples per step (the swarm's count spread evenly over the nearest whole number of steps), "
                 f"accumulated from batches of {args.batch_size} drawn in turn from uids 0..{args.peers - 1}'s "
                 f"page assignments (the miners' own streams); {reference_s:.0f} s for both.")
    notes.append(f"- Wrapper check: one `GradientAveragingTrainer` alone against plain AdamW on the same batches (a step "
                 f"every {2 * args.batch_size} samples): largest parameter difference "
                 f"{', '.join(f'{d:.2g}' for d in check_diffs)} after steps 1..{len(check_diffs)}; hivemind's "
                 f"AdamW had already counted {check_step:g} step(s) before training.")
    body += "\n\n" + "\n".join(notes)
    body += (f"\n\nModel `{args.preset}` (seed {args.seed}, 3.3 M parameters), seq_len {args.seq_len}, batch "
             f"{args.batch_size}, {args.pages_per_round} pages per round from the offline corpus (data seed "
             f"{args.data_seed}), AdamW (inner) lr {args.lr:g}, matchmaking {args.matchmaking_time:g} s, "
             f"1 torch thread per miner, {args.threads} for the reference. DiLoCo: outer Nesterov SGD with the "
             "defaults (lr 0.7, momentum 0.9); a round ends at its target_batch_size, "
             f"{args.diloco_target_batch_size // (args.peers * args.batch_size)} inner steps per peer.")
    command = "python bench/loss_parity.py " + " ".join(sys.argv[1:])
    if args.no_record:
        print(body)
    else:
        record("loss-parity", "(c) Loss parity, swarm vs one process", command.strip(), body)
    os._exit(0)  # hivemind's threads (the wrapper check's DHT) take long to wind down; the figures are written


if __name__ == "__main__":
    main()
