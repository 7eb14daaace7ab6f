"""Shard checks on open, lazy-read errors, episode uids and dataset fingerprints."""

import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest

from conftest import synthetic_episode, write_swm_file, write_synthetic
from envs import ReacherPixels
from envs.collect import CollectConfig, collect
from envs.dataset import EpisodeStore, dataset_fingerprint
from envs.storage import FORMAT_VERSION, DatasetError, EpisodeRef, write_shard

ATTRS = {"env": "reacher-easy", "size": 32}


@pytest.mark.parametrize("key, step, value, message", [
    ("action", 4, np.nan, "episode ep_000000: action holds a non-finite value at step 4"),
    ("action", 2, 1e30, r"episode ep_000000: action must lie in \[-1, 1\] \(the env's action space\), got .* at step 2"),
    ("qpos", 6, np.nan, "episode ep_000000: qpos holds a non-finite value at step 6"),
    ("target", 0, -np.inf, "episode ep_000000: target holds a non-finite value at step 0"),
])
def test_bad_values_are_refused_on_open(tmp_path, key, step, value, message):
    ep = synthetic_episode(10)
    ep[key] = ep[key].copy()
    ep[key][step, 1] = value
    write_shard(tmp_path / "s.h5", {0: ep}, ATTRS)
    with pytest.raises(DatasetError, match=message) as info:
        EpisodeStore(tmp_path / "s.h5")
    assert "s.h5" in str(info.value)


def test_float64_actions_are_read_as_float32(tmp_path):
    ep = synthetic_episode(10)
    ep["action"] = ep["action"].astype(np.float64)
    ep["action"][3] = [1.00001, -1.0]  # a hair outside after a float round trip: tolerated
    write_shard(tmp_path / "s.h5", {0: ep}, ATTRS)
    store = EpisodeStore(tmp_path / "s.h5", in_memory=False)
    assert store.states(0)["action"].dtype == np.float32 and store.states(0)["qpos"].dtype == np.float64
    with pytest.raises(DatasetError, match="action must be float32 or float64, got int64"):
        ep["action"] = np.zeros((10, 2), np.int64)
        write_shard(tmp_path / "i.h5", {0: ep}, ATTRS)
        EpisodeStore(tmp_path / "i.h5")


def test_finger_and_target_are_optional_in_shards(tmp_path):
    ep = synthetic_episode(6)
    ep["qpos"] = np.linspace([0.1, -0.5], [1.0, 0.5], 7)
    del ep["finger"], ep["target"]
    write_shard(tmp_path / "s.h5", {0: ep}, ATTRS)
    store = EpisodeStore(tmp_path / "s.h5")
    assert store.missing_states == ("target",) and np.isnan(store.states(0)["target"]).all()
    env = ReacherPixels(size=32)
    for t in (0, 6):  # derived by forward kinematics: what the env reports at that pose
        env.set_state(ep["qpos"][t])
        assert np.allclose(store.states(0)["finger"][t], env.state()["finger"])
    env.close()


def test_corrupt_chunk_on_lazy_read_names_file_and_episode(tmp_path):
    data = write_synthetic(tmp_path / "d", n_episodes=2, steps=10, noise=True)
    shard = sorted(data.glob("*.h5"))[0]
    with h5py.File(shard) as f:
        info = f["ep_000001/pixels"].id.get_chunk_info(0)  # frame 0 of episode 1
    with open(shard, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * min(info.size, 64))
    store = EpisodeStore(data, in_memory=False)  # opening reads only the last frame of each episode
    with pytest.raises(DatasetError, match=rf"{shard.name}: episode ep_000001 cannot be read"):
        store.frames(1, np.array([0, 2]))
    with pytest.raises(DatasetError, match="episode ep_000001 cannot be read"):
        store.episode(1)
    assert store.frames(0, np.array([0, 2])).shape == (2, 32, 32, 3)
    with pytest.raises(DatasetError, match="episode ep_000001 cannot be read"):
        EpisodeStore(data, in_memory=True)


def _uids(path):
    return [e.uid for e in EpisodeStore(path).episodes]


def test_uids_and_fingerprint_survive_a_move(tmp_path):
    data = write_synthetic(tmp_path / "a", n_episodes=4, steps=5)
    uids, fp, store_fp = _uids(data), dataset_fingerprint(data), EpisodeStore(data).fingerprint
    assert len(set(uids)) == 4 and all(len(u) == 16 for u in uids)
    moved = tmp_path / "elsewhere" / "b"
    shutil.move(data, moved)
    store = EpisodeStore(moved)
    assert _uids(moved) == uids and dataset_fingerprint(moved) == fp and store.fingerprint == store_fp
    assert store.index_of_uids(uids[::-1]) == [3, 2, 1, 0] and store.uids[uids[2]] == 2
    with pytest.raises(DatasetError, match="holds no episode with uid \\['nope'\\]"):
        store.index_of_uids(["nope"])
    assert EpisodeRef(moved / "x.h5", "ep_000000", 5).uid  # refs made by hand get one too


def test_extended_collection_keeps_uids_and_changes_fingerprint(tmp_path):
    cfg = CollectConfig(episodes=3, steps=6, size=32, workers=1, episodes_per_shard=2, out=str(tmp_path / "d"))
    collect(cfg, progress=False)
    before = EpisodeStore(cfg.out)
    collect(replace(cfg, episodes=5), progress=False)
    after = EpisodeStore(cfg.out)
    assert [e.uid for e in after.episodes][:3] == [e.uid for e in before.episodes]
    assert after.fingerprint != before.fingerprint and len(set(after.uids)) == 5
    other = EpisodeStore(collect(replace(cfg, seed=1, out=str(tmp_path / "s1")), progress=False)["out"])
    assert set(other.uids).isdisjoint(before.uids) and other.fingerprint != before.fingerprint


def test_uids_tell_other_settings_apart(tmp_path):
    a = write_synthetic(tmp_path / "a", n_episodes=2, steps=5)
    b = write_synthetic(tmp_path / "b", n_episodes=2, steps=5, env="reacher-hard")  # same arrays, other env
    assert set(_uids(a)).isdisjoint(_uids(b))


def test_swm_uids_and_fingerprint(tmp_path):
    path = write_swm_file(tmp_path / "theirs.h5", n_episodes=3, rows=5)
    uids, fp = _uids(path), dataset_fingerprint(path)
    (tmp_path / "moved").mkdir()
    shutil.move(path, tmp_path / "moved" / "theirs.h5")
    assert _uids(tmp_path / "moved" / "theirs.h5") == uids == _uids(tmp_path / "moved")
    assert dataset_fingerprint(tmp_path / "moved" / "theirs.h5") == fp
    other = write_swm_file(tmp_path / "theirs.h5", n_episodes=3, rows=5, last_action=0.0,
                           columns={"action": np.full((18, 2), 0.5)})  # same name, other actions
    assert set(_uids(other)).isdisjoint(uids) and dataset_fingerprint(other) != fp


def test_uids_survive_conversion_and_renaming(tmp_path):
    """A copy of the training data in the other layout, resized, or with renamed shards is the same episodes:
    evaluation then still knows which of them the model trained on."""
    from envs.convert import convert_dataset

    data = write_synthetic(tmp_path / "a", n_episodes=4, steps=5)
    uids = _uids(data)
    converted = convert_dataset(data, tmp_path / "a.h5", "swm", image_size=16)
    assert sorted(_uids(converted)) == sorted(uids)
    back = convert_dataset(converted, tmp_path / "b", "shards")
    assert sorted(_uids(back)) == sorted(uids)
    for shard in sorted(data.glob("*.h5")):
        shard.rename(shard.with_name("renamed_" + shard.name))
    assert sorted(_uids(data)) == sorted(uids)


def test_same_names_and_sizes_but_other_episodes_are_another_dataset(tmp_path):
    """File names, sizes and attributes can coincide (constant frames compress alike); the store's
    fingerprint also covers the episodes themselves."""
    a = write_synthetic(tmp_path / "a", n_episodes=4, steps=20)
    b = write_synthetic(tmp_path / "b", n_episodes=4, steps=20)
    for shard in b.glob("*.h5"):  # other actions, same names
        with h5py.File(shard, "r+") as f:
            for key in f:
                f[key]["action"][0] = [0.5, 0.5]
    assert EpisodeStore(a).fingerprint != EpisodeStore(b).fingerprint


@pytest.mark.parametrize("attrs, message", [
    ({"size": "sixty-four"}, r"file attribute 'size' must be an integer in \[8, 4096\] \(pixels\), got 'sixty-four'"),
    ({"action_repeat": "two"}, r"file attribute 'action_repeat' must be an integer in \[1, 100\] .*got 'two'"),
    ({"action_repeat": 0}, r"file attribute 'action_repeat' must be an integer in \[1, 100\] .*got 0"),
    ({"env": 3}, r"file attribute 'env' must be the environment's name, one of \[.*\], got 3"),
    ({"env": "reacher-x"}, r"file attribute 'env' must be the environment's name, one of \['gym-reacher', .*\], got "
                           r"'reacher-x'"),
    ({"render_quality": "ultra"}, r"file attribute 'render_quality' must be one of \['fast', 'standard'\]"),
])
def test_bad_file_attributes_name_the_file_and_attribute(tmp_path, attrs, message):
    write_shard(tmp_path / "s.h5", {0: synthetic_episode(10)}, {**ATTRS, **attrs})
    with pytest.raises(DatasetError, match=rf"s\.h5: {message}"):
        EpisodeStore(tmp_path / "s.h5")


def test_a_shard_of_a_newer_format_is_refused_and_older_ones_are_read(tmp_path):
    """A newer format may mean its fields otherwise: refused by file, field and both versions (not read as
    today's, nor named by an attribute it lacks); shards of older formats, or that do not say, read as ever."""
    newer = FORMAT_VERSION + 1
    for name in ("new", "old", "none"):
        (tmp_path / name).mkdir()
    write_shard(tmp_path / "new" / "s.h5", {0: synthetic_episode(10)}, {**ATTRS, "format_version": newer})
    with h5py.File(tmp_path / "new" / "s.h5", "a") as f:
        del f.attrs["size"]  # renamed in that format, say
    with pytest.raises(DatasetError, match=rf"new/s\.h5: file attribute 'format_version' is {newer}, newer than the "
                                           rf"shard format {FORMAT_VERSION} this code reads"):
        EpisodeStore(tmp_path / "new")
    write_shard(tmp_path / "old" / "a.h5", {0: synthetic_episode(10)}, {**ATTRS, "format_version": 0})
    write_shard(tmp_path / "none" / "b.h5", {0: synthetic_episode(10)}, ATTRS)
    with h5py.File(tmp_path / "none" / "b.h5", "a") as f:
        del f.attrs["format_version"]
    assert len(EpisodeStore(tmp_path / "old")) == len(EpisodeStore(tmp_path / "none")) == 1


def test_bad_members_name_the_file_and_member(tmp_path):
    """An extra group named like no episode (training took it for one, collection crashed on its name) and a
    frame column that is a group."""
    write_shard(tmp_path / "s.h5", {0: synthetic_episode(10)}, ATTRS)
    with h5py.File(tmp_path / "s.h5", "a") as f:
        f.copy("ep_000000", "ep_abc")
    with pytest.raises(DatasetError, match=r"s\.h5: unexpected member 'ep_abc': a shard holds only episodes"):
        EpisodeStore(tmp_path / "s.h5")
    cfg = CollectConfig(episodes=1, steps=10, size=32, workers=1, out=str(tmp_path))
    with pytest.raises(DatasetError, match="unexpected member 'ep_abc'"):  # not a crash on its name
        collect(cfg, progress=False)
    write_shard(tmp_path / "g.h5", {0: synthetic_episode(10)}, ATTRS)
    with h5py.File(tmp_path / "g.h5", "a") as f:
        del f["ep_000000/pixels"]
        f.create_group("ep_000000/pixels")
    with pytest.raises(DatasetError, match=r"g\.h5: episode ep_000000: pixels must be an array \(an HDF5 dataset\), "
                                           r"got a group"):
        EpisodeStore(tmp_path / "g.h5")


def test_a_stable_worldmodel_file_among_shards_is_named_as_such(tmp_path):
    """Collecting into a directory that holds one said it lacked the file attribute 'env', as if a broken shard."""
    write_swm_file(tmp_path / "theirs.h5", n_episodes=1, rows=4)
    with pytest.raises(DatasetError, match=r"theirs\.h5: is a stable-worldmodel file \(one file, one dataset\), "
                                           r"not a shard"):
        collect(CollectConfig(episodes=1, steps=10, size=32, workers=1, out=str(tmp_path)), progress=False)


@pytest.mark.parametrize("frames", [0, 1])
def test_an_episode_of_fewer_than_two_frames_is_named_by_reader_and_writer(tmp_path, frames):
    """A shard made by hand with an empty episode was refused asking for (-1, 2) actions; write_shard failed with
    h5py's chunk-shape error, naming no file."""
    ep = {k: v[:frames] for k, v in synthetic_episode(4).items()}
    ep["action"] = ep["action"][:max(frames - 1, 0)]
    message = rf"episode .*0: has {frames} frame\(s\): an episode needs at least 2"
    with pytest.raises(ValueError, match=rf"s\.h5: {message}"):
        write_shard(tmp_path / "s.h5", {0: ep}, ATTRS)
    assert not list(tmp_path.iterdir())
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.attrs.update(ATTRS)
        for key, value in ep.items():
            f[f"ep_000000/{key}"] = value
    with pytest.raises(DatasetError, match=rf"s\.h5: {message}"):
        EpisodeStore(tmp_path / "s.h5")


@pytest.mark.parametrize("episodes, attrs, message", [
    ({-1: synthetic_episode(4)}, ATTRS, r"episode index must be an integer >= 0, got -1"),
    ({True: synthetic_episode(4)}, ATTRS, r"episode index must be an integer >= 0, got True"),
    ({0: synthetic_episode(4)}, {**ATTRS, "seed": None}, r"file attribute 'seed' is None"),
    ({0: {**synthetic_episode(4), "policy": None}}, ATTRS, r"episode 0: 'policy' is None"),
])
def test_what_a_reader_would_refuse_is_refused_when_written(tmp_path, episodes, attrs, message):
    """A negative index makes a member no reader takes for an episode; HDF5 has no None: both are named at once."""
    with pytest.raises(ValueError, match=rf"s\.h5: {message}"):
        write_shard(tmp_path / "s.h5", episodes, attrs)
    assert not list(tmp_path.iterdir())  # nothing written
