"""Guarded averagers on real DHTs in this process: a poisoned part is rejected, its sender banned, and refused."""

from __future__ import annotations

import re
import threading
import uuid

import pytest
import torch

from distributed_training.swarm.dht import DHTSettings, start_dht, visible_maddrs
from distributed_training.swarm.guard import AveragingGuard, BanRule
from distributed_training.swarm.hivemind_private import PseudoGradientAverager
from distributed_training.swarm.robust import RobustRule

SHAPES = [(40, 30), (30,)]


def _three_nodes(dht) -> list:
    return [dht] + [start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=[visible_maddrs(dht)[-1]]))
                    for _ in range(2)]


def _averager(node, prefix: str, **kwargs) -> PseudoGradientAverager:
    """One member of the tests' three-peer all-reduces (small parts, so that each reducer has a few)."""
    return PseudoGradientAverager([torch.zeros(shape) for shape in SHAPES], node, prefix=prefix, start=True,
                                  min_matchmaking_time=2.0, request_timeout=1.0, allreduce_timeout=20.0,
                                  part_size_bytes=1024, target_group_size=3, **kwargs)


def _shut_down(averagers, nodes) -> None:
    for averager in averagers:
        averager.shutdown()
    for node in nodes[1:]:
        node.shutdown()


def _round(averagers, inputs, weights, timeouts=(20.0, 20.0, 20.0)) -> list:
    for averager, tensors in zip(averagers, inputs):
        with averager.get_tensors() as buffers:
            for buffer, tensor in zip(buffers, tensors):
                buffer.copy_(tensor)
    results: list = [None] * len(averagers)

    def run(i: int) -> None:
        try:
            results[i] = averagers[i].step(weight=weights[i], timeout=timeouts[i])
        except Exception as exc:  # a failed round is a result too
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(averagers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_a_nan_sender_is_left_out_of_the_average_then_banned_by_every_member(dht, tmp_path) -> None:
    from distributed_training.swarm.ban_records import read_board
    from distributed_training.swarm.guard import board_ignores, board_refuses

    nodes = _three_nodes(dht)
    prefix = f"guard-{uuid.uuid4().hex[:8]}"
    generator = torch.Generator().manual_seed(5)
    honest = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(2)]
    # one NaN, in the first part: only the member reducing that part sees it, and the verdict it sends
    # back with the average makes every member ban alike
    # (elsewhere it sends the honest weighted mean, so the expected average is that mean in every part)
    poisoned = [(h0 * 1.0 + h1 * 3.0) / 4.0 for h0, h1 in zip(*honest)]
    poisoned[0][0, 0] = float("nan")
    averagers, boards = [], [tmp_path / f"board{i}" for i in range(3)]
    try:
        for node, board in zip(nodes, boards):
            board.mkdir()
            averagers.append(_averager(node, prefix, robust_rule=RobustRule(clip_factor=4.0),
                # the poisoner's finite values sit at the honest mean, so the lower-median distance is small;
                # a wider clip keeps the honest parts unclipped and the expected average exact
                guard=AveragingGuard("test", BanRule(ban_rounds=10), board=board)))
        poisoner = nodes[2].peer_id.to_base58()

        for _attempt in range(3):  # on two busy cores a round can miss a member; the three must meet once
            results = _round(averagers, [*honest, poisoned], [1.0, 3.0, 1.0])
            if all(isinstance(r, dict) and len(r) == 3 for r in results[:2]):
                break
        assert all(isinstance(r, dict) and len(r) == 3 for r in results[:2]), results
        with averagers[0].get_tensors() as first, averagers[1].get_tensors() as second:
            for index, (a, b) in enumerate(zip(first, second)):
                assert torch.equal(a, b)
                expected = (honest[0][index] * 1.0 + honest[1][index] * 3.0) / 4.0
                assert torch.allclose(a, expected, atol=1e-5), (a - expected).abs().max()

        # the member whose reducer saw the NaN (both, when the poisoner's own reducer owned up to it) refuses
        # the poisoner outright and says so to validators; another member took its word: it counts the
        # poisoner's parts for nothing but accuses it of nothing
        witnesses = [i for i in range(2) if board_refuses(boards[i], poisoner)]
        assert witnesses, [sorted(p.name for p in board.iterdir()) for board in boards]
        for index in range(2):
            if index in witnesses:
                assert read_board(boards[index]) == {poisoner: "test: sent non-finite values"}
            else:
                assert board_ignores(boards[index], poisoner) and read_board(boards[index]) == {}
    finally:
        _shut_down(averagers, nodes)


def test_a_reducer_that_frames_a_member_is_banned_by_it_and_never_gets_it_accused(dht, tmp_path) -> None:
    from distributed_training.localnet.cheats import install_framing
    from distributed_training.swarm.ban_records import read_board
    from distributed_training.swarm.guard import board_ignores, board_refuses

    nodes = _three_nodes(dht)
    prefix = f"framing-{uuid.uuid4().hex[:8]}"
    generator = torch.Generator().manual_seed(7)
    honest = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(3)]
    boards = [tmp_path / f"board{i}" for i in range(3)]
    averagers = []
    undo = None
    try:
        for index, (node, board) in enumerate(zip(nodes, boards)):
            board.mkdir()
            if index == 2:  # the framer: the same averager, started with the framing all-reduce (localnet.cheats)
                undo = install_framing()
            averagers.append(_averager(node, prefix, robust_rule=RobustRule(clip_factor=4.0),
                guard=AveragingGuard("test", BanRule(ban_rounds=5), board=board)))
        undo()
        ids = [node.peer_id.to_base58() for node in nodes]
        for _attempt in range(3):  # on two busy cores a round can miss a member; the three must meet once
            results = _round(averagers, honest, [1.0, 1.0, 1.0])
            if all(isinstance(r, dict) and len(r) == 3 for r in results[:2]):
                break
        assert all(isinstance(r, dict) and len(r) == 3 for r in results[:2]), results
        # the framer named one honest member non-finite (the first in the group's order): that victim knows
        # it sent finite values, so it bans the framer as its own finding, published to validators
        victims = [i for i in range(2) if ids[2] in read_board(boards[i])]
        assert len(victims) == 1, [read_board(board) for board in boards]
        victim, other = victims[0], 1 - victims[0]
        assert read_board(boards[victim]) == {ids[2]: "test: called this peer's finite parts non-finite"}
        assert not board_refuses(boards[victim], ids[other]) and not board_refuses(boards[victim], ids[victim])
        # the other honest member took the framer's word (the mask is credible: one of two others), but on
        # another reducer's word it only counts the victim's parts for nothing: it still groups with it
        # (a liar cannot split the swarm), and nothing it publishes accuses the victim
        assert board_ignores(boards[other], ids[victim]) and not board_refuses(boards[other], ids[victim])
        assert read_board(boards[other]) == {}
    finally:
        if undo is not None:
            undo()
        _shut_down(averagers, nodes)


@pytest.mark.parametrize("scale", [-100.0, -1.0])  # far too long; as long, but reversed
def test_a_reducer_that_scales_its_average_is_refused_and_banned_by_every_member(dht, tmp_path, scale) -> None:
    from distributed_training.localnet.cheats import install_average_poison
    from distributed_training.swarm.ban_records import read_board

    nodes = _three_nodes(dht)
    prefix = f"stray-{uuid.uuid4().hex[:8]}"
    generator = torch.Generator().manual_seed(9)
    honest = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(3)]
    boards = [tmp_path / f"board{i}" for i in range(3)]
    averagers, undo = [], None
    try:
        for index, (node, board) in enumerate(zip(nodes, boards)):
            board.mkdir()
            if index == 2:  # it sends honest parts; as the reducer of its span it returns the average x -100
                undo = install_average_poison(scale=scale)
            averagers.append(_averager(node, prefix, robust_rule=RobustRule(clip_factor=4.0),
                guard=AveragingGuard("test", BanRule(ban_rounds=5), board=board)))
        undo()
        poisoner = nodes[2].peer_id.to_base58()
        for _attempt in range(3):  # on two busy cores a round can miss a member; the three must meet once
            results = _round(averagers, honest, [1.0, 1.0, 1.0])
            if all(poisoner in read_board(board) for board in boards[:2]):
                break
        for index in range(2):  # each honest member refused the poisoned result and banned its reducer ...
            assert set(read_board(boards[index])) == {poisoner}
            # the figures behind it, for an operator and the validator: x100 the median length (or reversed)
            assert re.match(r"test: returned an average far out of bound of the parts it averaged \(length x\S+ the "
                            r"median reducer's, cosine -?\S+ against its \S+, 3 spans\)", read_board(boards[index])[poisoner])
            # ... and hivemind's retry within the step then averaged the honest pair alone
            assert isinstance(results[index], dict) and poisoner not in {p.to_base58() for p in results[index]}, results
            with averagers[index].get_tensors() as tensors:
                for tensor, first, second in zip(tensors, honest[0], honest[1]):
                    assert torch.allclose(tensor, (first + second) / 2, atol=1e-6)
    finally:
        if undo is not None:
            undo()
        _shut_down(averagers, nodes)
