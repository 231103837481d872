"""Checking a machine against `min.compute.yml`, so an operator learns before the first epoch
that a preset will not fit, instead of from an out-of-memory crash an hour in."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

REQUIREMENTS_FILE = Path(__file__).resolve().parents[2] / "min.compute.yml"


@dataclass(frozen=True)
class Finding:
    resource: str
    have: Optional[float]
    minimum: float
    recommended: float

    @property
    def level(self) -> str:
        if self.have is None:
            return "unknown"
        if self.have < self.minimum:
            return "below minimum"
        if self.have < self.recommended:
            return "below recommended"
        return "ok"


def load_requirements(role: str, preset: str, path: Path = REQUIREMENTS_FILE) -> dict[str, dict[str, float]]:
    table = yaml.safe_load(path.read_text())
    try:
        return table[role][preset]
    except KeyError:
        raise ValueError(f"{path} has no entry for role {role!r} and preset {preset!r}") from None


def _ram_gb() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        return None
    return None


def _gpu_memory_gb() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())) / 1024**3


def measure(disk_path: Path) -> dict[str, Optional[float]]:
    disk_path.mkdir(parents=True, exist_ok=True)
    return {
        "gpu_memory_gb": _gpu_memory_gb(),
        "ram_gb": _ram_gb(),
        "disk_gb": shutil.disk_usage(disk_path).free / 1024**3,
        "cpu_cores": float(os.cpu_count() or 0),
        "bandwidth_mbps": None,  # needs a peer to measure against; reported, not checked
    }


def check_compute(role: str, preset: str, disk_path: Path) -> list[Finding]:
    needs = load_requirements(role, preset)
    have = measure(disk_path)
    return [Finding(resource, have.get(resource), needs["min"][resource], needs["recommended"][resource])
            for resource in needs["min"]]


def format_findings(findings: list[Finding]) -> list[str]:
    lines = []
    for f in findings:
        have = "not measured" if f.have is None else f"{f.have:.1f}"
        lines.append(f"{f.resource:<15} have {have:>12}  min {f.minimum:g}  recommended {f.recommended:g}  -> {f.level}")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dt-check-compute", description="compare this machine with min.compute.yml")
    parser.add_argument("--role", choices=("miner", "validator"), default="miner")
    parser.add_argument("--model.preset", dest="preset", default="gpt2-124m")
    parser.add_argument("--path", default=str(Path.home()), help="where state and checkpoints will live (disk check)")
    args = parser.parse_args(argv)
    try:
        findings = check_compute(args.role, args.preset, Path(args.path).expanduser())
    except ValueError as exc:
        print(f"dt-check-compute: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.role} / {args.preset}:")
    for line in format_findings(findings):
        print("  " + line)
    below = [f for f in findings if f.level == "below minimum"]
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
