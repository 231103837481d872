"""Logging and machine-readable metrics for neurons.

Humans read one line per event on stderr; tools (tests, the local swarm's summary, dashboards)
read the same events as JSON lines from `metrics.jsonl` in the neuron's state directory, so no
one has to parse log text.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FAILURE_REPORT_INTERVAL = 60.0  # seconds between two reports of a metrics file that cannot be written


def quiet_hivemind(debug: bool) -> None:
    """hivemind reads its log level at import time, so call this before importing it."""
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "DEBUG" if debug else "WARNING")


def setup_logging(debug: bool, log_dir: Optional[str] = None, name: str = "neuron") -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir:
        Path(log_dir).expanduser().mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir).expanduser() / f"{name}.log"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=_FORMAT, handlers=handlers, force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "uvicorn.access", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class StateDirError(RuntimeError):
    """The neuron's state directory cannot be made or written (a path through a file, no permission)."""


class MetricsLog:
    """Append-only JSON lines; each line is flushed so a killed process loses at most one event."""

    def __init__(self, path: Path, sinks: Optional[list[Callable[[str, dict[str, Any]], None]]] = None):
        self.path = Path(path)
        self.sinks = list(sinks or [])
        self._lock = threading.Lock()
        self._last_failure_report = -FAILURE_REPORT_INTERVAL
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", buffering=1, encoding="utf-8")
        except OSError as exc:  # a state dir through a file, no permission: the operator's to fix
            raise StateDirError(f"cannot write {self.path} ({exc.strerror or exc}); give --neuron.state_dir "
                                "a directory this user can write") from None

    def write(self, event: str, **fields: Any) -> None:
        """Append one event; a file that cannot be written (full disk) loses the event, said once a minute."""
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=str)
        with self._lock:
            try:
                self._handle.write(line + "\n")
            except OSError as exc:
                now = time.monotonic()
                if now - self._last_failure_report >= FAILURE_REPORT_INTERVAL:
                    self._last_failure_report = now
                    from .files import write_failure

                    logging.getLogger(__name__).error("%s; metrics events are lost until it can be written again",
                                                      write_failure(self.path, exc))
        for sink in self.sinks:
            sink(event, fields)

    def close(self) -> None:
        with self._lock:
            try:
                self._handle.close()
            except OSError:  # the last buffered line of a full disk; already reported by write
                pass
        for sink in self.sinks:
            getattr(sink, "close", lambda: None)()


def read_metrics(path: Path, event: Optional[str] = None) -> list[dict[str, Any]]:
    """All events in a metrics file (a torn last line is ignored)."""
    if not Path(path).exists():
        return []
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or record.get("event") == event:
            events.append(record)
    return events
