"""The quorum rule that decides whether a downloaded state is the swarm's (`swarm.state_digests`)."""

from __future__ import annotations

import torch

from distributed_training.swarm.state_digests import state_digest, verdict

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


def test_no_digests_at_all_accepts_and_a_lone_publisher_is_believed():
    assert verdict(5, X, {}) is None  # no bound peer published: nothing to check against (as before)
    assert verdict(5, X, {"only": {5: X}}) is None
