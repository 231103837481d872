"""Backend-neutral view of the chain.

Miners and validators only need a handful of chain facts (who is registered,
where they serve, who may set weights, what each hotkey committed) and three
writes (publish an endpoint, set weights, commit a short text). Keeping that surface in one small ABC lets the same neuron code
run against the embedded SQLite chain (tests, local clusters) and against a
real subtensor without knowing which one it talks to.
"""

from __future__ import annotations

import ipaddress
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

# Chain-side limits: netuids and uids are u16 on subtensor.
MAX_U16 = 65535
# The longest plain field subtensor's Commitments pallet stores (`Data::Raw128`).
MAX_COMMITMENT_BYTES = 128


class ChainError(RuntimeError):
    """A chain read/write failed or got bad input; the message names the fix."""


class HasAddress(Protocol):
    """A keypair as far as the chain layer cares: its SS58 address."""

    @property
    def ss58_address(self) -> str: ...


class WalletLike(Protocol):
    """Anything with a hotkey keypair (``bittensor.Wallet`` in production).

    The embedded chain only reads the address; the subtensor backend also
    signs with it, so there it must be a real ``bittensor.Wallet``.
    """

    @property
    def hotkey(self) -> HasAddress: ...


@dataclass(frozen=True)
class NeuronInfo:
    """One registered neuron; ``ip``/``port`` are ``""``/``0`` when nothing is served."""

    uid: int
    hotkey: str
    coldkey: str
    stake: float
    validator_permit: bool
    ip: str
    port: int

    @property
    def endpoint(self) -> Optional[str]:
        """``ip:port`` (IPv6 bracketed) or None when no endpoint is served."""
        if not self.ip or not self.port:
            return None
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


@dataclass
class Metagraph:
    """A subnet's neurons at one block, ordered by uid."""

    netuid: int
    block: int
    neurons: list[NeuronInfo] = field(default_factory=list)

    def by_hotkey(self, hotkey: str) -> Optional[NeuronInfo]:
        """The neuron registered under ``hotkey``, or None."""
        for neuron in self.neurons:
            if neuron.hotkey == hotkey:
                return neuron
        return None

    def by_uid(self, uid: int) -> Optional[NeuronInfo]:
        """The neuron at ``uid``, or None."""
        for neuron in self.neurons:
            if neuron.uid == uid:
                return neuron
        return None

    @property
    def uids(self) -> list[int]:
        return [n.uid for n in self.neurons]

    @property
    def hotkeys(self) -> list[str]:
        return [n.hotkey for n in self.neurons]

    @property
    def validators(self) -> list[NeuronInfo]:
        """Neurons allowed to set weights."""
        return [n for n in self.neurons if n.validator_permit]

    def __len__(self) -> int:
        return len(self.neurons)


class Chain(ABC):
    """What a neuron may ask of a chain. Implementations: LocalChain, SubtensorChain."""

    network: str

    @abstractmethod
    def metagraph(self, netuid: int) -> Metagraph:
        """All neurons of ``netuid``; ChainError when the subnet does not exist."""

    @abstractmethod
    def block(self) -> int:
        """Current block number."""

    def is_registered(self, netuid: int, hotkey: str) -> bool:
        """Whether ``hotkey`` holds a uid on ``netuid``."""
        return self.uid_for(netuid, hotkey) is not None

    @abstractmethod
    def uid_for(self, netuid: int, hotkey: str) -> Optional[int]:
        """The uid of ``hotkey`` on ``netuid``, or None when not registered."""

    @abstractmethod
    def serve_endpoint(self, wallet: WalletLike, netuid: int, ip: str, port: int) -> None:
        """Publish where validators reach this hotkey's HTTP server."""

    @abstractmethod
    def set_weights(
        self,
        wallet: WalletLike,
        netuid: int,
        uids: list[int],
        weights: list[float],
        version_key: int,
    ) -> None:
        """Replace this validator's weights on ``netuid`` (relative values; normalized)."""

    @abstractmethod
    def weights(self, netuid: int) -> dict[int, dict[int, float]]:
        """``{setter_uid: {dest_uid: fraction}}``, each row summing to 1."""

    @abstractmethod
    def commit(self, wallet: WalletLike, netuid: int, data: str) -> None:
        """Replace this hotkey's commitment on ``netuid`` with ``data`` (the hotkey must be registered)."""

    @abstractmethod
    def commitments(self, netuid: int) -> dict[str, str]:
        """``{hotkey ss58: committed text}`` of every hotkey with a readable commitment on ``netuid``."""

    @abstractmethod
    def close(self) -> None:
        """Release connections. Safe to call twice."""

    def __enter__(self) -> "Chain":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# --- Input checks shared by both backends -----------------------------------
# Both backends validate identically so a bug caught against the embedded chain
# in tests is the same error a miner would see on finney.


def check_netuid(netuid: int) -> int:
    """``netuid`` as an int in the chain's u16 range, or ChainError."""
    if isinstance(netuid, bool) or not isinstance(netuid, int) or not 0 <= netuid <= MAX_U16:
        raise ChainError(f"netuid must be an integer in 0..{MAX_U16}, got {netuid!r}; fix --netuid")
    return netuid


def check_endpoint(ip: str, port: int) -> None:
    """Reject endpoints peers could never dial, before anything is published."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        raise ChainError(
            f"invalid ip {ip!r}: publish a numeric IPv4/IPv6 address peers can reach (--axon.external_ip)"
        ) from None
    if address.is_unspecified:
        raise ChainError(
            f"ip {ip} is a wildcard, not a reachable address; publish the external one (--axon.external_ip)"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= MAX_U16:
        raise ChainError(f"port must be an integer in 1..{MAX_U16}, got {port!r}")


def check_commitment(data: str) -> bytes:
    """``data`` as the utf-8 bytes a commitment stores, or ChainError saying what to shorten."""
    if not isinstance(data, str):
        raise ChainError(f"a commitment is text, got {type(data).__name__}; pass a str")
    raw = data.encode("utf-8")
    if not raw:
        raise ChainError("a commitment cannot be empty; pass the text to commit")
    if len(raw) > MAX_COMMITMENT_BYTES:
        raise ChainError(
            f"a commitment holds at most {MAX_COMMITMENT_BYTES} bytes of utf-8, got {len(raw)}; "
            "commit a shorter text (e.g. a hash of the long one)"
        )
    return raw


def normalize_weights(
    uids: Sequence[int], weights: Sequence[float]
) -> tuple[list[int], list[float]]:
    """Validate a weight vector and scale it to sum 1, dropping zero entries.

    The chain only keeps proportions (and drops zeros), so doing the same here
    makes what a validator reads back equal what it wrote on either backend.
    """
    uid_list = list(uids)
    value_list = [float(w) for w in weights]
    if len(uid_list) != len(value_list):
        raise ChainError(
            f"uids and weights differ in length ({len(uid_list)} vs {len(value_list)}); "
            "pass one weight per uid"
        )
    if not uid_list:
        raise ChainError("no weights given; pass at least one uid with a positive weight")
    for uid in uid_list:
        if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid <= MAX_U16:
            raise ChainError(f"uid must be an integer in 0..{MAX_U16}, got {uid!r}")
    if len(set(uid_list)) != len(uid_list):
        raise ChainError("duplicate uids in weights; give each uid once")
    if any(not math.isfinite(w) or w < 0 for w in value_list):
        raise ChainError("weights must be finite and non-negative")
    total = sum(value_list)
    if total <= 0:
        raise ChainError("all weights are zero; give at least one uid a positive weight")
    pairs = [(uid, w / total) for uid, w in zip(uid_list, value_list) if w > 0]
    return [uid for uid, _ in pairs], [w for _, w in pairs]
