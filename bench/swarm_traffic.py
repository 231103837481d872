"""(b) The swarm: per peer, compute versus communication, and bytes sent per averaging round.

Runs `--peers` miner processes (`--neuron.swarm_only`) and a routing DHT node in both training modes.
By default every peer sits in its own network namespace on a bridge, its link shaped with `tc tbf`
to `--rate-mbit` each way (`distributed_training/localnet/netlab.py`; needs root); `--rate-mbit 0` leaves
the links unshaped and `--loopback` runs everything on 127.0.0.1 without namespaces (no byte counts).

Per peer, between its first and its last epoch row in metrics.jsonl (so start-up and the wait for
the other peers are left out):
- compute: the trainer's forward, backward and optimizer steps (`compute_seconds`);
- communicate/wait: blocked on the swarm: matchmaking, the all-reduce, waiting for slower peers,
  DHT reads in the round, state loading (`communicate_seconds`);
- other: the rest of the miner's loop (batches, metrics, epoch snapshots, checkpoints);
- bytes: what the peer's link carried from it (Ethernet frames: payload, TCP/IP, libp2p, DHT
  traffic and all), per averaging round, against the butterfly all-reduce minimum 2·P·b·(N−1)/N.

    python bench/swarm_traffic.py [--peers 3] [--rate-mbit 100] [--modes swarm,diloco] [--epochs 4]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import record, table  # noqa: E402

from distributed_training.logs import read_metrics  # noqa: E402
from distributed_training.localnet.netlab import NetLab, remove_stale  # noqa: E402
from distributed_training.localnet.processes import ProcessGroup  # noqa: E402

BYTES_PER_VALUE = {"none": 4, "fp16": 2, "uint8": 1}
COMPUTE_TARGET, BYTES_TARGET = 0.90, 1.25


class LinkSampler(threading.Thread):
    """Reads every peer's sent-bytes counter a few times a second, to cut it at the epochs' timestamps."""

    def __init__(self, lab: NetLab, interval: float = 0.25):
        super().__init__(daemon=True)
        self.lab, self.interval = lab, interval
        self.samples: list[tuple[float, list[int]]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), self.lab.sent_bytes()))
            if self._done.wait(self.interval):
                return

    def stop(self, path: Path) -> None:
        """Stop sampling and save the samples to `path` (what `--analyse` reads again)."""
        self._done.set()
        self.join()
        path.write_text(json.dumps(self.samples))


class LinkCounters:
    """Saved samples of the peers' sent-bytes counters."""

    def __init__(self, path: Path):
        self.samples: list[tuple[float, list[int]]] = [(t, b) for t, b in json.loads(path.read_text())]

    def at(self, peer: int, when: float) -> float:
        """Bytes peer `peer` had sent at time `when` (interpolated between samples)."""
        times = [t for t, _ in self.samples]
        i = max(1, min(bisect.bisect_left(times, when), len(times) - 1))
        (t0, b0), (t1, b1) = (self.samples[i - 1][0], self.samples[i - 1][1][peer]), (times[i], self.samples[i][1][peer])
        return b0 + (b1 - b0) * min(1.0, max(0.0, (when - t0) / (t1 - t0))) if t1 > t0 else float(b1)

    def steady_rate(self, peer: int, start: float, end: float) -> float:
        """The peer's usual bytes/s between `start` and `end`: the median over sampling intervals.

        All-reduces are short bursts, so the median interval is one of inner steps, where a peer only
        talks to the DHT (progress records, peer lookups); this is that background rate."""
        window = [(t, b[peer]) for t, b in self.samples if start <= t <= end]
        rates = [(b1 - b0) / (t1 - t0) for (t0, b0), (t1, b1) in zip(window, window[1:]) if t1 > t0]
        return statistics.median(rates) if rates else 0.0


@dataclass
class PeerResult:
    mode: str
    peer: int
    rounds: int
    group_sizes: list
    wall: float
    compute: float
    communicate: float
    minimum: float  # butterfly bytes per round, for the groups this peer averaged in
    sent: Optional[float] = None  # bytes on its link over the measured rounds, everything included
    steady: Optional[float] = None  # its background bytes/s between rounds (DHT)

    def per_round(self, value: float) -> float:
        return value / self.rounds

    @property
    def burst(self) -> Optional[float]:
        """Bytes per round above the steady background: the averaging itself, with its framing."""
        return None if self.sent is None else self.per_round(self.sent - self.steady * self.wall)

    def ratio(self, sent: Optional[float]) -> Optional[float]:
        return None if sent is None or not self.minimum else sent / self.minimum


def butterfly_minimum(params: int, bytes_per_value: int, group: int) -> float:
    """Bytes one member of a group of `group` sends in a butterfly all-reduce of `params` values."""
    return 2 * params * bytes_per_value * (group - 1) / group if group > 1 else 0.0


def miner_flags(args: argparse.Namespace, mode: str, uid: int, run_id: str) -> list[str]:
    target = args.target_batch_size
    if mode == "diloco":
        target = args.peers * args.inner_steps * args.batch_size  # the round starts when every peer took H steps
    return ["--neuron.swarm_only", "--training.mode", mode, "--model.preset", args.preset,
            "--model.seq_len", str(args.seq_len), "--neuron.batch_size", str(args.batch_size),
            "--neuron.target_batch_size", str(target), "--training.inner_steps", str(args.inner_steps),
            "--neuron.matchmaking_time", str(args.matchmaking_time), "--neuron.grad_compression", args.compression,
            "--neuron.torch_threads", str(args.torch_threads), "--neuron.device", "cpu", "--wandb.off",
            "--neuron.uid", str(uid), "--neuron.run_id", run_id, "--neuron.max_epochs", str(args.epochs),
            "--neuron.wait_for_peers", str(args.peers), "--dht.bootstrap_timeout", "120"]


def run_mode(args: argparse.Namespace, mode: str, workdir: Path) -> None:
    """One swarm of `args.peers` miners in `mode`, until every miner reached `args.epochs`."""
    run_id = f"bench-{mode}-{uuid.uuid4().hex[:6]}"
    lab = None if args.loopback else NetLab(args.peers, rate_mbit=args.rate_mbit or None)
    sampler = None
    started = time.monotonic()
    try:
        if lab is not None:
            lab.up()
        with ProcessGroup(workdir / "logs") as group:
            if lab is None:
                dht = group.start_dht_node("dht", workdir / "dht")
                initial = group.initial_peers(dht)[0]
            else:
                dht = group.start_dht_node("dht", workdir / "dht", prefix=lab.prefix(),
                                           args=["--dht.port", str(lab.port), "--dht.announce_ip", lab.hub_ip])
                initial = lab.maddr_of(json.loads(group.wait_for_file(dht, "dht.json", 90).read_text())["maddrs"])
                sampler = LinkSampler(lab)
                sampler.start()
            for i in range(args.peers):
                flags = miner_flags(args, mode, i, run_id) + ["--dht.initial_peers", initial]
                if lab is not None:  # every namespace has its own ports: all peers listen on the lab's port
                    flags += ["--dht.port", str(lab.port), "--dht.announce_ip", lab.peers[i].ip]
                group.start(f"m{i}", "miner.py", flags, workdir / f"m{i}", prefix=lab.prefix(i) if lab else ())
            for i in range(args.peers):
                left = args.timeout - (time.monotonic() - started)
                code = group.wait(f"m{i}", timeout=max(1.0, left))
                if code != 0:
                    raise RuntimeError(f"miner m{i} exited with {code}:\n{group.members[f'm{i}'].log_tail()}")
    finally:
        if sampler is not None:
            sampler.stop(workdir / "links.json")
        if lab is not None:
            lab.down()
    print(f"{mode}: {args.peers} peers, {time.monotonic() - started:.0f}s", file=sys.stderr)


def analyse(args: argparse.Namespace, mode: str, workdir: Path) -> list[PeerResult]:
    links = workdir / "links.json"
    counters = LinkCounters(links) if links.exists() else None
    return [_peer_result(args, mode, i, workdir / f"m{i}", counters) for i in range(args.peers)]


def _peer_result(args: argparse.Namespace, mode: str, peer: int, state_dir: Path,
                 counters: Optional[LinkCounters]) -> PeerResult:
    params = read_metrics(state_dir / "metrics.jsonl", "start")[0]["params"]
    epochs = read_metrics(state_dir / "metrics.jsonl", "epoch")
    if len(epochs) < 2:
        raise RuntimeError(f"peer {peer} ({mode}) logged {len(epochs)} epochs; need 2 or more (raise --epochs)")
    first, last = epochs[0], epochs[-1]
    groups = [row["group_size"] for row in epochs[1:]]  # None: the peer loaded the state instead of averaging
    minimum = sum(butterfly_minimum(params, BYTES_PER_VALUE[args.compression], g or 1) for g in groups) / len(groups)
    result = PeerResult(mode=mode, peer=peer, rounds=last["epoch"] - first["epoch"], group_sizes=groups,
                        wall=last["time"] - first["time"],
                        compute=last["compute_seconds"] - first["compute_seconds"],
                        communicate=last["communicate_seconds"] - first["communicate_seconds"], minimum=minimum)
    if counters is not None:
        result.sent = counters.at(peer, last["time"]) - counters.at(peer, first["time"])
        result.steady = counters.steady_rate(peer, first["time"], last["time"])
    return result


def render(link: str, results: list[PeerResult]) -> str:
    times, traffic = [], []
    for r in results:
        share = lambda seconds: f"{100 * seconds / r.wall:.1f} %"  # noqa: E731
        times.append([r.mode, link, f"m{r.peer}", f"{r.rounds} ({','.join(str(g or '-') for g in r.group_sizes)})",
                      share(r.compute), share(r.communicate), share(r.wall - r.compute - r.communicate),
                      f"{r.per_round(r.compute):.1f}", f"{r.per_round(r.communicate):.1f}"])
        if r.sent is not None:
            sent = r.per_round(r.sent)
            traffic.append([r.mode, f"m{r.peer}", f"{sent / 1e6:.2f}", f"{r.steady / 1e3:.1f}", f"{r.burst / 1e6:.2f}",
                            f"{r.minimum / 1e6:.2f}", f"{r.ratio(sent):.2f}", f"{r.ratio(r.burst):.2f}"])
    body = table(["mode", "link", "peer", "rounds (group sizes)", "compute", "communicate/wait", "other",
                  "compute s/round", "communicate s/round"], times)
    if traffic:
        body += "\n\n" + table(["mode", "peer", "MB sent/round (all)", "steady kB/s (DHT)", "MB/round above steady",
                                 "butterfly min MB", "all / min", "above steady / min"], traffic)
    return body


def verdict(results: list[PeerResult]) -> str:
    lines = []
    for mode in dict.fromkeys(r.mode for r in results):
        mine = [r for r in results if r.mode == mode]
        worst_share = min(r.compute / r.wall for r in mine)
        line = f"- `{mode}`: lowest compute share {100 * worst_share:.1f} %"
        ratios = [r.ratio(r.per_round(r.sent)) for r in mine if r.sent is not None]
        if ratios:
            bursts = [r.ratio(r.burst) for r in mine]
            line += (f"; largest bytes per round / butterfly minimum {max(ratios):.2f} with all traffic, "
                     f"{max(bursts):.2f} above the steady DHT traffic")
        if mode == "diloco":
            share_ok = "met" if worst_share >= COMPUTE_TARGET else "missed"
            bytes_ok = "not measured" if not ratios else "met" if max(ratios) <= BYTES_TARGET else "missed"
            line += (f" (targets: compute >= {100 * COMPUTE_TARGET:.0f} % **{share_ok}**, "
                     f"bytes <= {BYTES_TARGET}x the minimum **{bytes_ok}**)")
        lines.append(line)
    return "\n".join(lines)


def recorded_command(argv: list[str]) -> str:
    """The command as recorded: without --workdir, which only says where the files go."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--workdir="):
            skip = False
            continue
        if arg == "--workdir":
            skip = True
            continue
        kept.append(arg)
    return " ".join(["python bench/swarm_traffic.py", *kept])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=3, choices=range(2, 9), metavar="N")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="each link's rate each way; 0: unshaped")
    parser.add_argument("--loopback", action="store_true", help="127.0.0.1, no namespaces (no root, no byte counts)")
    parser.add_argument("--modes", default="swarm,diloco")
    parser.add_argument("--epochs", type=int, default=4, help="global epochs per run; the first is not measured")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--target-batch-size", type=int, default=512, help="swarm mode's samples per global epoch")
    parser.add_argument("--inner-steps", type=int, default=100, help="DiLoCo's H: inner steps per outer round")
    parser.add_argument("--matchmaking-time", type=float, default=15.0)
    parser.add_argument("--compression", default="fp16", choices=sorted(BYTES_PER_VALUE))
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds one mode's run may take")
    parser.add_argument("--workdir", default=None, help="keep state and logs here (default: a temporary directory)")
    parser.add_argument("--analyse", default=None, metavar="WORKDIR",
                        help="only analyse an earlier run's --workdir again (its flags are read from it)")
    parser.add_argument("--variant", default="", help="record under its own heading (swarm-traffic-<variant>)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    analyse_only = bool(args.analyse)
    if analyse_only:
        root = Path(args.analyse)
        saved = json.loads((root / "run.json").read_text())
        command, args = saved["command"], argparse.Namespace(**{**saved["args"], "no_record": args.no_record,
                                                                 "variant": args.variant or saved["args"]["variant"]})
    else:
        root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dt-swarm-traffic-"))
        command = recorded_command(sys.argv[1:])
    modes = [mode for mode in args.modes.split(",") if mode]
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is not measured")
    if not analyse_only:
        if not args.loopback and os.geteuid() != 0:
            parser.error("network namespaces need root; run as root or pass --loopback")
        if any((root / mode).exists() for mode in modes):
            parser.error(f"{root} already holds a run; give another --workdir (or --analyse it)")
        # SIGTERM (a timeout, a supervisor) unwinds through the finally blocks: no namespace or process is left
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        if not args.loopback:
            remove_stale()
        root.mkdir(parents=True, exist_ok=True)
        (root / "run.json").write_text(json.dumps({"command": command, "args": vars(args)}))
        for mode in modes:
            run_mode(args, mode, root / mode)
    results = [result for mode in modes for result in analyse(args, mode, root / mode)]

    link = "127.0.0.1" if args.loopback else (f"{args.rate_mbit:g} Mbit/s" if args.rate_mbit else "unshaped")
    network = ("all on 127.0.0.1 (bytes not measured)" if args.loopback else
               "each peer in its own network namespace, joined by veth pairs to a bridge, "
               + (f"its link shaped by `tc tbf` to {link} each way (no added latency)" if args.rate_mbit
                  else "its link unshaped"))
    params = read_metrics(root / modes[0] / "m0" / "metrics.jsonl", "start")[0]["params"]
    body = render(link, results) + "\n\n" + verdict(results)
    body += (f"\n\n{args.peers} miner processes and a DHT node on one machine, {network}. Model `{args.preset}` "
             f"({params / 1e6:.2f} M parameters, P·b = {params * BYTES_PER_VALUE[args.compression] / 1e6:.1f} MB "
             f"with `{args.compression}` on the wire), seq_len {args.seq_len}, batch {args.batch_size}, "
             f"{args.torch_threads} torch thread per peer, matchmaking {args.matchmaking_time:g} s. "
             + (f"Swarm mode: a gradient all-reduce every {args.target_batch_size} samples. " if "swarm" in modes else "")
             + (f"DiLoCo: H = {args.inner_steps} inner steps per outer round. " if "diloco" in modes else "")
             + f"Measured over {args.epochs - 1} rounds per peer, from its first epoch row to its last"
             + ("." if args.loopback else "; bytes are Ethernet frames on the peer's link, counted at the bridge."))
    if args.no_record:
        print(body)
    else:
        key, title = "swarm-traffic", "(b) The swarm: compute, communication and bytes per round"
        if args.variant:
            key, title = f"{key}-{args.variant}", f"{title}, {args.variant}"
        record(key, title, command, body)


if __name__ == "__main__":
    main()
