"""``wm``: the command line over envs, worldmodel and planners. Nothing imports this module.

Each subcommand has one config dataclass; its fields are the command's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import envs  # noqa: F401  (selects the GL backend before anything imports mujoco)
from envs.collect import CollectConfig, collect


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--option`` per dataclass field, typed, with the field's default and help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + " (default: %(default)s)"
        if kind is bool:
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(name, dest=f.name, type=_scalar_type(kind), default=default, help=help_text)


def _scalar_type(kind):
    """``int`` for ``int``, and for ``int | None``: the type an option's string is parsed into."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass
class VideoConfig:
    """``wm video``: watch episodes of a dataset."""

    data: str = field(default="runs/data/demo", metadata={"help": "dataset directory (or .h5 file)"})
    out: str = field(default="runs/data/demo/episodes.mp4", metadata={"help": "output mp4"})
    episodes: int = field(default=4, metadata={"help": "episodes to show, one after another"})
    fps: int = field(default=25, metadata={"help": "frames per second"})


def run_collect(cfg: CollectConfig) -> int:
    summary = collect(cfg)
    print(json.dumps(summary, indent=1))
    return 0


def run_video(cfg: VideoConfig) -> int:
    import numpy as np

    from envs.dataset import EpisodeStore
    from envs.video import write_video

    store = EpisodeStore(cfg.data, in_memory=False)
    frames = np.concatenate([store.episode(i)["pixels"] for i in range(min(cfg.episodes, len(store)))])
    for path in write_video(cfg.out, frames, fps=cfg.fps):
        print(f"wrote {path}")
    return 0


COMMANDS = {
    "collect": (CollectConfig, run_collect, "collect pixel rollouts into HDF5 shards"),
    "video": (VideoConfig, run_video, "write an mp4 of dataset episodes"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        add_config_arguments(sub.add_parser(name, help=help_text, description=(cls.__doc__ or "").strip()), cls)
    args = parser.parse_args(argv)
    cls, run, _ = COMMANDS[args.command]
    try:
        return run(config_from_args(cls, args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"wm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
