"""The file helpers every command writes through: locks, leftovers of killed runs, writes that fail cleanly."""

import errno
import os
import subprocess
import sys

import pytest

from common.files import (KeptRuns, LatchedErrorFile, OutputLockedError, atomic_write, output_dir, output_lock,
                          remove_stale_temporaries)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_refuses_a_second_holder_and_a_dead_owners_lock_is_taken_over(tmp_path, caplog):
    with output_lock(tmp_path) as lock:
        assert lock.read_text().strip() == str(os.getpid())
        with pytest.raises(OutputLockedError, match=rf"{tmp_path} is in use by another run \(process \d+"):
            with output_lock(tmp_path):
                pass
    assert not lock.exists()  # released
    pid = dead_pid()
    lock.write_text(f"{pid}\n")  # left by a killed run
    with output_lock(tmp_path):
        pass
    assert f"taking over the lock left by process {pid} (no longer running)" in caplog.text
    with output_lock(tmp_path / "out.h5", inside=False) as beside:  # an output renamed into place at the end
        assert beside == tmp_path / "out.h5.lock"


def test_a_failed_run_leaves_no_empty_output_directory_it_made(tmp_path):
    """A run refused or broken before it wrote anything removes the directory it created, never one that was
    there before or one it wrote into."""
    with pytest.raises(ValueError):
        with output_dir(tmp_path / "new" / "out"):
            raise ValueError("bad input")
    assert not (tmp_path / "new").exists()  # nor the parent it made for it
    (tmp_path / "there").mkdir()
    with pytest.raises(KeyboardInterrupt):
        with output_dir(tmp_path / "there"):
            raise KeyboardInterrupt
    assert (tmp_path / "there").is_dir()
    with pytest.raises(ValueError):
        with output_dir(tmp_path / "wrote") as out:
            (out / "part.json").write_text("{}")
            raise ValueError("broke after writing")
    assert (tmp_path / "wrote" / "part.json").exists()
    with output_dir(tmp_path / "ok") as out:
        pass
    assert out.is_dir()  # a run that finishes keeps its directory, empty or not


def test_a_killed_owners_lock_is_free_while_its_forked_workers_live(tmp_path):
    """A run that dies leaves its lock to the next one even if a worker it forked (a DataLoader worker) still
    runs: the workers do not hold their parent's lock."""
    script = f"""
import os, sys, time
from common.files import output_lock
with output_lock({str(tmp_path)!r}):
    worker = os.fork()
    if worker == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)  # let the parent's output end
        time.sleep(30)
        os._exit(0)
    print(worker, flush=True)
    os._exit(1)  # killed while holding it: no clean-up runs
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    worker = int(run.stdout.split()[0])
    try:
        assert os.path.exists(f"/proc/{worker}") or sys.platform != "linux"  # the worker outlived its parent
        with output_lock(tmp_path):
            pass
    finally:
        os.kill(worker, 9)


def test_only_our_stale_temporaries_are_removed(tmp_path, caplog):
    pid, alive = dead_pid(), 1  # pid 1 always runs
    ours = [f"model.pt.{pid}.tmp", f"results.{pid}.tmp.png"]
    kept = [f"model.pt.{alive}.tmp", f"notes.txt.{pid}.tmp", "model.pt.tmp", "draft.tmp"]
    for name in ours + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / f"data.{pid}.tmp").mkdir()  # a directory being converted into place
    removed = remove_stale_temporaries(tmp_path, r"model\.pt|results\.png|data", locked=False)
    assert sorted(p.name for p in removed) == sorted(ours + [f"data.{pid}.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert f"model.pt.{pid}.tmp: left by an interrupted run (process {pid})" in caplog.text
    remove_stale_temporaries(tmp_path, r"model\.pt", locked=True)  # under the lock, no other writer can be alive
    assert not (tmp_path / f"model.pt.{alive}.tmp").exists()


def test_a_latched_file_keeps_the_first_error_and_drops_later_writes(tmp_path):
    class Failing:
        calls = 0

        def write(self, data):
            self.calls += 1
            raise OSError(errno.EFBIG, "File too large")

    raw = Failing()
    f = LatchedErrorFile(raw)
    assert f.write(b"abc") == 3 and f.write(b"de") == 2 and raw.calls == 1
    with pytest.raises(OSError, match="File too large"):
        f.raise_error()


def test_a_failed_atomic_write_names_the_file_it_was_writing(tmp_path):
    """A full disk says which output it hit (not a bare "[Errno 28] No space left on device"), leaves no
    temporary file and keeps the old file; a nested write's error keeps the inner file's name."""
    (tmp_path / "results.png").write_text("old")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on device: '.*results.png'") as caught:
        atomic_write(tmp_path / "results.png", full, keep_suffix=True)
    assert caught.value.errno == errno.ENOSPC and caught.value.strerror == "No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.png"]
    assert (tmp_path / "results.png").read_text() == "old"
    with pytest.raises(OSError, match=r"No space left on device: '.*inner.gif'"):
        atomic_write(tmp_path / "outer.mp4", lambda tmp: atomic_write(tmp_path / "inner.gif", full))
    def encoder_stops(tmp):  # a library's own OSError, with no errno
        raise OSError("the encoder stopped")

    with pytest.raises(OSError, match=r"could not write .*plain.txt: the encoder stopped"):
        atomic_write(tmp_path / "plain.txt", encoder_stops)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.png"]


def test_kept_runs_give_back_what_was_put_and_refuse_what_was_measured_otherwise(tmp_path):
    """The parts a long job keeps for a resume: read back as put; measured with other settings, damaged,
    or without a result, an error naming the file (and the field); with no directory nothing is kept."""
    kept = KeptRuns(tmp_path / "units", {"samples": 100, "policy": (1, 2)}, "try again", prefix="model0-")
    assert kept.get("a") is None
    kept.put("a", {"rows": [1.5, None, "x"]})
    assert (tmp_path / "units" / "model0-a.json").is_file() and kept.get("a") == {"rows": [1.5, None, "x"]}
    other = KeptRuns(tmp_path / "units", {"samples": 300, "policy": (1, 2)}, "try again", prefix="model0-")
    with pytest.raises(ValueError, match=r"model0-a.json: field measured_with.samples is 100, this run asks for 300; "
                                         r"try again"):
        other.get("a")
    (tmp_path / "units" / "model0-a.json").write_text('{"measured_with": {"sam')
    with pytest.raises(ValueError, match=r"model0-a.json: not a JSON object \(damaged or truncated\); try again"):
        kept.get("a")
    (tmp_path / "units" / "model0-a.json").write_text('{"measured_with": {"samples": 100, "policy": [1, 2]}}')
    with pytest.raises(ValueError, match="model0-a.json: field result is missing"):
        kept.get("a")
    kept_calls = []
    assert kept.run("b", lambda: {"x": 1}, lambda: kept_calls.append(1)) == {"x": 1} and kept_calls == []
    assert kept.run("b", lambda: pytest.fail("measured again"), lambda: kept_calls.append(1)) == {"x": 1}
    assert kept_calls == [1]  # a kept part is read back, and its skip is announced
    nowhere = KeptRuns(None, {}, "")
    nowhere.put("a", {"rows": []})
    assert nowhere.get("a") is None


def test_an_interruption_while_results_are_written_says_what_is_kept(tmp_path, caplog):
    """Ctrl-C or SIGTERM during the last writes of an evaluation or a study (not only while it measures) says
    that the finished parts are kept for the same command."""
    from common.files import keeping_what_was_measured

    (tmp_path / "units").mkdir()
    (tmp_path / "units" / "seed0.json").write_text("{}")
    with caplog.at_level("WARNING"), pytest.raises(KeyboardInterrupt):
        with keeping_what_was_measured(tmp_path / "units"):
            raise KeyboardInterrupt
    assert "1 finished part(s) kept in" in caplog.text
