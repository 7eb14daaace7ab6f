"""The on-disk dataset: HDF5 shards of episodes, written atomically and checked when read.

A shard is one ``.h5`` file. Its attributes say how it was made (``env``, ``size``, ``steps``,
``policy``, ``seed``, package versions, ...); each episode is a group ``ep_NNNNNN`` (the episode's
index in its collection) holding

    pixels  (T+1, H, W, 3) uint8    frames, the first before any action
    action  (T, 2)         float32  action[t] leads from frame t to frame t+1, in [-1, 1] (float64 accepted)
    qpos    (T+1, 2)       float64  joint angles (shoulder, wrist), radians
    qvel    (T+1, 2)       float64  joint velocities
    finger  (T+1, 2)       float64  fingertip xy (optional: derived from qpos by forward kinematics)
    target  (T+1, 2)       float64  target xy (optional: NaN and listed in ``missing`` when absent)

Anyone can bring their own rollouts by writing files of this shape (see ``write_shard``), or as one
stable-worldmodel file (``envs.swm``): ``envs.dataset.inspect_dataset`` reads both. Every array but the frames is
read and checked when a shard is opened (finite values, actions in [-1, 1]), so a bad value names its
file, episode and key at once instead of surfacing as a NaN loss hours later.
"""

from __future__ import annotations

import logging
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from common.config import check_integer
from common.files import atomic_write_bytes, atomic_write_json
from common.provenance import provenance
from envs.physics import make_physics
from envs.reacher import ENV_NAMES, MAX_ACTION_REPEAT

log = logging.getLogger(__name__)

try:  # registers the compression filters (Blosc, Zstd, LZ4, ...) of files written by other tools
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - a missing filter is then reported by name (check_filters)
    hdf5plugin = None

FORMAT_VERSION = 1
DEFAULT_DATA = "runs/demo/data"  # where `wm collect` writes and every other command reads, by default
STATE_KEYS = ("qpos", "qvel", "finger", "target")
REQUIRED_KEYS = ("pixels", "action", "qpos", "qvel")
OPTIONAL_KEYS = ("finger", "target")
# What a dataset that does not say assumes about how its frames look and how its actions move the arm
# (our shards from before these were recorded: one control step per action, fast look, target hidden).
RECORDING_DEFAULTS = {"hide_target": True, "render_quality": "fast", "action_repeat": 1}
# Attributes that must agree between shards of one dataset: what a frame looks like, how an action moves
# the arm, and the format.
# ``stretched_from``: the [height, width] of frames that were not square, in a copy that resized them to a square
CONSISTENT_ATTRS = ("env", "size", "render_size", "hide_target", "render_quality", "action_repeat", "format_version",
                    "stretched_from")
# Recorded float32 actions clipped to [-1, 1] may round a hair outside; anything further is a bug.
ACTION_TOLERANCE = 1e-4
MIN_FRAME_SIZE, MAX_FRAME_SIZE = 8, 4096  # pixels a side of stored frames (and of frames resized for a model)


class DatasetError(ValueError):
    """A dataset file that cannot be used, with the file and the problem named."""


class EnvMismatchError(DatasetError):
    """A dataset of another environment than the one asked for."""


EPISODE_KEY = re.compile(r"ep_\d+")  # an episode's group: ep_NNNNNN
INDEX_KEYS = ("ep_len", "ep_offset")  # what locates the episodes of a stable-worldmodel file (``envs.swm``)
MANIFEST = "dataset.json"  # in a dataset directory: how many episodes it should hold
RENDER_QUALITIES = ("fast", "standard")


def package_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("mujoco", "dm-control", "gymnasium", "numpy", "h5py"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return json.dumps(versions)


def recording(attrs: dict) -> dict:
    """How a dataset was recorded, defaults filled: ``env``, ``size`` (stored frames), ``render_size``
    (rendered, then area-resized to ``size``), ``hide_target``, ``render_quality``, ``action_repeat``
    (control steps per action), ``stretched_from`` (None, or the shape of frames that were not square, in a
    square copy of them). An evaluation rebuilds its environments from exactly this."""
    out = {**RECORDING_DEFAULTS, **{k: attrs[k] for k in CONSISTENT_ATTRS if attrs.get(k) is not None}}
    out.setdefault("render_size", out.get("size"))
    return {k: out.get(k) for k in CONSISTENT_ATTRS}


def collect_command(rec: dict) -> str | None:
    """The ``wm collect`` command line that records data as ``rec`` (a ``recording``) says its data was; None
    for frames that were not square, or a square copy of them (our renderer makes square frames: no collection
    records such data)."""
    if rec.get("stretched_from") or not (rec.get("render_size") or rec.get("size")):
        return None
    parts = ["wm collect", f"--env {rec['env']}", f"--size {rec.get('render_size') or rec['size']}"]
    if rec.get("render_size") not in (None, rec["size"]):
        parts.append(f"--image-size {rec['size']}")
    parts += [f"--render-quality {rec['render_quality']}", f"--action-repeat {rec['action_repeat']}"]
    if not rec["hide_target"]:
        parts.append("--no-hide-target")
    return " ".join(parts)


def check_attrs(attrs: dict, path) -> None:
    """The file attributes that decide what a frame looks like and how an action moves the arm, of the
    right type and range: a ``DatasetError`` naming the file and the attribute otherwise (not a crash when
    an evaluation rebuilds its environments from them)."""
    def bad(key: str, want: str):
        return DatasetError(f"{path}: file attribute {key!r} must be {want}, got {attrs.get(key)!r}")

    if not isinstance(attrs.get("env"), str) or attrs["env"] not in ENV_NAMES:  # else it trains, then fails evaluated
        raise bad("env", f"the environment's name, one of {sorted(ENV_NAMES)}")
    for key, low, high, what in (("size", MIN_FRAME_SIZE, MAX_FRAME_SIZE, "pixels"),
                                 ("render_size", MIN_FRAME_SIZE, MAX_FRAME_SIZE, "pixels"),
                                 ("action_repeat", 1, MAX_ACTION_REPEAT, "control steps per action")):
        value = attrs.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
            raise bad(key, f"an integer in [{low}, {high}] ({what})")
    shape = attrs.get("stretched_from")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 2 and len(set(shape)) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_FRAME_SIZE for x in shape)):
        raise bad("stretched_from", f"[height, width] of frames that were not square, in [1, {MAX_FRAME_SIZE}]")
    if attrs.get("hide_target") is not None and not isinstance(attrs["hide_target"], bool):
        raise bad("hide_target", "true or false")
    if attrs.get("render_quality") is not None and attrs["render_quality"] not in RENDER_QUALITIES:
        raise bad("render_quality", f"one of {list(RENDER_QUALITIES)}")


def check_image_size(image_size, name: str = "image_size") -> int:
    """A size frames are area-resized to: within the sizes a dataset file may record, so that a resized copy
    (``wm convert``) can be read back, and no absurd frame is allocated."""
    return check_integer(image_size, name, MIN_FRAME_SIZE, MAX_FRAME_SIZE)


def check_env(attrs: dict, env: str | None, path) -> None:
    """A dataset that records its env is that env's: asking for another is an ``EnvMismatchError``."""
    if env is not None and env != attrs["env"]:
        raise EnvMismatchError(f"{path}: holds {attrs['env']!r} episodes, but env={env!r} was asked for")


def episode_key(index: int) -> str:
    return f"ep_{index:06d}"


def episode_index(key: str) -> int:
    return int(key.split("_", 1)[1])


def write_shard(path: str | Path, episodes: dict[int, dict[str, np.ndarray]], attrs: dict) -> Path:
    """Write episodes ``{index: arrays}`` to ``path`` atomically: a temporary file, then a rename.

    The shard is built in memory (HDF5's core driver) and reaches the disk in one plain write, so a
    full disk or a file size limit is one clean OSError; HDF5 writing to a failing file floods errors
    and can crash the interpreter. The temporary file is removed on any failure."""
    path = Path(path)
    _check_writable(path, episodes, attrs)
    with h5py.File(path.name, "w", driver="core", backing_store=False) as f:
        f.attrs.update({"format_version": FORMAT_VERSION, "versions": package_versions(), **attrs})
        for index in sorted(episodes):
            _write_episode(f.create_group(episode_key(index)), episodes[index])
        f.flush()
        image = f.id.get_file_image()
    atomic_write_bytes(path, image)
    return path


def _check_writable(path: Path, episodes: dict, attrs: dict) -> None:
    """Refuse, before anything is written and naming the field, what the reader would refuse or HDF5 cannot
    store: a negative index (its group would be named like no episode, ``ep_NNNNNN``), a None and an episode
    of fewer than two frames."""
    try:
        for index in episodes:
            check_integer(index, "episode index", 0)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc} (an episode is stored as the group ep_NNNNNN of its index)") from None
    unknown = "HDF5 stores no None: leave out what is unknown"
    for key, value in attrs.items():
        if value is None:
            raise ValueError(f"{path}: file attribute {key!r} is None ({unknown})")
    for index, episode in episodes.items():
        for key, value in episode.items():
            if value is None:
                raise ValueError(f"{path}: episode {index}: {key!r} is None ({unknown})")
        pixels = episode.get("pixels")
        if isinstance(pixels, np.ndarray) and pixels.ndim and len(pixels) < 2:  # 0 frames: h5py's chunk error
            raise ValueError(f"{path}: episode {index}: {too_short(len(pixels))}")


def too_short(frames: int) -> str:
    """Why an episode of fewer than two frames is refused, by the reader and the writer alike."""
    return f"has {frames} frame(s): an episode needs at least 2 (a frame, an action, the next frame)"


def _write_episode(group: h5py.Group, episode: dict[str, np.ndarray]) -> None:
    for key, value in episode.items():
        if key == "pixels":
            group.create_dataset(key, data=value, chunks=(1, *value.shape[1:]), compression="gzip",
                                 compression_opts=3)
        elif isinstance(value, np.ndarray):
            group.create_dataset(key, data=value)
        else:
            group.attrs[key] = value


# --- identity ------------------------------------------------------------------------------------
def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def episode_uid(env: str, action: np.ndarray, qpos: np.ndarray | None) -> str:
    """16 hex digits naming one episode by what it is, not where it is stored: a hash of its env, its
    actions (as float32) and its first joint angles (rounded to 1e-6 rad). Moving, renaming, converting
    (``wm convert``, to either layout, at any image size) or extending a dataset keeps it, so a model is
    never evaluated on a copy of its own training episodes; other episodes get other uids."""
    actions = hashlib.sha256(np.ascontiguousarray(action, dtype=np.float32).tobytes()).hexdigest()
    start = None if qpos is None else np.round(np.asarray(qpos, dtype=np.float64)[0], 6).tolist()
    return _digest(env, actions, start)[:16]


@dataclass(frozen=True)
class EpisodeRef:
    """Where an episode lives, and its length in actions.

    ``row`` is the episode's first row in a single-file (stable-worldmodel) dataset, None in a shard.
    ``uid`` names the episode by its content (see ``episode_uid``)."""

    shard: Path
    key: str
    steps: int
    uid: str = ""
    row: int | None = None

    def __post_init__(self):
        if not self.uid:  # made by hand: the file name and key still tell episodes apart
            object.__setattr__(self, "uid", _digest(Path(self.shard).name, self.key, self.steps)[:16])


@dataclass
class ShardInfo:
    """One opened file: its attributes, its episodes, and their checked actions and states.

    ``arrays[k]`` belongs to ``episodes[k]``: action (T, 2) float32 and qpos/qvel/finger/target (T+1, 2)
    float64. ``missing`` names the states the file lacks (filled with NaN)."""

    path: Path
    attrs: dict
    episodes: list[EpisodeRef]
    arrays: list[dict] = field(default_factory=list)
    missing: tuple = ()
    layout: str = "shards"


def inspect_shard(path: str | Path, env: str | None = None) -> ShardInfo:
    """Open a shard, check every episode's keys, shapes, dtypes and values; raise ``DatasetError`` if bad."""
    path = Path(path)
    f = open_h5(path)
    with f:
        if is_swm_handle(f):  # not "missing file attribute 'env'", as a shard would be
            raise DatasetError(f"{path}: is a stable-worldmodel file (one file, one dataset), not a shard of "
                               f"episodes: a directory of shards cannot also hold it")
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
        check_format_version(attrs, path)  # first: a newer format may name or mean its attributes otherwise
        for key in ("env", "size"):
            if key not in attrs:
                raise DatasetError(f"{path}: missing file attribute {key!r}")
        check_attrs(attrs, path)
        check_env(attrs, env, path)
        size = attrs["size"]
        episodes, arrays, missing = [], [], set()
        for key in sorted(f.keys()):
            if not EPISODE_KEY.fullmatch(key):
                raise DatasetError(f"{path}: unexpected member {key!r}: a shard holds only episodes, groups named "
                                   f"ep_NNNNNN")
            try:
                steps, episode = _read_episode(f[key], size, path)
            except DatasetError as exc:
                raise DatasetError(f"{path}: episode {key}: {exc}") from None
            except (OSError, KeyError, RuntimeError) as exc:
                raise DatasetError(f"{path}: episode {key} cannot be read (truncated or corrupt?): {exc}") from exc
            missing.update(k for k in ("target",) if k not in episode)  # finger: derived from qpos
            episodes.append(EpisodeRef(path, key, steps, episode_uid(attrs["env"], episode["action"], episode["qpos"])))
            arrays.append(episode)
    if not episodes:
        raise DatasetError(f"{path}: holds no episodes")
    complete_states(arrays, attrs["env"], path)
    return ShardInfo(path, attrs, episodes, arrays, tuple(sorted(missing)))


def check_format_version(attrs: dict, path) -> None:
    """A shard of a newer format than this code reads is refused, not read as today's; older ones, and those
    from before ``format_version`` was recorded, are read as they always were."""
    version = attrs.get("format_version")
    if version is None:
        return
    if isinstance(version, bool) or not isinstance(version, int):
        raise DatasetError(f"{path}: file attribute 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DatasetError(f"{path}: file attribute 'format_version' is {version}, newer than the shard format "
                           f"{FORMAT_VERSION} this code reads: it was written by a newer version of this project; "
                           f"read it with that version")


def is_swm_handle(f: h5py.File) -> bool:
    """True for an HDF5 file with ``ep_len``/``ep_offset`` datasets at its root (stable-worldmodel's layout)."""
    return any(isinstance(f.get(k), h5py.Dataset) for k in INDEX_KEYS)


def open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read as HDF5 (truncated or corrupt?): {exc}") from exc


def _read_episode(group, size: int, path: Path) -> tuple[int, dict]:
    if not isinstance(group, h5py.Group):
        raise DatasetError("is not a group")
    missing = [k for k in REQUIRED_KEYS if k not in group]
    if missing:
        raise DatasetError(f"missing keys {missing} (an episode needs {list(REQUIRED_KEYS)}, "
                           f"optionally {list(OPTIONAL_KEYS)})")
    groups = [k for k in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if k in group and not isinstance(group[k], h5py.Dataset)]
    if groups:
        raise DatasetError(f"{groups[0]} must be an array (an HDF5 dataset), got a group")
    pixels, action = group["pixels"], group["action"]
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
        raise DatasetError(f"pixels must be uint8 (T+1, {size}, {size}, 3), got {pixels.dtype} {pixels.shape}")
    steps = pixels.shape[0] - 1
    if steps < 1:  # before the shapes, which would ask for (-1, 2) actions
        raise DatasetError(too_short(steps + 1))
    if action.shape != (steps, 2):
        raise DatasetError(f"action must be ({steps}, 2) for {steps + 1} frames, got {action.shape}")
    present = [k for k in STATE_KEYS if k in group]
    for key in present:
        if group[key].shape != (steps + 1, 2):
            raise DatasetError(f"{key} must be ({steps + 1}, 2), got {group[key].shape}")
    check_filters(path, {k: group[k] for k in ("pixels", "action", *present)})
    # Reading the last frame touches the end of the file: a truncated shard fails here, not mid-training.
    pixels[steps]
    return steps, check_arrays({k: group[k][()] for k in ("action", *present)})


def check_arrays(arrays: dict[str, np.ndarray], first_step: int = 0) -> dict[str, np.ndarray]:
    """Finite values in every array and actions in [-1, 1]; float actions become float32 and states
    float64. Raises ``DatasetError`` naming the key and step (``first_step`` + row) of the first bad value."""
    out = {}
    for key, value in arrays.items():
        if value.dtype.kind not in "fiu":
            raise DatasetError(f"{key} must hold numbers, got dtype {value.dtype}")
        if key == "action" and value.dtype.kind != "f":
            raise DatasetError(f"action must be float32 or float64, got {value.dtype}")
        bad = ~np.isfinite(value)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DatasetError(f"{key} holds a non-finite value at step {first_step + row}: {value[row]}")
        if key == "action":
            far = np.abs(value) > 1 + ACTION_TOLERANCE
            if far.any():
                row = int(np.argwhere(far)[0][0])
                raise DatasetError(f"action must lie in [-1, 1] (the env's action space), got {value[row]} at "
                                   f"step {first_step + row}")
            out[key] = value.astype(np.float32, copy=False)
        else:
            out[key] = value.astype(np.float64, copy=False)
    return out


def check_filters(path: Path, datasets: dict) -> None:
    """Name a compression filter that is not installed, instead of h5py's bare read error later."""
    for name, ds in datasets.items():
        plist = ds.id.get_create_plist()
        for k in range(plist.get_nfilters()):
            code, _, _, label = plist.get_filter(k)
            if not h5py.h5z.filter_avail(code):
                label = label.decode(errors="replace") if isinstance(label, bytes) else str(label)
                raise DatasetError(
                    f"{path}: column {name!r} is compressed with the HDF5 filter {label!r} (id {code}), which is not "
                    f"installed here: `pip install hdf5plugin` provides it (Blosc, Zstd, LZ4, Bitshuffle, ...)")


def complete_states(arrays: list[dict], env: str, path: Path) -> None:
    """Fill in the optional states an episode lacks: ``finger`` by the arm's forward kinematics from
    ``qpos`` (the env's own MuJoCo model), ``target`` with NaN (absent: nothing to derive it from)."""
    need_finger = [a for a in arrays if "finger" not in a]
    if need_finger:
        fingers = fingertips(env, np.concatenate([a["qpos"] for a in need_finger]), path)
        start = 0
        for a in need_finger:
            a["finger"] = fingers[start:start + len(a["qpos"])]
            start += len(a["qpos"])
    for a in arrays:
        if "target" not in a:
            a["target"] = np.full_like(a["qpos"], np.nan)


def fingertips(env: str, qpos: np.ndarray, path: Path) -> np.ndarray:
    """(N, 2) joint angles -> (N, 2) fingertip xy, with the MuJoCo model of ``env``."""
    if env not in ENV_NAMES:
        raise DatasetError(f"{path}: has no finger positions and its env {env!r} is not one of "
                           f"{sorted(ENV_NAMES)}, whose model could derive them from qpos")
    physics = make_physics(*ENV_NAMES[env])
    try:
        return physics.fingertips(qpos)
    finally:
        physics.close()


def _plain(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def check_not_the_source(src: Path, dst: Path, verb: str) -> None:
    """What a command writes (``wm convert``'s copy, ``wm train``'s run) never goes over the dataset it reads,
    nor as an .h5 file into a source directory of shards (which would then mix two layouts and no longer open).
    ``verb``: what the command does with the dataset (``converts``)."""
    src, out = src.resolve(), dst.resolve()
    if out == src or (src.is_dir() and out.parent == src and out.suffix == ".h5"):
        into = "would replace" if out == src and not src.is_dir() else "would be written into"
        raise ValueError(f"--out {dst} {into} the dataset it {verb} (--data {src}); choose an --out outside it")


def find_shards(path: str | Path) -> list[Path]:
    """The shards of a dataset: a directory of ``.h5`` files, or one file."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{path}: no such dataset (a directory of .h5 shards or one .h5 file)")
    try:
        shards = sorted(p for p in path.iterdir() if p.suffix == ".h5")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not shards:
        others = sorted(p.name for p in path.glob("*.hdf5")) or sorted(
            str(p.relative_to(path)) for p in path.glob("*/*.h5"))
        hint = (f" (it holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}: shards are the .h5 files "
                f"directly in it; give one such file, or a directory of them, as --data)" if others else "")
        raise DatasetError(f"{path}: holds no .h5 shards{hint}")
    return shards


def write_manifest(directory: str | Path, episodes: int) -> None:
    """Record in a dataset directory how many episodes it should hold, so a short one says so when opened, and
    what wrote it (``provenance``)."""
    atomic_write_json(Path(directory) / MANIFEST, {"episodes": int(episodes), "format_version": FORMAT_VERSION,
                                                   "provenance": provenance()})


def expected_episodes(directory: Path) -> int | None:
    """The episodes a dataset directory's manifest says it should hold (None without one)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        n = json.loads(path.read_text()).get("episodes")
    except (OSError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{path}: cannot be read as a dataset manifest: {exc}") from None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise DatasetError(f"{path}: 'episodes' must be a count of episodes, got {n!r}")
    return n


def check_complete(paths, counts: dict[Path, int]) -> None:
    """Say so (on stderr) when a dataset directory holds fewer episodes than its manifest records: an
    interrupted collection or conversion, not the dataset it was meant to be. ``counts``: episodes by file."""
    for directory in _directories(paths):
        expected = expected_episodes(directory)
        held = sum(n for p, n in counts.items() if p.parent == directory)
        if expected is not None and held < expected:
            log.warning("%s holds %d of the %d episodes its %s records (an interrupted `wm collect` or `wm "
                        "convert`?); run the same command again to complete it", directory, held, expected, MANIFEST)


def _directories(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [Path(p) for p in paths if Path(p).is_dir()]


def _files(paths) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return [s for p in paths for s in find_shards(p)]
