"""The shaped network of the swarm benchmark: a TCP stream between two namespaces runs at the set rate.

Needs root and iproute2 (CI runs the suite as root); skipped elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from distributed_training.localnet.netlab import NetLab, namespaces

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
                                reason="needs root and iproute2 (ip, tc)")

RATE_MBIT = 20.0
PAYLOAD = 3_000_000  # 1.2 s at 20 Mbit/s: long enough that the bucket's burst is a small part of it

# The receiver prints its port once it listens, then the bytes and seconds from first byte to end of stream.
RECEIVER = """
import socket, sys, time
server = socket.socket(); server.bind((sys.argv[1], 0)); server.listen(1)
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
first = conn.recv(65536); started = time.perf_counter(); total = len(first)
while chunk := conn.recv(65536):
    total += len(chunk)
print(total, time.perf_counter() - started, flush=True)
"""
SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as conn:
    conn.sendall(bytes(int(sys.argv[3])))
"""


def test_a_shaped_link_carries_tcp_at_its_rate_and_teardown_removes_everything() -> None:
    lab = NetLab(2, rate_mbit=RATE_MBIT, port=0)
    with lab:
        upload, download = lab.qdiscs(0)
        assert "tbf" in upload and "tbf" in download, (upload, download)
        sent_before = lab.sent_bytes()[0]
        receiver = subprocess.Popen([*lab.prefix(1), sys.executable, "-c", RECEIVER, lab.peers[1].ip],
                                    stdout=subprocess.PIPE, text=True)
        try:
            port = receiver.stdout.readline().strip()  # it listens: the sender can connect
            subprocess.run([*lab.prefix(0), sys.executable, "-c", SENDER, lab.peers[1].ip, port, str(PAYLOAD)],
                           check=True, timeout=60)
            received, seconds = receiver.communicate(timeout=60)[0].split()
        finally:
            receiver.kill()
            receiver.wait()
        assert int(received) == PAYLOAD
        mbit_per_s = PAYLOAD * 8 / float(seconds) / 1e6
        print(f"\n{PAYLOAD / 1e6:.1f} MB across a {RATE_MBIT:g} Mbit/s link: {mbit_per_s:.1f} Mbit/s")
        # unshaped, a veth pair carries several Gbit/s: a broken shaper fails the upper bound by far
        assert 0.5 * RATE_MBIT < mbit_per_s < 1.3 * RATE_MBIT, mbit_per_s
        # the counter the benchmark reads saw the stream, with its headers, on the sender's link
        sent = lab.sent_bytes()[0] - sent_before
        assert PAYLOAD < sent < 1.1 * PAYLOAD, sent
        created = [lab.hub, *(peer.namespace for peer in lab.peers)]
        assert set(created) <= set(namespaces())
    assert not set(created) & set(namespaces())
