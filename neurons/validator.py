"""Validator entry point: flags, then distributed_training.neuron.validator.Validator."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from distributed_training.neuron.entry import run_neuron

    def make(config):
        from distributed_training.neuron.validator import Validator

        return Validator(config)

    return run_neuron("validator", make, argv)


if __name__ == "__main__":
    sys.exit(main())
