"""Bounds on what the DHT holds for a run: each record's size and lifetime, and how many signers a reader parses.

hivemind stores a value of any size, for any lifetime its writer asks, under as many subkeys as
writers come: our schemas bound a record's content, not its bytes, how long it claims to live, or
how many keys sign records under one name. So:

- `RecordBounds`, a record validator every DHT of this project carries (`dht.start_dht` adds the
  bounds for any key, each record class of a run those of its keys), refuses a record whose value or
  subkey is larger, or whose expiration lies further ahead, than the bound of its kind. hivemind
  runs validators when a peer asks this node to store a record and on every record another peer
  returns for a read, so a run's node neither keeps nor believes an oversized or immortal record.
- `bounded_entries` caps the signers a reader parses under one key at `MAX_SIGNERS`, those a live
  binding names first: one stranger can mint any number of RSA keys, each one more subkey.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.timed_storage import get_dht_time

logger = logging.getLogger(__name__)

CLOCK_SLACK = 60.0  # seconds another machine's clock may run ahead of this one's
MAX_SUBKEY_BYTES = 2048  # a subkey is an RSA public key (~390 bytes) or a peer id (~40)
# A subnet has at most 256 uids and each binds one record key at a time, so an honest run never has
# more bound signers under one key; bound ones are read first, so strangers past the cap crowd out nobody.
MAX_SIGNERS = 256


@dataclass(frozen=True)
class Bound:
    value_bytes: int  # the stored value, signature included
    lifetime: float  # seconds ahead its expiration may lie (plus CLOCK_SLACK)


# Any key: hivemind's own records (matchmaking, state sharing) are a few bytes and live seconds.
ANY_KEY = Bound(64 << 10, 86400.0)
# Our records under `<run_id>_<kind>`: above the fullest value an honest peer writes (signature included)
# and no shorter than the lifetime its writer asks; `tests/unit/test_record_bounds.py` checks both.
RUN_RECORDS = {
    "progress": Bound(2 << 10, 300.0),  # progress.MAX_LIFETIME; hivemind's trackers store for 60 s
    "bindings": Bound(4 << 10, 3600.0),  # bindings.MAX_TTL
    "bans": Bound(32 << 10, 600.0),  # 64 bans of 128 + 200 characters; ban_records.BAN_TTL is 300 s
    "verdicts": Bound(24 << 10, 600.0),  # 32 reports (verdict_reports.MAX_REPORTS); same TTL as bans
    "state_digests": Bound(4 << 10, 3600.0),  # 8 digests; state_digests.DIGEST_TTL is 1800 s
    "miners": Bound(2 << 10, 600.0),  # dht.RECORD_TTL is 120 s
    "spec": Bound(16 << 10, 1200.0),  # a run spec is ~1 KB; dht.SPEC_TTL is 600 s
}
# The averagers' matchmaking and state-sharing keys (`<prefix>.0b`, `<prefix>.all_averagers`): a bool
# or a float each, declared for one matchmaking round (matchmaking time + averaging timeout, 75 s by
# default) or hivemind's `declare_state_period` (30 s).
AVERAGER_PREFIXES = ("grad_averager", "state_averager", "diloco")
AVERAGER_RECORD = Bound(256, 3600.0)


def run_keys(run_id: str) -> dict[str, Bound]:
    """Every key of a run this project knows, with its bound."""
    keys = {f"{run_id}_{kind}": bound for kind, bound in RUN_RECORDS.items()}
    for prefix in AVERAGER_PREFIXES:
        keys.update({f"{run_id}_{prefix}.0b": AVERAGER_RECORD, f"{run_id}_{prefix}.all_averagers": AVERAGER_RECORD})
    return keys


class RecordBounds(RecordValidatorBase):
    """Refuses records beyond the bound of their key (`ANY_KEY` for keys of no known run).

    hivemind hands a validator the DHTID bytes of the key, not its name, so the bounds are kept by
    `DHTID.generate(source=name)`, as hivemind's `SchemaValidator` keeps its fields.
    """

    def __init__(self, run_id: Optional[str] = None):
        self._bounds: dict[bytes, tuple[str, Bound]] = {}
        if run_id is not None:
            for name, bound in run_keys(run_id).items():
                self._bounds[DHTID.generate(source=name).to_bytes()] = (name, bound)
        self._said: set[tuple[str, str]] = set()

    def validate(self, record: DHTRecord) -> bool:
        name, bound = self._bounds.get(record.key, ("a key of no known run", ANY_KEY))
        if len(record.value) > bound.value_bytes or len(record.subkey) > MAX_SUBKEY_BYTES:
            return self._refuse(name, "size", f"{len(record.value)} + {len(record.subkey)} bytes of value and "
                                f"subkey (at most {bound.value_bytes} + {MAX_SUBKEY_BYTES})")
        if record.expiration_time > get_dht_time() + bound.lifetime + CLOCK_SLACK:
            return self._refuse(name, "lifetime", f"it claims to live over {bound.lifetime:.0f} s")
        return True

    def _refuse(self, name: str, kind: str, why: str) -> bool:
        if (name, kind) not in self._said:  # once per key and excess: a stranger can send any number
            self._said.add((name, kind))
            logger.warning("refusing a DHT record under %s: %s", name, why)
        return False

    @property
    def priority(self) -> int:
        # validators run by decreasing priority: this cheap check before the RSA signature's (10) is verified
        return 20

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, RecordBounds):
            return False
        self._bounds.update(other._bounds)  # one validator for every run this DHT serves
        return True


Entry = TypeVar("Entry")
_capped: set[str] = set()


def bounded_entries(found: Mapping[Any, Entry], limit: int = 0, prefer: Optional[Callable[[Any], bool]] = None,
                    what: str = "a key") -> dict[Any, Entry]:
    """At most `limit` (default `MAX_SIGNERS`) entries of `found` ({subkey: entry}), those whose subkey
    `prefer` accepts first; says once per `what` when some were left out."""
    limit = limit or MAX_SIGNERS
    if len(found) <= limit:
        return dict(found)
    first = [subkey for subkey in found if prefer is not None and prefer(subkey)]
    rest = [subkey for subkey in found if prefer is None or not prefer(subkey)]
    kept = {subkey: found[subkey] for subkey in (first + rest)[:limit]}
    if what not in _capped:
        _capped.add(what)
        logger.warning("%s holds records of %d signers; reading %d of them (bound ones first)", what, len(found), limit)
    return kept


def record_keys(bindings: Iterable[Any]) -> Callable[[Any], bool]:
    """Whether a subkey is the record key of one of `bindings` (`PeerBinding`s): `bounded_entries`'s `prefer`."""
    keys = set()
    for binding in bindings:
        try:
            keys.add(bytes.fromhex(binding.record_key))
        except (ValueError, AttributeError, TypeError):
            continue
    return lambda subkey: isinstance(subkey, bytes) and subkey in keys
