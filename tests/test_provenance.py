"""Every result records what made it: the command, the code's commit, the packages and the machine."""

import json
import shutil
import subprocess

import pytest

from common import provenance as prov

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@needs_git
def test_the_code_version_is_the_commit_and_says_when_tracked_files_changed(tmp_path):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "model.py").write_text("x = 1\n")
    git("add", "model.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = git("rev-parse", "HEAD").stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert prov.code_version.__wrapped__(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "model.py").write_text("x = 2\n")
    assert prov.code_version.__wrapped__(tmp_path) == {"commit": head, "dirty": True}
    outside = tmp_path.parent / f"{tmp_path.name}-plain"
    outside.mkdir()
    assert prov.code_version.__wrapped__(outside)["commit"] is None  # an installed copy: the package version
    (tmp_path / "site-packages").mkdir()  # installed inside another project's repository: not its commit
    assert prov.code_version.__wrapped__(tmp_path / "site-packages")["commit"] is None


def test_a_record_names_the_command_packages_and_machine(monkeypatch):
    monkeypatch.setattr(prov, "_command", [])
    record = prov.provenance()
    assert record["command"] is None  # from Python
    prov.set_command(["wm", "eval", "--out", "my runs/x"])
    record = json.loads(json.dumps(prov.provenance()))  # plain JSON
    assert record["command"] == "wm eval --out 'my runs/x'"  # pasteable into a shell
    assert record["packages"]["torch"] and record["packages"]["mujoco"] == "3.17.0"
    assert record["machine"]["cpu_cores"] >= 1 and record["machine"]["torch_threads"] >= 1
    line = prov.provenance_line(record)
    assert line.startswith("Made by `wm eval --out 'my runs/x'` at ") and "mujoco 3.17.0" in line
    record["machine"].update(cpu_cores=1, torch_threads=1)  # a report said "1 torch threads"
    assert "1 CPU core (" in prov.provenance_line(record) and ", 1 torch thread;" in prov.provenance_line(record)
    record["machine"].update(cpu_cores=2, torch_threads=2)
    assert "2 CPU cores (" in prov.provenance_line(record) and ", 2 torch threads;" in prov.provenance_line(record)
    prov.set_command([])


def test_the_command_line_is_recorded_while_it_runs_only(monkeypatch):
    from wm import main

    seen = []
    monkeypatch.setattr("evaluation.compare.compare", lambda base, new: seen.append(prov.provenance()["command"]) or
                        {"base": base, "new": new, "changes": {}, "conditions": {}, "rows": [], "unmatched_records": 0})
    assert main(["compare", "--base", "a", "--new", "b"]) == 0
    assert seen == ["wm compare --base a --new b"] and prov.provenance()["command"] is None  # Python again after it
