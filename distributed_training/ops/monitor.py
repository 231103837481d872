"""`dt-monitor`: the swarm's global progress, from any machine that can reach its DHT.

It joins the DHT as a client (it opens no port) and reads the signed progress records that
every training peer publishes: no wallet, no chain and no model are needed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional


def _format(progress, target: Optional[int]) -> str:
    of_target = f"/{target}" if target else ""
    return (f"epoch {progress.epoch} | samples {progress.samples_accumulated}{of_target} | "
            f"peers {progress.num_peers} | {progress.samples_per_second:.1f} samples/s")


def main(argv: Optional[list[str]] = None) -> int:
    from ..logs import quiet_hivemind

    quiet_hivemind(debug=False)
    parser = argparse.ArgumentParser(prog="dt-monitor", description="print a training swarm's global progress")
    parser.add_argument("--dht.initial_peers", dest="initial_peers", required=True,
                        help="multiaddrs of running peers (comma separated)")
    parser.add_argument("--neuron.run_id", dest="run_id", default="dt-local")
    parser.add_argument("--neuron.target_batch_size", dest="target", type=int, default=None)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between updates")
    parser.add_argument("--count", type=int, default=0, help="stop after this many updates (0: never)")
    parser.add_argument("--peers", action="store_true", help="also list each peer")
    args = parser.parse_args(argv)

    from ..swarm.dht import DHTBootstrapError, DHTSettings, start_dht
    from ..swarm.progress import read_peer_progress, register_progress_validators, summarize

    try:
        dht = start_dht(DHTSettings(initial_peers=[p for p in args.initial_peers.split(",") if p], client_mode=True))
    except DHTBootstrapError as exc:
        print(f"dt-monitor: error: {exc}", file=sys.stderr)
        return 2
    register_progress_validators(dht, args.run_id)
    try:
        shown = 0
        while True:
            peers = read_peer_progress(dht, args.run_id)
            progress = summarize(peers)
            print(time.strftime("%H:%M:%S ") + _format(progress, args.target), flush=True)
            if args.peers:
                for peer in progress.peers:
                    print(f"    {peer.peer_id[-12:]} epoch {peer.epoch} samples {peer.samples_accumulated} "
                          f"{peer.samples_per_second:.1f}/s", flush=True)
            shown += 1
            if args.count and shown >= args.count:
                return 0
            time.sleep(args.interval)  # a periodic display
    except KeyboardInterrupt:
        return 0
    finally:
        dht.shutdown()



def run() -> None:
    """Console entry: hivemind's DHT can take many seconds to wind down; the output is already flushed."""
    import os

    code = main()
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
