"""Chain backend for a real subtensor (finney, test, a localnet, or any ws:// URL).

Thin on purpose: every method is one or two calls of the bittensor 11 SDK's
blocking client (``bittensor.Subtensor``) — typed reads
(``subnets.metagraph``, ``subnets.commitments``, ``neurons.uid``,
``weights.weights``, ``block``), intents run through ``execute``
(``ServeAxon``, ``SetWeights``) and one raw call through ``submit_call``
(``Commitments.set_commitment``, which no intent wraps) — plus error
translation, so neurons see one ``ChainError`` with a fix instead of a zoo of
SDK/transport exceptions.

bittensor is imported lazily: importing ``distributed_training.chain`` for the
embedded chain (many short-lived processes in tests) should not pay the SDK's
import cost.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Optional

from .base import (
    Chain,
    ChainError,
    Metagraph,
    NeuronInfo,
    WalletLike,
    check_commitment,
    check_endpoint,
    check_netuid,
    normalize_weights,
)
from .local import EMBEDDED_NETWORK

if TYPE_CHECKING:
    import bittensor

logger = logging.getLogger(__name__)

# Resubmits on transient pool rejections (nonce races, low priority), as the
# SDK's own ``bt.set_weights`` helper does; dispatch failures are never retried.
SET_WEIGHTS_RETRIES = 2

# A factory gets the network name or ws:// URL to dial and returns a client
# shaped like ``bittensor.Subtensor``.
SubtensorFactory = Callable[[str], Any]


def _sdk() -> ModuleType:
    import bittensor

    return bittensor


def _keyfile_error() -> type[Exception]:
    from bittensor.sp_core import KeyfileError

    return KeyfileError


def _default_factory(target: str) -> "bittensor.Subtensor":
    # Cold construction: bt.Subtensor opens no socket until the first call.
    return _sdk().Subtensor(network=target)


def resolve_target(network: str, chain_endpoint: Optional[str]) -> tuple[str, str]:
    """``(what to dial, its ws URL)`` for a network name plus optional endpoint override.

    ``--subtensor.chain_endpoint`` wins over the network's preset URL, as in
    bittensor's own config. Validated up front so a typo fails at startup,
    not at the first chain call minutes later.
    """
    if network == EMBEDDED_NETWORK:
        raise ChainError(
            "network 'embedded' is the built-in SQLite chain; open it with open_chain() "
            "and --chain.db, not SubtensorChain"
        )
    target = chain_endpoint or network
    if not target:
        raise ChainError("no network given; pass --subtensor.network (finney, test, local, embedded)")
    from bittensor.settings import resolve_endpoint

    try:
        _label, url = resolve_endpoint(target)
    except ValueError:
        raise ChainError(
            f"unknown network {target!r}; use finney, test, local, embedded, or a ws:// / wss:// "
            "URL in --subtensor.chain_endpoint"
        ) from None
    return target, url


def _split_axon(axon: Optional[str]) -> tuple[str, int]:
    """The SDK renders a served axon as ``ip:port`` / ``[ipv6]:port``; None when unserved."""
    if not axon:
        return "", 0
    host, _, port = axon.rpartition(":")
    return host.strip("[]"), int(port)


def _not_registered(hotkey: str, netuid: int) -> ChainError:
    return ChainError(
        f"hotkey {hotkey} is not registered on netuid {netuid}; register it with "
        f"`btcli subnets register --netuid {netuid}` (or `dt-chain register ...` on the embedded chain)"
    )


class SubtensorChain(Chain):
    """``Chain`` over bittensor's ``Subtensor``; connects on first use, not construction."""

    def __init__(
        self,
        network: str,
        chain_endpoint: Optional[str] = None,
        subtensor_factory: Optional[SubtensorFactory] = None,
    ) -> None:
        self.network = network
        self._target, self.endpoint = resolve_target(network, chain_endpoint)
        self._factory = subtensor_factory or _default_factory
        self._client: Any = None

    # --- plumbing ---------------------------------------------------------------

    def _sub(self) -> Any:
        if self._client is None:
            self._client = self._factory(self._target)
        return self._client

    def _translate(self, action: str, error: Exception) -> ChainError:
        """Map SDK/transport failures onto one ChainError naming the fix."""
        bt = _sdk()
        if isinstance(error, (bt.RpcConnectionError, bt.ConnectionNotReady, OSError, TimeoutError)):
            return ChainError(
                f"cannot reach subtensor at {self.endpoint}: {error}; "
                "check --subtensor.network/--subtensor.chain_endpoint"
            )
        if isinstance(error, bt.ChainError):
            return ChainError(f"{action} failed on {self.network}: {error.message}; {error.remediation}")
        if isinstance(error, _keyfile_error()):
            return ChainError(
                f"{action} failed: cannot use the wallet's hotkey ({error}); "
                "check --wallet.name/--wallet.hotkey/--wallet.path"
            )
        return ChainError(f"{action} failed on {self.network}: {error}")

    def _guard(self, action: str, call: Callable[[], Any]) -> Any:
        """Run one SDK call, translating its failures (ours pass through untouched)."""
        try:
            return call()
        except ChainError:
            raise
        except Exception as error:
            if isinstance(error, (_sdk().BittensorError, _keyfile_error(), OSError, TimeoutError)):
                raise self._translate(action, error) from error
            raise

    # --- Chain interface ----------------------------------------------------------

    def block(self) -> int:
        return int(self._guard("reading the block number", lambda: self._sub().block))

    def metagraph(self, netuid: int) -> Metagraph:
        check_netuid(netuid)
        # commitments=False: `commitments()` reads them when wanted; here they would cost two map scans.
        graph = self._guard(
            f"reading the metagraph of netuid {netuid}",
            lambda: self._sub().subnets.metagraph(netuid, commitments=False),
        )
        if graph is None:
            raise ChainError(f"subnet {netuid} does not exist on {self.network}; check --netuid")
        neurons = []
        for n in graph.neurons:
            ip, port = _split_axon(n.axon)
            neurons.append(
                NeuronInfo(
                    uid=int(n.uid),
                    hotkey=str(n.hotkey),
                    coldkey=str(n.coldkey),
                    # Balance.amount: the subnet's own unit (alpha); .tao would raise.
                    stake=float(n.total_stake.amount),
                    validator_permit=bool(n.validator_permit),
                    ip=ip,
                    port=port,
                )
            )
        return Metagraph(netuid=netuid, block=int(graph.block), neurons=neurons)

    def uid_for(self, netuid: int, hotkey: str) -> Optional[int]:
        check_netuid(netuid)
        uid = self._guard(
            f"looking up hotkey {hotkey} on netuid {netuid}",
            lambda: self._sub().neurons.uid(hotkey_ss58=hotkey, netuid=netuid),
        )
        return None if uid is None else int(uid)

    def serve_endpoint(self, wallet: WalletLike, netuid: int, ip: str, port: int) -> None:
        check_netuid(netuid)
        check_endpoint(ip, port)
        hotkey = wallet.hotkey.ss58_address
        current = self.metagraph(netuid).by_hotkey(hotkey)
        if current is None:
            raise _not_registered(hotkey, netuid)
        if (current.ip, current.port) == (ip, port):
            # The chain rate-limits serve_axon; a restart with the same address must not trip it.
            logger.info("endpoint %s:%s already published for uid %s", ip, port, current.uid)
            return
        intent = _sdk().ServeAxon(netuid=netuid, ip=ip, port=port)
        self._execute(f"publishing endpoint {ip}:{port} on netuid {netuid}", intent, wallet)

    def set_weights(
        self,
        wallet: WalletLike,
        netuid: int,
        uids: list[int],
        weights: list[float],
        version_key: int,
    ) -> None:
        check_netuid(netuid)
        dests, values = normalize_weights(uids, weights)
        intent = _sdk().SetWeights(netuid=netuid, uids=dests, weights=values, version_key=int(version_key))
        self._execute(
            f"setting weights on netuid {netuid}", intent, wallet, retries=SET_WEIGHTS_RETRIES
        )

    def weights(self, netuid: int) -> dict[int, dict[int, float]]:
        check_netuid(netuid)
        rows = self._guard(
            f"reading weights of netuid {netuid}", lambda: self._sub().weights.weights(netuid=netuid)
        )
        return {int(s): {int(d): float(w) for d, w in row.items()} for s, row in rows.items()}

    def commit(self, wallet: WalletLike, netuid: int, data: str) -> None:
        check_netuid(netuid)
        raw = check_commitment(data)
        hotkey = wallet.hotkey.ss58_address
        if self.uid_for(netuid, hotkey) is None:
            raise _not_registered(hotkey, netuid)
        current = self._guard(
            f"reading the commitment of {hotkey} on netuid {netuid}",
            lambda: self._sub().identity.commitment(netuid=netuid, hotkey_ss58=hotkey),
        )
        if current is not None and current.data == data:
            # The chain rate-limits commitments; a retry after a lost reply must not trip it.
            logger.info("commitment of %s already on netuid %s", hotkey, netuid)
            return
        # `Data::Raw<N>` carries exactly N bytes: the shape `info.fields` decodes to on reads.
        info = {"fields": [{f"Raw{len(raw)}": "0x" + raw.hex()}]}
        call = _sdk().calls.Commitments.set_commitment(netuid=netuid, info=info)

        def submit() -> Any:
            # Hotkey-signed (commitments are keyed by hotkey); the coldkey pays the fee.
            result = self._sub().submit_call(
                call, wallet, signer="hotkey", wait_for_inclusion=True, wait_for_finalization=False
            )
            return result.raise_for_failure()

        self._guard(f"committing on netuid {netuid}", submit)

    def commitments(self, netuid: int) -> dict[str, str]:
        check_netuid(netuid)
        found = self._guard(
            f"reading the commitments of netuid {netuid}", lambda: self._sub().subnets.commitments(netuid)
        )
        # `.value` is None while a timelocked payload is sealed: nothing readable is committed yet.
        return {str(hotkey): c.value for hotkey, c in found.items() if c is not None and c.value is not None}

    def _execute(self, action: str, intent: Any, wallet: WalletLike, **kwargs: Any) -> None:
        """Sign and submit one intent; success means included in a block.

        Inclusion (not finalization) is enough: the dispatch outcome is known
        at inclusion, and waiting for finality would stall a validator loop.
        """

        def submit() -> Any:
            result = self._sub().execute(
                intent, wallet, wait_for_inclusion=True, wait_for_finalization=False, **kwargs
            )
            return result.raise_for_failure()

        self._guard(action, submit)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception as error:  # teardown must not mask the caller's own error
                logger.debug("closing subtensor client failed: %s", error)

    def __repr__(self) -> str:
        return f"SubtensorChain(network={self.network!r}, endpoint={self.endpoint!r})"
