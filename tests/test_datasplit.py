"""Which episodes a model chooses on and is reported on, on its own dataset and on others."""

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
