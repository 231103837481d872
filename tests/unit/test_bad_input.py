"""Every bad input an operator can give is one line and a non-zero exit, before anything starts.

The neurons' entry points run as real processes where they fail while parsing (a tenth of a second
each); what fails later (a missing chain, a damaged score book, a state dir through a file) runs
in-process through the neurons' own error path, `run_reporting_errors`. The transport's bad inputs
(page ids beyond the data, clients that disconnect mid-body) are in test_transport.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed_training.config import ConfigError, flags_for, parse_config

REPO = Path(__file__).resolve().parents[2]
PEER_ID = "12D3KooWGy9fHL4PYsf89EnsiCjsaD83GN6Zv99CK2bwycejSEUU"


def _one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _neuron(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """A neuron's entry point as an operator starts it, in `cwd`, with no flag's variable set and HOME there."""
    names = {flag.env for flag in flags_for("miner") + flags_for("validator")}
    env = {key: value for key, value in os.environ.items() if key not in names} | {"HOME": str(cwd)}
    return subprocess.run([sys.executable, str(REPO / "neurons" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


# --- the neurons' entry points: flags, the environment and .env files --------------------------------
@pytest.mark.parametrize(
    "script, dotenv, args, expected",
    [
        # a binary .env
        ("miner.py", b"\x00\xffNETUID=1\n", [], ".env: cannot be read as a .env file (not UTF-8 text)"),
        ("validator.py", b"NETUID=1\n\xff\xfe\n", [], ".env: cannot be read as a .env file (not UTF-8 text)"),
        # an unknown key: named, with the closest flag
        ("miner.py", b"NETUID=3\nDHT_PORTT=8009\n", [],
         ".env: line 2: 'DHT_PORTT' is not a setting; did you mean DHT_PORT (--dht.port)?"),
        ("validator.py", b"NEURON_SAMPLE_SIZ=3\n", [], "did you mean NEURON_SAMPLE_SIZE (--neuron.sample_size)?"),
        ("miner.py", b"WANDB_API_KY=abc\n", [], "'WANDB_API_KY' is not a setting; did you mean WANDB_API_KEY?"),
        ("miner.py", b"ZZZ=1\n", [], "'ZZZ' is not a setting; dt-miner --help and dt-validator --help list"),
        ("miner.py", b'NEURON_RUN_ID="unclosed\n', [], ".env: line 1 is not KEY=VALUE"),
        # --env-file naming a missing file
        ("miner.py", None, ["--env-file", "missing.env"], "dt-miner: error: --env-file: missing.env does not exist"),
        ("validator.py", None, ["--env-file", "."], "dt-validator: error: --env-file: . is not a file"),
        # the flags the operator found silently accepted
        ("miner.py", None, ["--neuron.device", "cudafoo"],
         "dt-miner: error: --neuron.device: 'cudafoo' is not auto, cpu, cuda or cuda:N"),
        ("validator.py", None, ["--netuid", "70000"],
         "dt-validator: error: --netuid: '70000' must be a subnet uid between 0 and 65535"),
        ("miner.py", b"NETUID=65536\n", [], "dt-miner: error: NETUID (from .env): '65536' must be a subnet uid"),
        # a state dir (or log dir) through a file
        ("miner.py", None, ["--neuron.state_dir", "afile/state"],
         "dt-miner: error: --neuron.state_dir: afile/state goes through afile, which is a file, not a directory"),
        ("validator.py", None, ["--neuron.state_dir", "afile"],
         "dt-validator: error: --neuron.state_dir: afile is a file, not a directory"),
        ("validator.py", None, ["--logging.dir", "afile/logs"], "dt-validator: error: --logging.dir: afile/logs goes"),
    ],
)
def test_neuron_bad_input_is_one_line_and_exit_2(script, dotenv, args, expected, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a directory\n")
    if dotenv is not None:
        (tmp_path / ".env").write_bytes(dotenv)
    result = _neuron(script, args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    line = _one_line(result.stderr)
    assert line.startswith(f"dt-{script[:-3]}: error: ") and expected in line, line
    assert not (tmp_path / "afile" / "state").exists() and not list((tmp_path).glob(".distributed-training"))


def test_unknown_key_in_dotenv_local_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("NETUID=3\n")
    (tmp_path / ".env.local").write_text("WALLET_HOTKY=h\n")
    with pytest.raises(ConfigError) as info:
        parse_config("miner", [], env={}, dotenv_path=tmp_path / ".env")
    message = str(info.value)
    assert ".env.local: line 1: 'WALLET_HOTKY' is not a setting; did you mean WALLET_HOTKEY (--wallet.hotkey)?" \
        in message and "\n" not in message


def test_every_key_of_the_committed_dotenv_and_the_known_settings_are_accepted(tmp_path: Path) -> None:
    config = parse_config("miner", [], env={}, dotenv_path=REPO / ".env")
    assert config.netuid == 25 and config.sources["netuid"] == ".env"
    (tmp_path / ".env").write_text("UPDATE_INTERVAL=600\nHIVEMIND_LOGLEVEL=INFO\nDT_PYTHON=/usr/bin/python3\n"
                                   "NEURON_SAMPLE_SIZE=4\nBLACKLIST_MIN_STAKE=1\n")  # a role flag of either neuron
    (tmp_path / ".env.local").write_text("WANDB_API_KEY=secret\nexport WALLET_NAME=w\n")
    for role in ("miner", "validator"):
        assert parse_config(role, [], env={}, dotenv_path=tmp_path / ".env").wallet.name == "w"


def test_a_secret_in_dotenv_local_reaches_the_environment_of_a_real_neuron(tmp_path: Path, monkeypatch) -> None:
    """WANDB_API_KEY is no flag: the docs tell operators to put it in .env.local, so a neuron exports it."""
    monkeypatch.setenv("WANDB_API_KEY", "placeholder")
    monkeypatch.delenv("WANDB_API_KEY")  # restored (absent or not) after the test
    (tmp_path / ".env").write_text("NETUID=3\n")
    (tmp_path / ".env.local").write_text("WANDB_API_KEY=from-dotenv-local\n")
    parse_config("miner", [], env={}, dotenv_path=tmp_path / ".env")
    assert "WANDB_API_KEY" not in os.environ  # an explicit environment (tests, dt-local-swarm) is left alone
    parse_config("miner", [], dotenv_path=tmp_path / ".env")
    assert os.environ["WANDB_API_KEY"] == "from-dotenv-local"
    monkeypatch.setenv("WANDB_API_KEY", "from-the-shell")
    parse_config("miner", [], dotenv_path=tmp_path / ".env")
    assert os.environ["WANDB_API_KEY"] == "from-the-shell"  # the environment wins, as for flags


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices_are_accepted(device: str, tmp_path: Path) -> None:
    assert parse_config("miner", ["--neuron.device", device], env={},
                        dotenv_path=tmp_path / "absent").neuron.device == device


@pytest.mark.parametrize("device", ["cudafoo", "cuda:", "cuda:x", "CUDA", "cuda:0 ", "gpu"])
def test_bad_devices_are_refused(device: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--neuron.device: .* is not auto, cpu, cuda or cuda:N"):
        parse_config("miner", ["--neuron.device", device], env={}, dotenv_path=tmp_path / "absent")


def test_netuid_bounds(tmp_path: Path) -> None:
    for good in ("0", "65535"):
        assert parse_config("validator", ["--netuid", good], env={}, dotenv_path=tmp_path / "a").netuid == int(good)
    for bad, reason in (("65536", "between 0 and 65535"), ("-1", "between 0 and 65535"), ("x", "expects a netuid")):
        with pytest.raises(ConfigError, match=reason):
            parse_config("validator", ["--netuid", bad], env={}, dotenv_path=tmp_path / "a")


# --- --help -----------------------------------------------------------------------------------------
def _help(role: str, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        parse_config(role, ["--help"], env={})
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_each_flags_default_and_variable(capsys) -> None:
    text = _help("miner", capsys)
    for shown in ("[default: 8091, env AXON_PORT]", "[default: 25, env NETUID]", "[default: false, env LOGGING_DEBUG]",
                  "[default: none, env DHT_INITIAL_PEERS]", "[default: 0.0004, env NEURON_LR]",
                  "[default: unset, env NEURON_UID]", "(default: the preset's) [env MODEL_SEQ_LEN]"):
        assert shown in text, shown
    for flag in flags_for("miner"):
        assert f"env {flag.env}]" in text, flag.name


def test_each_neuron_lists_only_the_flags_it_uses(capsys) -> None:
    miner_only = ("--neuron.swarm_only", "--neuron.wait_for_peers", "--neuron.uid", "--neuron.max_steps",
                  "--neuron.max_epochs", "--neuron.checkpoint_every", "--axon.external_ip", "--blacklist.min_stake")
    validator_only = ("--neuron.sample_size", "--neuron.max_rounds", "--neuron.verify_pages", "--neuron.timeout")
    validator, miner = _help("validator", capsys), _help("miner", capsys)
    assert not [flag for flag in miner_only if flag + " " in validator]
    assert not [flag for flag in validator_only if flag + " " in miner]
    assert all(flag + " " in miner for flag in miner_only) and all(flag + " " in validator for flag in validator_only)


def test_the_local_swarm_still_passes_one_flag_list_to_every_neuron(tmp_path: Path) -> None:
    from distributed_training.localnet.cli import NEURON_FLAGS, split_neuron_flags

    assert split_neuron_flags(["--training.mode", "diloco"]) == {"miner": ["--training.mode", "diloco"],
                                                                 "validator": ["--training.mode", "diloco"]}
    for role in ("miner", "validator"):
        parse_config(role, NEURON_FLAGS, env={}, dotenv_path=tmp_path / "absent")


# --- dt-dht and dt-monitor: the same validators, refused before any DHT starts -----------------------
@pytest.mark.parametrize(
    "tool, argv, expected",
    [
        ("dht_node", ["--dht.port", "99999"], "dt-dht: error: --dht.port: '99999' must be a port number"),
        ("dht_node", ["--dht.initial_peers", "/ip4/1.2.3.4/tcp/8009"], "lacks the /p2p/<peer id> part"),
        ("dht_node", ["--dht.initial_peers", f"/ip4/1.2.3.4/tcp/99999/p2p/{PEER_ID}"],
         "is not a multiaddr (protocol tcp: Integer not in range(65536))"),
        ("dht_node", ["--dht.announce_ip", "1.2.3"], "dt-dht: error: --dht.announce_ip: '1.2.3' does not appear"),
        ("dht_node", ["--dht.announce_ip", "1.2.3.4"], "--dht.announce_ip needs a fixed --dht.port"),
        ("dht_node", ["--dht.prot", "1"], "dt-dht: error: unrecognized arguments: --dht.prot"),
        ("monitor", [], "dt-monitor: error: the following arguments are required: --dht.initial_peers"),
        ("monitor", ["--dht.initial_peers", "garbage"], "dt-monitor: error: --dht.initial_peers: 'garbage' is not a"),
        ("monitor", ["--dht.initial_peers", f"/ip4/1.2.3.4/tcp/0/p2p/{PEER_ID}"], "has port 0"),
        ("monitor", ["--dht.initial_peers", ","], "--dht.initial_peers: give the multiaddr of a running peer"),
        ("monitor", ["--dht.initial_peers", f"/ip4/1.2.3.4/tcp/5/p2p/{PEER_ID}", "--interval", "0"],
         "dt-monitor: error: --interval: '0' must be a positive, finite number"),
        ("monitor", ["--dht.initial_peers", f"/ip4/1.2.3.4/tcp/5/p2p/{PEER_ID}", "--neuron.target_batch_size", "x"],
         "--neuron.target_batch_size: 'x' expects a positive int"),
    ],
)
def test_tool_bad_flag_is_one_line_and_exit_2_before_any_dht(tool, argv, expected, capsys, monkeypatch) -> None:
    import importlib

    from distributed_training.swarm import dht

    monkeypatch.setenv("HIVEMIND_LOGLEVEL", os.environ.get("HIVEMIND_LOGLEVEL", "WARNING"))  # main() sets it
    monkeypatch.setattr(dht, "start_dht", lambda *a, **k: pytest.fail("a DHT was started"))
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        importlib.import_module(f"distributed_training.ops.{tool}").main(argv)
    assert info.value.code == 2 and time.monotonic() - started < 5  # no 20 s of retries
    out, err = capsys.readouterr()
    assert out == "" and expected in _one_line(err), err


def test_tool_help_shows_defaults(capsys) -> None:
    from distributed_training.ops import dht_node

    with pytest.raises(SystemExit) as info:
        dht_node.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0 and "[default: 0]" in text and "[default: none]" in text


# --- what fails after the flags: one line through the neurons' error path ------------------------------
def _reported(build, capsys, role: str = "validator") -> str:
    from distributed_training.neuron.errors import run_reporting_errors

    assert run_reporting_errors(role, build) == 2
    out, err = capsys.readouterr()
    line = _one_line(err)
    assert out == "" and line.startswith(f"dt-{role}: error: "), err
    return line


def test_a_mistyped_chain_db_is_not_created_by_a_neuron(tmp_path: Path, capsys) -> None:
    from distributed_training.chain import open_chain
    from distributed_training.chain.cli import main as chain_cli

    typo = tmp_path / "chian.sqlite"
    line = _reported(lambda: open_chain("embedded", None, typo), capsys, role="miner")
    assert f"no embedded chain at {typo}; check --chain.db" in line and "dt-chain --chain.db" in line
    assert "create-subnet" in line and not typo.exists() and list(tmp_path.iterdir()) == []
    # dt-chain creates it where that is its job, and the neurons then open it
    assert chain_cli(["--chain.db", str(typo), "create-subnet", "--netuid", "1"]) == 0
    capsys.readouterr()
    with open_chain("embedded", None, typo) as chain:
        assert chain.netuids() == [1]


def test_the_neurons_identity_refuses_a_missing_chain_db_in_one_line(tmp_path: Path, capsys) -> None:
    from distributed_training.chain.wallets import create_wallet
    from distributed_training.neuron.setup import NeuronIdentity

    create_wallet("w", "h", tmp_path / "wallets")
    config = parse_config("miner", ["--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "w",
                                    "--wallet.hotkey", "h", "--chain.db", str(tmp_path / "typo.sqlite")],
                          env={}, dotenv_path=tmp_path / "absent")
    line = _reported(lambda: NeuronIdentity(config), capsys, role="miner")
    assert "no embedded chain at" in line and "typo.sqlite" in line and not (tmp_path / "typo.sqlite").exists()


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "a directory, not a file"),
        ({"format": 1, "rounds": "three", "entries": {}}, "rounds is 'three'"),
        ({"format": 1, "rounds": 1.5, "entries": {}}, "rounds is 1.5"),
        ({"format": 1, "rounds": 1, "last_weights_block": "10", "entries": {}}, "last_weights_block is '10'"),
        ({"format": 1, "entries": []}, "entries is a JSON list"),
        ({"format": 1, "entries": {"x": {"hotkey": "h"}}}, "invalid literal"),
        ({"format": 1, "entries": {"1": {"hotkey": 5}}}, "uid 1: hotkey is 5"),
        ({"format": 1, "entries": {"1": {"hotkey": "h", "moving_average": "0.5"}}}, "moving_average is '0.5'"),
        ({"format": 1, "entries": {"1": {"hotkey": "h", "moving_average": True}}}, "moving_average is True"),
        ({"format": 1, "entries": {"1": {"hotkey": "h", "answered": -1}}}, "answered is -1"),
        ({"format": 1, "entries": {"1": {"hotkey": "h", "queried": "2"}}}, "queried is '2'"),
        ({"format": 1, "entries": {"1": {"hotkey": "h", "last_score": [1]}}}, "last_score is [1]"),
        ({"format": 1, "entries": {"1": {"hotkey": "h", "last_reason": None}}}, "last_reason is None"),
        ({"format": 1, "entries": {"1": "h"}}, "argument after ** must be a mapping"),
        ({"format": 1, "entries": {"1": {"hotkey": "h", "extra": 1}}}, "unexpected keyword argument 'extra'"),
        ({"format": 1}, "no 'entries' field"),
        ({"format": 2, "entries": {}}, "format 2"),
    ],
)
def test_a_damaged_score_book_is_one_line_and_exit_2(content, reason, tmp_path: Path, capsys) -> None:
    from distributed_training.validation.scoring import ScoreBook

    path = tmp_path / "scores.json"
    if content is None:
        path.mkdir()
    else:
        path.write_text(json.dumps(content))
    line = _reported(lambda: ScoreBook.load(path, 0.1), capsys)
    assert f"{path} is not a readable score book (" in line and reason in line and "move it aside" in line, line


def test_a_good_score_book_still_loads(tmp_path: Path) -> None:
    from distributed_training.validation.scoring import ScoreBook

    book = ScoreBook(alpha=0.1, rounds=3, last_weights_block=7)
    book.record(2, "h", 1.0, "ok", True)
    book.save(tmp_path / "scores.json")
    again = ScoreBook.load(tmp_path / "scores.json", 0.1)
    assert again.rounds == 3 and again.last_weights_block == 7 and again.entries[2].moving_average == 0.1


def test_a_state_dir_through_a_file_is_one_line_at_run_time_too(tmp_path: Path, capsys) -> None:
    """The flags check the path first; the metrics log (the first file a neuron writes) says the same."""
    from distributed_training.logs import MetricsLog

    (tmp_path / "afile").write_text("x")
    line = _reported(lambda: MetricsLog(tmp_path / "afile" / "state" / "metrics.jsonl"), capsys, role="miner")
    assert "cannot write" in line and "metrics.jsonl" in line and "--neuron.state_dir" in line
