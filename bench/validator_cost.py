"""(d) Validator cost: verifying one miner versus that miner's work in one round.

A round assigns a miner `--pages-per-round` pages; its work is training on them (forward,
backward and gradient accumulation through the swarm optimizer). Verifying it costs the
validator a forward pass over `--verify-pages` of those pages against its epoch snapshot. Both
run here, in one process, on the same model and pages.

    python bench/validator_cost.py [--preset tiny] [--seq-len 64] [--pages-per-round 16] [--verify-pages 2]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--page-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pages-per-round", type=int, default=16)
    parser.add_argument("--verify-pages", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from distributed_training.data.pages import assign_pages
    from distributed_training.data.sources import make_page_source
    from distributed_training.swarm.dht import DHTSettings, start_dht
    from distributed_training.training.model import build_model, get_preset
    from distributed_training.training.snapshots import ModelSnapshots
    from distributed_training.training.gradient_averaging import GradientAveragingTrainer
    from distributed_training.training.trainer import TrainerSettings
    from distributed_training.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("local")
    source = make_page_source("local", tokenizer=tokenizer, seq_len=args.seq_len, page_size=args.page_size)
    model = build_model(get_preset(args.preset), tokenizer.vocab_size, args.seq_len, seed=0)
    dht = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
    trainer = GradientAveragingTrainer(model, dht, TrainerSettings(run_id=f"bench-{os.getpid()}", batch_size=args.batch_size,
                                                     target_batch_size=10**9), torch.device("cpu"))
    snapshots = ModelSnapshots(model, keep=1)
    snapshots.add(0, trainer.shared_state())
    work, verify = [], []
    try:
        for round_ in range(args.repeats + 1):
            pages = assign_pages(1, round_, 0, pages_per_uid=args.pages_per_round, num_pages=source.num_pages)
            rows = torch.cat([source.page(p) for p in pages])
            started = time.perf_counter()
            for i in range(0, len(rows), args.batch_size):
                trainer.train_batch(rows[i:i + args.batch_size])
            work_s = time.perf_counter() - started
            started = time.perf_counter()
            snapshots.losses_at(0, [source.page(p) for p in pages[:args.verify_pages]])
            verify_s = time.perf_counter() - started
            if round_:  # the first round warms up allocations
                work.append(work_s)
                verify.append(verify_s)
    finally:
        trainer.shutdown()
        dht.shutdown()
    work_s, verify_s = sorted(work)[len(work) // 2], sorted(verify)[len(verify) // 2]
    body = table(["", "median seconds"], [["miner's work in one round", work_s], ["verifying that miner", verify_s]])
    body += (f"\n\nverification / work: **{verify_s / work_s:.3f}** (target <= 0.10); "
             f"{args.verify_pages} of {args.pages_per_round} pages recomputed (forward only), model `{args.preset}`, "
             f"seq_len {args.seq_len}, {args.page_size} sequences per page, {args.threads} torch threads, "
             f"median of {args.repeats} rounds.")
    if args.no_record:
        print(body)
    else:
        record("validator-cost", "(d) Validator cost per miner", "python bench/validator_cost.py " + " ".join(sys.argv[1:]), body)
    os._exit(0)  # hivemind's background threads take long to wind down; the figures are written


if __name__ == "__main__":
    main()
