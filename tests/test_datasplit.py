"""Which episodes a model chooses on and is reported on, on its own dataset and on others."""

import dataclasses
import json

from conftest import collect_tiny, save_as_trained_on
from test_model import tiny_config

from envs.dataset import EpisodeStore
from worldmodel.datasplit import split_episodes
from worldmodel.model import WorldModel


def test_an_extended_dataset_keeps_the_recorded_roles_of_held_out_episodes(tmp_path):
    """More episodes collected into the model's dataset (another fingerprint): its recorded validation and
    test episodes keep their roles, the new ones are divided by uid, none it trained on is held out."""
    data = collect_tiny(tmp_path / "data", episodes=8, steps=10)
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32)), tmp_path / "m.pt", data)
    record = json.loads((tmp_path / "m.json").read_text())["data"]
    collect_tiny(tmp_path / "data", episodes=24, steps=10)  # the same command, more episodes: it extends
    store = EpisodeStore(data)
    assert len(store) == 24 and store.fingerprint != record["fingerprint"]
    meta = {"data": record}
    uids = {s: {store.episodes[i].uid for i in split_episodes(store, meta, s)[0]} for s in ("val", "test")}
    assert set(record["val"]) <= uids["val"] and set(record["test"]) <= uids["test"]
    assert not uids["val"] & uids["test"] and not (uids["val"] | uids["test"]) & set(record["train"])
    assert len(uids["val"] | uids["test"]) == 24 - len(record["train"])
    assert len(uids["val"]) > len(record["val"]) and len(uids["test"]) > len(record["test"])  # new ones by uid


def test_the_recorded_dataset_is_found_whatever_its_frames_and_an_unreadable_one_is_said(tmp_path):
    """A model trained on non-square frames (resized for it) finds its recorded dataset: the fingerprint
    does not depend on the frames' shape. A recorded file that cannot be read is said so, with its error,
    not called another dataset."""
    import h5py
    import numpy as np
    import pytest

    from conftest import write_swm_file
    from envs.dataset import fingerprint_at
    from worldmodel.datasplit import resolve_data, split_record
    from worldmodel.model import read_model_meta

    path = tmp_path / "wide.h5"
    write_swm_file(path, n_episodes=8, rows=30, size=32)
    with h5py.File(path, "a") as f:  # 32 x 24 frames
        pixels = f["pixels"][:, :, :24]
        del f["pixels"]
        f["pixels"] = np.ascontiguousarray(pixels)
    store = EpisodeStore(path, image_size=32)
    assert fingerprint_at(path) == store.fingerprint
    ids = {s: store.split(s, 0.25, 0, 0.25) for s in ("train", "val", "test")}
    checkpoint = WorldModel(tiny_config("mlp", size=32, frameskip=5)).save(
        tmp_path / "m.pt", extra={"data": split_record(store, str(path), ids)})
    meta = read_model_meta(checkpoint)
    assert resolve_data(meta, checkpoint) == str(path)

    hard = tmp_path / "hard.h5"  # a file that names no env, trained on as reacher-hard
    write_swm_file(hard, n_episodes=8, rows=30, size=32)
    as_hard = EpisodeStore(hard, env="reacher-hard")
    assert as_hard.fingerprint != EpisodeStore(hard).fingerprint  # the env is part of what an episode is
    ids = {s: as_hard.split(s, 0.25, 0, 0.25) for s in ("train", "val", "test")}
    hard_model = WorldModel(dataclasses.replace(tiny_config("mlp", size=32, frameskip=5), env="reacher-hard")).save(
        tmp_path / "hard.pt", extra={"data": split_record(as_hard, str(hard), ids)})
    assert resolve_data(read_model_meta(hard_model), hard_model) == str(hard)

    path.write_bytes(path.read_bytes()[:5000])  # truncated
    with pytest.raises(ValueError, match=r"wide\.h5 cannot be read \(.*wide\.h5") as err:
        resolve_data(meta, checkpoint)
    assert "another dataset" not in str(err.value)
