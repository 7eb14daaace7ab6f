"""Where a result came from: the command, the code's commit, the packages and the machine. Every model, evaluation,
demo, study and benchmark records it, so a number read later can be traced to what made it and made again."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from common.text import counted

PACKAGES = ("torch", "numpy", "mujoco", "dm-control", "gymnasium", "h5py")
ROOT = Path(__file__).resolve().parents[1]  # the project's checkout (or its installed copy)
_command: list[str] = []


def set_command(argv: list[str]) -> None:
    """The command line that is running (the ``wm`` entry point sets it; from Python there is none)."""
    _command[:] = argv


@lru_cache(maxsize=None)
def code_version(root: Path = ROOT) -> dict:
    """The git commit of the checkout ``root`` and whether it had uncommitted changes to tracked files (read
    once per process); the package version where the code is not the top of a git checkout (an installed
    copy, perhaps inside another project's repository) or git is missing."""
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,  # noqa: E731
                                           timeout=10, check=True).stdout.strip()
        if Path(run("rev-parse", "--show-toplevel")).resolve() == Path(root).resolve():  # not a repository above us
            return {"commit": run("rev-parse", "HEAD"),
                    "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": None, "package": _version("pixel-worldmodel")}


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """What made a result: the command line (None from Python), the code, the packages, the machine and the
    time (UTC)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"command": shlex.join(_command) if _command else None, "code": code_version(),
            "python": platform.python_version(), "packages": {name: _version(name) for name in PACKAGES},
            "machine": {"cpu": _cpu(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "gpu": gpu, "platform": sys.platform},
            "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def provenance_line(record: dict) -> str:
    """One Markdown line of a provenance record, for a report's reader."""
    code = record["code"]
    where = (f"commit `{code['commit'][:12]}`" + (" with uncommitted changes" if code.get("dirty") else "")
             if code.get("commit") else f"package version {code.get('package')}")
    packages = ", ".join(f"{k} {v}" for k, v in record["packages"].items() if v and k in ("torch", "mujoco"))
    machine = record["machine"]
    on = f"{counted(machine['cpu_cores'], 'CPU core')} ({machine['cpu']}), {machine['gpu'] or 'no GPU'}, " \
         f"{counted(machine['torch_threads'], 'torch thread')}"
    command = f"`{record['command']}`" if record["command"] else "Python"
    return f"Made by {command} at {where}; {packages}; {on}; {record['time_utc']}."


def signed(markdown: str, record: dict) -> str:
    """A Markdown report ending with the line of its provenance ``record``."""
    return f"{markdown.rstrip()}\n\n{provenance_line(record)}\n"
