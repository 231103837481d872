"""Validator entry point: flags, then distributed_training.validator.Validator."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from distributed_training.entry import run_neuron

    def make(config):
        from distributed_training.validator import Validator

        return Validator(config)

    return run_neuron("validator", make, argv)


if __name__ == "__main__":
    sys.exit(main())
