"""The validator: follows the swarm, queries miners, verifies their work, scores, sets weights.

One round: refresh the model copy; sample miners; give each a deterministic set of pages
(`assign_pages(uid, round, seed)`, so any validator can replay the assignment); query them all
concurrently with signed requests; recompute the loss on a sample of each miner's pages against
recent model states; score 1.0 / 0.3 / 0.1; update the moving averages and persist them; and,
every `--neuron.epoch_length` blocks, set weights from the moving averages.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from types import SimpleNamespace
from typing import Optional

from .. import PROTOCOL_VERSION
from ..config import state_dir
from ..data.pages import assign_pages
from ..files import remove_stale_temps, write_failure
from ..data.prefetch import prefetch
from ..logs import MetricsLog
from ..ops.wandb_sink import open_wandb
from ..protocol import WORK_PATH, WorkRequest, WorkResponse, response_mismatch
from ..transport import MinerClient, Target
from ..validation.follower import SwarmFollower
from ..validation.scoring import ScoreBook
from ..swarm.ban_records import believed_ban, read_bans
from ..swarm.bindings import live_bindings
from ..swarm.verdict_reports import NewReports, read_reports
from ..validation.verify import (SCORE_UNACCEPTABLE, Tolerance, Verdict, behind_the_swarm, judge, matching_epoch,
                                 no_response)
from .entry import close_in_order, install_stop_handlers
from .setup import build_neuron_parts, open_identity

logger = logging.getLogger(__name__)

WEIGHTS_VERSION_KEY = PROTOCOL_VERSION


class Validator:
    def __init__(self, config: SimpleNamespace):
        self.config = config
        self.state_dir = state_dir(config)
        remove_stale_temps(self.state_dir)  # what a write interrupted by a kill left behind
        self.metrics = MetricsLog(self.state_dir / "metrics.jsonl")
        self.stop_event = threading.Event()
        self.identity = open_identity(config)
        sink = open_wandb(config, "validator", self.identity.hotkey, self.state_dir)
        if sink is not None:
            self.metrics.sinks.append(sink)
        self.book_path = self.state_dir / "scores.json"
        self.book = ScoreBook.load(self.book_path, alpha=config.neuron.moving_average_alpha)
        self.tolerance = Tolerance(rel=config.neuron.loss_tolerance)
        self.rng = random.Random()
        self.parts = None
        self.follower: Optional[SwarmFollower] = None
        self.bound_by_hotkey: Optional[dict[str, str]] = None  # None: the swarm has no bindings
        self.accusations: dict[str, dict[str, str]] = {}
        self.new_reports = NewReports()
        self.reported: dict[str, int] = {}  # bound peer -> verdict reports about it read since its last row

    def run(self) -> int:
        install_stop_handlers(self.stop_event)
        try:
            self.parts = build_neuron_parts(self.config, self.metrics, self.identity)
            install_stop_handlers(self.stop_event)  # hivemind's averagers set SIGINT to "ignore" in this process
            self.follower = SwarmFollower(self.parts.trainer)
            self.client = MinerClient(self.identity.wallet, timeout=self.config.neuron.timeout)
            self.metrics.write("start", uid=self.identity.uid, peer_id=self.parts.peer_id, rounds=self.book.rounds)
            logger.info("validator uid %d starting at round %d", self.identity.uid, self.book.rounds)
            while not self.stop_event.is_set():
                self.run_round()
                if self.config.neuron.max_rounds and self.book.rounds >= self.config.neuron.max_rounds:
                    break
                self._wait(self.config.neuron.round_interval)
            return 0
        finally:
            self._shutdown()

    def _wait(self, seconds: float) -> None:
        """Between rounds, keep watching the swarm's progress (evidence of who trains)."""
        deadline = time.monotonic() + seconds
        while not self.stop_event.is_set():
            self.follower.poll_progress()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.stop_event.wait(min(1.0, remaining))

    def _shutdown(self) -> None:
        close_in_order(self.parts and self.parts.close, self.identity.close)
        self.metrics.write("stop", rounds=self.book.rounds)
        self.metrics.close()

    # -- one round ------------------------------------------------------------------------------
    def run_round(self) -> dict[int, Verdict]:
        cfg = self.config
        self.follower.poll_progress()
        self.follower.refresh()
        self.parts.spec_records.refresh()
        self.parts.renew_binding()
        metagraph = self.identity.metagraph(max_age=0)
        block = metagraph.block
        self.book.forget_missing({n.uid: n.hotkey for n in metagraph.neurons})
        miners = [n for n in metagraph.neurons if n.uid != self.identity.uid and not n.validator_permit]
        sampled = self.rng.sample(miners, min(cfg.neuron.sample_size, len(miners)))
        round_id = block
        source = self.parts.source
        held_epoch = max(self.follower.epochs(), default=self.follower.swarm_epoch)  # the newest model it can check
        requests = {
            n.uid: WorkRequest(run_id=cfg.neuron.run_id, round=round_id, epoch_hint=held_epoch,
                               pages=assign_pages(n.uid, round_id, cfg.data.seed,
                                                  pages_per_uid=cfg.neuron.pages_per_round,
                                                  num_pages=source.num_pages))
            for n in sampled
        }
        prefetch(source, [p for request in requests.values() for p in request.pages])  # any may be recomputed
        targets = [Target(uid=n.uid, hotkey=n.hotkey, ip=n.ip, port=n.port) for n in sampled]
        # Epoch lag is judged against the swarm as it was when the question was asked: an epoch
        # that ends while miners answer must not make a prompt miner look stale.
        asked_epoch = self.follower.swarm_epoch
        started = time.monotonic()
        results = self.client.run_queries(targets, WORK_PATH, requests, WorkResponse)
        query_time = time.monotonic() - started
        sync_started = time.monotonic()
        self.follower.poll_progress()
        self.follower.refresh()  # the swarm may have moved on while miners answered
        self._read_swarm_word()
        sync_time = time.monotonic() - sync_started
        behind = behind_the_swarm(self.follower.epochs(), asked_epoch, self.tolerance)
        if behind is not None:  # its own failure: scoring now would punish the miners that kept up
            logger.warning("round skipped: %s; no miner is scored until it holds a recent model", behind)
            self.metrics.write("round_skipped", block=block, swarm_epoch=asked_epoch, reason=behind)
            self._maybe_set_weights(block)
            return {}
        verify_started = time.monotonic()
        verdicts, rows = {}, []
        for neuron in sampled:
            result = results.get(neuron.uid)
            verdict, detail = self._verify(requests[neuron.uid], result, asked_epoch, neuron.hotkey)
            verdicts[neuron.uid] = verdict
            entry = self.book.record(neuron.uid, neuron.hotkey, verdict.score, verdict.reason, verdict.responded)
            rows.append({"uid": neuron.uid, "hotkey": neuron.hotkey, "score": verdict.score, "reason": verdict.reason,
                         "moving_average": entry.moving_average, **detail, **self._reports_row(neuron.hotkey)})
        verify_time = time.monotonic() - verify_started
        self.book.rounds += 1
        self._maybe_set_weights(block)
        self._save_book()
        self.metrics.write("round", round=self.book.rounds, block=block, swarm_epoch=self.follower.swarm_epoch,
                           query_s=query_time, sync_s=sync_time, verify_s=verify_time, verified=len(rows), rows=rows)
        self._log_table(rows, block, query_time, verify_time)
        return verdicts

    def _read_swarm_word(self) -> None:
        """The live bindings (hotkey -> its one bound peer), the bans bound peers publish, and their
        reducers' new verdict reports (informational: a clip is no offence, see `swarm.verdict_reports`)."""
        self.bound_by_hotkey, self.accusations = None, {}
        admit = self.parts.trainer.settings.admit
        if admit is None:  # a swarm without bindings (`--neuron.swarm_only`): a miner's word is all there is
            return
        bound = live_bindings(self.parts.dht, self.config.neuron.run_id, admit.admit)
        self.bound_by_hotkey = {binding.hotkey: peer for peer, binding in bound.items()}
        self.accusations = read_bans(self.parts.dht, self.config.neuron.run_id, bound)
        new = self.new_reports.count(read_reports(self.parts.dht, self.config.neuron.run_id, bound))
        self.reported = {peer: self.reported.get(peer, 0) + new.get(peer, 0) for peer in bound}

    def _reports_row(self, hotkey: str) -> dict:
        """The metrics row's count of clip/reject reports about the miner's bound peer since its last row
        (none without bindings). It never enters the verdict: honest miners are clipped now and then."""
        if self.bound_by_hotkey is None:
            return {}
        return {"clip_reports": self.reported.pop(self.bound_by_hotkey.get(hotkey, ""), 0)}

    def _verify(self, request: WorkRequest, result, asked_epoch: int, hotkey: str) -> tuple[Verdict, dict]:
        if result is None or not result.ok:
            return no_response(f"no answer: {result.error if result else 'not queried'}"), {}
        response: WorkResponse = result.response
        mismatch = response_mismatch(request, response)
        if mismatch:
            return no_response(f"malformed answer: {mismatch}"), {}
        peer_id = response.peer_id  # self-reported: only the hotkey's binding says which peer is the miner's
        if self.bound_by_hotkey is not None:
            peer_id = self.bound_by_hotkey.get(hotkey)
            if peer_id is None:
                return Verdict(SCORE_UNACCEPTABLE, "its hotkey binds no peer of the swarm"), {}
            if peer_id != response.peer_id:
                return Verdict(SCORE_UNACCEPTABLE, f"answers for peer {response.peer_id}, its hotkey binds {peer_id}"), {}
        k = min(self.config.neuron.verify_pages, len(request.pages))
        picks = sorted(self.rng.sample(range(len(request.pages)), k))
        pages = [self.parts.source.page(request.pages[i]) for i in picks]
        reported = [response.losses[i] for i in picks]
        if response.epoch not in self.follower.epochs() and response.epoch > max(self.follower.epochs(), default=-1):
            self.follower.refresh()  # the miner is already on an epoch this validator has not loaded
        swarm_epoch = asked_epoch
        candidates = [e for e in self.follower.epochs() if e >= swarm_epoch - self.tolerance.max_epoch_lag - 1]
        recompute_started = time.monotonic()
        recomputed: dict[int, list[float]] = {}
        # The claimed epoch first: for an honest miner one recomputation settles it.
        for epoch in sorted(candidates, key=lambda e: (e != response.epoch, -e)):
            recomputed[epoch] = self.follower.losses_at(epoch, pages)
            if matching_epoch(reported, {epoch: recomputed[epoch]}, self.tolerance) is not None:
                break
        recompute_time = time.monotonic() - recompute_started
        contributed = self.follower.contributed(peer_id, since_epoch=swarm_epoch - 2)
        verdict = judge(claimed_epoch=response.epoch, swarm_epoch=swarm_epoch, sampled_reported=reported,
                        recomputed_by_epoch=recomputed, contributed=contributed, tolerance=self.tolerance,
                        latest_epoch=self.follower.swarm_epoch, banned=believed_ban(self.accusations, peer_id))
        best = recomputed.get(response.epoch) or (next(iter(recomputed.values())) if recomputed else [])
        return verdict, {"epoch": response.epoch, "reported": reported, "recomputed": best,
                         "samples_trained": response.samples_trained, "recompute_s": recompute_time,
                         "recomputed_pages": len(pages) * len(recomputed)}

    def _save_book(self) -> None:
        """Persist the score book; one that cannot be written is said every round, and validating goes on
        (the weights come from the book in memory; the last good file is kept for a restart)."""
        try:
            self.book.save(self.book_path)
        except OSError as exc:
            logger.error("%s; validating goes on, the scores of this round are not saved", write_failure(self.book_path, exc))
            self.metrics.write("scores_not_saved", round=self.book.rounds, reason=str(exc))

    def _maybe_set_weights(self, block: int) -> None:
        last = self.book.last_weights_block
        if last is not None and block - last < self.config.neuron.epoch_length:
            return
        weights = self.book.weights()
        if not weights:
            return
        uids, values = list(weights), list(weights.values())
        try:
            self.identity.chain.set_weights(self.identity.wallet, self.identity.netuid, uids, values,
                                            version_key=WEIGHTS_VERSION_KEY)
        except Exception as exc:  # keep validating; the next epoch retries
            logger.error("setting weights failed: %s", exc)
            return
        self.book.last_weights_block = block
        self.metrics.write("weights", block=block, weights={str(u): w for u, w in weights.items()})
        logger.info("set weights at block %d: %s", block, ", ".join(f"{u}:{w:.3f}" for u, w in weights.items()))

    def _log_table(self, rows: list[dict], block: int, query_time: float, verify_time: float) -> None:
        lines = [f"round {self.book.rounds} | block {block} | swarm epoch {self.follower.swarm_epoch} | "
                 f"query {query_time:.1f}s | verify {verify_time:.2f}s",
                 f"{'uid':>4} {'score':>5} {'avg':>6}  reason"]
        for row in sorted(rows, key=lambda r: r["uid"]):
            reports = f" ({row['clip_reports']} clip/reject reports, not scored)" if row.get("clip_reports") else ""
            lines.append(f"{row['uid']:>4} {row['score']:>5.1f} {row['moving_average']:>6.3f}  "
                         f"{row['reason']}{reports}")
        logger.info("\n".join(lines))
