"""Single clips and rejections published: each reducer signs what it saw; validators count, not score, them."""

from __future__ import annotations

import random
import time
import uuid
from types import SimpleNamespace

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from distributed_training.neuron.validator import Validator
from distributed_training.protocol import WorkRequest, WorkResponse
from distributed_training.swarm.ban_records import BanRecords, read_bans, read_board
from distributed_training.swarm.bindings import PeerBinding
from distributed_training.swarm.dht import DHTSettings, start_dht, visible_maddrs
from distributed_training.swarm.guard import NEVER, AveragingGuard, BanRule
from distributed_training.swarm.robust import CLIPPED, FAR_OFF, NON_FINITE
from distributed_training.swarm.verdict_reports import (MAX_REPORTS, REPORT_AGE, VERDICTS, NewReports, read_reports,
                                                        read_verdicts, reports_in)
from distributed_training.validation.verify import Tolerance

SUSPECT = "12D3KooWsuspect"


def _binding(peer: str, key: bytes) -> PeerBinding:
    return PeerBinding(run_id="r", hotkey=f"hk-{peer}", peer_id=peer, record_key=key.hex(), issued=0.0, expires=1.0)


def _report(peer: str, kind: str = CLIPPED, round_: int = 1, at: float = 0.0) -> dict:
    return dict(peer_id=peer, kind=kind, averager="gradients", round=round_, time=at or time.time(), reason="clipped")


def test_a_guard_posts_what_its_own_reducer_found_and_its_rule_counts(tmp_path) -> None:
    guard = AveragingGuard("gradients", BanRule(clip_strikes=3), board=tmp_path)
    guard.record({"a": CLIPPED, "b": NON_FINITE, "c": CLIPPED}, members=["me", "a", "b", "c"],
                 own={"a": CLIPPED, "b": NON_FINITE})  # c's clip came from another reducer: its to sign
    posted = {r["peer_id"]: r for r in read_verdicts(tmp_path)}
    assert set(posted) == {"a", "b"} and posted["a"]["kind"] == CLIPPED and posted["b"]["kind"] == NON_FINITE
    assert posted["a"]["round"] == 1 and posted["a"]["reason"].startswith("gradients round 1: clipped")
    assert read_board(tmp_path) == {"b": "gradients: sent non-finite values"}  # the verdicts are no bans
    # the parameter averager's distances say nothing (a peer that missed a round is far off honestly)
    state = AveragingGuard("state", BanRule(clip_strikes=NEVER, ban_far_off=False), board=tmp_path / "state")
    (tmp_path / "state").mkdir()
    state.record({"a": CLIPPED, "d": FAR_OFF, "e": NON_FINITE}, members=["a", "d", "e"])
    assert [r["peer_id"] for r in read_verdicts(tmp_path / "state")] == ["e"]
    # the board keeps the newest posts only
    for _ in range(MAX_REPORTS + 5):
        guard.record({"a": CLIPPED}, members=["me", "a"])
    reports = read_verdicts(tmp_path)
    assert len(reports) == MAX_REPORTS and reports[0]["round"] == MAX_REPORTS + 6  # newest first
    assert len(list((tmp_path / VERDICTS).glob("*.json"))) <= MAX_REPORTS


def test_only_bound_reporters_speaking_for_themselves_count() -> None:
    keys = {name: f"[owner:{name}]".encode() for name in ("a", "b", "x")}
    bound = {name: _binding(name, keys[name]) for name in ("a", "b")}
    records = {keys["a"]: {"peer_id": "a", "reports": [_report(SUSPECT), _report("a")]},  # on itself: left out
               keys["x"]: {"peer_id": "x", "reports": [_report(SUSPECT)] * 3},  # unbound
               keys["b"]: {"peer_id": "a", "reports": [_report(SUSPECT)]}}  # b's key speaking as a
    found = reports_in(records, bound)
    assert list(found) == [SUSPECT] and [reporter for reporter, _ in found[SUSPECT]] == ["a"]
    records[keys["b"]] = {"peer_id": "b", "reports": [_report(SUSPECT)] * (MAX_REPORTS + 1)}  # oversized: nothing
    assert len(reports_in(records, bound)[SUSPECT]) == 1


def test_a_validator_counts_each_report_once_and_forgets_old_ones() -> None:
    now = time.time()
    bound = {"a": _binding("a", b"[owner:a]")}
    records = {b"[owner:a]": {"peer_id": "a", "reports": [
        _report(SUSPECT, at=now - 5), _report(SUSPECT, round_=2, at=now - 1),
        _report(SUSPECT, at=now - 2 * REPORT_AGE), _report(SUSPECT, at=now + 3600)]}}  # too old, from the future
    counter = NewReports()
    assert counter.count(reports_in(records, bound), now=now) == {SUSPECT: 2}
    assert counter.count(reports_in(records, bound), now=now + 10) == {}  # republished: already counted
    records[b"[owner:a]"]["reports"].append(_report(SUSPECT, round_=3, at=now + 20))
    assert counter.count(reports_in(records, bound), now=now + 30) == {SUSPECT: 1}


class _Follower:
    swarm_epoch = 3

    def epochs(self) -> list[int]:
        return [3]

    def refresh(self) -> None:
        pass

    def losses_at(self, epoch: int, pages) -> list[float]:
        return [2.5] * len(pages)

    def contributed(self, peer_id: str, since_epoch: int) -> bool:
        return True


def _verdict(validator: Validator):
    request = WorkRequest(run_id="r", round=1, pages=[1, 2, 3], epoch_hint=3)
    response = WorkResponse(run_id="r", round=1, epoch=3, peer_id=SUSPECT, losses=[2.5] * 3, samples_trained=10)
    validator.rng = random.Random(0)
    return validator._verify(request, SimpleNamespace(ok=True, response=response), 3, "hk-suspect")[0]


def test_reports_go_through_the_dht_from_bound_signers_only_and_never_change_a_verdict(dht, tmp_path) -> None:
    run_id = f"verdicts-{uuid.uuid4().hex[:8]}"
    boards = {"mine": tmp_path / "mine", "theirs": tmp_path / "theirs"}
    for board in boards.values():
        board.mkdir()
        AveragingGuard("gradients", board=board).record({SUSPECT: CLIPPED}, members=[SUSPECT, "me"])
    mine = BanRecords(dht, run_id)
    assert mine.publish(boards["mine"]) == {}  # a clip is no ban
    other_key = RSAPrivateKey()
    other = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=visible_maddrs(dht), timeout=60),
                      record_validators=[RSASignatureValidator(other_key)])
    try:
        theirs = BanRecords(other, run_id, private_key=other_key)
        theirs.publish(boards["theirs"])
        me, them = dht.peer_id.to_base58(), other.peer_id.to_base58()
        bound = {me: _binding(me, mine._signer.local_public_key), them: _binding(them, theirs._signer.local_public_key)}
        deadline = time.monotonic() + 10
        while len(read_reports(dht, run_id, bound).get(SUSPECT, [])) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the DHT, which another node writes
        found = read_reports(dht, run_id, bound)
        assert sorted(reporter for reporter, _ in found[SUSPECT]) == sorted([me, them])
        assert {report.kind for _, report in found[SUSPECT]} == {CLIPPED}
        unbound = {me: bound[me]}  # the other signer's binding lapses: its reports no longer count
        assert [reporter for reporter, _ in read_reports(dht, run_id, unbound)[SUSPECT]] == [me]

        # two bound reducers clipped the suspect: counted in its row, yet the verdict is the one without
        validator = Validator.__new__(Validator)
        validator.config = SimpleNamespace(neuron=SimpleNamespace(verify_pages=2))
        validator.tolerance, validator.follower = Tolerance(), _Follower()
        validator.parts = SimpleNamespace(source=SimpleNamespace(page=lambda index: index))
        validator.bound_by_hotkey, validator.accusations, validator.reported = {"hk-suspect": SUSPECT}, {}, {}
        clean = _verdict(validator)
        validator.accusations = read_bans(dht, run_id, bound)
        validator.reported = {SUSPECT: NewReports().count(found)[SUSPECT]}
        assert _verdict(validator) == clean and clean.score == 1.0
        assert validator._reports_row("hk-suspect") == {"clip_reports": 2}
        assert validator._reports_row("hk-suspect") == {"clip_reports": 0}  # counted in one row only
    finally:
        other.shutdown()
