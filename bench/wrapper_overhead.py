"""(a) Wrapper overhead: one peer's samples/s through the swarm optimizer vs plain torch AdamW.

Both loops train the same model from the same initialisation on the same batches, with the same
gradient accumulation: plain AdamW steps every `accumulate` batches, the swarm optimizer reaches
its target batch size (a global epoch, alone) every `accumulate` batches. The ratio is the cost of
hivemind's bookkeeping, offloaded optimizer and progress reporting on a single peer.

The machine this runs on is usually shared, so one pair of timings means little: the script runs
`--pairs` interleaved (plain, swarm) pairs, swapping which goes first in every other pair, each
loop warmed up before its timed window, and reports the median of the per-pair ratios. Load that
drifts slowly hits both halves of a pair alike and cancels in its ratio; a burst that hits one
half shows up as a spread between min and max, not in the median.

    python bench/wrapper_overhead.py [--pairs 7] [--steps 32] [--warmup 8] [--matchmaking-time 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import torch  # noqa: E402

from report import record, table  # noqa: E402

LR = 1e-3


class Loop(Protocol):
    def train(self, data: Sequence[torch.Tensor]) -> None: ...
    def close(self) -> None: ...


class PlainLoop:
    """What a single machine would run without hivemind: accumulate, clip, AdamW, zero."""

    def __init__(self, model: torch.nn.Module, accumulate: int):
        self.model, self.accumulate, self.batches = model, accumulate, 0
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)

    def train(self, data: Sequence[torch.Tensor]) -> None:
        self.model.train()
        for batch in data:
            self.model(input_ids=batch, labels=batch).loss.backward()
            self.batches += 1
            if self.batches % self.accumulate == 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        pass


class SwarmLoop:
    """The miner's loop: GradientAveragingTrainer.train_batch per batch, alone in a fresh DHT and run."""

    def __init__(self, model: torch.nn.Module, accumulate: int, batch_size: int, matchmaking_time: float, tag: str):
        from distributed_training.swarm.dht import DHTSettings, start_dht
        from distributed_training.training.gradient_averaging import GradientAveragingTrainer
        from distributed_training.training.trainer import TrainerSettings

        # A DHT of its own per swarm run, so no hivemind process is alive during the plain runs.
        self.dht = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
        settings = TrainerSettings(run_id=f"bench-{os.getpid()}-{tag}", batch_size=batch_size,
                                 target_batch_size=batch_size * accumulate, matchmaking_time=matchmaking_time, lr=LR)
        self.trainer = GradientAveragingTrainer(model, self.dht, settings, torch.device("cpu"))
        self.accumulate, self.batches = accumulate, 0

    def train(self, data: Sequence[torch.Tensor]) -> None:
        for batch in data:
            report = self.trainer.train_batch(batch)
            assert not report.skipped, "the benchmark's batches must all be finite"
            self.batches += 1

    def close(self) -> None:
        # Every `accumulate` batches must have been one global epoch, or the loops did different work.
        epochs = self.trainer.local_epoch
        try:
            assert epochs >= self.batches // self.accumulate - 1, \
                f"the swarm optimizer took {epochs} steps for {self.batches} batches"
        finally:
            self.trainer.shutdown()
            self.dht.shutdown()


def batches(source, count: int, batch_size: int) -> list[torch.Tensor]:
    rows, page = [], 0
    while len(rows) < count * batch_size:
        rows.extend(source.page(page))
        page += 1
    return [torch.stack(rows[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def cpu_seconds() -> float:
    """CPU time of this process and its live descendants (hivemind's DHT, averagers, p2pd), Linux only.

    hivemind's background processes cost CPU that wall time misses wherever cores are spare; this
    counts it. (With all cores busy, torch's spinning threads inflate it too: not load-proof.)
    """
    total = time.process_time()
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            children.setdefault(int(fields[1]), []).append(int(entry))
            ticks[int(entry)] = int(fields[11]) + int(fields[12])  # utime + stime
    todo = list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += ticks[pid] / os.sysconf("SC_CLK_TCK")
        todo.extend(children.get(pid, []))
    return total


def timed(make: Callable[[], Loop], warm: Sequence[torch.Tensor], data: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(samples/s, samples per CPU-second) of `data` through a loop already warmed up on `warm`."""
    loop = make()
    try:
        loop.train(warm)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        loop.train(data)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    finally:
        loop.close()
    samples = sum(len(b) for b in data)
    return samples / elapsed, samples / cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=7, help="interleaved (plain, swarm) pairs")
    parser.add_argument("--steps", type=int, default=32, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches before each timed window")
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matchmaking-time", type=float, default=15.0, help="the miner's default")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.steps % args.accumulate or args.warmup % args.accumulate:
        parser.error("--steps and --warmup must be multiples of --accumulate, so each window holds whole epochs")
    torch.set_num_threads(args.threads)

    from distributed_training.data.sources import make_page_source
    from distributed_training.training.model import build_model, get_preset
    from distributed_training.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("local")
    source = make_page_source("local", tokenizer=tokenizer, seq_len=args.seq_len, page_size=4)
    data = batches(source, args.warmup + args.steps, args.batch_size)
    warm, timed_data = data[:args.warmup], data[args.warmup:]
    preset = get_preset(args.preset)

    def model() -> torch.nn.Module:
        return build_model(preset, tokenizer.vocab_size, args.seq_len, seed=0)

    makers: dict[str, Callable[[int], Loop]] = {
        "plain": lambda i: PlainLoop(model(), args.accumulate),
        "swarm": lambda i: SwarmLoop(model(), args.accumulate, args.batch_size, args.matchmaking_time, str(i)),
    }
    rates: dict[str, list[float]] = {"plain": [], "swarm": []}
    per_cpu: dict[str, list[float]] = {"plain": [], "swarm": []}
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    for i in range(args.pairs):
        order = ("plain", "swarm") if i % 2 == 0 else ("swarm", "plain")  # cancels any first/second bias
        pair = {name: timed(lambda: makers[name](i), warm, timed_data) for name in order}
        for name, (rate, cpu_rate) in pair.items():
            rates[name].append(rate)
            per_cpu[name].append(cpu_rate)
        ratios.append(pair["swarm"][0] / pair["plain"][0])
        cpu_ratios.append(pair["swarm"][1] / pair["plain"][1])
        print(f"pair {i + 1}/{args.pairs} ({order[0]} first): plain {pair['plain'][0]:.3g}, "
              f"swarm {pair['swarm'][0]:.3g} samples/s, ratio {ratios[-1]:.3f} "
              f"(per CPU-second {cpu_ratios[-1]:.3f})", file=sys.stderr, flush=True)

    rows = [[label, statistics.median(rates[key]), min(rates[key]), max(rates[key]), statistics.median(per_cpu[key])]
            for key, label in (("plain", "plain AdamW"), ("swarm", "swarm optimizer"))]
    body = table(["loop", "median samples/s", "min", "max", "median samples per CPU-second"], rows)
    body += (f"\n\nratio swarm / plain, median of {args.pairs} interleaved pairs: **{statistics.median(ratios):.3f}** "
             f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.95)\n\n"
             f"the same per CPU-second of the process and its hivemind children (which spare cores would hide "
             f"from wall time): "
             f"{statistics.median(cpu_ratios):.3f} (min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f})")
    note = (f"Model `{args.preset}`, seq_len {args.seq_len}, batch {args.batch_size}, a global step every "
            f"{args.accumulate} batches, {args.warmup} warm-up + {args.steps} timed batches per run, "
            f"matchmaking_time {args.matchmaking_time:g} s, {args.threads} torch threads.")
    if args.no_record:
        print(body + "\n\n" + note)
    else:
        command = ("python bench/wrapper_overhead.py " + " ".join(sys.argv[1:])).strip()
        record("wrapper-overhead", "(a) Wrapper overhead, one peer", command, body + "\n\n" + note)


if __name__ == "__main__":
    main()
