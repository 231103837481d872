"""Miner entry point: flags, then distributed_training.neuron.miner.Miner."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from distributed_training.neuron.entry import run_neuron

    def make(config):
        from distributed_training.neuron.miner import Miner

        return Miner(config)

    return run_neuron("miner", make, argv)


if __name__ == "__main__":
    sys.exit(main())
