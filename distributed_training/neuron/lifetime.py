"""A neuron's children end with it: the DHT process, its p2pd daemon, torch's helpers.

hivemind forks a DHT process that starts p2pd; neither watches its parent, so a neuron that exits
(or is SIGKILLed by pm2 or the OOM killer) can leave them holding `--dht.port` for minutes, and a
restarted neuron then collides with its own ghost. So a neuron makes itself the leader of a
process group (which its children inherit) and starts a reaper: a tiny process in a session of
its own, which the kernel signals when the neuron dies for any reason (`PR_SET_PDEATHSIG`). The
reaper then stops the whole group: SIGTERM, and SIGKILL for what is left after a grace period.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 2.0

# Runs as `python -c REAPER pgid`: waits for the neuron's death (SIGTERM from the kernel, or its
# parent pid changing if the signal was missed), then empties the neuron's process group.
REAPER = r"""
import os, signal, sys, time
group, parent = int(sys.argv[1]), os.getppid()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by sigtimedwait below, not a handler
signal.signal(signal.SIGINT, signal.SIG_IGN)
def alive():
    try:
        os.killpg(group, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
while os.getppid() == parent:
    signal.sigtimedwait([signal.SIGTERM], 1.0)
if alive():
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + float(sys.argv[2])
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive():
        os.killpg(group, signal.SIGKILL)
"""


def _die_with_parent() -> None:
    """In the reaper, before exec: the kernel sends SIGTERM when the neuron's main thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def take_children_along() -> None:
    """Make this process its group's leader and start its reaper; call from the main thread, first.

    Only Linux has `PR_SET_PDEATHSIG`; elsewhere this does nothing (children may outlive a kill).
    """
    if not sys.platform.startswith("linux"):
        return
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # a new group of our own: never the launcher's (pm2, a shell)
    subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpgrp()), str(GRACE_SECONDS)],
                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent,
                     close_fds=True)
