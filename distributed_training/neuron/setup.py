"""Building the parts a neuron stands on, from its configuration.

Miner and validator need the same data pages, the same model and the same swarm, so both build
them here. The order matters: the DHT (which forks a process) starts before anything can
initialise CUDA, and all heavy work happens after the configuration was validated.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional

import torch

from ..config import state_dir
from ..logs import MetricsLog

if TYPE_CHECKING:  # the heavy modules are imported where they are built, after the flags were checked
    from ..data.pages import PageSource
    from ..data.tokenizer import Tokenizer
    from ..spec import ModelPreset, RunSpec
    from ..swarm.ban_records import BanRecords
    from ..swarm.bindings import PeerBinder
    from ..swarm.dht import DHT, MinerRecords, RunSpecRecords
    from ..training.trainer import Trainer, TrainerSettings

logger = logging.getLogger(__name__)

METAGRAPH_TTL = 12.0  # seconds a cached metagraph is trusted for authorising requests


@dataclass
class NeuronParts:
    """What a neuron trains or follows with: data, model, DHT, trainer, records, and the run spec."""

    source: "PageSource"
    tokenizer: "Tokenizer"
    model: torch.nn.Module
    dht: "DHT"
    trainer: "Trainer"
    records: "MinerRecords"
    spec: "RunSpec"
    spec_records: "RunSpecRecords"
    peer_id: str
    num_params: int
    binding: Optional["PeerBinder"] = None  # with a wallet: this peer's published binding to its hotkey
    bans: Optional["BanRecords"] = None  # with a wallet: this peer's published bans, for validators

    def renew_binding(self) -> None:
        """Publish a fresh binding before the current one lapses, and the peers this one bans now
        (called every epoch)."""
        if self.binding is not None:
            self.binding.renew()
        if self.bans is not None:
            from ..training.trainer import ban_board

            self.bans.publish(ban_board())

    def close(self) -> None:
        try:
            self.trainer.shutdown()
        finally:
            try:
                self.dht.shutdown()
            finally:
                getattr(self.source, "close", lambda: None)()  # a prefetcher's reading threads


def build_data(config: SimpleNamespace) -> tuple["ModelPreset", int, "Tokenizer", "PageSource"]:
    """Tokenizer and page source for this run; identical in every process of the run.

    The offline corpus is in memory and served as it is; any other source is read through a
    `PagePrefetcher` (unless `--data.prefetch 0`), so pages are fetched off the training thread.
    """
    from ..data.sources import make_page_source
    from ..data.tokenizer import load_tokenizer
    from ..training.model import get_preset

    preset = get_preset(config.model.preset)
    seq_len = config.model.seq_len or preset.seq_len
    data = config.data
    assets_dir = Path(data.assets_dir).expanduser() if data.assets_dir else None
    tokenizer = load_tokenizer(data.source, assets_dir, hf_name=data.tokenizer)
    common = dict(tokenizer=tokenizer, assets_dir=assets_dir, seq_len=seq_len, page_size=data.page_size)
    if data.source == "local":
        return preset, seq_len, tokenizer, make_page_source("local", **common)
    from ..data.prefetch import PagePrefetcher

    cache = Path(data.cache_dir or "~/.cache/distributed-training/data").expanduser()
    source = make_page_source(
        data.source, **common, hf_dataset=data.dataset, hf_config=data.dataset_config, hf_split=data.split,
        hf_text_field=data.text_field, hf_data_files=data.files, hf_rows_per_page=data.rows_per_page,
        hf_revision=data.revision, index_cache_dir=cache / "index",
    )
    if data.prefetch:
        source = PagePrefetcher(source, memory_pages=max(256, 4 * data.prefetch), cache_dir=cache / "pages",
                                cache_bytes=data.cache_mb << 20)
    return preset, seq_len, tokenizer, source


def trainer_settings(config: SimpleNamespace, device: Optional[torch.device] = None,
                     micro_batch_size: Optional[int] = None) -> "TrainerSettings":
    """The trainer's settings from the flags; `DiLoCoSettings` in DiLoCo mode.

    `device` decides the per-device defaults: torch.compile under `--model.compile auto` and one host
    sync per step on CUDA (the CPU keeps checking each loss before its backward); `micro_batch_size`
    is the one chosen for the device (`training.step.choose_micro_batch`), else the flag's.
    """
    from ..training.step import resolve_compile
    from ..training.trainer import DiLoCoSettings, TrainerSettings

    cfg, training, model = config.neuron, config.training, config.model
    device = device or torch.device("cpu")
    common = dict(
        run_id=cfg.run_id, batch_size=cfg.batch_size, target_batch_size=cfg.target_batch_size,
        matchmaking_time=cfg.matchmaking_time, averaging_timeout=cfg.averaging_timeout, lr=cfg.lr,
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, compression=cfg.grad_compression,
        compile=resolve_compile(model.compile, device),
        micro_batch_size=cfg.micro_batch_size if micro_batch_size is None else micro_batch_size,
        sync_every=1 if device.type == "cuda" else 0,
        offload_optimizer=training.offload_optimizer,
    )
    if training.mode == "diloco":
        return DiLoCoSettings(**common, inner_steps=training.inner_steps, outer_lr=training.outer_lr,
                              outer_momentum=training.outer_momentum)
    return TrainerSettings(**common)


def build_neuron_parts(config: SimpleNamespace, metrics: Optional[MetricsLog] = None,
                       identity: Optional["NeuronIdentity"] = None) -> NeuronParts:
    """Data, the run spec (checked against the run's other peers), the DHT, the model and the trainer.

    With an `identity` (a wallet on the chain) the peer binds its DHT peer id to its hotkey (in the DHT
    and in its chain commitment) and its averagers admit only peers whose hotkeys are registered and
    bound, by a binding their chain commitment names (`swarm/bindings.py`); without
    one (`--neuron.swarm_only`) it neither binds nor checks bindings."""
    from ..spec import RunSpec
    from ..swarm.dht import DHTSettings, MinerRecords, RunSpecRecords, start_dht, write_peer_file
    from ..training.model import build_model, count_parameters, pick_device
    from ..training.step import choose_micro_batch
    from ..training.trainer import build_trainer

    if config.neuron.torch_threads:
        torch.set_num_threads(config.neuron.torch_threads)
    preset, seq_len, tokenizer, source = build_data(config)
    spec = RunSpec.from_config(config, seq_len=seq_len, tokenizer_digest=tokenizer.digest, data_digest=source.digest)
    dht = start_dht(DHTSettings(port=config.dht.port, announce_ip=config.dht.announce_ip,
                                initial_peers=config.dht.initial_peers, use_quic=config.dht.use_quic,
                                attempts=config.dht.bootstrap_attempts, timeout=config.dht.bootstrap_timeout))
    try:
        peer_id = str(dht.peer_id)
        spec_records = RunSpecRecords(dht, spec.run_id)
        spec_records.join(spec)  # SpecMismatch if the run's peers train another spec
        maddrs = write_peer_file(state_dir(config) / "dht.json", dht)
        logger.info("DHT up as %s; other peers can join with --dht.initial_peers %s", peer_id, maddrs[0])
        device = pick_device(config.neuron.device)
        model = build_model(preset, tokenizer.vocab_size, seq_len, seed=config.neuron.seed,
                            vocab_multiple=spec.vocab_multiple, loss_kernel=spec.loss_kernel)
        num_params = count_parameters(model)
        micro = choose_micro_batch(model, device, config.neuron.batch_size, seq_len, config.neuron.micro_batch_size)
        settings = trainer_settings(config, device, micro)
        binder = ban_records = None
        if identity is not None:
            from dataclasses import replace

            from ..chain.admission import ChainAdmission
            from ..swarm.ban_records import BanRecords
            from ..swarm.bindings import BoundPeers, PeerBinder
            from ..swarm.state_digests import StateDigests

            # The chain commitment names this process's peer: peers refuse the bindings of any other.
            binder = PeerBinder(dht, spec.run_id, identity.wallet.hotkey, commit=identity.commit)
            binder.renew()
            ban_records = BanRecords(dht, spec.run_id)
            admission = ChainAdmission.from_config(config)
            from functools import partial

            from ..swarm.guard import post_ban
            from ..training.trainer import ban_board

            digests = StateDigests(dht, spec.run_id, admission,
                                   accuse=partial(post_ban, ban_board(), "state", refuse=False))
            settings = replace(settings, admit=BoundPeers(dht, spec.run_id, admission), state_digests=digests,
                               accuse=partial(post_ban, ban_board(), "progress"))
        logger.info("model %s: %.2fM parameters, vocab %d (embedding %d), %s loss, seq_len %d, device %s "
                    "(compile %s, micro-batch %s), run spec %s", preset.name, num_params / 1e6, tokenizer.vocab_size,
                    model.config.vocab_size, spec.loss_kernel, seq_len, device, settings.compile,
                    micro or "whole batch", spec.digest[:12])
        trainer = build_trainer(model, dht, settings, device)
        records = MinerRecords(dht, spec.run_id)
    except BaseException:
        dht.shutdown()
        raise
    if metrics is not None:
        metrics.write("dht", peer_id=peer_id, maddrs=maddrs, spec=spec.digest)
    return NeuronParts(source=source, tokenizer=tokenizer, model=model, dht=dht, trainer=trainer, records=records,
                       spec=spec, spec_records=spec_records, peer_id=peer_id, num_params=num_params, binding=binder,
                       bans=ban_records)


class NeuronIdentity:
    """A neuron's wallet, chain and uid; refuses to exist for a hotkey that is not registered."""

    def __init__(self, config: SimpleNamespace):
        from ..chain import open_chain
        from ..chain.wallets import load_wallet

        self.config = config
        self.netuid = config.netuid
        self.wallet = load_wallet(config.wallet.name, config.wallet.hotkey, config.wallet.path)
        self.hotkey = self.wallet.hotkey.ss58_address
        self.chain = open_chain(config.subtensor.network, config.subtensor.chain_endpoint,
                                Path(config.chain.db).expanduser())
        uid = self.chain.uid_for(self.netuid, self.hotkey)
        if uid is None:
            self.chain.close()
            raise NotRegisteredError(
                f"hotkey {self.hotkey} ({config.wallet.name}/{config.wallet.hotkey}) is not registered on netuid "
                f"{self.netuid} of {config.subtensor.network}; register it first (btcli subnet register, or "
                f"dt-chain register for the embedded chain)"
            )
        self.uid: int = uid
        self._metagraph = None
        self._metagraph_time = 0.0
        self._lock = threading.Lock()

    def metagraph(self, max_age: float = METAGRAPH_TTL):
        with self._lock:
            if self._metagraph is None or time.monotonic() - self._metagraph_time > max_age:
                self._metagraph = self.chain.metagraph(self.netuid)
                self._metagraph_time = time.monotonic()
            return self._metagraph

    def publish_endpoint(self, port: int) -> None:
        ip = self.config.axon.external_ip or self.config.dht.announce_ip or "127.0.0.1"
        self.chain.serve_endpoint(self.wallet, self.netuid, ip, port)
        logger.info("published endpoint %s:%d for uid %d on netuid %d", ip, port, self.uid, self.netuid)

    def commit(self, text: str) -> None:
        """Replace this hotkey's chain commitment (the peer binding's, `swarm.bindings.binding_commitment`)."""
        self.chain.commit(self.wallet, self.netuid, text)
        logger.info("committed %r for uid %d on netuid %d", text, self.uid, self.netuid)

    def authorize_validator(self, hotkey: str) -> Optional[str]:
        """None if `hotkey` may query this miner, else the reason (becomes a 403)."""
        neuron = self.metagraph().by_hotkey(hotkey)
        if neuron is None:
            neuron = self.metagraph(max_age=0).by_hotkey(hotkey)  # it may have registered just now
        if neuron is None:
            return f"hotkey {hotkey} is not registered on netuid {self.netuid}"
        if not neuron.validator_permit:
            return f"uid {neuron.uid} has no validator permit"
        min_stake = getattr(self.config, "blacklist", SimpleNamespace(min_stake=0.0)).min_stake
        if neuron.stake < min_stake:
            return f"uid {neuron.uid} has stake {neuron.stake:g} < --blacklist.min_stake {min_stake:g}"
        return None

    def close(self) -> None:
        self.chain.close()


class NotRegisteredError(RuntimeError):
    """The neuron's hotkey is not registered on the subnet."""


def open_identity(config: SimpleNamespace) -> NeuronIdentity:
    return NeuronIdentity(config)
