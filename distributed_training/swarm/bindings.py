"""Peer bindings: a hotkey's signed word that a hivemind peer, and the key that signs its DHT records, are its own.

hivemind knows peers by their libp2p peer id and DHT records by the RSA key that signs them; the
chain knows hotkeys. Nothing ties the two, so any stranger on the DHT can average, serve state and
publish progress as an equal. A binding closes that gap: the neuron signs, with its bittensor
hotkey, the statement (run id, hotkey, peer id, record key, issue and expiry time), and publishes
it in the DHT under its record key; it also commits a short digest of its peer id and record key on
chain (`binding_commitment`, once per process: chains rate-limit commitments). Anyone can check a
binding against the metagraph: the hotkey is registered (as a miner, or as a validator with a
permit), the signature is valid, it has not expired, and the hotkey's chain commitment names its
peer id and record key, so an older process of the same hotkey, still unexpired in the DHT, no
longer counts (one live peer id per hotkey, said by the chain). An admission without `vouches`
(tests, tools) checks registration only; then the newest binding of a hotkey counts.

This module makes and checks bindings; the gates that use them (matchmaking, the all-reduce, state
download, progress records) sit where those happen.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from .record_bounds import RecordBounds

logger = logging.getLogger(__name__)

BINDING_VERSION = "dt-binding/1"
MAX_TTL = 3600.0  # seconds a binding may claim to live: a stolen one expires soon
CLOCK_SKEW = 30.0  # seconds a binding may be issued "in the future" (other machines' clocks)

COMMITMENT_VERSION = "dt-peer/1"

# Returns None if `hotkey` may take part in the run, else the reason it may not. An admission that
# also has `vouches(hotkey, commitment) -> Optional[str]` (`chain.admission.ChainAdmission`) is asked
# that instead, with the binding's `binding_commitment`.
Admission = Callable[[str], Optional[str]]


def binding_commitment(peer_id: str, record_key_hex: str) -> str:
    """The text a hotkey commits on chain for its peer: fixed while the process lives (renewed bindings
    keep their peer id and record key), new when a restart brings a new peer id or record key."""
    if not _is_hex(record_key_hex):
        raise ValueError(f"record key {record_key_hex[:16]!r}... is not hex")
    digest = hashlib.sha256(bytes.fromhex(record_key_hex)).hexdigest()[:32]
    text = f"{COMMITMENT_VERSION} {peer_id} {digest}"
    if len(text.encode()) > 128:  # a chain commitment's limit; real peer ids are ~52 characters
        raise ValueError(f"peer id {peer_id[:16]!r}... is too long to commit")
    return text


def _vouch(admit: Admission, binding: "PeerBinding") -> Optional[str]:
    vouches = getattr(admit, "vouches", None)
    if vouches is None:
        return admit(binding.hotkey)
    try:
        commitment = binding_commitment(binding.peer_id, binding.record_key)
    except ValueError as exc:
        return f"binding of {binding.hotkey} cannot match a chain commitment ({exc})"
    return vouches(binding.hotkey, commitment)


@dataclass(frozen=True)
class PeerBinding:
    run_id: str
    hotkey: str  # ss58
    peer_id: str  # base58 libp2p peer id
    record_key: str  # hex of the RSA public key (DHT subkey) that signs this peer's records
    issued: float  # unix seconds
    expires: float
    signature: str = ""  # 0x-hex hotkey signature over `message()`

    def message(self) -> str:
        """What the hotkey signs: every field but the signature, in a fixed order."""
        return "\n".join((BINDING_VERSION, self.run_id, self.hotkey, self.peer_id, self.record_key,
                          f"{self.issued:.3f}", f"{self.expires:.3f}"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def signs(self, subkey: Any) -> bool:
        """Whether a DHT record stored under `subkey` was signed by the key this binding names."""
        return isinstance(subkey, bytes) and _is_hex(self.record_key) and subkey == bytes.fromhex(self.record_key)

    def check(self, *, run_id: str, admit: Admission, now: Optional[float] = None) -> Optional[str]:
        """None if this binding holds for `run_id` now, else why not (cheapest checks first)."""
        from bittensor.wallets import verify_message

        now = time.time() if now is None else now
        if self.run_id != run_id:
            return f"binding for run {self.run_id!r}, not {run_id!r}"
        if self.expires <= now:
            return f"binding of {self.hotkey} expired {now - self.expires:.0f}s ago"
        if self.issued > now + CLOCK_SKEW or self.expires - self.issued > MAX_TTL or self.expires <= self.issued:
            return f"binding of {self.hotkey} has an impossible lifetime ({self.issued:.0f} to {self.expires:.0f})"
        # the chain's word before the signature: a stranger's binding costs a cached lookup, not a verification
        refused = _vouch(admit, self)
        if refused is not None:
            return refused
        if not verify_message(self.message(), self.signature, self.hotkey):
            return f"binding of {self.hotkey} is not signed by that hotkey"
        return None


def bind(hotkey: Any, run_id: str, peer_id: str, record_key: bytes, ttl: float = MAX_TTL,
         now: Optional[float] = None) -> PeerBinding:
    """A binding signed with `hotkey` (a bittensor keypair: `wallet.hotkey`)."""
    if not 0 < ttl <= MAX_TTL:
        raise ValueError(f"a binding lives at most {MAX_TTL:.0f}s, not {ttl}")
    issued = time.time() if now is None else now
    unsigned = PeerBinding(run_id=run_id, hotkey=hotkey.ss58_address, peer_id=peer_id, record_key=record_key.hex(),
                           issued=round(issued, 3), expires=round(issued + ttl, 3))
    return replace(unsigned, signature="0x" + bytes(hotkey.sign(unsigned.message().encode())).hex())


def admit_registered(metagraph: Callable[[], Any]) -> Admission:
    """Admission by the metagraph: any registered hotkey (a miner; a validator is one with a permit)."""
    def admit(hotkey: str) -> Optional[str]:
        neuron = metagraph().by_hotkey(hotkey)
        if neuron is None:
            return f"hotkey {hotkey} is not registered"
        return None

    return admit


class _BindingRecord(pydantic.BaseModel):
    run_id: pydantic.StrictStr
    hotkey: pydantic.constr(strict=True, max_length=64)
    peer_id: pydantic.constr(strict=True, max_length=128)
    record_key: pydantic.constr(strict=True, max_length=1024)
    issued: pydantic.StrictFloat
    expires: pydantic.StrictFloat
    signature: pydantic.constr(strict=True, max_length=256)


class _BindingsSchema(pydantic.BaseModel):
    bindings: dict[BytesWithPublicKey, Optional[_BindingRecord]]


class BindingRecords:
    """Bindings under `<run_id>_bindings`, one per record key, each stored under (and signed by) that key."""

    def __init__(self, dht: hivemind.DHT, run_id: str, private_key: Optional[RSAPrivateKey] = None):
        """`private_key`: the key this peer signs its records with (default: the process-wide key)."""
        self.dht, self.run_id, self.key = dht, run_id, f"{run_id}_bindings"
        self._signer = RSASignatureValidator(private_key)
        dht.add_validators([SchemaValidator(_BindingsSchema, prefix=run_id), self._signer, RecordBounds(run_id)])

    @property
    def record_key(self) -> bytes:
        """The DHT subkey this peer's records carry: what its binding must name."""
        return self._signer.local_public_key

    def publish(self, binding: PeerBinding) -> bool:
        if binding.record_key != self.record_key.hex():
            raise ValueError("a binding is published under the record key it names")
        return bool(self.dht.store(self.key, subkey=self.record_key, value=binding.as_dict(),
                                   expiration_time=min(get_dht_time() + MAX_TTL, binding.expires)))

    def live(self, admit: Admission, now: Optional[float] = None) -> dict[str, PeerBinding]:
        """The valid bindings by peer id: each stored under the key it names, and the newest of its hotkey."""
        return live_bindings(self.dht, self.run_id, admit, now)


def live_bindings(dht: hivemind.DHT, run_id: str, admit: Admission, now: Optional[float] = None
                  ) -> dict[str, PeerBinding]:
    """`BindingRecords.live` without registering validators (the publishing process did): any process may ask."""
    found = dht.get(f"{run_id}_bindings", latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    newest: dict[str, PeerBinding] = {}
    for subkey, entry in found.value.items():
        try:
            binding = PeerBinding(**_BindingRecord.parse_obj(entry.value).dict())
        except (pydantic.ValidationError, TypeError, AttributeError):
            continue
        if not binding.signs(subkey):
            continue  # a record may only speak for the key that signed it
        if binding.check(run_id=run_id, admit=admit, now=now) is not None:
            continue
        current = newest.get(binding.hotkey)
        if current is None or binding.issued > current.issued:
            newest[binding.hotkey] = binding
    return {binding.peer_id: binding for binding in newest.values()}


def spoken_by_bound(records: Mapping[bytes, Any], bound: Mapping[str, PeerBinding], model: type
                    ) -> Iterator[tuple[str, Any]]:
    """(peer, record) for each of `records` ({signing subkey: value}) that parses as the pydantic `model`,
    is signed by the record key of a live binding, and speaks (its `peer_id`) for that binding's peer."""
    by_key = {binding.record_key: peer for peer, binding in bound.items()}
    for subkey, value in records.items():
        try:
            record = model.parse_obj(value)
        except (pydantic.ValidationError, TypeError, AttributeError):
            continue
        speaker = by_key.get(subkey.hex() if isinstance(subkey, bytes) else "")
        if speaker is not None and speaker == record.peer_id:
            yield speaker, record


class BoundPeers:
    """Admission of peer ids by binding (a `guard.PeerAdmission`): a peer averages only while a live binding names it.

    The bindings are read again every `refresh` seconds, and at most every `retry` seconds when an
    unknown peer asks (it may have just published its binding).
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, admit: Admission, refresh: float = 30.0, retry: float = 3.0):
        self.dht, self.run_id, self.admit, self.refresh, self.retry = dht, run_id, admit, refresh, retry
        self._bound: dict[str, PeerBinding] = {}
        self._read_at = -float("inf")

    def _read(self) -> None:
        self._bound, self._read_at = live_bindings(self.dht, self.run_id, self.admit), time.monotonic()

    def __call__(self, peer_id: str) -> Optional[str]:
        age = time.monotonic() - self._read_at
        if age > self.refresh or (peer_id not in self._bound and age > self.retry):
            self._read()
        binding = self._bound.get(peer_id)
        if binding is None:
            return f"no valid binding of a registered hotkey names peer {peer_id} in run {self.run_id}"
        if binding.expires <= time.time():
            return f"the binding of {binding.hotkey} to peer {peer_id} expired"
        return None

    def bindings(self, peer_ids: Sequence[str] = ()) -> dict[str, PeerBinding]:
        """The live bindings by peer id (a `progress.BindingLookup`), read again like `__call__` does
        when stale or when one of `peer_ids` is unknown."""
        age = time.monotonic() - self._read_at
        if age > self.refresh or (any(peer not in self._bound for peer in peer_ids) and age > self.retry):
            self._read()
        now = time.time()
        return {peer: binding for peer, binding in self._bound.items() if binding.expires > now}


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
        return True
    except ValueError:
        return False


class PeerBinder:
    """This peer's binding: committed on chain, signed with its hotkey, published, and renewed before it lapses.

    `commit` (`lambda text: chain.commit(wallet, netuid, text)`) is called at the first renew and
    again only when the text changes; a failed commit is retried at the next renew. None: no chain
    commitment (peers that check commitments then refuse this binding).
    """

    def __init__(self, dht: hivemind.DHT, run_id: str, hotkey: Any, ttl: float = MAX_TTL,
                 commit: Optional[Callable[[str], None]] = None):
        self.records = BindingRecords(dht, run_id)
        self.dht, self.run_id, self.hotkey, self.ttl, self.commit = dht, run_id, hotkey, ttl, commit
        self.current: Optional[PeerBinding] = None
        self.committed: Optional[str] = None  # the text last committed on chain by this process

    def _commit(self) -> None:
        if self.commit is None:
            return
        text = binding_commitment(self.dht.peer_id.to_base58(), self.records.record_key.hex())
        if text == self.committed:
            return
        try:
            self.commit(text)
        except Exception as exc:  # the chain is down or rate-limits: the DHT binding still goes out
            logger.warning("could not commit the binding of %s on chain (%s); retrying next epoch",
                           self.hotkey.ss58_address, exc)
            return
        self.committed = text

    def renew(self, force: bool = False) -> PeerBinding:
        """Commit the binding's text if it changed, then publish a new binding when the current one has
        lived half its time (or `force`). The chain first: peers that read the new binding find it committed."""
        self._commit()
        now = time.time()
        if force or self.current is None or now > self.current.issued + self.ttl / 2:
            binding = bind(self.hotkey, self.run_id, self.dht.peer_id.to_base58(), self.records.record_key,
                           ttl=self.ttl, now=now)
            if not self.records.publish(binding):
                logger.warning("the binding of %s could not be stored in the DHT; retrying next epoch",
                               self.hotkey.ss58_address)
                return binding
            self.current = binding
        return self.current
