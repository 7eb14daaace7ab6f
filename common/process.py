"""Processes: whether one is alive, the stop signals a worker leaves to its parent, and SIGTERM as Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

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


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def sigterm_interrupts(ignore_file_size_signal: bool = False) -> dict:
    """SIGTERM stops like Ctrl-C (a ``KeyboardInterrupt``), so a command's clean-up runs: locks released,
    partial files removed, finished work kept. With ``ignore_file_size_signal``, SIGXFSZ is ignored so that
    a file size limit (``ulimit -f``) fails the write with EFBIG, which is reported, instead of killing the
    process mid-write. Only on the main thread (else nothing); returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if ignore_file_size_signal and hasattr(signal, "SIGXFSZ"):
        old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return old


def restore_handlers(old: dict) -> None:
    for signum, handler in old.items():
        signal.signal(signum, handler)


@contextmanager
def sigterm_as_interrupt():
    """``sigterm_interrupts`` for the duration of a block."""
    old = sigterm_interrupts()
    try:
        yield
    finally:
        restore_handlers(old)
