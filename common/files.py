"""Files written so that nothing is ever half-written, and output directories checked before work."""

from __future__ import annotations

import json
import os
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """Where ``atomic_write`` writes first: ``<name>.<pid>.tmp`` beside ``path``."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then a rename over it: a reader sees the old
    file or the new one, never half of one. On any failure (a full disk, Ctrl-C) the temporary file is
    removed and the old file is kept."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; {} when the file is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


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
