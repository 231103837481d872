"""Fixtures shared by the in-process training tests."""

from __future__ import annotations

import pytest
import torch

from distributed_training.training.dht import DHTSettings, start_dht


@pytest.fixture(scope="module")
def dht():
    """One real DHT node per test module, on loopback."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums in the trainer and the reference; kind to 2 cores
    node = start_dht(DHTSettings(port=0, host_ip="127.0.0.1"))
    try:
        yield node
    finally:
        node.shutdown()
        torch.set_num_threads(threads)
