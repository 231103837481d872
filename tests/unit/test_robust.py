"""The robust mean of an all-reduce part, and the guard that bans what it rejects: exact numbers."""

from __future__ import annotations

import math

import pytest
import torch

from distributed_training.swarm.guard import AveragingGuard, BanRule
from distributed_training.swarm.robust import (CLIPPED, FAR_OFF, NON_FINITE, NothingToAverage, RobustRule, decode_verdicts,
                                               encode_verdicts, influence_bound, robust_average,
                                               round_verdicts)

RULE = RobustRule(clip_factor=4.0, weight_cap=4.0)


def test_one_member_of_norm_1e6_moves_the_average_by_at_most_the_stated_bound() -> None:
    honest = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    attacker = torch.tensor([6e5, 8e5])  # norm 1e6
    parts, weights = [*honest, attacker], [1.0, 1.0, 1.0, 1.0]
    average, verdicts = robust_average(parts, weights, RULE)

    # center: coordinate-wise lower median (1, 1); distances 1, 1, 0, ~1e6; tau = 4 * 1
    center, tau = torch.tensor([1.0, 1.0]), 4.0
    attacker_term = tau * (attacker - center) / (attacker - center).norm() / 4
    others = center + ((honest[0] - center) + (honest[1] - center) + (honest[2] - center)) / 4
    assert torch.allclose(average, others + attacker_term, atol=1e-6)
    assert torch.allclose(average, torch.tensor([1.35, 1.55]), atol=1e-5)
    assert influence_bound(weights, 3, parts, RULE) == pytest.approx(1.0)  # w_j * tau / W = 1 * 4 / 4
    assert (average - others).norm().item() <= 1.0 + 1e-6
    assert verdicts == [None, None, None, FAR_OFF]  # 1e6 median distances away: banned at once

    # however large the attack, in any direction: the center stays in the honest members' range and the
    # attacker's term within w_j * tau / W of what the honest members make of that center
    low, high = torch.stack(honest).min(0).values, torch.stack(honest).max(0).values
    for scale in (1e3, 1e9, -1e12):
        parts = [*honest, attacker / 1e6 * scale]
        moved, _ = robust_average(parts, weights, RULE)
        center = torch.stack(parts).median(0).values
        assert bool(((low <= center) & (center <= high)).all()), (scale, center)
        others = center + sum(h - center for h in honest) / 4
        bound = influence_bound(weights, 3, parts, RULE)
        assert bound <= 1.0 + 1e-6  # tau is at most 4 median distances of honest members to an honest-range center
        assert (moved - others).norm().item() <= bound + 1e-5, scale


def test_honest_members_within_the_clip_get_exactly_the_weighted_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randn(1000, generator=generator) for _ in range(3)]
    weights = [1.0, 2.0, 3.0]
    average, verdicts = robust_average(parts, weights, RULE)
    expected = sum(w * p for w, p in zip(weights, parts)) / sum(weights)
    assert torch.allclose(average, expected, atol=1e-6)
    assert verdicts == [None, None, None]


def test_non_finite_parts_and_weights_are_rejected_and_declared_weights_capped() -> None:
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0]), torch.tensor([2.0, 2.0])
    nan = torch.tensor([float("nan"), 0.0])
    average, verdicts = robust_average([a, nan, b, c], [1.0, 1.0, 1.0, 1.0], RULE)
    assert torch.equal(average, torch.tensor([2.0, 2.0]))
    assert verdicts == [None, NON_FINITE, None, None]

    _, verdicts = robust_average([a, b, c], [1.0, float("inf"), 1.0], RULE)
    assert verdicts[1] == NON_FINITE

    # a declared weight of 1e9 counts as 4 median weights: (1*1 + 4*3 + 1*2) / 6 = 2.5
    average, _ = robust_average([a, b, c], [1.0, 1e9, 1.0], RULE)
    assert average[0].item() == pytest.approx(15 / 6)

    with pytest.raises(NothingToAverage):
        robust_average([nan, nan], [1.0, 1.0], RULE)
    with pytest.raises(NothingToAverage):
        robust_average([a, b], [0.0, 0.0], RULE)  # tag-along members only


def test_the_rule_refuses_settings_that_clip_honest_members() -> None:
    with pytest.raises(ValueError, match="clip_factor"):
        RobustRule(clip_factor=0.5)
    with pytest.raises(ValueError, match="weight_cap"):
        RobustRule(weight_cap=0.0)
    with pytest.raises(ValueError, match="ban_factor"):
        RobustRule(strike_factor=8.0, ban_factor=4.0)


def test_guard_bans_non_finite_at_once_and_clipped_after_strikes_then_lets_them_back() -> None:
    guard = AveragingGuard("test", BanRule(ban_rounds=3, clip_strikes=2))
    members = ["honest", "poisoner", "scaler"]
    guard.record({"poisoner": NON_FINITE, "scaler": CLIPPED, "shouter": FAR_OFF}, [*members, "shouter"])
    assert guard.refuse("poisoner", "matchmaking") is not None
    assert guard.refuse("shouter", "matchmaking") is not None
    assert guard.refuse("scaler", "matchmaking") is None  # one strike
    guard.record({"scaler": CLIPPED}, ["honest", "scaler"])
    assert "banned" in guard.refuse("scaler", "all-reduce")
    assert guard.refuse("honest", "all-reduce") is None

    for _ in range(2):
        guard.record({}, ["honest"])
    assert guard.refuse("poisoner", "group") is None  # banned in round 1 for 3 rounds: back in round 4
    assert guard.refuse("scaler", "group") is not None
    guard.record({}, ["honest"])
    assert guard.refuse("scaler", "group") is None

    # a clean round clears strikes
    guard.record({"scaler": CLIPPED}, members)
    guard.record({}, members)
    guard.record({"scaler": CLIPPED}, members)
    assert guard.refuse("scaler", "group") is None

    # a repeat offender's second ban lasts twice as long (6 rounds)
    guard.record({"poisoner": NON_FINITE}, members)
    for _ in range(5):
        guard.record({}, ["honest"])
        assert guard.refuse("poisoner", "group") is not None
    guard.record({}, ["honest"])
    assert guard.refuse("poisoner", "group") is None


def test_guard_asks_admission_after_bans() -> None:
    guard = AveragingGuard("test", admit=lambda peer: None if peer.startswith("bound") else "no binding")
    assert guard.refuse("bound-1", "matchmaking") is None
    assert guard.refuse("stranger", "matchmaking") == "no binding"
    assert not math.isnan(guard.rounds)


def test_verdicts_travel_as_a_mask_and_garbage_says_nothing() -> None:
    verdicts = {0: None, 1: NON_FINITE, 2: FAR_OFF, 3: CLIPPED, 16: CLIPPED}
    mask = encode_verdicts(verdicts)
    assert decode_verdicts(mask, 17) == {1: NON_FINITE, 2: FAR_OFF, 3: CLIPPED, 16: CLIPPED}
    assert decode_verdicts(mask, 2) == {1: NON_FINITE}  # senders beyond the group are not named
    assert decode_verdicts(0.0, 5) == {}
    for garbage in (float("nan"), -1.0, 0.5, 2.0 ** 60, float("inf")):
        assert decode_verdicts(garbage, 5) == {}, garbage


def test_a_part_from_few_samples_is_clipped_without_a_strike() -> None:
    honest = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    far = torch.tensor([9.0, 9.0])  # 8 * sqrt(2) from the center (1, 1), tau = 4
    _, verdicts = robust_average([*honest, far], [4.0, 4.0, 4.0, 4.0], RULE)
    assert verdicts[3] == CLIPPED
    # the same part from 1 sample where the others had 16: its noise explains a distance 4x larger
    average, verdicts = robust_average([*honest, far], [16.0, 16.0, 16.0, 1.0], RULE)
    assert verdicts[3] is None
    assert (average - torch.tensor([1.0, 1.0])).norm() <= 1.0  # still clipped all the same


def test_of_three_senders_a_moderate_outlier_is_clipped_but_not_struck_a_far_one_is_banned() -> None:
    honest = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    moderate, far = torch.tensor([9.0, 9.0]), torch.tensor([900.0, 900.0])
    average, verdicts = robust_average([*honest, moderate], [4.0, 4.0, 4.0], RULE)
    assert verdicts == [None, None, None]  # three honest gradients are often this far apart
    assert (average - torch.tensor([1.0, 1.0])).norm() <= 2.0  # and it is still clipped
    _, verdicts = robust_average([*honest, far], [4.0, 4.0, 4.0], RULE)
    assert verdicts[2] == FAR_OFF


def test_parameter_averaging_bans_for_non_finite_values_only() -> None:
    from distributed_training.swarm.guard import NEVER
    from distributed_training.training.trainer import TrainerSettings

    settings = TrainerSettings(run_id="r", batch_size=1, target_batch_size=1)
    assert settings.guard("state").rule.clip_strikes == NEVER
    assert settings.guard("gradients").rule == settings.bans == settings.guard("pseudo-gradients").rule
    state = settings.guard("state")
    for _ in range(5):
        state.record({"drifted": CLIPPED}, ["drifted"])
        state.record({"drifted": FAR_OFF}, ["drifted"])
    assert state.refuse("drifted", "group") is None
    state.record({"drifted": NON_FINITE}, ["drifted"])
    assert state.refuse("drifted", "group") is not None


def test_two_senders_get_the_weighted_mean_and_no_verdict_by_distance() -> None:
    small, large = torch.tensor([0.001, 0.0]), torch.tensor([100.0, -50.0])
    average, verdicts = robust_average([small, large], [1.0, 3.0], RULE)
    assert torch.allclose(average, (small + 3 * large) / 4)
    assert verdicts == [None, None]
    _, verdicts = robust_average([small, torch.tensor([float("nan"), 0.0])], [1.0, 1.0], RULE)
    assert verdicts == [None, NON_FINITE]


def test_a_ban_by_one_averager_holds_in_the_others_of_the_peer(tmp_path) -> None:
    gradients = AveragingGuard("gradients", BanRule(ban_rounds=2), board=tmp_path)
    state = AveragingGuard("state", BanRule(ban_rounds=2), board=tmp_path)
    gradients.record({"poisoner": NON_FINITE}, ["poisoner"])
    assert "another part of this peer" in state.refuse("poisoner", "group")
    gradients.record({}, [])
    gradients.record({}, [])
    assert gradients.refuse("poisoner", "group") is None  # its ban ran out and its post is taken down
    assert state.refuse("poisoner", "group") is None


def test_distance_counts_against_a_sender_only_in_most_parts() -> None:
    found = {0: [FAR_OFF], 1: [FAR_OFF, FAR_OFF, FAR_OFF], 2: [CLIPPED, CLIPPED], 3: [NON_FINITE]}
    assert round_verdicts(found, 4) == {1: FAR_OFF, 3: NON_FINITE}  # one far part of four: a sparse gradient
    assert round_verdicts(found, 3) == {1: FAR_OFF, 2: CLIPPED, 3: NON_FINITE}
