"""A validator killed with SIGKILL and started again keeps its moving averages (real processes, embedded chain)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from distributed_training.chain import LocalChain
from distributed_training.chain.wallets import create_wallet
from distributed_training.logs import read_metrics
from distributed_training.localnet.processes import ProcessGroup

ALPHA = 0.5
NEURON_FLAGS = [
    "--subtensor.network", "embedded", "--netuid", "1", "--wallet.name", "t", "--axon.port", "0",
    "--axon.ip", "127.0.0.1", "--model.preset", "tiny", "--model.seq_len", "32", "--neuron.batch_size", "4",
    "--neuron.target_batch_size", "4096", "--neuron.matchmaking_time", "2", "--neuron.torch_threads", "1",
    "--neuron.pages_per_round", "2",
]


def _setup_chain(tmp_path: Path) -> Path:
    db = tmp_path / "chain.sqlite"
    chain = LocalChain(db)
    chain.create_subnet(1)
    for hotkey in ("validator", "miner"):
        wallet = create_wallet("t", hotkey, tmp_path / "wallets")
        chain.register(1, wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address,
                       stake=100.0 if hotkey == "validator" else 0.0, validator_permit=hotkey == "validator")
    chain.close()
    return db


def test_validator_restart_keeps_moving_averages(tmp_path):
    db = _setup_chain(tmp_path)
    run_id = f"r-{uuid.uuid4().hex[:8]}"
    flags = [*NEURON_FLAGS, "--chain.db", str(db), "--wallet.path", str(tmp_path / "wallets"), "--neuron.run_id", run_id]
    validator_flags = [*flags, "--wallet.hotkey", "validator", "--neuron.sample_size", "1",
                       "--neuron.round_interval", "0", "--neuron.moving_average_alpha", str(ALPHA),
                       "--neuron.timeout", "30"]
    book_path = tmp_path / "validator" / "scores.json"
    with ProcessGroup(tmp_path / "logs") as group:
        peers = group.initial_peers(group.start_dht_node("dht", tmp_path / "dht"))
        group.start("miner", "miner.py", [*flags, "--wallet.hotkey", "miner", "--dht.initial_peers", peers[0]],
                    tmp_path / "miner")
        group.wait_for_file(group.members["miner"], "dht.json", timeout=120)

        # First life: one round, then SIGKILL (no chance to save anything on the way out).
        first = group.start("validator", "validator.py", [*validator_flags, "--dht.initial_peers", peers[0],
                                                          "--neuron.max_rounds", "1000"], tmp_path / "validator")
        group.wait_for_file(first, "scores.json", timeout=180)
        group.kill("validator")
        before = json.loads(book_path.read_text())
        assert before["rounds"] >= 1
        ma_before = before["entries"]["1"]["moving_average"]
        assert ma_before > 0

        # Second life: resumes from the score book and runs one more round.
        group.members.pop("validator")
        second = group.start("validator2", "validator.py", [*validator_flags, "--dht.initial_peers", peers[0],
                                                            "--neuron.max_rounds", str(before["rounds"] + 1)],
                             tmp_path / "validator")
        assert group.wait("validator2", timeout=180) == 0, second.log_tail()

    after = json.loads(book_path.read_text())
    assert after["rounds"] == before["rounds"] + 1
    last = after["entries"]["1"]["last_score"]
    expected = (1 - ALPHA) * ma_before + ALPHA * last
    assert abs(after["entries"]["1"]["moving_average"] - expected) < 1e-9
    starts = read_metrics(tmp_path / "validator" / "metrics.jsonl", "start")
    assert starts[-1]["rounds"] == before["rounds"]  # the restarted validator announced where it resumed
