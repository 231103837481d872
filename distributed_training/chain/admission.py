"""Which hotkeys may take part in the run, by the metagraph, asked from any process.

The averagers that enforce peer bindings run in processes hivemind forks; a chain client (an SQLite
connection, a websocket) must not cross a fork, so `ChainAdmission` opens its own client in the
process that first asks, and again after a fork. A hotkey is admitted while it is registered on the
subnet (a miner; a validator is a registered hotkey with a permit), so a lapsed registration is
refused as soon as the cached metagraph is refreshed. A peer binding is vouched for (`vouches`) only
while its hotkey is admitted and the hotkey's chain commitment names that binding's peer and record
key: the chain, not the DHT, says which one peer a hotkey runs.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

METAGRAPH_TTL = 30.0  # seconds a metagraph is trusted for admitting peers
RETRY = 5.0  # seconds before an unknown hotkey makes the metagraph be read again (it may just have registered)


class ChainAdmission:
    def __init__(self, network: str, endpoint: Optional[str], db: Optional[Path], netuid: int,
                 ttl: float = METAGRAPH_TTL):
        self.network, self.endpoint, self.db, self.netuid, self.ttl = network, endpoint, db, netuid, ttl
        self._pid: Optional[int] = None
        self._chain: Any = None
        self._metagraph: Any = None
        self._read_at = 0.0
        self._commitments: Optional[dict[str, str]] = None
        self._committed_at = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any) -> "ChainAdmission":
        return cls(config.subtensor.network, config.subtensor.chain_endpoint, Path(config.chain.db).expanduser(),
                   config.netuid)

    def __getstate__(self) -> dict:  # a copy in another process opens its own client
        return {**self.__dict__, "_chain": None, "_metagraph": None, "_commitments": None, "_pid": None,
                "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _client(self) -> Any:
        from . import open_chain

        if self._pid != os.getpid():  # first use here, or a fork: never share the parent's client
            self._chain, self._pid = open_chain(self.network, self.endpoint, self.db), os.getpid()
            self._metagraph = self._commitments = None
        return self._chain

    def _metagraph_now(self, max_age: float) -> Any:
        self._client()
        if self._metagraph is None or time.monotonic() - self._read_at > max_age:
            self._metagraph, self._read_at = self._chain.metagraph(self.netuid), time.monotonic()
        return self._metagraph

    def _commitments_now(self, max_age: float) -> dict[str, str]:
        self._client()
        if self._commitments is None or time.monotonic() - self._committed_at > max_age:
            self._commitments, self._committed_at = self._chain.commitments(self.netuid), time.monotonic()
        return self._commitments

    def _registered(self, hotkey: str) -> Optional[str]:
        neuron = self._metagraph_now(self.ttl).by_hotkey(hotkey)
        if neuron is None:
            neuron = self._metagraph_now(RETRY).by_hotkey(hotkey)
        return None if neuron is not None else f"hotkey {hotkey} is not registered on netuid {self.netuid}"

    def __call__(self, hotkey: str) -> Optional[str]:
        """None if `hotkey` is registered on the subnet, else why not."""
        with self._lock:
            try:
                return self._registered(hotkey)
            except Exception as exc:  # the chain is unreachable: nobody new is admitted until it answers
                return f"the chain could not be read to check {hotkey} ({exc})"

    def vouches(self, hotkey: str, commitment: str) -> Optional[str]:
        """None if `hotkey` is registered and its chain commitment is `commitment`, else why not.

        A commitment that differs from the cached one is read again (at most every RETRY seconds):
        the hotkey may have just restarted and committed its new peer.
        """
        with self._lock:
            try:
                refused = self._registered(hotkey)
                if refused is not None:
                    return refused
                committed = self._commitments_now(self.ttl).get(hotkey)
                if committed != commitment:
                    committed = self._commitments_now(RETRY).get(hotkey)
            except Exception as exc:
                return f"the chain could not be read to check {hotkey} ({exc})"
        if committed is None:
            return f"hotkey {hotkey} has no chain commitment on netuid {self.netuid}; the neuron commits at start-up"
        if committed != commitment:
            return (f"hotkey {hotkey}'s chain commitment names another peer; only the peer it committed "
                    "(its newest process) is bound")
        return None
