"""stable-worldmodel's single-file HDF5 datasets: read (mapped onto our episodes) and written.

Their layout (stable-worldmodel: ``stable_worldmodel/data/formats/hdf5.py``, ``HDF5Writer`` and
``HDF5Dataset``; ``stable_worldmodel/world.py``, ``World.record_dataset``): ONE ``.h5`` file, one HDF5
dataset per column with the rows of all episodes concatenated, and two index datasets:

    pixels     (N, H, W, 3) uint8     frames (224 x 224 in the published Reacher data)
    action     (N, A)       float     float64 for dm_control envs (their action_spec dtype)
    qpos, qvel (N, nq)      float64   physics.data.qpos / qvel (Reacher: shoulder, wrist)
    finger_pos, target_pos (N, 2)     in newer versions of their Reacher wrapper only
    ...        any other info key: reward, terminated, truncated, step_idx, id, ep_idx, variation.*, ...
    ep_len     (E,)         int32     rows of episode e
    ep_offset  (E,)         int64     its first row: episode e is rows ep_offset[e] : ep_offset[e] + ep_len[e]

Action convention (``World._handle_done_ep`` / ``World.collect``: "left-shift actions to align with
observations i.e. (o_t, a_t)"): the reset's info carries a NaN action; when an episode ends its first
action is moved to the end. So row t holds the frame *before* action t, and the last row's action is
NaN: nothing follows the last frame. On our side an episode of T actions has T+1 frames and
``action[t]`` leads from frame t to frame t+1, so an episode of L rows becomes L frames and the actions
of rows 0 .. L-2; the last row's action is ignored whatever it holds, and we write NaN there.

Their reader imports ``hdf5plugin`` (pixels of ``record_dataset`` files are Blosc/LZ4 compressed,
filter id 32001); we do too when it is installed, and name a missing filter otherwise.

What the file does not say gets a documented default (``SWM_DEFAULTS``): env ``reacher-easy``
(or ``env=``, which fills it only where the file records none of ours: a recorded env wins, and asking
for another is an error), size from the pixels, the target hidden and dm_control's standard look (their
wrapper renders with ``physics.render``), and ``action_repeat`` 2: their dm_control wrapper applies each
action for two control steps (``DMControlWrapper.action_repeat = 2``), ours for one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from common.files import LatchedErrorFile, atomic_write, naming_write_errors
from common.process import raise_if_stopped
from envs.reacher import ENV_NAMES
from envs.storage import (INDEX_KEYS, RECORDING_DEFAULTS, STATE_KEYS, DatasetError, EpisodeRef, ShardInfo, _plain,
                          check_arrays, check_attrs, check_env, check_filters, complete_states, episode_key,
                          episode_uid, is_swm_handle, open_h5, package_versions)

# Our name -> the column names that may hold it, first match wins.
COLUMNS = {"pixels": ("pixels",), "action": ("action",), "qpos": ("qpos",), "qvel": ("qvel",),
           "finger": ("finger_pos", "finger"), "target": ("target_pos", "target")}
SWM_DEFAULTS = {"env": "reacher-easy", "hide_target": True, "render_quality": "standard", "action_repeat": 2}
LAYOUT = "stable-worldmodel"
COMPRESSIONS = ("blosc", "gzip", None)
log = logging.getLogger(__name__)


def is_swm_file(path: str | Path) -> bool:
    """True for an HDF5 file with ``ep_len``/``ep_offset`` datasets at its root (their layout)."""
    try:
        with h5py.File(path, "r") as f:
            return is_swm_handle(f)
    except OSError:
        return False  # not HDF5: inspect_shard says so


def content_digest(f: h5py.File) -> str:
    """A hash of the episode table and the actions: what tells two same-shaped files apart."""
    digest = hashlib.sha256()
    for key in (*INDEX_KEYS, "action"):
        if isinstance(f.get(key), h5py.Dataset):
            try:
                digest.update(np.ascontiguousarray(f[key][()]).tobytes())
            except OSError as exc:
                raise DatasetError(f"{f.filename}: column {key!r} cannot be read: {exc}") from exc
    return digest.hexdigest()


# --- reading -------------------------------------------------------------------------------------
def inspect_swm(path: str | Path, env: str | None = None) -> ShardInfo:
    """Open one stable-worldmodel file, check it and return its episodes in our convention."""
    path = Path(path)
    with open_h5(path) as f:
        lengths, offsets = _episode_table(f, path)
        names = _columns(f, path)
        check_filters(path, {k: f[v] for k, v in names.items()})
        _check_rows(f, path, names, lengths, offsets)
        pixels = f[names["pixels"]]
        channels_first = pixels.ndim == 4 and pixels.shape[1] == 3 and pixels.shape[3] != 3  # (N, 3, H, W)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or 3 not in (pixels.shape[3], pixels.shape[1]):
            raise DatasetError(f"{path}: pixels must be uint8 (N, H, W, 3) or (N, 3, H, W), got {pixels.dtype} "
                               f"{pixels.shape}")
        file_attrs = {k: _plain(v) for k, v in f.attrs.items()}
        attrs = _attrs(file_attrs, pixels.shape[2:4] if channels_first else pixels.shape[1:3], env, path)
        attrs["channels_first"] = channels_first
        try:
            columns = {k: f[v][()] for k, v in names.items() if k != "pixels"}  # (N, ...) each, small
            pixels[int((offsets + lengths).max()) - 1]  # the last frame: a truncated file fails here
        except OSError as exc:
            raise DatasetError(f"{path}: cannot be read (truncated or corrupt?): {exc}") from exc
    columns = _trim_columns(columns, path)
    episodes, arrays = [], []
    for e, (start, rows) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        key = episode_key(e)
        try:
            episode = _episode_arrays(columns, start, rows)
        except DatasetError as exc:
            raise DatasetError(f"{path}: episode {e} (rows {start}..{start + rows - 1}): {exc}") from None
        episodes.append(EpisodeRef(path, key, rows - 1, episode_uid(attrs["env"], episode["action"],
                                                                    episode.get("qpos")), row=start))
        arrays.append(episode)
    missing = tuple(k for k in STATE_KEYS if k not in columns and not (k == "finger" and "qpos" in columns))
    _complete(arrays, attrs["env"], path)
    return ShardInfo(path, attrs, episodes, arrays, missing, layout=LAYOUT)


def _episode_table(f: h5py.File, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(E,) lengths and offsets, checked for shape, type and sign."""
    for key in INDEX_KEYS:
        if not isinstance(f.get(key), h5py.Dataset):
            other = [k for k in INDEX_KEYS if k != key][0]
            raise DatasetError(f"{path}: has {other!r} but no {key!r} dataset: the stable-worldmodel layout needs "
                               f"both to locate episodes")
    lengths, offsets = f["ep_len"][()], f["ep_offset"][()]
    if lengths.ndim != 1 or lengths.shape != offsets.shape:
        raise DatasetError(f"{path}: ep_len {lengths.shape} and ep_offset {offsets.shape} must be 1-D and of equal "
                           f"length (one entry per episode)")
    if lengths.dtype.kind not in "iu" or offsets.dtype.kind not in "iu":
        raise DatasetError(f"{path}: ep_len and ep_offset must be integers, got {lengths.dtype} and {offsets.dtype}")
    if len(lengths) == 0:
        raise DatasetError(f"{path}: holds no episodes (ep_len is empty)")
    lengths, offsets = lengths.astype(np.int64), offsets.astype(np.int64)
    short = np.flatnonzero(lengths < 2)
    if len(short):
        e = int(short[0])
        raise DatasetError(f"{path}: episode {e} has ep_len {lengths[e]}: an episode needs at least 2 rows "
                           f"(a frame, an action, the next frame)")
    negative = np.flatnonzero(offsets < 0)
    if len(negative):
        raise DatasetError(f"{path}: episode {int(negative[0])} has a negative ep_offset {offsets[negative[0]]}")
    return lengths, offsets


def _columns(f: h5py.File, path: Path) -> dict[str, str]:
    """Our key -> the file's column name, for the columns we use; the rest are ignored."""
    names = {}
    for ours, theirs in COLUMNS.items():
        groups = [n for n in theirs if isinstance(f.get(n), h5py.Group)]
        if groups:
            raise DatasetError(f"{path}: column {groups[0]!r} must be an array (an HDF5 dataset), got a group")
        found = [n for n in theirs if isinstance(f.get(n), h5py.Dataset)]
        if found:
            names[ours] = found[0]
        elif ours in ("pixels", "action"):
            raise DatasetError(f"{path}: has no {ours!r} column (columns: {sorted(f.keys())}); a stable-worldmodel "
                               f"dataset needs 'pixels' (N, H, W, 3) uint8 and 'action' (N, 2)")
    return names


def _check_rows(f: h5py.File, path: Path, names: dict, lengths: np.ndarray, offsets: np.ndarray) -> None:
    """Every episode within every column we use, and no two episodes sharing rows. Compared without
    computing offset + length first: a crafted offset near the integer limit would wrap around."""
    for ours, name in names.items():
        rows = f[name].shape[0] if f[name].ndim else 0
        past = np.flatnonzero((offsets > rows) | (lengths > rows - offsets))
        if len(past):
            e = int(past[0])
            start, end = int(offsets[e]), int(offsets[e]) + int(lengths[e])  # Python integers: no wrap-around
            raise DatasetError(f"{path}: ep_len/ep_offset disagree with the column lengths: episode {e} is rows "
                               f"{start}..{end - 1} but {name!r} has {rows} rows")
    ends = offsets + lengths
    order = np.argsort(offsets, kind="stable")
    overlap = np.flatnonzero(offsets[order][1:] < ends[order][:-1])
    if len(overlap):
        a, b = int(order[overlap[0]]), int(order[overlap[0] + 1])
        raise DatasetError(f"{path}: episodes {a} (rows {offsets[a]}..{ends[a] - 1}) and {b} (rows {offsets[b]}.."
                           f"{ends[b] - 1}) overlap: ep_offset/ep_len are inconsistent")


def _trim_columns(columns: dict, path: Path) -> dict:
    """(N, 2) views of the columns we use: Reacher's arm is the first two joints of qpos/qvel."""
    out = {}
    for key, value in columns.items():
        if value.ndim != 2 or value.shape[1] < 2 or (key == "action" and value.shape[1] != 2):
            want = "(N, 2) Reacher actions" if key == "action" else "(N, >=2)"
            raise DatasetError(f"{path}: column {key!r} must be {want}, got {value.shape}")
        out[key] = value[:, :2]
    return out


def _episode_arrays(columns: dict, start: int, rows: int) -> dict:
    """One episode in our convention: T = rows - 1 actions, T + 1 states; the last row's action dropped."""
    episode = {k: v[start:start + rows] for k, v in columns.items() if k != "action"}
    episode["action"] = columns["action"][start:start + rows - 1]
    return check_arrays(episode)


def _complete(arrays: list[dict], env: str, path: Path) -> None:
    """States the file lacks: qpos/qvel NaN when absent (no evaluation then), finger derived or NaN."""
    for a in arrays:
        for key in ("qpos", "qvel"):
            if key not in a:
                a[key] = np.full((len(a["action"]) + 1, 2), np.nan)
        if "finger" not in a and not np.isfinite(a["qpos"]).all():
            a["finger"] = np.full_like(a["qpos"], np.nan)
    complete_states(arrays, env, path)


def _attrs(file_attrs: dict, frame_shape, env: str | None, path: Path) -> dict:
    """Our attributes: the file's own, the defaults for what it lacks. An env the file records wins: ``env``
    fills it only where the file says nothing we know (no env, or another tool's name), and asking for
    another is an error, as for shards."""
    attrs = {**SWM_DEFAULTS, **file_attrs}
    recorded = isinstance(file_attrs.get("env"), str) and file_attrs["env"] in ENV_NAMES
    said = {k for k in file_attrs if k != "env" or recorded}  # another tool's env name says nothing we can use
    attrs["assumed"] = sorted(k for k in SWM_DEFAULTS if k not in said and not (k == "env" and env))
    if "env" in file_attrs and not recorded:  # e.g. a gym id: kept for reference, not used
        attrs["source_env"], attrs["env"] = attrs["env"], SWM_DEFAULTS["env"]
    if env is not None:
        if env not in ENV_NAMES:
            raise DatasetError(f"{path}: env must be one of {sorted(ENV_NAMES)}, got {env!r}")
        if recorded:
            check_env(attrs, env, path)
        attrs["env"] = env
    height, width = (int(x) for x in frame_shape)
    attrs.update(size=height if height == width else None, frame_shape=[height, width], layout=LAYOUT)
    check_attrs(attrs, path)
    return attrs


def read_rows(ds: h5py.Dataset, first: int, index: np.ndarray) -> np.ndarray:
    """Rows ``first + index`` (increasing) of ``ds`` by contiguous slices: h5py's point selection
    (``ds[list]``) costs 3 ms per window of 64 px frames and 37 ms with 100-frame Blosc chunks, a slice
    covering the same rows 0.02 and 1 ms. Frames stored one per chunk (our shards), or a sparse
    selection, are read frame by frame: a slice would decompress every frame between them (a window of 4
    frames every 5 steps: 16 chunks for 4, 2.9x the time)."""
    if len(index) == 0:
        return ds[first:first]
    lo, hi = int(index[0]), int(index[-1]) + 1
    one_per_chunk = ds.chunks is not None and ds.chunks[0] == 1
    if not one_per_chunk and hi - lo <= max(64, 8 * len(index)):
        return ds[first + lo:first + hi][index - lo]
    return np.concatenate([ds[first + k:first + k + 1] for k in index.tolist()])


# --- writing -------------------------------------------------------------------------------------
def write_swm(store, out_path: str | Path, compression: str | None = "blosc") -> Path:
    """Write a dataset (an ``envs.dataset.EpisodeStore``) as ONE stable-worldmodel ``.h5``.

    Columns ``pixels, action, qpos, qvel, finger_pos, target_pos, step_idx, ep_idx`` plus ``ep_len``
    (int32) and ``ep_offset`` (int64), rows of all episodes concatenated; ``action`` holds NaN on each
    episode's last row (their convention). Pixels are Blosc/LZ4 compressed as their recorder does
    (``compression="gzip"`` or None for readers without hdf5plugin). Episode by episode, so memory stays
    bounded; atomically (a temporary ``<name>.<pid>.tmp`` beside it, then a rename)."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with naming_write_errors(out):
        atomic_write(out, lambda tmp: _write_file(tmp, store, compression))
    return out


def _write_file(path: Path, store, compression: str | None) -> None:
    """HDF5 writes through a file that keeps its first write error and drops the rest: a full disk or a
    file-size limit stops the writing at the next episode and is raised once HDF5 has closed the file
    (writing to a failing file directly, HDF5 floods errors and crashes the interpreter at exit)."""
    with open(path, "w+b", buffering=0) as fh:
        sink = LatchedErrorFile(fh)
        with h5py.File(sink, "w", libver="latest") as f:  # 'latest': their reader opens with swmr=True
            _write_columns(f, store, compression, sink.raise_error)
        sink.raise_error()
        os.fsync(fh.fileno())


def _write_columns(f: h5py.File, store, compression: str | None, check=lambda: None) -> None:
    lengths = np.array([ref.steps + 1 for ref in store.episodes], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]).astype(np.int64)
    n, s = int(lengths.sum()), store.size
    f.attrs.update(_file_attrs(store))
    cols = {"pixels": _column(f, "pixels", (n, s, s, 3), np.uint8, 1, compression),
            "action": _column(f, "action", (n, 2), np.float32)}
    names = {"qpos": "qpos", "qvel": "qvel", "finger": "finger_pos", "target": "target_pos"}
    states = [k for k in names if k not in store.missing_states]
    for k in sorted(set(names) - set(states)):  # one column for every row: a state only some episodes hold
        held = sum(bool(np.isfinite(store.states(e)[k]).all()) for e in range(len(store)))
        if held:
            log.warning(f"{names[k]} left out: {held} of {len(store)} episodes hold it, and a stable-worldmodel "
                        f"column holds every row")
    cols.update({k: _column(f, names[k], (n, 2), np.float64) for k in states})
    step_idx, ep_idx = _column(f, "step_idx", (n,), np.int64), _column(f, "ep_idx", (n,), np.int32)
    for e, (start, rows) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        check()  # a failed write stops the work here
        raise_if_stopped()  # and so does a stop h5py swallowed (in a weakref callback)
        episode = store.episode(e)
        end = start + rows
        cols["pixels"][start:end] = episode["pixels"]
        action = np.full((rows, 2), np.nan, np.float32)  # (rows, 2): the last row has no action
        action[:-1] = episode["action"]
        cols["action"][start:end] = action
        for k in states:
            cols[k][start:end] = episode[k]
        step_idx[start:end] = np.arange(rows)
        ep_idx[start:end] = e
    f.create_dataset("ep_len", data=lengths, maxshape=(None,), chunks=True)
    f.create_dataset("ep_offset", data=offsets, maxshape=(None,), chunks=True)


def _column(f: h5py.File, name: str, shape: tuple, dtype, chunk_rows: int = 4096, compression: str | None = None):
    """A resizable column (their writer appends to these), chunked by rows."""
    chunks = (max(1, min(chunk_rows, shape[0])), *shape[1:])
    return f.create_dataset(name, shape, dtype, chunks=chunks, maxshape=(None, *shape[1:]),
                            **_compression(compression))


def _compression(name: str | None) -> dict:
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 3}
    if name == "blosc":
        try:
            import hdf5plugin
        except ImportError as exc:
            raise DatasetError("writing Blosc-compressed pixels needs `pip install hdf5plugin` "
                               "(or compression='gzip' / None)") from exc
        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    return {}


def _file_attrs(store) -> dict:
    """Our attributes travel in the file, so reading it back needs no defaults; None values are dropped."""
    skip = {"layout", "frame_shape", "versions", "channels_first", "assumed"}
    attrs = {k: v for k, v in store.copy_attrs().items() if k not in skip}
    for key, value in RECORDING_DEFAULTS.items():  # what our shards assume when they do not say (one control
        attrs.setdefault(key, value)               # step per action, the fast look), said in the file
    return {**attrs, "versions": package_versions()}
