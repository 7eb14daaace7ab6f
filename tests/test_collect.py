import errno
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

import common.files
import envs.collect
from envs.collect import CollectConfig, CollectionError, collect, plan_shards
from envs.dataset import EpisodeStore
from conftest import tqdm_progress
from envs.storage import DatasetError, episode_index

TINY = CollectConfig(episodes=5, steps=12, size=32, workers=1, episodes_per_shard=2)


def _read_all(path):
    store = EpisodeStore(path)
    return {ref.key: store.episode(i) for i, ref in enumerate(store.episodes)}


def _assert_same_data(a, b):
    da, db = _read_all(a), _read_all(b)
    assert sorted(da) == sorted(db)
    for key in da:
        for name in da[key]:
            assert np.array_equal(da[key][name], db[key][name]), (key, name)


def test_collect_writes_the_documented_format(tmp_path):
    summary = collect(replace(TINY, out=str(tmp_path / "d")), progress=False)
    assert summary["collected"] == 5
    with h5py.File(sorted((tmp_path / "d").glob("*.h5"))[0]) as f:
        assert f.attrs["env"] == "reacher-easy" and f.attrs["size"] == 32 and f.attrs["policy"] == "mixed"
        assert "mujoco" in f.attrs["versions"]
        ep = f["ep_000000"]
        assert ep["pixels"].shape == (13, 32, 32, 3) and ep["pixels"].dtype == np.uint8
        assert ep["action"].shape == (12, 2) and ep["qpos"].shape == (13, 2)
        assert np.all(np.abs(ep["action"][()]) <= 1)


def test_worker_count_does_not_change_the_data(tmp_path):
    collect(replace(TINY, out=str(tmp_path / "one")), progress=False)
    collect(replace(TINY, out=str(tmp_path / "two"), workers=2), progress=False)
    _assert_same_data(tmp_path / "one", tmp_path / "two")


def test_rerun_is_a_no_op_and_extends(tmp_path):
    cfg = replace(TINY, out=str(tmp_path / "d"), episodes=3)
    collect(cfg, progress=False)
    assert collect(cfg, progress=False)["collected"] == 0
    assert collect(replace(cfg, episodes=5), progress=False)["collected"] == 2
    collect(replace(TINY, out=str(tmp_path / "ref")), progress=False)
    _assert_same_data(tmp_path / "d", tmp_path / "ref")


def test_fewer_episodes_than_the_directory_holds_are_refused_and_its_manifest_kept(tmp_path):
    from envs.storage import expected_episodes

    collect(replace(TINY, out=str(tmp_path / "d")), progress=False)
    with pytest.raises(CollectionError, match=r"already holds 5 episodes .*more than --episodes 3; pass --episodes 5"):
        collect(replace(TINY, out=str(tmp_path / "d"), episodes=3), progress=False)
    assert expected_episodes(tmp_path / "d") == 5


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_an_interruption_while_a_shard_is_written_still_saves_its_episodes(tmp_path, monkeypatch, stop):
    """Ctrl-C or SIGTERM (a real signal: the collection's own handler) landing inside a shard's write: the
    write is abandoned (its temporary file removed), and the last flush on the way out writes that shard with
    the others."""
    import os
    import signal

    real, calls = envs.collect.write_shard, []

    def interrupted_once(path, episodes, attrs):
        calls.append(sorted(episodes))
        if len(calls) == 1:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs here, between bytecodes
                pass
            pytest.fail("SIGTERM did not stop the collection")
        return real(path, episodes, attrs)

    def not_handled(*args):  # what SIGTERM meets outside the collection's own handler: a failure, not a kill
        pytest.fail("SIGTERM reached the test's handler: the collection did not handle it")

    monkeypatch.setattr(envs.collect, "write_shard", interrupted_once)
    old = signal.signal(signal.SIGTERM, not_handled)
    try:
        with pytest.raises(KeyboardInterrupt):
            collect(replace(TINY, out=str(tmp_path / "d")), progress=False)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert calls[0] == calls[1] == [0, 1]  # the interrupted shard, written again on the way out
    saved = sorted(episode_index(ref.key) for ref in EpisodeStore(tmp_path / "d", in_memory=False).episodes)
    assert saved[:2] == [0, 1]


def test_resume_with_other_settings_is_an_error(tmp_path):
    collect(replace(TINY, out=str(tmp_path / "d"), episodes=2), progress=False)
    with pytest.raises(DatasetError, match="other settings"):
        collect(replace(TINY, out=str(tmp_path / "d"), policy="random"), progress=False)


def test_interrupted_collection_keeps_finished_episodes_and_resumes(tmp_path):
    """SIGINT in the middle of `wm collect`: finished episodes are saved; rerunning completes the same data."""
    out, log = tmp_path / "d", tmp_path / "log"
    n, steps = 80, 20
    args = [sys.executable, "-m", "wm", "collect", "--episodes", str(n), "--steps", str(steps), "--size", "32",
            "--workers", "2", "--episodes-per-shard", "500", "--out", str(out)]
    with open(log, "w") as err:
        # SIGINT as in a terminal, even when the tests run as a background job (which ignores it)
        proc = subprocess.Popen(args, stdout=err, stderr=err, env=dict(os.environ, PYTHONPATH=os.getcwd()),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while tqdm_progress(log) < 5 * (steps + 1) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # a shard of 500 never completes by itself: only the interrupt writes it
        proc.wait(timeout=120)
    assert proc.returncode == 130, log.read_text()
    assert "run the same command again to resume" in log.read_text()
    saved = len(EpisodeStore(out, in_memory=False).episodes)
    assert 5 <= saved < n, f"expected a partial collection, got {saved} episodes"
    # A hard kill while writing leaves a temporary file; the next run removes it (and only ours).
    (out / "shard_000000_000079.h5.123.tmp").write_bytes(b"partial")
    cfg = CollectConfig(episodes=n, steps=steps, size=32, workers=2, episodes_per_shard=500, out=str(out))
    assert collect(cfg, progress=False)["collected"] == n - saved
    assert not list(out.glob("*.tmp"))
    collect(replace(cfg, out=str(tmp_path / "ref"), episodes_per_shard=50), progress=False)
    _assert_same_data(out, tmp_path / "ref")


def test_plan_shards_groups_contiguous_runs():
    assert plan_shards([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert plan_shards([5, 2, 3, 9], 10) == [[2, 3], [5], [9]]


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="env must be one of"):
        collect(replace(TINY, env="pong"), progress=False)
    with pytest.raises(ValueError, match="policy must be one of"):
        collect(replace(TINY, policy="greedy"), progress=False)
    for option, value in (("episodes", 0), ("steps", -3), ("workers", 0), ("episodes_per_shard", 0)):
        flag = "--" + option.replace("_", "-")
        with pytest.raises(ValueError, match=f"{flag} \\({option}\\) must be a positive integer, got {value}"):
            collect(replace(TINY, out=str(tmp_path / "d"), **{option: value}), progress=False)
    assert not (tmp_path / "d").exists()  # refused before anything was created


def test_only_our_temporary_files_are_removed(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "draft.tmp").write_text("a user's notes")
    (out / "shard_000000_000001.h5.4242.tmp").write_bytes(b"left by a hard kill")
    collect(replace(TINY, out=str(out), episodes=2), progress=False)
    assert sorted(p.name for p in out.glob("*.tmp")) == ["draft.tmp"]


def test_unwritable_output_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the write test fail as it would for a user
        real = Path.write_bytes
        def refuse(self, *args, **kwargs):
            if self.parent == out:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(Path, "write_bytes", refuse)
    monkeypatch.setattr(envs.collect, "_make_collection_env", lambda cfg: pytest.fail("simulated before checking"))
    try:
        with pytest.raises(CollectionError, match="cannot write to the output directory .*ro: Permission denied"):
            collect(replace(TINY, out=str(out)), progress=False)
    finally:
        out.chmod(0o755)
    assert list(out.iterdir()) == []


def test_full_disk_stops_cleanly_and_reports_what_was_saved(tmp_path, monkeypatch, caplog):
    """The 2nd shard's write fails with ENOSPC half-way: a clear error, the 1st shard kept, no temporary file."""
    real, calls = common.files._write_all, []
    def full_disk(fh, data):
        if not Path(fh.name).name.startswith("shard_"):  # the dataset's manifest
            return real(fh, data)
        calls.append(fh.name)
        if len(calls) == 2:
            fh.write(data[: len(data) // 2])  # half of it is in the temporary file already
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, data)
    monkeypatch.setattr(common.files, "_write_all", full_disk)
    out = tmp_path / "d"
    with pytest.raises(CollectionError, match=r"could not write shard_000002_000003.h5 \(No space left on device\); "
                                              r"2/5 episodes are saved"):
        collect(replace(TINY, out=str(out)), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "shard_000000_000001.h5"]
    assert len(EpisodeStore(out).episodes) == 2
    assert f"{out} holds 2 of the 5 episodes its dataset.json records" in caplog.text  # short: says so
    assert Path(calls[1]).name.startswith("shard_000002_000003.h5.")
    monkeypatch.setattr(common.files, "_write_all", real)
    summary = collect(replace(TINY, out=str(out)), progress=False)
    assert summary["saved"] == 3 and summary["already_there"] == 2


def test_file_size_limit_is_a_clear_error_not_a_crash(tmp_path):
    """`ulimit -f`: the write fails with EFBIG (not a SIGXFSZ core dump), reported with what was saved."""
    out = tmp_path / "d"
    cmd = (f"ulimit -f 48; exec {sys.executable} -m wm collect --episodes 4 --steps 30 --size 64 --workers 1 "
           f"--episodes-per-shard 2 --out {out}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert re.search(r"wm collect: error: could not write shard_000000_000001.h5 \(File too large\); "
                     r"0/4 episodes are saved", proc.stderr), proc.stderr[-2000:]
    assert "HDF5-DIAG" not in proc.stderr and "Traceback" not in proc.stderr
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.h5"))


def _children(pid: int) -> list[int]:
    """Pids of the collection workers (spawned processes) whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    out, log = tmp_path / "d", tmp_path / "log"
    args = [sys.executable, "-m", "wm", "collect", "--episodes", "400", "--steps", "20", "--size", "32",
            "--workers", "2", "--episodes-per-shard", "500", "--out", str(out)]
    with open(log, "w") as err:
        # SIGINT as in a terminal, even when the tests run as a background job (which ignores it)
        proc = subprocess.Popen(args, stdout=err, stderr=err, env=dict(os.environ, PYTHONPATH=os.getcwd()),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while tqdm_progress(log) < 21 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2, log.read_text()
        proc.kill()  # SIGKILL: no handler runs in the parent
        proc.wait(timeout=30)
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    orphans = [w for w in workers if _alive(w)]
    for w in orphans:  # do not leave them running when the test fails
        os.kill(w, signal.SIGKILL)
    assert not orphans, "collection workers outlived their killed parent"


def test_a_worker_that_cannot_start_is_a_clear_error_not_a_hang(tmp_path):
    cfg = replace(TINY, out=str(tmp_path / "d"), workers=2, render_quality="ultra")
    with pytest.raises(RuntimeError, match="collection worker could not start: ValueError: render quality"):
        collect(cfg, progress=False)


def test_image_size_stores_area_resized_frames(tmp_path):
    small = replace(TINY, episodes=2, steps=4, size=64, image_size=32)
    collect(replace(small, out=str(tmp_path / "small")), progress=False)
    collect(replace(small, out=str(tmp_path / "big"), image_size=None), progress=False)
    store, big = EpisodeStore(tmp_path / "small"), EpisodeStore(tmp_path / "big", image_size=32)
    assert store.size == 32 and store.attrs["render_size"] == 64
    for i in range(2):
        assert np.array_equal(store.episode(i)["pixels"], big.episode(i)["pixels"])
    with pytest.raises(DatasetError, match="other settings"):  # resuming with another image size
        collect(replace(small, out=str(tmp_path / "small"), image_size=48, episodes=3), progress=False)


def test_one_collection_at_a_time_into_a_directory(tmp_path):
    from common.files import OutputLockedError, output_lock

    out = tmp_path / "d"
    out.mkdir()
    with output_lock(out):
        with pytest.raises(OutputLockedError, match=f"{out} is in use by another run"):
            collect(replace(TINY, out=str(out), episodes=1), progress=False)
    assert not list(out.glob("*.h5"))
    assert collect(replace(TINY, out=str(out), episodes=1), progress=False)["saved"] == 1
    assert not (out / ".wm.lock").exists()


def test_actions_held_for_several_control_steps_are_recorded_and_replayed(tmp_path):
    """--action-repeat 2 (stable-worldmodel's dm_control Reacher): each action moves the arm for two control
    steps; the shards record it, and the batched environments an evaluation builds from the data replay it."""
    from envs.vector import ReacherBatch
    from evaluation.evaluate import batch_like

    out = tmp_path / "twice"
    collect(replace(TINY, out=str(out), episodes=1, steps=6, action_repeat=2), progress=False)
    store = EpisodeStore(out)
    assert store.attrs["action_repeat"] == 2 and "action_repeat" not in store.assumed
    ep = store.episode(0)
    batch = batch_like(store, 1)
    once = ReacherBatch("reacher-easy", 1, size=TINY.size, action_repeat=1)
    try:
        assert batch.action_repeat == 2
        batch.reset_to(ep["qpos"][:1], ep["qvel"][:1], render=False)
        once.reset_to(ep["qpos"][:1], ep["qvel"][:1], render=False)
        for t in range(6):
            batch.step(ep["action"][t][None], render=False)
            once.step(ep["action"][t][None], render=False)
        assert np.allclose(batch.qpos()[0], ep["qpos"][6], atol=1e-6)  # the recorded motion, replayed
        assert not np.allclose(once.qpos()[0], ep["qpos"][6], atol=1e-3)  # held once, the arm moves less
    finally:
        batch.close(), once.close()
    with pytest.raises(DatasetError, match="action_repeat"):  # resuming with another repeat is refused
        collect(replace(TINY, out=str(out), episodes=2, steps=6, action_repeat=1), progress=False)


@pytest.mark.parametrize("rec", [
    {"env": "reacher-easy", "size": 64, "render_size": 64, "hide_target": True, "render_quality": "fast",
     "action_repeat": 1},
    {"env": "reacher-easy", "size": 64, "render_size": 224, "hide_target": True, "render_quality": "standard",
     "action_repeat": 2},  # LeWM's kind, stored at our size
    {"env": "reacher-hard", "size": 96, "render_size": 96, "hide_target": False, "render_quality": "fast",
     "action_repeat": 1}])
def test_the_collection_a_model_names_records_data_of_its_kind(rec, monkeypatch):
    """A model whose dataset is gone names the `wm collect` command that records data as its was; that
    command, parsed as typed, records exactly that."""
    import wm
    from envs.collect import _shard_attrs
    from envs.storage import collect_command, recording

    parsed = []
    monkeypatch.setitem(wm.COMMANDS, "collect", (wm.COMMANDS["collect"][0], parsed.append, ""))
    wm.main(collect_command(rec).split()[1:])
    assert {k: v for k, v in recording(_shard_attrs(parsed[0])).items() if k in rec} == rec
