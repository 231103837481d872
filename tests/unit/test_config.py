"""Configuration: precedence of flag > environment > .env > default, one-line errors naming the flag."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_training.config import ConfigError, flags_for, parse_config

REPO = Path(__file__).resolve().parents[2]
PEER_ID = "12D3KooWGy9fHL4PYsf89EnsiCjsaD83GN6Zv99CK2bwycejSEUU"


@pytest.fixture
def no_dotenv(tmp_path: Path) -> Path:
    """A .env path that does not exist, so nothing from the working directory leaks in."""
    return tmp_path / "absent.env"


def _parse(role: str, argv: list[str], no_dotenv: Path, env: dict[str, str] | None = None):
    return parse_config(role, argv, env=env or {}, dotenv_path=no_dotenv)


# --- precedence ---------------------------------------------------------------------------------
def test_flag_beats_environment_beats_dotenv_beats_default(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "DHT_PORT=1000\n"
        "NEURON_BATCH_SIZE=2\n"
        "NEURON_LR=0.5\n"
        "NETUID=7\n"
    )
    env = {"DHT_PORT": "2000", "NEURON_BATCH_SIZE": "3"}
    config = parse_config("miner", ["--dht.port", "3000"], env=env, dotenv_path=dotenv)

    assert config.dht.port == 3000 and config.sources["dht.port"] == "flag"
    assert config.neuron.batch_size == 3 and config.sources["neuron.batch_size"] == "environment"
    assert config.neuron.lr == 0.5 and config.sources["neuron.lr"] == ".env"
    assert config.netuid == 7 and config.sources["netuid"] == ".env"
    assert config.neuron.target_batch_size == 512 and config.sources["neuron.target_batch_size"] == "default"
    assert config.role == "miner"


def test_values_are_converted_to_their_types(no_dotenv: Path) -> None:
    config = _parse("miner", ["--neuron.swarm_only", "--neuron.lr", "1e-3"], no_dotenv,
                    env={"DHT_USE_QUIC": "yes", "NEURON_UID": "4",
                         "DHT_INITIAL_PEERS": f"/ip4/127.0.0.1/tcp/5/p2p/{PEER_ID}, /ip4/10.0.0.1/tcp/6/p2p/{PEER_ID}"})
    assert config.neuron.swarm_only is True  # a bare switch means true
    assert config.dht.use_quic is True
    assert config.neuron.uid == 4
    assert config.neuron.lr == pytest.approx(1e-3)
    assert config.dht.initial_peers == [f"/ip4/127.0.0.1/tcp/5/p2p/{PEER_ID}", f"/ip4/10.0.0.1/tcp/6/p2p/{PEER_ID}"]


def test_environment_switch_can_be_turned_off_and_flag_wins(no_dotenv: Path) -> None:
    assert _parse("miner", [], no_dotenv, env={"NEURON_SWARM_ONLY": "false"}).neuron.swarm_only is False
    config = _parse("miner", ["--neuron.swarm_only", "true"], no_dotenv, env={"NEURON_SWARM_ONLY": "false"})
    assert config.neuron.swarm_only is True and config.sources["neuron.swarm_only"] == "flag"


def test_env_file_flag_overrides_dotenv_path(tmp_path: Path) -> None:
    default_env = tmp_path / "default.env"
    default_env.write_text("NETUID=1\n")
    chosen = tmp_path / "chosen.env"
    chosen.write_text("NETUID=9\n")
    config = parse_config("validator", ["--env-file", str(chosen)], env={}, dotenv_path=default_env)
    assert config.netuid == 9 and config.sources["netuid"] == ".env"


def test_default_when_nothing_is_set(no_dotenv: Path) -> None:
    config = _parse("validator", [], no_dotenv)
    for flag in flags_for("validator"):
        assert config.sources[flag.name] == "default"
    assert config.model.preset == "tiny" and config.dht.port == 0 and config.dht.initial_peers == []


# --- bad values ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "role, argv, flag, detail",
    [
        ("miner", ["--dht.port", "99999"], "--dht.port", "65535"),
        ("miner", ["--axon.port", "-1"], "--axon.port", "65535"),
        ("validator", ["--model.preset", "huge"], "--model.preset", "tiny, gpt2-124m"),
        ("miner", ["--neuron.batch_size", "abc"], "--neuron.batch_size", "'abc'"),
        ("miner", ["--neuron.batch_size", "0"], "--neuron.batch_size", "positive"),
        ("miner", ["--neuron.lr", "fast"], "--neuron.lr", "'fast'"),
        ("miner", ["--neuron.lr", "inf"], "--neuron.lr", "finite"),
        ("miner", ["--neuron.lr", "nan"], "--neuron.lr", "finite"),
        ("miner", ["--neuron.weight_decay", "inf"], "--neuron.weight_decay", "finite"),
        ("miner", ["--dht.initial_peers", "not-a-multiaddr"], "--dht.initial_peers", "not a multiaddr"),
        ("miner", ["--dht.initial_peers", "/ip4/1.2.3.4/tcp/5"], "--dht.initial_peers", "/p2p/"),
        ("miner", ["--dht.initial_peers", f"/ip4/1.2.3.4/tcp/5/p2p/{PEER_ID},/ip4/1.2.3.4/tcp/6"],
         "--dht.initial_peers", "/ip4/1.2.3.4/tcp/6"),
        ("miner", ["--no.such.flag", "1"], "--no.such.flag", "unrecognized"),
        ("validator", ["--neuron.swarm_only"], "--neuron.swarm_only", "unrecognized"),  # a miner-only flag
        ("miner", ["--subtensor.network", "mainnet"], "--subtensor.network", "'mainnet'"),
        ("miner", ["--axon.ip", "300.1.1.1"], "--axon.ip", "'300.1.1.1'"),
        ("validator", ["--neuron.moving_average_alpha", "1.5"], "--neuron.moving_average_alpha", "(0, 1]"),
        ("miner", ["--neuron.batch_size", "16", "--neuron.target_batch_size", "8"], "--neuron.target_batch_size",
         "--neuron.batch_size"),
        ("miner", ["--neuron.device", "tpu"], "--neuron.device", "'tpu'"),
        ("miner", ["--neuron.device", "cudafoo"], "--neuron.device", "'cudafoo' is not auto, cpu, cuda or cuda:N"),
        ("validator", ["--netuid", "70000"], "--netuid", "between 0 and 65535"),
        ("miner", ["--dht.initial_peers", f"/ip4/1.2.3.4/tcp/99999/p2p/{PEER_ID}"], "--dht.initial_peers",
         "Integer not in range(65536)"),
        ("miner", ["--env-file", "/nonexistent/dir/.env"], "--env-file", "does not exist"),
        ("miner", ["--neuron.behaviour", "copycat"], "--neuron.behaviour", "unrecognized"),  # cheats: localnet only
    ],
)
def test_bad_value_raises_config_error_naming_the_flag(role, argv, flag, detail, no_dotenv: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(role, argv, no_dotenv)
    message = str(info.value)
    assert flag in message, message
    assert detail in message, message
    assert "\n" not in message


def test_missing_data_files_for_hf_source_names_the_flag(tmp_path: Path, no_dotenv: Path) -> None:
    present = tmp_path / "present.jsonl"
    present.write_text("{}\n")
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError, match=r"--data\.files: .*missing\.jsonl does not exist"):
        _parse("miner", ["--data.source", "hf", "--data.files", f"{present},{missing}"], no_dotenv)
    # the same files with all of them present are fine, and with the local source they are not checked
    assert _parse("miner", ["--data.source", "hf", "--data.files", str(present)], no_dotenv).data.files == str(present)
    assert _parse("miner", ["--data.source", "local", "--data.files", str(missing)], no_dotenv).data.source == "local"


def test_bad_value_from_environment_or_dotenv_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("miner", [], env={"DHT_PORT": "70000"}, dotenv_path=tmp_path / "absent.env")
    assert "DHT_PORT (from environment)" in str(info.value) and "65535" in str(info.value)

    dotenv = tmp_path / ".env"
    dotenv.write_text("MODEL_PRESET=huge\n")
    with pytest.raises(ConfigError, match=r"MODEL_PRESET \(from \.env\): 'huge' is not one of"):
        parse_config("validator", [], env={}, dotenv_path=dotenv)
    # a good flag shadows the bad environment value: it is never read
    assert parse_config("miner", ["--dht.port", "5"], env={"DHT_PORT": "70000"},
                        dotenv_path=tmp_path / "absent.env").dht.port == 5


def test_good_network_values_are_accepted(no_dotenv: Path) -> None:
    for network in ("embedded", "finney", "test", "local", "ws://127.0.0.1:9944", "wss://example.org:443"):
        assert _parse("miner", ["--subtensor.network", network], no_dotenv).subtensor.network == network


# --- real processes -----------------------------------------------------------------------------
def _clean_env(home: Path) -> dict[str, str]:
    """The test's environment without anything a flag could read, and a throw-away HOME."""
    names = {flag.env for flag in flags_for("miner") + flags_for("validator")}
    env = {key: value for key, value in os.environ.items() if key not in names}
    env["HOME"] = str(home)
    return env


def _run_neuron(script: str, args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "neurons" / script), *args], cwd=tmp_path,
                          env=_clean_env(tmp_path), capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("miner.py", ["--dht.port", "99999"], "dt-miner: error: --dht.port: '99999' must be a port number"),
        ("validator.py", ["--model.preset", "huge"], "dt-validator: error: --model.preset: 'huge' is not one of"),
    ],
)
def test_entry_point_bad_flag_exits_2_with_one_line(script, args, expected, tmp_path: Path) -> None:
    result = _run_neuron(script, args, tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected), lines[0]


def test_miner_with_missing_wallet_exits_2_with_one_line(tmp_path: Path) -> None:
    wallets = tmp_path / "wallets"
    wallets.mkdir()
    args = ["--wallet.path", str(wallets), "--subtensor.network", "embedded", "--chain.db", str(tmp_path / "c.sqlite"),
            "--neuron.state_dir", str(tmp_path / "state")]
    result = _run_neuron("miner.py", args, tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dt-miner: error: wallet default/hotkey default not found under {wallets}"), lines[0]
    assert "dt-chain wallet create" in lines[0]
    assert list(wallets.iterdir()) == []  # nothing was created on the operator's behalf


@pytest.mark.parametrize("error", ["device", "scores"])
def test_operator_errors_after_start_are_one_line_and_exit_2(error: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """A missing GPU or a corrupt score book surface while the neuron is being built: one line, exit 2."""
    import torch

    from distributed_training.neuron.errors import run_reporting_errors
    from distributed_training.training.model import pick_device
    from distributed_training.validation.scoring import ScoreBook

    if error == "device":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        build, expected = (lambda: pick_device("cuda:0")), "--neuron.device cuda:0: no CUDA device"
    else:
        (tmp_path / "scores.json").write_text("{not json")
        build, expected = (lambda: ScoreBook.load(tmp_path / "scores.json", 0.1)), "move it aside"
    assert run_reporting_errors("validator", build) == 2
    err = capsys.readouterr().err
    assert err.startswith("dt-validator: error: ") and expected in err and err.count("\n") == 1, err


@pytest.mark.parametrize("debug, level", [("1", "DEBUG"), ("", "WARNING")])
def test_logging_debug_from_environment_sets_hivemind_level(debug: str, level: str, tmp_path: Path) -> None:
    """hivemind reads its level at import, so the entry point must set it from the parsed config, .env included."""
    code = ("import os; from distributed_training.neuron.entry import run_neuron\n"
            "class Probe:\n    def run(self):\n        print(os.environ['HIVEMIND_LOGLEVEL']); return 0\n"
            "run_neuron('miner', lambda config: Probe(), [])")
    env = {**_clean_env(tmp_path), "LOGGING_DEBUG": debug}
    env.pop("HIVEMIND_LOGLEVEL", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == level
