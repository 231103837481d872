"""Turning the errors an operator can fix into one line and a non-zero exit.

A traceback is right for a bug, wrong for a missing wallet or an unregistered hotkey: the
operator needs to read what is wrong and what to do, not where in the code it was noticed.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

logger = logging.getLogger(__name__)

EXIT_OPERATOR_ERROR = 2


def _operator_errors() -> tuple[type[BaseException], ...]:
    from ..chain import ChainError
    from ..chain.wallets import WalletError
    from ..config import ConfigError
    from ..data.assets import AssetsError
    from ..data.pages import DataSourceError
    from ..data.tokenizer import TokenizerError
    from ..logs import StateDirError
    from ..spec import SpecMismatch
    from ..swarm import HivemindVersionError
    from ..swarm.dht import DHTBootstrapError
    from ..training.checkpoint import CheckpointError
    from ..training.model import DeviceError
    from ..transport import PortInUseError
    from ..validation.scoring import ScoreBookError
    from .setup import NotRegisteredError

    return (AssetsError, ChainError, ConfigError, WalletError, NotRegisteredError, CheckpointError,
            DataSourceError, DHTBootstrapError, TokenizerError, PortInUseError, DeviceError, ScoreBookError,
            SpecMismatch, HivemindVersionError, StateDirError)


def run_reporting_errors(role: str, run: Callable[[], int]) -> int:
    """Run a neuron; known operator errors become `dt-<role>: error: ...` and exit code 2."""
    try:
        return run()
    except _operator_errors() as exc:
        print(f"dt-{role}: error: {exc}", file=sys.stderr)
        return EXIT_OPERATOR_ERROR
