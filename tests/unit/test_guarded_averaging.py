"""Guarded averagers on real DHTs in this process: a poisoned part is rejected, its sender banned, and refused."""

from __future__ import annotations

import threading
import uuid

import torch

from distributed_training.swarm.dht import DHTSettings, start_dht, visible_maddrs
from distributed_training.swarm.guard import AveragingGuard, BanRule
from distributed_training.swarm.hivemind_private import PseudoGradientAverager
from distributed_training.swarm.robust import RobustRule

SHAPES = [(40, 30), (30,)]


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


def test_a_nan_sender_is_left_out_of_the_average_then_banned_by_every_member(dht) -> None:
    nodes = [dht] + [start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=[visible_maddrs(dht)[-1]]))
                     for _ in range(2)]
    prefix = f"guard-{uuid.uuid4().hex[:8]}"
    generator = torch.Generator().manual_seed(5)
    honest = [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(2)]
    # one NaN, in the first part: only the member reducing that part sees it, and the verdict it sends
    # back with the average makes every member ban alike
    # (elsewhere it sends the honest weighted mean, so the expected average is that mean in every part)
    poisoned = [(h0 * 1.0 + h1 * 3.0) / 4.0 for h0, h1 in zip(*honest)]
    poisoned[0][0, 0] = float("nan")
    averagers = []
    try:
        for node in nodes:
            averagers.append(PseudoGradientAverager(
                [torch.zeros(shape) for shape in SHAPES], node, prefix=prefix, start=True, min_matchmaking_time=2.0,
                request_timeout=1.0, allreduce_timeout=20.0, part_size_bytes=1024, target_group_size=3,
                # the poisoner's finite values sit at the honest mean, so the lower-median distance is small;
                # a wider clip keeps the honest parts unclipped and the expected average exact
                guard=AveragingGuard("test", BanRule(ban_rounds=10)), robust_rule=RobustRule(clip_factor=4.0)))
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

        # the honest pair now refuses the poisoner, though it sends honest values: their group is the two of them
        for _attempt in range(3):  # again, a busy round may fail; none may ever hold the poisoner
            results = _round(averagers, [*honest, honest[0]], [1.0, 1.0, 1.0], timeouts=(20.0, 20.0, 8.0))
            for result in results[:2]:
                if isinstance(result, dict):
                    assert poisoner not in {p.to_base58() for p in result}, result
            if any(isinstance(r, dict) and len(r) == 2 for r in results[:2]):
                break
        assert any(isinstance(r, dict) and len(r) == 2 for r in results[:2]), results
        assert not (isinstance(results[2], dict) and len(results[2]) > 1), results[2]
    finally:
        for averager in averagers:
            averager.shutdown()
        for node in nodes[1:]:
            node.shutdown()


def test_a_reducer_that_frames_a_member_is_banned_by_it_and_never_gets_it_accused(dht, tmp_path) -> None:
    from distributed_training.localnet.cheats import install_framing
    from distributed_training.swarm.ban_records import read_board
    from distributed_training.swarm.guard import board_refuses

    nodes = [dht] + [start_dht(DHTSettings(port=0, host_ip="127.0.0.1", initial_peers=[visible_maddrs(dht)[-1]]))
                     for _ in range(2)]
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
            averagers.append(PseudoGradientAverager(
                [torch.zeros(shape) for shape in SHAPES], node, prefix=prefix, start=True, min_matchmaking_time=2.0,
                request_timeout=1.0, allreduce_timeout=20.0, part_size_bytes=1024, target_group_size=3,
                guard=AveragingGuard("test", BanRule(ban_rounds=5), board=board), robust_rule=RobustRule(clip_factor=4.0)))
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
        # the other honest member refuses the victim with the group (the mask is credible: one of two others),
        # but on another reducer's word: nothing it publishes accuses the victim
        assert board_refuses(boards[other], ids[victim])
        assert read_board(boards[other]) == {}
    finally:
        if undo is not None:
            undo()
        for averager in averagers:
            averager.shutdown()
        for node in nodes[1:]:
            node.shutdown()
