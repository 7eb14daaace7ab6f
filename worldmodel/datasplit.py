"""Which episodes a model was trained on, chosen on and reported on, recorded in its checkpoint and enforced.

Training splits its dataset by episode into train, validation and test (deterministic from the seed) and
records the dataset's fingerprint and the uids of each split's episodes (``EpisodeRef.uid``: stable
across moved directories and extended collections). Whatever chooses (planner settings, presets, the
closed-loop check during training) uses validation; what is reported (``wm eval``, ``wm probe``,
``wm demo``) uses test. No command ever scores a model on its training episodes.

On any other dataset every episode the model did not train on is held out; they are divided into a
validation and a test half by their uids, so choices made there never see the reported episodes either, and
an episode the model recorded as validation or test keeps that role (an extended collection, a copy with
episodes added or removed), so an episode chosen on is never reported on.
A checkpoint from before validation was recorded has its held-out episodes as test, and none to choose on.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from envs.storage import collect_command, recording

log = logging.getLogger(__name__)

HELD_OUT = ("val", "test")


def split_record(store, data: str, ids: dict[str, list[int]], model_dir: str | Path | None = None) -> dict:
    """What a checkpoint keeps about its training data: ``ids`` maps train, val, test to episode indices. The
    dataset's path is kept as given, absolute, and relative to the model's directory ``model_dir`` (so a
    run directory moved together with its data still finds it)."""
    where = Path(data).resolve()
    paths = {"path": str(data), "absolute": str(where)}
    if model_dir is not None:
        paths["relative_to_model"] = os.path.relpath(where, Path(model_dir).resolve())
    return {**paths, "fingerprint": store.fingerprint, "episodes": len(store), "recording": recording(store.attrs),
            **{name: [store.episodes[i].uid for i in episode_ids] for name, episode_ids in ids.items()}}


# How a frame looks and how an action moves the arm, beside the env (which must match): the model learned these
LOOK_AND_DYNAMICS = ("render_size", "render_quality", "hide_target", "action_repeat")


def recording_differences(meta: dict, store) -> str:
    """How ``store``'s episodes were recorded otherwise than the model's training episodes (its data record):
    "" when alike, or when the model does not say (trained by a version that did not record it)."""
    trained = (meta.get("data") or {}).get("recording")
    if not isinstance(trained, dict):
        return ""
    here = recording(store.attrs)
    return "; ".join(f"{key} {here[key]!r} (the model's training data: {trained[key]!r})"
                     for key in LOOK_AND_DYNAMICS if key in trained and here[key] != trained[key])


def _legacy_held_out(store, meta: dict) -> tuple[list[int], str]:
    """A checkpoint that records no split: its held-out episodes re-derived as training drew them."""
    train_cfg = meta.get("train_config", {})
    fraction, seed = train_cfg.get("val_fraction", 0.1), train_cfg.get("seed", 0)
    ids = store.split("val", fraction, seed)
    return ids, (f"the checkpoint records no split: {len(ids)} held-out episodes re-derived with "
                 f"val_fraction={fraction}, seed={seed} (correct only if this is its training dataset)")


def _half(uid: str) -> str:
    """val or test for an episode of a dataset the model never saw: a fixed function of its uid."""
    return HELD_OUT[hashlib.sha256(uid.encode()).digest()[0] % 2]


def split_episodes(store, meta: dict, split: str) -> tuple[list[int], str]:
    """Indices of ``store``'s episodes in ``split`` (val or test) for the model ``meta`` describes, and a
    sentence saying how they were chosen. A ValueError when the model has no such episodes here."""
    if split not in HELD_OUT:
        raise ValueError(f"split must be one of {list(HELD_OUT)}, got {split!r}")
    record = meta.get("data")
    if not record and meta.get("train_config"):
        ids, note = _legacy_held_out(store, meta)
        if split == "val":
            raise ValueError(f"{note}; they are its test episodes, and it has no validation episodes to choose on")
        return ids, note
    record = record or {"train": [], "fingerprint": None, "path": "none recorded"}
    if store.fingerprint == record["fingerprint"]:
        if "test" not in record:  # recorded before validation and test were told apart
            if split == "val":
                raise ValueError("this checkpoint records held-out episodes but no validation split: they are its "
                                 "test episodes, and it has none to choose on (train it again to get one)")
            ids = sorted(store.index_of_uids(record["val"]))
            return ids, f"the {len(ids)} episodes held out when the model was trained on this dataset (test)"
        ids = sorted(store.index_of_uids(record[split]))
        name = {"val": "validation", "test": "test"}[split]
        return ids, f"the {len(ids)} {name} episodes of the dataset the model was trained on"
    trained = set(record["train"])
    recorded = {uid: name for name in HELD_OUT for uid in record.get(name, [])}  # roles the model recorded
    ids = [i for i, e in enumerate(store.episodes)
           if e.uid not in trained and recorded.get(e.uid, _half(e.uid)) == split]
    note = (f"not the dataset the model was trained on ({record['path']}): {len(ids)} of its {len(store)} episodes, "
            f"the {split} half of those the model never trained on (its recorded {split} episodes, the others "
            f"by uid)")
    return ids, note


def training_episodes(store, meta: dict) -> list[int]:
    """The episodes of ``store`` the model trained on (what the subgoal graph is built from, never an
    evaluation's goals); a ValueError saying what to do when it holds none."""
    record = meta.get("data") or ({} if meta.get("train_config") else {"train": []})
    if record:
        trained = set(record["train"])
        train = [i for i, e in enumerate(store.episodes) if e.uid in trained]
    else:
        held = set(_legacy_held_out(store, meta)[0])
        train = [i for i in range(len(store)) if i not in held]
    if not train:
        raise ValueError(f"{store.paths}: holds none of the model's training episodes, which subgoals need; plan "
                         f"without them (--no-subgoals.enabled) or give the training data")
    return train


def probe_split(store, meta: dict, split: str = "test") -> tuple[list[int], list[int], str]:
    """(fit, score, note) episodes for a probe: scored on ``split``, fit on the model's training episodes; on
    a dataset holding none of them (every episode new to the model), fit on all the others: the other
    held-out half (``split_episodes``), so the whole dataset is used and the scored episodes are those
    ``wm eval`` reports on. A ValueError naming the dataset when either is empty."""
    score, note = split_episodes(store, meta, split)
    try:
        fit = training_episodes(store, meta)
    except ValueError:
        fit = []
    if not fit:  # every episode is new to the model: fit on the others, the other held-out half
        scored = set(score)
        fit = [i for i in range(len(store)) if i not in scored]
        note += f"; it holds none of the model's training episodes, so the probe is fit on its other {len(fit)}"
    if not fit or not score:
        raise ValueError(f"{store.paths}: too few episodes for a probe: {len(fit)} to fit it on and {len(score)} "
                         f"to score it on, of its {len(store)} ({note})")
    return fit, score, note


def recorded_data(meta: dict) -> str | None:
    """The dataset a checkpoint was trained on (its path as training saw it)."""
    return meta.get("data", {}).get("path") or meta.get("train_config", {}).get("data")


def data_candidates(meta: dict, checkpoint) -> list[Path]:
    """Where a checkpoint's dataset may be, most specific first: relative to the model file (a run directory
    moved with its data), its absolute path, and the path as training was given it (from the directory the
    command runs in, as models of earlier versions recorded it). The first is normalised (``/x/data``, not
    ``/x/run/../data``): the path found is said, and a resumed run records it."""
    record, found = meta.get("data", {}), []
    if record.get("relative_to_model"):  # '..' only leads it, from a resolved directory: normpath is exact
        found.append(Path(os.path.normpath(Path(checkpoint).resolve().parent / record["relative_to_model"])))
    if record.get("absolute"):
        found.append(Path(record["absolute"]))
    if recorded_data(meta):
        found.append(Path(recorded_data(meta)))
    return list(dict.fromkeys(found))


def locate_data(meta: dict, checkpoint) -> tuple[Path | None, list[Path], dict]:
    """(the recorded dataset of a checkpoint, the paths tried, why each existing path tried is not it): the
    first candidate that holds the dataset training recorded (by fingerprint; a model recording none: the
    first that exists), or None. A path that holds another dataset (the default ``runs/demo/data`` collected
    again, say) is not it, nor one that cannot be read (the reason is kept)."""
    from envs.dataset import fingerprint_at

    candidates = data_candidates(meta, checkpoint)
    fingerprint = (meta.get("data") or {}).get("fingerprint")
    env = (meta.get("config") or {}).get("env")  # a file that names no env was read as the model's
    not_it = {}
    for path in (p for p in candidates if p.exists()):
        if not fingerprint:
            return path, candidates, not_it
        try:
            if fingerprint_at(path, env) == fingerprint:
                return path, candidates, not_it
            not_it[path] = "holds another dataset (not its recorded fingerprint)"
        except (OSError, ValueError) as exc:  # unreadable here: not the dataset training read
            not_it[path] = f"cannot be read ({exc})"
    return None, candidates, not_it


def resolve_data(meta: dict, checkpoint, need: str = "pass --data") -> str:
    """The recorded dataset of a checkpoint; a ValueError listing the paths tried otherwise."""
    path, candidates, not_it = locate_data(meta, checkpoint)
    if not candidates:
        raise ValueError(f"{checkpoint} does not record its dataset; {need}")
    if path is not None:
        return str(path)
    rec = (meta.get("data") or {}).get("recording")
    command = collect_command(rec) if isinstance(rec, dict) else None
    kind = f" (`{command}` records data of its kind)" if command else ""
    also = "".join(f"; {p} {why}" for p, why in not_it.items())
    raise ValueError(f"{checkpoint}: its dataset is not where it was recorded (tried "
                     f"{', '.join(str(p) for p in candidates)}{also}); {need}{kind}")


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
    from envs.storage import EnvMismatchError

    data = data or resolve_data(meta, checkpoint, need)
    try:  # a file that does not say its env (stable-worldmodel's) is read as the model's
        store = EpisodeStore(data, image_size=model.cfg.image_size, env=model.cfg.env)
    except EnvMismatchError as exc:  # only then is the model's env the point (other errors name their file)
        raise EnvMismatchError(f"{exc} (the env of the model {checkpoint})") from None
    differences = recording_differences(meta, store)
    if differences:  # allowed (a test of robustness, say), never silent
        log.warning(f"{data} was recorded otherwise than the frames {checkpoint} trained on: {differences}; what "
                    f"is measured on it includes that change")
    return store, str(data)
