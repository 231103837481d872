"""The miner: trains in the swarm, and answers validators about the pages they assign it.

The live model belongs to the training loop alone. Validators are answered on the HTTP server's
threads from a copy of the model taken at the start of the current global epoch (the state all
peers share until the next all-reduce), so an answer never waits for a training step that may
be blocked in an all-reduce, and never sees half-applied parameters.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import SimpleNamespace
from typing import Iterator, Optional

import torch

from . import __version__, PROTOCOL_VERSION
from .config import state_dir
from .entry import install_stop_handlers
from .logs import MetricsLog
from .neuron_setup import SwarmParts, build_swarm_parts, open_identity
from .protocol import IsAliveResponse, WorkRequest, WorkResponse
from .training.checkpoint import load_checkpoint, save_checkpoint
from .training.data import assign_pages
from .training.dht import MinerRecord
from .training.snapshots import ModelSnapshots
from .wandb_sink import open_wandb

logger = logging.getLogger(__name__)

LIAR_FACTOR = 0.7  # a liar claims a loss 30 % lower than its model's
FOLLOW_INTERVAL = 1.0  # seconds between catch-ups of miners that do not train


class MinerStopped(RuntimeError):
    """The miner is shutting down or not ready to answer."""


class Miner:
    """Composes the swarm trainer, the page stream, the endpoint and the chain for one miner."""

    def __init__(self, config: SimpleNamespace):
        self.config = config
        self.behaviour = getattr(config.neuron, "behaviour", "honest")
        self.state_dir = state_dir(config)
        self.metrics = MetricsLog(self.state_dir / "metrics.jsonl")
        self.stop_event = threading.Event()
        self.priority_pages: list[int] = []
        self._pages_lock = threading.Lock()
        self.snapshots: Optional[ModelSnapshots] = None
        self.identity = None if config.neuron.swarm_only else open_identity(config)
        self.uid = self.identity.uid if self.identity else config.neuron.uid
        sink = open_wandb(config, "miner", self.identity.hotkey if self.identity else "swarm", self.state_dir)
        if sink is not None:
            self.metrics.sinks.append(sink)
        self.parts: Optional[SwarmParts] = None
        self.server = None
        self.step = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        install_stop_handlers(self.stop_event)
        try:
            if self.behaviour == "dead":
                return self._run_dead()
            self.parts = build_swarm_parts(self.config, self.metrics)
            install_stop_handlers(self.stop_event)  # hivemind's averagers set SIGINT to "ignore" in this process
            self.snapshots = ModelSnapshots(self.parts.model, keep=1)
            self._resume()
            self._start_endpoint()
            self._join_swarm()
            self._loop()
            return 0
        finally:
            self._shutdown()

    def _run_dead(self) -> int:
        """A miner that registered and published an endpoint, then never answers (crashed, unplugged)."""
        if self.identity is not None:
            self.identity.publish_endpoint(port=self.config.axon.port or _unused_port())
        self.metrics.write("start", behaviour="dead", uid=self.uid)
        self.stop_event.wait()
        return 0

    def _resume(self) -> None:
        parts = self.parts
        state = load_checkpoint(self.state_dir, expect=parts.identity_fields)
        if state is not None:
            parts.trainer.restore(state)
            logger.info("resumed from checkpoint at epoch %d", parts.trainer.local_epoch)

    def _start_endpoint(self) -> None:
        if self.identity is None:
            return
        from .transport import build_app, serve_in_thread  # the HTTP stack only where it is served

        app = build_app(self_hotkey=self.identity.hotkey, authorize=self.identity.authorize_validator,
                        handlers=self)
        self.server = serve_in_thread(app, self.config.axon.ip, self.config.axon.port)
        self.identity.publish_endpoint(port=self.server.port)

    def _join_swarm(self) -> None:
        parts = self.parts
        parts.trainer.catch_up()
        self._snapshot()
        self._publish_record()
        if self.config.neuron.wait_for_peers:
            logger.info("waiting for %d miners of run %s", self.config.neuron.wait_for_peers, self.config.neuron.run_id)
            parts.records.wait_for(self.config.neuron.wait_for_peers, timeout=self.config.dht.bootstrap_timeout)
        self.metrics.write("start", behaviour=self.behaviour, uid=self.uid, peer_id=parts.peer_id,
                           params=parts.num_params, epoch=parts.trainer.local_epoch)

    def _shutdown(self) -> None:
        self.stop_event.set()
        if self.server is not None:
            self.server.stop()
        if self.parts is not None:
            if self.behaviour in ("honest", "liar") and self.step > 0:
                self._save()
            self.parts.close()
        if self.identity is not None:
            self.identity.close()
        self.metrics.write("stop", step=self.step)
        self.metrics.close()

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.behaviour in ("lazy", "copycat", "stale"):
            return self._follow()
        trainer, cfg = self.parts.trainer, self.config.neuron
        batches = self._batches()
        window_start, window_samples, losses = time.monotonic(), 0, []
        while not self.stop_event.is_set():
            report = trainer.train_batch(next(batches))
            self.step += 1
            if report.epoch_changed:
                self._snapshot()
            if report.skipped:
                self.metrics.write("skip", step=self.step, skipped=trainer.skipped_batches)
                continue
            window_samples += report.samples
            losses.append(report.loss)
            rate = window_samples / max(time.monotonic() - window_start, 1e-9)
            self.metrics.write("step", step=self.step, loss=report.loss, samples_per_s=rate,
                               epoch=report.epoch, global_epoch=trainer.global_epoch, peers=trainer.num_peers)
            if report.epoch_changed:
                self._on_epoch(report, sum(losses) / len(losses), rate)
                window_start, window_samples, losses = time.monotonic(), 0, []
            if (cfg.max_epochs and trainer.local_epoch >= cfg.max_epochs) or (cfg.max_steps and self.step >= cfg.max_steps):
                logger.info("reached the configured limit (epoch %d, step %d); stopping", trainer.local_epoch, self.step)
                break

    def _follow(self) -> None:
        """Miners that do not train: lazy and copycat follow the swarm's model, stale keeps its first one."""
        while not self.stop_event.wait(FOLLOW_INTERVAL):
            if self.behaviour == "stale":
                continue
            if self.parts.trainer.catch_up():
                self._snapshot()

    def _snapshot(self) -> None:
        trainer = self.parts.trainer
        self.snapshots.add(trainer.local_epoch, trainer.shared_state())

    def _on_epoch(self, report, mean_loss: float, rate: float) -> None:
        trainer = self.parts.trainer
        logger.info("epoch %d | step %d | loss %.4f | %.1f samples/s | peers %d | averaged with %s",
                    report.epoch, self.step, mean_loss, rate, trainer.num_peers, report.group_size)
        self.metrics.write("epoch", epoch=report.epoch, step=self.step, loss=mean_loss, samples_per_s=rate,
                           group_size=report.group_size, peers=trainer.num_peers,
                           samples_trained=trainer.samples_trained,
                           # cumulative; differences between epochs split wall time into compute and network
                           **trainer.timing.as_fields())
        self._publish_record()
        every = self.config.neuron.checkpoint_every
        if every and report.epoch % every == 0:
            self._save()

    def _save(self) -> None:
        path = save_checkpoint(self.state_dir, {**self.parts.trainer.state(), **self.parts.identity_fields})
        self.metrics.write("checkpoint", epoch=self.parts.trainer.local_epoch, path=str(path))

    def _publish_record(self) -> None:
        trainer = self.parts.trainer
        self.parts.records.publish(MinerRecord(peer_id=self.parts.peer_id, uid=self.uid, epoch=trainer.local_epoch,
                                               samples_trained=trainer.samples_trained, time=time.time()))

    def _batches(self) -> Iterator[torch.Tensor]:
        """Sequences from the pages validators asked about first, then from this uid's own assignment."""
        source, cfg = self.parts.source, self.config
        batch_size, pending, round_ = cfg.neuron.batch_size, [], 0
        uid = self.uid or 0
        while True:
            with self._pages_lock:
                page_ids, self.priority_pages = self.priority_pages, []
            if not page_ids:
                page_ids = assign_pages(uid, round_, cfg.data.seed, pages_per_uid=cfg.neuron.pages_per_round,
                                        num_pages=source.num_pages)
                round_ += 1
            for page_id in page_ids:
                pending.extend(source.page(page_id))
                while len(pending) >= batch_size:
                    yield torch.stack(pending[:batch_size])
                    pending = pending[batch_size:]

    # -- answering validators -------------------------------------------------------------------
    def is_alive(self) -> IsAliveResponse:
        epoch = self.snapshots.latest_epoch() if self.snapshots else None
        return IsAliveResponse(version=__version__, protocol=PROTOCOL_VERSION, hotkey=self.identity.hotkey,
                               peer_id=self.parts.peer_id if self.parts else "", epoch=epoch or 0, uid=self.uid)

    def work(self, req: WorkRequest, caller_hotkey: str) -> WorkResponse:
        """Called on an HTTP thread: losses on the requested pages from this epoch's model copy."""
        parts, cfg = self.parts, self.config
        epoch = self.snapshots.latest_epoch() if self.snapshots else None
        if self.stop_event.is_set() or parts is None or epoch is None:
            raise MinerStopped("miner is not ready to answer")
        if req.run_id != cfg.neuron.run_id:
            raise ValueError(f"this miner trains run {cfg.neuron.run_id!r}, not {req.run_id!r}")
        page_ids = list(req.pages)
        if self.behaviour == "copycat":
            # Returns what the copied miner answers: the losses on *its* pages for this round.
            page_ids = assign_pages(cfg.neuron.copy_uid, req.round, cfg.data.seed, pages_per_uid=len(req.pages),
                                    num_pages=parts.source.num_pages)
        losses = self.snapshots.losses_at(epoch, [parts.source.page(p) for p in page_ids])
        if self.behaviour == "liar":
            losses = [loss * LIAR_FACTOR for loss in losses]
        if self.behaviour in ("honest", "liar"):
            with self._pages_lock:
                self.priority_pages.extend(p for p in req.pages if p not in self.priority_pages)
        self.metrics.write("work", round=req.round, pages=page_ids, losses=losses, epoch=epoch,
                           validator=caller_hotkey)
        return WorkResponse(run_id=req.run_id, round=req.round, epoch=epoch, peer_id=parts.peer_id,
                            losses=losses, samples_trained=parts.trainer.samples_trained)


def _unused_port() -> int:
    """A port nothing listens on (for a miner that publishes an endpoint it never serves)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
