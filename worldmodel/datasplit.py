"""Which episodes a model was trained on, recorded in its checkpoint and enforced when it is evaluated.

Training records the dataset's fingerprint and the uids of its training and held-out episodes
(``EpisodeRef.uid``: stable across moved directories and extended collections). Evaluation and probes
then never score a model on its own training episodes: on the training dataset they use the recorded
held-out episodes; on any other dataset every episode counts as held out, except episodes that were
training episodes (an extended collection keeps its old uids).
"""

from __future__ import annotations

from pathlib import Path


def split_record(store, data: str, train_ids: list[int], val_ids: list[int]) -> dict:
    """What a checkpoint keeps about its training data."""
    return {"path": str(data), "fingerprint": store.fingerprint, "episodes": len(store),
            "train": [store.episodes[i].uid for i in train_ids], "val": [store.episodes[i].uid for i in val_ids]}


def held_out(store, meta: dict) -> tuple[list[int], str]:
    """Indices of ``store``'s episodes the model never trained on, and a sentence saying how they were chosen."""
    record = meta.get("data")
    if not record:  # a checkpoint from before splits were recorded: the split is re-derived as training drew it
        train_cfg = meta.get("train_config", {})
        fraction, seed = train_cfg.get("val_fraction", 0.1), train_cfg.get("seed", 0)
        ids = store.split("val", fraction, seed)
        return ids, (f"the checkpoint records no split: {len(ids)} held-out episodes re-derived with "
                     f"val_fraction={fraction}, seed={seed} (correct only if this is its training dataset)")
    if store.fingerprint == record["fingerprint"]:
        ids = sorted(store.index_of_uids(record["val"]))
        return ids, f"the {len(ids)} episodes held out when the model was trained on this dataset"
    trained = set(record["train"])
    ids = [i for i, e in enumerate(store.episodes) if e.uid not in trained]
    note = (f"not the dataset the model was trained on ({record['path']}): all {len(store)} of its episodes "
            f"count as held out")
    if len(ids) < len(store):
        note += f", except {len(store) - len(ids)} that were training episodes"
    return ids, note


def not_held_out(store, held_out_ids) -> list[int]:
    """The episodes of ``store`` not among ``held_out_ids``."""
    test = set(held_out_ids)
    return [i for i in range(len(store)) if i not in test]


def training_episodes(store, meta: dict) -> list[int]:
    """The episodes of ``store`` the model trained on (what the subgoal graph is built from, never an
    evaluation's goals); a ValueError saying what to do when it holds none."""
    train = not_held_out(store, held_out(store, meta)[0])
    if not train:
        raise ValueError(f"{store.paths}: holds none of the model's training episodes, which subgoals need; plan "
                         f"without them (--no-subgoals.enabled) or give the training data")
    return train


def probe_split(store, meta: dict) -> tuple[list[int], list[int], str]:
    """(fit, score, note) episodes for a linear probe: the probe is fit on the model's training episodes
    and scored on held-out ones; on a dataset the model never saw, its episodes are halved."""
    test, note = held_out(store, meta)
    fit = not_held_out(store, test)
    if not fit:  # every episode is new to the model: fit on half of them, score on the other half
        fit, test = test[: len(test) // 2], test[len(test) // 2:]
        note += "; the probe is fit on half of them and scored on the other half"
    if not fit or not test:
        raise ValueError(f"{Path(str(meta.get('data', {}).get('path', '')))}: too few episodes for a probe "
                         f"({len(store)})")
    return fit, test, note


def recorded_data(meta: dict) -> str | None:
    """The dataset a checkpoint was trained on (its path as training saw it)."""
    return meta.get("data", {}).get("path") or meta.get("train_config", {}).get("data")


def load_with_data(checkpoint, data: str = "", device: str = "auto"):
    """(model, meta, store, data path): a trained model and a dataset to evaluate or probe it on, by
    default the one it was trained on, its frames sized for the model. Another env's data is refused."""
    from worldmodel.model import WorldModel, read_model_meta

    model = WorldModel.load(checkpoint, device)
    meta = read_model_meta(checkpoint)
    store, data = open_data(model, meta, checkpoint, data)
    return model, meta, store, data


def open_data(model, meta: dict, checkpoint, data: str = "", need: str = "pass --data"):
    """(store, path): ``data``, or else the dataset the checkpoint records, its frames sized for the model;
    ``need`` ends the error when there is neither. Another env's data is refused."""
    from envs.dataset import EpisodeStore
    from envs.storage import DatasetError

    data = data or recorded_data(meta)
    if not data:
        raise ValueError(f"{checkpoint} does not record its dataset; {need}")
    try:  # a file that does not say its env (stable-worldmodel's) is read as the model's
        store = EpisodeStore(data, image_size=model.cfg.image_size, env=model.cfg.env)
    except DatasetError as exc:
        raise ValueError(f"{exc} (the env of the model {checkpoint})") from None
    return store, str(data)
