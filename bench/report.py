"""Printing a benchmark's table and recording it in docs/benchmarks.md under its own heading.

Each benchmark owns one section, delimited by HTML comments, so re-running one benchmark
replaces its figures and leaves the others' alone.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Sequence

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Each section is written by the script named in it; run that command to reproduce it. Figures
are ratios measured within one run on the same machine; absolute times on a shared machine are
noise.
"""


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def record(key: str, title: str, command: str, body: str) -> None:
    """Print `body` and replace the section `key` of docs/benchmarks.md with it."""
    print(body)
    stamp = time.strftime("%Y-%m-%d")
    section = (f"<!-- {key}:start -->\n## {title}\n\n`{command}`\n\n"
               f"Measured {stamp} on {platform.machine()}, {platform.python_implementation()} "
               f"{platform.python_version()}.\n\n{body}\n<!-- {key}:end -->")
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS_MD.write_text(text)
    print(f"\nrecorded in {BENCHMARKS_MD}", file=sys.stderr)
