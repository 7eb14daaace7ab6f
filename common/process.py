"""Processes: whether one is alive, the stop signals a worker leaves to its parent, and SIGTERM as Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
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


_stop_requested = threading.Event()  # set by the stop handler, in case its exception is swallowed


def _interrupt(signum, frame):
    _stop_requested.set()
    raise KeyboardInterrupt


def raise_if_stopped() -> None:
    """A ``KeyboardInterrupt`` if, while stop signals interrupt (``sigterm_interrupts``), one came whose own
    was swallowed: Python ignores exceptions raised where it runs callbacks (the at-fork hooks run while a
    subprocess such as ffmpeg starts, say), so loops that start subprocesses check here to stop as asked."""
    if _stop_requested.is_set() and signal.getsignal(signal.SIGTERM) is _interrupt:
        raise KeyboardInterrupt


_passed_on = sys.unraisablehook  # what _quiet_swallowed_stop hands every other unraisable exception to


def _quiet_swallowed_stop(unraisable) -> None:
    """``sys.unraisablehook`` while stop signals interrupt: a stop whose KeyboardInterrupt Python swallowed
    (``raise_if_stopped`` acts on it) prints no "Exception ignored ... Traceback", which reads as a crash."""
    if not (issubclass(unraisable.exc_type, KeyboardInterrupt) and _stop_requested.is_set()):
        _passed_on(unraisable)


def sigterm_interrupts(ignore_file_size_signal: bool = False) -> dict:
    """SIGTERM stops like Ctrl-C (a ``KeyboardInterrupt``; both also noted for ``raise_if_stopped``), so a
    command's clean-up runs: locks released, partial files removed, finished work kept. With
    ``ignore_file_size_signal``, SIGXFSZ is ignored so that a file size limit (``ulimit -f``) fails the write
    with EFBIG, which is reported, instead of killing the process mid-write. Only on the main thread (else
    nothing); returns the handlers replaced (and ``sys.unraisablehook``, for ``_quiet_swallowed_stop``)."""
    global _passed_on
    if threading.current_thread() is not threading.main_thread():
        return {}
    if signal.getsignal(signal.SIGTERM) is not _interrupt:  # the outermost: a stop asked before is not this one's
        _stop_requested.clear()
    old = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    if sys.unraisablehook is not _quiet_swallowed_stop:
        old["unraisablehook"] = _passed_on = sys.unraisablehook
        sys.unraisablehook = _quiet_swallowed_stop
    if ignore_file_size_signal and hasattr(signal, "SIGXFSZ"):
        old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return old


def restore_handlers(old: dict) -> None:
    for signum, handler in old.items():
        if signum == "unraisablehook":
            if sys.unraisablehook is _quiet_swallowed_stop:  # not one installed since (pytest's, a library's)
                sys.unraisablehook = handler
        else:
            signal.signal(signum, handler)


@contextmanager
def sigterm_as_interrupt():
    """``sigterm_interrupts`` for the duration of a block, which ends in a ``KeyboardInterrupt`` if a stop
    signal came whose exception was swallowed (``raise_if_stopped``): a command asked to stop never ends as
    if it had finished."""
    old = sigterm_interrupts()
    try:
        yield
        if _stop_requested.is_set():
            raise KeyboardInterrupt
    finally:
        restore_handlers(old)
