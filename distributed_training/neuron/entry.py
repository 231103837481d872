"""What the neuron entry scripts share: flags first, then logging, then the neuron, then a prompt exit.

hivemind reads its log level at import and its averagers set SIGINT to "ignore", so the order
here matters: parse flags (exit 2 on a bad one) before anything heavy, set hivemind's level from
them before anything imports it, and let the neuron install its stop handlers after its swarm is built.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Optional

from .lifetime import take_children_along


def install_stop_handlers(stop: threading.Event) -> None:
    """pm2 stops with SIGINT, systemd and the local swarm with SIGTERM: both end the loop cleanly."""
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())


def close_in_order(*steps: Optional[Callable[[], object]]) -> None:
    """Run each shutdown step (falsy ones are skipped), whatever the one before raised: a failed save
    must not leave the swarm running and the process hanging at exit."""
    for step in steps:
        if not step:
            continue
        try:
            step()
        except Exception:
            logging.getLogger(__name__).exception("shutdown step %s failed", getattr(step, "__qualname__", step))


def run_neuron(role: str, make: Callable[[object], object], argv: Optional[list[str]] = None) -> int:
    """Parse `role`'s flags, build the neuron with `make(config)`, run it, and exit with its code."""
    argv = sys.argv[1:] if argv is None else argv
    from ..config import parse_or_exit
    from ..logs import quiet_hivemind, setup_logging

    config = parse_or_exit(role, argv)  # imports neither hivemind nor torch
    take_children_along()  # before any child exists: the DHT process and p2pd end with this process
    quiet_hivemind(debug=config.logging.debug)  # so LOGGING_DEBUG in .env counts as much as the flag
    setup_logging(config.logging.debug, config.logging.dir, name=role)
    from .errors import run_reporting_errors

    try:
        code = run_reporting_errors(role, lambda: make(config).run())
    except BaseException:  # a bug: its traceback, then the same prompt exit (never a hang in teardown)
        traceback.print_exc()
        code = 1
    # The neuron has already shut its swarm down in order; hivemind can leave background threads
    # and averager processes that take a minute to notice, so leave without waiting for them (the
    # reaper started above ends whatever of them is left).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
