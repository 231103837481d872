"""The score book: per-uid moving averages, persisted atomically, and the weights they give.

A uid that was never queried has no entry and so a weight of zero (a floor of 0.1 would let dead
uids keep earning), and a uid whose hotkey changed (deregistered, taken by someone else) starts
again from zero instead of inheriting a score.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..files import atomic_write_bytes

FORMAT_VERSION = 1


class ScoreBookError(RuntimeError):
    """The score file exists but is not a score book; nothing is overwritten."""


@dataclass
class UidScore:
    hotkey: str
    moving_average: float = 0.0
    last_score: Optional[float] = None
    answered: int = 0
    queried: int = 0
    last_reason: str = ""


@dataclass
class ScoreBook:
    alpha: float
    entries: dict[int, UidScore] = field(default_factory=dict)
    rounds: int = 0
    last_weights_block: Optional[int] = None

    def record(self, uid: int, hotkey: str, score: float, reason: str, responded: bool) -> UidScore:
        if not 0.0 <= score <= 1.0 or math.isnan(score):
            raise ValueError(f"score {score} out of [0, 1]")
        entry = self.entries.get(uid)
        if entry is None or entry.hotkey != hotkey:
            entry = self.entries[uid] = UidScore(hotkey=hotkey)
        entry.moving_average = (1.0 - self.alpha) * entry.moving_average + self.alpha * score
        entry.last_score, entry.last_reason = score, reason
        entry.queried += 1
        entry.answered += int(responded)
        return entry

    def forget_missing(self, hotkeys_by_uid: dict[int, str]) -> None:
        """Drop uids that left the subnet or changed hands."""
        for uid in list(self.entries):
            if hotkeys_by_uid.get(uid) != self.entries[uid].hotkey:
                del self.entries[uid]

    def weights(self) -> dict[int, float]:
        """Moving averages, L1-normalised; empty when nothing has been scored."""
        total = sum(entry.moving_average for entry in self.entries.values())
        if total <= 0:
            return {}
        return {uid: entry.moving_average / total for uid, entry in sorted(self.entries.items())}

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        payload = {
            "format": FORMAT_VERSION,
            "alpha": self.alpha,
            "rounds": self.rounds,
            "last_weights_block": self.last_weights_block,
            "entries": {str(uid): asdict(entry) for uid, entry in sorted(self.entries.items())},
        }
        atomic_write_bytes(Path(path), json.dumps(payload, indent=1).encode())

    @classmethod
    def load(cls, path: Path, alpha: float) -> "ScoreBook":
        """The saved book, or a new empty one if there is no file. A corrupt file is an error, not a reset."""
        path = Path(path)
        if not path.exists():
            return cls(alpha=alpha)
        try:
            if path.is_dir():
                raise ValueError("a directory, not a file")
            payload = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(payload, dict):
                raise ValueError(f"a JSON {type(payload).__name__}, not an object")
            if payload.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {payload.get('format')!r}")
            rounds, last_block, raw = payload.get("rounds", 0), payload.get("last_weights_block"), payload["entries"]
            _check("rounds", rounds, int, lambda v: v >= 0)
            if last_block is not None:
                _check("last_weights_block", last_block, int, lambda v: v >= 0)
            if not isinstance(raw, dict):
                raise ValueError(f"entries is a JSON {type(raw).__name__}, not an object")
            entries = {int(uid): UidScore(**entry) for uid, entry in raw.items()}
            for uid, entry in entries.items():
                _check(f"uid {uid}: hotkey", entry.hotkey, str, bool)
                _check(f"uid {uid}: moving_average", entry.moving_average, float, lambda v: 0.0 <= v <= 1.0)
                if entry.last_score is not None:
                    _check(f"uid {uid}: last_score", entry.last_score, float, lambda v: 0.0 <= v <= 1.0)
                _check(f"uid {uid}: answered", entry.answered, int, lambda v: v >= 0)
                _check(f"uid {uid}: queried", entry.queried, int, lambda v: v >= 0)
                _check(f"uid {uid}: last_reason", entry.last_reason, str, lambda v: True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the cause
            if isinstance(exc, KeyError):
                reason = f"no {reason} field"
            raise ScoreBookError(f"{path} is not a readable score book ({reason}); move it aside to start from zero") from None
        return cls(alpha=alpha, entries=entries, rounds=rounds, last_weights_block=last_block)


def _check(what: str, value: object, kind: type, ok) -> None:
    """A field of a loaded book has the right JSON type (an int counts as a float, a bool as neither) and range."""
    kinds = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise ValueError(f"{what} is {value!r}")
