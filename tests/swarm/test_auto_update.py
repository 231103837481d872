"""The pm2 launchers (run_miner.sh / run_validator.sh, scripts/auto_update.sh), for real.

The end-to-end test runs a private pm2 (its own PM2_HOME, never the operator's daemon), a bare git
repository as the remote, and a checkout of it whose launcher runs a real dt-miner. It pushes
releases to the remote and watches what the launcher does: a newer version is pulled, installed
and the neuron restarted on it and watched until it joins the swarm; a broken release is rolled
back with the neuron left running; local changes make it skip the update without touching them; a
hanging `git fetch` times out with the neuron left running; a restarted launcher keeps the healthy
neuron; a release that passes the checks but crashes at start-up is rolled back after its restart
and marked bad for good; a release whose pip install fails is rolled back.

The checkout gets its own light virtual environment: its own editable install of the checkout
(so /work/main's .venv is never re-pointed), with the heavy dependencies (torch, hivemind, ...)
seen through a directory of links to this interpreter's site-packages, minus this package.
pm2 comes from PATH, else from npm into a cache directory reused across runs.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

MAIN = Path(__file__).resolve().parents[2]
LAUNCHER_FILES = ("run_miner.sh", "run_validator.sh", "scripts/auto_update.sh", "scripts/install.sh")
PM2_CACHE = Path(os.environ.get("DT_PM2_CACHE", Path.home() / ".cache" / "distributed-training" / "pm2"))
INTERVAL = 3  # seconds between the launcher's polls
INSTALL_ALLOWANCE = 90  # seconds an update (pip, checks, pm2 restart) may take on a loaded machine
WATCH = 240  # --update.watch: a miner on a loaded machine joins within this (a crash loop is seen sooner)
MAX_RESTARTS = 2  # UPDATE_MAX_RESTARTS: the third restart of a watched neuron is a crash loop
FETCH_TIMEOUT = 5  # UPDATE_FETCH_TIMEOUT
NAME = "dtau"
NEURON = f"{NAME}-neuron"
GIT_ENV = {"GIT_AUTHOR_NAME": "release-bot", "GIT_AUTHOR_EMAIL": "release@example.invalid",
           "GIT_COMMITTER_NAME": "release-bot", "GIT_COMMITTER_EMAIL": "release@example.invalid",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}
# Appended to the package's __init__ in the test releases: every process importing the release
# records its pid and version, which proves what the restarted neuron process really runs.
IMPORT_HOOK = ('import os as _os\nif _os.environ.get("DT_TEST_IMPORT_LOG"):\n'
               '    with open(_os.environ["DT_TEST_IMPORT_LOG"], "a") as _f:\n'
               '        _f.write(f"{_os.getpid()} {__version__}\\n")\n')

# The test releases' post_install.py: records that it ran, and for which version (without importing
# the package, so that a broken release fails at the launcher's import check, not here).
POST_INSTALL = ('import os, re\n'
                'version = re.search(r\'__version__ = "([^"]+)"\', open("distributed_training/__init__.py").read())[1]\n'
                'with open(os.environ["DT_TEST_POST_INSTALL_LOG"], "a") as f:\n'
                '    f.write(version + "\\n")\n')

# Appended to the fixed release: while the file DT_TEST_HOLD names exists, its neuron waits before it starts
# (at import, so the launcher's import and --help checks are not held): the test restarts the launcher
# while the launcher is watching that neuron.
HOLD_HOOK = ('import sys as _sys, time as _time\n'
             'if _os.environ.get("DT_TEST_HOLD") and _sys.argv[0].endswith("dt-miner") and "--help" not in _sys.argv:\n'
             '    while _os.path.exists(_os.environ["DT_TEST_HOLD"]):\n'
             '        _time.sleep(0.2)\n')
# A release's neurons/miner.py that imports and answers --help (the launcher's checks pass) but raises
# once it starts for real: the failure an operator measured (pm2 restarted it 8 times in 90 s).
CRASHING_MINER = ('"""Test release: parses its flags like the real miner, then raises at start-up."""\n'
                  'import sys\n\n\n'
                  'def main(argv=None):\n'
                  '    from distributed_training.config import parse_or_exit\n\n'
                  '    parse_or_exit("miner", sys.argv[1:] if argv is None else argv)  # --help exits here\n'
                  '    raise RuntimeError("test release: the miner raises at start-up")\n\n\n'
                  'if __name__ == "__main__":\n'
                  '    sys.exit(main())\n')
# The checkout's remote.origin.uploadpack during the hanging-fetch step: `git fetch` waits on it forever.
HANGING_UPLOAD_PACK = "#!/bin/sh\n# a remote that accepts the connection and never answers\nwhile :; do sleep 1; done\n"


def _run(cmd, cwd=None, env=None, timeout=300, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# -- cheap checks (no pm2) -------------------------------------------------------------------------
@pytest.mark.parametrize("newer, older, code", [
    ("0.3.0", "0.1.0", 0), ("0.1.0", "0.3.0", 1), ("0.1.0", "0.1.0", 1), ("0.10.0", "0.9.0", 0),
    ("1.0.0", "0.99.99", 0), ("1.0.0", "1.0.0-rc.1", 0), ("1.0.0-rc.1", "1.0.0", 1),
    ("1.0.0-rc.10", "1.0.0-rc.9", 0), ("1.0.0-beta", "1.0.0-alpha.1", 0), ("1.0.0+build.7", "1.0.0", 1),
    ("1.2.1", "1.2", 0), ("1.2", "1.2.0", 1), ("not-a-version", "1.0.0", 2),
])
def test_semantic_version_comparison(newer, older, code):
    assert _run(["bash", MAIN / "scripts/auto_update.sh", "version-gt", newer, older], check=False).returncode == code


@pytest.mark.parametrize("script", ["run_miner.sh", "run_validator.sh"])
def test_bad_interval_or_limit_is_refused_before_anything_starts(script):
    env = {**os.environ, "UPDATE_INTERVAL": "soon", "DT_PM2": "/nonexistent/pm2"}
    proc = _run(["bash", MAIN / script, "--neuron.batch_size", "2"], env=env, check=False)
    assert proc.returncode == 2
    assert "must be a whole number of seconds" in proc.stdout and "'soon'" in proc.stdout
    proc = _run(["bash", MAIN / script, "--update.interval=-5"], env=env, check=False)
    assert proc.returncode == 2 and "'-5'" in proc.stdout
    env["UPDATE_INTERVAL"] = "5"
    proc = _run(["bash", MAIN / script, "--update.watch", "later"], env=env, check=False)
    assert proc.returncode == 2 and "--update.watch / UPDATE_WATCH must be a whole number" in proc.stdout
    proc = _run(["bash", MAIN / script], env={**env, "UPDATE_FETCH_TIMEOUT": "0"}, check=False)
    assert proc.returncode == 2 and "UPDATE_FETCH_TIMEOUT must be a whole number of at least 1, not '0'" in proc.stdout


# -- the end-to-end test ---------------------------------------------------------------------------
def _pm2_binary() -> Path:
    found = shutil.which("pm2")
    if found:
        return Path(found)
    cached = PM2_CACHE / "node_modules" / ".bin" / "pm2"
    if not cached.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("pm2 is not on PATH and npm is not installed to fetch it (install node + npm, or pm2)")
        proc = subprocess.run([npm, "install", "--prefix", str(PM2_CACHE), "pm2@5", "--no-audit", "--no-fund"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not cached.exists():
            pytest.fail(f"could not install pm2 from the npm registry into {PM2_CACHE}:\n{proc.stdout}\n{proc.stderr}")
    return cached


def _light_venv(root: Path) -> Path:
    """A venv whose only own package is the checkout's; the heavy dependencies come from this interpreter's."""
    shared = Path(sysconfig.get_paths()["purelib"])
    links = root / "shared-deps"
    links.mkdir()
    for entry in shared.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.startswith(("distributed_training", "__editable__", "easy_install")) or name.endswith(".egg-link"):
            continue  # this package's own install in the shared venv stays out of sight
        (links / entry.name).symlink_to(entry)
    venv = root / "venv"
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv])
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    (site / "zz_shared_deps.pth").write_text(f"import site; site.addsitedir({str(links)!r})\n")
    return venv / "bin" / "python"


def _bump(version: str, minor_by: int) -> str:
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())
    return f"{major}.{minor + minor_by}.0"


class Rig:
    """Everything the scenario touches, under one temporary directory."""

    def __init__(self, root: Path, pm2: Path):
        self.root, self.pm2 = root, pm2
        self.remote, self.dev, self.checkout = root / "remote.git", root / "dev", root / "checkout"
        self.state = root / "state"
        self.imports = root / "imports.log"  # pid and version of every process importing a test release
        self.post_install = root / "post_install.log"
        self.hold = root / "hold"  # see HOLD_HOOK
        self.env = {**os.environ, **GIT_ENV, "PM2_HOME": str(root / "pm2"),
                    "PATH": f"{pm2.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    # keeps the reinstall light and offline: dependencies are already there
                    "PIP_NO_DEPS": "1", "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
                    "PIP_DISABLE_PIP_VERSION_CHECK": "1", "DT_KILL_TIMEOUT_MS": "3000",
                    "DT_TEST_IMPORT_LOG": str(self.imports), "DT_TEST_POST_INSTALL_LOG": str(self.post_install),
                    "DT_TEST_HOLD": str(self.hold),
                    # short limits for the launcher (its --update.watch is given on its command line)
                    "UPDATE_MAX_RESTARTS": str(MAX_RESTARTS), "UPDATE_STABLE": "2", "UPDATE_WATCH_POLL": "2",
                    "UPDATE_FETCH_TIMEOUT": str(FETCH_TIMEOUT)}
        for key in ("UPDATE_INTERVAL", "UPDATE_WATCH", "UPDATE_INSTALL_TIMEOUT", "UPDATE_POST_INSTALL_TIMEOUT",
                    "UPDATE_CHECK_TIMEOUT", "DT_PM2_TIMEOUT", "DT_PYTHON", "DT_POST_INSTALL", "DT_PM2", "DT_PM2_NAME",
                    "pm_id", "name"):
            self.env.pop(key, None)
        self.bad_commits = self.checkout / ".git" / "dt-auto-update" / "bad-commits"

    # git ----------------------------------------------------------------------------------------
    def git(self, repo: Path, *args: str) -> str:
        return _run(["git", "-C", repo, *args], env=self.env).stdout.strip()

    def head(self) -> str:
        return self.git(self.checkout, "rev-parse", "HEAD")

    def release(self, version: str, message: str, extra: str = "", files: dict | None = None) -> str:
        """Commit a version bump (plus `extra` appended to the package's __init__) and push it."""
        init = self.dev / "distributed_training" / "__init__.py"
        text = re.sub(r'^__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text(), flags=re.M)
        text = text.split("# -- test release --")[0].rstrip("\n") + "\n"
        init.write_text(text + (f"\n# -- test release --\n{extra}" if extra else ""))
        for rel, content in (files or {}).items():
            (self.dev / rel).write_text(content)
        self.git(self.dev, "add", "-A")
        self.git(self.dev, "commit", "-q", "-m", message)
        self.git(self.dev, "push", "-q", "origin", "HEAD:main")
        return self.git(self.dev, "rev-parse", "HEAD")

    # pm2 ----------------------------------------------------------------------------------------
    def pm2_cmd(self, *args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
        return _run([self.pm2, *args], cwd=self.checkout, env=self.env, timeout=timeout, check=check)

    def processes(self) -> dict[str, dict]:
        out = self.pm2_cmd("jlist").stdout
        data = json.loads(out[out.index("["):])  # pm2 may print a banner before the JSON
        return {p["name"]: {"pid": p.get("pid"), "status": p["pm2_env"].get("status"),
                            "restarts": p["pm2_env"].get("restart_time"),
                            "since_ms": p["pm2_env"].get("pm_uptime"),  # when pm2 started this process
                            "out": p["pm2_env"].get("pm_out_log_path"),
                            "err": p["pm2_env"].get("pm_err_log_path")} for p in data}

    def launcher_log(self) -> str:
        path = self.root / "pm2" / "logs" / f"{NAME}-out.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def neuron_log(self) -> str:
        path = self.root / "pm2" / "logs" / f"{NEURON}-error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def starts(self, since_ms: int = 0) -> int:
        """The neuron's start events (it has joined the swarm) written at or after `since_ms`."""
        metrics = self.state / "metrics.jsonl"
        if not metrics.exists():
            return 0
        events = []
        for line in metrics.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return sum(1 for e in events if e.get("event") == "start" and e.get("time", 0) * 1000 >= since_ms)

    def bad(self) -> dict[str, str]:
        """The launcher's persistent list of bad commits: sha -> the rest of its line."""
        if not self.bad_commits.exists():
            return {}
        return dict(line.split(" ", 1) for line in self.bad_commits.read_text().splitlines() if line.strip())

    def imported(self) -> list[tuple[int, str]]:
        if not self.imports.exists():
            return []
        return [(int(pid), version) for pid, version in
                (line.split() for line in self.imports.read_text().splitlines() if line.strip())]


def _wait(what: str, condition, timeout: float, rig: Rig, every: float = 0.5):
    """Poll `condition` until it returns something truthy; fail with the logs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for: {what}\n--- launcher log ---\n"
                        f"{rig.launcher_log()}\n--- neuron stderr (tail) ---\n{rig.neuron_log()}")
        time.sleep(every)


def _log_after(rig: Rig, mark: int, pattern: str):
    """The first launcher-log line after character `mark` matching `pattern`, else None."""
    for line in rig.launcher_log()[mark:].splitlines():
        if re.search(pattern, line):
            return line
    return None


def _log_time(line: str) -> float:
    """The UTC timestamp a launcher-log line starts with, as seconds since the epoch."""
    return calendar.timegm(time.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%SZ"))


def _pids_mentioning(text) -> list[int]:
    """Processes whose command line mentions `text` (not this one)."""
    found, me = [], os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            if str(text) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _kill_leftovers(root: Path) -> list[str]:
    """Kill processes whose command line mentions the rig's directory (only ever ones this test started)."""
    killed, me = [], os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(f"{proc.name} ({cmdline[:160].strip()})")
            except OSError:
                pass
    return killed


def test_launcher_updates_rolls_back_and_respects_local_changes():
    pm2 = _pm2_binary()
    root = Path(tempfile.mkdtemp(prefix="dt-autoupd-"))
    rig = Rig(root, pm2)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        # The remote: /work/main's committed HEAD plus the working-tree versions of the launcher files.
        _run(["git", "clone", "-q", MAIN, rig.dev], env=rig.env)
        for rel in LAUNCHER_FILES:
            (rig.dev / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(MAIN / rel, rig.dev / rel)
        rig.git(rig.dev, "add", "-A")
        rig.git(rig.dev, "commit", "-q", "--allow-empty", "-m", "launchers under test")
        rig.git(rig.dev, "init", "-q", "--bare", str(rig.remote))
        rig.git(rig.dev, "remote", "set-url", "origin", str(rig.remote))
        rig.git(rig.dev, "push", "-q", "origin", "HEAD:refs/heads/main")
        _run(["git", "clone", "-q", "-b", "main", rig.remote, rig.checkout], env=rig.env)
        base_sha = rig.head()
        base_version = re.search(r'__version__ = "([^"]+)"',
                                 (rig.checkout / "distributed_training/__init__.py").read_text()).group(1)

        python = _light_venv(root)
        rig.env["DT_PYTHON"] = str(python)
        _run([python, "-m", "pip", "install", "-q", "-e", rig.checkout], env=rig.env)
        assert _run([python, "-c", "import distributed_training as d; print(d.__file__)"],
                    cwd=root, env=rig.env).stdout.strip() == str(rig.checkout / "distributed_training/__init__.py")
        timings["setup (clones, venv, install)"] = time.monotonic() - t0

        # Start the launcher; it starts the neuron as a second pm2 process.
        t = time.monotonic()
        miner_flags = ["--neuron.swarm_only", "--model.preset", "tiny", "--model.seq_len", "16",
                       "--neuron.batch_size", "2", "--neuron.torch_threads", "1", "--dht.port", "0",
                       "--neuron.state_dir", str(rig.state),
                       # waits for peers that never come instead of training: a real miner that idles (light CPU)
                       "--neuron.wait_for_peers", "2", "--dht.bootstrap_timeout", "86400"]
        rig.pm2_cmd("start", rig.checkout / "run_miner.sh", "--name", NAME, "--",
                    "--update.interval", str(INTERVAL), "--update.watch", str(WATCH), *miner_flags)
        # The launcher logs "started" once pm2 has the neuron; then one jlist (pm2 calls cost CPU) confirms it.
        _wait("the launcher starting the neuron", lambda: _log_after(rig, 0, r"started: pm2 process " + NEURON), 120, rig)
        procs = _wait("the neuron online under pm2", lambda: (p := rig.processes()).get(NEURON, {}).get("status") == "online"
                      and p, 60, rig, every=2.0)
        first_pid = procs[NEURON]["pid"]
        assert procs[NAME]["status"] == "online"
        launcher_pid = procs[NAME]["pid"]
        cmdline = Path(f"/proc/{first_pid}/cmdline").read_bytes().decode(errors="replace")
        assert "--update.interval" not in cmdline and "--update.watch" not in cmdline
        assert _wait("the launcher polling", lambda: _log_after(rig, 0, r"up to date: local " + re.escape(base_version)),
                     2 * INTERVAL + 30, rig)
        timings["launcher + neuron start"] = time.monotonic() - t

        # 1. A newer release (skipping a version): pulled, installed, post_install.py run, neuron restarted on it,
        #    watched until it has joined the swarm (its start event), and only then the launcher moves on.
        good_version = _bump(base_version, 2)
        mark = len(rig.launcher_log())
        t = time.monotonic()
        good_sha = rig.release(
            good_version, f"release {good_version}",
            extra=IMPORT_HOOK,
            files={"post_install.py": POST_INSTALL})
        _wait(f"the update to {good_version}", lambda: _log_after(rig, mark, r"^\S+ \[auto-update \S+\] (updated|update failed)"),
              2 * INTERVAL + INSTALL_ALLOWANCE, rig)
        assert _log_after(rig, mark, rf"updated: now at {re.escape(good_version)}"), rig.launcher_log()
        assert _log_after(rig, mark, r"failed: reinstall") is None
        assert rig.head() == good_sha
        procs = _wait("the restarted neuron online", lambda: (p := rig.processes())[NEURON]["status"] == "online"
                      and p, 60, rig, every=2.0)
        second_pid, second_since = procs[NEURON]["pid"], procs[NEURON]["since_ms"]
        assert second_pid != first_pid and procs[NEURON]["restarts"] == 1
        assert _log_after(rig, mark, rf"restarted {NEURON} \(pid {first_pid} -> {second_pid}\)")
        # The new neuron process itself loaded the new release's code.
        _wait("the new neuron importing the new release", lambda: (second_pid, good_version) in rig.imported(), 60, rig)
        assert rig.post_install.read_text().split() == [good_version]
        timings[f"update {base_version} -> {good_version} (push to neuron restarted)"] = time.monotonic() - t
        # The watch ends when the restarted neuron has joined the swarm (a miner takes a while on a loaded machine).
        t = time.monotonic()
        assert _log_after(rig, mark, rf"watching {NEURON} on {re.escape(good_version)} for up to {WATCH}s")
        line = _wait("the launcher finding the new release healthy", lambda: _log_after(rig, mark, r"healthy:|update failed"),
                     WATCH + 60, rig, every=1.0)
        assert f"healthy: {good_version} ({good_sha[:12]}): joined the swarm" in line, rig.launcher_log()
        assert rig.starts(since_ms=second_since) >= 1  # the start event the launcher saw is the new process's
        assert _wait("the re-exec", lambda: _log_after(rig, mark, rf"re-executing the launcher of {re.escape(good_version)}"),
                     30, rig)
        procs = rig.processes()
        assert procs[NEURON]["pid"] == second_pid and procs[NEURON]["restarts"] == 1
        assert procs[NAME]["pid"] == launcher_pid and procs[NAME]["restarts"] == 0  # re-exec'd in place
        timings["watch: restarted neuron joined the swarm"] = time.monotonic() - t

        # 2. A broken release: the import check fails, the checkout is rolled back, the neuron is left alone.
        broken_version = _bump(base_version, 3)
        mark = len(rig.launcher_log())
        t = time.monotonic()
        broken_sha = rig.release(broken_version, f"release {broken_version} (broken)", extra=IMPORT_HOOK + "def broken(:\n")
        _wait(f"the failed update to {broken_version}", lambda: _log_after(rig, mark, r"rolled back|ROLLBACK FAILED|updated:"),
              2 * INTERVAL + INSTALL_ALLOWANCE, rig)
        assert _log_after(rig, mark, r"failed: import check"), rig.launcher_log()
        assert _log_after(rig, mark, rf"update failed: {re.escape(broken_version)} \({broken_sha[:12]}\)"), rig.launcher_log()
        assert _log_after(rig, mark, rf"rolled back: checkout at {good_sha[:12]} \(version {re.escape(good_version)}\)")
        assert rig.head() == good_sha
        assert rig.git(rig.checkout, "status", "--porcelain", "--untracked-files=no") == ""
        assert _run([python, "-c", "import distributed_training as d; print(d.__version__)"], cwd=root,
                    env=rig.env).stdout.strip() == good_version
        assert "import check" in rig.bad().get(broken_sha, ""), rig.bad()
        # Not retried every poll: the next poll says so and changes nothing.
        _wait("the launcher skipping the known-bad commit",
              lambda: _log_after(rig, mark, rf"skip: \S+ {re.escape(broken_version)} \({broken_sha[:12]}\) failed to install before"),
              2 * INTERVAL + 30, rig)
        procs = rig.processes()
        assert procs[NEURON]["pid"] == second_pid and procs[NEURON]["status"] == "online"
        assert procs[NEURON]["restarts"] == 1
        timings[f"broken {broken_version} -> rolled back"] = time.monotonic() - t

        # 3. Local changes to a tracked file: the update is skipped and the change is left as it is.
        fixed_version = _bump(base_version, 4)
        readme = rig.checkout / "README.md"
        edited = readme.read_text() + "\nlocal operator note\n"
        readme.write_text(edited)
        mark = len(rig.launcher_log())
        t = time.monotonic()
        fixed_sha = rig.release(fixed_version, f"release {fixed_version} (fixes {broken_version})",
                                extra=IMPORT_HOOK + HOLD_HOOK)
        line = _wait("the launcher skipping because of local changes",
                     lambda: _log_after(rig, mark, r"skip: update .* local changes"), 2 * INTERVAL + 30, rig)
        assert "README.md" in line and fixed_version in line
        assert readme.read_text() == edited
        assert rig.head() == good_sha
        assert rig.git(rig.checkout, "status", "--porcelain", "--untracked-files=no") == "M README.md"
        assert not _log_after(rig, mark, r"updating:")
        procs = rig.processes()
        assert procs[NEURON]["pid"] == second_pid and procs[NEURON]["restarts"] == 1
        timings["local change -> skipped"] = time.monotonic() - t

        # 4. Once the operator reverts the change, the next poll updates to the newest release. Its neuron is
        #    held before it starts while pm2 restarts the launcher in the middle of the watch: the new launcher
        #    keeps that neuron (same flags, same commit) and resumes the watch, which ends when it has started.
        t = time.monotonic()
        mark = len(rig.launcher_log())
        rig.hold.write_text("")
        rig.git(rig.checkout, "checkout", "--", "README.md")
        _wait(f"the update to {fixed_version}", lambda: _log_after(rig, mark, r"updated:|update failed"),
              2 * INTERVAL + INSTALL_ALLOWANCE, rig)
        assert _log_after(rig, mark, rf"updated: now at {re.escape(fixed_version)} \({fixed_sha[:12]}\)"), rig.launcher_log()
        assert rig.head() == fixed_sha
        procs = _wait("the neuron restarted again", lambda: (p := rig.processes())[NEURON]["status"] == "online"
                      and p, 60, rig, every=2.0)
        fixed_pid = procs[NEURON]["pid"]
        assert fixed_pid != second_pid and procs[NEURON]["restarts"] == 2
        _wait("the neuron importing the fixed release", lambda: (fixed_pid, fixed_version) in rig.imported(), 60, rig)
        _wait("the launcher watching it", lambda: _log_after(rig, mark, rf"watching {NEURON} on {re.escape(fixed_version)}"),
              30, rig)
        rig.pm2_cmd("restart", NAME)  # the launcher is restarted in the middle of its watch
        line = _wait("the restarted launcher's decision about the neuron",
                     lambda: _log_after(rig, mark, rf"keeping {NEURON}|replacing the existing|started: pm2"), 60, rig)
        assert f"launcher (re)started; keeping {NEURON} (pid {fixed_pid})" in line, rig.launcher_log()
        _wait("the restarted launcher resuming the watch",
              lambda: _log_after(rig, mark, rf"resuming the watch of {NEURON} on {re.escape(fixed_version)}"), 30, rig)
        assert not _log_after(rig, mark, r"healthy:|update failed")
        rig.hold.unlink()
        line = _wait("the launcher finding the fixed release healthy", lambda: _log_after(rig, mark, r"healthy:|update failed"),
                     WATCH + 60, rig, every=1.0)
        assert f"healthy: {fixed_version} ({fixed_sha[:12]})" in line, rig.launcher_log()
        procs = rig.processes()
        assert procs[NEURON]["pid"] == fixed_pid and procs[NEURON]["restarts"] == 2 and procs[NAME]["restarts"] == 1
        timings[f"local change reverted -> updated to {fixed_version}, launcher restarted while watching, healthy"] = \
            time.monotonic() - t

        # 5. A remote whose `git fetch` hangs: the fetch times out, the poll is skipped, the neuron keeps running.
        t = time.monotonic()
        _wait("the launcher polling again", lambda: _log_after(rig, mark, rf"up to date: local {re.escape(fixed_version)}"),
              2 * INTERVAL + 30, rig)
        hang = root / "hanging-upload-pack.sh"
        hang.write_text(HANGING_UPLOAD_PACK)
        hang.chmod(0o755)
        mark = len(rig.launcher_log())
        rig.git(rig.checkout, "config", "remote.origin.uploadpack", str(hang))
        line = _wait("the hanging fetch timing out", lambda: _log_after(rig, mark, r"skip: git fetch"),
                     INTERVAL + FETCH_TIMEOUT + 60, rig)
        assert f"timed out after {FETCH_TIMEOUT}s (UPDATE_FETCH_TIMEOUT)" in line and "keeps running" in line, line
        rig.git(rig.checkout, "config", "--unset", "remote.origin.uploadpack")
        mark = len(rig.launcher_log())
        _wait("the launcher polling normally again", lambda: _log_after(rig, mark, rf"up to date: local {re.escape(fixed_version)}"),
              2 * INTERVAL + FETCH_TIMEOUT + 30, rig)
        procs = rig.processes()
        assert procs[NEURON]["pid"] == fixed_pid and procs[NEURON]["status"] == "online" and procs[NEURON]["restarts"] == 2
        assert not [pid for pid in _pids_mentioning(hang)], "the timed-out fetch left processes behind"
        timings["hanging fetch -> timed out, neuron untouched"] = time.monotonic() - t

        # 6. A release that imports and answers --help but raises at start-up: deployed, then seen crash-looping
        #    during the watch, rolled back (reinstalled, post_install.py run, neuron restarted on the previous
        #    release) and marked bad.
        t = time.monotonic()
        crash_version = _bump(base_version, 5)
        miner_py = rig.dev / "neurons" / "miner.py"
        real_miner = miner_py.read_text()
        mark = len(rig.launcher_log())
        post_installs = len(rig.post_install.read_text().split())
        crash_sha = rig.release(crash_version, f"release {crash_version} (raises at start-up)", extra=IMPORT_HOOK,
                                files={"neurons/miner.py": CRASHING_MINER})
        line = _wait(f"the rollback of {crash_version}", lambda: _log_after(rig, mark, r"rolled back:|ROLLBACK FAILED|healthy:"),
                     2 * INTERVAL + 2 * INSTALL_ALLOWANCE + WATCH, rig, every=1.0)
        assert _log_after(rig, mark, rf"updated: now at {re.escape(crash_version)} \({crash_sha[:12]}\)"), rig.launcher_log()
        failed = _log_after(rig, mark, rf"update failed: {re.escape(crash_version)} \({crash_sha[:12]}\) after its restart: crash loop")
        assert failed and f"rolling back to {fixed_sha[:12]}" in failed, rig.launcher_log()
        assert re.search(rf"rolled back: checkout at {fixed_sha[:12]} \(version {re.escape(fixed_version)}\) and reinstalled; "
                         rf"restarted {NEURON} on it", line), rig.launcher_log()
        assert _log_after(rig, mark, rf"marked bad: {crash_sha[:12]}")
        assert "crash loop" in rig.bad().get(crash_sha, ""), rig.bad()
        assert rig.head() == fixed_sha
        assert rig.git(rig.checkout, "status", "--porcelain", "--untracked-files=no") == ""
        # Rolled back within the watch window, counted from the restart into the crashing release.
        restarted_at = _log_time(_log_after(rig, mark, rf"updated: now at {re.escape(crash_version)}"))
        assert _log_time(line) - restarted_at < WATCH, rig.launcher_log()
        # The reinstall ran the previous release's post_install.py; the neuron is back on it and online.
        assert rig.post_install.read_text().split()[post_installs:] == [crash_version, fixed_version]
        procs = _wait("the neuron back online on the previous release",
                      lambda: (p := rig.processes())[NEURON]["status"] == "online" and p, 60, rig, every=2.0)
        back_pid = procs[NEURON]["pid"]
        assert (back_pid, crash_version) not in rig.imported()
        _wait("the neuron importing the previous release", lambda: (back_pid, fixed_version) in rig.imported(), 60, rig)
        assert any(v == crash_version for _, v in rig.imported())  # the crashing release did start (and crash)
        timings[f"crash at start-up {crash_version} -> rolled back"] = time.monotonic() - t

        # 7. pm2 restarts the launcher itself: it keeps the healthy neuron of the same commit, and the bad
        #    commit stays bad (the list is on disk, not in the launcher's memory).
        t = time.monotonic()
        restarts = rig.processes()[NEURON]["restarts"]
        mark = len(rig.launcher_log())
        rig.pm2_cmd("restart", NAME)
        line = _wait("the restarted launcher's decision about the neuron",
                     lambda: _log_after(rig, mark, rf"keeping {NEURON}|replacing the existing|started: pm2"), 60, rig)
        assert f"keeping {NEURON} (pid {back_pid})" in line, rig.launcher_log()
        _wait("the restarted launcher skipping the bad commit",
              lambda: _log_after(rig, mark, rf"skip: \S+ {re.escape(crash_version)} \({crash_sha[:12]}\) failed after its restart "
                                            r"before \(crash loop"),
              2 * INTERVAL + 30, rig)
        procs = rig.processes()
        assert procs[NEURON]["pid"] == back_pid and procs[NEURON]["restarts"] == restarts
        assert procs[NAME]["restarts"] == 2 and rig.head() == fixed_sha
        timings["launcher restarted -> neuron kept, bad commit skipped"] = time.monotonic() - t

        # 8. A release whose pip install fails (it needs a Python that does not exist; no index, so it fails
        #    fast): rolled back before any restart, the neuron left alone, marked bad.
        t = time.monotonic()
        pip_version = _bump(base_version, 6)
        setup_py = (rig.dev / "setup.py").read_text()
        unsatisfiable = re.sub(r'python_requires="[^"]*"', 'python_requires=">=3.99"', setup_py)
        assert unsatisfiable != setup_py
        mark = len(rig.launcher_log())
        pip_sha = rig.release(pip_version, f"release {pip_version} (needs Python 3.99)", extra=IMPORT_HOOK,
                              files={"setup.py": unsatisfiable, "neurons/miner.py": real_miner})
        line = _wait(f"the failed update to {pip_version}", lambda: _log_after(rig, mark, r"rolled back:|ROLLBACK FAILED|updated:"),
                     2 * INTERVAL + 2 * INSTALL_ALLOWANCE, rig)
        assert _log_after(rig, mark, r"failed: reinstall: scripts/install.sh \(exit"), rig.launcher_log()
        assert "requires a different Python" in rig.launcher_log()[mark:]
        assert _log_after(rig, mark, rf"update failed: {re.escape(pip_version)} \({pip_sha[:12]}\) not deployed")
        assert f"rolled back: checkout at {fixed_sha[:12]} (version {fixed_version}) and reinstalled; {NEURON} keeps running" in line
        assert "reinstall: scripts/install.sh" in rig.bad().get(pip_sha, ""), rig.bad()
        assert rig.head() == fixed_sha
        assert _run([python, "-c", "import distributed_training as d; print(d.__version__)"], cwd=root,
                    env=rig.env).stdout.strip() == fixed_version
        procs = rig.processes()
        assert procs[NEURON]["pid"] == back_pid and procs[NEURON]["status"] == "online"
        assert procs[NEURON]["restarts"] == restarts
        assert set(rig.bad()) == {broken_sha, crash_sha, pip_sha}
        timings[f"pip failure {pip_version} -> rolled back"] = time.monotonic() - t
    finally:
        log = rig.launcher_log()
        daemon_log = root / "pm2" / "pm2.log"
        exits = [line for line in daemon_log.read_text(errors="replace").splitlines()
                 if NEURON in line and ("exited" in line or "Stopping" in line)] if daemon_log.exists() else []
        try:
            if (root / "pm2").exists():
                rig.pm2_cmd("delete", "all", check=False, timeout=60)
                rig.pm2_cmd("kill", check=False, timeout=60)
        finally:
            leftovers = _kill_leftovers(root)
            shutil.rmtree(root, ignore_errors=True)
        timings["total"] = time.monotonic() - t0
        print("\n--- launcher log ---\n" + log)
        print("--- pm2 daemon on the neuron ---\n" + "\n".join(exits))
        print("--- timings (s) ---\n" + "\n".join(f"{k}: {v:.1f}" for k, v in timings.items()))
        if leftovers:
            print(f"killed leftover processes: {leftovers}")
