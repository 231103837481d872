"""bench/gpu_step.py without a GPU: its FLOPs against a hand count, its peak table, its refusal, a CPU smoke run.

The GPU figure itself needs a GPU; these checks keep the script honest where CI runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from distributed_training.training.model import build_model, get_preset

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_step.py"


@pytest.fixture(scope="module")
def gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_per_token_matches_a_hand_count(gpu_step) -> None:
    # `tiny` (2 layers, d = 64, 2 heads of 32) with a 100-token vocabulary and a 64-token context:
    # per block ln 2·128 + qkv 64·192+192 + proj 64·64+64 + fc 64·256+256 + proj 256·64+64 = 49 984;
    # N = wte 100·64 + 2 blocks + ln_f 128 = 106 496 (the position embedding, 64·64, is left out).
    model = build_model(get_preset("tiny"), vocab_size=100, seq_len=64)
    assert gpu_step.model_params(model) == 106_496
    # 6·N + 12·L·H·Q·T = 638 976 + 12·2·2·32·64 = 638 976 + 98 304
    assert gpu_step.flops_per_token(106_496, n_layer=2, n_head=2, n_embd=64, seq_len=64) == 737_280


def test_gpt2_124m_is_about_0_86_gflops_per_token(gpu_step) -> None:
    # The familiar figure: GPT-2 small has 124.4 M parameters, 123.7 M without its position embedding.
    block = 2 * 1536 + (768 * 2304 + 2304) + (768 * 768 + 768) + (768 * 3072 + 3072) + (3072 * 768 + 768)
    n = 50257 * 768 + 12 * block + 1536
    assert n == 123_653_376
    assert gpu_step.flops_per_token(n, n_layer=12, n_head=12, n_embd=768, seq_len=1024) == 6 * n + 113_246_208


def test_peak_table_tells_h100_variants_apart(gpu_step) -> None:
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_step.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_step.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_step.peak_tflops("Some Future GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_exits_2_with_one_line(gpu_step, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_step.main(["--device", "cuda", "--no-record"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err


def test_mfu_uses_the_causal_half_of_the_attention_term(gpu_step) -> None:
    n = 123_653_376  # gpt2-124m without its position embedding, above
    causal = gpu_step.causal_flops_per_token(n, n_layer=12, n_head=12, n_embd=768, seq_len=1024)
    assert causal == 6 * n + 113_246_208 // 2
    # 500k tokens/s on an H100 SXM: 500e3 · (6N + 6·L·H·Q·T) / 989e12
    assert gpu_step.mfu(500e3, causal, 989.0) == pytest.approx(500e3 * causal / 989e12)
    assert gpu_step.mfu(500e3, causal, None) is None


def test_flops_leave_out_the_vocabulary_padding(gpu_step) -> None:
    # 100 ids padded to 128: the 28 extra rows predict nothing and are not model FLOPs
    padded = build_model(get_preset("tiny"), vocab_size=100, seq_len=64, vocab_multiple=64)
    assert padded.config.vocab_size == 128
    assert gpu_step.model_params(padded) == 106_496


def test_peak_table_tells_the_nvl_and_h200_variants_apart(gpu_step) -> None:
    assert gpu_step.peak_tflops("NVIDIA H100 NVL") == 835.0
    assert gpu_step.peak_tflops("NVIDIA H200 NVL") == 835.0
    assert gpu_step.peak_tflops("NVIDIA H200") == 989.0  # SXM
    assert gpu_step.peak_tflops("NVIDIA GH200 480GB") == 989.0


def test_cpu_smoke_run_prints_the_rows_and_the_formula(gpu_step, capsys) -> None:
    gpu_step.main(["--device", "cpu", "--preset", "tiny", "--seq-len", "16", "--batch-size", "2", "--steps", "1",
                   "--warmup", "1", "--rows", "torch"])
    out = capsys.readouterr()
    assert "torch loop: step + fused AdamW" in out.out and "6·N + 6·L·H·Q·T" in out.out
    assert "not recorded" in out.err
