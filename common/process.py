"""Processes: whether one is alive, and the stop signals a worker leaves to its parent."""

from __future__ import annotations

import os
import signal

# What `timeout`, `docker stop`, Slurm and a terminal send to a whole process group to stop a run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ignore_stop_signals(*_args) -> None:
    """In a worker process: let the parent alone handle Ctrl-C and SIGTERM (it finishes, saves and then
    stops its workers); a worker killed by the signal sent to the whole group would lose the parent's
    work. Takes and ignores any arguments, so it serves as a ``worker_init_fn`` or pool initializer."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
