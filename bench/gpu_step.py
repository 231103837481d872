"""GPU training step: the whole step, optimizer included, on the run spec's fast path; tokens/s and MFU.

Four rows, each a fresh model built by the project's own code (`build_model` with the padded
vocabulary and loss kernel given here, `training.step.ForwardBackward` with bf16 autocast,
torch.compile and the micro-batches chosen for the GPU's memory):

- `torch loop`: forward and backward, then torch's fused AdamW with clipping, every batch; no
  check, no host sync: the reference the trainers are measured against;
- `DiLoCo inner step`: `DiLoCoTrainer.train_batch`, alone, no outer step in the window: the fused
  inner AdamW every batch, its skips decided on the device and read once every `--sync-every` steps;
- `swarm, AdamW on the host` and `swarm, AdamW on the device`: `GradientAveragingTrainer.train_batch`
  in a one-peer swarm (one host check per step, hivemind's gradient accumulation every batch, the
  shared AdamW every `--target-batch-size` samples, amortised over the timed window), with hivemind's
  offloaded optimizer and with the device-resident one (`--training.offload_optimizer false`).

Model FLOPs per token: 6·N + 6·L·H·Q·T, with N the parameters less the position embedding (a lookup)
and less the padding rows of the vocabulary (work that predicts nothing), L layers, H heads of size
Q, context T; the attention term is PaLM's 12·L·H·Q·T halved, since a causal kernel computes only
the lower triangle. MFU = tokens/s · FLOPs per token / the device's dense bf16 peak (table below, or
--peak-tflops).

    python bench/gpu_step.py                                          # gpt2-124m on cuda, recorded
    python bench/gpu_step.py --device cpu --preset tiny --seq-len 64 --batch-size 8 --steps 4  # smoke test

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

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOPS, from NVIDIA's data sheets (half their
# "with sparsity" figures); the first substring of the device name that matches wins, so the
# specific names come first. H100 SXM reports as "NVIDIA H100 80GB HBM3", H200 SXM as "NVIDIA H200".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),  # SXM
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L4", 121.0),
)
ROWS = ("torch", "diloco", "swarm-host", "swarm-device")


def peak_tflops(device_name: str) -> Optional[float]:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def model_params(model: torch.nn.Module) -> int:
    """N of the FLOPs estimate: unique parameters less the position embedding and the vocabulary's padding rows."""
    from distributed_training.training.loss import tokenizer_vocab
    from distributed_training.training.model import count_parameters

    padding = (model.config.vocab_size - tokenizer_vocab(model)) * model.config.n_embd
    return count_parameters(model) - model.transformer.wpe.weight.numel() - padding


def flops_per_token(params: int, n_layer: int, n_head: int, n_embd: int, seq_len: int) -> int:
    """PaLM's 6·N + 12·L·H·Q·T: weight matmuls, then attention scores and mixing over the full square."""
    return 6 * params + 12 * n_layer * n_head * (n_embd // n_head) * seq_len


def causal_flops_per_token(params: int, n_layer: int, n_head: int, n_embd: int, seq_len: int) -> int:
    """6·N + 6·L·H·Q·T: as `flops_per_token`, with the attention term halved for the causal mask (what MFU uses)."""
    return 6 * params + 6 * n_layer * n_head * (n_embd // n_head) * seq_len


def mfu(tokens_per_s: float, per_token: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation as a fraction of the dense peak (None without a peak)."""
    return tokens_per_s * per_token / (peak * 1e12) if peak else None


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
    """Seconds for batches[warmup:], after running batches[:warmup] (compilation, allocator, first epoch)."""
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
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per local step")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="0: what fits the GPU (the whole batch on a CPU)")
    parser.add_argument("--vocab-multiple", type=int, default=64, help="the run spec's vocabulary padding")
    parser.add_argument("--loss", default="chunked", choices=("plain", "chunked"), help="the run spec's loss kernel")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the torch and DiLoCo rows")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the torch and DiLoCo rows")
    parser.add_argument("--sync-every", type=int, default=10, help="DiLoCo: steps per host read of the checks")
    parser.add_argument("--target-batch-size", type=int, default=512,
                        help="samples per global epoch of the swarm rows (the miner's default)")
    parser.add_argument("--epochs", type=int, default=2, help="timed global epochs of the swarm rows (+1 warm-up)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak; 0: from the table")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    device = check_device(args.device)  # before any heavy import or work
    rows = [row for row in args.rows.split(",") if row]
    if not set(rows) <= set(ROWS):
        parser.error(f"--rows: unknown {sorted(set(rows) - set(ROWS))}")
    if args.threads:
        torch.set_num_threads(args.threads)

    dht = None
    if {"diloco", "swarm-host", "swarm-device"} & set(rows):
        # The DHT forks a process, so it starts before anything initialises CUDA (as in neuron/setup.py).
        from distributed_training.swarm.dht import DHTSettings, start_dht

        dht = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
    try:
        body = run(args, rows, device, dht)
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

    record("gpu-step", f"GPU training step, `{args.preset}`, the whole step with its optimizer", command, body)


def run(args: argparse.Namespace, rows: Sequence[str], device: torch.device, dht: Optional[Any]) -> str:
    from report import table

    from distributed_training.data.tokenizer import load_tokenizer
    from distributed_training.training.model import build_model, get_preset
    from distributed_training.training.step import ForwardBackward, choose_micro_batch, resolve_compile
    from distributed_training.training.trainer import ClippedAdamW

    preset = get_preset(args.preset)
    seq_len = args.seq_len or preset.seq_len
    vocab = load_tokenizer("local").vocab_size  # the miner's vocabulary (GPT-2 BPE)

    def fresh_model() -> torch.nn.Module:
        return build_model(preset, vocab, seq_len, seed=0, vocab_multiple=args.vocab_multiple,
                           loss_kernel=args.loss).to(device)

    probe = fresh_model()
    params = model_params(probe)
    per_token = causal_flops_per_token(params, preset.n_layer, preset.n_head, preset.n_embd, seq_len)
    compile_ = resolve_compile(args.compile, device)
    micro = choose_micro_batch(probe, device, args.batch_size, seq_len, args.micro_batch_size)
    del probe
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    options = dict(compile=compile_, micro_batch_size=micro)

    # Random tokens on the host, as the miner's pages are: a step's cost does not depend on the text.
    generator = torch.Generator().manual_seed(0)
    per_epoch = max(1, args.target_batch_size // args.batch_size)
    swarm = {"swarm-host", "swarm-device"} & set(rows)
    count = max(args.warmup + args.steps, per_epoch * (args.epochs + 1) if swarm else 0)
    batches = [torch.randint(0, vocab, (args.batch_size, seq_len), generator=generator) for _ in range(count)]
    plain_window = batches[:args.warmup + args.steps]
    results: list[tuple[str, int, float]] = []  # (row, timed batches, seconds)

    if "torch" in rows:
        model = fresh_model()
        step = ForwardBackward(model, device, **options)
        optimizer = ClippedAdamW(model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, max_grad_norm=1.0,
                                 fused=True)

        def torch_step(batch: torch.Tensor) -> None:
            step(batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        results.append(("torch loop: step + fused AdamW, no checks", args.steps,
                        timed_steps(torch_step, plain_window, args.warmup, device)))
        del model, step, optimizer
    if "diloco" in rows:
        results.append(_diloco_row(args, fresh_model(), dht, device, options, plain_window))
    for row, offload in (("swarm-host", True), ("swarm-device", False)):
        if row in rows:
            results.append(_swarm_row(args, fresh_model(), dht, device, options, batches, per_epoch, offload))

    table_rows = []
    tokens_per_batch = args.batch_size * seq_len
    for row, steps, secs in results:
        tokens_per_s = steps * tokens_per_batch / secs
        share = mfu(tokens_per_s, per_token, peak)
        table_rows.append([row, steps, 1e3 * secs / steps, tokens_per_s, "n/a" if share is None else f"{100 * share:.1f} %"])
    body = table(["step", "timed batches", "ms / batch", "tokens/s", "MFU"], table_rows)
    peak_text = f"{peak:g} TFLOPS dense bf16" if peak else "unknown (give --peak-tflops)"
    body += (f"\n\n{name}, torch {torch.__version__}; model `{preset.name}`, N = {params / 1e6:.2f} M parameters, "
             f"vocabulary {vocab} padded to a multiple of {args.vocab_multiple}, `{args.loss}` loss, seq_len {seq_len}, "
             f"batch {args.batch_size} in micro-batches of {micro or args.batch_size}, torch.compile "
             f"{'on' if compile_ else 'off'}, bf16 autocast on CUDA; FLOPs per token = 6·N + 6·L·H·Q·T "
             f"(N without the position embedding and the padding rows; attention 12·L·H·Q·T halved for the causal "
             f"mask) = {per_token / 1e9:.3f} G; peak {peak_text}. The torch and DiLoCo rows time {args.steps} steps "
             f"after {args.warmup} warm-up steps; the swarm rows time {args.epochs} global epochs of {per_epoch} "
             f"batches after one warm-up epoch; DiLoCo reads its checks every {args.sync_every} steps.")
    return body


def _diloco_row(args, model, dht, device, options, batches) -> tuple[str, int, float]:
    from distributed_training.training.diloco import DiLoCoTrainer
    from distributed_training.training.trainer import DiLoCoSettings

    trainer = DiLoCoTrainer(model, dht, DiLoCoSettings(
        run_id=f"gpu-step-diloco-{os.getpid()}", batch_size=args.batch_size, target_batch_size=10**9, inner_steps=0,
        sync_every=args.sync_every, **options), device)
    try:
        def diloco_step(batch: torch.Tensor) -> None:
            report = trainer.train_batch(batch)
            assert report.pending or not report.skipped_steps, "the benchmark's batches must all be finite"

        seconds = timed_steps(diloco_step, batches, args.warmup, device)
        assert trainer.local_epoch == 0, "an outer step ran inside the timed window"
    finally:
        trainer.shutdown()
    return f"DiLoCo inner step (`DiLoCoTrainer`, checks read every {args.sync_every})", args.steps, seconds


def _swarm_row(args, model, dht, device, options, batches, per_epoch, offload) -> tuple[str, int, float]:
    from distributed_training.training.gradient_averaging import GradientAveragingTrainer
    from distributed_training.training.trainer import TrainerSettings

    trainer = GradientAveragingTrainer(model, dht, TrainerSettings(
        run_id=f"gpu-step-swarm-{offload}-{os.getpid()}", batch_size=args.batch_size,
        target_batch_size=per_epoch * args.batch_size, sync_every=1, offload_optimizer=offload, **options), device)
    try:
        def swarm_step(batch: torch.Tensor) -> None:
            assert not trainer.train_batch(batch).skipped, "the benchmark's batches must all be finite"

        # Warm-up is one whole epoch, so the window holds exactly `epochs` shared AdamW steps.
        seconds = timed_steps(swarm_step, batches[:per_epoch * (args.epochs + 1)], per_epoch, device)
        assert trainer.local_epoch >= args.epochs, f"only {trainer.local_epoch} global epochs ran"
    finally:
        trainer.shutdown()
    where = "host (hivemind's offload)" if offload else "device"
    return f"swarm step (`GradientAveragingTrainer`, AdamW on the {where} every {per_epoch})", \
        per_epoch * args.epochs, seconds


if __name__ == "__main__":
    main()
