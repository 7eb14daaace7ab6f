"""Files written so that nothing is ever half-written, output directories checked before work, outputs
locked while a run uses them, and the temporary files of killed runs cleaned up."""

from __future__ import annotations

import logging
import fcntl
import io
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from common.process import pid_alive, raise_if_stopped

log = logging.getLogger(__name__)

LOCK_NAME = ".wm.lock"  # inside a directory a run writes in place (a run, a collection, an evaluation)
# ``<name>.<pid>.tmp`` (atomic_write) or ``<stem>.<pid>.tmp<suffix>`` (writers that need the suffix)
_TEMPORARY = re.compile(r"(?P<base>.+?)\.(?P<pid>\d+)\.tmp(?P<suffix>\.[A-Za-z0-9]+)?")


def temporary_path(path: Path, keep_suffix: bool = False) -> Path:
    """Where ``atomic_write`` writes first: ``<name>.<pid>.tmp`` beside ``path``, or with ``keep_suffix``
    ``<stem>.<pid>.tmp<suffix>`` (for writers that choose the format by the suffix: images, videos)."""
    if keep_suffix and path.suffix:
        return path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write, keep_suffix: bool = False) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then a rename over it: a reader sees the old
    file or the new one, never half of one. On any failure (a full disk, Ctrl-C) the temporary file is
    removed and the old file is kept. An ``OSError`` names ``path`` (a full disk says which output it hit),
    unless it names another file already (a nested write's)."""
    path = Path(path)
    tmp = temporary_path(path, keep_suffix)
    try:
        with _named_as(path, tmp):
            write(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def _named_as(path: Path, tmp: Path):
    """An ``OSError`` while writing ``tmp`` re-raised naming ``path``, the output it was for (unless it names
    another file already: a nested write's)."""
    try:
        yield
    except OSError as exc:
        if exc.filename not in (None, str(tmp), tmp):
            raise
        if exc.errno is None:  # a library's own error: no errno to keep
            raise OSError(f"could not write {path}: {exc}") from exc
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def write_together(writers: dict) -> None:
    """The files (or directories) of one result, ``{path: text or write(tmp)}``, never a mix of two results: all are
    written to temporaries first (a failure there, named as ``atomic_write`` names it, leaves the earlier ones
    as they were), then the earlier last file, the one that says the result is finished, is removed and each
    takes its place, the last one last. A run stopped in between leaves a result not finished, not a mix."""
    temporary = {Path(path): temporary_path(Path(path), keep_suffix=True) for path in writers}
    try:
        for (path, tmp), write in zip(temporary.items(), writers.values()):
            with _named_as(path, tmp):
                if isinstance(write, str):
                    with open(tmp, "wb") as fh:
                        _write_all(fh, write.encode())
                else:
                    write(tmp)
        _remove(list(temporary)[-1])
        for path, tmp in temporary.items():
            with _named_as(path, tmp):
                if tmp.is_dir() and path.is_dir() and not path.is_symlink():  # a rename does not replace one
                    _remove(path)
                os.replace(tmp, path)
    finally:
        for tmp in temporary.values():
            _remove(tmp)


def _remove(path: Path) -> None:
    """``path`` gone, a file or a directory, if it was there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """``data`` to ``path`` atomically in one plain write: a full disk or a file-size limit is one clean
    ``OSError`` (libraries writing piecemeal to a failing file may raise their own errors, or crash)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            _write_all(fh, data)
    atomic_write(path, write)


def _write_all(fh, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())  # a full disk may only show at the flush


@contextmanager
def naming_write_errors(path: str | Path | None = None):
    """An ``OSError`` (a full disk, a file-size limit) while writing ``path`` (or the file the error names)
    atomically, re-raised naming it: the writers clean up after themselves, so nothing of it was left behind."""
    try:
        yield
    except OSError as exc:
        where = path or exc.filename
        if where is None:
            raise
        raise OSError(exc.errno, f"could not write {where} ({exc.strerror or exc}); nothing was left behind") from None


@contextmanager
def saying_what_is_kept(units: str | Path, parts: str = "*.json"):
    """Around the measuring of a run that resumes from the parts kept in ``units`` (the files ``parts`` matches
    there): an interruption (Ctrl-C, SIGTERM) says how many parts are kept and that the same command measures
    only the rest."""
    try:
        yield
    except KeyboardInterrupt:
        kept = len(list(Path(units).glob(parts)))
        if kept:
            log.warning(f"stopped: {kept} finished part(s) kept in {units}; the same command measures only the rest")
        raise


@contextmanager
def keeping_what_was_measured(units: str | Path, parts: str = "*.json"):
    """Around the last writes of a run that resumes from the parts kept in ``units``: an ``OSError`` there (a
    full disk after an hour of measuring), or an interruption (as ``saying_what_is_kept``), says that those
    parts are kept and that the same command finishes without measuring again."""
    try:
        with saying_what_is_kept(units, parts):
            yield
    except OSError as exc:
        what = f"could not write {exc.filename} ({exc.strerror})" if exc.filename else str(exc)
        message = (f"{what}; what was measured is kept in {units}: the same command, once there is room, writes "
                   f"the results without measuring again")
        raise (OSError(message) if exc.errno is None else OSError(exc.errno, message)) from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def callable_name(value) -> str:
    """How JSON records a callable setting (a cost function given from Python): its module and qualified name;
    anything else JSON cannot hold stays a TypeError."""
    if not callable(value):
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
    return f"{getattr(value, '__module__', None)}.{getattr(value, '__qualname__', type(value).__name__)}"


def _identity(value) -> str:
    """A setting's value as a kept part's record compares it: a module-level function by its name (found
    again by a rerun), a lambda or local function by ``str`` (its address: a rerun measures it again)."""
    if callable(value) and "<" not in callable_name(value):  # "<lambda>", "<locals>": no name finds it again
        return callable_name(value)
    return str(value)


def json_text(obj) -> str:
    """How our JSON files read: indented, a callable setting by its name (``callable_name``)."""
    return json.dumps(obj, indent=1, default=callable_name)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json_text(obj))


def kept_measurement(path: str | Path, measured_with: dict, advice: str) -> dict:
    """What an earlier (interrupted) run left at ``path``, if it was measured as this run would measure it
    (its ``measured_with`` holds the settings it depends on); otherwise an error naming the file and the
    first field that differs, ending with ``advice``, rather than results mixing two runs."""
    row = read_json(path)  # {} if unreadable
    if not row:
        raise ValueError(f"{path}: not a JSON object (damaged or truncated); {advice}")
    kept = row.get("measured_with", {})
    for name, value in measured_with.items():
        if kept.get(name) != value:
            raise ValueError(f"{path}: field measured_with.{name} is {kept.get(name)!r}, this run asks for "
                             f"{value!r}; {advice}")
    return row


_MISSING = object()


def kept_fields(path: str | Path, record: dict, fields: dict, advice: str) -> dict:
    """``record``, a part kept in ``path``, once each of ``fields`` is there and of its kind; otherwise a
    ``ValueError`` naming the file and the field, ending with ``advice`` (a damaged part, not a row of the
    results). ``fields``: a dotted name (``linear.joints_mean``, ``records.0.held``) and its kind: ``number`` (a
    finite one), ``numbers`` (a list of them, or of lists of them), ``bool``, ``object`` or ``list``; ``number
    or null`` and ``numbers or null`` take None as well (for a list: as an item)."""
    for name, kind in fields.items():
        value = field_at(record, name)
        base, null = kind.removesuffix(" or null"), kind.endswith(" or null")
        if value is _MISSING:
            problem = "is missing"
        elif base == "bool":
            problem = "" if isinstance(value, bool) else f"is {value!r}, not true or false"
        elif base in ("object", "list"):
            problem = "" if isinstance(value, dict if base == "object" else list) else \
                f"is {value!r}, not {'an object' if base == 'object' else 'a list'}"
        elif (base == "numbers") != isinstance(value, list):
            problem = f"is {value!r}, not {'a list of numbers' if base == 'numbers' else 'a number'}"
        else:
            bad = _not_a_number(value, null)
            problem = "" if bad is _MISSING else f"holds {bad!r}, not a finite number"
        if problem:
            raise ValueError(f"{path}: field {name} {problem}; {advice}")
    return record


def field_at(record: dict, name: str, missing=_MISSING):
    """The value of a dotted field name in nested dicts and lists (``linear.joints_mean``, ``records.0.held``);
    ``missing`` if it is not there."""
    for key in name.split("."):
        if isinstance(record, list):
            record = record[int(key)] if key.isdigit() and int(key) < len(record) else missing
        else:
            record = record.get(key, missing) if isinstance(record, dict) else missing
        if record is missing:
            break
    return record


def _not_a_number(value, null: bool):
    """The first item of ``value`` (a number, or lists of them) that is not a finite number (nor None where
    ``null``); ``_MISSING`` when there is none."""
    if isinstance(value, list):
        return next((bad for bad in (_not_a_number(v, null) for v in value) if bad is not _MISSING), _MISSING)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return _MISSING if number or (value is None and null) else value


class KeptRuns:
    """The parts of a long job that are done, one JSON file each in ``directory`` (named ``prefix + name``),
    written atomically as each finishes, so the same command after an interruption runs only the parts still
    missing. A part kept from a run with other settings (``measured_with``: what its result depends on, as
    JSON gives it back) is an error naming the file and the field, ending with ``advice``, or, with
    ``replace_other`` (a run told to overwrite), measured again. With no ``directory`` nothing is kept."""

    def __init__(self, directory: str | Path | None, measured_with: dict, advice: str, prefix: str = "",
                 replace_other: bool = False):
        self.directory = Path(directory) if directory is not None else None
        self.advice, self.prefix, self.replace_other = advice, prefix, replace_other
        self.measured_with = json.loads(json.dumps(measured_with, default=_identity))

    def path(self, name: str) -> Path:
        return self.directory / f"{self.prefix}{name}.json"

    def get(self, name: str, fields: dict | None = None) -> dict | None:
        """The part's result as it was put, None when it is not done yet; with ``fields`` (as ``kept_fields``
        takes them, inside the result), a result without them is an error naming the file and the field."""
        if self.directory is None or not self.path(name).is_file():
            return None
        try:
            kept = kept_measurement(self.path(name), self.measured_with, self.advice)
            inside = {f"result.{field}": kind for field, kind in (fields or {}).items()}
            kept_fields(self.path(name), kept, {"result": "object", **inside}, "delete the file to run that part again")
        except ValueError as exc:
            if not self.replace_other:
                raise
            log.info("measured again (%s)", exc)  # measured otherwise, or damaged: put() replaces it
            return None
        return kept["result"]

    def put(self, name: str, result: dict) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path(name), {"measured_with": self.measured_with, "result": result})

    def run(self, name: str, measure: Callable[[], dict], on_kept: Callable[[], object] | None = None,
            fields: dict | None = None) -> dict:
        """The part's result: kept from an earlier run (then ``on_kept``, e.g. to advance a progress bar; a kept
        one is checked for ``fields``, as ``get`` does), or ``measure()`` now, kept as it returns."""
        raise_if_stopped()  # a stop swallowed while the last part ran (a subprocess's start) ends here
        result = self.get(name, fields)
        if result is None:
            result = measure()
            self.put(name, result)
        elif on_kept is not None:
            on_kept()
        return result


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; {} when the file is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


class LatchedErrorFile(io.RawIOBase):
    """A file for a library that writes piecemeal and cannot survive a failed write (HDF5 crashes the
    interpreter when it later closes a file whose write failed): the first ``OSError`` is kept in
    ``error`` and every later write is dropped, so the library finishes cleanly; the caller then raises
    ``error`` (``raise_error``) and removes the file."""

    def __init__(self, fh):
        super().__init__()
        self.fh, self.error = fh, None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def readinto(self, buffer) -> int:
        return self.fh.readinto(buffer)

    def write(self, data) -> int:
        self._latched(self.fh.write, data)
        return len(data)

    def truncate(self, size=None):
        self._latched(self.fh.truncate, size)
        return size

    def flush(self) -> None:
        self._latched(self.fh.flush)

    def _latched(self, op, *args) -> None:
        if self.error is None:
            try:
                op(*args)
            except OSError as exc:
                self.error = exc

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


# --- output directories ---------------------------------------------------------------------------
class OutputDirError(ValueError):
    """An output directory that cannot be used; ``reason`` says why (the OS's words)."""

    def __init__(self, message: str, out: Path, reason: str):
        super().__init__(message)
        self.out, self.reason = out, reason


def prepare_output_dir(out: str | Path, option: str = "--out") -> Path:
    """Create ``out`` and prove it a writable directory before any work starts; an ``OutputDirError``
    naming the option otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{option} {out} is a file, not a directory", out, "a file, not a directory")
    probe = out / f".write_test.{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputDirError(f"{option} {out} is not writable: {reason}; choose another {option} or fix its "
                             f"permissions", out, reason) from None
    return out


@contextmanager
def output_dir(out: str | Path, option: str = "--out"):
    """``prepare_output_dir`` around a run: the directories it had to create (``out`` and missing parents)
    are removed again when the run fails before writing anything there, so a refused or broken run leaves no
    empty directory behind."""
    out = Path(out)
    created = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
    out = prepare_output_dir(out, option)
    try:
        yield out
    except BaseException:
        for directory in created:
            if not directory.is_dir() or any(directory.iterdir()):
                break
            directory.rmdir()
        raise


def prepare_output_file(path: str | Path, option: str = "--out") -> Path:
    """An output file's directory created and proven writable before any work starts (``prepare_output_dir``
    of its parent); a directory in the file's place is refused."""
    path = Path(path)
    if path.is_dir():
        raise OutputDirError(f"{option} {path} is a directory, not a file", path, "a directory, not a file")
    prepare_output_dir(path.parent, option)
    return path


# --- locks ----------------------------------------------------------------------------------------
class OutputLockedError(RuntimeError):
    """An output another live process is writing."""


_HELD_LOCKS: set[int] = set()  # descriptors of the locks this process holds


def _release_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors, so a lock is held by
    its owner alone and goes with it when it is killed, not when its last worker exits."""
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_release_inherited_locks)


@contextmanager
def output_lock(target: str | Path, inside: bool = True):
    """Hold an advisory lock on an output while a run writes it: ``<target>/.wm.lock`` for a directory used
    in place (``inside``), else ``<target>.lock`` beside it (an output renamed into place at the end). The
    lock file holds the owner's pid; a second run is refused naming it, and a lock its owner left behind
    (killed: the kernel released its ``flock``) is taken over with a message."""
    target = Path(target)
    lock = target / LOCK_NAME if inside else target.with_name(f"{target.name}.lock")
    fd = _acquire(lock, target)
    _HELD_LOCKS.add(fd)
    try:
        yield lock
    finally:
        try:
            lock.unlink()
        except OSError:
            pass
        _HELD_LOCKS.discard(fd)
        os.close(fd)


def _acquire(lock: Path, target: Path) -> int:
    """The locked file descriptor of ``lock``, holding our pid."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live process
            owner = _pid_in(fd)
            os.close(fd)
            raise OutputLockedError(f"{target} is in use by another run (process {owner or '?'}, lock {lock}); wait "
                                    f"for it to finish, or choose another output") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its owner removed it between our open and our lock: take the new one
            os.close(fd)
            continue
        previous = _pid_in(fd)
        if previous and previous != os.getpid():
            state = "no longer running" if not pid_alive(previous) else "no longer holding it"
            log.warning("%s: taking over the lock left by process %s (%s)", target, previous, state)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


def _pid_in(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


# --- leftovers ------------------------------------------------------------------------------------
def remove_stale_temporaries(directory: str | Path, names: str | tuple[str, ...], locked: bool = True) -> list[Path]:
    """Remove the temporary files (or directories) our writers left in ``directory`` when their process was
    killed: ``<name>.<pid>.tmp`` (or ``<stem>.<pid>.tmp<suffix>``) whose ``<name>`` matches the regular
    expression ``names`` (or is one of the tuple ``names``) and whose process is dead, or, when the caller holds
    the directory's lock (``locked``), any other process's. Says what it removes; returns the paths."""
    names = "|".join(map(re.escape, names)) if isinstance(names, tuple) else names
    directory, pattern, removed = Path(directory), re.compile(names), []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for path in sorted(entries):
        m = _TEMPORARY.fullmatch(path.name)
        if not m or not pattern.fullmatch(m["base"] + (m["suffix"] or "")):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or (not locked and pid_alive(pid)):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError:
            continue
        log.warning("removed %s: left by an interrupted run (process %s)", path, pid)
        removed.append(path)
    return removed
