"""DiLoCo training: many local AdamW steps, then one outer Nesterov step on the averaged pseudo-gradient.

Every peer holds the swarm's global parameters θ_global (the state of the current global epoch,
identical on every peer) and a local copy of the model that it trains with AdamW on its own batches
(`--neuron.lr`, betas (0.9, 0.95), `--neuron.weight_decay`, the local gradient clipped to
`--neuron.grad_clip`). At the end of a round each peer computes its pseudo-gradient
Δ = θ_global − θ_local, the peers all-reduce it (weighted by the samples each one trained this round),
and every peer applies the same outer step: SGD with Nesterov momentum (`--training.outer_lr` 0.7,
`--training.outer_momentum` 0.9) on θ_global with the averaged Δ as gradient. Every peer then resets
its local model to the new θ_global; one outer step is one global epoch.

Which hivemind pieces, and why:
- `hivemind.optim.progress_tracker.ProgressTracker` (prefix = run id) counts the samples each peer
  trained in the current epoch and publishes them as the signed `<run_id>_progress` records the
  validator reads as evidence of contribution, exactly as in swarm mode. Its global epoch is the
  highest epoch any training peer reports.
- One `hivemind.averaging.DecentralizedAverager` (`PseudoGradientAverager`, prefix
  `<run_id>_diloco`) whose averaged tensors are fp32 pseudo-gradient buffers, one per parameter.
  The same averager serves this peer's state to joiners (`get_current_state`: θ_global, the outer
  momentum buffers and the epoch, uncompressed) and downloads it (`load_state_from_peers`), with
  the epoch as state-sharing priority so joiners load from the most advanced peer.
  `TrainingStateAverager` was not used: it averages *parameters* and optimizer statistics (and
  would need a second, gradient averager next to it, as `hivemind.Optimizer` has); in DiLoCo the
  only thing to average is the pseudo-gradient, and every peer applies the same outer step, so
  one averager over the Δ buffers is all the traffic a round needs.
- hivemind's butterfly all-reduce lets every member add a *delta* (average − own part) to its own
  buffer, compressed relative to what *it* sent, and it silently keeps the local part of a reducer
  that failed. Both leave peers with slightly (compression) or grossly (failure) different
  averages, so their θ_global would drift apart. `ConsensusAllReduceRunner` (`consensus_averager.py`) changes two things:
  a reducer sends back the averaged part itself, compressed once, and uses the decompressed bytes
  it sent for its own part too, so every member of the group decodes the very same values; and a
  round in which any part failed is an error for that peer (it loads the state from peers rather
  than stepping with a partial average). With `--neuron.grad_compression fp16|uint8` the peers
  therefore still end with bit-identical θ_global; only the average itself is quantised.

When a round happens (sizing): by samples, as in swarm mode. An outer round starts when the swarm's
samples for the epoch reach `--neuron.target_batch_size` (ProgressTracker's `ready_to_update_epoch`,
which all peers read from the same DHT records and so reach at about the same moment), or when this
peer has taken `--training.inner_steps` (H) local steps in the round, whichever comes first; H is a
cap for peers much faster than the rest (it only binds when H·batch_size is below the target), and a
peer that reached it waits in matchmaking for the others. A fixed H alone was not used as the
trigger because it is a private count: peers of different speed, or one that joined mid-epoch,
would start matchmaking at different moments and the first would time out waiting.

Rules that keep θ_global identical on every peer:
- a peer steps alone only when no other peer of its epoch publishes progress (checked in the DHT
  right before the round); if a round with partners fails, it does not step, keeps its inner work
  and retries, and if the swarm moved on meanwhile it loads θ_global from a peer;
- the group all-gathers each member's epoch; a group whose members disagree discards the round
  (every member sees the same gathered data, so all decide the same) and members behind load state;
- a non-finite loss or gradient is skipped and counted before the inner step, and a non-finite
  pseudo-gradient is replaced by zeros with weight 0, so nothing non-finite reaches the averaging;
- checkpoints (`state()["model"]`), `shared_state()` (the epoch snapshots miners answer from and
  validators recompute with), `page_losses` and the state served to joiners are θ_global, never the
  half-trained inner weights; `model` is the local model, equal to θ_global right after every outer
  step and after `catch_up()` (and always on a peer that never trains, such as a validator's).

Bytes per round: with P parameters, a group of N peers and b bytes per value on the wire (4 none,
2 fp16, about 1 uint8), each peer sends its (N−1)/N·P values to their reducers and, as a reducer of
P/N values, returns the average of its part to the N−1 others: about 2·(N−1)/N·P·b bytes sent and
as many received per peer per outer round, plus matchmaking. A joiner downloads 8·P bytes once
(θ_global and the momentum, fp32). Swarm mode moves the same all-reduce volume per global epoch,
but its epoch is one optimizer step; here it is H inner steps.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.compression import NoCompression
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from .consensus_averager import PseudoGradientAverager
from .progress import read_peer_progress
from .swarm import COMPRESSION, ClippedAdamW, StepReport, SwarmSettings, loss_and_gradients, page_losses
from .timing import TimeSplit, communication

logger = logging.getLogger(__name__)

STATE_FORMAT = "diloco-1"
LOAD_STATE_ATTEMPTS = 3
CATCH_UP_RETRY_SECONDS = 5.0  # a peer that could not load the swarm's state retries this often


@dataclass(frozen=True)
class DiLoCoSettings(SwarmSettings):
    inner_steps: int = 100  # H: at most this many local steps per round before waiting for the round (0: no cap)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9


# --- the trainer ---------------------------------------------------------------------------------------
class DiLoCoTrainer:
    """One peer's side of DiLoCo training; the same interface as `SwarmTrainer`."""

    def __init__(self, model: torch.nn.Module, dht: hivemind.DHT, settings: DiLoCoSettings, device: torch.device,
                 progress_key: Optional[RSAPrivateKey] = None):
        """`progress_key` signs this peer's progress records (default: the process-wide key, as hivemind
        does); only several peers in one process, as in tests, need keys of their own."""
        if settings.compression not in COMPRESSION:
            raise ValueError(f"unknown gradient compression {settings.compression!r}; use {', '.join(COMPRESSION)}")
        if settings.inner_steps < 0 or not settings.outer_lr > 0 or not 0 <= settings.outer_momentum < 1:
            raise ValueError("DiLoCo needs inner_steps >= 0, outer_lr > 0 and 0 <= outer_momentum < 1")
        self.settings, self.dht, self.device = settings, dht, device
        # θ_global lives on the CPU, next to the buffers hivemind all-reduces; the outer step runs there.
        self.global_model = copy.deepcopy(model).to("cpu")
        self.model = model.to(device)
        self._local_params = [param for _, param in self.model.named_parameters()]
        self._global_params = [param for _, param in self.global_model.named_parameters()]
        self.samples_trained = 0
        self.skipped_batches = 0
        self.discarded_rounds = 0  # rounds that failed, were thrown away, or had a non-finite own Δ
        self.last_group_size: Optional[int] = None
        self._epoch = 0
        self._round_samples = 0
        self._round_steps = 0
        self._next_catch_up_try = 0.0
        self._state_lock = threading.RLock()
        self._scheduled: Optional[StepControl] = None  # matchmaking started ahead of the round (see _schedule_round)
        self._scheduled_epoch = -1
        self.timing = TimeSplit()  # the DHT read, the all-reduce with its wait for peers, state loading: communication

        self.inner_optimizer = ClippedAdamW(self._local_params, lr=settings.lr, betas=(0.9, 0.95),
                                            weight_decay=settings.weight_decay, max_grad_norm=settings.grad_clip)
        momentum = settings.outer_momentum
        self.outer_optimizer = torch.optim.SGD(self._global_params, lr=settings.outer_lr, momentum=momentum,
                                               nesterov=momentum > 0)
        if momentum > 0:  # explicit zero buffers: the same first step as torch's lazy init, and shareable state
            for param in self._global_params:
                self.outer_optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)

        self.tracker = ProgressTracker(dht=dht, prefix=settings.run_id, target_batch_size=settings.target_batch_size,
                                       private_key=progress_key, start=True)
        try:
            self.averager = PseudoGradientAverager(
                [torch.zeros_like(param) for param in self._global_params], dht,
                prefix=f"{settings.run_id}_diloco", start=False,
                min_matchmaking_time=settings.matchmaking_time,
                request_timeout=min(3.0, settings.matchmaking_time / 2),
                allreduce_timeout=settings.averaging_timeout,
                # per-chunk patience in the all-reduce and in state downloads (hivemind's default, the
                # request timeout, is too short for a busy peer to start streaming θ_global)
                next_chunk_timeout=max(5.0, settings.averaging_timeout / 3),
                compression=COMPRESSION[settings.compression](),
                state_compression=NoCompression(),  # joiners need θ_global exactly
            )
            self.averager.state_source = self._state_for_peers
            self.averager.run_in_background(await_ready=True)
        except BaseException:
            self.tracker.shutdown(5.0)
            raise

    # -- progress -------------------------------------------------------------------------------
    @property
    def local_epoch(self) -> int:
        return self._epoch

    @property
    def global_epoch(self) -> int:
        return self.tracker.global_epoch

    @property
    def num_peers(self) -> int:
        return self.tracker.global_progress.num_peers

    @property
    def global_samples(self) -> int:
        return self.tracker.global_progress.samples_accumulated

    # -- training -------------------------------------------------------------------------------
    def catch_up(self) -> bool:
        """Load θ_global, the outer optimizer and the epoch from peers if this peer is behind; True if it loaded."""
        if self.local_epoch >= self.global_epoch:
            return False
        logger.info("behind the swarm (epoch %d < %d): loading state from peers", self.local_epoch, self.global_epoch)
        return self._load_state_from_peers()

    def train_batch(self, inputs: torch.Tensor) -> StepReport:
        """One inner step on `inputs` [batch, seq_len]; may end the round with an outer step (a global epoch)."""
        with self.timing.step():
            return self._train_batch(inputs)

    def _train_batch(self, inputs: torch.Tensor) -> StepReport:
        epoch_before = self.local_epoch
        loss, problem = loss_and_gradients(self.model, inputs, self.device)
        if problem:
            return self._skip(problem, epoch_before)
        self.inner_optimizer.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        samples = int(inputs.shape[0])
        self.samples_trained += samples
        self._round_samples += samples
        self._round_steps += 1
        self.tracker.report_local_progress(self._epoch, self._round_samples)

        group_size = None
        if self.global_epoch > self._epoch:
            # the swarm finished this round without us: our inner work cannot join it any more
            if time.monotonic() >= self._next_catch_up_try:
                logger.info("the swarm is at epoch %d, this peer at %d: loading its state", self.global_epoch,
                            self._epoch)
                self._load_state_from_peers()
        elif self._round_due():
            with self.tracker.performance_ema.pause():  # the round's wait is not training speed (ETA estimates)
                group_size = self._outer_round()
        else:
            self._schedule_round()
        changed = self.local_epoch != epoch_before
        return StepReport(loss=float(loss.item()), samples=samples, skipped=False, epoch=self.local_epoch,
                          epoch_changed=changed, group_size=group_size if changed else None)

    def _skip(self, reason: str, epoch: int) -> StepReport:
        self.inner_optimizer.zero_grad(set_to_none=True)
        self.skipped_batches += 1
        logger.warning("skipped a batch (%s); %d skipped so far", reason, self.skipped_batches)
        return StepReport(loss=None, samples=0, skipped=True, epoch=epoch, epoch_changed=False, group_size=None)

    def _round_due(self) -> bool:
        cap = self.settings.inner_steps
        return self.tracker.ready_to_update_epoch or bool(cap and self._round_steps >= cap)

    # -- the outer round ------------------------------------------------------------------------
    def _schedule_round(self) -> None:
        """Start matchmaking for this round while the last inner steps still run, as swarm mode does.

        Forming a group takes `matchmaking_time`. Started only once the round is due, every peer
        would sit that long idle each round (at 15 s and H = 100 tiny-model steps, ~13 % of wall
        time). Started when the swarm's estimated end of the round is that close, the group forms
        meanwhile and waits for the trigger `_average` pulls when the round is due.
        """
        if self._scheduled is not None and not self._scheduled.done():
            return
        if self.tracker.global_progress.num_peers <= 1:
            return  # alone: nobody to match with, and no polling the DHT for nobody
        now, wait = get_dht_time(), self.settings.matchmaking_time
        if self.tracker.estimated_next_update_time - now > wait:
            return
        self._scheduled = self.averager.step(
            gather=dict(epoch=self._epoch), scheduled_time=now + wait, timeout=wait + self.settings.averaging_timeout,
            allow_retries=True, require_trigger=True, wait=False)
        self._scheduled_epoch = self._epoch

    def _take_scheduled(self, epoch: int) -> Optional[StepControl]:
        """The matchmaking started ahead for `epoch`, if it is still usable; any other is cancelled."""
        control = self._scheduled
        if control is not None and self._scheduled_epoch == epoch and not control.done():
            self._scheduled = None
            return control
        self._cancel_scheduled()
        return None

    def _cancel_scheduled(self) -> None:
        """Drop matchmaking started ahead, so that a group formed with this peer does not wait for it."""
        control, self._scheduled = self._scheduled, None
        if control is not None and not control.done():
            control.cancel()

    @communication
    def _partners(self) -> int:
        """Other peers training at this peer's epoch or later.

        Read from the DHT now, since the tracker's cache may predate a peer that just joined; the
        cache still counts, so that a failed read never makes this peer step alone (and fork θ_global).
        """
        me = self.dht.peer_id.to_base58()
        progress = read_peer_progress(self.dht, self.settings.run_id)
        fresh = sum(1 for peer, record in progress.items()
                    if peer != me and not record.client_mode and record.epoch >= self._epoch)
        return max(fresh, self.tracker.global_progress.num_peers - 1)

    def _outer_round(self) -> Optional[int]:
        """Average Δ with the peers of this epoch and take the outer step; the group size, or None if no step."""
        epoch = self._epoch
        weight = float(self._round_samples)
        with torch.no_grad(), self.averager.get_tensors() as buffers:
            for buffer, global_param, local_param in zip(buffers, self._global_params, self._local_params):
                buffer.copy_(global_param)
                buffer.sub_(local_param.detach().to("cpu", torch.float32))
            finite = all(bool(torch.isfinite(buffer).all()) for buffer in buffers)
            if not finite:
                for buffer in buffers:
                    buffer.zero_()
        if not finite:
            logger.warning("non-finite pseudo-gradient at epoch %d: contributing zeros with weight 0", epoch)
            self.discarded_rounds += 1
            weight = 0.0
            self._reset_local_model()

        if self._partners() == 0:
            group_size = 1  # alone in the run: the outer step on this peer's own Δ
        else:
            gathered = self._average(weight, epoch)
            if gathered is None:
                self.discarded_rounds += 1
                if self.global_epoch > epoch:
                    self._load_state_from_peers()
                return None  # no step; keep the inner work and try again after the next batch
            epochs = {value.get("epoch") if isinstance(value, dict) else None for value in gathered.values()}
            if epochs != {epoch}:
                self.discarded_rounds += 1
                logger.warning("the averaging group mixed epochs %s; every member discards this round", epochs)
                ahead = [e for e in epochs if isinstance(e, int) and e > epoch]
                if ahead:
                    self._load_state_from_peers()
                return None
            group_size = len(gathered)

        with torch.no_grad(), self._state_lock:
            with self.averager.get_tensors() as buffers:
                averaged = [buffer.clone() for buffer in buffers]
            if not all(bool(torch.isfinite(delta).all()) for delta in averaged):
                self.discarded_rounds += 1
                logger.warning("the averaged pseudo-gradient is not finite; discarding the round")
                self._reset_local_model()
                self._round_samples = self._round_steps = 0
                self.tracker.report_local_progress(self._epoch, 0)
                return None
            self.outer_step(averaged)
            self._epoch = epoch + 1
        self._start_epoch(self._epoch)
        self.last_group_size = group_size
        logger.info("outer step %d: averaged with %d peer(s), ~%.1f MB sent", self._epoch, group_size,
                    self.bytes_per_round(group_size) / 1e6)
        return group_size

    @communication
    def _average(self, weight: float, epoch: int) -> Optional[dict]:
        """One all-reduce of the Δ buffers; the gathered {peer: {"epoch": ...}} or None if it failed."""
        settings = self.settings
        control = self._take_scheduled(epoch)
        if control is not None:  # the group is (being) formed already: set this round's weight and go
            control.weight = weight
            control.allow_allreduce()
        else:
            control = self.averager.step(weight=weight, gather=dict(epoch=epoch), timeout=settings.averaging_timeout,
                                         allow_retries=True, wait=False)
        deadline = time.monotonic() + 2 * settings.averaging_timeout + settings.matchmaking_time
        while True:
            try:
                return control.result(timeout=0.5)
            except TimeoutError:
                pass
            except BaseException as exc:  # matchmaking or all-reduce failed; hivemind already logged why
                logger.warning("outer round %d failed: %r", epoch, exc)
                return None
            behind = self.global_epoch > epoch and control.stage in (AveragingStage.IDLE,
                                                                     AveragingStage.LOOKING_FOR_GROUP)
            if behind or time.monotonic() > deadline:
                logger.warning("outer round %d abandoned (%s)", epoch,
                               "the swarm moved on without this peer" if behind else "timed out")
                control.cancel()
                return None

    @torch.no_grad()
    def outer_step(self, averaged_deltas: Sequence[torch.Tensor]) -> None:
        """Nesterov SGD on θ_global with the averaged Δ as gradient; then the local model restarts from it."""
        for param, delta in zip(self._global_params, averaged_deltas):
            param.grad = delta
        self.outer_optimizer.step()
        for param in self._global_params:
            param.grad = None
        self._reset_local_model()

    @torch.no_grad()
    def _reset_local_model(self) -> None:
        for local_param, global_param in zip(self._local_params, self._global_params):
            local_param.copy_(global_param.to(local_param.device))

    def _start_epoch(self, epoch: int) -> None:
        self._cancel_scheduled()  # a group matched for another epoch must not wait for this peer
        self._round_samples = self._round_steps = 0
        with self.tracker.pause_updates():
            self.tracker.update_epoch(epoch)
        self.averager.state_sharing_priority = epoch

    def bytes_per_round(self, group_size: int) -> int:
        """Approximate bytes this peer sends in one all-reduce of Δ with `group_size` peers (0 alone)."""
        if group_size <= 1:
            return 0
        per_value = {"none": 4, "fp16": 2, "uint8": 1}[self.settings.compression]
        values = sum(param.numel() for param in self._global_params)
        return int(2 * (group_size - 1) / group_size * values * per_value)

    # -- state shared with and loaded from peers ------------------------------------------------
    def _momentum_buffers(self) -> list[torch.Tensor]:
        if self.settings.outer_momentum == 0:
            return []
        return [self.outer_optimizer.state[param]["momentum_buffer"] for param in self._global_params]

    def _state_for_peers(self) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """What joiners download: θ_global, the outer momentum and the epoch (called on hivemind's thread)."""
        with torch.no_grad(), self._state_lock:
            tensors = [param.detach().clone() for param in self._global_params]
            tensors += [buffer.detach().clone() for buffer in self._momentum_buffers()]
            metadata = dict(format=STATE_FORMAT, epoch=self._epoch, num_params=len(self._global_params))
        return metadata, tensors

    @communication
    def _load_state_from_peers(self) -> bool:
        """Download θ_global, momentum and epoch from the most advanced peer; True if loaded."""
        self._next_catch_up_try = time.monotonic() + CATCH_UP_RETRY_SECONDS
        expected = len(self._global_params) + len(self._momentum_buffers())
        for attempt in range(1, LOAD_STATE_ATTEMPTS + 1):
            try:
                loaded = self.averager.load_state_from_peers(timeout=self.settings.load_state_timeout)
            except BaseException as exc:
                logger.warning("loading state from peers failed (attempt %d): %r", attempt, exc)
                continue
            if loaded is None:
                logger.warning("no peer could send its state (attempt %d)", attempt)
                continue
            metadata, tensors = loaded
            if not isinstance(metadata, dict) or metadata.get("format") != STATE_FORMAT:
                logger.warning("a peer sent state of another format: %r", metadata)
                continue
            epoch = metadata.get("epoch")
            shapes_ok = len(tensors) == expected and all(
                tensor.shape == ref.shape for tensor, ref in zip(tensors, self._global_params + self._momentum_buffers()))
            if not isinstance(epoch, int) or epoch < self._epoch or not shapes_ok:
                logger.warning("refusing a peer's state (epoch %r, this peer %d, %d tensors of %d expected)", epoch,
                               self._epoch, len(tensors), expected)
                continue
            with torch.no_grad(), self._state_lock:
                count = len(self._global_params)
                for param, value in zip(self._global_params, tensors[:count]):
                    param.copy_(value)
                for buffer, value in zip(self._momentum_buffers(), tensors[count:]):
                    buffer.copy_(value)
                self._reset_local_model()
                self._epoch = epoch
            self.inner_optimizer.zero_grad(set_to_none=True)
            self._start_epoch(epoch)
            logger.info("loaded the swarm's state at epoch %d", epoch)
            return True
        return False

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def page_losses(self, pages: Sequence[torch.Tensor]) -> list[float]:
        """Mean loss of θ_global on each page: the state every peer shares for this epoch, as a validator has it."""
        with self._state_lock:
            if self.device.type == "cpu":
                return page_losses(self.global_model, pages, self.device)
            return self._page_losses_on_device(pages)

    def _page_losses_on_device(self, pages: Sequence[torch.Tensor]) -> list[float]:
        """θ_global through the local model's module on its device, without touching the local weights."""
        state = {name: tensor.to(self.device) for name, tensor in self.global_model.named_parameters()}
        state.update({name: tensor.to(self.device) for name, tensor in self.global_model.named_buffers()})
        was_training = self.model.training
        self.model.eval()
        try:
            losses = []
            for page in pages:
                page = page.to(self.device)
                out = torch.func.functional_call(self.model, state, args=(), kwargs=dict(input_ids=page, labels=page))
                loss = out.loss.float().item()
                losses.append(loss if math.isfinite(loss) else float("nan"))
            return losses
        finally:
            self.model.train(was_training)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """A private CPU copy of θ_global: the model every peer holds this epoch (what validators reproduce)."""
        with self._state_lock:
            return {k: v.detach().to("cpu", copy=True) for k, v in self.global_model.state_dict().items()}

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """θ_global (as "model"), both optimizers and the epoch; what the miner checkpoints."""
        with self._state_lock:
            return {
                "trainer": "diloco",
                "model": self.shared_state(),
                "optimizer": {"inner": copy.deepcopy(self.inner_optimizer.state_dict()),
                              "outer": copy.deepcopy(self.outer_optimizer.state_dict())},
                "local_epoch": self._epoch,
                "samples_trained": self.samples_trained,
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from `state()`: the local model restarts from the saved θ_global (the round in flight is lost)."""
        with torch.no_grad(), self._state_lock:
            self.global_model.load_state_dict(state["model"])
            if state.get("trainer") == "diloco":
                self.outer_optimizer.load_state_dict(state["optimizer"]["outer"])
                self.inner_optimizer.load_state_dict(state["optimizer"]["inner"])
            else:
                logger.warning("checkpoint from another training mode: resuming its weights only")
            if self.settings.outer_momentum > 0:
                for param in self._global_params:  # a checkpoint taken before the first step has no buffers
                    self.outer_optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
            self._reset_local_model()
            self._epoch = int(state.get("local_epoch", 0))
        self.samples_trained = int(state.get("samples_trained", 0))
        self._start_epoch(self._epoch)

    def shutdown(self) -> None:
        self._cancel_scheduled()
        try:
            self.tracker.shutdown(5.0)
        finally:
            self.averager.shutdown()
