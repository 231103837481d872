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
    far = torch.tensor([5.0, 5.0])  # 4 * sqrt(2) from the center (1, 1), tau = 4, under 6 median norms (1)
    _, verdicts = robust_average([*honest, far], [4.0, 4.0, 4.0, 4.0], RULE)
    assert verdicts[3] == CLIPPED
    # the same part from 1 sample where the others had 16: its noise explains a distance 4x larger
    average, verdicts = robust_average([*honest, far], [16.0, 16.0, 16.0, 1.0], RULE)
    assert verdicts[3] is None
    assert (average - torch.tensor([1.0, 1.0])).norm() <= 1.0  # still clipped all the same


def test_of_three_senders_a_moderate_outlier_is_clipped_but_not_struck_a_far_one_is_banned() -> None:
    honest = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    moderate, far = torch.tensor([4.0, 4.0]), torch.tensor([900.0, 900.0])
    average, verdicts = robust_average([*honest, moderate], [4.0, 4.0, 4.0], RULE)
    assert verdicts == [None, None, None]  # three honest gradients are often this far apart
    assert (average - torch.tensor([1.0, 1.0])).norm() <= 2.0  # and it is still clipped
    _, verdicts = robust_average([*honest, far], [4.0, 4.0, 4.0], RULE)
    assert verdicts[2] == FAR_OFF


def test_a_part_counted_for_nothing_is_still_judged_so_a_framed_poisoner_is_caught() -> None:
    honest = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    poison = torch.tensor([-100.0, -100.0])
    for counted in (honest, honest[:1]):  # a majority to measure against, or a lone other member (norms only)
        average, verdicts = robust_average([*counted, poison], [1.0] * len(counted) + [0.0], RULE,
                                           ignored=[len(counted)])
        assert verdicts[-1] == FAR_OFF and verdicts[:-1] == [None] * len(counted)
        assert torch.allclose(average, robust_average(counted, [1.0] * len(counted), RULE)[0])  # no influence
        # an honest part counted for nothing is no offence, and a zero-weight tag-along is not judged at all
        _, verdicts = robust_average([*counted, torch.tensor([0.5, 1.0])], [1.0] * len(counted) + [0.0], RULE,
                                     ignored=[len(counted)])
        assert verdicts[-1] is None
        _, verdicts = robust_average([*counted, poison], [1.0] * len(counted) + [0.0], RULE)
        assert verdicts[-1] is None


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


def test_a_peer_the_board_refuses_counts_for_nothing_in_progress(tmp_path) -> None:
    from distributed_training.swarm.guard import post_ban, unbanned
    bound = {"honest": "binding-h", "poisoner": "binding-p", "forged": "binding-f", "p*": "binding-star"}
    lookup = unbanned(lambda peers: {peer: bound[peer] for peer in peers if peer in bound}, tmp_path)
    AveragingGuard("gradients", BanRule(ban_rounds=2), board=tmp_path).record({"poisoner": NON_FINITE}, ["poisoner"])
    post_ban(tmp_path, "state", "forged", "served a forged state", refuse=False)  # reported, not refused
    assert lookup(["honest", "poisoner", "forged", "p*", "stranger"]) == {
        "honest": "binding-h", "forged": "binding-f", "p*": "binding-star"}  # ids compare exactly, not as globs


def test_distance_counts_against_a_sender_only_in_most_parts() -> None:
    found = {0: [FAR_OFF], 1: [FAR_OFF, FAR_OFF, FAR_OFF], 2: [CLIPPED, CLIPPED], 3: [NON_FINITE]}
    assert round_verdicts(found, 4) == {1: FAR_OFF, 3: NON_FINITE}  # one far part of four: a sparse gradient
    assert round_verdicts(found, 3) == {1: FAR_OFF, 2: CLIPPED, 3: NON_FINITE}


def test_of_three_senders_a_random_part_ten_norms_long_is_banned_where_its_distance_is_not_16_spreads() -> None:
    honest = [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 2.0])]  # close, as DiLoCo pseudo-gradients are
    noise = torch.tensor([-15.0, 15.0])  # 9.5 honest norms in another direction
    # center (1, 2): distances sqrt(2), 0 and sqrt(16^2 + 13^2) = 20.6, only 14.6 median distances (sqrt 2)
    _, verdicts = robust_average([*honest, noise], [4.0, 4.0, 4.0], RULE)
    assert verdicts == [None, None, FAR_OFF]  # 20.6 > 6 median norms (sqrt 5 = 2.24): 13.4
    _, verdicts = robust_average([*honest, noise], [4.0, 4.0, 4.0], RobustRule(clip_factor=4.0, norm_ban_factor=10.0))
    assert verdicts == [None, None, None]  # 20.6 < 22.4: the norm rule is what bans it
    # an honest part three times as long as the others, in their direction, is no ban: center (2, 2),
    # its distance 4.24 is under 6 median norms
    _, verdicts = robust_average([*honest, torch.tensor([5.0, 5.0])], [4.0, 4.0, 4.0], RULE)
    assert verdicts == [None, None, None]
    # a pseudo-gradient of four times the others' samples is longer: (12, 12) is 14.1 from the center (2, 2),
    # 6.3 median norms, but 1.6 against its count (14.1 / 4): no ban
    _, verdicts = robust_average([*honest, torch.tensor([12.0, 12.0])], [4.0, 4.0, 16.0], RULE)
    assert verdicts == [None, None, None]
    _, verdicts = robust_average([*honest, torch.tensor([12.0, 12.0])], [4.0, 4.0, 4.0], RULE)
    assert verdicts == [None, None, FAR_OFF]  # the same length from as many samples as the others: banned
    with pytest.raises(ValueError, match="norm_ban_factor"):
        RobustRule(norm_ban_factor=2.0)


def test_a_reducers_average_is_held_to_its_length_and_to_its_sign_unless_the_member_may_be_left_out() -> None:
    from distributed_training.swarm.robust import stray_averages
    # (|own|^2, |average|^2, own . average) per reducer's span; honest spans differ in how far they point
    # the member's way (0.8 and 0.13 cosines were seen in one round), which is no offence
    spans = {"a": (1.0, 0.64, 0.64), "b": (1.0, 0.09, 0.039), "c": (4.0, 2.56, 2.56)}
    assert stray_averages(spans, 8.0) == {}
    reversed_ = {**spans, "liar": (1.0, 0.64, -0.64)}
    assert list(stray_averages(reversed_, 8.0)) == ["liar"]
    assert "cosine -0.8 against its 0.8" in stray_averages(reversed_, 8.0)["liar"]
    longer = {**spans, "liar": (1.0, 100.0 ** 2 * 0.64, 100.0 * 0.64)}  # x100, same direction
    assert "length x100 the median" in stray_averages(longer, 8.0)["liar"]
    # a member that may be banned (reducers that took a reducer's word leave its parts out): length only
    assert stray_averages(reversed_, 8.0, directional=False) == {}
    assert list(stray_averages(longer, 8.0, directional=False)) == ["liar"]
    assert stray_averages({"a": (0.0, 1.0, 0.0), "b": (1.0, float("nan"), 0.0)}, 8.0) == {}  # nothing to judge by


def test_a_member_a_reducer_named_holds_no_average_to_its_direction_while_a_ban_of_it_may_last() -> None:
    guard = AveragingGuard("gradients", BanRule(ban_rounds=2))
    assert not guard.named_recently()
    guard.note_named(False)
    assert not guard.named_recently()
    guard.note_named(True)  # others that took the word ban it for 2 rounds (their count may be one behind)
    for _ in range(3):
        assert guard.named_recently()
        guard.record({}, [])
    assert not guard.named_recently()
    guard.note_named(True)  # named again: a repeat offence, which others ban twice as long
    for _ in range(5):
        assert guard.named_recently()
        guard.record({}, [])
    assert not guard.named_recently()


def test_board_entries_name_the_peer_after_the_last_dash_and_their_kind_by_suffix() -> None:
    from distributed_training.swarm.guard import board_entry
    # DiLoCo's averager is named with a dash: its bans were once read as bans of "gradients-<peer>"
    assert board_entry("pseudo-gradients-12D3KooWAbc") == ("pseudo-gradients", "12D3KooWAbc", "refused")
    assert board_entry("gradients-12D3KooWAbc.heard") == ("gradients", "12D3KooWAbc", "heard")
    assert board_entry("state-12D3KooWAbc.report") == ("state", "12D3KooWAbc", "report")


def test_a_ban_on_another_reducers_word_is_refused_here_but_never_published(tmp_path) -> None:
    from distributed_training.swarm.ban_records import read_board
    from distributed_training.swarm.guard import board_ignores, board_refuses
    guard = AveragingGuard("gradients", BanRule(ban_rounds=2), board=tmp_path)
    members = ["me", "seen", "heard", "reducer"]
    guard.record({"seen": NON_FINITE, "heard": NON_FINITE, "me": NON_FINITE}, members,
                 own={"seen": NON_FINITE}, me="me")
    assert guard.refuse("seen", "matchmaking") and guard.ignore("seen")
    # another reducer's word only makes this peer count the accused's parts for nothing: it refuses nothing,
    # so a liar cannot split the swarm (and a group is never failed for a ban)
    assert guard.refuse("heard", "matchmaking") is None and guard.ignore("heard")
    assert guard.refuse("heard", "leader")  # but it is not followed as a leader
    assert guard.refuse("me", "group") is None  # another reducer's word never bans this peer from itself
    assert not board_refuses(tmp_path, "heard") and board_ignores(tmp_path, "heard")
    assert board_refuses(tmp_path, "seen") and not board_ignores(tmp_path, "me")
    assert set(read_board(tmp_path)) == {"seen"}  # validators hear only what this peer saw
    assert "another reducer's finding" in (tmp_path / "gradients-heard.heard").read_text()
    guard.record({}, [])
    guard.record({}, [])
    assert guard.ignore("heard") is None and guard.refuse("seen", "group") is None
    assert not list(tmp_path.glob("gradients-*"))  # both posts taken down
    for _ in range(3):  # hearsay never escalates: each ban on another's word lasts the base length
        guard.record({"heard": NON_FINITE}, ["heard"], own={})
        assert guard.banned_until["heard"] == guard.rounds + 2


def test_a_reducer_that_calls_finite_parts_non_finite_is_banned_and_its_word_dropped(tmp_path) -> None:
    from distributed_training.swarm.ban_records import read_board
    guard = AveragingGuard("gradients", BanRule(ban_rounds=2), board=tmp_path)
    guard.record({"me": NON_FINITE}, ["me", "framer", "other"], own={},
                 caught={"framer": "called this peer's finite parts non-finite"}, me="me")
    assert guard.refuse("framer", "group") == "banned for 2 more round(s)"
    assert read_board(tmp_path) == {"framer": "gradients: called this peer's finite parts non-finite"}
    assert guard.refuse("other", "group") is None


def test_one_reducer_may_name_at_most_a_minority_of_the_others() -> None:
    from distributed_training.swarm.robust import credible_mask
    assert credible_mask({1: NON_FINITE}, reducer=0, num_senders=3)  # one of two others: a poisoner among three
    assert not credible_mask({1: NON_FINITE, 2: NON_FINITE}, reducer=0, num_senders=3)
    assert credible_mask({0: NON_FINITE, 1: NON_FINITE}, reducer=0, num_senders=3)  # its word on itself is free
    assert credible_mask({1: CLIPPED, 2: FAR_OFF}, reducer=0, num_senders=5)
    assert not credible_mask({1: CLIPPED, 2: FAR_OFF, 3: CLIPPED}, reducer=0, num_senders=5)
    assert credible_mask({1: NON_FINITE}, reducer=0, num_senders=2)  # a pair: the other is its only peer


def test_a_reducer_counts_the_parts_of_the_senders_it_bans_for_nothing() -> None:
    import asyncio

    from distributed_training.swarm.hivemind_private.allreduce import RobustPartReducer

    async def reduce(ignored: set[int]) -> list[torch.Tensor]:
        reducer = RobustPartReducer([torch.Size([3])], 3, RobustRule(clip_factor=4.0))
        reducer.ignored = ignored
        parts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 2.0, 2.0])]
        return await asyncio.gather(*(reducer.accumulate_part(i, 0, part, weight=1.0) for i, part in enumerate(parts)))

    assert all(torch.allclose(out, torch.tensor([2.0, 2.0, 2.0])) for out in asyncio.run(reduce(set())))
    # sender 1 banned here: the mean of the other two (with two usable senders, the plain weighted mean),
    # the same bytes for every sender, the banned one included
    assert all(torch.allclose(out, torch.tensor([1.5, 2.0, 2.5])) for out in asyncio.run(reduce({1})))


def test_a_ban_by_an_averager_whose_name_holds_a_dash_names_the_peer(tmp_path) -> None:
    from distributed_training.swarm.ban_records import read_board
    from distributed_training.swarm.guard import board_refuses
    AveragingGuard("pseudo-gradients", BanRule(), board=tmp_path).record({"12D3KooWpeer": NON_FINITE}, ["12D3KooWpeer"])
    assert board_refuses(tmp_path, "12D3KooWpeer")  # DiLoCo's averager: its bans were read as "gradients-<peer>"
    assert read_board(tmp_path) == {"12D3KooWpeer": "pseudo-gradients: sent non-finite values"}
