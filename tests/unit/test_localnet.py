"""Fast checks of dt-local-swarm's pieces that need no neuron: flags, uid layout, summary, plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from distributed_training.localnet import cli as localnet, summary as localnet_summary
from distributed_training.localnet.summary import Member


@pytest.mark.parametrize("argv, flag", [
    (["--miners", "-1"], "--miners"),
    (["--miners", "0"], "--miners"),
    (["--liars", "two"], "--liars"),
    (["--rounds", "0"], "--rounds"),
    (["--duration", "-5"], "--duration"),
    (["--duration", "nan"], "--duration"),
    (["--round-interval", "x"], "--round-interval"),
    (["--netuid", "70000"], "--netuid"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flags_exit_2_with_one_line(argv, flag, capsys):
    assert localnet.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dt-local-swarm: error:") and flag in err, err


def test_defaults_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = localnet.parse_args([])
    assert (args.miners, args.rounds, args.duration, args.round_interval, args.netuid) == (3, 6, 0.0, 5.0, 1)
    assert args.work_dir == tmp_path / ".localnet" and args.plot == tmp_path / ".localnet" / "loss.png"
    assert args.summary_json is None and not args.keep


def test_refuses_to_wipe_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert localnet.main(["--work-dir", str(tmp_path)]) == 2
    assert (tmp_path / "precious.txt").exists()
    assert "not made by dt-local-swarm" in capsys.readouterr().err


def test_wipes_its_own_directory_unless_keep(tmp_path):
    work = tmp_path / "ln"
    localnet.prepare_work_dir(work, keep=False)
    (work / "old.log").write_text("x")
    localnet.prepare_work_dir(work, keep=True)
    assert (work / "old.log").exists()
    localnet.prepare_work_dir(work, keep=False)
    assert not (work / "old.log").exists() and (work / localnet.MARKER).exists()


def test_layout_orders_validator_honest_then_adversaries():
    layout = localnet.plan_layout(2, dead=1, liars=1, copycats=1, lazy=1, stale=1)
    assert [(m.uid, m.name, m.behaviour) for m in layout] == [
        (0, "validator", "validator"), (1, "miner0", "honest"), (2, "miner1", "honest"), (3, "miner2", "dead"),
        (4, "miner3", "liar"), (5, "miner4", "copycat"), (6, "miner5", "lazy"), (7, "miner6", "stale")]


def _args(tmp_path: Path, *extra: str):
    return localnet.parse_args(["--work-dir", str(tmp_path), "--copycats", "1", "--dead", "1", *extra])


def test_neuron_command_lines(tmp_path):
    args = _args(tmp_path, "--rounds", "4", "--round-interval", "2")
    layout = localnet.plan_layout(args.miners, args.dead, args.liars, args.copycats, args.lazy, args.stale)
    validator = localnet.neuron_args(layout[0], args, "localnet-x", ["/ip4/1"], layout, prior_rounds=3)
    flags = dict(zip(validator[::2], validator[1::2]))
    assert flags["--neuron.sample_size"] == "5" and flags["--neuron.max_rounds"] == "7"
    assert flags["--neuron.round_interval"] == "2.0" and flags["--wallet.hotkey"] == "validator"
    assert flags["--chain.db"] == str(tmp_path / "chain.sqlite") and flags["--subtensor.network"] == "embedded"
    copycat = next(m for m in layout if m.behaviour == "copycat")
    flags = dict(zip(*[iter(localnet.neuron_args(copycat, args, "r", ["/ip4/1"], layout, 0))] * 2))
    assert flags["--cheat"] == "copycat" and flags["--cheat.copy_uid"] == "1"
    assert localnet.neuron_entry(copycat) == "distributed_training.localnet.cheats"
    assert localnet.neuron_entry(layout[1]) == "miner.py" and localnet.neuron_entry(layout[0]) == "validator.py"
    dead = next(m for m in layout if m.behaviour == "dead")
    command = localnet.neuron_args(dead, args, "r", ["/ip4/1"], layout, 0)
    last_port = [command[i + 1] for i, a in enumerate(command) if a == "--axon.port"][-1]
    assert int(last_port) > 0  # a dead miner must still publish a port the chain accepts


def test_poisoners_run_the_cheat_module_with_their_poison(tmp_path):
    args = _args(tmp_path, "--poisoners", "1", "--poison", "noise")
    layout = localnet.plan_layout(args.miners, poisoners=args.poisoners)
    poisoner = layout[-1]
    assert poisoner.behaviour == "poisoner" and localnet.neuron_entry(poisoner) == "distributed_training.localnet.cheats"
    flags = dict(zip(*[iter(localnet.neuron_args(poisoner, args, "r", ["/ip4/1"], layout, 0))] * 2))
    assert flags["--cheat"] == "poisoner" and flags["--cheat.poison"] == "noise"
    with pytest.raises(localnet.UsageError):
        localnet.parse_args(["--work-dir", str(tmp_path), "--poison", "acid"])


def test_intruders_are_not_registered_and_not_counted_in_the_sample(tmp_path):
    args = _args(tmp_path, "--intruders", "1")
    planned = localnet.plan_layout(args.miners, args.dead, intruders=args.intruders)
    layout, hotkeys = localnet.register_all(tmp_path, 1, planned)
    intruder = layout[-1]
    assert intruder.behaviour == "intruder" and intruder.uid == -1 and intruder.name not in hotkeys
    assert not (tmp_path / "wallets" / localnet.COLDKEY / "hotkeys" / intruder.name).exists()
    flags = dict(zip(*[iter(localnet.neuron_args(layout[0], args, "r", ["/ip4/1"], layout, 0))] * 2))
    assert flags["--neuron.sample_size"] == str(len(layout) - 2)
    command = localnet.neuron_args(intruder, args, "r", ["/ip4/1"], layout, 0)
    assert command[command.index("--cheat") + 1] == "intruder" and "--neuron.uid" in command


def _write_metrics(path: Path, events: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "metrics.jsonl", "w") as handle:
        for event in events:
            handle.write(json.dumps(event) + "\n")
        handle.write('{"event": "round", "ti')  # a torn last line is ignored


def _synthetic_run(tmp_path: Path, since: float) -> tuple[list[Member], dict[str, str], Path]:
    layout = localnet.plan_layout(1, dead=1, liars=1)
    hotkeys = {m.name: f"5{m.name.upper():<10}xyz" for m in layout}
    validator_dir = tmp_path / "state" / "validator"
    book = {"format": 1, "alpha": 0.3, "rounds": 2, "last_weights_block": 12, "entries": {
        "1": {"hotkey": hotkeys["miner0"], "moving_average": 0.51, "last_score": 1.0, "answered": 2, "queried": 2,
              "last_reason": "ok"},
        "2": {"hotkey": hotkeys["miner1"], "moving_average": 0.051, "last_score": 0.1, "answered": 0, "queried": 2,
              "last_reason": "no answer"},
        "3": {"hotkey": "5SOMEONE-ELSE", "moving_average": 0.9, "last_score": 1.0, "answered": 2, "queried": 2,
              "last_reason": "ok"}}}
    validator_dir.mkdir(parents=True)
    (validator_dir / "scores.json").write_text(json.dumps(book))
    _write_metrics(validator_dir, [
        {"event": "round", "time": since - 100, "round": 0, "query_s": 99.0, "verify_s": 99.0},  # earlier run
        {"event": "round", "time": since + 10, "round": 1, "query_s": 2.0, "verify_s": 1.0},
        {"event": "round", "time": since + 22, "round": 2, "query_s": 4.0, "verify_s": 1.0},
        {"event": "weights", "time": since + 22, "block": 12, "weights": {"1": 0.9, "2": 0.1}}])
    return layout, hotkeys, validator_dir


def test_summary_prefers_chain_weights_and_drops_changed_hotkeys(tmp_path):
    since = time.time()
    layout, hotkeys, validator_dir = _synthetic_run(tmp_path, since)
    summary = localnet_summary.build_summary(layout, hotkeys, validator_dir, {1: 0.75, 2: 0.25}, since)
    by_uid = {m["uid"]: m for m in summary["miners"]}
    assert sorted(by_uid) == [1, 2, 3]
    assert by_uid[1] == {"uid": 1, "hotkey": hotkeys["miner0"], "behaviour": "honest", "answered": 2,
                         "last_score": 1.0, "moving_average": 0.51, "weight": 0.75}
    assert by_uid[2]["behaviour"] == "dead" and by_uid[2]["last_score"] == 0.1 and by_uid[2]["weight"] == 0.25
    assert by_uid[3]["last_score"] is None and by_uid[3]["answered"] == 0  # the book's uid 3 is someone else
    assert summary["rounds"] == 2 and summary["weights_source"] == "chain"
    assert summary["round_seconds"] == pytest.approx(4.0) and summary["round_wall_seconds"] == pytest.approx(12.0)
    json.dumps(summary)  # what --summary-json writes
    table = localnet_summary.format_table(summary)
    assert len(table.splitlines()) == 5 and "liar" in table and "4.0 s/round" in table


def test_summary_falls_back_to_logged_weights_then_to_none(tmp_path):
    since = time.time()
    layout, hotkeys, validator_dir = _synthetic_run(tmp_path, since)
    summary = localnet_summary.build_summary(layout, hotkeys, validator_dir, None, since)
    assert summary["weights_source"] == "metrics" and [m["weight"] for m in summary["miners"]] == [0.9, 0.1, 0.0]
    empty = localnet_summary.build_summary(layout, hotkeys, tmp_path / "missing", None, since)
    assert empty["rounds"] == 0 and empty["round_seconds"] is None and empty["weights_source"] == "none"
    assert all(m["last_score"] is None for m in empty["miners"])
    assert "-" in localnet_summary.format_table(empty)


def test_chain_weights_reads_the_validator_row(tmp_path):
    from distributed_training.chain import LocalChain

    db = tmp_path / "chain.sqlite"
    with LocalChain(db) as chain:
        chain.create_subnet(1)
        for i, key in enumerate(["5V", "5A", "5B"]):
            chain.register(1, key, "5C", stake=1000.0 if i == 0 else 0.0, validator_permit=i == 0)

        class Wallet:
            class hotkey:  # noqa: N801 - mimics bittensor's wallet.hotkey.ss58_address
                ss58_address = "5V"

        assert localnet_summary.chain_weights(db, 1, 0) is None
        chain.set_weights(Wallet, 1, [1, 2], [3.0, 1.0], version_key=1)
    assert localnet_summary.chain_weights(db, 1, 0) == pytest.approx({1: 0.75, 2: 0.25})
    assert localnet_summary.chain_weights(db, 9, 0) is None  # no such subnet: no weights, no crash


def test_loss_plot_is_a_png(tmp_path):
    since = time.time()
    layout = localnet.plan_layout(1, liars=1, lazy=1)
    for member, losses in (("miner0", [5.0, 4.0, 3.5]), ("miner1", [5.0, 4.1]), ("miner2", [9.9])):
        _write_metrics(tmp_path / "state" / member, [
            {"event": "step", "time": since + i, "loss": loss, "epoch": 0} for i, loss in enumerate(losses)])
    series = localnet_summary.loss_series(layout, tmp_path / "state", since)
    assert list(series) == ["uid 1 (honest)", "uid 2 (liar)"] and series["uid 1 (honest)"][1] == (1.0, 4.0)
    for name, data in (("loss.png", series), ("empty.png", {})):
        localnet_summary.plot_losses(data, tmp_path / "plots" / name)
        content = (tmp_path / "plots" / name).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 1000


def test_progress_prints_changes_only_when_not_a_terminal(capsys):
    import sys

    progress = localnet.Progress(sys.stderr)
    progress.show(1.0, "swarm epoch 0 | validator rounds 0/4")
    progress.show(2.0, "swarm epoch 0 | validator rounds 0/4")
    progress.show(65.0, "swarm epoch 1 | validator rounds 1/4")
    assert capsys.readouterr().err.splitlines() == ["[00:01] swarm epoch 0 | validator rounds 0/4",
                                                     "[01:05] swarm epoch 1 | validator rounds 1/4"]
