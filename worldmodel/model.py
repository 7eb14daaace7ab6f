"""``WorldModel``: the encoder and the predictor as one object, saved and loaded safely.

A checkpoint is two files side by side: ``NAME.pt`` (a plain state dict, loaded with
``weights_only=True``, never unpickled) and ``NAME.json`` (the config, a format version and the SHA-256 of
the weights: a json beside another model's weights is refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from common.config import check_at_least, check_at_most, from_dict, nested, option
from common.device import resolve_device
from common.files import atomic_write_bytes, atomic_write_json
from envs.storage import MANIFEST, DatasetError, check_attrs, recording
from worldmodel.encoder import EncoderConfig, build_encoder
from worldmodel.predictor import PredictorConfig, build_predictor, left_pad

# 2: latent size, history and image size moved from the sub-configs to the top; 3: model.pt holds the weights
# and what planning needs beside them ({"weights": ..., "extras": {"graph": ...}}), so a model file plans alone
FORMAT_VERSION = 3
MAX_PARAMETERS = 10**9  # 4 GB of float32 weights: what a config may ask for (refused before allocating)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this code, with the reason."""


@dataclass
class WorldModelConfig:
    """The architecture. ``image_size`` and ``env`` are filled from the training data."""

    latent_dim: int = option(64, "D, the size of a latent (the encoder's output, the predictor's state)")
    history: int = option(3, "latents (and action chunks) each prediction sees")
    frameskip: int = option(5, "env steps between two latents; one action chunk spans them")
    image_size: int | None = option(None, "frames are resized to this many pixels square (default: the dataset's "
                                          "size)")
    env: str = option("reacher-easy", "environment the model was trained on", cli=False)
    encoder: EncoderConfig = nested(EncoderConfig, "frame encoder")
    predictor: PredictorConfig = nested(PredictorConfig, "latent dynamics")

    def __post_init__(self):
        check_at_least(self, 1, ("latent_dim", "history", "frameskip"))
        check_at_most(self, 4096, ("latent_dim",))
        check_at_most(self, 64, ("history",))
        check_at_most(self, 100, ("frameskip",))
        if self.image_size is not None and not 16 <= self.image_size <= 512:
            raise ValueError(f"--image-size must be in [16, 512], got {self.image_size}")

    @property
    def action_dim(self) -> int:
        """A: one action chunk, the ``frameskip`` 2-D actions between two latents."""
        return 2 * self.frameskip

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, what: str = "model config") -> "WorldModelConfig":
        """The config saved in ``what`` (a model.json: errors name it and the setting)."""
        try:
            return from_dict(cls, d, what)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None


def _upgrade_v1(d: dict) -> dict:
    """Format 1 kept latent_dim/image_size in the encoder config and latent_dim/action_dim/history in the
    predictor's (it wrote every field); the same config in format 2."""
    d, enc, pred = dict(d), dict(d.get("encoder", {})), dict(d.get("predictor", {}))
    d["latent_dim"] = enc.pop("latent_dim", None)
    d["image_size"] = enc.pop("image_size", None)
    d["history"] = pred.pop("history", None)
    pred.pop("latent_dim", None)
    pred.pop("action_dim", None)
    d["encoder"], d["predictor"] = enc, pred
    return d


class WorldModel(nn.Module):
    """frames -> latents (encoder), (latent history, action chunks) -> future latents (predictor)."""

    def __init__(self, cfg: WorldModelConfig):
        super().__init__()
        if cfg.image_size is None:
            raise ValueError("WorldModelConfig.image_size must be set (training fills it from the data)")
        self.cfg = cfg
        if not _on_meta():  # sized on the meta device first: an absurd config allocates nothing
            with torch.device("meta"):
                WorldModel(cfg).check_size()
        self.encoder = build_encoder(cfg.encoder, cfg.image_size, cfg.latent_dim)
        self.predictor = build_predictor(cfg.predictor, cfg.latent_dim, cfg.action_dim, cfg.history)

    def check_size(self) -> None:
        """A ``ValueError`` when the architecture has more parameters than ``MAX_PARAMETERS``."""
        count = sum(p.numel() for p in self.parameters())
        if count > MAX_PARAMETERS:
            raise ValueError(f"this architecture has {count:,} parameters, more than the {MAX_PARAMETERS:,} a "
                             f"world model may have here: lower --latent-dim, the widths or the depths")

    @property
    def action_dim(self) -> int:
        """A: one action chunk, the ``frameskip`` 2-D actions between two latents."""
        return self.cfg.action_dim

    @property
    def history(self) -> int:
        return self.cfg.history

    @property
    def frameskip(self) -> int:
        return self.cfg.frameskip

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, frames: Tensor) -> Tensor:
        """uint8 frames (..., H, W, 3), as the env and the dataset give them -> latents (..., D)."""
        size = self.cfg.image_size
        if frames.shape[-3:] != (size, size, 3):
            raise ValueError(f"frames must be (..., {size}, {size}, 3) for this model, got {tuple(frames.shape)}")
        return self.encoder(rearrange(frames, "... h w c -> ... c h w"))

    def forward(self, frames: Tensor, actions: Tensor, rollout_steps: int = 0, from_first_frame: bool = False):
        """Training pass on windows: frames (B, L, H, W, 3), actions (B, L-1, A) -> latents (B, L, D),
        teacher-forced predictions (B, L-1, D) of latents 1..L-1, and (with ``rollout_steps`` R > 0)
        open-loop predictions (B, R, D) of latents h..h+R-1 from the first h latents, as planning uses them.
        ``from_first_frame`` appends B more rows (2B, R, D): the rollout of latents 1..R from the first latent
        alone (left-padded as at an episode's start), as a planner conditioned on one frame uses the model."""
        z = self.encode(frames)
        pred = self.predictor(z[:, :-1], actions)
        if rollout_steps == 0:
            return z, pred, None
        h, r = self.history, rollout_steps
        z_hist, a_hist, plan = z[:, :h], actions[:, :h - 1], actions[:, h - 1:h - 1 + r]
        if from_first_frame:  # one rollout call for both: a padded history starts exactly as one frame does
            first_z, first_a = left_pad(z[:, :1], actions[:, :0], h)  # (B, h, D), (B, h-1, A)
            z_hist, a_hist = torch.cat([z_hist, first_z]), torch.cat([a_hist, first_a])
            plan = torch.cat([plan, actions[:, :r]])  # (2B, R, A)
        return z, pred, self.predictor.rollout(z_hist, a_hist, plan)

    def rollout(self, z_hist: Tensor, a_hist: Tensor | None, actions: Tensor) -> Tensor:
        """(B, h, D), (B, h-1, A) | None, (B, H, A) -> (B, H, D): see ``Predictor.rollout``."""
        return self.predictor.rollout(z_hist, a_hist, actions)

    # --- checkpoints ------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None, extras: dict | None = None) -> Path:
        """Write ``path`` (the weights and ``extras``: tensors planning needs, such as the subgoal graph) and
        then ``path.json`` (config and what training recorded, ``extra``), each atomically."""
        path = Path(path)
        state = self.state_dict()
        meta = {"format_version": FORMAT_VERSION, "config": self.cfg.to_dict(), **(extra or {}),
                "weights_sha256": weights_digest(state)}
        atomic_torch_save({"weights": state, "extras": extras or {}}, path)
        atomic_write_json(path.with_suffix(".json"), meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "WorldModel":
        """Load a checkpoint written by ``save``; a clear ``CheckpointError`` if it does not fit."""
        path = Path(path)
        meta, cfg = check_model_file(path)
        state, extras = _weights_and_extras(load_weights_file(path, "a weights file"), meta, path)
        if "weights_sha256" in meta and meta["weights_sha256"] != weights_digest(state):
            raise CheckpointError(f"{path.with_suffix('.json')} describes other weights than {path} (its "
                                  f"'weights_sha256' differs): the model.json of another model? Copy a model's "
                                  f"two files together")
        try:
            with torch.device("meta"):  # the config's size and shapes, checked before anything is allocated
                skeleton = cls(cfg)
            skeleton.check_size()
            mine = skeleton.state_dict()
        except ValueError as exc:
            raise CheckpointError(f"{path.with_suffix('.json')}: {exc}") from None
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        wrong = [k for k in mine.keys() & state.keys()
                 if not isinstance(state[k], torch.Tensor) or mine[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{path}: weights do not match its config (another config or code version?): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
        model = cls(cfg)
        model.load_state_dict(state)
        model.extras = extras  # what planning needs beside the weights (e.g. "graph"), on the CPU
        return model.to(resolve_device(device)).eval()


def weights_digest(state: dict) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: what ties a model.json to its model.pt."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if isinstance(t, torch.Tensor):
            h.update(f"{name} {t.dtype} {tuple(t.shape)};".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def recorded_weights_sha256(path: str | Path, meta: dict) -> str:
    """The SHA-256 of a model file's weights: what its model.json (``meta``) records, or, for a file written
    before model.json recorded it, computed from the weights."""
    if meta.get("weights_sha256"):
        return meta["weights_sha256"]
    return weights_digest(_weights_and_extras(load_weights_file(Path(path), "a weights file"), meta, Path(path))[0])


def _weights_and_extras(state: dict, meta: dict, path: Path) -> tuple[dict, dict]:
    """(state dict, extras) of a model file: format 3 holds both; earlier formats the state dict alone. An
    older model.json beside a format-3 model.pt (``save_extras`` stopped between the two writes) is read by
    what the file holds: a state dict's names are never exactly ``weights`` and ``extras``."""
    if meta["format_version"] < 3 and set(state) != {"weights", "extras"}:
        return state, {}
    if not isinstance(state.get("weights"), dict) or not isinstance(state.get("extras", {}), dict):
        raise CheckpointError(f"{path}: a format-3 model file holds 'weights' and 'extras' dicts; this one does not")
    return state["weights"], state.get("extras", {})


def save_extras(path: str | Path, extras: dict, planner: dict | None = None) -> None:
    """Add ``extras`` to a saved model file (rewritten atomically, in the current format): what an older
    model lacks, such as its subgoal graph, saved once; ``planner``, when given, replaces the planner
    settings model.json records."""
    path = Path(path)
    meta = read_model_meta(path)
    state, old = _weights_and_extras(load_weights_file(path, "a weights file"), meta, path)
    atomic_torch_save({"weights": state, "extras": {**old, **extras}}, path)  # an older model.json reads it too
    meta = {**meta, "format_version": FORMAT_VERSION, **({"planner": planner} if planner is not None else {})}
    atomic_write_json(path.with_suffix(".json"), meta)


def _on_meta() -> bool:
    """Whether modules are being built on the meta device (shapes only, no memory)."""
    return torch.empty(0).device.type == "meta"


def check_model_file(path: str | Path) -> tuple[dict, "WorldModelConfig"]:
    """A model file's description and config, read and checked without loading its weights (cheap: a command
    given several models checks them all, a truncated or damaged archive too, before any work); a
    ``CheckpointError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(_not_a_model_file(path))
    meta = read_model_meta(path)
    config = WorldModelConfig.from_dict(meta["config"], str(path.with_suffix(".json")))
    check_archive(path, "a weights file")
    return meta, config


def read_model_meta(path: str | Path) -> dict:
    """The JSON beside a ``model.pt``: its config, format version and what training recorded, each field
    of the right type (a ``CheckpointError`` naming the file and the field otherwise)."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if path.is_dir() or path.suffix in (".json", ".h5", ".hdf5"):
        raise CheckpointError(_not_a_model_file(path))
    if not meta_path.is_file():
        if not path.exists():
            raise CheckpointError(f"{path}: no such checkpoint")
        if path.name in ("checkpoint.pt", "checkpoint.prev.pt") and (path.parent / "model.pt").is_file():
            raise CheckpointError(f"{path} is a training run's checkpoint (what --resume reads); the model to "
                                  f"evaluate, plan with or film is {path.parent / 'model.pt'}")
        raise CheckpointError(f"{path}: its config {meta_path.name} is missing beside it")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_path}: not a model config (a JSON object with a 'config' object)")
    version = meta.get("format_version")
    if version not in (1, 2, FORMAT_VERSION):
        raise CheckpointError(f"{meta_path}: 'format_version' is {version!r}; this code reads 1 to {FORMAT_VERSION} "
                              f"(a model written by a newer version of it?)")
    _check_meta(meta, meta_path)
    if version == 1:  # every reader sees the current format
        meta = {**meta, "config": _upgrade_v1(meta["config"]), "format_version": 2}
    if isinstance((meta.get("data") or {}).get("recording"), dict):  # what a file may leave out, filled
        meta = {**meta, "data": {**meta["data"], "recording": recording(meta["data"]["recording"])}}
    return meta


def _not_a_model_file(path: Path) -> str:
    """Why ``path`` is not a model file, and which file to give instead."""
    if path.is_dir():
        inside = f"; give {path / 'model.pt'}" if (path / "model.pt").is_file() else ""
        return f"{path} is a directory, not a model file (a model.pt){inside}"
    if path.name == MANIFEST and not path.with_suffix(".pt").is_file():
        return (f"{path} is a dataset's manifest, not a model file (a model.pt, as wm train writes it); its "
                f"directory {path.parent} is the dataset (--data)")
    if path.suffix == ".json":
        return f"{path} is a model's description; give the weights file beside it, {path.with_suffix('.pt')}"
    if path.suffix in (".h5", ".hdf5") and path.is_file():
        return f"{path} is a dataset file, not a model file (a model.pt, as wm train writes it)"
    return f"{path}: no such checkpoint"


# What training records in model.json: field -> (its type, what it is). ``data`` lists episode uids.
META_FIELDS = {"step": (int, "a count of steps"), "train_config": (dict, "the run's settings"),
               "history": (list, "the run's history"), "metrics": (dict, "the run's metrics"),
               "data": (dict, "the record of the training data"),
               "provenance": (dict, "what made the model: command, commit, packages, machine"),
               "planner": (dict, "the planner settings it is planned with, by name"),
               "weights_sha256": (str, "the SHA-256 of the weights of its model.pt"),
               "world_size": (int, "the number of processes that trained it")}
DATA_FIELDS = {"path": (str, "the dataset's path"), "fingerprint": ((str, type(None)), "the dataset's fingerprint"),
               "episodes": (int, "a count of episodes"), "train": (list, "episode uids"),
               "val": (list, "episode uids"), "test": (list, "episode uids"),
               "relative_to_model": (str, "the dataset's path relative to the model"),
               "absolute": (str, "the dataset's absolute path"),
               "recording": (dict, "how its frames were recorded (env, size, look, target, action repeat)")}
METRICS_FIELDS = {name: (dict, "the measurements of that name") for name in ("val", "probe", "closed_loop")}
TRAIN_FIELDS = {"preset": (str, "a preset's name"), "seed": (int, "a seed")}
PROVENANCE_FIELDS = {"command": ((str, type(None)), "the command line"), "code": (dict, "the code's version"),
                     "packages": (dict, "package versions"), "machine": (dict, "the machine"),
                     "time_utc": (str, "a time")}


# The planner settings (by name) of the models a training preset makes, where validation chose another than
# the default planner; model.json records them as ``planner``, and `wm eval`, `wm demo`, `wm study hold` and
# `load_policy` plan the model so unless told otherwise. The hold preset's: the default planner held the goal
# less on validation (docs/NOTES.md); white noise, as its CEM 100 x 10 was chosen (before red noise was the default).
PRESET_PLANNER = {"hold": {"samples": 100, "iterations": 10, "grad_steps": 0, "noise_beta": 0.0}}


def planner_record(meta: dict) -> dict:
    """The planner settings a model.json records (``planner``, by name, unchecked); for a file written before
    models recorded them, its training preset's (none: the default planner). A record of a preset's planner
    written before the preset pinned a setting (the hold preset's white noise, pinned when the default became
    red) takes that setting from the preset: the planner it was chosen with, not today's default."""
    preset = meta.get("train_config", {}).get("preset")
    pinned = PRESET_PLANNER.get(preset, {}) if isinstance(preset, str) else {}
    recorded = meta.get("planner", pinned)
    if isinstance(recorded, dict) and recorded and pinned.keys() & recorded.keys():
        return {**pinned, **recorded}
    return recorded


def _check_meta(meta: dict, where: Path) -> None:
    """model.json's recorded fields, when present, of the types their readers assume."""
    _check_fields(meta, META_FIELDS, where, "")
    if isinstance(meta.get("step"), int) and (isinstance(meta["step"], bool) or meta["step"] < 0):
        raise CheckpointError(f"{where}: 'step' must be a count of steps, got {meta['step']!r}")
    data = meta.get("data")
    if data:
        if not {"fingerprint", "train"} <= set(data):
            raise CheckpointError(f"{where}: 'data' must record 'fingerprint' and 'train' (the training data's "
                                  f"fingerprint and episodes), got keys {sorted(data)}")
        _check_fields(data, DATA_FIELDS, where, "data.")
        for split in ("train", "val", "test"):
            if not all(isinstance(u, str) for u in data.get(split, [])):
                raise CheckpointError(f"{where}: 'data.{split}' must list episode uids (strings)")
        if "recording" in data:
            try:
                check_attrs(data["recording"], f"{where}: 'data.recording'")
            except DatasetError as exc:
                raise CheckpointError(str(exc)) from None
    for key, fields in (("metrics", METRICS_FIELDS), ("train_config", TRAIN_FIELDS),
                        ("provenance", PROVENANCE_FIELDS)):
        if isinstance(meta.get(key), dict):
            _check_fields(meta[key], fields, where, f"{key}.")


def _check_fields(record: dict, fields: dict, where: Path, prefix: str) -> None:
    for key, (kind, what) in fields.items():
        value = record.get(key)
        if key in record and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CheckpointError(f"{where}: '{prefix}{key}' must be {what}, got {value!r}"[:300])


def check_archive(path: Path, what: str) -> str:
    """That ``path`` is a whole zip archive whose members match their checksums (a truncated or damaged file is a
    ``CheckpointError`` naming it); returns the start of the message for what may still be wrong inside."""
    refused = (f"{path}: cannot be read as {what} (truncated, corrupt, or not written by this program; it is never "
               f"unpickled)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CheckpointError(f"{refused}: {exc}"[:500]) from None
    if bad is not None:
        raise CheckpointError(f"{refused}: the checksum of its member {bad!r} does not match (corrupt bytes)")
    return refused


def load_weights_file(path: Path, what: str) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary pickles.

    The archive's checksums are verified first (torch does not check them: flipped bytes would load as
    wrong weights), and every weight must be finite. Any failure (truncated file, corrupt bytes, not a
    torch file, a pickle that would run code, NaN weights) is a ``CheckpointError`` naming the file, not
    torch's own advice to turn ``weights_only`` off.
    """
    refused = check_archive(path, what)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise CheckpointError(f"{refused}: it holds Python objects other than tensors and plain containers"
                              f"{f' ({found.group(1)})' if found else ''}, which are refused") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{refused}: {reason[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: cannot be read as {what}: holds a {type(state).__name__}, not a dict")
    bad_key = first_non_finite(state)
    if bad_key is not None:
        raise CheckpointError(f"{path}: {bad_key} holds non-finite values (NaN or infinity): the weights of a "
                              f"diverged run, or corrupt; it is refused")
    return state


def first_non_finite(tree, prefix: str = "") -> str | None:
    """The dotted key of the first floating tensor of a (nested) state that holds NaN or infinity, or None."""
    if isinstance(tree, torch.Tensor):
        return (prefix or "a tensor") if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` into memory, then one plain atomic write: a full disk is a clean ``OSError`` (torch
    writing to a failing file raises its own ``enforce fail`` RuntimeError)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())
