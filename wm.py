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
from planners.demo import DemoConfig
from planners.evaluate import EvalConfig
from worldmodel.train import TrainConfig, preset_config


def add_config_arguments(parser: argparse.ArgumentParser, cls, only_given: bool = False) -> None:
    """One ``--option`` per dataclass field, typed, with the field's default and help.

    With ``only_given``, options the user did not type stay out of the parsed namespace (so a
    preset can fill them)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        shown = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = argparse.SUPPRESS if only_given else shown
        help_text = f.metadata.get("help", "") + f" (default: {shown})"
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
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    if cls is TrainConfig:  # the preset first, then what was typed
        return preset_config(given.pop("preset", "demo"), **given)
    return cls(**given)


@dataclass
class VideoConfig:
    """``wm video``: watch episodes of a dataset."""

    data: str = field(default="runs/data/demo", metadata={"help": "dataset directory (or .h5 file)"})
    out: str = field(default="runs/data/demo/episodes.mp4", metadata={"help": "output mp4"})
    episodes: int = field(default=4, metadata={"help": "episodes to show, one after another"})
    fps: int = field(default=25, metadata={"help": "frames per second"})


@dataclass
class BenchConfig:
    """``wm bench``: measured speeds, each beside a baseline timed in the same run."""

    what: str = field(default="all", metadata={"help": "which benchmark: collect, train, plan or all"})
    device: str = field(default="auto", metadata={"help": "train and plan benchmark device: auto, cpu or cuda"})
    out: str = field(default="runs/bench", metadata={"help": "directory for the Markdown report"})


@dataclass
class PipelineConfig:
    """``wm demo-pipeline`` (what `make demo` runs): collect, train, evaluate, film; resumes where it stopped."""

    out: str = field(default="runs/demo", metadata={"help": "output directory"})
    episodes: int = field(default=400, metadata={"help": "episodes to collect"})
    workers: int = field(default=2, metadata={"help": "collection worker processes"})
    steps: int = field(default=2000, metadata={"help": "training steps of the demo preset"})
    eval_episodes: int = field(default=50, metadata={"help": "evaluation episodes per seed"})
    seeds: int = field(default=3, metadata={"help": "evaluation seeds"})


@dataclass
class ProbeConfig:
    """``wm probe``: linear-probe R^2 from latents to the true state, on held-out episodes."""

    checkpoint: str = field(default="runs/demo/model.pt", metadata={"help": "model.pt of a trained run"})
    data: str = field(default="runs/demo/data", metadata={"help": "dataset directory (or .h5 file)"})
    val_fraction: float = field(default=0.1, metadata={"help": "fraction of episodes held out (as in training)"})
    seed: int = field(default=0, metadata={"help": "split seed (as in training)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def run_train(cfg: TrainConfig) -> int:
    from worldmodel.train import train

    metrics = train(cfg)
    print(json.dumps({k: metrics[k] for k in ("loss/prediction", "embedding/std", "val", "probe") if k in metrics},
                     indent=1))
    print(f"model: {Path(cfg.out) / 'model.pt'}  logs: tensorboard --logdir {Path(cfg.out) / 'tb'}")
    return 0


def run_probe(cfg: ProbeConfig) -> int:
    import torch

    from envs.dataset import EpisodeStore
    from worldmodel.model import WorldModel, resolve_device
    from worldmodel.probe import PROBE_TARGETS, run_probe as probe

    device = resolve_device(cfg.device)
    trained = WorldModel.load(cfg.checkpoint, device)
    torch.manual_seed(0)
    untrained = type(trained)(trained.cfg).to(device)  # same architecture, random weights: the floor
    store = EpisodeStore(cfg.data)
    train_ids, test_ids = store.split("train", cfg.val_fraction, cfg.seed), store.split("val", cfg.val_fraction, cfg.seed)
    rows = {"trained": probe(trained, store, train_ids, test_ids, device=device),
            "untrained (floor)": probe(untrained, store, train_ids, test_ids, device=device)}
    names = [*PROBE_TARGETS, "joints_mean"]
    print("| encoder | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, r2 in rows.items():
        print(f"| {label} | " + " | ".join(f"{r2[n]:.3f}" for n in names) + " |")
    return 0


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


def run_bench(cfg: BenchConfig) -> int:
    from envs import bench as envs_bench
    from planners import bench as plan_bench

    from worldmodel import bench as train_bench

    benches = {"collect": envs_bench.run, "train": lambda: train_bench.run(cfg.device),
               "plan": lambda: plan_bench.run(cfg.device)}
    if cfg.what not in (*benches, "all"):
        raise ValueError(f"--what must be one of {[*benches, 'all']}, got {cfg.what!r}")
    chosen = benches if cfg.what == "all" else {cfg.what: benches[cfg.what]}
    report = "\n\n".join(f"# wm bench {name}\n\n{_machine()}\n\n{fn()}" for name, fn in chosen.items())
    print(report)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_{cfg.what}.md").write_text(report + "\n")
    return 0


def _machine() -> str:
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"Machine: {os.cpu_count()} CPU cores ({cpu}), {gpu}; torch {torch.__version__}."


def run_eval(cfg: EvalConfig) -> int:
    from planners.evaluate import evaluate

    evaluate(cfg)
    print((Path(cfg.out) / "results.md").read_text())
    print(f"wrote {cfg.out}/results.json, results.md, results.png")
    return 0


def run_demo(cfg: DemoConfig) -> int:
    from planners.demo import make_demo

    result = make_demo(cfg)
    print(f"wrote {len(result['videos'])} videos and {result['summary_sheet']}; reached: {result['success']}")
    return 0


def run_pipeline(cfg: PipelineConfig) -> int:
    """Every stage skips what is already done, so an interrupted `make demo` resumes."""
    import time

    out, data, start = Path(cfg.out), str(Path(cfg.out) / "data"), time.perf_counter()
    stamp = lambda what: print(f"\n=== [{(time.perf_counter() - start) / 60:.1f} min] {what}", flush=True)  # noqa: E731
    stamp("collect")
    run_collect(CollectConfig(out=data, episodes=cfg.episodes, workers=cfg.workers))
    stamp("train (demo preset)")
    model = out / "model.pt"
    state = out / "checkpoint.pt"
    if not _finished(out, cfg.steps):
        run_train(preset_config("demo", data=data, out=str(out), steps=cfg.steps, resume=state.exists()))
    stamp("evaluate reach25 against random actions and the true-simulator CEM")
    run_eval(EvalConfig(checkpoint=str(model), data=data, episodes=cfg.eval_episodes, seeds=cfg.seeds,
                        sim_samples=100, sim_iterations=10, out=str(out / "eval")))
    stamp("planning videos")
    run_demo(DemoConfig(checkpoint=str(model), data=data, out=str(out / "videos")))
    stamp("done")
    print(f"model {model}; results {out / 'eval' / 'results.md'}; plot {out / 'eval' / 'results.png'}; "
          f"videos {out / 'videos'}; TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def _finished(out: Path, steps: int) -> bool:
    meta = out / "model.json"
    return meta.exists() and json.loads(meta.read_text()).get("step") == steps


COMMANDS = {
    "collect": (CollectConfig, run_collect, "collect pixel rollouts into HDF5 shards"),
    "video": (VideoConfig, run_video, "write an mp4 of dataset episodes"),
    "train": (TrainConfig, run_train, "train the world model (presets: demo, full)"),
    "probe": (ProbeConfig, run_probe, "linear-probe R^2 of a trained encoder vs an untrained one"),
    "eval": (EvalConfig, run_eval, "closed-loop success in MuJoCo against random and true-simulator baselines"),
    "demo": (DemoConfig, run_demo, "planning videos (mp4 + gif) and a summary sheet"),
    "bench": (BenchConfig, run_bench, "measure collection, loading (and later training, planning) speed"),
    "demo-pipeline": (PipelineConfig, run_pipeline, "the embedded default that `make demo` runs"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        add_config_arguments(sub.add_parser(name, help=help_text, description=(cls.__doc__ or "").strip()), cls,
                             only_given=cls is TrainConfig)
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
