"""Chain layer: who is registered, where they serve, and the weights validators set.

``open_chain`` is the one place that picks a backend, so neurons take
``--subtensor.network`` and never branch on it: ``embedded`` is the built-in
SQLite chain shared by local processes; anything else (``finney``, ``test``,
``local``, ``ws://...``) is a real subtensor via bittensor's SDK.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from .base import Chain, ChainError, Metagraph, NeuronInfo, WalletLike
from .local import DEFAULT_TEMPO, EMBEDDED_NETWORK, LocalChain
from .subtensor import SubtensorChain

__all__ = [
    "Chain",
    "ChainError",
    "DEFAULT_TEMPO",
    "EMBEDDED_NETWORK",
    "LocalChain",
    "Metagraph",
    "NeuronInfo",
    "SubtensorChain",
    "WalletLike",
    "open_chain",
]


def open_chain(
    network: str,
    chain_endpoint: Optional[str] = None,
    db_path: Union[str, Path, None] = None,
) -> Chain:
    """The chain backend for ``network``; nothing connects until first use.

    The neurons' embedded chain must exist (``dt-chain create-subnet`` makes it): a
    mistyped ``--chain.db`` is one line naming the path, not a new empty chain.
    """
    if network == EMBEDDED_NETWORK:
        if chain_endpoint:
            raise ChainError(
                "--subtensor.chain_endpoint is set but --subtensor.network is 'embedded'; "
                "drop the endpoint or pick a subtensor network"
            )
        if db_path is None or str(db_path) == "":
            raise ChainError("the embedded chain needs a database file; pass --chain.db PATH")
        return LocalChain(db_path, create=False)
    return SubtensorChain(network, chain_endpoint)
