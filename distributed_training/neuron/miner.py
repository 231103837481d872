"""The miner: trains in the swarm, and answers validators about the pages they assign it.

The live model belongs to the training loop alone. Validators are answered on the HTTP server's
threads from a copy of the model taken at the start of the current global epoch (the state all
peers share until the next all-reduce), so an answer never waits for a training step that may
be blocked in an all-reduce, and never sees half-applied parameters.

The cheating miners of the local swarm (`localnet/cheats.py`) are subclasses that override the
hooks below (`train`, `answer_pages`, `answer_losses`); this class has no behaviour switch.
"""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace
from typing import Iterator, Optional

import torch

from .. import PROTOCOL_VERSION, __version__
from ..config import state_dir
from ..data.pages import batches, training_pages
from ..files import remove_stale_temps
from ..logs import MetricsLog
from ..ops.wandb_sink import open_wandb
from ..protocol import IsAliveResponse, WorkRequest, WorkResponse
from ..swarm.dht import MinerRecord
from ..training.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from ..training.snapshots import ModelSnapshots
from ..swarm.guard import board_ignores
from ..training.trainer import StepReport, ban_board
from .entry import close_in_order, install_stop_handlers
from .setup import NeuronParts, build_neuron_parts, open_identity

logger = logging.getLogger(__name__)

# epochs of the shared model a miner keeps to answer from: its newest and the one before, for a
# validator whose newest is an epoch behind (one more copy of the model in host memory)
ANSWER_EPOCHS = 2


class Miner:
    """Composes the trainer, the page stream, the endpoint and the chain for one miner."""

    kind = "honest"  # a label in the metrics; the local swarm's cheats set their own

    def __init__(self, config: SimpleNamespace):
        self.config = config
        self.state_dir = state_dir(config)
        remove_stale_temps(self.state_dir)  # what a write interrupted by a kill left behind
        self.metrics = MetricsLog(self.state_dir / "metrics.jsonl")
        self.stop_event = threading.Event()
        self.asked_pages: list[int] = []  # pages validators asked about, trained on next
        self._pages_lock = threading.Lock()
        self.snapshots: Optional[ModelSnapshots] = None
        self.identity = None if config.neuron.swarm_only else open_identity(config)
        self.uid = self.identity.uid if self.identity else config.neuron.uid
        sink = open_wandb(config, "miner", self.identity.hotkey if self.identity else "swarm", self.state_dir)
        if sink is not None:
            self.metrics.sinks.append(sink)
        self.parts: Optional[NeuronParts] = None
        self.server = None
        self.step = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        install_stop_handlers(self.stop_event)
        try:
            self.parts = build_neuron_parts(self.config, self.metrics, self.identity)
            install_stop_handlers(self.stop_event)  # hivemind's averagers set SIGINT to "ignore" in this process
            self.snapshots = ModelSnapshots(self.parts.model, keep=ANSWER_EPOCHS)
            self._resume()
            self._start_endpoint()
            self._join_swarm()
            self.train()
            return 0
        finally:
            self._shutdown()

    def _resume(self) -> None:
        parts = self.parts
        state = load_checkpoint(self.state_dir, spec=parts.spec)
        if state is not None:
            parts.trainer.restore(state)
            logger.info("resumed from checkpoint at epoch %d", parts.trainer.local_epoch)

    def _start_endpoint(self) -> None:
        if self.identity is None:
            return
        from ..transport import build_app, serve_in_thread  # the HTTP stack only where it is served

        app = build_app(self_hotkey=self.identity.hotkey, authorize=self.identity.authorize_validator,
                        handlers=self)
        self.server = serve_in_thread(app, self.config.axon.ip, self.config.axon.port)
        self.identity.publish_endpoint(port=self.server.port)

    def _join_swarm(self) -> None:
        parts = self.parts
        parts.trainer.catch_up()
        self.snapshot()
        self._publish_record()
        self.metrics.write("start", kind=self.kind, uid=self.uid, peer_id=parts.peer_id,
                           params=parts.num_params, epoch=parts.trainer.local_epoch, spec=parts.spec.digest)
        if self.config.neuron.wait_for_peers:
            logger.info("waiting for %d miners of run %s", self.config.neuron.wait_for_peers, self.config.neuron.run_id)
            parts.records.wait_for(self.config.neuron.wait_for_peers, timeout=self.config.dht.bootstrap_timeout,
                                   bindings=parts.trainer.settings.bound)

    def _shutdown(self) -> None:
        self.stop_event.set()
        parts, server, identity = self.parts, self.server, self.identity
        close_in_order(server and server.stop, parts and self.step > 0 and self._save, parts and parts.close,
                       identity and identity.close)
        self.metrics.write("stop", step=self.step)
        self.metrics.close()

    # -- training -------------------------------------------------------------------------------
    def train(self) -> None:
        """Train until stopped or a configured limit: one batch, one step, an epoch now and then."""
        trainer, cfg = self.parts.trainer, self.config.neuron
        batches = self._batches()
        window_start, window_samples, losses = time.monotonic(), 0, []
        while not self.stop_event.is_set():
            report = trainer.train_batch(next(batches))
            self.step += 1
            if report.epoch_changed:
                self.snapshot()
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

    def snapshot(self) -> None:
        """Remember this epoch's shared model: what validators are answered from."""
        trainer = self.parts.trainer
        self.snapshots.add(trainer.local_epoch, trainer.shared_state())

    def _on_epoch(self, report: StepReport, mean_loss: float, rate: float) -> None:
        trainer = self.parts.trainer
        logger.info("epoch %d | step %d | loss %.4f | %.1f samples/s | peers %d | averaged with %s",
                    report.epoch, self.step, mean_loss, rate, trainer.num_peers, report.group_size)
        self.metrics.write("epoch", epoch=report.epoch, step=self.step, loss=mean_loss, samples_per_s=rate,
                           group_size=report.group_size, group=report.group, peers=trainer.num_peers,
                           # the members whose parts this peer's reducer still counts (a banned one's count for nothing)
                           counted=[p for p in report.group or () if not board_ignores(ban_board(), p)],
                           samples_trained=trainer.samples_trained,
                           # cumulative; differences between epochs split wall time into compute and network
                           **trainer.timing.as_fields())
        self._publish_record()
        self.parts.spec_records.refresh()
        self.parts.renew_binding()
        every = self.config.neuron.checkpoint_every
        if every and report.epoch % every == 0:
            self._save()

    def _save(self) -> None:
        """A checkpoint; one that cannot be written (full disk, no permission) is said, and training goes on."""
        epoch = self.parts.trainer.local_epoch
        try:
            path = save_checkpoint(self.state_dir, {**self.parts.trainer.state(), "spec": self.parts.spec.as_dict()})
        except CheckpointWriteError as exc:
            logger.error("%s; training goes on without a checkpoint of epoch %d (the last good one is kept)",
                         exc, epoch)
            self.metrics.write("checkpoint_failed", epoch=epoch, reason=str(exc))
            return
        self.metrics.write("checkpoint", epoch=epoch, path=str(path))

    def _publish_record(self) -> None:
        trainer = self.parts.trainer
        self.parts.records.publish(MinerRecord(peer_id=self.parts.peer_id, uid=self.uid, epoch=trainer.local_epoch,
                                               samples_trained=trainer.samples_trained, time=time.time()))

    def _take_asked_pages(self) -> list[int]:
        with self._pages_lock:
            pages, self.asked_pages = self.asked_pages, []
        return pages

    def _batches(self) -> Iterator[torch.Tensor]:
        """Sequences from the pages validators asked about first, then from this uid's own assignment.

        The next `--data.prefetch` pages are fetched in the background while earlier ones train
        (so asked pages join at the first round boundary that many pages ahead)."""
        from ..data.prefetch import read_ahead

        source, cfg = self.parts.source, self.config
        pages = training_pages(self.uid or 0, cfg.data.seed, pages_per_round=cfg.neuron.pages_per_round,
                               num_pages=source.num_pages, asked=self._take_asked_pages)
        return batches(source, read_ahead(source, pages, cfg.data.prefetch), cfg.neuron.batch_size)

    # -- answering validators -------------------------------------------------------------------
    def is_alive(self) -> IsAliveResponse:
        epoch = self.snapshots.latest_epoch() if self.snapshots else None
        return IsAliveResponse(version=__version__, protocol=PROTOCOL_VERSION, hotkey=self.identity.hotkey,
                               peer_id=self.parts.peer_id if self.parts else "", epoch=epoch or 0, uid=self.uid)

    def work(self, req: WorkRequest, caller_hotkey: str) -> WorkResponse:
        """Called on an HTTP thread: losses on the requested pages from this epoch's model copy.

        A request this miner cannot answer (not ready yet, another run id, a page id beyond its data)
        is a RequestError: a 4xx/503 with the reason and one log line, never a 500 with a traceback."""
        from ..transport.server import RequestError  # only ever called by that server

        parts, cfg = self.parts, self.config
        epoch = self._answer_epoch(req.epoch_hint) if self.snapshots else None
        if self.stop_event.is_set() or parts is None or epoch is None:
            raise RequestError("miner is not ready to answer", status=503)
        if req.run_id != cfg.neuron.run_id:
            raise RequestError(f"this miner trains run {cfg.neuron.run_id!r}, not {req.run_id!r}")
        beyond = [page for page in req.pages if page >= parts.source.num_pages]
        if beyond:
            raise RequestError(f"page id {beyond[0]} is beyond this miner's data (pages 0..{parts.source.num_pages - 1}); "
                               "miner and validator disagree on the --data.* settings")
        page_ids = self.answer_pages(req)
        losses = self.answer_losses(epoch, page_ids)
        with self._pages_lock:
            self.asked_pages.extend(p for p in req.pages if p not in self.asked_pages)
        self.metrics.write("work", round=req.round, pages=page_ids, losses=losses, epoch=epoch,
                           validator=caller_hotkey)
        return WorkResponse(run_id=req.run_id, round=req.round, epoch=epoch, peer_id=parts.peer_id,
                            losses=losses, samples_trained=parts.trainer.samples_trained)

    def _answer_epoch(self, hint: Optional[int]) -> Optional[int]:
        """The epoch whose copy answers: the validator's (`epoch_hint`, the newest model it holds) if this
        miner still holds it, else the newest. A validator that last caught up an epoch ago then checks
        against the model it has, not one it never saw."""
        held = self.snapshots.epochs()
        return hint if hint in held else (held[-1] if held else None)

    def answer_pages(self, req: WorkRequest) -> list[int]:
        """The pages whose losses the answer carries: the requested ones."""
        return list(req.pages)

    def answer_losses(self, epoch: int, page_ids: list[int]) -> list[float]:
        """This epoch's shared model's loss on each page."""
        source = self.parts.source
        return self.snapshots.losses_at(epoch, [source.page(p) for p in page_ids])
