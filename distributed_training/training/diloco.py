"""DiLoCo training: many local AdamW steps, then one outer Nesterov step on the averaged pseudo-gradient.

Every peer holds the swarm's global parameters θ_global (the state of the current global epoch,
identical on every peer) and a local copy of the model that it trains with AdamW on its own batches
(`--neuron.lr`, betas (0.9, 0.95), `--neuron.weight_decay`, the local gradient clipped to
`--neuron.grad_clip`). At the end of an epoch each peer computes its pseudo-gradient
Δ = θ_global − θ_local, the peers all-reduce it (weighted by the samples each one trained this epoch),
and every peer applies the same outer step: SGD with Nesterov momentum (`--training.outer_lr` 0.7,
`--training.outer_momentum` 0.9) on θ_global with the averaged Δ as gradient. Every peer then resets
its local model to the new θ_global; one outer step is one global epoch.

How it speaks to the swarm: through `swarm.averaging.OuterAveraging` (progress records, the
pseudo-gradient all-reduce, state for joiners); its all-reduce gives every member of a group the
very same bits even with lossy compression, and an all-reduce in which any part failed is an error for
that peer rather than a partial average (`swarm.hivemind_private.ConsensusAllReduceRunner`).

When an epoch ends (sizing): by samples, as in gradient-averaging mode. The outer all-reduce starts when the swarm's
samples for the epoch reach `--neuron.target_batch_size` (ProgressTracker's `ready_to_update_epoch`,
which all peers read from the same DHT records and so reach at about the same moment), or when this
peer has taken `--training.inner_steps` (H) local steps in the epoch, whichever comes first; H is a
cap for peers much faster than the rest (it only binds when H·batch_size is below the target), and a
peer that reached it waits in matchmaking for the others. A fixed H alone was not used as the
trigger because it is a private count: peers of different speed, or one that joined mid-epoch,
would start matchmaking at different moments and the first would time out waiting.

Rules that keep θ_global identical on every peer:
- a peer steps alone only when no other peer of its epoch publishes progress (checked in the DHT
  right before the all-reduce); if an all-reduce with partners fails, it does not step, keeps its inner work
  and retries, and if the swarm moved on meanwhile it loads θ_global from a peer;
- the group all-gathers each member's epoch; a group whose members disagree discards the all-reduce
  (every member sees the same gathered data, so all decide the same) and members behind load state;
- a non-finite loss or gradient is skipped and counted before the inner step, and a non-finite
  pseudo-gradient is replaced by zeros with weight 0, so nothing non-finite reaches the averaging;
  with `sync_every` N > 1 the skip is decided on the device (the fused inner AdamW's `found_inf`),
  and the host reads the window's losses, samples and skips once every N steps and always before
  the epoch's all-reduce, so the progress records and the all-reduce's weight count exactly the
  samples of finite steps;
- checkpoints (`state()["model"]`), `shared_state()` (the epoch snapshots miners answer from and
  validators recompute with), `page_losses` and the state served to joiners are θ_global, never the
  half-trained inner weights; `model` is the local model, equal to θ_global right after every outer
  step and after `catch_up()` (and always on a peer that never trains, such as a validator's).

Bytes per epoch: with P parameters, a group of N peers and b bytes per value on the wire (4 none,
2 fp16, about 1 uint8), each peer sends its (N−1)/N·P values to their reducers and, as a reducer of
P/N values, returns the average of its part to the N−1 others: about 2·(N−1)/N·P·b bytes sent and
as many received per peer per epoch, plus matchmaking. A joiner downloads 8·P bytes once
(θ_global and the momentum, fp32). Gradient averaging moves the same all-reduce volume per global epoch,
but its epoch is one optimizer step; here it is H inner steps.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Optional, Sequence

import torch

from ..swarm.averaging import OuterAveraging
from ..swarm.compression import BYTES_PER_VALUE
from .model import page_losses
from .step import ForwardBackward, StepTally, checked
from .trainer import DiLoCoSettings, StepReport, Trainer, cpu_state, inner_adamw

logger = logging.getLogger(__name__)

STATE_FORMAT = "diloco-1"
LOAD_STATE_ATTEMPTS = 3
CATCH_UP_RETRY_SECONDS = 5.0  # a peer that could not load the swarm's state retries this often


class DiLoCoTrainer(Trainer):
    """One peer's side of DiLoCo training."""

    def __init__(self, model: torch.nn.Module, dht: Any, settings: DiLoCoSettings, device: torch.device,
                 progress_key: Any = None):
        """`progress_key` signs this peer's progress records (see `OuterAveraging`)."""
        if settings.inner_steps < 0 or not settings.outer_lr > 0 or not 0 <= settings.outer_momentum < 1:
            raise ValueError("DiLoCo needs inner_steps >= 0, outer_lr > 0 and 0 <= outer_momentum < 1")
        super().__init__(dht, settings, device)
        # θ_global lives on the CPU, next to the buffers hivemind all-reduces; the outer step runs there.
        self.global_model = copy.deepcopy(model).to("cpu")
        self.model = model.to(device)
        self._local_params = [param for _, param in self.model.named_parameters()]
        self._global_params = [param for _, param in self.global_model.named_parameters()]
        self.discarded_epochs = 0  # all-reduces that failed or were thrown away, or had a non-finite own Δ
        self.last_group: Optional[tuple[str, ...]] = None  # peer ids of the last outer all-reduce
        self._epoch = 0
        self._epoch_samples = 0
        self._epoch_steps = 0
        self._next_catch_up_try = 0.0
        self._state_lock = threading.RLock()

        self.forward_backward = ForwardBackward(self.model, device, compile=settings.compile,
                                                micro_batch_size=settings.micro_batch_size)
        self._tally = StepTally()  # steps not yet read on the host (sync_every > 1)
        self.inner_optimizer = inner_adamw(self._local_params, settings,
                                           fused=device.type == "cuda" or settings.sync_every > 1)
        momentum = settings.outer_momentum
        self.outer_optimizer = torch.optim.SGD(self._global_params, lr=settings.outer_lr, momentum=momentum,
                                               nesterov=momentum > 0)
        if momentum > 0:  # explicit zero buffers: the same first step as torch's lazy init, and shareable state
            for param in self._global_params:
                self.outer_optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
        self.averaging = OuterAveraging(
            dht, [torch.zeros_like(param) for param in self._global_params], run_id=settings.run_id,
            target_batch_size=settings.target_batch_size, matchmaking_time=settings.matchmaking_time,
            averaging_timeout=settings.averaging_timeout, compression=settings.compression,
            state_source=self._state_for_peers, timing=self.timing, progress_key=progress_key,
            guard=settings.guard("pseudo-gradients"), robust_rule=settings.robust,
            bindings=settings.bindings,  # bound peers' progress only
            state_check=settings.state_digests, accuse=settings.accuse, excluded=settings.excluded)
        self._publish_digest()

    # -- progress -------------------------------------------------------------------------------
    @property
    def local_epoch(self) -> int:
        return self._epoch

    @property
    def tracker(self) -> Any:
        return self.averaging.tracker

    # -- training -------------------------------------------------------------------------------
    def _zero_grad(self) -> None:
        self.inner_optimizer.zero_grad(set_to_none=True)

    def _train_batch(self, inputs: torch.Tensor) -> StepReport:
        if self.settings.sync_every > 1:
            return self._train_batch_on_device(inputs)
        epoch_before = self.local_epoch
        loss, problem = checked(self.forward_backward, inputs, one_sync=self.settings.sync_every > 0)
        if problem:
            return self._skip(problem, epoch_before)
        self.inner_optimizer.step()
        self._zero_grad()
        return self._after_steps(epoch_before, loss, int(inputs.shape[0]), steps=1)

    def _train_batch_on_device(self, inputs: torch.Tensor) -> StepReport:
        """The step checked on the device; the host reads the window when it is full or the epoch needs it."""
        epoch_before = self.local_epoch
        loss, _ = self.forward_backward(inputs)
        skipped = self.inner_optimizer.checked_step(loss)
        self._zero_grad()
        self._tally.add(loss, skipped, int(inputs.shape[0]))
        cap, pending = self.settings.inner_steps, self._tally.steps
        if (pending < self.settings.sync_every and not (cap and self._epoch_steps + pending >= cap)
                and not self.averaging.epoch_due and self.global_epoch <= self._epoch):
            return StepReport(loss=None, samples=0, skipped=False, epoch=epoch_before, epoch_changed=False,
                              group_size=None, steps=0, pending=True)
        loss_value, samples, bad, steps = self._read_tally()
        return self._after_steps(epoch_before, loss_value, samples, steps=steps - bad, window=steps, skipped_steps=bad)

    def _read_tally(self) -> tuple[Optional[float], int, int, int]:
        """Read the steps counted on the device (the window's host sync) into this peer's counters."""
        loss_value, samples, bad, steps = self._tally.read()
        if bad:
            self.skipped_batches += bad
            logger.warning("skipped %d of %d batches (non-finite loss or gradient); %d skipped so far", bad, steps,
                           self.skipped_batches)
        return loss_value, samples, bad, steps

    def _after_steps(self, epoch_before: int, loss: Optional[float], samples: int, steps: int, window: int = 1,
                     skipped_steps: int = 0) -> StepReport:
        """Count finite steps' samples, report progress, and end the epoch if it is due (loss None: none was finite)."""
        self.samples_trained += samples
        self._epoch_samples += samples
        self._epoch_steps += steps
        self.averaging.report_progress(self._epoch, self._epoch_samples)

        group = None
        if self.global_epoch > self._epoch:
            # the swarm finished this epoch without us: our inner work cannot join it any more
            if time.monotonic() >= self._next_catch_up_try:
                logger.info("the swarm is at epoch %d, this peer at %d: loading its state", self.global_epoch,
                            self._epoch)
                self._load_state_from_peers()
        elif loss is not None and self._epoch_due():  # as a skipped batch, a window of them never ends an epoch
            with self.averaging.not_training_time():  # the wait for the all-reduce is not training speed
                group = self._end_epoch()
        else:
            self.averaging.schedule(self._epoch)
        changed = self.local_epoch != epoch_before
        group = group if changed else None
        return StepReport(loss=loss, samples=samples, skipped=loss is None, epoch=self.local_epoch, epoch_changed=changed,
                          group_size=None if group is None else len(group), group=group, steps=window,
                          skipped_steps=skipped_steps)

    def _close_window(self) -> None:
        """Count the steps still on the device as trained (in this epoch) before the state moves on."""
        if self._tally.steps:
            _, samples, bad, steps = self._read_tally()
            self.samples_trained += samples
            self._epoch_samples += samples
            self._epoch_steps += steps - bad

    def _epoch_due(self) -> bool:
        cap = self.settings.inner_steps
        return self.averaging.epoch_due or bool(cap and self._epoch_steps >= cap)

    # -- the end of an epoch: the outer all-reduce and step ----------------------------------------
    def _end_epoch(self) -> Optional[tuple[str, ...]]:
        """Average Δ with the peers of this epoch and take the outer step; the group's peer ids, or None if no step."""
        epoch = self._epoch
        weight = float(self._epoch_samples)
        with torch.no_grad(), self.averaging.buffers() as buffers:
            for buffer, global_param, local_param in zip(buffers, self._global_params, self._local_params):
                buffer.copy_(global_param)
                buffer.sub_(local_param.detach().to("cpu", torch.float32))
            finite = all(bool(torch.isfinite(buffer).all()) for buffer in buffers)
            if not finite:
                for buffer in buffers:
                    buffer.zero_()
        if not finite:
            logger.warning("non-finite pseudo-gradient at epoch %d: contributing zeros with weight 0", epoch)
            self.discarded_epochs += 1
            weight = 0.0
            self._reset_local_model()

        if self.averaging.partners(epoch) == 0:
            group = (self.dht.peer_id.to_base58(),)  # alone in the run: the outer step on this peer's own Δ
        else:
            gathered = self.averaging.average(weight, epoch)
            if gathered is None:
                self.discarded_epochs += 1
                if self.global_epoch > epoch:
                    self._load_state_from_peers()
                return None  # no step; keep the inner work and try again after the next batch
            epochs = {value.get("epoch") if isinstance(value, dict) else None for value in gathered.values()}
            if epochs != {epoch}:
                self.discarded_epochs += 1
                logger.warning("the averaging group mixed epochs %s; every member discards this all-reduce", epochs)
                ahead = [e for e in epochs if isinstance(e, int) and e > epoch]
                if ahead:
                    self._load_state_from_peers()
                return None
            group = tuple(sorted(gathered))

        with torch.no_grad(), self._state_lock:
            with self.averaging.buffers() as buffers:
                averaged = [buffer.clone() for buffer in buffers]
            if not all(bool(torch.isfinite(delta).all()) for delta in averaged):
                self.discarded_epochs += 1
                logger.warning("the averaged pseudo-gradient is not finite; discarding the all-reduce")
                self._reset_local_model()
                self._epoch_samples = self._epoch_steps = 0
                self.averaging.report_progress(self._epoch, 0)
                return None
            self.outer_step(averaged)
            self._epoch = epoch + 1
        self._start_epoch(self._epoch)
        self.last_group = group
        logger.info("outer step %d: averaged with %d peer(s), ~%.1f MB sent", self._epoch, len(group),
                    self.bytes_per_epoch(len(group)) / 1e6)
        return group

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
        self._epoch_samples = self._epoch_steps = 0
        self.averaging.start_epoch(epoch)
        self._publish_digest()

    def _publish_digest(self) -> None:
        """Sign the digest of the θ_global this peer now serves, so loaders can check it (`swarm.state_digests`)."""
        if self.settings.state_digests is not None:
            with self._state_lock:
                self.settings.state_digests.publish(self._epoch, self._global_params)

    def bytes_per_epoch(self, group_size: int) -> int:
        """Approximate bytes this peer sends in one all-reduce of Δ with `group_size` peers (0 alone)."""
        if group_size <= 1:
            return 0
        values = sum(param.numel() for param in self._global_params)
        return int(2 * (group_size - 1) / group_size * values * BYTES_PER_VALUE[self.settings.compression])

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

    def _load_state_from_peers(self) -> bool:
        """Download θ_global, momentum and epoch from the most advanced peer; True if loaded."""
        self._close_window()
        self._next_catch_up_try = time.monotonic() + CATCH_UP_RETRY_SECONDS
        expected = len(self._global_params) + len(self._momentum_buffers())
        for attempt in range(1, LOAD_STATE_ATTEMPTS + 1):
            try:
                loaded = self.averaging.download_state(timeout=self.settings.load_state_timeout)
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
            self._zero_grad()
            self._start_epoch(epoch)
            logger.info("loaded the swarm's state at epoch %d", epoch)
            return True
        return False

    # -- the model every peer holds this epoch: θ_global ----------------------------------------
    @torch.no_grad()
    def page_losses(self, pages: Sequence[torch.Tensor]) -> list[float]:
        with self._state_lock:
            if self.device.type == "cpu":
                return page_losses(self.global_model, pages, self.device)
            # θ_global through the local model's module on its device, without touching the local weights
            weights = {name: tensor.to(self.device) for name, tensor in self.global_model.named_parameters()}
            weights.update({name: tensor.to(self.device) for name, tensor in self.global_model.named_buffers()})
            return page_losses(self.model, pages, self.device, weights=weights)

    def shared_state(self) -> dict[str, torch.Tensor]:
        with self._state_lock:
            return cpu_state(self.global_model)

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """θ_global (as "model"), both optimizers and the epoch; what the miner checkpoints."""
        self._close_window()
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
        """Resume from `state()`: the local model restarts from the saved θ_global (the epoch in flight is lost)."""
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
        self.averaging.shutdown()
