"""`dt-dht`: a DHT node that only routes, for a stable initial peer.

Miners and validators come and go, and a swarm whose only known entry point restarted is hard
to join (its peer id changes). A long-lived routing node on a fixed port gives everyone one
address to put in `--dht.initial_peers`. The local swarm and the multi-process tests start one
first so that every neuron joins as an equal.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn, Optional

from ..config import Flag, argparse_type, flag_help, shared_flag


class ToolParser(argparse.ArgumentParser):
    """dt-dht's and dt-monitor's flags: the neurons' definitions and validators (`shared_flag`), so a
    bad value (`--dht.port 99999`, a malformed multiaddr) is refused in one line, exit 2, before any DHT."""

    def add_flag(self, flag: Flag, required: bool = False) -> None:
        self.add_argument(f"--{flag.name}", dest=flag.name.replace(".", "_").replace("-", "_"),
                          type=argparse_type(flag), default=flag.default, required=required,
                          help=flag_help(flag, env=False, required=required))

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        message = message[len("argument "):] if message.startswith("argument ") else message
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Optional[list[str]] = None) -> int:
    from ..logs import quiet_hivemind

    quiet_hivemind(debug=False)
    parser = ToolParser(prog="dt-dht", description="run a DHT routing node for a swarm", allow_abbrev=False)
    for name in ("dht.port", "dht.announce_ip", "dht.initial_peers"):
        parser.add_flag(shared_flag(name))
    parser.add_flag(Flag("peer-file", str, None, "write {peer_id, maddrs} here once the node is up"))
    args = parser.parse_args(argv)
    if args.dht_announce_ip and not args.dht_port:
        parser.error("--dht.announce_ip needs a fixed --dht.port: peers cannot reach a random port")

    from ..swarm.dht import DHTBootstrapError, DHTSettings, start_dht, visible_maddrs, write_peer_file

    try:
        dht = start_dht(DHTSettings(port=args.dht_port, announce_ip=args.dht_announce_ip,
                                    initial_peers=args.dht_initial_peers))
    except DHTBootstrapError as exc:
        print(f"dt-dht: error: {exc}", file=sys.stderr)
        return 2
    maddrs = write_peer_file(Path(args.peer_file), dht) if args.peer_file else visible_maddrs(dht)
    print("DHT node up; join with --dht.initial_peers " + ",".join(maddrs), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
