"""`dt-monitor`: the swarm's global progress, from any machine that can reach its DHT.

It joins the DHT as a client (it opens no port) and reads the signed progress records that
every training peer publishes: no wallet, no chain and no model are needed.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from ..config import Flag, _non_negative_int, _positive_float, shared_flag
from .dht_node import ToolParser


def _format(progress, target: Optional[int]) -> str:
    of_target = f"/{target}" if target else ""
    return (f"epoch {progress.epoch} | samples {progress.samples_accumulated}{of_target} | "
            f"peers {progress.num_peers} | {progress.samples_per_second:.1f} samples/s")


def main(argv: Optional[list[str]] = None) -> int:
    from ..logs import quiet_hivemind

    quiet_hivemind(debug=False)
    parser = ToolParser(prog="dt-monitor", description="print a training swarm's global progress", allow_abbrev=False)
    parser.add_flag(shared_flag("dht.initial_peers"), required=True)
    parser.add_flag(shared_flag("neuron.run_id"))
    parser.add_flag(shared_flag("neuron.target_batch_size", default=None,
                                help="the run's target, shown after the samples accumulated"))
    parser.add_flag(Flag("interval", _positive_float, 5.0, "seconds between updates"))
    parser.add_flag(Flag("count", _non_negative_int, 0, "stop after this many updates (0: never)"))
    parser.add_argument("--peers", action="store_true", help="also list each peer")
    args = parser.parse_args(argv)
    if not args.dht_initial_peers:
        parser.error("--dht.initial_peers: give the multiaddr of a running peer of the swarm")

    from ..swarm.dht import DHTBootstrapError, DHTSettings, start_dht
    from ..swarm.progress import read_peer_progress, register_progress_validators, summarize

    run_id = args.neuron_run_id
    try:
        dht = start_dht(DHTSettings(initial_peers=args.dht_initial_peers, client_mode=True))
    except DHTBootstrapError as exc:
        print(f"dt-monitor: error: {exc}", file=sys.stderr)
        return 2
    register_progress_validators(dht, run_id)
    try:
        shown = 0
        while True:
            peers = read_peer_progress(dht, run_id)
            progress = summarize(peers)
            print(time.strftime("%H:%M:%S ") + _format(progress, args.neuron_target_batch_size), flush=True)
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
