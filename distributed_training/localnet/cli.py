"""`dt-local-swarm`: a whole subnet on this machine - embedded chain, DHT node, miners, one validator.

So anyone can watch the incentive mechanism end to end without a subtensor: honest miners train
together, cheating miners (`cheats.py`: dead, liar, copycat, lazy, stale) try to earn without doing
so, and the validator's scores and weights should tell them apart. Each neuron is its own OS process,
run as an operator would run it, so the real wallets, chain, signed HTTP and hivemind swarm are all
exercised. Neuron flags after `--` go to every neuron (`-- --training.mode diloco`), each role
taking those it knows.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO

from .summary import (Member, build_summary, chain_weights, events_since, format_table, loss_series,
                               plot_losses, read_score_book)
from .processes import Neuron, ProcessFailed, ProcessGroup, free_port

PROG = "dt-local-swarm"
COLDKEY = "localnet"
VALIDATOR = "validator"
ADVERSARIES = (("dead", "dead"), ("liars", "liar"), ("copycats", "copycat"), ("lazy", "lazy"), ("stale", "stale"),
               ("poisoners", "poisoner"), ("intruders", "intruder"), ("hijackers", "hijacker"),
               ("inflaters", "inflater"), ("framers", "framer"))
UNREGISTERED = ("intruder",)  # members the chain never hears of: no wallet, no uid (-1)
CHEAT_MODULE = "distributed_training.localnet.cheats"
MARKER = ".dt-local-swarm"  # only directories carrying it are ever wiped
STARTUP_TIMEOUT = 300.0  # seconds for every miner to join (9 processes importing torch on 2 cores is slow)
TAIL_LINES = 30
# Small enough that a round of verification fits a laptop CPU, large enough that epochs take a few
# matchmaking rounds. --axon.port 0: each miner binds a free port and publishes the bound one on chain.
NEURON_FLAGS = [
    "--axon.port", "0", "--axon.ip", "127.0.0.1", "--model.preset", "tiny", "--model.seq_len", "32",
    "--neuron.batch_size", "4", "--neuron.target_batch_size", "240", "--neuron.matchmaking_time", "4",
    "--neuron.averaging_timeout", "30", "--neuron.lr", "3e-3", "--neuron.torch_threads", "1",
    "--neuron.pages_per_round", "4",
]


class UsageError(ValueError):
    """A bad flag value; becomes one line on stderr and exit code 2."""


# -- flags ----------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)  # one line and exit 2 from main(), not argparse's usage dump


def _count(text: str) -> int:
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"expects zero or a positive integer, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # also rejects nan
        raise argparse.ArgumentTypeError(f"expects zero or a positive number of seconds, got {text!r}")
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags; UsageError names the flag (argparse's own exit is only for --help).

    What follows a `--` are neuron flags: checked here with each role's own parser, and passed on.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    neuron_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = _Parser(prog=PROG, description="run a local subnet: chain, DHT, miners, validator",
                     usage=f"{PROG} [options] [-- neuron flags for every miner and the validator]",
                     allow_abbrev=False)
    flags = [("--miners", _count, 3, "honest miners")]
    flags += [(f"--{flag}", _count, 0, f"{behaviour} miners") for flag, behaviour in ADVERSARIES]
    flags += [("--rounds", _count, 6, "validator rounds to run"), ("--netuid", _count, 1, "subnet uid"),
              ("--duration", _seconds, 0.0, "stop after this many seconds (0: no limit)"),
              ("--round-interval", _seconds, 5.0, "seconds between validator rounds"),
              ("--work-dir", Path, Path(".localnet"), "wallets, chain, logs and neuron state"),
              ("--summary-json", Path, None, "write the final scores here"),
              ("--plot", Path, None, "loss plot (default <work-dir>/loss.png)")]
    for flag, kind, default, text in flags:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")
    parser.add_argument("--poison", choices=("nan", "scale", "noise", "average"), default="scale",
                        help="what poisoners send from epoch 3 on (default: scale)")
    parser.add_argument("--keep", action="store_true", help="resume in the existing work dir instead of wiping it")
    args = parser.parse_args(argv)
    for problem, message in ((args.miners < 1, "--miners must be at least 1: the swarm needs an honest miner"),
                             (args.rounds < 1, "--rounds must be at least 1"),
                             (args.netuid > 65535, "--netuid must be in 0..65535")):
        if problem:
            raise UsageError(message)
    args.role_flags = split_neuron_flags(neuron_flags)
    # Absolute: the neurons run with the repository as their working directory, not ours.
    args.work_dir = args.work_dir.expanduser().resolve()
    args.plot = (args.plot or args.work_dir / "loss.png").expanduser().resolve()
    if args.summary_json:
        args.summary_json = args.summary_json.expanduser().resolve()
    return args


def split_neuron_flags(flags: list[str]) -> dict[str, list[str]]:
    """The flags after `--` for each role, each set checked by that role's parser (UsageError if neither takes it)."""
    from ..config import ConfigError, parse_config

    if not flags:
        return {"miner": [], "validator": []}
    taken, errors = {}, {}
    for role in ("miner", "validator"):
        try:  # on top of the local swarm's own flags, as each neuron will see them; no .env, no environment
            parse_config(role, NEURON_FLAGS + flags, env={}, dotenv_path=Path("/nonexistent/.env"))
            taken[role] = flags
        except ConfigError as exc:
            taken[role], errors[role] = [], str(exc)
    if not any(taken.values()):
        raise UsageError(f"neuron flags after --: {errors['miner']}")
    return taken


# -- layout and setup -------------------------------------------------------------------------------
def plan_layout(honest: int, dead: int = 0, liars: int = 0, copycats: int = 0, lazy: int = 0,
                stale: int = 0, poisoners: int = 0, intruders: int = 0, hijackers: int = 0,
                inflaters: int = 0, framers: int = 0) -> list[Member]:
    """Validator uid 0, honest miners next, then adversaries: the order registration gives uids in."""
    kinds = ["honest"] * honest + ["dead"] * dead + ["liar"] * liars + ["copycat"] * copycats
    kinds += ["lazy"] * lazy + ["stale"] * stale + ["poisoner"] * poisoners + ["intruder"] * intruders
    kinds += ["hijacker"] * hijackers + ["inflater"] * inflaters + ["framer"] * framers
    return [Member(0, VALIDATOR, "validator")] + [Member(i + 1, f"miner{i}", b) for i, b in enumerate(kinds)]


def prepare_work_dir(work_dir: Path, keep: bool) -> str:
    """Start from an empty work dir unless --keep (never wiping one this tool did not make); the run id.

    With --keep the run id is the previous one, so that resumed miners accept their checkpoints.
    """
    if work_dir.exists() and not work_dir.is_dir():
        raise UsageError(f"--work-dir {work_dir} exists and is not a directory")
    if work_dir.exists() and not keep:
        if any(work_dir.iterdir()) and not (work_dir / MARKER).exists():
            raise UsageError(f"--work-dir {work_dir} is not empty and was not made by {PROG}; "
                             "pick a new directory (or pass --keep to use it as is)")
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / MARKER).touch()
    path = work_dir / "run_id"
    if not path.exists():
        path.write_text(f"localnet-{random.randrange(16 ** 8):08x}")
    return path.read_text().strip()


def register_all(work_dir: Path, netuid: int, layout: list[Member]) -> tuple[list[Member], dict[str, str]]:
    """Wallets and registrations (both idempotent); returns the layout with the uids the chain gave."""
    from ..chain import LocalChain
    from ..chain.wallets import create_wallet

    registered, hotkeys = [], {}
    with LocalChain(work_dir / "chain.sqlite", block_time=1.0) as chain:
        chain.create_subnet(netuid, exist_ok=True)
        for member in layout:
            if member.behaviour in UNREGISTERED:
                registered.append(Member(-1, member.name, member.behaviour))
                continue
            wallet = create_wallet(COLDKEY, member.name, work_dir / "wallets")
            hotkey, is_validator = wallet.hotkey.ss58_address, member.behaviour == "validator"
            uid = chain.register(netuid, hotkey, wallet.coldkeypub.ss58_address)
            chain.set_stake(netuid, hotkey, 1000.0 if is_validator else 0.0, validator_permit=is_validator)
            registered.append(Member(uid, member.name, member.behaviour))
            hotkeys[member.name] = hotkey
    return registered, hotkeys


def neuron_args(member: Member, args: argparse.Namespace, run_id: str, peers: list[str],
                layout: list[Member], prior_rounds: int) -> list[str]:
    """The command line of one neuron: shared chain/swarm flags, then its role's own."""
    work = args.work_dir
    common = ["--subtensor.network", "embedded", "--chain.db", str(work / "chain.sqlite"),
              "--netuid", str(args.netuid), "--wallet.path", str(work / "wallets"), "--wallet.name", COLDKEY,
              "--wallet.hotkey", member.name, "--dht.initial_peers", ",".join(peers), "--neuron.run_id", run_id,
              *NEURON_FLAGS]
    if member.behaviour == "validator":
        miners = sum(1 for m in layout[1:] if m.behaviour not in UNREGISTERED)
        return common + ["--neuron.sample_size", str(miners), "--neuron.round_interval",
                         str(args.round_interval), "--neuron.epoch_length", "10", "--neuron.moving_average_alpha",
                         "0.3", "--neuron.timeout", "30", "--neuron.max_rounds", str(prior_rounds + args.rounds),
                         *args.role_flags["validator"]]
    common += args.role_flags["miner"]
    if member.behaviour == "honest":
        return common
    extra = ["--cheat", member.behaviour]
    if member.behaviour == "intruder":  # it pages as some uid; the chain has none for it
        extra += ["--neuron.uid", str(1000 + layout.index(member))]
    if member.behaviour == "poisoner":
        extra += ["--cheat.poison", args.poison]
    if member.behaviour == "copycat":
        extra += ["--cheat.copy_uid", str(next(m.uid for m in layout if m.behaviour == "honest"))]
    if member.behaviour == "dead":
        # A dead miner publishes its --axon.port as is and publishing port 0 is rejected by the chain,
        # so give it a real port nobody listens on: registered, reachable on paper, never answering.
        extra += ["--axon.port", str(free_port())]
    return common + extra  # the cheat's own flags are read wherever they stand; a later --axon.port wins


def neuron_entry(member: Member) -> str:
    """What starts a member: the validator's and honest miners' own scripts, or the cheating miner module."""
    if member.behaviour == "validator":
        return "validator.py"
    return "miner.py" if member.behaviour == "honest" else CHEAT_MODULE


# -- reading what the neurons wrote ---------------------------------------------------------------
# -- running ---------------------------------------------------------------------------------------
class Progress:
    """One live status line on a terminal; elsewhere (CI logs) a new line only when the status changes."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream, self.tty, self.last, self.open = stream, stream.isatty(), "", False

    def show(self, elapsed: float, status: str) -> None:
        line = f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {status}"
        if self.tty or status != self.last:
            self.stream.write("\r" + line + "\x1b[K" if self.tty else line + "\n")
            self.stream.flush()
        self.last, self.open = status, self.tty

    def done(self) -> None:
        """End the live line so that what is printed next starts on a line of its own."""
        if self.open:
            self.stream.write("\n")
            self.open = False


class SwarmFailed(RuntimeError):
    """A process the run cannot do without exited; the message carries its log tail."""

    @classmethod
    def exited(cls, neuron: Neuron, what: str) -> "SwarmFailed":
        return cls(f"{what} {neuron.name} exited with code {neuron.process.returncode}; last lines of "
                   f"{neuron.log_path}:\n{neuron.log_tail(TAIL_LINES)}")


class LocalSwarm:
    """Starts the neurons, watches them, and says when the run is over."""

    def __init__(self, args: argparse.Namespace, layout: list[Member], group: ProcessGroup, since: float,
                 prior_rounds: int):
        self.args, self.layout, self.group, self.since = args, layout, group, since
        self.prior_rounds, self.progress, self.warned = prior_rounds, Progress(), set()
        self.state_root = args.work_dir / "state"
        self.honest = [m.name for m in layout if m.behaviour == "honest"]

    def elapsed(self) -> float:
        return time.time() - self.since

    def out_of_time(self) -> bool:
        return 0 < self.args.duration <= self.elapsed()

    def run(self, run_id: str) -> str:
        """Start the neurons, then poll once a second until "rounds" (the validator is done) or "duration"."""
        peers = self.group.initial_peers(self.group.start_dht_node("dht", self.state_root / "dht"))
        for m in self.layout[1:]:
            self.group.start(m.name, neuron_entry(m), neuron_args(m, self.args, run_id, peers, self.layout, 0),
                             self.state_root / m.name)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            validator_exited = self.check_exits()
            rounds, epoch = self.status()  # read after the check: a finished validator wrote its rounds first
            if rounds >= self.args.rounds:
                return "rounds"
            if validator_exited:
                raise SwarmFailed.exited(self.group.members[VALIDATOR], "validator")
            if VALIDATOR in self.group.members:
                status = f"swarm epoch {epoch} | validator rounds {rounds}/{self.args.rounds}"
            else:
                status = self.start_validator_when_ready(run_id, peers, deadline)
            self.progress.show(self.elapsed(), status)
            if self.out_of_time():
                return "duration"
            time.sleep(1.0)  # polling files other processes write

    def start_validator_when_ready(self, run_id: str, peers: list[str], deadline: float) -> str:
        """Start the validator once every live miner joined, so no round scores a miner still importing torch."""
        miners = self.layout[1:]
        waiting = [m.name for m in miners if self.group.members[m.name].alive
                   and not events_since(self.state_root / m.name, "start", self.since)]
        if waiting and time.monotonic() > deadline:
            raise SwarmFailed(f"miners {', '.join(waiting)} did not join within {STARTUP_TIMEOUT:.0f}s; "
                              f"see their logs in {self.group.log_dir}")
        if not waiting:
            validator = self.layout[0]
            args = neuron_args(validator, self.args, run_id, peers, self.layout, self.prior_rounds)
            self.group.start(validator.name, "validator.py", args, self.state_root / validator.name)
        return f"starting: {len(miners) - len(waiting)}/{len(miners)} miners up"

    def check_exits(self) -> bool:
        """Raise if an honest miner or the DHT node exited, note adversaries that did; True if the validator did."""
        for name, neuron in self.group.members.items():
            if neuron.alive or name == VALIDATOR:
                continue
            if name in self.honest or name == "dht":
                raise SwarmFailed.exited(neuron, "honest miner" if name != "dht" else "DHT node")
            if name not in self.warned:
                self.warned.add(name)
                self.progress.done()
                print(f"note: adversarial miner {name} exited with code {neuron.process.returncode} "
                      f"(log {neuron.log_path})", file=sys.stderr)
        return VALIDATOR in self.group.members and not self.group.members[VALIDATOR].alive

    def status(self) -> tuple[int, int]:
        """(validator rounds done in this run, swarm epoch of the most advanced honest miner)."""
        rounds = len(events_since(self.state_root / VALIDATOR, "round", self.since))
        steps = [events_since(self.state_root / name, "step", self.since) for name in self.honest]
        return rounds, max([int(s[-1].get("epoch", 0)) for s in steps if s], default=0)


def report(args: argparse.Namespace, layout: list[Member], hotkeys: dict[str, str], since: float) -> None:
    """Scoreboard on stdout, then the optional summary JSON and the loss plot."""
    validator_dir = args.work_dir / "state" / VALIDATOR
    on_chain = chain_weights(args.work_dir / "chain.sqlite", args.netuid, layout[0].uid)
    summary = build_summary(layout, hotkeys, validator_dir, on_chain, since)
    print(format_table(summary))
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=1))
        print(f"summary: {args.summary_json}")
    plot_losses(loss_series(layout, args.work_dir / "state", since), args.plot)
    print(f"loss plot: {args.plot}\nlogs: {args.work_dir / 'logs'}")


def run(args: argparse.Namespace) -> int:
    """Set up, run and report; every child is stopped before returning, whatever happened."""
    since = time.time()
    run_id = prepare_work_dir(args.work_dir, args.keep)
    planned = plan_layout(args.miners, args.dead, args.liars, args.copycats, args.lazy, args.stale, args.poisoners,
                          args.intruders, args.hijackers, args.inflaters, args.framers)
    layout, hotkeys = register_all(args.work_dir, args.netuid, planned)
    prior_rounds = int(read_score_book(args.work_dir / "state" / VALIDATOR).get("rounds", 0))
    print(f"{PROG}: {len(layout) - 1} miners, logs in {args.work_dir / 'logs'}", file=sys.stderr)
    code = 0
    with ProcessGroup(args.work_dir / "logs") as group:
        swarm = LocalSwarm(args, layout, group, since, prior_rounds)
        try:
            ended = swarm.run(run_id)
            swarm.progress.done()
            print(f"{PROG}: stopping ({'all rounds done' if ended == 'rounds' else '--duration reached'})",
                  file=sys.stderr)
        except (SwarmFailed, ProcessFailed, TimeoutError) as exc:
            swarm.progress.done()
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            swarm.progress.done()
            print(f"{PROG}: interrupted; stopping every neuron", file=sys.stderr)
            code = 130
    report(args, layout, hotkeys, since)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 1 a neuron or the setup failed, 2 a bad flag, 130 interrupted."""
    previous = None
    try:
        args = parse_args(argv)
        if threading.current_thread() is threading.main_thread():  # SIGTERM cleans up just like Ctrl-C
            previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
        return run(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # UsageError; ChainError, WalletError, OSError in the setup
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
