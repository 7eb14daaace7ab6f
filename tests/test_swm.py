"""stable-worldmodel single-file datasets: alignment, defaults, resizing, round trips and bad input."""

import json
import os
import subprocess
import sys

import h5py
import hdf5plugin
import numpy as np
import pytest
import torch

from conftest import swallow_a_stop, synthetic_action, write_swm_file, write_synthetic
from envs import ReacherPixels
from envs.dataset import EpisodeStore, WindowDataset, WindowSpec, resize_frames
from envs.storage import DatasetError
from envs.convert import ConvertConfig, convert, convert_dataset
from envs.swm import write_swm
from envs.vector import ReacherBatch

BLOSC = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))


@pytest.mark.parametrize("in_memory", [True, False])
def test_windows_align_frames_and_actions(tmp_path, in_memory):
    """Row t holds the frame before action t: window chunk j is the actions from frame j to frame j+1."""
    path = write_swm_file(tmp_path / "d.h5", n_episodes=3, rows=12, compression=BLOSC)
    store = EpisodeStore(path, in_memory=in_memory)
    assert [e.steps for e in store.episodes] == [11, 12, 13] and store.layout == "stable-worldmodel"
    spec = WindowSpec(history=2, n_pred=2, frameskip=3)
    ds = WindowDataset(store, spec, split="all")
    assert len(ds) == sum(steps - spec.span + 1 for steps in (11, 12, 13))
    for k in range(len(ds)):  # every window, including those ending on an episode's last frame
        item = ds[k]
        e, t0 = (int(x) for x in ds.index[k])
        t = t0 + np.arange(spec.frames) * spec.frameskip
        assert torch.equal(item["pixels"][:, 0, 0, 0], torch.tensor((100 * e + t) % 256, dtype=torch.uint8))
        expected = np.stack([synthetic_action(1000 * e + t[j] + np.arange(3)).reshape(-1) for j in range(3)])
        assert item["actions"].dtype == torch.float32 and torch.equal(item["actions"], torch.from_numpy(expected))
        assert np.allclose(item["qpos"][:, 0].numpy(), (1000 * e + t) * 1e-3)


def test_episode_convention_drops_the_last_rows_action(tmp_path):
    """L rows -> L frames and L-1 actions; the last row's action is ignored whatever it holds."""
    for last in (np.nan, 0.5, 7.0):  # NaN (their recorder), a real action, even an out-of-range one
        path = write_swm_file(tmp_path / f"d{last}.h5", n_episodes=2, rows=6, last_action=last)
        ep = EpisodeStore(path).episode(1)
        assert ep["pixels"].shape == (7, 32, 32, 3) and ep["action"].shape == (6, 2)
        assert np.array_equal(ep["action"], synthetic_action(1000 + np.arange(6)))
        assert ep["action"].dtype == np.float32  # their float64 actions, converted on read


def test_states_used_derived_or_missing(tmp_path):
    path = write_swm_file(tmp_path / "d.h5", n_episodes=2, rows=5)
    store = EpisodeStore(path)
    assert store.missing_states == ("target",)
    qpos = store.states(1)["qpos"]
    env = ReacherPixels(size=32)
    for t in (0, 4):  # finger derived from qpos by forward kinematics = what the env reports
        env.set_state(qpos[t])
        assert np.allclose(store.states(1)["finger"][t], env.state()["finger"])
    env.close()
    assert np.isnan(store.states(0)["target"]).all()
    with pytest.raises(DatasetError, match=r"evaluation need \['target'\], which this dataset does not hold"):
        store.require_states(("qpos", "target"), "evaluation")
    store.require_states(("qpos", "finger"), "linear probes")

    rows = 5 + 6
    given = {"finger_pos": np.full((rows, 2), 0.25), "target_pos": np.full((rows, 2), -0.1)}
    store = EpisodeStore(write_swm_file(tmp_path / "e.h5", n_episodes=2, rows=5, columns=given))
    assert store.missing_states == () and np.all(store.states(0)["finger"] == 0.25)
    assert np.all(store.states(1)["target"] == -0.1)

    store = EpisodeStore(write_swm_file(tmp_path / "f.h5", n_episodes=2, rows=5, drop=("qpos", "qvel")))
    assert store.missing_states == ("finger", "qpos", "qvel", "target")
    with pytest.raises(DatasetError, match="linear probes need \\['finger'\\]"):
        store.require_states(("finger",), "linear probes")
    assert len(WindowDataset(store, WindowSpec(1, 1, 1), split="all")) > 0  # training needs no states


def test_unused_columns_are_ignored(tmp_path):
    rows = 4 + 5
    extra = {"note": np.array([b"hello"] * rows), "variation.agent.color": np.zeros((rows, 3)),
             "reward": np.full(rows, np.nan), "pixels.top": np.zeros((rows, 8, 8, 3), np.uint8)}
    store = EpisodeStore(write_swm_file(tmp_path / "d.h5", n_episodes=2, rows=4, columns=extra))
    assert set(store.episode(0)) == {"pixels", "action", "qpos", "qvel", "finger", "target"}


def test_defaults_and_env(tmp_path):
    path = write_swm_file(tmp_path / "d.h5", n_episodes=1, rows=4)
    store = EpisodeStore(path)
    assert store.attrs["env"] == "reacher-easy" and store.size == 32 and store.attrs["action_repeat"] == 2
    assert store.attrs["hide_target"] is True and store.attrs["render_quality"] == "standard"
    assert EpisodeStore(path, env="reacher-hard").attrs["env"] == "reacher-hard"
    said = write_swm_file(tmp_path / "e.h5", n_episodes=1, rows=4, attrs={"env": "gym-reacher", "action_repeat": 1})
    assert EpisodeStore(said).attrs["env"] == "gym-reacher" and EpisodeStore(said).attrs["action_repeat"] == 1
    other = write_swm_file(tmp_path / "f.h5", n_episodes=1, rows=4, attrs={"env": "swm/ReacherDMControl-v0"})
    assert EpisodeStore(other).attrs["env"] == "reacher-easy"
    assert EpisodeStore(other).attrs["source_env"] == "swm/ReacherDMControl-v0"
    with pytest.raises(DatasetError, match="env must be one of"):
        EpisodeStore(path, env="pong")


def test_resize_is_an_area_average():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    half = resize_frames(frames, 32)
    blocks = frames.reshape(3, 32, 2, 32, 2, 3).astype(np.float64).mean((2, 4))
    assert half.dtype == np.uint8 and np.abs(half.astype(np.float64) - blocks).max() <= 0.5
    flat = np.full((2, 224, 224, 3), 77, np.uint8)
    assert np.all(resize_frames(flat, 64) == 77) and resize_frames(flat, 64).shape == (2, 64, 64, 3)
    assert resize_frames(frames, 64) is frames


def test_resize_on_load_for_both_layouts(tmp_path):
    path = write_swm_file(tmp_path / "d.h5", n_episodes=2, rows=5, size=224, compression=BLOSC)
    frames = 5 + 6  # two episodes of 5 and 6 rows
    tight = (frames * 64 * 64 * 3 + 1) / 1e9  # fits at 64 px, not at 224 px
    small = EpisodeStore(path, image_size=64, max_memory_gb=tight)
    assert small.in_memory and small.size == 64 and small.source_size == 224
    assert not EpisodeStore(path, max_memory_gb=tight).in_memory
    lazy = EpisodeStore(path, image_size=64, in_memory=False)
    for i in range(2):
        assert small.episode(i)["pixels"].shape[1:] == (64, 64, 3)
        assert np.array_equal(small.episode(i)["pixels"], lazy.episode(i)["pixels"])
        assert np.array_equal(lazy.frames(i, np.array([1, 3])), small.episode(i)["pixels"][[1, 3]])
    assert np.all(small.episode(1)["pixels"][:, :, :, 0] == ((100 + np.arange(6)) % 256)[:, None, None])
    ds = WindowDataset(lazy, WindowSpec(2, 1, 2), split="all")
    assert ds[0]["pixels"].shape == (3, 64, 64, 3)

    shards = write_synthetic(tmp_path / "shards", n_episodes=2, steps=6, size=48)
    store = EpisodeStore(shards, image_size=32, in_memory=False)
    assert store.size == 32 and store.frames(0, np.array([0, 2])).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="image_size"):
        EpisodeStore(shards, image_size=0)


def test_non_square_frames_need_an_image_size(tmp_path):
    rows = 4
    path = write_swm_file(tmp_path / "d.h5", n_episodes=1, rows=rows,
                          columns={"pixels": np.zeros((rows, 24, 32, 3), np.uint8)})
    with pytest.raises(DatasetError, match=r"\[24, 32\] \(not square\); give --image-size"):
        EpisodeStore(path)
    store = EpisodeStore(path, image_size=16)
    assert store.episode(0)["pixels"].shape == (4, 16, 16, 3)
    # a model trained on them is not evaluated in a closed loop (our renderer makes square frames): said, not
    # a crash; and no `wm collect` command claims to record data of their kind
    from envs.storage import collect_command, recording
    from evaluation.evaluate import batch_like

    with pytest.raises(ValueError, match="frames are not square, and our environments render square frames"):
        batch_like(store, 2)
    assert collect_command(recording(store.attrs)) is None
    # nor is a model trained on a square copy of them (`wm convert --image-size`, either layout, and a copy of
    # that copy): the copy records the shape its frames were stretched from
    copies = [convert_dataset(path, tmp_path / "copy", "shards", image_size=16),
              convert_dataset(path, tmp_path / "copy.h5", "swm", image_size=16)]
    copies.append(convert_dataset(copies[0], tmp_path / "copy2.h5", "swm"))
    copies.append(convert_dataset(copies[0], tmp_path / "copy3.h5", "swm", image_size=8))  # its frames were never
    assert "render_size" not in EpisodeStore(copies[-1]).attrs  # rendered at 16 px: no size they were rendered at
    for copy in copies:
        copied = EpisodeStore(copy)
        assert copied.size in (16, 8) and recording(copied.attrs)["stretched_from"] == [24, 32]
        with pytest.raises(ValueError, match=r"frames are not square.*stretched from 24x32"):
            batch_like(copied, 2)
        assert collect_command(recording(copied.attrs)) is None
    assert recording(EpisodeStore(write_synthetic(tmp_path / "square", 1, 4, size=16)).attrs)["stretched_from"] is None


def test_a_conversion_that_enlarges_frames_says_it_adds_no_detail(tmp_path, caplog):
    """--image-size above the stored frames' size is an upsample: the copy is written, with a warning naming the
    file and both sizes; a copy at their size or smaller says nothing."""
    src = write_synthetic(tmp_path / "src", n_episodes=1, steps=3, size=32)
    wide = write_swm_file(tmp_path / "wide.h5", n_episodes=1, rows=4, columns={"pixels": np.zeros((4, 24, 32, 3),
                                                                                                 np.uint8)})
    with caplog.at_level("WARNING", logger="envs.convert"):
        for source, size in ((src, 32), (src, 16), (wide, 32)):
            convert_dataset(source, tmp_path / f"{source.stem}{size}.h5", image_size=size)
        assert not caplog.text
        assert EpisodeStore(convert_dataset(src, tmp_path / "big.h5", image_size=48)).size == 48
        convert_dataset(wide, tmp_path / "wide48", "shards", image_size=48)
    assert f"{src}: --image-size 48 enlarges its 32 px frames" in caplog.text
    assert f"{wide}: --image-size 48 enlarges its 24x32 px frames" in caplog.text


def _their_read(path, episode):
    """What stable-worldmodel's HDF5Dataset does: SWMR open, rows ep_offset : ep_offset + ep_len of a column."""
    with h5py.File(path, "r", swmr=True) as f:
        start, rows = int(f["ep_offset"][episode]), int(f["ep_len"][episode])
        keys = [k for k in f.keys() if k not in ("ep_len", "ep_offset")]
        return {k: f[k][start:start + rows] for k in keys}


@pytest.mark.parametrize("compression", ["blosc", "gzip", None])
def test_round_trip_and_their_layout(tmp_path, compression):
    source = EpisodeStore(write_synthetic(tmp_path / "shards", n_episodes=3, steps=7, size=32, per_shard=2))
    out = write_swm(source, tmp_path / "out" / "theirs.h5", compression=compression)
    assert sorted(p.name for p in out.parent.iterdir()) == ["theirs.h5"]  # no temporary file left
    back = EpisodeStore(out)
    assert back.layout == "stable-worldmodel" and len(back) == 3 and back.attrs["env"] == "reacher-easy"
    assert back.attrs["action_repeat"] == 1 and back.missing_states == ()
    for i in range(3):
        a, b = source.episode(i), back.episode(i)
        for key in ("pixels", "action", "qpos", "qvel", "finger", "target"):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (i, key)
    with h5py.File(out) as f:
        assert f["pixels"].dtype == np.uint8 and f["pixels"].shape == (3 * 8, 32, 32, 3)
        assert f["action"].dtype == np.float32 and f["qpos"].dtype == np.float64
        assert f["ep_len"].dtype == np.int32 and f["ep_offset"].dtype == np.int64
        assert f["ep_len"][()].tolist() == [8, 8, 8] and f["ep_offset"][()].tolist() == [0, 8, 16]
        filters = [f["pixels"].id.get_create_plist().get_filter(k)[3]
                   for k in range(f["pixels"].id.get_create_plist().get_nfilters())]
        assert filters == {"blosc": [b"blosc"], "gzip": [b"deflate"], None: []}[compression]
    rows = _their_read(out, 1)
    assert {"pixels", "action", "qpos", "qvel", "finger_pos", "target_pos", "step_idx", "ep_idx"} <= set(rows)
    assert np.array_equal(rows["pixels"], source.episode(1)["pixels"])
    assert np.array_equal(rows["action"][:-1], source.episode(1)["action"]) and np.isnan(rows["action"][-1]).all()
    assert rows["step_idx"].tolist() == list(range(8)) and set(rows["ep_idx"].tolist()) == {1}


def test_convert_both_ways(tmp_path):
    src = write_swm_file(tmp_path / "theirs.h5", n_episodes=3, rows=6, size=64, compression=BLOSC)
    shards = convert_dataset(src, tmp_path / "ours", fmt="shards", image_size=32, env="reacher-hard")
    ours = EpisodeStore(shards)
    assert ours.size == 32 and ours.attrs["env"] == "reacher-hard" and len(ours) == 3
    assert ours.attrs["action_repeat"] == 2 and ours.missing_states == ("target",)
    assert ours.attrs["render_size"] == 64  # resized, not rendered again: evaluations render at 64 and resize
    again = EpisodeStore(convert_dataset(shards, tmp_path / "again.h5", fmt="swm"))
    assert (again.size, again.attrs["render_size"]) == (32, 64)
    original = EpisodeStore(src, image_size=32)
    for i in range(3):
        for key in ("pixels", "action", "qpos", "qvel", "finger"):
            assert np.array_equal(original.episode(i)[key], again.episode(i)[key]), (i, key)
    with pytest.raises(DatasetError, match="already holds .h5 files"):
        convert_dataset(src, tmp_path / "ours", fmt="shards")
    plain = convert(ConvertConfig(data=str(src), out=str(tmp_path / "plain.h5"), image_size=32, compression="none"))
    assert np.array_equal(EpisodeStore(plain).episode(2)["pixels"], original.episode(2)["pixels"])
    with pytest.raises(ValueError, match="format must be"):
        convert_dataset(src, tmp_path / "x", fmt="zarr")
    with pytest.raises(ValueError, match=r"--out .*plain: a stable-worldmodel file is named <name>\.h5"):
        convert_dataset(src, tmp_path / "plain", fmt="swm")  # their loader would not find it
    assert not (tmp_path / "plain").exists()
    # never over its source, nor into a source directory (which would no longer open); an existing file is
    # replaced only with --overwrite
    before = (tmp_path / "theirs.h5").read_bytes()
    for out, says in ((src, "would replace the dataset it converts"),
                      (shards / "theirs.h5", "would be written into the dataset it converts")):
        with pytest.raises(ValueError, match=says):
            convert_dataset(src if out == src else shards, out, fmt="swm", overwrite=True)
    assert (tmp_path / "theirs.h5").read_bytes() == before and len(EpisodeStore(shards)) == 3
    with pytest.raises(ValueError, match=r"plain\.h5 already exists; pass --overwrite"):
        convert_dataset(src, tmp_path / "plain.h5", fmt="swm")
    convert_dataset(src, tmp_path / "plain.h5", fmt="swm", overwrite=True)


def test_a_state_some_shards_hold_is_kept_where_they_hold_it(tmp_path, caplog):
    """Shards of one dataset that differ in the states they hold (one with target positions, one without):
    converted to shards, every episode keeps the states it had; their format has one column for all rows,
    so a state only some episodes hold is left out of it, and that is said."""
    from conftest import synthetic_episode
    from envs.storage import write_shard

    (tmp_path / "mixed").mkdir()
    with_target = {0: synthetic_episode(5)}
    without = {1: {k: v for k, v in synthetic_episode(5, offset=1000).items() if k != "target"}}
    write_shard(tmp_path / "mixed" / "a.h5", with_target, {"env": "reacher-easy", "size": 32})
    write_shard(tmp_path / "mixed" / "b.h5", without, {"env": "reacher-easy", "size": 32})
    back = EpisodeStore(convert_dataset(tmp_path / "mixed", tmp_path / "ours", fmt="shards"))
    assert np.array_equal(back.states(0)["target"], with_target[0]["target"])
    assert np.isnan(back.states(1)["target"]).all()
    with caplog.at_level("WARNING"):
        theirs = EpisodeStore(convert_dataset(tmp_path / "mixed", tmp_path / "theirs.h5"))
    assert "target" in theirs.missing_states and "target_pos left out: 1 of 2 episodes hold it" in caplog.text
    # shards of two collections (other policies and seeds): no copy claims either's for the whole
    (tmp_path / "two").mkdir()
    write_shard(tmp_path / "two" / "a.h5", with_target, {"env": "reacher-easy", "size": 32, "policy": "random",
                                                         "seed": 1})
    write_shard(tmp_path / "two" / "b.h5", without, {"env": "reacher-easy", "size": 32, "policy": "smooth",
                                                     "seed": 2})
    store = EpisodeStore(tmp_path / "two")
    assert "policy" not in store.attrs and "seed" not in store.attrs and store.attrs["env"] == "reacher-easy"
    with h5py.File(convert_dataset(tmp_path / "two", tmp_path / "two.h5")) as f:
        assert "policy" not in f.attrs and "seed" not in f.attrs


def test_a_round_trip_keeps_what_our_shards_assume(tmp_path):
    """Shards that do not say their look or action repeat are ours' defaults (fast, 1): converted to their
    format and back they still say so, and a file naming its env as another tool does says env is assumed."""
    shards = write_synthetic(tmp_path / "ours", n_episodes=3, steps=5)
    assert {"render_quality", "action_repeat"} <= set(EpisodeStore(shards).assumed)
    back = convert_dataset(convert_dataset(shards, tmp_path / "theirs.h5"), tmp_path / "back", fmt="shards")
    store = EpisodeStore(back)
    assert (store.attrs["render_quality"], store.attrs["action_repeat"]) == ("fast", 1) and not store.assumed
    named = write_swm_file(tmp_path / "named.h5", n_episodes=2, rows=5, attrs={"env": "dm_control/reacher-hard-v0"})
    assert "env" in EpisodeStore(named).assumed


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    source = EpisodeStore(write_synthetic(tmp_path / "shards", n_episodes=2, steps=5))
    def broken(i):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(source, "episode", broken)
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match="No space left"):
        write_swm(source, tmp_path / "out" / "theirs.h5")
    assert list((tmp_path / "out").iterdir()) == []


# --- bad input -----------------------------------------------------------------------------------
def _rewrite(path, **changes):
    with h5py.File(path, "a") as f:
        for key, value in changes.items():
            del f[key]
            if value is not None:
                f.create_dataset(key, data=value)
    return path


@pytest.mark.parametrize("change, message", [
    ({"ep_len": np.array([5, 6, 70], np.int32)}, r"disagree with the column lengths: episode 2 is rows 11\.\.80 but "
                                                 r"'pixels' has 18 rows"),
    ({"ep_offset": np.array([0, 3, 11])}, r"episodes 0 \(rows 0\.\.4\) and 1 \(rows 3\.\.8\) overlap"),
    ({"ep_offset": np.array([0, 5])}, r"ep_len \(3,\) and ep_offset \(2,\) must be 1-D and of equal length"),
    ({"ep_offset": np.array([0, -5, 11])}, "episode 1 has a negative ep_offset"),
    ({"ep_len": np.array([5, 1, 7], np.int32)}, "episode 1 has ep_len 1: an episode needs at least 2 rows"),
    ({"ep_len": np.array([5.0, 6.0, 7.0])}, "must be integers"),
    ({"ep_offset": None}, "has 'ep_len' but no 'ep_offset' dataset"),
    ({"pixels": None}, r"has no 'pixels' column \(columns: \["),
    ({"action": None}, "has no 'action' column"),
    ({"action": np.zeros((18, 3))}, r"column 'action' must be \(N, 2\) Reacher actions"),
    ({"pixels": np.zeros((18, 8, 8), np.uint8)}, r"pixels must be uint8 \(N, H, W, 3\)"),
])
def test_bad_structure_names_the_file_and_problem(tmp_path, change, message):
    path = _rewrite(write_swm_file(tmp_path / "bad.h5", n_episodes=3, rows=5), **change)
    with pytest.raises(DatasetError, match=message) as info:
        EpisodeStore(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("column, row, value, message", [
    ("action", 7, np.nan, r"episode 1 \(rows 5\.\.10\): action holds a non-finite value at step 2"),
    ("action", 12, 1e30, r"episode 2 \(rows 11\.\.17\): action must lie in \[-1, 1\] .* at step 1"),
    ("qpos", 3, np.nan, r"episode 0 \(rows 0\.\.4\): qpos holds a non-finite value at step 3"),
    ("qvel", 17, np.inf, r"episode 2 \(rows 11\.\.17\): qvel holds a non-finite value at step 6"),
])
def test_bad_values_name_episode_step_and_key(tmp_path, column, row, value, message):
    path = write_swm_file(tmp_path / "bad.h5", n_episodes=3, rows=5)
    with h5py.File(path, "a") as f:
        data = f[column][()]
        data[row, 0] = value
        f[column][...] = data
    with pytest.raises(DatasetError, match=message):
        EpisodeStore(path)


def test_missing_filter_is_named(tmp_path, monkeypatch):
    path = write_swm_file(tmp_path / "d.h5", n_episodes=1, rows=4, compression=BLOSC)
    real = h5py.h5z.filter_avail
    monkeypatch.setattr(h5py.h5z, "filter_avail", lambda code: code != 32001 and real(code))
    with pytest.raises(DatasetError, match=r"column 'pixels' is compressed with the HDF5 filter 'blosc' \(id 32001\), "
                                           r"which is not installed here: `pip install hdf5plugin` provides it"):
        EpisodeStore(path)


def test_missing_filter_without_hdf5plugin(tmp_path):
    """For real: a process where hdf5plugin cannot be imported (so Blosc is not registered)."""
    path = write_swm_file(tmp_path / "d.h5", n_episodes=1, rows=4, compression=BLOSC)
    code = ("import sys; sys.modules['hdf5plugin'] = None\n"
            "from envs.dataset import EpisodeStore\n"
            f"EpisodeStore({str(path)!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(env, PYTHONPATH=os.getcwd()))
    assert out.returncode != 0
    assert "DatasetError" in out.stderr and "'blosc'" in out.stderr and "pip install hdf5plugin" in out.stderr


def test_one_swm_file_is_one_dataset(tmp_path):
    path = write_swm_file(tmp_path / "theirs.h5", n_episodes=1, rows=4)
    shards = write_synthetic(tmp_path / "ours", n_episodes=2, steps=5)
    with pytest.raises(DatasetError, match="is a stable-worldmodel file \\(one file = one dataset\\)"):
        EpisodeStore([path, shards])
    with pytest.raises(DatasetError, match="one file = one dataset"):
        EpisodeStore([path, write_swm_file(tmp_path / "more.h5", n_episodes=1, rows=4)])
    (tmp_path / "dir").mkdir()
    os.link(path, tmp_path / "dir" / "theirs.h5")
    assert len(EpisodeStore(tmp_path / "dir")) == 1  # a directory holding one such file is that file


def test_corrupt_chunk_on_lazy_read_names_the_episode(tmp_path):
    path = write_swm_file(tmp_path / "d.h5", n_episodes=2, rows=150, compression=BLOSC)
    with h5py.File(path) as f:
        info = f["pixels"].id.get_chunk_info(1)  # rows 100..199: episode 0's end, episode 1's start
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes())
    store = EpisodeStore(path, in_memory=False)  # the last frame, checked on open, is in another chunk
    with pytest.raises(DatasetError, match=r"d\.h5: episode ep_000001 cannot be read"):
        store.frames(1, np.array([0, 1]))


def test_batch_for_models_trained_on_their_data():
    """action_repeat 2 = two of our steps per action; image_size renders big and area-resizes like the store."""
    qpos = np.array([[0.1, 0.2], [1.0, -1.0]])
    twice = ReacherBatch("reacher-easy", 2, size=64, action_repeat=2, image_size=32)
    once = ReacherBatch("reacher-easy", 2, size=64)
    target = np.array([[np.nan, np.nan], [0.1, 0.1]])  # a dataset without targets keeps the model's
    assert twice.reset_to(qpos, target=target).shape == (2, 32, 32, 3)
    once.reset_to(qpos, target=target)
    a = np.array([[0.5, -0.5], [1.0, 1.0]])
    frames = twice.step(a)
    once.step(a)
    big = once.step(a)
    assert np.allclose(twice.states()["qpos"], once.states()["qpos"])
    assert np.array_equal(frames, resize_frames(big, 32))
    assert twice.render_goals(qpos).shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match="qvel holds NaN"):
        twice.reset_to(qpos, qvel=np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="qvel reaches 1e\\+03 rad/s"):  # e.g. columns swapped with something else
        twice.reset_to(qpos, qvel=np.array([[0.0, 0.0], [1e3, 0.0]]))
    twice.close(), once.close()


def test_a_recorded_env_wins_and_conflicts_are_errors(tmp_path, capsys):
    """A file that records its env is that env's data: --env fills it only where the file says nothing."""
    from worldmodel.datasplit import open_data
    from test_model import tiny_config
    from worldmodel.model import WorldModel

    hard = write_swm_file(tmp_path / "hard.h5", n_episodes=2, rows=5, attrs={"env": "reacher-hard"})
    assert EpisodeStore(hard).attrs["env"] == "reacher-hard"
    for env in ("reacher-easy", "gym-reacher"):
        with pytest.raises(DatasetError, match=rf"hard\.h5: holds 'reacher-hard' episodes, but env='{env}' was asked"):
            EpisodeStore(hard, env=env)
    with pytest.raises(DatasetError, match="holds 'reacher-hard' episodes"):  # train and convert: the same
        convert_dataset(hard, tmp_path / "out", fmt="shards", env="reacher-easy")
    easy_model = WorldModel(tiny_config("mlp", size=32))
    with pytest.raises(ValueError, match=r"holds 'reacher-hard' episodes, but env='reacher-easy' .*\(the env of the "
                                         r"model m\.pt\)"):
        open_data(easy_model, {}, "m.pt", str(hard))  # what `wm eval` opens its data with
    silent = write_swm_file(tmp_path / "silent.h5", n_episodes=2, rows=5)
    assert EpisodeStore(silent, env="reacher-hard").attrs["env"] == "reacher-hard"
    # `wm train --env` is the data's setting, not the model's (filled from the data) that shares its name
    from wm import main
    from worldmodel.train import preset_config

    assert main(["train", "--data", str(hard), "--env", "reacher-easy", "--out", str(tmp_path / "run")]) == 2
    assert "holds 'reacher-hard' episodes, but env='reacher-easy' was asked" in capsys.readouterr().err
    assert preset_config("demo", {"env": "reacher-hard"}).env == "reacher-hard"


def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, caplog):
    """Shards are written into a temporary directory renamed into place at the end; the directory records
    how many episodes it holds; a killed conversion's leftovers are removed by the next run."""
    import envs.convert
    from test_files import dead_pid

    src = write_synthetic(tmp_path / "src", n_episodes=25, steps=4, per_shard=25)  # two shards of 20 and 5
    out = tmp_path / "out"
    real, calls = envs.convert.write_shard, []

    def failing(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *args)
    monkeypatch.setattr(envs.convert, "write_shard", failing)
    with pytest.raises(OSError, match=rf"could not write {out} \(No space left on device\); nothing was left behind"):
        convert_dataset(src, out, fmt="shards")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial directory, no temporary one
    stale = tmp_path / f"out.{dead_pid()}.tmp"  # what a killed conversion leaves
    stale.mkdir()
    (stale / "shard_000000_000001.h5").write_bytes(b"partial")
    convert(ConvertConfig(data=str(src), out=str(out), format="shards"))
    assert not stale.exists() and f"{stale}: left by an interrupted run" in caplog.text
    assert len(EpisodeStore(out)) == 25 and json.loads((out / "dataset.json").read_text())["episodes"] == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed stop, on purpose
@pytest.mark.parametrize("fmt, name", [("shards", "out"), ("swm", "out.h5")])
def test_a_stop_swallowed_while_converting_writes_no_copy(tmp_path, fmt, name):
    """SIGTERM landing in a weakref callback h5py runs is swallowed there: the conversion went on to write the
    whole copy, then said it was interrupted, so the same command refused the --out it had filled."""
    from common.process import sigterm_as_interrupt

    src = write_synthetic(tmp_path / "src", n_episodes=25, steps=4, per_shard=25)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        swallow_a_stop()
        convert_dataset(src, tmp_path / name, fmt=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no copy, no temporary file or lock
    convert_dataset(src, tmp_path / name, fmt=fmt)  # the same command, again, converts
    assert len(EpisodeStore(tmp_path / name)) == 25


def test_file_size_limit_while_writing_a_swm_file_is_a_clear_error(tmp_path):
    """HDF5 writing to a failing file used to crash the interpreter (rc 139): now a clear error, rc 2."""
    import resource

    src = write_synthetic(tmp_path / "src", n_episodes=6, steps=30, noise=True)  # ~600 KB of incompressible frames
    out = tmp_path / "out" / "theirs.h5"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # noqa: E731
    for compression in ("blosc", "none"):
        proc = subprocess.run([sys.executable, "-m", "wm", "convert", "--data", str(src), "--out", str(out),
                               "--compression", compression], capture_output=True, text=True, timeout=180,
                              preexec_fn=limit, env=dict(os.environ, PYTHONPATH=os.getcwd()))
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        assert f"wm convert: error: [Errno 27] could not write {out} (File too large)" in proc.stderr
        assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
        assert not out.parent.exists()  # no temporary file, no lock: nor the directory made for it


def test_offsets_near_the_integer_limit_are_refused(tmp_path):
    big = np.iinfo(np.int64).max - 3
    path = _rewrite(write_swm_file(tmp_path / "bad.h5", n_episodes=3, rows=5), ep_offset=np.array([0, 5, big]))
    with pytest.raises(DatasetError, match=rf"bad\.h5: ep_len/ep_offset disagree with the column lengths: episode 2 is "
                                           rf"rows {big}\.\.{big + 6}"):
        EpisodeStore(path)


def test_a_column_that_is_a_group_is_named(tmp_path):
    path = write_swm_file(tmp_path / "g.h5", n_episodes=2, rows=5)
    with h5py.File(path, "a") as f:
        del f["pixels"]
        f.create_group("pixels")
    with pytest.raises(DatasetError, match=r"g\.h5: column 'pixels' must be an array \(an HDF5 dataset\), got a group"):
        EpisodeStore(path)


def test_one_conversion_at_a_time_into_a_destination(tmp_path):
    from common.files import OutputLockedError, output_lock

    src = write_synthetic(tmp_path / "src", n_episodes=2, steps=6)
    with output_lock(tmp_path / "theirs.h5", inside=False):
        with pytest.raises(OutputLockedError, match="theirs.h5 is in use by another run"):
            convert_dataset(src, tmp_path / "theirs.h5")
    assert not (tmp_path / "theirs.h5").exists()
    assert len(EpisodeStore(convert_dataset(src, tmp_path / "theirs.h5"))) == 2


def test_a_failed_conversion_leaves_no_directory_it_made(tmp_path):
    from envs.convert import convert_dataset
    from envs.storage import DatasetError

    for fmt, out in (("swm", tmp_path / "a" / "b.h5"), ("shards", tmp_path / "c" / "d")):
        with pytest.raises(DatasetError, match="no such dataset"):
            convert_dataset(tmp_path / "nowhere", out, fmt)
        assert not out.parent.exists()
