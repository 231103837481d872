"""A small shaped network on one machine: peers in network namespaces joined by a bridge.

The swarm benchmark (`bench/swarm_traffic.py`) runs each peer in its own namespace so that its
traffic crosses a link of known bandwidth and can be counted on that link alone. Needs root and
iproute2 (`ip`, `tc`).

Layout: a hub namespace holds a bridge `br0` (with an address, for a DHT node) and, for each peer,
one end of a veth pair whose other end is `eth0` in the peer's namespace. Each link is shaped both
ways with a token bucket filter (`tbf`): the peer's `eth0` egress is its upload, the hub end's egress
its download, as on a symmetric access link. No latency is added (`netem` is not available here).

Nothing is created in the caller's namespace, so the lab cannot clash with the machine's own
interfaces or routes; namespace names carry the process id and a random tag, and deleting the
namespaces (always done: `with`, `down()`, and an atexit hook) removes every link with them.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

NAME_PREFIX = "dtlab"
DEFAULT_PORT = 40000  # every namespace has its own ports, so every peer can listen on the same one


class NetLabError(RuntimeError):
    """A namespace, link or qdisc could not be set up (not root, no iproute2, ...)."""


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetLabError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def namespaces() -> list[str]:
    """Names of the network namespaces on this machine."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def remove_stale() -> list[str]:
    """Delete lab namespaces left by processes that no longer exist (e.g. a benchmark killed with SIGKILL)."""
    removed = []
    for name in namespaces():
        match = re.fullmatch(rf"{NAME_PREFIX}(\d+)-\w+-\w+", name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LabPeer:
    namespace: str
    ip: str
    hub_link: str  # its veth end in the hub namespace; what the hub receives there is what the peer sent


class NetLab:
    """`peers` namespaces on one bridge, each link shaped to `rate_mbit` each way (None: unshaped)."""

    def __init__(self, peers: int, rate_mbit: Optional[float] = None, port: int = DEFAULT_PORT):
        if not 1 <= peers <= 200:
            raise ValueError("a lab has 1 to 200 peers")
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError("rate_mbit must be positive (or None for unshaped links)")
        tag = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
        # a random private /24: the namespaces are isolated from the host, this only keeps labs apart in logs
        net = f"10.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}"
        self.rate_mbit, self.port = rate_mbit, port
        self.hub = f"{tag}-hub"
        self.hub_ip = f"{net}.254"
        self.peers = [LabPeer(f"{tag}-p{i}", f"{net}.{i + 1}", f"veth{i}") for i in range(peers)]
        self._created: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "NetLab":
        self.up()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.down()

    def up(self) -> None:
        atexit.register(self.down)
        try:
            self._add_namespace(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{self.hub_ip}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for peer in self.peers:
                self._add_namespace(peer.namespace)
                _ip("-n", self.hub, "link", "add", peer.hub_link, "type", "veth", "peer", "name", "eth0",
                    "netns", peer.namespace)
                _ip("-n", self.hub, "link", "set", peer.hub_link, "master", "br0")
                _ip("-n", self.hub, "link", "set", peer.hub_link, "up")
                _ip("-n", peer.namespace, "addr", "add", f"{peer.ip}/24", "dev", "eth0")
                _ip("-n", peer.namespace, "link", "set", "eth0", "up")
                if self.rate_mbit is not None:
                    self._shape(peer.namespace, "eth0")  # upload
                    self._shape(self.hub, peer.hub_link)  # download
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Delete every namespace this lab created (their links and qdiscs go with them); safe to repeat."""
        while self._created:
            _ip("netns", "del", self._created.pop(), check=False)
        atexit.unregister(self.down)

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _shape(self, namespace: str, device: str) -> None:
        rate_bps = self.rate_mbit * 1e6
        # the bucket holds 10 ms of traffic (at least a few full frames): short bursts, the rate on average
        burst = max(16 * 1024, int(rate_bps / 8 / 100))
        subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
                        "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "100ms"],
                       check=True, capture_output=True, text=True)

    # -- using it -------------------------------------------------------------------------------
    def prefix(self, index: Optional[int] = None) -> list[str]:
        """The command prefix that runs a program in peer `index`'s namespace (None: the hub's)."""
        return ["ip", "netns", "exec", self.hub if index is None else self.peers[index].namespace]

    def qdiscs(self, index: int) -> tuple[str, str]:
        """`tc qdisc show` of peer `index`'s link: (its eth0, the hub end)."""
        peer = self.peers[index]

        def show(namespace: str, device: str) -> str:
            return subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "show", "dev", device],
                                  check=True, capture_output=True, text=True).stdout

        return show(peer.namespace, "eth0"), show(self.hub, peer.hub_link)

    def sent_bytes(self) -> list[int]:
        """Bytes each peer has sent on its link so far (counted where it arrives, at the hub), frames included."""
        links = json.loads(_ip("-n", self.hub, "-j", "-s", "link", "show") or "[]")
        received = {link["ifname"]: link["stats64"]["rx"]["bytes"] for link in links}
        return [received[peer.hub_link] for peer in self.peers]

    def maddr_of(self, maddrs: Sequence[str], index: Optional[int] = None) -> str:
        """The multiaddr in `maddrs` that others in the lab can reach (that of peer `index`, or the hub's)."""
        ip = self.hub_ip if index is None else self.peers[index].ip
        for addr in maddrs:
            if f"/ip4/{ip}/" in addr:
                return addr
        raise NetLabError(f"none of {list(maddrs)} is on {ip}")
