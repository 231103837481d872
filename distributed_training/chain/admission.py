"""Which hotkeys may take part in the run, by the metagraph, asked from any process.

The averagers that enforce peer bindings run in processes hivemind forks; a chain client (an SQLite
connection, a websocket) must not cross a fork, so `ChainAdmission` opens its own client in the
process that first asks, and again after a fork. A hotkey is admitted while it is registered on the
subnet (a miner; a validator is a registered hotkey with a permit), so a lapsed registration is
refused as soon as the cached metagraph is refreshed.
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
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Any) -> "ChainAdmission":
        return cls(config.subtensor.network, config.subtensor.chain_endpoint, Path(config.chain.db).expanduser(),
                   config.netuid)

    def __getstate__(self) -> dict:  # a copy in another process opens its own client
        return {**self.__dict__, "_chain": None, "_metagraph": None, "_pid": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _metagraph_now(self, max_age: float) -> Any:
        from . import open_chain

        if self._pid != os.getpid():  # first use here, or a fork: never share the parent's client
            self._chain, self._metagraph, self._pid = open_chain(self.network, self.endpoint, self.db), None, os.getpid()
        if self._metagraph is None or time.monotonic() - self._read_at > max_age:
            self._metagraph, self._read_at = self._chain.metagraph(self.netuid), time.monotonic()
        return self._metagraph

    def __call__(self, hotkey: str) -> Optional[str]:
        """None if `hotkey` is registered on the subnet, else why not."""
        with self._lock:
            try:
                neuron = self._metagraph_now(self.ttl).by_hotkey(hotkey)
                if neuron is None:
                    neuron = self._metagraph_now(RETRY).by_hotkey(hotkey)
            except Exception as exc:  # the chain is unreachable: nobody new is admitted until it answers
                return f"the chain could not be read to check {hotkey} ({exc})"
        if neuron is None:
            return f"hotkey {hotkey} is not registered on netuid {self.netuid}"
        return None
