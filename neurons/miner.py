"""Miner entry point: parse flags, then hand over to distributed_training.miner.Miner."""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from distributed_training.logs import quiet_hivemind, setup_logging

    quiet_hivemind(debug="--logging.debug" in argv)
    from distributed_training.config import parse_or_exit

    config = parse_or_exit("miner", argv)
    setup_logging(config.logging.debug, config.logging.dir, name="miner")
    from distributed_training.neuron_errors import run_reporting_errors
    from distributed_training.miner import Miner

    code = run_reporting_errors("miner", lambda: Miner(config).run())
    # The neuron has already shut its swarm down in order; hivemind can leave background threads
    # and averager processes that take a minute to notice, so leave without waiting for them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
