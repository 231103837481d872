"""Check and repair the environment after `pip install` (run by scripts/install.sh and the launchers).

Each check says what it found and what it changed; a second run changes nothing. The checks are
the environment faults that broke miners of the seed system:
- hivemind's bundled `p2pd` daemon lost its executable bit (some pip/zip paths drop it), so the
  DHT could not start;
- `nest_asyncio`, pulled in by another package, patched the event loop; it cannot patch uvloop's
  loops and broke hivemind's;
- uvloop missing or unusable;
- the offline corpus and tokenizer not in place, so a run without network could not start.

Exit code 0 when everything is (now) in order, 1 when something could not be fixed.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Callable


def check_p2pd() -> tuple[bool, list[str]]:
    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.origin:
        return False, ["hivemind is not installed: run `pip install -e .`"]
    p2pd = Path(spec.origin).parent / "hivemind_cli" / "p2pd"
    if not p2pd.exists():
        return False, [f"{p2pd} is missing: reinstall hivemind (`pip install --force-reinstall hivemind==1.1.12`)"]
    changes = []
    mode = p2pd.stat().st_mode
    if not mode & stat.S_IXUSR:
        p2pd.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        changes.append(f"made {p2pd} executable")
    probe = subprocess.run([str(p2pd), "-help"], capture_output=True, timeout=30)
    if probe.returncode not in (0, 2):  # Go's flag package exits 2 after printing -help
        return False, changes + [f"{p2pd} does not run (exit {probe.returncode}): wrong platform for this wheel?"]
    return True, changes


def check_nest_asyncio() -> tuple[bool, list[str]]:
    if importlib.util.find_spec("nest_asyncio") is None:
        return True, []
    result = subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "nest_asyncio"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return False, [f"could not remove nest_asyncio: {result.stderr.strip().splitlines()[-1:]}"]
    return True, ["removed nest_asyncio (it cannot patch uvloop loops and breaks hivemind)"]


def check_uvloop() -> tuple[bool, list[str]]:
    try:
        import uvloop

        loop = uvloop.new_event_loop()
        loop.run_until_complete(_noop())
        loop.close()
    except Exception as exc:  # any failure here means hivemind's event loops will not run
        return False, [f"uvloop unusable ({type(exc).__name__}: {exc}); reinstall it: pip install --force-reinstall uvloop"]
    return True, []


async def _noop() -> None:
    return None


def check_assets() -> tuple[bool, list[str]]:
    from distributed_training.data.assets import AssetsError, ensure_assets

    try:
        return True, ensure_assets(log=lambda _line: None)
    except AssetsError as exc:
        return False, [str(exc)]


CHECKS: list[tuple[str, Callable[[], tuple[bool, list[str]]]]] = [
    ("p2pd binary", check_p2pd),
    ("nest_asyncio absent", check_nest_asyncio),
    ("uvloop", check_uvloop),
    ("offline corpus and tokenizer", check_assets),
]


def main() -> int:
    changed, failed = 0, 0
    for name, check in CHECKS:
        ok, notes = check()
        status = "ok" if ok else "FAILED"
        print(f"post_install: {name}: {status}" + ("" if notes else " (no change)"))
        for note in notes:
            print(f"post_install:   {note}")
        changed += len(notes) if ok else 0
        failed += not ok
    print(f"post_install: {changed} change(s), {failed} failure(s)" if changed or failed else "post_install: no changes")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    sys.exit(main())
