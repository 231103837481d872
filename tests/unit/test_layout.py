"""The house's rules, read from the source: roles in `ls`, imports one way, hivemind only in swarm/."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_training.config import flags_for

PACKAGE = Path(__file__).resolve().parents[2] / "distributed_training"
SHARED = {"__init__.py", "config.py", "protocol.py", "logs.py", "files.py", "spec.py"}
ROLES = {"neuron", "chain", "data", "swarm", "training", "validation", "ops", "localnet", "transport"}
PRIVATE_SURFACE = PACKAGE / "swarm" / "hivemind_private"  # a package: one place, split by job
# config.py validates --dht.initial_peers with hivemind's multiaddr parser: a pure function, no process.
HIVEMIND_OUTSIDE_SWARM = {("config.py", "hivemind.utils.multiaddr")}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, module: str, top_level_only: bool) -> list[str]:
    """Absolute names of what `module` imports (relative imports resolved); only module-level ones if asked."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # `from . import x` may name a module
    return names


def test_ls_shows_the_roles_and_only_shared_loose_modules() -> None:
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    loose = {name for name in entries if name.endswith(".py")}
    packages = {name for name in entries if (PACKAGE / name).is_dir()}
    assert loose == SHARED, f"loose modules other than the shared ones: {sorted(loose - SHARED)}"
    assert packages == ROLES, sorted(packages ^ ROLES)


def test_shared_modules_import_no_role_package() -> None:
    modules = _modules()
    for name in SHARED:
        module = "distributed_training" if name == "__init__.py" else f"distributed_training.{name[:-3]}"
        for imported in _imports(modules[module], module, top_level_only=False):
            role = imported.split(".")[1] if imported.startswith("distributed_training.") else None
            assert role not in ROLES, f"{name} imports {imported}: shared basics stand below every role"


def test_no_import_cycle_between_modules() -> None:
    modules = _modules()
    graph = {name: {imp for imp in _imports(path, name, top_level_only=True) if imp in modules and imp != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_swarm_imports_hivemind() -> None:
    offenders = []
    for name, path in _modules().items():
        if name.startswith("distributed_training.swarm"):
            continue
        for imported in _imports(path, name, top_level_only=False):
            relative = str(path.relative_to(PACKAGE))
            if (imported == "hivemind" or imported.startswith("hivemind.")) and not any(
                    relative == where and imported.startswith(allowed) for where, allowed in HIVEMIND_OUTSIDE_SWARM):
                offenders.append(f"{relative}: {imported}")
    assert not offenders, offenders


# Attributes of hivemind objects this project holds (optimizer, averager, tracker, DHT, ...) that start
# with an underscore; `self._x` and `cls._x` are a class's own and do not count.
PRIVATE_USE = re.compile(r"\b(?!self\b|cls\b)(?:optimizer|averager|tracker|dht|state_averager|grad_averager|p2p|"
                         r"control|runner|hivemind)\.(_[a-z]\w*)")


def test_private_hivemind_surface_is_used_only_in_its_module() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if PRIVATE_SURFACE in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_USE.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, offenders
    # and the module that does use it refuses any other hivemind release
    source = (PRIVATE_SURFACE / "__init__.py").read_text()
    assert re.search(r'SUPPORTED_HIVEMIND = "1\.1\.12"', source) and "\ncheck_hivemind_version()\n" in source


def test_other_hivemind_version_is_refused_in_one_line() -> None:
    from distributed_training.swarm import HivemindVersionError
    from distributed_training.swarm.hivemind_private import check_hivemind_version

    check_hivemind_version("1.1.12")
    with pytest.raises(HivemindVersionError) as info:
        check_hivemind_version("1.2.0")
    assert "1.2.0" in str(info.value) and "1.1.12" in str(info.value) and "\n" not in str(info.value)


def test_miner_flags_and_help_have_no_behaviour_switch() -> None:
    names = {flag.name for flag in flags_for("miner")}
    assert not {n for n in names if "behaviour" in n or "copy_uid" in n}, names
    entry = Path(__file__).resolve().parents[2] / "neurons" / "miner.py"
    help_text = subprocess.run([sys.executable, str(entry), "--help"], capture_output=True, text=True,
                               timeout=60, check=True).stdout
    assert "--neuron.run_id" in help_text and "behaviour" not in help_text and "copycat" not in help_text


def test_no_package_module_is_far_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_entry_points_stay_thin() -> None:
    entries = Path(__file__).resolve().parents[2] / "neurons"
    for script in ("miner.py", "validator.py"):
        assert len((entries / script).read_text().splitlines()) <= 20, script
