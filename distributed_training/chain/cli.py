"""``dt-chain``: administer the embedded chain and create wallets.

The embedded chain has no btcli, so this is its btcli: create subnets,
register hotkeys (with stake / validator permit), inspect the metagraph and
the hotkeys' commitments (the peer each neuron binds, `swarm/bindings.py`).
``wallet create`` makes password-less wallets for local clusters.

Every failure is one line on stderr and exit status 2, so scripts can
``set -e`` and humans see the fix without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..config import Flag, argparse_type, flag_help, shared_flag
from ..config import _non_negative_float, _positive_float, _positive_int  # the neurons' validators
from .wallets import DEFAULT_WALLET_PATH, WalletError, create_wallet, load_wallet
from .base import ChainError, Metagraph
from .local import DEFAULT_TEMPO, LocalChain

PROG = "dt-chain"
# The neurons' definitions and validators: a bad stake or block time fails here in one line as it does in
# dt-miner, and a bare `dt-chain metagraph` shows the neurons' chain. (`--netuid` is an int whose range
# the chain itself checks, 0..65535 as in the neurons.)
CHAIN_DB = shared_flag("chain.db")
DEFAULT_CHAIN_DB = CHAIN_DB.default
BLOCK_TIME = Flag("chain.block_time", _positive_float, 1.0, "seconds per block; only used when the file is created")
TEMPO = Flag("tempo", _positive_int, DEFAULT_TEMPO, "blocks per epoch")
STAKE = Flag("stake", _non_negative_float, 0.0, "the hotkey's stake")
EXIT_ERROR = 2


class _UsageError(Exception):
    """Bad command line; reported like any other error (one line, exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints usage + message over two lines and exits; we want one line.
        message = message[len("argument "):] if message.startswith("argument ") else message
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _add(parser: argparse.ArgumentParser, flag: Flag, required: bool = False) -> None:
    """A flag checked by the neurons' validator, its help showing the default."""
    parser.add_argument(f"--{flag.name}", dest=flag.name.replace(".", "_"), type=argparse_type(flag),
                        default=flag.default, required=required, help=flag_help(flag, env=False, required=required))


def _add_netuid(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--netuid", type=int, required=True, help="subnet uid, 0..65535 [required]")


def _add_wallet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wallet.name", dest="wallet_name", required=True, help="coldkey wallet name")
    parser.add_argument("--wallet.hotkey", dest="wallet_hotkey", required=True, help="hotkey name")
    parser.add_argument(
        "--wallet.path", dest="wallet_path", default=DEFAULT_WALLET_PATH, help="wallets directory"
    )


def _build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Administer the embedded chain; create wallets.")
    _add(parser, CHAIN_DB)
    _add(parser, BLOCK_TIME)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    create = commands.add_parser("create-subnet", help="create a subnet (and the chain's file if it is missing)")
    _add_netuid(create)
    _add(create, TEMPO)
    create.add_argument("--exist-ok", action="store_true", help="succeed if the subnet exists")

    register = commands.add_parser("register", help="register a wallet's hotkey on a subnet")
    _add_netuid(register)
    _add_wallet_args(register)
    _add(register, STAKE)
    register.add_argument("--validator", action="store_true", help="grant a validator permit")

    stake = commands.add_parser("set-stake", help="change a registered hotkey's stake / permit")
    _add_netuid(stake)
    _add_wallet_args(stake)
    _add(stake, STAKE, required=True)
    stake.add_argument(
        "--validator",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="grant (--validator) or revoke (--no-validator) the validator permit",
    )

    graph = commands.add_parser("metagraph", help="print a subnet's neurons")
    _add_netuid(graph)

    committed = commands.add_parser("commitments", help="print each hotkey's commitment on a subnet")
    _add_netuid(committed)

    wallet = commands.add_parser("wallet", help="wallet management")
    wallet_commands = wallet.add_subparsers(dest="wallet_command", metavar="COMMAND", required=True)
    wallet_create = wallet_commands.add_parser("create", help="create a password-less wallet (idempotent)")
    _add_wallet_args(wallet_create)
    return parser


def _open(args: argparse.Namespace, must_exist: bool = False) -> LocalChain:
    path = Path(args.chain_db).expanduser()
    if must_exist and not path.is_file():
        raise ChainError(
            f"no embedded chain at {path}; create one with "
            f"`{PROG} --chain.db {path} create-subnet --netuid N`"
        )
    return LocalChain(path, block_time=args.chain_block_time, create=not must_exist)


def _short(address: str) -> str:
    return address if len(address) <= 12 else f"{address[:5]}…{address[-4:]}"


def format_metagraph(graph: Metagraph, source: str) -> str:
    """A btcli-style table: one row per uid, then nothing else to parse."""
    header = f"{source}  netuid {graph.netuid}  block {graph.block}  neurons {len(graph)}"
    hotkey_width = max([len("HOTKEY")] + [len(n.hotkey) for n in graph.neurons])
    rows = [f"{'UID':>4}  {'HOTKEY':<{hotkey_width}}  {'COLDKEY':<10}  {'STAKE':>12}  VPERMIT  ENDPOINT"]
    for n in graph.neurons:
        rows.append(
            f"{n.uid:>4}  {n.hotkey:<{hotkey_width}}  {_short(n.coldkey):<10}  {n.stake:>12.4f}  "
            f"{'*' if n.validator_permit else '-':<7}  {n.endpoint or '-'}"
        )
    return "\n".join([header, *rows])


def _cmd_create_subnet(args: argparse.Namespace) -> None:
    with _open(args) as chain:
        chain.create_subnet(args.netuid, tempo=args.tempo, exist_ok=args.exist_ok)
        print(f"subnet {args.netuid} ready on {chain.db_path} (tempo {args.tempo}, block {chain.block()})")


def _cmd_register(args: argparse.Namespace) -> None:
    wallet = load_wallet(args.wallet_name, args.wallet_hotkey, args.wallet_path)
    with _open(args, must_exist=True) as chain:
        uid = chain.register(
            args.netuid,
            wallet.hotkey.ss58_address,
            wallet.coldkeypub.ss58_address,
            stake=args.stake,
            validator_permit=args.validator,
        )
        print(f"registered {wallet.hotkey.ss58_address} on netuid {args.netuid} as uid {uid}")


def _cmd_set_stake(args: argparse.Namespace) -> None:
    wallet = load_wallet(args.wallet_name, args.wallet_hotkey, args.wallet_path)
    with _open(args, must_exist=True) as chain:
        chain.set_stake(args.netuid, wallet.hotkey.ss58_address, args.stake, args.validator)
        print(f"stake of {wallet.hotkey.ss58_address} on netuid {args.netuid} set to {args.stake}")


def _cmd_metagraph(args: argparse.Namespace) -> None:
    with _open(args, must_exist=True) as chain:
        print(format_metagraph(chain.metagraph(args.netuid), f"embedded chain {chain.db_path}"))


def _cmd_commitments(args: argparse.Namespace) -> None:
    with _open(args, must_exist=True) as chain:
        graph, found = chain.metagraph(args.netuid), chain.commitments(args.netuid)
        print(f"embedded chain {chain.db_path}  netuid {args.netuid}  commitments {len(found)}")
        for hotkey, text in found.items():
            neuron = graph.by_hotkey(hotkey)
            print(f"{neuron.uid if neuron else '-':>4}  {hotkey}  {text}")


def _cmd_wallet(args: argparse.Namespace) -> None:
    wallet = create_wallet(args.wallet_name, args.wallet_hotkey, args.wallet_path)
    print(
        f"wallet {args.wallet_name}/hotkey {args.wallet_hotkey} at {wallet.path}: "
        f"coldkey {wallet.coldkeypub.ss58_address} hotkey {wallet.hotkey.ss58_address}"
    )


_COMMANDS = {
    "create-subnet": _cmd_create_subnet,
    "register": _cmd_register,
    "set-stake": _cmd_set_stake,
    "metagraph": _cmd_metagraph,
    "commitments": _cmd_commitments,
    "wallet": _cmd_wallet,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``dt-chain``; returns the exit status (0 ok, 2 on any error)."""
    try:
        args = _build_parser().parse_args(argv)
        _COMMANDS[args.command](args)
    except (_UsageError, ChainError, WalletError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
