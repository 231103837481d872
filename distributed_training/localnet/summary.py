"""Reading a finished local swarm run back: the scoreboard, the weights and the loss plot.

Everything here reads files the neurons wrote (metrics.jsonl, scores.json, the embedded chain), so
the summary can be rebuilt after the run, and a half-written or missing file still gives a table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any, Optional

from ..logs import read_metrics


@dataclass(frozen=True)
class Member:
    """One neuron of the local subnet; its hotkey name is also its process and state-dir name."""

    uid: int
    name: str
    behaviour: str  # "validator" or one of config.BEHAVIOURS



def events_since(state_dir: Path, event: str, since: float) -> list[dict[str, Any]]:
    return [e for e in read_metrics(state_dir / "metrics.jsonl", event) if e.get("time", 0.0) >= since]


def read_score_book(validator_dir: Path) -> dict[str, Any]:
    """The validator's scores.json as plain JSON ({} if absent or unreadable: the summary still prints)."""
    try:
        return json.loads((validator_dir / "scores.json").read_text())
    except (OSError, ValueError):
        return {}


def chain_weights(db_path: Path, netuid: int, validator_uid: int) -> Optional[dict[int, float]]:
    """The weights the validator set on the embedded chain, None if it set none."""
    from ..chain import ChainError, LocalChain

    try:
        with LocalChain(db_path) as chain:
            return chain.weights(netuid).get(validator_uid)
    except ChainError:
        return None


def resolve_weights(on_chain: Optional[dict[int, float]], validator_dir: Path, since: float = 0.0
                    ) -> tuple[dict[int, float], str]:
    """Chain weights when present, else the latest "weights" event the validator logged."""
    if on_chain:
        return dict(on_chain), "chain"
    events = events_since(validator_dir, "weights", since)
    if events:
        return {int(uid): float(w) for uid, w in events[-1].get("weights", {}).items()}, "metrics"
    return {}, "none"


def round_timings(validator_dir: Path, since: float = 0.0) -> dict[str, Optional[float]]:
    """Mean query+verify seconds per round, and mean wall seconds from one round to the next."""
    rounds = events_since(validator_dir, "round", since)
    work = [float(r.get("query_s", 0.0)) + float(r.get("verify_s", 0.0)) for r in rounds]
    times = [float(r["time"]) for r in rounds]
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"rounds": len(rounds), "round_seconds": mean(work) if work else None,
            "round_wall_seconds": mean(gaps) if gaps else None}


def build_summary(layout: list[Member], hotkeys: dict[str, str], validator_dir: Path,
                  on_chain: Optional[dict[int, float]], since: float = 0.0) -> dict[str, Any]:
    """Per-miner scores (only entries whose hotkey still matches the uid), weights and round times."""
    entries = read_score_book(validator_dir).get("entries", {})
    weights, source = resolve_weights(on_chain, validator_dir, since)
    miners = []
    for member in layout[1:]:
        hotkey = hotkeys.get(member.name, "")
        entry = entries.get(str(member.uid), {})
        entry = entry if entry.get("hotkey") == hotkey else {}
        miners.append({"uid": member.uid, "hotkey": hotkey, "behaviour": member.behaviour,
                       "answered": int(entry.get("answered", 0)), "last_score": entry.get("last_score"),
                       "moving_average": float(entry.get("moving_average", 0.0)),
                       "weight": float(weights.get(member.uid, 0.0))})
    return {"miners": miners, **round_timings(validator_dir, since), "weights_source": source}


def format_table(summary: dict[str, Any]) -> str:
    """The final scoreboard, one miner a line, then the round timings."""
    def _number(value: Optional[float], digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{'uid':>4}  {'hotkey':<10} {'behaviour':<9} {'answered':>8} {'last':>5} {'avg':>6} {'weight':>6}"]
    for m in summary["miners"]:
        lines.append(f"{m['uid']:>4}  {m['hotkey'][:8] + '..':<10} {m['behaviour']:<9} {m['answered']:>8} "
                     f"{_number(m['last_score'], 1):>5} {m['moving_average']:>6.3f} {m['weight']:>6.3f}")
    lines.append(f"rounds {summary['rounds']} | query+verify {_number(summary['round_seconds'], 1)} s/round | "
                 f"{_number(summary['round_wall_seconds'], 1)} s between rounds | weights from "
                 f"{summary['weights_source']}")
    return "\n".join(lines)


def loss_series(layout: list[Member], state_root: Path, since: float) -> dict[str, list[tuple[float, float]]]:
    """(seconds since start, loss) of every step of the miners that train: honest ones and liars."""
    series = {}
    for m in layout:
        if m.behaviour in ("honest", "liar"):
            steps = events_since(state_root / m.name, "step", since)
            series[f"uid {m.uid} ({m.behaviour})"] = [(s["time"] - since, float(s["loss"])) for s in steps]
    return series


def plot_losses(series: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Loss over time as a PNG (Agg: no display needed); an empty plot still says why it is empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for label, points in ((label, points) for label, points in series.items() if points):
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1)
        if any(series.values()):
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no training steps recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="seconds since start", ylabel="training loss", title="local swarm: loss per miner")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
