"""The quorum rule that decides whether a downloaded state is the swarm's (`swarm.state_digests`)."""

from __future__ import annotations

import torch

from distributed_training.swarm.state_digests import fork_reason, state_digest, verdict, winning

X, Y = "a" * 64, "b" * 64


def test_the_digest_covers_values_dtype_shape_and_order():
    a, b = torch.arange(6.0), torch.ones(2, 3)
    assert state_digest([a, b]) == state_digest([a.clone(), b.clone()])
    assert state_digest([a, b]) != state_digest([b, a])
    assert state_digest([a]) != state_digest([a.reshape(2, 3)])
    assert state_digest([a]) != state_digest([a.double()])
    changed = a.clone()
    changed[3] += 1e-6
    assert state_digest([a]) != state_digest([changed])


def test_a_state_signed_by_the_bound_majority_loads():
    table = {"k0": {4: X}, "k1": {4: X}, "k2": {4: Y}}
    assert verdict(4, X, table) is None
    assert "signed another" in verdict(4, Y, table)


def test_a_tie_or_a_missing_signature_refuses():
    assert "1 signed another" in verdict(4, X, {"k0": {4: X}, "k1": {4: Y}})
    assert "no bound peer signed" in verdict(4, Y, {"k0": {4: X}})


def test_a_liar_signing_the_future_is_ignored_but_one_epoch_ahead_is_not():
    table = {"honest0": {3: X}, "honest1": {3: X}, "liar": {6: Y}}
    assert "no bound peer signed" in verdict(6, Y, table)
    assert verdict(3, X, table) is None
    # its earlier claim for the honest peer's epoch does not tie with it either
    assert verdict(5, X, {"honest0": {4: Y, 5: X}, "liar": {5: Y, 6: Y, 7: Y, 8: Y}}) is None
    # the honest race: the first peer to finish epoch 4 published before the others
    assert verdict(4, Y, {"honest0": {3: X, 4: Y}, "honest1": {3: X}}) is None


def test_no_digests_at_all_refuses_and_a_lone_publisher_is_believed():
    # every bound peer signs its state from the start: a state offered into an empty table is nobody's
    assert "no bound peer has signed any state" in verdict(5, X, {})
    assert verdict(5, X, {"only": {5: X}}) is None


def test_equal_camps_resolve_to_the_smaller_digest_so_both_converge():
    # two groups of two averaged apart at epoch 4: one state wins on both sides, the other camp reloads it
    table = {"k0": {4: X}, "k1": {4: X}, "k2": {4: Y}, "k3": {4: Y}}
    assert winning(4, table)[0] == X
    assert verdict(4, X, table) is None
    assert "2 signed another" in verdict(4, Y, table)
    assert fork_reason(4, X, table) is None
    assert "2 bound peers signed another state" in fork_reason(4, Y, table)


def test_a_peer_that_stepped_alone_is_told_it_forked_but_a_lone_rival_is_no_quorum():
    table = {"k0": {7: X}, "k1": {7: X}, "me": {7: Y}}
    assert "2 bound peers signed another" in fork_reason(7, Y, table)
    # one other signer is no quorum to reload from: a lone liar cannot make an honest peer drop its state
    assert fork_reason(7, Y, {"liar": {7: X}, "me": {7: Y}}) is None
    assert fork_reason(7, Y, {"me": {7: Y}}) is None
    assert fork_reason(8, Y, table) is None  # nobody signed epoch 8 yet


def test_only_a_future_epoch_is_reported_and_every_refusal_is_logged_once(dht, monkeypatch, caplog):
    import uuid

    from distributed_training.swarm import state_digests
    from distributed_training.swarm.bindings import PeerBinding

    accused: list[tuple[str, str]] = []
    digests = state_digests.StateDigests(dht, f"digests-{uuid.uuid4().hex[:8]}", admit=lambda _hotkey: None,
                                         accuse=lambda peer, reason: accused.append((peer, reason)))
    mine = digests._signer.local_public_key.hex()
    bound = {peer: PeerBinding(run_id=digests.run_id, hotkey=f"hk-{peer}", peer_id=peer, record_key=key,
                               issued=0.0, expires=2e9)
             for peer, key in (("signer", mine), ("silent", "ab" * 32))}
    monkeypatch.setattr(state_digests, "live_bindings", lambda *_args, **_kwargs: bound)
    signed, other = [torch.ones(3)], [torch.zeros(3)]
    digests.publish(1, signed)
    assert digests("signer", 1, signed) is None
    # a peer that signed nothing for the epoch (it fell out of step) is refused, not reported
    assert "no bound peer signed this state" in digests("silent", 1, other)
    assert accused == []
    # one that contradicts its own signature is refused, with that said, but not reported: an honest peer
    # reloading the swarm's state at the same epoch serves it a moment before it signs it
    assert "it signed another digest for that epoch itself" in digests("signer", 1, other)
    digests("signer", 1, other)
    assert accused == [] and caplog.text.count("refusing state from signer") <= 1
    # a state from the future is a lie whatever the digests say
    reason = digests("silent", 5, signed)
    assert "claims epoch 5" in reason and accused == [("silent", f"served a state it could not back: {reason}")]
