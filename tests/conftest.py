"""Shared by both tiers: the DHT fixture of the in-process tests, and the unit-tier-first rule.

`tests/unit/` runs in one process in about a minute; `tests/swarm/` starts real OS processes and
takes most of the suite's time. Once a unit test has failed, the run stops before the first swarm
test (exit code 1, the failures reported): a broken build fails in a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_training.swarm.dht import DHTSettings, start_dht


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


UNIT_TIER = Path(__file__).resolve().parent / "unit"
_unit_failures: list[str] = []


def _in_unit_tier(path: Path) -> bool:
    return UNIT_TIER in Path(path).resolve().parents


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed and _in_unit_tier(Path(report.fspath)):
        _unit_failures.append(report.nodeid)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _unit_failures and not _in_unit_tier(item.path):
        pytest.exit(f"{len(_unit_failures)} unit test(s) failed; the swarm tier is not started", returncode=1)
