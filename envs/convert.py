"""``wm convert``: any dataset we read, rewritten as one stable-worldmodel ``.h5`` file or as our shards.

The last link of the data layer's one-way chain: storage (our shard format) <- swm (their single-file
format) <- dataset (``EpisodeStore``: either layout) <- convert.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import check_paths_named, option, typed_options
from common.files import (naming_write_errors, output_dir, output_lock, prepare_output_file,
                          remove_stale_temporaries, temporary_path)
from common.process import raise_if_stopped
from envs.dataset import EpisodeStore
from envs.storage import (DEFAULT_DATA, STATE_KEYS, DatasetError, check_image_size, check_not_the_source,
                          write_manifest, write_shard)
from envs.swm import write_swm

log = logging.getLogger(__name__)


def write_shards(store: EpisodeStore, out_dir: str | Path, episodes_per_shard: int = 20) -> list[Path]:
    """Write a dataset as a directory of our shards (episode i of the store becomes ``ep_{i:06d}``), with
    its manifest. Built in a temporary directory beside it and renamed into place at the end: an
    interrupted or failed conversion leaves no directory that looks complete (its leftovers are removed
    by the next run)."""
    out = check_new_directory(out_dir)
    lacking = [k for k in ("qpos", "qvel") if k in store.missing_states]
    if lacking:
        raise DatasetError(f"{store.paths}: cannot be written as shards: it has no {lacking} (our shards need qpos "
                           f"and qvel)")
    skip = {"layout", "frame_shape", "versions", "format_version", "channels_first", "assumed"}
    attrs = {k: v for k, v in store.copy_attrs().items() if k not in skip}
    tmp, names = temporary_path(out), []
    try:
        with naming_write_errors(out):
            tmp.mkdir(parents=True)
            for first in range(0, len(store), episodes_per_shard):
                raise_if_stopped()  # a stop h5py swallowed (in a weakref callback): not a finished copy
                ids = range(first, min(first + episodes_per_shard, len(store)))
                episodes = {i: _known(store.episode(i)) for i in ids}
                names.append(write_shard(tmp / f"shard_{ids[0]:06d}_{ids[-1]:06d}.h5", episodes, attrs).name)
            write_manifest(tmp, len(store))
            os.replace(tmp, out)  # onto a missing or empty directory
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [out / name for name in names]


def _known(episode: dict) -> dict:
    """An episode's frames, actions and the states it has (a state an episode lacks reads as NaN: left out,
    per episode, so a dataset whose shards differ keeps every state it holds)."""
    return {k: v for k, v in episode.items()
            if k in ("pixels", "action") or (k in STATE_KEYS and np.isfinite(v).all())}


def check_new_directory(out: str | Path) -> Path:
    """Shards go to a new or empty directory: one holding anything is refused before any work."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = ("is a file" if not out.is_dir() else
                "already holds .h5 files" if any(out.glob("*.h5")) else "is not empty")
        raise DatasetError(f"{out}: {what}; write the shards to a new or empty directory")
    return out


def convert_dataset(src, dst: str | Path, fmt: str = "swm", image_size: int | None = None, env: str | None = None,
                    compression: str | None = "blosc", overwrite: bool = False) -> Path:
    """Any dataset we read -> ``fmt`` ``swm`` (one .h5 file) or ``shards`` (a directory). The destination
    is locked while it is written (``<dst>.lock``); what killed conversions left beside it is removed. An
    existing .h5 destination is replaced only with ``overwrite``; the source never."""
    if fmt not in ("swm", "shards"):
        raise ValueError(f"format must be 'swm' or 'shards', got {fmt!r}")
    dst = Path(dst)
    check_not_the_source(Path(src), dst, "converts")
    if fmt == "swm":
        if dst.suffix != ".h5":  # stable-worldmodel finds a dataset as <name>.h5
            raise ValueError(f"--out {dst}: a stable-worldmodel file is named <name>.h5; give a path ending in .h5")
        if dst.exists() and not overwrite:
            raise ValueError(f"--out {dst} already exists; pass --overwrite to replace it, or choose another --out")
    # directories made for --out go again if the conversion fails (a missing source, say)
    with output_dir(dst.parent), output_lock(dst, inside=False):
        if fmt == "swm":
            prepare_output_file(dst)
        remove_stale_temporaries(dst.parent, re.escape(dst.name))
        if fmt == "shards":
            check_new_directory(dst)
        store = EpisodeStore(src, in_memory=False, image_size=image_size, env=env)
        try:
            if note := store.enlarged():
                log.warning(note)
            if fmt == "swm":
                return write_swm(store, dst, compression)
            write_shards(store, dst)
            return dst
        finally:
            store.close()


@dataclass
class ConvertConfig:
    """wm convert: rewrite a dataset as one stable-worldmodel .h5 file or as a directory of our shards."""

    data: str = option(DEFAULT_DATA, "source: a directory of shards or one .h5 file", path=True)
    out: str = option(DEFAULT_DATA + ".h5", "destination: an .h5 file (swm) or a directory (shards)", path=True)
    format: str = option("swm", "swm (one file, stable-worldmodel layout) or shards", choices=("swm", "shards"))
    image_size: int | None = option(None, "area-resize frames to this size (default: keep; a larger size is an "
                                            "upsample, said: it adds no detail)")
    env: str | None = option(None, "the source's env when a stable-worldmodel file does not say (default: "
                                   "reacher-easy); a source that records another is refused")
    compression: str = option("blosc", "swm pixels: blosc (as their recorder), gzip or none",
                              choices=("blosc", "gzip", "none"))
    overwrite: bool = option(False, "replace an existing .h5 --out (a shards --out must be new)")

    def __post_init__(self):
        check_paths_named(self, ("data", "out"))
        if self.image_size is not None:  # before the data is opened and --out made
            check_image_size(self.image_size, "--image-size (image_size)")
        typed = typed_options(self, ("compression", "overwrite")) if self.format == "shards" else []
        if typed:
            raise ValueError(f"{' and '.join(typed)}: the swm format's only; shards are written gzip-compressed, into "
                             f"a new directory")


def convert(cfg: ConvertConfig) -> Path:
    """Run ``wm convert``; returns the destination."""
    compression = None if cfg.compression == "none" else cfg.compression
    return convert_dataset(cfg.data, cfg.out, cfg.format, cfg.image_size, cfg.env, compression, cfg.overwrite)
