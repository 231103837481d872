"""Single verdicts made public: each sender this peer's reducer clipped or rejected, for validators to read.

A ban (`ban_records`) needs a non-finite or far-off part, or clips in consecutive rounds; each single
verdict is evidence too. So every guard posts each verdict of this peer's own reducer (those other
reducers sent back are theirs to sign) that its rule counts against a sender, in the ban board's
`verdicts/` directory: guards run in their averagers' processes. Each epoch the ban records' publisher
signs the newest `MAX_REPORTS` with the same key and stores them under `<run_id>_verdicts`.

Their own key rather than a field of the ban record: hivemind's `SchemaValidator` refuses a value
whose parse drops a field, so peers of the previous release would refuse an extended ban record,
and the bans in it with it.

A validator reads reports only from the record keys of live bindings, as it reads bans, and counts
the new ones about each miner's peer in the round's metrics row. They never lower a score: honest
miners are clipped now and then, and repeats already end in a ban.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.schema import BytesWithPublicKey
from hivemind.utils.timed_storage import get_dht_time

from ..files import atomic_write_bytes
from .bindings import PeerBinding, spoken_by_bound
from .record_bounds import CLOCK_SLACK, bounded_entries, record_keys

logger = logging.getLogger(__name__)

MAX_REPORTS = 32  # reports one record holds (the newest): a record's size is bounded
REPORT_AGE = 3600.0  # seconds a report is kept on the board, and remembered by a validator
VERDICTS = "verdicts"  # the ban board's subdirectory of posted verdicts

_PeerId = pydantic.constr(strict=True, max_length=128)


class VerdictReport(pydantic.BaseModel):
    peer_id: _PeerId  # the sender judged
    kind: pydantic.constr(strict=True, max_length=16)  # robust.NON_FINITE, FAR_OFF or CLIPPED
    averager: pydantic.constr(strict=True, max_length=32)  # "gradients", "state", "pseudo-gradients"
    round: pydantic.conint(ge=0, strict=True)  # of that averager: one per global epoch
    time: pydantic.StrictFloat  # unix seconds the round ended
    reason: pydantic.constr(strict=True, max_length=200)


class _VerdictRecord(pydantic.BaseModel):
    peer_id: _PeerId  # the reporter: must be the peer id its binding names
    reports: pydantic.conlist(VerdictReport, max_items=MAX_REPORTS)


class VerdictsSchema(pydantic.BaseModel):
    verdicts: dict[BytesWithPublicKey, Optional[_VerdictRecord]]


def post_verdicts(board: Path, averager: str, round_: int, verdicts: Mapping[str, tuple[str, str]]) -> None:
    """Post one round's verdicts ({sender: (kind, reason)}) of one averager's reducer; keeps the board's
    newest `MAX_REPORTS` posts (each holds at least one report) of the last `REPORT_AGE` seconds."""
    if not verdicts:
        return
    now = time.time()
    reports = [VerdictReport(peer_id=peer[:128], kind=kind[:16], averager=averager[:32], round=round_, time=now,
                             reason=reason[:200]).dict() for peer, (kind, reason) in verdicts.items()]
    folder, cutoff = board / VERDICTS, int((now - REPORT_AGE) * 1e9)
    try:
        name = f"{time.time_ns():020d}-{averager}-{os.getpid()}.json"  # sorts by time
        atomic_write_bytes(folder / name, json.dumps(reports).encode())
        for index, post in enumerate(sorted(folder.glob("*.json"), reverse=True)):
            if index >= MAX_REPORTS or int(post.name[:20]) < cutoff:
                post.unlink(missing_ok=True)  # another averager's process may prune the same post
    except (OSError, ValueError) as exc:  # the verdict still holds here; only its report is lost
        logger.warning("%s: could not post round %d's verdicts for validators: %s", averager, round_, exc)


def read_verdicts(board: Path) -> list[dict[str, Any]]:
    """The newest `MAX_REPORTS` reports posted on `board` in the last `REPORT_AGE` seconds, newest first."""
    folder, found = board / VERDICTS, []
    oldest = time.time() - REPORT_AGE
    for post in sorted(folder.glob("*.json"), reverse=True) if folder.is_dir() else ():
        try:
            reports = [VerdictReport.parse_obj(item).dict() for item in json.loads(post.read_text())]
        except (OSError, ValueError, TypeError, pydantic.ValidationError):  # pruned meanwhile, or not ours
            continue
        found.extend(report for report in reports if report["time"] >= oldest)
        if len(found) >= MAX_REPORTS:
            break
    return found[:MAX_REPORTS]


def publish_verdicts(dht: hivemind.DHT, run_id: str, subkey: bytes, board: Path, ttl: float
                     ) -> list[dict[str, Any]]:
    """Store the board's newest reports under `<run_id>_verdicts`, signed by the key of `subkey` (an empty
    list withdraws earlier ones); returns them. The DHT must carry `VerdictsSchema` (`BanRecords` adds it)."""
    reports = read_verdicts(board)
    value = _VerdictRecord(peer_id=dht.peer_id.to_base58(), reports=reports).dict()
    if not dht.store(f"{run_id}_verdicts", subkey=subkey, value=value, expiration_time=get_dht_time() + ttl):
        logger.warning("this peer's verdict reports could not be stored in the DHT; retrying next epoch")
    return reports


Reports = dict[str, list[tuple[str, VerdictReport]]]  # judged peer -> [(bound reporter peer, report)]


def read_reports(dht: hivemind.DHT, run_id: str, bound: Mapping[str, PeerBinding]) -> Reports:
    """The reports in records signed by the key of a live binding, by judged peer."""
    found = dht.get(f"{run_id}_verdicts", latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    entries = bounded_entries(found.value, prefer=record_keys(bound.values()), what=f"{run_id}_verdicts")
    return reports_in({subkey: getattr(entry, "value", None) for subkey, entry in entries.items()}, bound)


def reports_in(records: Mapping[bytes, object], bound: Mapping[str, PeerBinding]) -> Reports:
    """`read_reports` on records already read ({signing subkey: value}); a report on the reporter itself is left out."""
    reports: Reports = {}
    for reporter, record in spoken_by_bound(records, bound, _VerdictRecord):
        for report in record.reports:
            if report.peer_id != reporter:
                reports.setdefault(report.peer_id, []).append((reporter, report))
    return reports


class NewReports:
    """A validator's count of reports it has not counted before (records are republished every epoch)."""

    def __init__(self) -> None:
        self._seen: dict[tuple, float] = {}  # (reporter, averager, round, peer, kind, time) -> time

    def count(self, reports: Reports, now: Optional[float] = None) -> dict[str, int]:
        """Judged peer -> reports about it first seen now; a report older than `REPORT_AGE`, or from the
        future, is not counted (so the memory of seen reports stays bounded)."""
        now = time.time() if now is None else now
        self._seen = {key: at for key, at in self._seen.items() if at >= now - REPORT_AGE}
        counts: dict[str, int] = {}
        for peer, found in reports.items():
            for reporter, report in found:
                key = (reporter, report.averager, report.round, peer, report.kind, report.time)
                if key in self._seen or not now - REPORT_AGE <= report.time <= now + CLOCK_SLACK:
                    continue
                self._seen[key] = report.time
                counts[peer] = counts.get(peer, 0) + 1
        return counts
