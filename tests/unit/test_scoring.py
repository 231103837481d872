"""Judging a miner's answer (1.0 / 0.3 / 0.1) and the persisted score book."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed_training.validation import scoring
from distributed_training.validation.scoring import ScoreBook, ScoreBookError, UidScore
from distributed_training.validation.verify import (
    SCORE_ACCEPTABLE, SCORE_NO_RESPONSE, SCORE_UNACCEPTABLE, Tolerance, behind_the_swarm, judge, losses_agree,
    no_response,
)

TOL = Tolerance(rel=0.02, max_epoch_lag=1)
LOSSES = [3.2, 4.1]


def _judge(**overrides):
    kwargs = dict(claimed_epoch=5, swarm_epoch=5, sampled_reported=LOSSES, recomputed_by_epoch={5: LOSSES},
                  contributed=True, tolerance=TOL)
    kwargs.update(overrides)
    return judge(**kwargs)


# --- a validator behind the swarm scores nobody --------------------------------------------------
def test_a_validator_without_a_recent_model_judges_no_answer() -> None:
    # the local swarm once had a validator stuck at epoch 5 (forked epochs loaded nothing) while honest
    # miners answered at epoch 12: it scored them 0.3 for its own failure
    assert behind_the_swarm([4, 5], 12, TOL) == "this validator holds the model of epoch 5, the swarm is at epoch 12"
    assert behind_the_swarm([], 3, TOL) == "this validator holds no model, the swarm is at epoch 3"
    assert behind_the_swarm([10, 11], 12, TOL) is None  # one epoch behind is within max_epoch_lag
    assert behind_the_swarm([12], 12, TOL) is None and behind_the_swarm([0], 0, TOL) is None


# --- judge --------------------------------------------------------------------------------------
def test_exact_match_is_acceptable() -> None:
    verdict = _judge()
    assert verdict.score == SCORE_ACCEPTABLE == 1.0
    assert verdict.responded and "verified at epoch 5" in verdict.reason


def test_within_tolerance_is_acceptable_and_just_outside_is_not() -> None:
    inside = [loss * 1.019 for loss in LOSSES]
    outside = [LOSSES[0], LOSSES[1] * 1.021]
    assert _judge(sampled_reported=inside).score == 1.0
    verdict = _judge(sampled_reported=outside)
    assert verdict.score == SCORE_UNACCEPTABLE == 0.3
    assert "loss mismatch" in verdict.reason


def test_a_miner_the_swarm_bans_is_unacceptable_however_well_it_answers() -> None:
    verdict = _judge(banned="banned by 2 bound peers (gradients: sent non-finite values)")
    assert verdict.score == SCORE_UNACCEPTABLE and "banned by 2 bound peers" in verdict.reason
    assert _judge(banned=None).score == SCORE_ACCEPTABLE


def test_reported_loss_off_by_more_than_tolerance() -> None:
    verdict = _judge(sampled_reported=[loss * 0.7 for loss in LOSSES])  # a liar's 30 % discount
    assert verdict.score == 0.3 and "loss mismatch" in verdict.reason


def test_non_finite_reported_loss_is_a_mismatch() -> None:
    assert _judge(sampled_reported=[float("nan"), LOSSES[1]]).score == 0.3
    assert _judge(sampled_reported=[float("inf"), LOSSES[1]]).score == 0.3
    assert not losses_agree(1.0, float("nan"), TOL)


def test_wrong_number_of_losses_is_a_mismatch() -> None:
    assert _judge(sampled_reported=LOSSES[:1]).score == 0.3


def test_stale_epoch_is_unacceptable() -> None:
    verdict = _judge(claimed_epoch=2, swarm_epoch=5, recomputed_by_epoch={2: LOSSES, 5: [9.0, 9.0]})
    assert verdict.score == 0.3 and "stale" in verdict.reason
    # one epoch behind is within max_epoch_lag
    assert _judge(claimed_epoch=4, swarm_epoch=5, recomputed_by_epoch={4: LOSSES}).score == 1.0


def test_claiming_an_epoch_ahead_of_the_swarm_is_unacceptable() -> None:
    verdict = _judge(claimed_epoch=7, swarm_epoch=5)
    assert verdict.score == 0.3 and "ahead" in verdict.reason


def test_matching_only_a_too_old_snapshot_is_unacceptable() -> None:
    current = [loss + 0.5 for loss in LOSSES]
    verdict = _judge(recomputed_by_epoch={5: current, 3: LOSSES})
    assert verdict.score == 0.3 and "match epoch 3" in verdict.reason
    # the same losses matching a snapshot one epoch old are accepted
    assert _judge(recomputed_by_epoch={5: current, 4: LOSSES}).score == 1.0


def test_newest_matching_snapshot_is_preferred() -> None:
    verdict = _judge(recomputed_by_epoch={3: LOSSES, 5: LOSSES})
    assert verdict.score == 1.0 and "epoch 5" in verdict.reason


def test_not_contributed_is_unacceptable() -> None:
    verdict = _judge(contributed=False)
    assert verdict.score == 0.3 and "contributed" in verdict.reason


def test_nothing_to_verify_against_is_unacceptable() -> None:
    assert _judge(recomputed_by_epoch={}).score == 0.3


def test_no_response() -> None:
    verdict = no_response("timed out")
    assert verdict.score == SCORE_NO_RESPONSE == 0.1
    assert not verdict.responded and verdict.reason == "timed out"


# --- ScoreBook ----------------------------------------------------------------------------------
def test_moving_average_math() -> None:
    book = ScoreBook(alpha=0.3)
    entry = book.record(1, "hk1", 1.0, "ok", responded=True)
    assert entry.moving_average == pytest.approx(0.3)
    entry = book.record(1, "hk1", 0.1, "silent", responded=False)
    assert entry.moving_average == pytest.approx(0.7 * 0.3 + 0.3 * 0.1)
    entry = book.record(1, "hk1", 0.3, "mismatch", responded=True)
    assert entry.moving_average == pytest.approx(0.7 * (0.7 * 0.3 + 0.3 * 0.1) + 0.3 * 0.3)
    assert (entry.queried, entry.answered, entry.last_score, entry.last_reason) == (3, 2, 0.3, "mismatch")


@pytest.mark.parametrize("score", [-0.1, 1.1, float("nan")])
def test_out_of_range_score_is_rejected(score: float) -> None:
    book = ScoreBook(alpha=0.5)
    with pytest.raises(ValueError):
        book.record(0, "hk", score, "bad", responded=True)
    assert book.entries == {}


def test_never_queried_uid_has_no_weight() -> None:
    book = ScoreBook(alpha=0.5)
    assert book.weights() == {}
    book.record(2, "hk2", 1.0, "ok", responded=True)
    weights = book.weights()
    assert weights == {2: 1.0}
    assert 0 not in weights and 1 not in weights


def test_all_zero_scores_give_no_weights() -> None:
    book = ScoreBook(alpha=0.5)
    book.record(1, "hk1", 0.0, "nothing", responded=False)
    assert book.weights() == {}


def test_hotkey_change_resets_the_uid() -> None:
    book = ScoreBook(alpha=0.5)
    for _ in range(5):
        book.record(1, "old-owner", 1.0, "ok", responded=True)
    assert book.entries[1].moving_average > 0.9
    entry = book.record(1, "new-owner", 0.1, "silent", responded=False)
    assert entry.hotkey == "new-owner"
    assert entry.moving_average == pytest.approx(0.5 * 0.1)
    assert (entry.queried, entry.answered) == (1, 0)


def test_forget_missing_drops_departed_and_changed_uids() -> None:
    book = ScoreBook(alpha=0.5)
    book.record(1, "hk1", 1.0, "ok", responded=True)
    book.record(2, "hk2", 1.0, "ok", responded=True)
    book.record(3, "hk3", 1.0, "ok", responded=True)
    book.forget_missing({1: "hk1", 2: "someone-else"})
    assert set(book.entries) == {1}


def test_weights_are_l1_normalised() -> None:
    book = ScoreBook(alpha=0.2)
    book.record(1, "hk1", 1.0, "ok", responded=True)
    book.record(4, "hk4", 0.3, "mismatch", responded=True)
    book.record(7, "hk7", 0.1, "silent", responded=False)
    weights = book.weights()
    assert list(weights) == [1, 4, 7]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights[1] / weights[4] == pytest.approx(1.0 / 0.3)
    assert weights[4] / weights[7] == pytest.approx(3.0)


def _book() -> ScoreBook:
    book = ScoreBook(alpha=0.25, rounds=12, last_weights_block=345)
    book.record(1, "hk1", 1.0, "verified at epoch 3", responded=True)
    book.record(1, "hk1", 0.3, "loss mismatch", responded=True)
    book.record(9, "hk9", 0.1, "timed out", responded=False)
    return book


def test_save_load_round_trip(tmp_path: Path) -> None:
    book = _book()
    path = tmp_path / "state" / "scores.json"
    book.save(path)
    loaded = ScoreBook.load(path, alpha=0.25)
    assert loaded == book
    assert loaded.weights() == book.weights()
    assert all(isinstance(uid, int) for uid in loaded.entries)
    assert sorted(p.name for p in path.parent.iterdir()) == ["scores.json"]


def test_load_missing_file_is_an_empty_book(tmp_path: Path) -> None:
    book = ScoreBook.load(tmp_path / "none.json", alpha=0.1)
    assert book.entries == {} and book.rounds == 0 and book.alpha == 0.1
    assert not (tmp_path / "none.json").exists()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'{"format": 99, "entries": {}}', id="wrong-format"),
        pytest.param(b'{"format": 1}', id="no-entries"),
        pytest.param(b'{"format": 1, "entries": {"x": {"hotkey": "h"}}}', id="bad-uid"),
        pytest.param(b'{"format": 1, "entries": {"1": {"hotkey": "h", "bogus": 1}}}', id="bad-entry"),
        pytest.param(b"\xff\xfe\x00garbage", id="not-utf8"),
    ],
)
def test_corrupt_scores_file_raises_and_is_not_overwritten(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "scores.json"
    path.write_bytes(content)
    with pytest.raises(ScoreBookError, match="move it aside"):
        ScoreBook.load(path, alpha=0.1)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_scores_file_with_json_that_is_not_an_object_raises_score_book_error(tmp_path: Path) -> None:
    path = tmp_path / "scores.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ScoreBookError):
        ScoreBook.load(path, alpha=0.1)


@pytest.mark.parametrize("moving_average", ['"0.5"', "NaN", "7.0"])
def test_scores_file_with_badly_typed_entry_raises_score_book_error(tmp_path: Path, moving_average: str) -> None:
    path = tmp_path / "scores.json"
    path.write_text('{"format": 1, "entries": {"1": {"hotkey": "h", "moving_average": %s}}}' % moving_average)
    with pytest.raises(ScoreBookError):
        ScoreBook.load(path, alpha=0.1)


def test_save_is_atomic_when_serialisation_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "scores.json"
    _book().save(path)
    before = path.read_bytes()

    def broken_dumps(*args, **kwargs):
        raise TypeError("not serialisable")

    monkeypatch.setattr(scoring.json, "dumps", broken_dumps)
    book = _book()
    book.record(5, "hk5", 1.0, "ok", responded=True)
    with pytest.raises(TypeError):
        book.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]
    assert ScoreBook.load(path, alpha=0.25) == _book()


def test_save_is_atomic_when_the_write_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "scores.json"
    _book().save(path)
    before = path.read_bytes()

    def failing_replace(src, dst):
        assert json.loads(Path(src).read_text())["entries"]["5"]["hotkey"] == "hk5"  # new content went to a temp file
        raise OSError("no space left on device")

    from distributed_training import files

    monkeypatch.setattr(files.os, "replace", failing_replace)
    book = _book()
    book.record(5, "hk5", 1.0, "ok", responded=True)
    with pytest.raises(OSError, match="no space"):
        book.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_uid_score_defaults() -> None:
    entry = UidScore(hotkey="h")
    assert (entry.moving_average, entry.last_score, entry.queried, entry.answered) == (0.0, None, 0, 0)
