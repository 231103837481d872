"""Command-line configuration with bittensor-style dotted flags.

Every flag can also come from the environment or a `.env` file: `--dht.port` is read from
`DHT_PORT`. Precedence is flag > environment > `.env.local` > `.env` > default, so an operator can
keep shared defaults in `.env`, override one per pm2 process in the environment, and still win on the
command line. A bad value (or an unknown `.env` key) exits with code 2 and one line naming the flag
and the fix, before anything heavy (torch, hivemind, the chain) is touched; the tools check their
flags with the same validators.
"""

from __future__ import annotations

import argparse
import difflib
import io
import ipaddress
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional, Sequence

from dotenv import dotenv_values

from .spec import COMPRESSIONS, DATA_SOURCES, LOSS_KERNELS, MODEL_PRESETS, TRAINING_MODES

EMBEDDED_NETWORK = "embedded"  # not "local": bittensor already names a localnet subtensor node so
BITTENSOR_NETWORKS = ("finney", "test", "local", "archive")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the flag and how to fix it."""


def _ranged(kind: Callable[[str], Any], ok: Callable[[Any], bool], reason: str, name: str) -> Callable[[str], Any]:
    """A validator: `kind(text)`, refused with `reason` unless `ok(value)` (NaN fails every comparison)."""
    def parse(text: str) -> Any:
        if not ok(value := kind(text)):
            raise ValueError(reason)
        return value
    parse.__name__ = name  # `_convert` says "expects a positive int" after it
    return parse


_positive_int = _ranged(int, lambda v: v > 0, "must be a positive integer", "_positive_int")
_non_negative_int = _ranged(int, lambda v: v >= 0, "must be zero or a positive integer", "_non_negative_int")
_port = _ranged(int, lambda v: 0 <= v <= 65535, "must be a port number between 1 and 65535 (0 picks a free port)",
                "_port")
_netuid = _ranged(int, lambda v: 0 <= v <= 65535, "must be a subnet uid between 0 and 65535 (the chain's u16)",
                  "_netuid")
_positive_float = _ranged(float, lambda v: 0 < v < math.inf, "must be a positive, finite number", "_positive_float")
_fraction = _ranged(float, lambda v: 0.0 < v <= 1.0, "must be a number in (0, 1]", "_fraction")
_non_negative_float = _ranged(float, lambda v: 0 <= v < math.inf, "must be zero or a positive, finite number",
                              "_non_negative_float")
_momentum = _ranged(float, lambda v: 0.0 <= v < 1.0, "must be a number in [0, 1)", "_momentum")


def _ip(text: str) -> str:
    ipaddress.ip_address(text)
    return text


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", text):
        raise ValueError("is not auto, cpu, cuda or cuda:N")
    return text


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _multiaddr_list(text: str) -> list[str]:
    """Comma- or space-separated multiaddrs, each ending in /p2p/<peer id>."""
    from hivemind.utils.multiaddr import Multiaddr  # light import; no process is started

    addrs = [part for part in text.replace(",", " ").split() if part]
    for addr in addrs:
        try:
            parsed = Multiaddr(addr)
        except Exception as exc:  # the multiaddr library raises several unrelated types
            detail = " ".join(str(exc).replace(f"Invalid MultiAddr {addr!r}", "").split()).strip(" :")
            raise ValueError(f"{addr!r} is not a multiaddr ({detail or type(exc).__name__})") from None
        if re.search(r"/(tcp|udp)/0(/|$)", str(parsed)):
            raise ValueError(f"{addr!r} has port 0, which no peer listens on; copy the address a peer prints at start")
        if "/p2p/" not in str(parsed):
            raise ValueError(f"{addr!r} lacks the /p2p/<peer id> part; copy the full address a peer prints at start")
    return addrs


@dataclass(frozen=True)
class Flag:
    """One dotted flag: its type, default and the environment variable that can set it."""

    name: str
    parse: Callable[[str], Any] = str
    default: Any = None
    help: str = ""
    choices: Optional[Sequence[str]] = None
    is_switch: bool = False
    roles: tuple[str, ...] = ("miner", "validator")

    @property
    def env(self) -> str:
        return self.name.replace(".", "_").replace("-", "_").upper()


def _common_flags() -> list[Flag]:
    return [
        Flag("netuid", _netuid, 25, "subnet uid"),
        Flag("subtensor.network", str, EMBEDDED_NETWORK,
             f"chain: {EMBEDDED_NETWORK} (SQLite on this machine), finney, test, local or ws://host:port"),
        Flag("subtensor.chain_endpoint", str, None, "websocket endpoint of a subtensor node (overrides the network's)"),
        Flag("chain.db", str, "~/.distributed-training/chain.sqlite", f"SQLite file of the {EMBEDDED_NETWORK} chain"),
        Flag("wallet.name", str, "default", "coldkey wallet name"),
        Flag("wallet.hotkey", str, "default", "hotkey name"),
        Flag("wallet.path", str, "~/.bittensor/wallets", "where wallets live"),
        Flag("logging.debug", _bool, False, "verbose logs", is_switch=True),
        Flag("logging.dir", str, None, "also write logs to a file in this directory"),
        Flag("wandb.off", _bool, False, "do not log to Weights & Biases at all", is_switch=True),
        Flag("wandb.mode", str, None, "online or offline (default: online with WANDB_API_KEY, else offline)",
             choices=("online", "offline")),
        Flag("wandb.project", str, "distributed-training", "wandb project"),
        Flag("wandb.entity", str, None, "wandb entity (team or user)"),
        Flag("axon.port", _port, 8091, "port of the miner's signed HTTP endpoint"),
        Flag("axon.ip", _ip, "0.0.0.0", "interface the HTTP endpoint binds to"),
        Flag("axon.external_ip", _ip, None, "ip published on chain (default: --dht.announce_ip, else 127.0.0.1)",
             roles=("miner",)),
        Flag("dht.port", _port, 0, "port hivemind's DHT listens on (tcp and udp/quic); 0 picks a free one"),
        Flag("dht.announce_ip", _ip, None, "public ip other peers reach this DHT on"),
        Flag("dht.initial_peers", _multiaddr_list, [], "multiaddrs of running peers to join (comma separated)"),
        Flag("dht.use_quic", _bool, False, "also listen on udp/quic", is_switch=True),
        Flag("dht.bootstrap_attempts", _positive_int, 5, "how many times to try joining the initial peers"),
        Flag("dht.bootstrap_timeout", _positive_float, 120.0, "seconds to keep trying to join before giving up"),
        Flag("neuron.run_id", str, "dt-local", "training run id: DHT keys and the swarm are namespaced by it"),
        Flag("neuron.device", _device, "auto", "torch device: auto, cpu, cuda or cuda:N"),
        Flag("neuron.state_dir", str, None,
             "where checkpoints, score books and logs go (default ~/.distributed-training/<wallet>/<hotkey>)"),
        Flag("neuron.torch_threads", _non_negative_int, 0, "torch CPU threads (0: torch's default)"),
        Flag("neuron.seed", _non_negative_int, 1337, "seed of the model's initialisation (same in every peer)"),
        Flag("neuron.batch_size", _positive_int, 8, "sequences per local step"),
        Flag("neuron.micro_batch_size", _non_negative_int, 0,
             "sequences per forward/backward, gradients accumulated over a step (0: what fits the GPU; the whole "
             "batch on a CPU)"),
        Flag("neuron.target_batch_size", _positive_int, 512, "sequences the whole swarm processes per global epoch"),
        Flag("neuron.matchmaking_time", _positive_float, 15.0, "seconds to gather peers for an all-reduce"),
        Flag("neuron.averaging_timeout", _positive_float, 60.0, "seconds an all-reduce may take"),
        Flag("neuron.lr", _positive_float, 4e-4, "AdamW learning rate"),
        Flag("neuron.weight_decay", _non_negative_float, 0.1, "AdamW weight decay"),
        Flag("neuron.grad_clip", _non_negative_float, 1.0, "clip the global gradient norm to this (0 turns it off)"),
        Flag("neuron.grad_compression", str, "none", "gradient compression on the wire", choices=COMPRESSIONS),
        Flag("training.mode", str, "swarm",
             "swarm: one AdamW step on the all-reduced gradient per global epoch; diloco: local AdamW steps, "
             "then an outer Nesterov step on the all-reduced pseudo-gradient per global epoch", choices=TRAINING_MODES),
        Flag("training.inner_steps", _non_negative_int, 100,
             "diloco: most local steps a peer takes in one outer round before it waits for the swarm (0: no cap)"),
        Flag("training.outer_lr", _positive_float, 0.7, "diloco: outer Nesterov SGD learning rate"),
        Flag("training.outer_momentum", _momentum, 0.9, "diloco: outer Nesterov momentum, in [0, 1)"),
        Flag("training.offload_optimizer", _bool, True,
             "swarm: hivemind's AdamW on a host copy of the parameters (false: on the model's device, fused on CUDA)"),
        Flag("neuron.checkpoint_every", _non_negative_int, 1, "save a checkpoint every N global epochs (0: never)",
             roles=("miner",)),
        Flag("neuron.max_epochs", _non_negative_int, 0, "stop after this many global epochs (0: run forever)",
             roles=("miner",)),
        Flag("neuron.max_steps", _non_negative_int, 0, "stop after this many local steps (0: no limit)",
             roles=("miner",)),
        Flag("neuron.wait_for_peers", _non_negative_int, 0,
             "before training, wait until this many miners of the run are in the DHT", roles=("miner",)),
        Flag("neuron.swarm_only", _bool, False,
             "train in the swarm without a chain or an endpoint (connectivity checks, benchmarks)",
             is_switch=True, roles=("miner",)),
        Flag("neuron.uid", _non_negative_int, None, "uid whose pages to train on when not reading it from the chain",
             roles=("miner",)),
        Flag("neuron.pages_per_round", _positive_int, 16, "pages a uid is assigned per round"),
        Flag("model.preset", str, "tiny", "model size", choices=tuple(MODEL_PRESETS)),
        Flag("model.seq_len", _positive_int, None, "tokens per sequence (default: the preset's)"),
        Flag("model.vocab_multiple", _positive_int, 1,
             "pad the embedding to a multiple of this (64: 50,304 rows for GPT-2); pad ids are never predicted"),
        Flag("model.loss", str, "plain", "plain: transformers' loss on full logits; chunked: the LM head and "
             "cross-entropy over row chunks, never all fp32 logits at once", choices=LOSS_KERNELS),
        Flag("model.compile", str, "auto", "torch.compile the training step (auto: on CUDA only)",
             choices=("auto", "on", "off")),
        Flag("data.source", str, "local", "local: the shipped corpus offline; hf: a Hugging Face dataset",
             choices=DATA_SOURCES),
        Flag("data.assets_dir", str, None, "offline corpus and tokenizer (default ~/.cache/distributed-training/assets)"),
        Flag("data.page_size", _positive_int, 4, "sequences per page"),
        Flag("data.seed", _non_negative_int, 0, "seed of the page assignment (same for every validator)"),
        Flag("data.dataset", str, "HuggingFaceFW/fineweb-edu", "Hugging Face dataset for --data.source hf"),
        Flag("data.dataset_config", str, "sample-10BT", "its configuration name"),
        Flag("data.split", str, "train", "its split"),
        Flag("data.revision", str, None, "its Hub revision (branch, tag or commit; default: main)"),
        Flag("data.text_field", str, "text", "its text column"),
        Flag("data.files", str, None, "local data files for --data.source hf (json, jsonl, parquet, txt)"),
        Flag("data.tokenizer", str, "gpt2", "tokenizer for --data.source hf (a Hub name or a local directory)"),
        Flag("data.rows_per_page", _positive_int, None,
             "rows of text per page for --data.source hf (default: 4 x page_size for parquet, page_size otherwise)"),
        Flag("data.prefetch", _non_negative_int, 32,
             "pages fetched and tokenised ahead in the background for --data.source hf (0: on the training thread)"),
        Flag("data.cache_dir", str, None, "page and parquet index cache (default ~/.cache/distributed-training/data)"),
        Flag("data.cache_mb", _non_negative_int, 512, "size limit of the on-disk page cache in MiB (0: no disk cache)"),
    ]


def _role_flags() -> list[Flag]:
    return [
        Flag("blacklist.min_stake", _non_negative_float, 0.0,
             "reject validators with less stake than this", roles=("miner",)),
        Flag("neuron.sample_size", _positive_int, 8, "miners queried per round", roles=("validator",)),
        Flag("neuron.moving_average_alpha", _fraction, 0.05, "weight of the newest round in the moving average",
             roles=("validator",)),
        Flag("neuron.epoch_length", _positive_int, 100, "blocks between weight settings", roles=("validator",)),
        Flag("neuron.timeout", _positive_float, 30.0, "seconds a miner has to answer", roles=("validator",)),
        Flag("neuron.round_interval", _non_negative_float, 10.0, "seconds between rounds", roles=("validator",)),
        Flag("neuron.verify_pages", _positive_int, 2, "pages per miner the validator recomputes",
             roles=("validator",)),
        Flag("neuron.loss_tolerance", _positive_float, 0.02,
             "largest accepted |reported - recomputed| / recomputed loss", roles=("validator",)),
        Flag("neuron.max_rounds", _non_negative_int, 0, "stop after this many rounds (0: run forever)",
             roles=("validator",)),
    ]


def flags_for(role: str) -> list[Flag]:
    return [flag for flag in _common_flags() + _role_flags() if role in flag.roles]


def _nest(flat: dict[str, Any]) -> SimpleNamespace:
    root = SimpleNamespace()
    for dotted, value in flat.items():
        node = root
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, SimpleNamespace())
            node = getattr(node, part)
        setattr(node, leaf, value)
    return root


@dataclass
class Settings:
    """Where each value came from, so `--help`-style dumps can say why a value is what it is."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


# Keys a `.env` may hold that are no flag: read from the environment by this package or its libraries
# (so a neuron exports them from `.env`/`.env.local` when the environment lacks them), or by the pm2
# launchers (scripts/auto_update.sh), which read only their environment.
EXPORTED_SETTINGS = ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "HIVEMIND_LOGLEVEL", "HF_TOKEN", "HF_HOME",
                     "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "CUDA_VISIBLE_DEVICES",
                     "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "TOKENIZERS_PARALLELISM")
LAUNCHER_SETTINGS = ("UPDATE_INTERVAL", "UPDATE_WATCH", "UPDATE_MAX_RESTARTS", "UPDATE_STABLE", "UPDATE_WATCH_POLL",
                     "UPDATE_FETCH_TIMEOUT", "UPDATE_INSTALL_TIMEOUT", "UPDATE_POST_INSTALL_TIMEOUT",
                     "UPDATE_CHECK_TIMEOUT", "DT_PYTHON", "DT_PM2", "DT_PM2_NAME", "DT_PM2_TIMEOUT",
                     "DT_KILL_TIMEOUT_MS", "DT_POST_INSTALL")  # scripts/auto_update.sh


def _read_dotenv(path: Optional[Path], explicit: bool = False) -> dict[str, str]:
    """`.env` (committed defaults), overridden by `.env.local` beside it (git-ignored secrets).

    A key that is no flag's variable (of either neuron) nor a setting above, a line that is not
    KEY=VALUE, a file that is not text, and a missing `--env-file` (`explicit`) are errors."""
    from dotenv.parser import parse_stream

    candidate = path if path is not None else Path.cwd() / ".env"
    if explicit and not candidate.is_file():
        raise ConfigError(f"--env-file: {candidate} {'is not a file' if candidate.exists() else 'does not exist'}")
    flags = {flag.env: flag.name for flag in _common_flags() + _role_flags()}
    values: dict[str, str] = {}
    for file in (candidate, candidate.with_name(candidate.name + ".local")):
        if not file.exists():
            continue
        try:
            text = file.read_bytes().decode("utf-8")
            if "\0" in text:
                raise UnicodeError("a NUL byte")
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"{file}: cannot be read as a .env file ({reason}); it holds KEY=VALUE lines") from None
        for binding in parse_stream(io.StringIO(text)):
            key, line = binding.key, binding.original.line
            if binding.error:
                raise ConfigError(f"{file}: line {line} is not KEY=VALUE (an unclosed quote?)")
            if key is not None and key not in flags and key not in EXPORTED_SETTINGS + LAUNCHER_SETTINGS:
                close = difflib.get_close_matches(key.upper(), [*flags, *EXPORTED_SETTINGS], n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}" + (f" (--{flags[close[0]]})?" if close[0] in flags else "?") \
                    if close else "; dt-miner --help and dt-validator --help list the variables"
                raise ConfigError(f"{file}: line {line}: {key!r} is not a setting{hint}")
        values.update({k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None})
    return values


def flag_help(flag: Flag, env: bool = True, required: bool = False) -> str:
    """What a flag does, its choices, its default (or that it is required) and, for the neurons, its variable."""
    default = flag.default
    if isinstance(default, (bool, list)):
        default = str(default).lower() if isinstance(default, bool) else ",".join(default) or "none"
    shown = "required" if required else None if default is None and "default" in flag.help else \
        f"default: {'unset' if default is None else default}"
    tail = ", ".join(filter(None, [shown, f"env {flag.env}" if env else None]))
    text = flag.help + (f" ({', '.join(flag.choices)})" if flag.choices else "") + (f" [{tail}]" if tail else "")
    return text.replace("%", "%%")  # argparse %-formats help


def _add_flag(parser: argparse.ArgumentParser, flag: Flag) -> None:
    kwargs: dict[str, Any] = {"nargs": "?", "const": "true"} if flag.is_switch else {}
    parser.add_argument(f"--{flag.name}", dest=flag.name, default=None, help=flag_help(flag), **kwargs)


def parse_config(role: str, argv: Optional[Iterable[str]] = None, *, env: Optional[dict[str, str]] = None,
                 dotenv_path: Optional[Path] = None, prog: Optional[str] = None) -> SimpleNamespace:
    """Parse flags for a role ("miner" or "validator"); raise ConfigError on a bad value.

    With `env=None` the process environment is read, and EXPORTED_SETTINGS only in a `.env` go into it."""
    flags = flags_for(role)
    parser = argparse.ArgumentParser(prog=prog or f"dt-{role}", description=f"distributed-training {role}",
                                     allow_abbrev=False)
    parser.add_argument("--env-file", default=None,
                        help="a .env file to read, and FILE.local beside it if there is one (default: ./.env)")
    for flag in flags:
        _add_flag(parser, flag)
    parser.error = _raise_usage  # type: ignore[method-assign]
    args = parser.parse_args(list(argv) if argv is not None else None)

    environ = dict(os.environ) if env is None else env
    if args.env_file is not None:
        dotenv = _read_dotenv(Path(args.env_file).expanduser(), explicit=True)
    else:
        dotenv = _read_dotenv(dotenv_path)
    settings = Settings()
    for flag in flags:
        raw, source = getattr(args, flag.name), "flag"
        if raw is None and flag.env in environ:
            raw, source = environ[flag.env], "environment"
        if raw is None and flag.env in dotenv:
            raw, source = dotenv[flag.env], ".env"
        if raw is not None and source != "flag" and not str(raw).strip():
            raw = None  # `VAR=` in a .env or the environment means "not set"
        if raw is None:
            settings.values[flag.name], settings.sources[flag.name] = flag.default, "default"
            continue
        settings.values[flag.name] = _convert(flag, raw, source)
        settings.sources[flag.name] = source
    config = _nest(settings.values)
    config.role = role
    config.sources = settings.sources
    _check_cross_field(config)
    if env is None:
        for key in EXPORTED_SETTINGS:
            if key not in os.environ and dotenv.get(key, "").strip():
                os.environ[key] = dotenv[key]
    return config


def _raise_usage(message: str) -> None:
    raise ConfigError(f"{message} (see --help)")


def _convert(flag: Flag, raw: Any, source: str) -> Any:
    where = f"--{flag.name}" if source == "flag" else f"{flag.env} (from {source})"
    if flag.choices and raw not in flag.choices:
        raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(flag.choices)}")
    try:
        return flag.parse(raw)
    except (ValueError, TypeError) as exc:
        reason = str(exc) or "has the wrong type"
        if "invalid literal" in reason or "could not convert" in reason:
            reason = f"expects a {flag.parse.__name__.strip('_').replace('_', ' ')}"
        # Reasons that quote the offending part themselves are not prefixed with the whole value.
        message = f"{where}: {reason}" if reason.startswith("'") else f"{where}: {raw!r} {reason}"
        raise ConfigError(message) from None


def _check_cross_field(config: SimpleNamespace) -> None:
    network = config.subtensor.network
    if network != EMBEDDED_NETWORK and network not in BITTENSOR_NETWORKS and not network.startswith(("ws://", "wss://")):
        raise ConfigError(f"--subtensor.network: {network!r} is not {EMBEDDED_NETWORK}, "
                          f"{', '.join(BITTENSOR_NETWORKS)} or a ws:// endpoint")
    if config.data.source == "hf" and config.data.files:
        missing = [part for part in config.data.files.split(",") if not Path(part).expanduser().exists()]
        if missing:
            raise ConfigError(f"--data.files: {missing[0]} does not exist; give existing files or drop the flag")
    if config.neuron.target_batch_size < config.neuron.batch_size:
        raise ConfigError("--neuron.target_batch_size must be at least --neuron.batch_size")
    _check_directory("--neuron.state_dir", state_dir(config))
    if config.logging.dir:
        _check_directory("--logging.dir", Path(config.logging.dir).expanduser())


def _check_directory(where: str, path: Path) -> None:
    """A directory the neuron creates or writes in: neither it nor a parent may be a file."""
    part = next((part for part in (path, *path.parents) if os.path.lexists(part)), path)
    if os.path.lexists(part) and not part.is_dir():
        detail = "is a file" if part == path else f"goes through {part}, which is a file"
        raise ConfigError(f"{where}: {path} {detail}, not a directory; give a directory path")


def state_dir(config: SimpleNamespace) -> Path:
    """The neuron's own directory for checkpoints, score books and logs."""
    if config.neuron.state_dir:
        return Path(config.neuron.state_dir).expanduser()
    return Path("~/.distributed-training").expanduser() / config.wallet.name / config.wallet.hotkey / config.role


def parse_or_exit(role: str, argv: Optional[Iterable[str]] = None) -> SimpleNamespace:
    """Entry-point wrapper: a bad value prints one line to stderr and exits 2."""
    try:
        return parse_config(role, argv)
    except ConfigError as exc:
        print(f"dt-{role}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# --- the tools (dt-dht, dt-monitor, dt-chain) take the neurons' definitions of the flags they share --------
def shared_flag(name: str, **changes: Any) -> Flag:
    """The neurons' definition of flag `name` (validator, default, help), `changes` replaced, for a tool."""
    return replace(next(flag for flag in _common_flags() + _role_flags() if flag.name == name), **changes)


def argparse_type(flag: Flag) -> Callable[[str], Any]:
    """`flag`'s validator as an argparse `type=` (dt-chain's subcommands), failing with the same reason."""
    def convert(text: str) -> Any:
        try:
            return _convert(flag, text, "flag")
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return convert
