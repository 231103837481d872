"""GPU training step: the miner's step for a preset under bf16 autocast, tokens/s and model FLOPs utilisation.

Two rows, both built from the project's own code (the preset, `build_model`, and the trainer's
`loss_and_gradients`, which applies bf16 autocast on CUDA exactly as the miner does):

- `forward + backward`: `loss_and_gradients` then `zero_grad`, per batch; the pure compute step;
- `miner step, alone`: `GradientAveragingTrainer.train_batch` in a one-peer swarm, i.e. the above plus
  hivemind's gradient accumulation every batch and its host-offloaded AdamW at every global
  epoch (`--target-batch-size` samples), amortised over the timed window.

Model FLOPs per token follow the PaLM / nanoGPT estimate, 6·N + 12·L·H·Q·T, with N the parameters
without the position embedding (the tied token embedding counts once, as the LM head's matmul),
L layers, H heads of size Q, context T. MFU = tokens/s · FLOPs per token / the device's dense
bf16 peak (table below, or --peak-tflops).

    python bench/gpu_step.py                                   # gpt2-124m on cuda, recorded
    python bench/gpu_step.py --device cpu --preset tiny --seq-len 64 --no-swarm   # smoke test, never recorded

Exits 2 with one line on stderr if CUDA is asked for and none is visible.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import torch  # noqa: E402

# Dense (non-sparse) bf16 tensor-core peaks from the vendor's data sheets, in TFLOPS; the first
# substring of the device name that matches wins, so the specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def model_params(model: torch.nn.Module) -> int:
    """N of the FLOPs estimate: unique parameters less the position embedding (a lookup, no matmul)."""
    from distributed_training.training.model import count_parameters

    return count_parameters(model) - model.transformer.wpe.weight.numel()


def flops_per_token(params: int, n_layer: int, n_head: int, n_embd: int, seq_len: int) -> int:
    """6·N + 12·L·H·Q·T: weight matmuls, then attention scores and mixing, forward and backward."""
    return 6 * params + 12 * n_layer * n_head * (n_embd // n_head) * seq_len


def check_device(requested: str) -> torch.device:
    """The device, or exit 2 with one line: a benchmark must not silently fall back to the CPU."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_step: --device {requested} but no CUDA device is visible (torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda}); run on a GPU machine or use --device cpu for a smoke test",
              file=sys.stderr)
        sys.exit(2)
    return torch.device(requested)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[torch.Tensor], None], batches: Sequence[torch.Tensor], warmup: int,
                device: torch.device) -> float:
    """Seconds for batches[warmup:], after running batches[:warmup] (allocator, cuBLAS heuristics, first epoch)."""
    for batch in batches[:warmup]:
        step(batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    sync(device)
    return time.perf_counter() - started


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--seq-len", type=int, default=0, help="0: the preset's context")
    parser.add_argument("--batch-size", type=int, default=8, help="the miner's default --neuron.batch_size")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="timed forward+backward steps")
    parser.add_argument("--target-batch-size", type=int, default=512,
                        help="samples per global epoch of the swarm row (the miner's default)")
    parser.add_argument("--epochs", type=int, default=2, help="timed global epochs of the swarm row (+1 warm-up)")
    parser.add_argument("--no-swarm", action="store_true", help="skip the row through GradientAveragingTrainer")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0: from the table")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    device = check_device(args.device)  # before any heavy import or work
    if args.threads:
        torch.set_num_threads(args.threads)

    dht = None
    if not args.no_swarm:
        # The DHT forks a process, so it starts before anything initialises CUDA (as in neuron/setup.py).
        from distributed_training.swarm.dht import DHTSettings, start_dht

        dht = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
    try:
        body = run(args, device, dht)
    finally:
        if dht is not None:
            dht.shutdown()
    command = ("python bench/gpu_step.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    if device.type != "cuda" or args.no_record:
        print(body)
        if device.type != "cuda":
            print("\n(not recorded: only a CUDA run is the GPU figure)", file=sys.stderr)
        return
    from report import record

    record("gpu-step", f"GPU training step, `{args.preset}`, bf16 autocast", command, body)


def run(args: argparse.Namespace, device: torch.device, dht: Optional[Any]) -> str:
    from report import table

    from distributed_training.training.model import build_model, get_preset
    from distributed_training.training.gradient_averaging import GradientAveragingTrainer
    from distributed_training.training.model import loss_and_gradients
    from distributed_training.training.trainer import TrainerSettings
    from distributed_training.data.tokenizer import load_tokenizer

    preset = get_preset(args.preset)
    seq_len = args.seq_len or preset.seq_len
    vocab = load_tokenizer("local").vocab_size  # the miner's vocabulary (GPT-2 BPE)
    model = build_model(preset, vocab, seq_len, seed=0).to(device)
    params = model_params(model)
    per_token = flops_per_token(params, preset.n_layer, preset.n_head, preset.n_embd, seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)

    # Random tokens on the host, as the miner's pages are: a step's cost does not depend on the text,
    # and no corpus of 1024-token pages is needed.
    generator = torch.Generator().manual_seed(0)
    per_epoch = max(1, args.target_batch_size // args.batch_size)
    count = max(args.warmup + args.steps, 0 if args.no_swarm else per_epoch * (args.epochs + 1))
    batches = [torch.randint(0, vocab, (args.batch_size, seq_len), generator=generator) for _ in range(count)]
    tokens_per_batch = args.batch_size * seq_len

    def compute_step(batch: torch.Tensor) -> None:
        loss, problem = loss_and_gradients(model, batch, device)
        assert problem is None, problem
        model.zero_grad(set_to_none=True)

    results: list[tuple[str, int, float]] = []  # (row, timed batches, seconds)
    seconds = timed_steps(compute_step, batches[:args.warmup + args.steps], args.warmup, device)
    results.append(("forward + backward (`loss_and_gradients`)", args.steps, seconds))

    if dht is not None:
        trainer = GradientAveragingTrainer(model, dht, TrainerSettings(
            run_id=f"gpu-step-{os.getpid()}", batch_size=args.batch_size, target_batch_size=per_epoch * args.batch_size,
        ), device)
        try:
            def swarm_step(batch: torch.Tensor) -> None:
                assert not trainer.train_batch(batch).skipped

            # Warm-up is one whole epoch, so the window holds exactly `epochs` offloaded AdamW steps.
            seconds = timed_steps(swarm_step, batches[:per_epoch * (args.epochs + 1)], per_epoch, device)
            assert trainer.local_epoch >= args.epochs, f"only {trainer.local_epoch} global epochs ran"
        finally:
            trainer.shutdown()
        results.append((f"miner step, alone (`GradientAveragingTrainer`, AdamW every {per_epoch} batches)",
                        per_epoch * args.epochs, seconds))

    rows = []
    for row, steps, secs in results:
        tokens_per_s = steps * tokens_per_batch / secs
        mfu = f"{100 * tokens_per_s * per_token / (peak * 1e12):.1f} %" if peak else "n/a"
        rows.append([row, steps, 1e3 * secs / steps, tokens_per_s, mfu])
    body = table(["step", "timed batches", "ms / batch", "tokens/s", "MFU"], rows)
    peak_text = f"{peak:g} TFLOPS dense bf16" if peak else "unknown (give --peak-tflops)"
    body += (f"\n\n{name}, torch {torch.__version__}; model `{preset.name}`, N = {params / 1e6:.2f} M "
             f"parameters, seq_len {seq_len}, batch {args.batch_size}, {per_token / 1e9:.3f} GFLOPs per "
             f"token (6·N + 12·L·H·Q·T); peak {peak_text}; {args.warmup} warm-up steps before the first row, "
             f"one warm-up epoch before the second.")
    return body


if __name__ == "__main__":
    main()
