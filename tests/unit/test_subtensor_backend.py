"""SubtensorChain against a fake at the bittensor SDK boundary.

The fake stands in for ``bittensor.Subtensor`` (what ``subtensor_factory``
returns) and records every call, so these tests pin the exact SDK calls the
real-network path makes: which reads, which intents, with which fields. The
contract tests at the bottom check the fake's surface against the installed
SDK, so an SDK upgrade that renames something fails here rather than on finney.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Optional

import bittensor as bt
import pytest
from bittensor.result import ErrorCode

from distributed_training.chain import ChainError, SubtensorChain
from distributed_training.chain.subtensor import SET_WEIGHTS_RETRIES
from distributed_training.chain.wallets import create_wallet
from distributed_training.localnet.processes import free_port

NETUID = 7


def sdk_neuron(uid: int, hotkey: str, *, axon: Optional[str], permit: bool = False, stake_rao: int = 0):
    """A real ``bt.MetagraphNeuron`` as ``subnets.metagraph`` returns it."""
    zero = bt.Balance.from_rao(0, NETUID)
    return bt.MetagraphNeuron(
        uid=uid, hotkey=hotkey, coldkey=f"cold-{uid}", active=True, validator_permit=permit,
        last_update=0, block_at_registration=0, rank=0.0, trust=0.0, consensus=0.0,
        incentive=0.0, dividends=0.0, pruning_score=0.0, emission=zero,
        alpha_stake=bt.Balance.from_rao(stake_rao, NETUID), tao_stake=bt.Balance.from_rao(0),
        total_stake=bt.Balance.from_rao(stake_rao, NETUID), axon=axon, identity=None, commitment=None,
    )


def sdk_metagraph(neurons: list, block: int = 500):
    return bt.Metagraph(
        netuid=NETUID, mechid=0, name="dt", symbol="x", block=block, tempo=360, last_step=0,
        blocks_since_last_step=0, owner_hotkey="owner", owner_coldkey="owner", network_registered_at=0,
        num_uids=len(neurons), max_uids=256, price=None, moving_price=None, identity=None,
        neurons=neurons, commitments={}, unregistered_commitments={}, raw={},
    )


class _Namespace:
    def __init__(self, **methods: Any) -> None:
        self.__dict__.update(methods)


class FakeSubtensor:
    """Mimics the blocking ``bittensor.Subtensor`` surface SubtensorChain uses.

    Signatures mirror the SDK (checked by the contract tests below); every
    call is recorded for assertions.
    """

    def __init__(self, target: str, graph=None) -> None:
        self.target = target
        self.graph = graph
        self.uids: dict[str, int] = {}
        self.weight_rows: dict[int, dict[int, float]] = {}
        self.result = bt.ExtrinsicResult(success=True, message="included")
        self.fail_with: Optional[Exception] = None
        self.calls: list[tuple] = []
        self.closed = 0
        self.committed: dict[str, Any] = {}  # hotkey -> bt.metagraph.NeuronCommitment
        self.subnets = _Namespace(metagraph=self._metagraph, commitments=self._commitments)
        self.neurons = _Namespace(uid=self._uid)
        self.weights = _Namespace(weights=self._weights)
        self.identity = _Namespace(commitment=self._commitment)

    def _check(self) -> None:
        if self.fail_with is not None:
            raise self.fail_with

    @property
    def block(self) -> int:
        self.calls.append(("block",))
        self._check()
        return 1234

    def _metagraph(self, netuid: int, block: Optional[int] = None, *, commitments: bool = True):
        self.calls.append(("subnets.metagraph", netuid, block, commitments))
        self._check()
        return self.graph

    def _uid(self, hotkey_ss58: str, netuid: int, *, block: Optional[int] = None):
        self.calls.append(("neurons.uid", hotkey_ss58, netuid))
        self._check()
        return self.uids.get(hotkey_ss58)

    def _weights(self, netuid: int, mechid: int = 0, *, block: Optional[int] = None):
        self.calls.append(("weights.weights", netuid, mechid))
        self._check()
        return self.weight_rows

    def _commitments(self, netuid: int, block: Optional[int] = None):
        self.calls.append(("subnets.commitments", netuid))
        self._check()
        return self.committed

    def _commitment(self, netuid: int, hotkey_ss58: str, *, block: Optional[int] = None):
        self.calls.append(("identity.commitment", netuid, hotkey_ss58))
        self._check()
        found = self.committed.get(hotkey_ss58)
        return None if found is None else bt.Commitment(block=found.block, deposit=found.deposit,
                                                         data=found.data, fields=found.fields)

    def submit_call(self, call, wallet, **kwargs):
        self.calls.append(("submit_call", call, wallet, kwargs))
        self._check()
        return self.result

    def execute(self, intent, wallet, **kwargs):
        self.calls.append(("execute", intent, wallet, kwargs))
        self._check()
        return self.result

    def close(self) -> None:
        self.closed += 1


@pytest.fixture(scope="module")
def wallet(tmp_path_factory: pytest.TempPathFactory) -> bt.Wallet:
    return create_wallet("validator", "h", tmp_path_factory.mktemp("wallets"))


@pytest.fixture
def fake() -> FakeSubtensor:
    return FakeSubtensor("unset")


def make_chain(fake: FakeSubtensor, network: str = "test", endpoint: Optional[str] = None) -> SubtensorChain:
    def factory(target: str) -> FakeSubtensor:
        fake.target = target
        return fake

    return SubtensorChain(network, endpoint, subtensor_factory=factory)


def executed(fake: FakeSubtensor) -> list[tuple]:
    return [c for c in fake.calls if c[0] == "execute"]


# --- construction ----------------------------------------------------------------


def test_construction_is_lazy_and_endpoint_overrides_network() -> None:
    built: list[str] = []
    def factory(target: str) -> FakeSubtensor:
        built.append(target)
        return FakeSubtensor(target)

    chain = SubtensorChain("finney", "ws://10.0.0.9:9944", subtensor_factory=factory)
    assert built == [] and chain.network == "finney" and chain.endpoint == "ws://10.0.0.9:9944"
    chain.block()
    chain.block()
    assert built == ["ws://10.0.0.9:9944"]  # one client, dialed at the override


@pytest.mark.parametrize(
    "network, url",
    [("finney", "wss://entrypoint-finney.opentensor.ai:443"), ("test", "wss://test.finney.opentensor.ai:443"),
     ("ws://1.2.3.4:9944", "ws://1.2.3.4:9944")],
)
def test_network_names_resolve_through_the_sdk(fake: FakeSubtensor, network: str, url: str) -> None:
    chain = make_chain(fake, network)
    assert chain.endpoint == url
    chain.block()
    assert fake.target == network


@pytest.mark.parametrize(
    "network, message",
    [("mainnet", "unknown network 'mainnet'"), ("embedded", "built-in SQLite chain"), ("", "no network given")],
)
def test_bad_network_fails_at_construction(network: str, message: str) -> None:
    with pytest.raises(ChainError, match=message):
        SubtensorChain(network, None, subtensor_factory=lambda t: pytest.fail("must not connect"))


# --- reads ---------------------------------------------------------------------------


def test_metagraph_maps_sdk_neurons(fake: FakeSubtensor) -> None:
    fake.graph = sdk_metagraph([
        sdk_neuron(0, "hk-miner", axon="1.2.3.4:8091", stake_rao=2_500_000_000),
        sdk_neuron(1, "hk-val", axon=None, permit=True, stake_rao=10**12),
        sdk_neuron(2, "hk-v6", axon="[2001:db8::1]:9000"),
    ], block=777)
    graph = make_chain(fake).metagraph(NETUID)
    assert fake.calls == [("subnets.metagraph", NETUID, None, False)]
    assert graph.netuid == NETUID and graph.block == 777 and graph.uids == [0, 1, 2]
    miner, val, v6 = graph.neurons
    assert (miner.hotkey, miner.coldkey, miner.stake) == ("hk-miner", "cold-0", 2.5)
    assert (miner.ip, miner.port, miner.endpoint) == ("1.2.3.4", 8091, "1.2.3.4:8091")
    assert (val.validator_permit, val.stake, val.ip, val.port, val.endpoint) == (True, 1000.0, "", 0, None)
    assert (v6.ip, v6.port, v6.endpoint) == ("2001:db8::1", 9000, "[2001:db8::1]:9000")


def test_missing_subnet_is_a_chain_error(fake: FakeSubtensor) -> None:
    fake.graph = None
    with pytest.raises(ChainError, match="subnet 7 does not exist on test"):
        make_chain(fake).metagraph(NETUID)


def test_block_uid_and_weights_reads(fake: FakeSubtensor) -> None:
    fake.uids = {"hk": 4}
    fake.weight_rows = {1: {0: 0.25, 4: 0.75}}
    chain = make_chain(fake)
    assert chain.block() == 1234
    assert chain.uid_for(NETUID, "hk") == 4 and chain.is_registered(NETUID, "hk")
    assert chain.uid_for(NETUID, "other") is None and not chain.is_registered(NETUID, "other")
    assert chain.weights(NETUID) == {1: {0: 0.25, 4: 0.75}}
    assert fake.calls == [
        ("block",),
        ("neurons.uid", "hk", NETUID), ("neurons.uid", "hk", NETUID),
        ("neurons.uid", "other", NETUID), ("neurons.uid", "other", NETUID),
        ("weights.weights", NETUID, 0),
    ]


# --- writes: intents -----------------------------------------------------------------


def test_serve_endpoint_executes_serve_axon(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    fake.graph = sdk_metagraph([sdk_neuron(0, wallet.hotkey.ss58_address, axon="9.9.9.9:1")])
    make_chain(fake).serve_endpoint(wallet, NETUID, "203.0.113.7", 8091)
    [(_, intent, signer, kwargs)] = executed(fake)
    assert type(intent) is bt.ServeAxon
    assert (intent.netuid, intent.ip, intent.port, intent.protocol) == (NETUID, "203.0.113.7", 8091, 4)
    assert signer is wallet
    assert kwargs == {"wait_for_inclusion": True, "wait_for_finalization": False}


def test_serve_endpoint_skips_an_unchanged_endpoint(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    # serve_axon is rate limited on chain: a restart must not re-publish the same address.
    fake.graph = sdk_metagraph([sdk_neuron(0, wallet.hotkey.ss58_address, axon="203.0.113.7:8091")])
    make_chain(fake).serve_endpoint(wallet, NETUID, "203.0.113.7", 8091)
    assert executed(fake) == []


def test_serve_endpoint_requires_registration(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    fake.graph = sdk_metagraph([sdk_neuron(0, "someone-else", axon=None)])
    with pytest.raises(ChainError, match=f"hotkey {wallet.hotkey.ss58_address} is not registered on netuid 7"):
        make_chain(fake).serve_endpoint(wallet, NETUID, "203.0.113.7", 8091)
    assert executed(fake) == []


def test_serve_endpoint_validates_before_touching_the_chain(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    with pytest.raises(ChainError, match="wildcard"):
        make_chain(fake).serve_endpoint(wallet, NETUID, "0.0.0.0", 8091)
    assert fake.calls == []


def test_set_weights_executes_set_weights(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    make_chain(fake).set_weights(wallet, NETUID, [3, 1, 2], [1.0, 3.0, 0.0], version_key=11)
    [(_, intent, signer, kwargs)] = executed(fake)
    assert type(intent) is bt.SetWeights
    assert (intent.netuid, intent.mechid, intent.version_key) == (NETUID, 0, 11)
    # SetWeights sorts nothing for list input; zeros dropped, proportions kept.
    assert intent.uids == [3, 1] and intent.weights == pytest.approx([0.25, 0.75])
    assert signer is wallet
    assert kwargs == {"wait_for_inclusion": True, "wait_for_finalization": False, "retries": SET_WEIGHTS_RETRIES}


def test_set_weights_rejects_bad_vectors_without_calling_the_sdk(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    with pytest.raises(ChainError, match="differ in length"):
        make_chain(fake).set_weights(wallet, NETUID, [0, 1], [1.0], version_key=1)
    assert fake.calls == []


# --- commitments -------------------------------------------------------------------------


def sdk_commitments(rows: dict[str, list], block: int = 900) -> dict:
    """Real ``NeuronCommitment``s decoded by the SDK from raw ``CommitmentOf`` storage records."""
    from bittensor import metagraph as sdk

    records = [(hotkey, {"block": 5, "deposit": 0, "info": {"fields": fields}}) for hotkey, fields in rows.items()]
    return sdk._commitments(NETUID, records, [], block)


def submitted(fake: FakeSubtensor) -> list[tuple]:
    return [c for c in fake.calls if c[0] == "submit_call"]


def test_commit_submits_set_commitment_signed_by_the_hotkey(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    from bittensor import metagraph as sdk

    fake.uids = {wallet.hotkey.ss58_address: 3}
    text = "dt-peer/1 12D3KooWpeer 0123456789abcdef0123456789abcdef"
    make_chain(fake).commit(wallet, NETUID, text)
    [(_, call, signer, kwargs)] = submitted(fake)
    assert (call.module, call.function, call.params["netuid"]) == ("Commitments", "set_commitment", NETUID)
    [field] = call.params["info"]["fields"]
    assert list(field) == [f"Raw{len(text)}"]
    assert sdk._decode_fields(call.params["info"]["fields"]) == text  # what every reader of the chain decodes
    assert signer is wallet
    assert kwargs == {"signer": "hotkey", "wait_for_inclusion": True, "wait_for_finalization": False}


def test_commit_skips_an_unchanged_commitment(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    # commitments are rate limited on chain: a retry after a lost reply must not submit again
    fake.uids = {wallet.hotkey.ss58_address: 3}
    fake.committed = sdk_commitments({wallet.hotkey.ss58_address: [{"Raw3": "0x" + b"old".hex()}]})
    chain = make_chain(fake)
    chain.commit(wallet, NETUID, "old")
    assert submitted(fake) == []
    chain.commit(wallet, NETUID, "new")
    assert len(submitted(fake)) == 1


def test_commit_requires_registration_and_valid_text(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    chain = make_chain(fake)
    with pytest.raises(ChainError, match="at most 128 bytes"):
        chain.commit(wallet, NETUID, "x" * 129)
    with pytest.raises(ChainError, match="a commitment is text"):
        chain.commit(wallet, NETUID, b"bytes")
    assert fake.calls == []  # checked before touching the chain
    with pytest.raises(ChainError, match=f"hotkey {wallet.hotkey.ss58_address} is not registered.*btcli"):
        chain.commit(wallet, NETUID, "dt-peer/1 x y")
    assert submitted(fake) == []


def test_a_refused_commit_is_a_chain_error_with_the_sdk_remedy(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    fake.uids = {wallet.hotkey.ss58_address: 3}
    failure = bt.ChainError("Rate limited: wait 12 blocks", code=ErrorCode.RATE_LIMITED)
    fake.result = bt.ExtrinsicResult(success=False, message="failed", error=failure)
    with pytest.raises(ChainError, match="committing on netuid 7 failed on test: Rate limited"):
        make_chain(fake).commit(wallet, NETUID, "dt-peer/1 x y")


def test_commitments_reads_the_bulk_map_and_skips_sealed_payloads(fake: FakeSubtensor) -> None:
    fake.committed = sdk_commitments({
        "hk-a": [{"Raw9": "0x" + b"dt-peer/1".hex()}],
        "hk-sealed": [{"TimelockEncrypted": {"encrypted": "0x00", "reveal_round": 99}}],
    })
    assert make_chain(fake).commitments(NETUID) == {"hk-a": "dt-peer/1"}
    assert fake.calls == [("subnets.commitments", NETUID)]


# --- error translation --------------------------------------------------------------


def test_failed_extrinsic_becomes_chain_error_with_the_sdk_remedy(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    failure = bt.ChainError("Hotkey is not registered on netuid 7.", code=ErrorCode.NOT_REGISTERED)
    fake.result = bt.ExtrinsicResult(success=False, message="failed", error=failure)
    expected = "setting weights on netuid 7 failed on test: Hotkey is not registered.*btcli subnets register"
    with pytest.raises(ChainError, match=expected):
        make_chain(fake).set_weights(wallet, NETUID, [0], [1.0], version_key=1)


def test_preflight_error_raised_by_execute_is_translated(fake: FakeSubtensor, wallet: bt.Wallet) -> None:
    fake.fail_with = bt.ChainError("Rate limited: wait 12 blocks", code=ErrorCode.RATE_LIMITED)
    with pytest.raises(ChainError, match="Rate limited: wait 12 blocks; wait for the rate-limit window"):
        make_chain(fake).set_weights(wallet, NETUID, [0], [1.0], version_key=1)


def test_connection_failure_names_the_flags(fake: FakeSubtensor) -> None:
    fake.fail_with = bt.RpcConnectionError("could not connect to any endpoint")
    with pytest.raises(
        ChainError,
        match=r"cannot reach subtensor at wss://test.finney.opentensor.ai:443: could not connect.*"
        r"check --subtensor.network/--subtensor.chain_endpoint",
    ):
        make_chain(fake).metagraph(NETUID)


def test_unexpected_bugs_are_not_disguised(fake: FakeSubtensor) -> None:
    fake.fail_with = KeyError("bug")
    with pytest.raises(KeyError):
        make_chain(fake).block()


def test_close_closes_the_client_once(fake: FakeSubtensor) -> None:
    chain = make_chain(fake)
    chain.close()  # never connected: nothing to close
    chain.block()
    chain.close()
    chain.close()
    assert fake.closed == 1


def test_real_sdk_client_against_an_unreachable_node() -> None:
    """The default factory (real bt.Subtensor) fails fast and translated on a dead port."""
    port = free_port()
    chain = SubtensorChain("local", f"ws://127.0.0.1:{port}")
    try:
        with pytest.raises(ChainError, match=f"cannot reach subtensor at ws://127.0.0.1:{port}"):
            chain.block()
    finally:
        chain.close()


# --- contract: the fake's surface matches the installed SDK ------------------------


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "view")]


def test_fake_matches_the_sdk_read_signatures() -> None:
    from bittensor.namespaces import Subnets
    from bittensor.reads.base import REGISTRY

    assert _params(Subnets.metagraph) == ["netuid", "block", "commitments"] == _params(FakeSubtensor._metagraph)
    assert _params(REGISTRY["uid"].fetch) == ["hotkey_ss58", "netuid"]
    assert REGISTRY["uid"].category == "Neurons & registration"  # -> client.neurons.uid
    assert _params(REGISTRY["weights"].fetch) == ["netuid", "mechid"]
    assert REGISTRY["weights"].category == "Weights & bonds"  # -> client.weights.weights
    assert isinstance(inspect.getattr_static(bt.Subtensor, "block"), property)
    assert callable(bt.Subtensor.execute) and callable(bt.Subtensor.close)
    assert _params(Subnets.commitments) == ["netuid", "block"] == _params(FakeSubtensor._commitments)
    assert _params(REGISTRY["commitment"].fetch) == ["netuid", "hotkey_ss58"]
    assert REGISTRY["commitment"].category == "Identity & commitments"  # -> client.identity.commitment


def test_fake_matches_the_sdk_submit_call_and_commitment_call() -> None:
    from bittensor.executor import Executor

    assert {"signer", "wait_for_inclusion", "wait_for_finalization"} <= set(_params(Executor.submit_call))
    assert callable(bt.Subtensor.submit_call)
    assert _params(bt.calls.Commitments.set_commitment) == ["netuid", "info"]


def test_fake_matches_the_sdk_execute_and_intents() -> None:
    from bittensor.executor import Executor

    accepted = set(_params(Executor.execute))
    assert {"wait_for_inclusion", "wait_for_finalization", "retries"} <= accepted
    serve = {f.name for f in dataclasses.fields(bt.ServeAxon)}
    assert {"netuid", "ip", "port"} <= serve
    weights = {f.name for f in dataclasses.fields(bt.SetWeights)}
    assert {"netuid", "uids", "weights", "version_key"} <= weights
    assert bt.ServeAxon.signer == bt.SetWeights.signer == "hotkey"
