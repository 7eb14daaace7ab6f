import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import synthetic_action, synthetic_episode, write_swm_file, write_synthetic
from envs.dataset import EpisodeStore, WindowDataset, WindowSpec
from envs.storage import DatasetError, write_shard


@pytest.mark.parametrize("in_memory", [True, False])
def test_windows_align_frames_actions_and_states(synthetic_data, in_memory):
    spec = WindowSpec(history=3, n_pred=2, frameskip=4)
    ds = WindowDataset(EpisodeStore(synthetic_data, in_memory=in_memory), spec, split="all")
    assert len(ds) == 4 * (30 - spec.span + 1)
    for k in [0, 5, len(ds) - 1]:
        item = ds[k]
        i, t0 = ds.index[k]
        offset = int(ds.store.episodes[i].key.split("_")[1]) * 1000
        t = t0 + np.arange(spec.frames) * spec.frameskip
        assert item["pixels"].shape == (5, 32, 32, 3) and item["pixels"].dtype == torch.uint8
        assert torch.equal(item["pixels"][:, 0, 0, 0], torch.tensor((offset + t) % 256, dtype=torch.uint8))
        assert item["actions"].shape == (4, 8)
        for j in range(spec.frames - 1):  # chunk j = the frameskip actions from frame j to frame j+1
            steps = offset + t[j] + np.arange(spec.frameskip)
            expected = synthetic_action(steps).reshape(-1)
            assert np.array_equal(item["actions"][j].numpy(), expected)
        assert np.allclose(item["qpos"][:, 0].numpy(), offset + t)


def test_split_by_episode_is_deterministic_and_disjoint(tmp_path):
    data = write_synthetic(tmp_path / "d", n_episodes=10, steps=12)
    store = EpisodeStore(data)
    train, val = store.split("train", 0.2, seed=1), store.split("val", 0.2, seed=1)
    assert len(val) == 2 and set(train).isdisjoint(val) and sorted(train + val) == list(range(10))
    assert store.split("val", 0.2, seed=1) == val and store.split("val", 0.2, seed=2) != val
    spec = WindowSpec(1, 1, 1)
    tr, va = WindowDataset(store, spec, "train", 0.2, 1), WindowDataset(store, spec, "val", 0.2, 1)
    assert set(tr.index[:, 0]).isdisjoint(set(va.index[:, 0]))


@pytest.mark.parametrize("val, test", [(-0.1, 0.0), (0.2, -0.1), (0.5, 0.5), (0.7, 0.6), (1.0, 0.0), (0.0, 0.1),
                                       (float("nan"), 0.0)])
def test_split_fractions_out_of_range_are_refused_naming_them(synthetic_data, val, test):
    """As `wm train` refuses them: val in (0, 1), test in [0, 1), together below 1 (training keeps episodes)."""
    store = EpisodeStore(synthetic_data)
    for split in ("train", "val", "test", "all"):
        with pytest.raises(ValueError, match=rf"--val-fraction \(val_fraction\) must be in \(0, 1\) and "
                                             rf"--test-fraction \(test_fraction\) in \[0, 1\), together below 1; "
                                             rf"got {val}, {test}"):
            store.split(split, val, 0, test)


def test_dataloader_workers_read_lazily(synthetic_data):
    ds = WindowDataset(EpisodeStore(synthetic_data, in_memory=False), WindowSpec(2, 1, 3), split="all")
    batches = list(DataLoader(ds, batch_size=8, num_workers=2, shuffle=True))
    assert sum(len(b["pixels"]) for b in batches) == len(ds)
    assert batches[0]["pixels"].shape[1:] == (3, 32, 32, 3)


@pytest.mark.parametrize("in_memory", [False, True])
def test_frames_outside_an_episode_or_out_of_order_are_refused(synthetic_data, in_memory):
    """A lazy read would return other frames (an empty array, another episode's), a cached one wrap around."""
    store = EpisodeStore(synthetic_data, in_memory=in_memory)
    last = store.episodes[0].steps
    assert len(store.frames(0, np.array([0, last]))) == 2
    for bad in ([last + 1], [-1], [3, 1]):
        with pytest.raises(IndexError, match=rf"frames of episode 0: .* are not increasing rows of 0..{last}"):
            store.frames(0, np.array(bad))


def test_frames_are_cached_only_within_half_the_memory_available(synthetic_data, monkeypatch):
    """On a machine short of memory the frames stay on disk (a cache of 8 GB there would swap)."""
    import envs.dataset as dataset
    from common.device import available_memory

    assert available_memory() > 0  # Linux says how much
    monkeypatch.setattr(dataset, "available_memory", lambda: 1000)
    assert not EpisodeStore(synthetic_data).in_memory
    assert EpisodeStore(synthetic_data, max_memory_gb=1).in_memory  # an explicit budget is taken as given
    for unknown_or_plenty in (None, 10**12):
        monkeypatch.setattr(dataset, "available_memory", lambda: unknown_or_plenty)
        assert EpisodeStore(synthetic_data).in_memory


def test_lazy_reads_keep_no_decompressed_frames_of_our_shards(synthetic_data, tmp_path):
    """HDF5 keeps a chunk cache per open dataset, and a store keeps every episode's dataset open: a cache on
    our one-frame chunks would hold each episode read, decompressed, until the store closes (a dataset too
    large for memory would fill it anyway). Only a stable-worldmodel file, whose chunks hold many frames,
    keeps one."""
    store = EpisodeStore(synthetic_data, in_memory=False)
    for i in range(len(store)):
        store.frames(i, np.arange(0, 30, 5))
    assert len(store._datasets) == len(store)
    assert all(ds.id.get_access_plist().get_chunk_cache()[1] == 0 for ds in store._datasets.values())
    theirs = EpisodeStore(write_swm_file(tmp_path / "theirs.h5"), in_memory=False, env="reacher-easy")
    theirs.frames(0, np.arange(3))
    (ds,) = theirs._datasets.values()
    assert ds.id.get_access_plist().get_chunk_cache()[1] > 0


def test_window_longer_than_episodes(synthetic_data):
    """Every short episode is named at once (the first five, then a count), so one run says all to fix."""
    store = EpisodeStore(synthetic_data)
    with pytest.raises(DatasetError, match=r"(\d+) train episode\(s\) shorter than a window") as refused:
        WindowDataset(store, WindowSpec(history=4, n_pred=4, frameskip=5))
    train = store.split("train", 0.1, 0)
    assert f"{len(train)} train episode(s)" in str(refused.value)
    assert str(refused.value).count("has 30 steps") == min(5, len(train))


def test_missing_dataset_and_empty_dir(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset"):
        EpisodeStore(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .h5 shards"):
        EpisodeStore(tmp_path / "empty")
    (tmp_path / "empty" / "nested").mkdir()  # shards one level down, or named .hdf5: said where they are
    (tmp_path / "empty" / "nested" / "a.h5").touch()
    with pytest.raises(DatasetError, match=r"holds no .h5 shards \(it holds nested/a\.h5: shards are the .h5 files "
                                           r"directly in it"):
        EpisodeStore(tmp_path / "empty")


def test_truncated_shard_names_the_file(synthetic_data):
    shard = sorted(synthetic_data.glob("*.h5"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=shard.name):
        EpisodeStore(synthetic_data)


def test_garbage_file(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetError, match="cannot be read as HDF5"):
        EpisodeStore(tmp_path / "x.h5")


def test_missing_keys_and_bad_shapes(tmp_path):
    ep = synthetic_episode(10)
    del ep["qvel"]
    write_shard(tmp_path / "a.h5", {0: ep}, {"env": "reacher-easy", "size": 32})
    with pytest.raises(DatasetError, match="missing keys \\['qvel'\\]"):
        EpisodeStore(tmp_path / "a.h5")
    ep = synthetic_episode(10)
    ep["action"] = ep["action"][:-1]
    write_shard(tmp_path / "b.h5", {0: ep}, {"env": "reacher-easy", "size": 32})
    with pytest.raises(DatasetError, match="action must be"):
        EpisodeStore(tmp_path / "b.h5")
    write_shard(tmp_path / "c.h5", {0: synthetic_episode(10, size=32)}, {"env": "reacher-easy", "size": 48})
    with pytest.raises(DatasetError, match="pixels must be"):
        EpisodeStore(tmp_path / "c.h5")
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_group("ep_000000")
    with pytest.raises(DatasetError, match="missing file attribute"):
        EpisodeStore(tmp_path / "d.h5")


def test_mixed_sizes_or_envs_are_refused(tmp_path):
    a = write_synthetic(tmp_path / "a", n_episodes=2, size=32)
    b = write_synthetic(tmp_path / "b", n_episodes=2, size=48)
    c = write_synthetic(tmp_path / "c", n_episodes=2, size=32, env="reacher-hard")
    with pytest.raises(DatasetError, match="size"):
        EpisodeStore([a, b])
    with pytest.raises(DatasetError, match="env"):
        EpisodeStore([a, c])
    assert len(EpisodeStore([a, write_synthetic(tmp_path / "a2", n_episodes=3, first=2)])) == 5
    with pytest.raises(DatasetError, match="the same episode twice"):  # a copied shard: one episode on both sides
        EpisodeStore([a, write_synthetic(tmp_path / "a3", n_episodes=3)])


def test_atomic_write_leaves_no_file_on_failure(tmp_path):
    with pytest.raises(Exception):
        write_shard(tmp_path / "s.h5", {0: {"pixels": object()}}, {"env": "x", "size": 32})
    assert list(tmp_path.iterdir()) == []


def test_a_copied_shard_in_a_dataset_directory_names_both_files(tmp_path):
    data = write_synthetic(tmp_path / "d", n_episodes=4, steps=10)
    shard = sorted(data.glob("*.h5"))[0]
    copy = data / "shard_copy.h5"
    copy.write_bytes(shard.read_bytes())
    with pytest.raises(DatasetError, match=rf"the same episode twice: .*{shard.name} ep_000000 and .*{copy.name} "
                                           rf"ep_000000"):
        EpisodeStore(data)


def test_a_short_dataset_directory_says_so_when_opened(tmp_path, caplog):
    """A directory records how many episodes it should hold: one left short by an interrupted collection or
    conversion is not silently a smaller dataset."""
    from envs.storage import write_manifest

    data = write_synthetic(tmp_path / "d", n_episodes=4, steps=10)
    write_manifest(data, 4)
    EpisodeStore(data)
    assert "holds" not in caplog.text
    sorted(data.glob("*.h5"))[-1].unlink()
    assert len(EpisodeStore(data)) == 2
    assert f"{data} holds 2 of the 4 episodes its dataset.json records" in caplog.text
    (data / "dataset.json").write_text('{"episodes": "four"}')
    with pytest.raises(DatasetError, match=r"dataset\.json: 'episodes' must be a count of episodes, got 'four'"):
        EpisodeStore(data)


def test_an_unreadable_directory_is_not_reported_as_empty(tmp_path, monkeypatch):
    from pathlib import Path

    data = write_synthetic(tmp_path / "d", n_episodes=2, steps=10)
    real = Path.iterdir

    def refuse(self):
        if self == data:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)
    monkeypatch.setattr(Path, "iterdir", refuse)
    with pytest.raises(DatasetError, match=rf"{data}: cannot be read \(Permission denied\)"):
        EpisodeStore(data)
