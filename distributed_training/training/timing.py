"""Where a trainer's time goes: computing, or communicating with the swarm.

Both trainers keep one `TimeSplit`. A training step is timed as a whole; the parts of it spent on
the network (matchmaking, the all-reduce, waiting for peers, DHT reads, loading state from peers)
are marked with `communicating()` and the rest of the step counts as compute (forward, backward,
the optimizer steps). The miner writes both totals in its epoch metrics, which is how the swarm
benchmark (`bench/swarm_traffic.py`) splits each peer's wall time.
"""

from __future__ import annotations

import functools
import time
from contextlib import contextmanager
from typing import Callable, Concatenate, Iterator, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


class TimeSplit:
    """Cumulative seconds of computing and of communicating; used from the training thread only."""

    def __init__(self) -> None:
        self.compute_seconds = 0.0
        self.communicate_seconds = 0.0
        self._depth = 0  # a communication inside another (state loading after a failed all-reduce) counts once

    @contextmanager
    def step(self) -> Iterator[None]:
        """A training step: what it does not spend communicating is compute."""
        started, communicated = time.perf_counter(), self.communicate_seconds
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.compute_seconds += max(0.0, elapsed - (self.communicate_seconds - communicated))

    @contextmanager
    def communicating(self) -> Iterator[None]:
        self._depth += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.communicate_seconds += time.perf_counter() - started

    def as_fields(self) -> dict[str, float]:
        """The totals as metrics fields."""
        return {"compute_seconds": round(self.compute_seconds, 4),
                "communicate_seconds": round(self.communicate_seconds, 4)}


def communication(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Count a method's time as communication in its object's `timing` (a `TimeSplit`)."""

    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.timing.communicating():  # type: ignore[attr-defined]
            return method(self, *args, **kwargs)

    return wrapper
