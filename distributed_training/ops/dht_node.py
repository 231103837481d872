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
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    from ..logs import quiet_hivemind

    quiet_hivemind(debug=False)
    parser = argparse.ArgumentParser(prog="dt-dht", description="run a DHT routing node for a swarm")
    parser.add_argument("--dht.port", dest="port", type=int, default=0)
    parser.add_argument("--dht.announce_ip", dest="announce_ip", default=None)
    parser.add_argument("--dht.initial_peers", dest="initial_peers", default="")
    parser.add_argument("--peer-file", default=None, help="write {peer_id, maddrs} here once the node is up")
    args = parser.parse_args(argv)

    from ..swarm.dht import DHTBootstrapError, DHTSettings, start_dht, visible_maddrs, write_peer_file

    try:
        dht = start_dht(DHTSettings(port=args.port, announce_ip=args.announce_ip,
                                    initial_peers=[p for p in args.initial_peers.split(",") if p]))
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
