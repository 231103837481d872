"""Draw assets/architecture.png: the components of distributed-training and what flows between them.

Run from the repository root with the project's virtual environment:

    .venv/bin/python assets/make_architecture.py

The numbers in the figure (scores, tolerance, moving-average weight, endpoint paths, request size
limit, state file names) are read from the package itself, so a change in the code shows up in the
figure the next time it is generated. Only matplotlib (a dependency of the package) is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from distributed_training.config import flags_for
from distributed_training.protocol import IS_ALIVE_PATH, MAX_BODY_BYTES, WORK_PATH
from distributed_training.training.checkpoint import CHECKPOINT_NAME
from distributed_training.validation.verify import (
    SCORE_ACCEPTABLE,
    SCORE_NO_RESPONSE,
    SCORE_UNACCEPTABLE,
    Tolerance,
)

OUT = Path(__file__).resolve().parent / "architecture.png"

MINER = "#dbeafe"      # blue: miners
VALIDATOR = "#fde68a"  # amber: the validator
CHAIN = "#dcfce7"      # green: the chain
DHT = "#ede9fe"        # violet: hivemind
OPTIONAL = "#f3f4f6"   # grey: optional parts
EDGE = "#374151"


def _defaults() -> dict[str, object]:
    """Flag defaults the figure quotes, straight from the configuration."""
    wanted = {"neuron.moving_average_alpha", "neuron.epoch_length", "neuron.verify_pages", "neuron.timeout",
              "neuron.loss_tolerance", "axon.port"}
    return {flag.name: flag.default for flag in flags_for("validator") + flags_for("miner") if flag.name in wanted}


def box(ax, x, y, w, h, title, lines=(), color="white", dashed=False, title_size=11, size=9):
    """A rounded box with a bold title and left-aligned lines under it."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
                                facecolor=color, edgecolor=EDGE, linewidth=1.3,
                                linestyle=(0, (4, 3)) if dashed else "-"))
    if title:
        ax.text(x + w / 2, y + h - 0.18, title, ha="center", va="top", fontsize=title_size, fontweight="bold")
    for i, line in enumerate(lines):
        ax.text(x + 0.15, y + h - 0.58 - i * 0.28, line, ha="left", va="top", fontsize=size)


def arrow(ax, start, end, label="", both=False, dashed=False, at=None, ha="center", va="bottom", size=9):
    """A straight arrow; `label` is written at `at` (default: just above the middle)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="<|-|>" if both else "-|>", mutation_scale=14,
                                 color=EDGE, linewidth=1.3, linestyle=(0, (4, 3)) if dashed else "-",
                                 shrinkA=1, shrinkB=1))
    if label:
        x, y = at if at else ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.06)
        ax.text(x, y, label, ha=ha, va=va, fontsize=size, color=EDGE, linespacing=1.25)


def draw(path: Path = OUT) -> Path:
    d = _defaults()
    tol = Tolerance(rel=float(d["neuron.loss_tolerance"]))
    fig, ax = plt.subplots(figsize=(17, 11))
    ax.set_xlim(0, 17)
    ax.set_ylim(0, 11)
    ax.axis("off")
    ax.text(8.5, 10.85, "distributed-training: components and what flows between them", ha="center", va="top",
            fontsize=16, fontweight="bold")
    ax.text(8.5, 10.4, f"miner <-> validator: signed JSON over HTTP (btauth/1), at most {MAX_BODY_BYTES // 1024} KiB; "
                       "refused with 401 (signature), 403 (caller not allowed), 413 (too big), 422 (malformed)",
            ha="center", va="top", fontsize=10, style="italic")

    # -- the training swarm (left) --------------------------------------------------------------
    box(ax, 0.3, 3.2, 7.3, 6.7, "", color="#f8fafc", dashed=True)
    ax.text(0.5, 9.8, "training swarm: every peer on one --neuron.run_id and --model.preset", fontsize=10,
            va="top", style="italic")
    miner_lines = [
        "hivemind.Optimizer (AdamW)",
        "trains GPT-2 on its pages",
        "answers validators from its",
        "  epoch snapshot:",
        f"  POST {IS_ALIVE_PATH}, POST {WORK_PATH}",
        f"  --axon.port (default {d['axon.port']}, tcp)",
        f"state: {CHECKPOINT_NAME},",
        "  metrics.jsonl, dht.json",
    ]
    for i, x in enumerate((0.55, 4.15)):
        box(ax, x, 6.2, 3.2, 3.25, f"miner {'AB'[i]}  (dt-miner)", miner_lines, MINER)
    box(ax, 0.55, 3.45, 6.8, 2.2, "hivemind DHT + gradient all-reduce",
        ["--dht.port: tcp (and udp with --dht.use_quic); --dht.announce_ip",
         "signed records: <run_id>_progress (samples per epoch), <run_id>_miners",
         "at target_batch_size samples all peers average gradients",
         "and take the same AdamW step: one global epoch",
         "joiners and validators: load_state_from_peers"], DHT, title_size=10.5)
    arrow(ax, (3.75, 7.8), (4.15, 7.8), both=True)
    arrow(ax, (2.15, 6.2), (2.15, 5.65), both=True)
    arrow(ax, (5.75, 6.2), (5.75, 5.65), both=True)

    box(ax, 0.55, 0.3, 3.6, 1.6, "dt-dht (optional)", ["routing-only DHT node on a fixed port:",
                                                        "an entry point for --dht.initial_peers"], OPTIONAL,
        dashed=True, title_size=10.5)
    arrow(ax, (2.35, 1.9), (2.35, 3.45), "bootstrap", dashed=True, at=(2.5, 2.5), ha="left")

    # -- the validator (right) ------------------------------------------------------------------
    box(ax, 9.6, 3.2, 7.1, 6.7, "validator  (dt-validator)", color=VALIDATOR, title_size=12)
    parts = [
        (7.8, 1.45, "assign + query", [f"pages = assign_pages(uid, round = block, --data.seed)",
                                       f"signed POST {WORK_PATH} to sampled miners",
                                       f"(--neuron.timeout {d['neuron.timeout']:g} s)"]),
        (6.2, 1.45, "verify", [f"recompute the loss on {d['neuron.verify_pages']} of the pages;",
                               f"|reported - recomputed| <= {tol.rel:g} x recomputed;",
                               f"epoch lag <= {tol.max_epoch_lag}; samples contributed recently"]),
        (4.9, 1.15, "score book  (scores.json)", [f"{SCORE_ACCEPTABLE:g} verified, {SCORE_UNACCEPTABLE:g} answer "
                                                  f"does not hold, {SCORE_NO_RESPONSE:g} no answer;",
                                                  f"moving average, alpha {d['neuron.moving_average_alpha']:g}"]),
        (3.45, 1.3, "follower", ["copy of the swarm's model,", "snapshots of the last 4 epochs"]),
    ]
    for y, h, title, lines in parts:
        box(ax, 9.85, y, 6.6, h, title, lines, "white", title_size=10.5)

    # miners <-> validator
    arrow(ax, (9.85, 8.95), (7.35, 8.95), f"POST {WORK_PATH}\nrun_id, round, pages", at=(8.6, 9.02))
    arrow(ax, (7.35, 8.15), (9.85, 8.15), "losses, epoch,\npeer_id, samples_trained", at=(8.6, 8.08), va="top")
    arrow(ax, (7.35, 4.1), (9.85, 4.1), "load state,\nread progress", both=True, at=(8.6, 4.17))

    # -- the chain (bottom) ---------------------------------------------------------------------
    box(ax, 5.0, 0.3, 6.9, 2.0, "chain  (--subtensor.network)",
        ["embedded: one SQLite file on this machine (--chain.db)",
         "finney / test / local / ws://...: a subtensor, via bittensor 11",
         "registrations, endpoints (ip:port), stake, validator permits, weights"], CHAIN, title_size=10.5)
    arrow(ax, (6.0, 3.2), (6.0, 2.3), "miners publish their endpoint", at=(6.15, 2.6), ha="left")
    arrow(ax, (11.4, 3.2), (11.4, 2.3), f"metagraph each round; weights every\n"
                                        f"--neuron.epoch_length ({d['neuron.epoch_length']}) blocks",
          at=(11.55, 2.45), ha="left")

    # -- Weights & Biases (optional) --------------------------------------------------------------
    box(ax, 13.0, 0.3, 3.7, 1.6, "Weights & Biases (optional)", ["metrics of miners and validator;",
                                                                  "offline without WANDB_API_KEY,",
                                                                  "--wandb.off: none"], OPTIONAL,
        dashed=True, title_size=10.5)
    arrow(ax, (15.9, 3.2), (15.9, 1.9), "metrics", dashed=True, at=(16.0, 2.45), ha="left")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(f"wrote {draw(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)}")
