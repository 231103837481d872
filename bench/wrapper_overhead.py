"""(a) Wrapper overhead: one peer's samples/s through the swarm optimizer vs plain torch AdamW.

Both loops train the same model from the same initialisation on the same batches, with the same
gradient accumulation: plain AdamW steps every `accumulate` batches, the swarm optimizer reaches
its target batch size (a global epoch, alone) every `accumulate` batches. The ratio is the cost of
hivemind's bookkeeping, offloaded optimizer and progress reporting on a single peer.

    python bench/wrapper_overhead.py [--steps 120] [--preset tiny] [--seq-len 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import torch  # noqa: E402

from report import record, table  # noqa: E402


def batches(source, count: int, batch_size: int) -> list[torch.Tensor]:
    rows, page = [], 0
    while len(rows) < count * batch_size:
        rows.extend(source.page(page))
        page += 1
    return [torch.stack(rows[i * batch_size:(i + 1) * batch_size]) for i in range(count)]


def run_plain(model, data, accumulate: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    started = time.perf_counter()
    for i, batch in enumerate(data):
        model(input_ids=batch, labels=batch).loss.backward()
        if (i + 1) % accumulate == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return sum(len(b) for b in data) / (time.perf_counter() - started)


def run_swarm(model, data, accumulate: int, lr: float) -> float:
    from distributed_training.training.dht import DHTSettings, start_dht
    from distributed_training.training.swarm import SwarmSettings, SwarmTrainer

    dht = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
    batch_size = len(data[0])
    trainer = SwarmTrainer(model, dht, SwarmSettings(run_id=f"bench-{os.getpid()}", batch_size=batch_size,
                                                     target_batch_size=batch_size * accumulate, matchmaking_time=1.0,
                                                     lr=lr), torch.device("cpu"))
    try:
        started = time.perf_counter()
        for batch in data:
            trainer.train_batch(batch)
        elapsed = time.perf_counter() - started
        assert trainer.local_epoch >= len(data) // accumulate - 1, "the swarm optimizer did not take its steps"
        return sum(len(b) for b in data) / elapsed
    finally:
        trainer.shutdown()
        dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from distributed_training.training.data import make_page_source
    from distributed_training.training.presets import build_model, get_preset
    from distributed_training.training.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("local")
    source = make_page_source("local", tokenizer=tokenizer, seq_len=args.seq_len, page_size=4)
    data = batches(source, args.warmup + args.steps, args.batch_size)
    preset = get_preset(args.preset)
    results = {}
    # Alternate the two (plain, swarm, plain, swarm) so drift in machine load hits both alike.
    for name, runner in (("plain AdamW", run_plain), ("swarm optimizer", run_swarm)) * 2:
        model = build_model(preset, tokenizer.vocab_size, args.seq_len, seed=0)
        runner(model, data[:args.warmup], args.accumulate, 1e-3)  # warm-up: allocations, first compile paths
        model = build_model(preset, tokenizer.vocab_size, args.seq_len, seed=0)
        rate = runner(model, data[args.warmup:], args.accumulate, 1e-3)
        results.setdefault(name, []).append(rate)
    plain = max(results["plain AdamW"])
    swarm = max(results["swarm optimizer"])
    rows = [[name, max(rates), min(rates)] for name, rates in results.items()]
    body = table(["loop", "best samples/s", "worst samples/s"], rows)
    body += f"\n\nratio swarm / plain (best of 2 each): **{swarm / plain:.3f}** (target >= 0.95)"
    command = "python bench/wrapper_overhead.py " + " ".join(sys.argv[1:])
    if args.no_record:
        print(body)
    else:
        record("wrapper-overhead", "(a) Wrapper overhead, one peer",
               command.strip(), body + f"\n\nModel `{args.preset}`, seq_len {args.seq_len}, batch {args.batch_size}, "
                                       f"a global step every {args.accumulate} batches, {args.threads} torch threads.")


if __name__ == "__main__":
    main()
