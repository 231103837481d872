"""Published bans: a validator believes a ban only from a quorum of bound peers, each speaking for itself."""

from __future__ import annotations

import time
import uuid

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils.crypto import RSAPrivateKey

from distributed_training.swarm.ban_records import (MAX_BANS, BanRecords, accusations_in, believed_ban, read_bans,
                                                    read_board)
from distributed_training.swarm.bindings import PeerBinding
from distributed_training.swarm.dht import DHTSettings, start_dht, visible_maddrs
from distributed_training.swarm.guard import AveragingGuard, BanRule, post_ban
from distributed_training.swarm.robust import NON_FINITE


def _binding(peer: str, key: bytes) -> PeerBinding:
    return PeerBinding(run_id="r", hotkey=f"hk-{peer}", peer_id=peer, record_key=key.hex(), issued=0.0, expires=1.0)


def _record(peer: str, banned: dict) -> dict:
    return {"peer_id": peer, "banned": banned}


def test_a_ban_counts_from_a_quorum_of_bound_accusers_each_under_its_own_key() -> None:
    keys = {name: f"[owner:{name}]".encode() for name in ("a", "b", "c", "x")}
    bound = {name: _binding(name, keys[name]) for name in ("a", "b", "c")}  # "x" has no binding
    records = {keys["a"]: _record("a", {"p": "gradients: sent non-finite values"}),
               keys["x"]: _record("x", {"p": "framed", "c": "framed"}),  # unbound: ignored
               keys["b"]: _record("a", {"c": "framed"}),  # b's key speaking as a: ignored
               keys["c"]: _record("c", {"c": "itself", "b": "alone"})}  # accusing itself does not count
    accusations = accusations_in(records, bound)
    assert accusations == {"p": {"a": "gradients: sent non-finite values"}, "b": {"c": "alone"}}
    assert believed_ban(accusations, "p") is None and believed_ban(accusations, "b") is None  # one accuser: no quorum

    records[keys["b"]] = _record("b", {"p": "gradients: sent values far beyond every other member's"})
    reason = believed_ban(accusations_in(records, bound), "p")
    assert reason.startswith("banned by 2 bound peers") and "non-finite" in reason and "far beyond" in reason
    # a malformed or oversized record says nothing
    records[keys["c"]] = _record("c", {f"q{i}": "x" for i in range(MAX_BANS + 1)})
    assert "q0" not in accusations_in(records, bound)
    records[keys["c"]] = {"peer_id": "c", "banned": ["p"]}
    assert set(accusations_in(records, bound)) == {"p"}


def test_the_guards_board_is_what_a_peer_publishes(tmp_path) -> None:
    guard = AveragingGuard("gradients", BanRule(ban_rounds=1), board=tmp_path)
    guard.record({"poisoner": NON_FINITE}, members=["me", "poisoner"])
    assert read_board(tmp_path) == {"poisoner": "gradients: sent non-finite values"}
    guard.record({}, members=["me"])
    assert guard.refuse("poisoner", "matchmaking") is None  # the ban ran out and left the board
    assert read_board(tmp_path) == {}
    # a ban from outside the averagers (an impossible progress record) holds in them too
    post_ban(tmp_path, "progress", "inflater", "published epoch 1000000 while the swarm is at 7")
    assert "another part of this peer" in guard.refuse("inflater", "matchmaking")
    # a report (a forged state only this peer was served) is published, not refused
    post_ban(tmp_path, "state", "hijacker", "served a state no quorum of bound peers signed", refuse=False)
    assert guard.refuse("hijacker", "matchmaking") is None
    assert read_board(tmp_path) == {"inflater": "progress: published epoch 1000000 while the swarm is at 7",
                                    "hijacker": "state: served a state no quorum of bound peers signed"}


def test_bans_go_through_the_dht_signed_by_the_bound_keys(dht, tmp_path) -> None:
    run_id = f"bans-{uuid.uuid4().hex[:8]}"
    board = tmp_path / "board"
    board.mkdir()
    (board / "gradients-12D3KooWpoisoner").write_text("sent non-finite values")
    mine = BanRecords(dht, run_id)
    assert mine.publish(board) == {"12D3KooWpoisoner": "gradients: sent non-finite values"}
    other_key = RSAPrivateKey()
    other = start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=visible_maddrs(dht), timeout=60),
                      record_validators=[RSASignatureValidator(other_key)])
    try:
        theirs = BanRecords(other, run_id, private_key=other_key)
        theirs.publish(board)
        bound = {dht.peer_id.to_base58(): _binding(dht.peer_id.to_base58(), mine._signer.local_public_key),
                 other.peer_id.to_base58(): _binding(other.peer_id.to_base58(), theirs._signer.local_public_key)}
        deadline = time.monotonic() + 10
        while len(read_bans(dht, run_id, bound).get("12D3KooWpoisoner", {})) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the DHT, which another node writes
        assert believed_ban(read_bans(dht, run_id, bound), "12D3KooWpoisoner").startswith("banned by 2 bound peers")
        # the other peer's binding lapses: its word no longer counts
        del bound[other.peer_id.to_base58()]
        assert believed_ban(read_bans(dht, run_id, bound), "12D3KooWpoisoner") is None
        # an empty board withdraws this peer's bans
        (board / "gradients-12D3KooWpoisoner").unlink()
        mine.publish(board)
        assert read_bans(dht, run_id, bound) == {}
    finally:
        other.shutdown()
