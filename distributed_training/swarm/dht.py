"""Joining hivemind's DHT, and the signed records this project keeps in it.

A closed port or a wrong announce ip must not make a peer retry silently for hours: joining is
retried with back-off for a bounded time, and a failure ends in one message that lists every
address tried and the usual causes.

Records are namespaced by run id and signed with the peer's RSA key (hivemind's
`RSASignatureValidator`): the subkey carries the owner's public key, so no peer can overwrite
another's record, and a schema rejects malformed values before they are stored. Every DHT started
here bounds the size and lifetime of what it stores (`record_bounds`), the tighter bounds of a run's
keys once a record class of that run is built.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from ..files import atomic_write_bytes
from ..spec import RunSpec, SpecMismatch
from .record_bounds import RecordBounds, bounded_entries, record_keys

logger = logging.getLogger(__name__)

DHT = hivemind.DHT  # for type hints outside this package, which does not import hivemind itself
RECORD_TTL = 120.0  # seconds a miner record lives unless refreshed
SPEC_TTL = 600.0  # seconds a run-spec record lives unless refreshed


class DHTBootstrapError(RuntimeError):
    """The DHT could not be started or joined; the message says what was tried and why it may fail."""


@dataclass(frozen=True)
class DHTSettings:
    port: int = 0
    announce_ip: Optional[str] = None
    initial_peers: Sequence[str] = ()
    use_quic: bool = False
    attempts: int = 5
    timeout: float = 120.0
    client_mode: bool = False
    host_ip: str = "0.0.0.0"


def _host_maddrs(settings: DHTSettings) -> list[str]:
    addrs = [f"/ip4/{settings.host_ip}/tcp/{settings.port}"]
    if settings.use_quic:
        addrs.append(f"/ip4/{settings.host_ip}/udp/{settings.port}/quic")
    return addrs


def _announce_maddrs(settings: DHTSettings) -> list[str]:
    if not settings.announce_ip:
        return []
    if settings.port == 0:
        raise DHTBootstrapError("--dht.announce_ip needs a fixed --dht.port: peers cannot reach a random port")
    addrs = [f"/ip4/{settings.announce_ip}/tcp/{settings.port}"]
    if settings.use_quic:
        addrs.append(f"/ip4/{settings.announce_ip}/udp/{settings.port}/quic")
    return addrs


class DHTPortInUse(DHTBootstrapError):
    """`--dht.port` is held by another process (often a neuron or dt-dht of this machine)."""


def check_port_free(settings: DHTSettings) -> None:
    """Refuse a fixed port another process holds, before p2pd starts on it.

    p2pd binds with SO_REUSEPORT, so a second one on the same port starts without an error and the
    two then split the incoming connections; a plain bind here fails on a port that is held.
    """
    if not settings.port:
        return
    kinds = [(socket.SOCK_STREAM, "tcp")] + ([(socket.SOCK_DGRAM, "udp")] if settings.use_quic else [])
    for kind, name in kinds:
        with socket.socket(socket.AF_INET, kind) as probe:
            if kind == socket.SOCK_STREAM:  # a closed connection in TIME_WAIT does not hold the port; a listener does
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((settings.host_ip, settings.port))
            except OSError as exc:
                raise DHTPortInUse(
                    f"--dht.port {settings.port} ({name}) is in use ({exc.strerror}): another neuron or dt-dht on "
                    "this machine may hold it; stop that process or pick another port") from None


def start_dht(settings: DHTSettings, record_validators: Sequence = ()) -> hivemind.DHT:
    """Start a DHT and join the initial peers, retrying with exponential back-off.

    A first peer (no initial peers) starts on its own. A joining peer counts as joined once it
    sees at least one other peer in its routing table; until then it is torn down and retried,
    because a DHT that never met anyone silently trains alone.
    """
    check_port_free(settings)
    errors: list[str] = []
    delay, deadline = 1.0, time.monotonic() + settings.timeout
    for attempt in range(1, settings.attempts + 1):
        dht = None
        try:
            dht = hivemind.DHT(
                initial_peers=list(settings.initial_peers),
                host_maddrs=_host_maddrs(settings),
                announce_maddrs=_announce_maddrs(settings) or None,
                client_mode=settings.client_mode,
                record_validators=[RecordBounds(), *record_validators],
                start=True,
                startup_timeout=min(30.0, max(5.0, deadline - time.monotonic())),
            )
            if not settings.initial_peers or _has_neighbours(dht):
                return dht
            errors.append(f"attempt {attempt}: started, but none of the initial peers answered")
        except DHTBootstrapError:
            raise
        except Exception as exc:  # hivemind surfaces p2pd failures as several exception types
            errors.append(f"attempt {attempt}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if dht is not None:
            dht.shutdown()
        if attempt == settings.attempts or time.monotonic() + delay > deadline:
            break
        logger.warning("DHT bootstrap %s; retrying in %.0fs", errors[-1], delay)
        time.sleep(delay)  # back-off between real connection attempts, not synchronisation
        delay = min(delay * 2, 30.0)
    tried = ", ".join(settings.initial_peers) or "(no initial peers)"
    raise DHTBootstrapError(
        f"could not join the DHT after {len(errors)} attempts; tried {tried} from port {settings.port}. "
        f"Last error: {errors[-1] if errors else 'unknown'}. Usual causes: the peer's --dht.port is closed by a "
        "firewall, it announced a wrong --dht.announce_ip, or the peer id in the multiaddr is stale (the peer "
        "restarted with a new identity)."
    )


async def _count_neighbours(_dht, node) -> int:
    # Runs inside the DHT process, so it must be a picklable module-level function.
    return len(node.protocol.routing_table.uid_to_peer_id)


def _has_neighbours(dht: hivemind.DHT, timeout: float = 10.0) -> bool:
    """True once the node's routing table holds another peer (checked through the DHT process)."""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dht.run_coroutine(_count_neighbours) > 0:
            return True
        time.sleep(0.2)  # polling the routing table; there is no event to wait on
    return False


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Addresses other peers can pass as --dht.initial_peers (loopback last, it only works locally)."""
    addrs = [str(addr) for addr in dht.get_visible_maddrs()]
    return sorted(addrs, key=lambda addr: ("/127.0.0.1/" in addr, addr))


def write_peer_file(path: Path, dht: hivemind.DHT) -> list[str]:
    """Say where this DHT can be joined, in a file other processes poll (written atomically)."""
    maddrs = visible_maddrs(dht)
    atomic_write_bytes(Path(path), json.dumps({"peer_id": str(dht.peer_id), "maddrs": maddrs}).encode())
    return maddrs


class MinerRecord(pydantic.BaseModel):
    """What a miner announces about itself in the swarm."""

    peer_id: pydantic.StrictStr
    uid: Optional[pydantic.conint(ge=0, strict=True)]
    epoch: pydantic.conint(ge=0, strict=True)
    samples_trained: pydantic.conint(ge=0, strict=True)
    time: pydantic.StrictFloat


class _MinerRecordsSchema(pydantic.BaseModel):
    miners: dict[BytesWithPublicKey, Optional[MinerRecord]]


class MinerRecords:
    """Signed per-peer records under the key `<run_id>_miners`.

    Used as a real barrier (tests and operators can wait until N miners are present) and by
    validators to read how many samples a miner's peer has contributed.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str):
        self.dht, self.key = dht, f"{run_id}_miners"
        # The process-wide key, as hivemind's own progress tracker uses: the DHT merges signature
        # validators, so a second key in one process would be dropped and its records left unsigned.
        self._signer = RSASignatureValidator()
        dht.add_validators([SchemaValidator(_MinerRecordsSchema, prefix=run_id), self._signer, RecordBounds(run_id)])

    def publish(self, record: MinerRecord, ttl: float = RECORD_TTL) -> bool:
        return bool(self.dht.store(self.key, subkey=self._signer.local_public_key, value=record.dict(),
                                   expiration_time=get_dht_time() + ttl))

    def fetch(self, bindings: Optional[Callable[[Sequence[str]], Mapping[str, Any]]] = None) -> dict[str, MinerRecord]:
        """Live records by peer id (expired and malformed ones are dropped). Given `bindings` (a
        `progress.BindingLookup`), only records a live binding names, signed by the key it names."""
        found = self.dht.get(self.key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        prefer = record_keys(bindings(()).values()) if bindings is not None else None
        records: dict[str, tuple[Any, MinerRecord]] = {}
        for subkey, entry in bounded_entries(found.value, prefer=prefer, what=self.key).items():
            try:
                record = MinerRecord.parse_obj(entry.value)
            except (pydantic.ValidationError, TypeError, AttributeError):
                continue
            records[record.peer_id] = (subkey, record)
        if bindings is not None:
            bound = bindings(list(records))
            records = {peer: (subkey, record) for peer, (subkey, record) in records.items()
                       if peer in bound and bound[peer].signs(subkey)}
        return {peer: record for peer, (_, record) in records.items()}

    def wait_for(self, count: int, timeout: float,
                 bindings: Optional[Callable[[Sequence[str]], Mapping[str, Any]]] = None) -> dict[str, MinerRecord]:
        """Block until at least `count` (bound, given `bindings`) miners are present; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.fetch(bindings)
            if len(records) >= count:
                return records
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(records)} of {count} miners appeared in the DHT within {timeout:.0f}s")
            time.sleep(0.25)  # poll the DHT; records arrive from other processes


class _RunSpecRecord(pydantic.BaseModel):
    digest: pydantic.constr(strict=True, min_length=64, max_length=64)
    spec: dict


class _RunSpecSchema(pydantic.BaseModel):
    spec: dict[BytesWithPublicKey, Optional[_RunSpecRecord]]


class RunSpecRecords:
    """Each peer's run spec, signed, under `<run_id>_spec`: how a peer with other flags finds out at start.

    A peer that joins a run whose peers all publish another spec stops with one line naming the
    differing fields (it is the odd one out). Where some peers agree with it and others do not, it
    logs the disagreement and goes on: a record is only a claim, and one stranger must not be able
    to stop honest peers from starting.
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, private_key: Optional[RSAPrivateKey] = None):
        """`private_key` signs the record (default: the process-wide key, see MinerRecords); only several
        peers in one process, as in tests, need keys of their own."""
        self.dht, self.key = dht, f"{run_id}_spec"
        self._signer = RSASignatureValidator(private_key)
        dht.add_validators([SchemaValidator(_RunSpecSchema, prefix=run_id), self._signer, RecordBounds(run_id)])
        self._spec: Optional[RunSpec] = None

    def fetch(self) -> dict[bytes, RunSpec]:
        """Every live, well-formed spec record except this peer's own, by signing key."""
        found = self.dht.get(self.key, latest=True)
        specs: dict[bytes, RunSpec] = {}
        if found is None or not isinstance(found.value, dict):
            return specs
        for subkey, entry in bounded_entries(found.value, what=self.key).items():
            if subkey == self._signer.local_public_key:
                continue
            try:
                record = _RunSpecRecord.parse_obj(entry.value)
                spec = RunSpec.from_dict(record.spec)
            except (pydantic.ValidationError, SpecMismatch, TypeError, AttributeError):
                continue
            if spec.digest == record.digest:
                specs[subkey] = spec
        return specs

    def join(self, spec: RunSpec) -> None:
        """Compare `spec` with the run's other peers (SpecMismatch if all differ), then publish it."""
        others = list(self.fetch().values())
        differing = [other for other in others if other.digest != spec.digest]
        if differing and len(differing) == len(others):
            spec.check_matches(max(differing, key=lambda s: sum(o.digest == s.digest for o in differing)),
                               f"the {len(others)} peer(s) already training run {spec.run_id!r}")
        for other in {o.digest: o for o in differing}.values():
            logger.warning("a peer of run %s publishes another run spec: %s", spec.run_id,
                           "; ".join(spec.differences(other)))
        self._spec = spec
        self.refresh()

    def refresh(self) -> bool:
        """Publish this peer's spec again (records expire after SPEC_TTL)."""
        if self._spec is None:
            return False
        value = {"digest": self._spec.digest, "spec": self._spec.as_dict()}
        return bool(self.dht.store(self.key, subkey=self._signer.local_public_key, value=value,
                                   expiration_time=get_dht_time() + SPEC_TTL))
