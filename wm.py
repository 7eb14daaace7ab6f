"""``wm``: the command line over envs, worldmodel and planners. Nothing imports this module.

Each subcommand has one config dataclass; every field of it (nested configs included) is an option,
built here from the field's type, default, help and choices. ``wm train --preset full --help`` shows
the full preset's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import envs  # noqa: F401  (selects the GL backend before anything imports mujoco)
from common.config import (apply_overrides, as_options, check_at_least, check_choices, check_paths_named,
                           check_some_path_exists, config_fields, from_dict, model_paths, nested, option, option_flag,
                           path_list, typed_options, unwrap_optional)
from common.device import THREADS_HELP, set_threads
from common.files import (atomic_write_text, keeping_what_was_measured, output_dir, output_lock, read_json,
                          remove_stale_temporaries, saying_what_is_kept)
from common.process import sigterm_as_interrupt
from common.provenance import provenance, provenance_line, set_command
from envs.collect import CollectConfig, collect
from envs.convert import ConvertConfig
from envs.storage import DEFAULT_DATA, check_image_size
from evaluation.compare import CompareConfig
from evaluation.demo import DemoConfig
from evaluation.evaluate import DEFAULT_CHECKPOINT, EvalConfig, parse_baselines
from planners.policy import PolicyConfig, recorded_planner, without_other_planners
from studies.identifiability import IdentifiabilityConfig
from worldmodel.datasplit import HELD_OUT
from worldmodel.graph import GraphConfig
from worldmodel.train import DEFAULT_RUN, TrainConfig, preset_config


# --- options from configs ----------------------------------------------------------------------------------
def _parser_of(kind, is_path: bool = False):
    """The function turning an option's text into its value; a path typed empty is refused."""
    inner, optional = unwrap_optional(kind)
    base = inner if inner in (int, float) else str

    def parse(text: str):
        if optional and text.lower() in ("none", "default", ""):
            return None
        if is_path and not text.strip():
            raise argparse.ArgumentTypeError("must name a path, got an empty string (leave the option out for "
                                             "its default)")
        return base(text)

    parse.__name__ = base.__name__  # argparse names the type in its errors
    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cfg) -> None:
    """One option per leaf field of ``cfg`` (an instance: its values are the defaults shown).

    Options the user does not type stay out of the parsed namespace (``SUPPRESS``), so the defaults
    (a preset's, say) stay in ``cfg`` and only what was typed is applied on top.
    """
    for f in config_fields(cfg):
        if not f.cli:
            continue
        # each default once (a help text that explains its default keeps its words); choices show in the metavar
        help_text = f.help if "default" in f.help else f"{f.help} (default: {f.value})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %: a literal percent is doubled
        if f.type is bool:
            parser.add_argument(f.flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(f.flag, dest=f.name, type=_parser_of(f.type, f.is_path), choices=f.choices,
                                default=argparse.SUPPRESS, help=help_text, metavar=_metavar(f))


def _metavar(f) -> str:
    if f.choices:
        return "{" + ",".join(map(str, f.choices)) + "}"
    return f.name.rsplit(".", 1)[-1].upper()


def config_from_args(cfg, args: argparse.Namespace):
    """``cfg`` with every option the user typed applied."""
    names = {f.name for f in config_fields(cfg)}
    return apply_overrides(cfg, {k: v for k, v in vars(args).items() if k in names})


def _typed(argv: list[str], flag: str) -> str | None:
    """The value typed for ``flag`` on a command line (``--flag V`` or ``--flag=V``), or None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _train_defaults(argv: list[str]) -> TrainConfig:
    """What ``wm train`` starts from: with ``--resume``, the settings the run was started with (so only what
    is typed now changes them); else the typed ``--preset``'s (``demo`` by default)."""
    if "--resume" in argv:
        out = Path(_typed(argv, "--out") or DEFAULT_RUN)
        settings, saved = _saved_settings(out)
        if settings is not None:
            if isinstance(settings, dict):
                settings.pop("overwrite", None)  # how that run started, not what this one does
                if isinstance(settings.get("data"), str) and not _was_typed(argv, "--data"):
                    settings["data"] = _recorded_data(out, settings["data"])  # typed in another directory, say
            return from_dict(TrainConfig, settings, str(saved))  # settings it lacks: today's defaults
    return preset_config(_typed(argv, "--preset") or "demo")


def _saved_settings(out: Path) -> tuple:
    """(settings, the file they were read from) of the run in ``out``: its train_config.json (the settings the
    run last started with, a --lr typed on resume included), or, that file missing or damaged, the settings its
    checkpoint.pt holds, said; (None, None) when neither is readable (what --resume finds is said later)."""
    from worldmodel.rundir import read_checkpoint

    saved, ckpt = out / "train_config.json", out / "checkpoint.pt"
    try:
        settings = json.loads(saved.read_text())
        if isinstance(settings, dict) or not ckpt.is_file():
            return settings, saved
        problem = f"not a JSON object but a {type(settings).__name__}"
    except FileNotFoundError:
        problem = "missing"
    except ValueError as exc:
        problem = f"not valid JSON ({exc})"
        if not ckpt.is_file():
            raise ValueError(f"{saved}: {problem}") from None
    try:
        settings = dict(read_checkpoint(ckpt)["config"])  # a copy: the read is shared with what loads it
    except (OSError, ValueError, RuntimeError):  # no or an unreadable checkpoint: said by --resume itself
        return None, None
    if _main_process():  # every rank looks it up; one says so
        logging.getLogger("wm").warning(f"{saved} is missing or damaged ({problem}): the run's settings are read "
                                        f"from its checkpoint.pt")
    return settings, ckpt


def _recorded_data(out: Path, typed: str) -> str:
    """Where the run in ``out`` finds its dataset: of the paths its checkpoint records (as typed, absolute, and
    relative to the run), the one that holds that very dataset (by fingerprint), wherever the command is run
    from; else ``typed`` (the error then names it)."""
    from worldmodel.datasplit import locate_data
    from worldmodel.rundir import read_checkpoint

    try:
        record = read_checkpoint(out / "checkpoint.pt").get("data")
        found = locate_data({"data": record}, out / "model.pt")[0] if isinstance(record, dict) else None
    except (OSError, ValueError, AttributeError, RuntimeError):  # no or an unreadable checkpoint: said later
        return typed
    return str(found) if found is not None else typed


def _was_typed(argv: list[str], flag: str) -> bool:
    """Whether ``flag`` (or a switch's ``--no-`` form) is on a command line."""
    return any(a in (flag, "--no-" + flag[2:]) or a.startswith(flag + "=") for a in argv)


def _recorded_policy(argv: list[str]) -> PolicyConfig:
    """What ``wm eval`` and ``wm demo`` plan with unless told otherwise: the planner settings the typed
    ``--checkpoint``'s model files record (a preset's validated choice; none: the default planner). Several
    models must agree on every such setting not typed. A model file not there is left for the command to
    report."""
    paths = [p for p in path_list(_typed(argv, "--checkpoint") or DEFAULT_CHECKPOINT) if Path(p).is_file()]
    if not paths:
        return PolicyConfig()
    recorded = {p: without_other_planners(recorded_planner(p), _typed(argv, "--planner")) for p in paths}
    values = {p: {f.name: f.value for f in config_fields(apply_overrides(PolicyConfig(), recorded[p]))} for p in paths}
    untyped = lambda names: [n for n in names if not _was_typed(argv, option_flag(n))]  # noqa: E731
    differing = sorted(n for n in untyped({n for p in paths for n in recorded[p]})
                       if len({repr(values[p][n]) for p in paths}) > 1)
    if differing:
        said = "; ".join(f"{p}: {as_options({n: values[p][n] for n in differing})}" for p in paths)
        raise ValueError(f"--checkpoint: the models plan with different settings ({said}); type "
                         f"{', '.join(map(option_flag, differing))} to plan them alike")
    shown = {n: values[paths[0]][n] for n in untyped(recorded[paths[0]])}
    if shown:
        logging.getLogger("wm").info(
            f"{', '.join(paths)}: planned with {as_options(shown)}, as "
            f"{'its model file records' if len(paths) == 1 else 'their model files record'} (chosen by a training "
            f"preset or by wm export; the options you type override it)")
    return apply_overrides(PolicyConfig(), recorded[paths[0]])


# --- small commands' configs ---------------------------------------------------------------------------------
@dataclass
class VideoConfig:
    """``wm video``: watch episodes of a dataset."""

    data: str = option(DEFAULT_DATA, "dataset directory (or .h5 file)", path=True)
    out: str = option("", "output mp4 (default: episodes.mp4 in the dataset directory)", path=True)
    episodes: int = option(4, "episodes to show, one after another")
    fps: int = option(25, "frames per second")
    image_size: int | None = option(None, "area-resize frames to this size (default: as stored; frames that are not "
                                          "square need it, as for wm train and wm convert)")

    def __post_init__(self):
        check_at_least(self, 1, ("episodes", "fps"))
        if self.image_size is not None:
            check_image_size(self.image_size, "--image-size (image_size)")
        if self.out and Path(self.out).suffix.lower() != ".mp4":
            raise ValueError(f"--out must name an .mp4 file, got {self.out!r}")


def refuse_unread(cfg, names, subject: str, note: str = "") -> None:
    """A ``ValueError`` naming the options among ``names`` typed to a command that does not read them (``subject``,
    ``note`` after it), rather than their being ignored; one typed at its default changes nothing and is taken."""
    unread = typed_options(cfg, names)
    if unread:
        them = "it" if len(unread) == 1 else "them"
        raise ValueError(f"{', '.join(unread)}: {subject} does not read {them}{note}; leave {them} out")


# What a benchmark does not read: typed, it is refused (only plan-quality and subgoals run a trained model)
MODEL_BENCH_OPTIONS = ("checkpoint", "protocol", "data", "episodes", "split")
NOT_READ_BY_BENCH = {"collect": ("device", *MODEL_BENCH_OPTIONS), "train": MODEL_BENCH_OPTIONS,
                     "plan": MODEL_BENCH_OPTIONS, "plan-quality": ("repeats",), "subgoals": (),
                     "gpu": ("repeats", *MODEL_BENCH_OPTIONS), "all": MODEL_BENCH_OPTIONS}


@dataclass
class BenchConfig:
    """``wm bench``: measured speeds, each beside a baseline timed in the same run."""

    what: str = option("all", "which benchmark (gpu: the one-call check of a GPU machine, about 8 minutes)",
                       choices=("collect", "train", "plan", "plan-quality", "subgoals", "gpu", "all"))
    dry_run: bool = option(False, "gpu: every part with tiny settings, on any device (a check of the command)")
    device: str = option("auto", "train and plan benchmark device: auto, cpu or cuda")
    threads: int = option(0, THREADS_HELP)
    checkpoint: str = option(DEFAULT_CHECKPOINT, "plan-quality, subgoals: the trained model whose closed-loop success "
                                                  "is measured (plan-quality: several, comma-separated, are pooled)",
                        path=True)
    protocol: str = option("", "plan-quality, subgoals: goal protocols, comma-separated, each reported apart "
                               "(default: plan-quality reach25, subgoals reach25,uniform)")
    data: str = option("", "plan-quality, subgoals: evaluation dataset (default: the one the model was trained on)",
                       path=True)
    episodes: int = option(50, "plan-quality, subgoals: episodes per setting")
    repeats: int = option(3, "collect, train, plan, subgoals: runs of each setting, taking turns, for a ratio "
                             "steadier than one run's (plan: plans per row of the grid, timed in rounds, and of the "
                             "batched planner and the one-problem-at-a-time reference)")
    split: str = option("val", "plan-quality, subgoals: the model's episodes they run on (val: settings are "
                               "chosen there)", choices=HELD_OUT)
    out: str = option("runs/bench", "directory for the Markdown report", path=True)

    def __post_init__(self):
        check_at_least(self, 1, ("episodes", "repeats"))
        refuse_unread(self, NOT_READ_BY_BENCH.get(self.what, ()), f"wm bench --what {self.what}",
                      " (it runs collect, train and plan)" if self.what == "all" else "")
        if self.dry_run and self.what != "gpu":
            raise ValueError(f"--dry-run is the GPU check's (--what gpu); --what {self.what} has none")
        if self.what == "subgoals" and len(model_paths(self.checkpoint)) != 1:
            raise ValueError(f"--checkpoint: --what subgoals measures one model, got {self.checkpoint!r}")
        if self.protocol and self.what in ("plan-quality", "subgoals"):
            from benchmarks.quality import check_planner_free
            from evaluation.protocols import parse_protocols

            check_planner_free([p.name for p in parse_protocols(self.protocol)])


@dataclass
class PipelineConfig:
    """``wm demo-pipeline`` (what `make demo` runs): collect, train, evaluate, film; resumes where it stopped."""

    out: str = option(DEFAULT_RUN, "run directory; the data goes to its data/ folder", path=True)
    episodes: int = option(450, "episodes to collect (training trains on 80%, chooses on 10%, reports on 10%)")
    workers: int = option(2, "collection worker processes")
    preset: str = option("quick", "training preset: quick (frames resized to 32 px, 3,000 steps) or demo (64 px, "
                                  "3,500 steps: holds the goal more; the whole demo takes about twice as long)",
                         choices=("quick", "demo"))
    steps: int = option(0, "training steps (0: the preset's)")
    eval_episodes: int = option(50, "evaluation episodes per seed")
    seeds: int = option(3, "evaluation seeds")
    baselines: str = option("random,exploration", "evaluation reference methods: random, exploration, simulator "
                                                  "(CEM on the true state: about 40 s more; `wm eval` runs all three), "
                                                  "simulator-pose (the same seeing the joint angles only)")
    threads: int = option(0, THREADS_HELP)

    def __post_init__(self):
        check_paths_named(self, ("out",))
        check_at_least(self, 1, ("episodes", "workers", "eval_episodes", "seeds"))
        check_at_least(self, 0, ("steps",))
        check_choices(self)
        parse_baselines(self.baselines)  # a bad name is refused before anything runs

    def training(self, **settings) -> TrainConfig:
        """The training stage's config: the preset's, with --steps when given."""
        return preset_config(self.preset, **({"steps": self.steps} if self.steps else {}), **settings)


@dataclass
class ProbeConfig:
    """wm probe: linear and nonlinear probes from the latent to the arm's state (is it a linear map?), on episodes
    the model never trained on, and how Gaussian the latents are."""

    checkpoint: str = option(DEFAULT_CHECKPOINT, "model.pt of a trained run", path=True)
    data: str = option("", "dataset (default: the one the model was trained on)", path=True)
    split: str = option("test", "the model's episodes the probe is scored on: test or val", choices=HELD_OUT)
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, THREADS_HELP)
    mlp_steps: int = option(1500, "optimiser steps of the nonlinear (MLP) probe")
    out: str = option("", "where probe.json and probe.md go (default: beside the checkpoint)", path=True)
    overwrite: bool = option(False, "replace a probe already in --out")


@dataclass
class InfoConfig:
    """wm info: what a model file is (architecture, training run and data, planner, subgoal graph, what training
    measured, what made it), read from model.json and model.pt."""

    checkpoint: str = option(DEFAULT_CHECKPOINT, "model.pt of a trained run", path=True)


@dataclass
class ExportConfig:
    """wm export: make a model file plan alone: build the subgoal graph of its training frames (from its recorded
    dataset, or --data) and save it in model.pt. Models trained by this version already hold it."""

    checkpoint: str = option(DEFAULT_CHECKPOINT, "model.pt of a trained run", path=True)
    data: str = option("", "its training dataset (default: the one it records)", path=True)
    graph: GraphConfig = nested(GraphConfig, "the graph's settings")
    device: str = option("auto", "auto, cpu or cuda")
    threads: int = option(0, THREADS_HELP)


# What a study does not read: typed, it is refused (hold and one-frame study a trained model; identifiability
# trains its own runs on data it collects)
NOT_READ_BY_STUDY = {"hold": ("identifiability.",), "one-frame": ("identifiability.",),
                     "identifiability": ("checkpoint", "data", "split", "episodes", "device")}


@dataclass
class StudyConfig:
    """wm study: measurements that answer one question, written as JSON, Markdown and a figure. hold: why the arm
    does not always hold its goal (a trained model's validation episodes); one-frame: what one frame costs LeWM's
    planner on a trained model (its first plan replayed from rest); identifiability: when the latent is a
    linear map of the arm's state (trains short runs side by side)."""

    what: str = option("hold", "which study", choices=("hold", "one-frame", "identifiability"))
    checkpoint: str = option(DEFAULT_CHECKPOINT, "hold: the trained model; one-frame: it, or a comma list of "
                                                 "several (pooled)", path=True)
    data: str = option("", "hold, one-frame: its dataset (default: the one it records)", path=True)
    split: str = option("val", "hold, one-frame: the model's episodes to study: val or test", choices=HELD_OUT)
    episodes: int = option(50, "hold, one-frame: episodes per seed")
    seeds: int = option(1, "hold, one-frame: episode seeds; identifiability: training seeds of every run")
    identifiability: IdentifiabilityConfig = nested(IdentifiabilityConfig, "the identifiability study")
    device: str = option("auto", "hold, one-frame: auto, cpu or cuda")
    threads: int = option(0, THREADS_HELP)
    out: str = option("", "output directory (default: study-hold/ or study-one-frame/ beside the (first) "
                          "checkpoint, or the identifiability study's own)", path=True)
    overwrite: bool = option(False, "replace a finished study's results in --out")

    def __post_init__(self):
        refuse_unread(self, NOT_READ_BY_STUDY.get(self.what, ()), f"the {self.what} study", f" (--what {self.what})")
        check_some_path_exists(self.checkpoint)
        if self.what == "hold" and len(path_list(self.checkpoint)) > 1:
            raise ValueError(f"--checkpoint: the hold study takes one model, got {self.checkpoint!r}")
        check_at_least(self, 1, ("episodes", "seeds"))


# --- the commands --------------------------------------------------------------------------------------------
def run_train(cfg: TrainConfig) -> int:
    from evaluation.evaluate import closed_loop_check
    from worldmodel.train import train

    metrics = train(cfg, closed_loop=closed_loop_check)
    if _main_process():
        print(json.dumps({k: metrics[k] for k in ("loss/prediction", "embedding/std", "val", "probe", "closed_loop")
                          if k in metrics}, indent=1))
        logs = shlex.quote(str(Path(cfg.out) / "tb"))
        print(f"model: {Path(cfg.out) / 'model.pt'}  logs: tensorboard --logdir {logs}")
    return 0


def run_probe(cfg: ProbeConfig) -> int:
    from worldmodel.probe import probe_checkpoint

    result = probe_checkpoint(cfg.checkpoint, cfg.data, cfg.device, cfg.out, cfg.split, cfg.overwrite, cfg.mlp_steps)
    print(result["markdown"])
    print(f"wrote {result['json']} and {result['md']}")
    return 0


def run_collect(cfg: CollectConfig) -> int:
    summary = collect(cfg)
    print(json.dumps(summary, indent=1))
    return 0


def run_convert(cfg: ConvertConfig) -> int:
    from envs.convert import convert

    print(f"wrote {convert(cfg)}")
    return 0


def run_video(cfg: VideoConfig) -> int:
    from common.files import prepare_output_file
    from envs.dataset import EpisodeStore
    from envs.video import check_ffmpeg, write_video

    out = Path(cfg.out or (Path(cfg.data) if Path(cfg.data).is_dir() else Path(cfg.data).parent) / "episodes.mp4")
    with output_dir(out.parent):  # folders made for the video go again if it fails (no data, say)
        prepare_output_file(out)  # the output and ffmpeg are checked before the data is read
        check_ffmpeg()
        store = EpisodeStore(cfg.data, in_memory=False, image_size=cfg.image_size)
        shown = min(cfg.episodes, len(store))
        if shown < cfg.episodes:
            logging.getLogger("wm").warning(f"{cfg.data} holds {len(store)} episodes; showing all of them")
        try:
            frames = (store.episode(i)["pixels"] for i in range(shown))  # one episode in memory at a time
            for path in write_video(out, frames, fps=cfg.fps):
                print(f"wrote {path} ({shown} episode{'s' if shown != 1 else ''})")
        finally:
            store.close()
    return 0


def run_bench(cfg: BenchConfig) -> int:
    from benchmarks import data as data_bench
    from benchmarks import gpu as gpu_bench
    from benchmarks import plan as plan_bench
    from benchmarks import quality as quality_bench
    from benchmarks import train as train_bench
    from benchmarks.timing import busy_machine_note
    from evaluation.protocols import parse_protocols

    failed: list[str] = []  # the GPU check's failed parts make the exit status 1

    def gpu_check() -> str:
        report, failed[:] = gpu_bench.run(cfg.device, str(Path(cfg.out) / "gpu-check"), cfg.dry_run)
        return report

    # the closed-loop benchmarks' protocols; each has its own default
    protocols = {"protocols": tuple(p.name for p in parse_protocols(cfg.protocol))} if cfg.protocol else {}
    benches = {"collect": lambda: data_bench.run(repeats=cfg.repeats),
               "train": lambda: train_bench.run(cfg.device, repeats=cfg.repeats),
               "plan": lambda: plan_bench.run(cfg.device, repeats=cfg.repeats),
               "plan-quality": lambda: quality_bench.run(cfg.checkpoint, cfg.device, episodes=cfg.episodes,
                                                         data=cfg.data, split=cfg.split, **protocols),
               "subgoals": lambda: quality_bench.subgoal_cost(cfg.checkpoint, cfg.device, episodes=cfg.episodes,
                                                              data=cfg.data, split=cfg.split, repeats=cfg.repeats,
                                                              **protocols),
               "gpu": gpu_check}
    chosen = ({k: v for k, v in benches.items() if k not in ("plan-quality", "subgoals", "gpu")} if cfg.what == "all"
              else {cfg.what: benches[cfg.what]})
    with output_dir(cfg.out) as out, output_lock(out):  # checked, and one benchmark at a time there, before any runs
        busy = busy_machine_note()  # before the first: later, the load is this command's own
        if busy:
            logging.getLogger("wm").warning(busy)
        warning = [busy] if busy else []
        sections = []
        for name, fn in chosen.items():  # each section printed and saved as it finishes: a stop keeps those done
            sections.append("\n\n".join([f"# wm bench {name}", provenance_line(provenance()), *warning, fn()]))
            print(sections[-1] + ("\n" if len(sections) < len(chosen) else ""))
            atomic_write_text(out / f"bench_{cfg.what}.md", "\n\n".join(sections) + "\n")
    return 1 if failed else 0


def run_eval(cfg: EvalConfig) -> int:
    from evaluation.evaluate import evaluate

    evaluate(cfg)
    out = cfg.out_dir
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, results.png; TensorBoard: {out}/tb")
    return 0


def run_compare(cfg: CompareConfig) -> int:
    from evaluation.compare import compare, markdown, write_comparison

    with output_dir(cfg.out) if cfg.out else nullcontext():  # a bad --out is refused before any work
        result = compare(cfg.base, cfg.new)
        print(markdown(result, cfg.alpha))
        if cfg.out:
            write_comparison(result, cfg.alpha, cfg.out)
            print(f"wrote {cfg.out}/compare.md and compare.json")
    return 0


def run_demo(cfg: DemoConfig) -> int:
    from evaluation.demo import make_demo

    result = make_demo(cfg)
    count = lambda n, what: f"{n} {what}{'s' if n != 1 else ''}"  # noqa: E731
    gifs = f" (and {count(len(result['gifs']), 'gif')})" if result["gifs"] else ""
    print(f"wrote {count(len(result['videos']), 'video')}{gifs} and {result['summary_sheet']} in {cfg.out_dir}; "
          f"reached: {result['success']}, held at the end: {result['held']}")
    return 0


def run_info(cfg: InfoConfig) -> int:
    from evaluation.card import model_card

    print(model_card(cfg.checkpoint), end="")
    return 0


def run_export(cfg: ExportConfig) -> int:
    from worldmodel.graph import graph_for_checkpoint, holds_graph
    from worldmodel.model import WorldModel

    model = WorldModel.load(cfg.checkpoint, cfg.device)
    # checks --data first, and says when it is not read (the file holds a graph of these settings)
    graph = graph_for_checkpoint(model, cfg.checkpoint, cfg.graph, cfg.data, replace=True)
    if not holds_graph(model, cfg.graph):  # built, but the file could not be written (logged above)
        raise OSError(f"{cfg.checkpoint}: the subgoal graph was built but could not be saved in the model file")
    print(f"{cfg.checkpoint} holds its subgoal graph ({len(graph.nodes)} training frames, {len(graph.src)} links): "
          f"model.pt and model.json plan alone")
    return 0


def run_study(cfg: StudyConfig) -> int:
    from studies import RESULTS, hold, one_frame, write_results
    from studies.identifiability import run as identifiability

    ident = dataclasses.replace(cfg.identifiability, seeds=cfg.seeds, out=cfg.out or cfg.identifiability.out)
    out = Path(ident.out if cfg.what == "identifiability" else
               cfg.out or Path(path_list(cfg.checkpoint)[0]).parent / f"study-{cfg.what}")
    if (out / "results.json").exists() and not cfg.overwrite:  # written last: what says the study finished
        raise ValueError(f"{out} already holds finished results (results.json: a study's or an evaluation's); "
                         f"pass --overwrite to replace them, "
                         f"or --out for another directory")
    with output_dir(out) as out, output_lock(out):  # one study at a time writes there
        remove_stale_temporaries(out, RESULTS)  # a killed study's (we hold the lock)
        if cfg.what == "identifiability":
            identifiability(ident)  # writes its own results
        else:
            units = out / "units"  # the parts measured, kept until the results are written: a rerun resumes
            remove_stale_temporaries(units, r".*\.json")
            with saying_what_is_kept(units):
                if cfg.what == "one-frame":
                    result = one_frame.run(cfg.checkpoint, cfg.split, cfg.episodes, cfg.seeds, cfg.device, cfg.data,
                                           units=units)
                    text, plot = one_frame.report(result), one_frame.plot
                else:
                    result = hold.run_all(cfg.checkpoint, cfg.episodes, cfg.seeds, cfg.device, cfg.data,
                                          split=cfg.split, units=units)
                    text, plot = hold.report(result, cfg.checkpoint, cfg.split), hold.plot
            with keeping_what_was_measured(units):
                write_results(out, result, text, plot)  # results.json last: it says the study finished
            shutil.rmtree(units, ignore_errors=True)
    print((out / "results.md").read_text())
    print(f"wrote {out}/results.json, results.md, results.png")
    return 0


def run_pipeline(cfg: PipelineConfig) -> int:
    """Every stage skips what is already done (a finished stage is kept, an interrupted one goes on or is made
    again), so an interrupted `make demo` resumes and a finished one is kept."""
    import time

    from worldmodel import rundir

    out, start = Path(cfg.out), time.perf_counter()
    data = str(out / "data")
    stamp = lambda what: print(f"\n=== [{(time.perf_counter() - start) / 60:.1f} min] {what}", flush=True)  # noqa: E731
    _check_kept(out, cfg)  # before any stage: a rerun with other settings never mixes with what is kept
    stamp("collect")
    run_collect(CollectConfig(out=data, episodes=cfg.episodes, workers=cfg.workers))
    steps = cfg.training().steps
    stamp(f"train ({cfg.preset} preset, {steps:,} steps)")
    finished = _finished(out, steps)
    # the evaluation comes next: the closed-loop check at the end of training would measure it twice
    training = cfg.training(data=data, out=str(out), eval_episodes=0, threads=cfg.threads,
                            resume=(out / "checkpoint.pt").exists() and not finished)
    if finished and rundir.status(out, training) == "done":  # training would advise an --overwrite we lack
        print(f"{out} already holds the trained model: kept")
    else:
        run_train(training)
    model = str(out / "model.pt")
    stamp(f"evaluate reach25 against: {cfg.baselines or 'no baseline'}")
    if (out / "eval" / "results.json").exists():
        print(f"{out / 'eval'} already holds results: kept")
    else:
        run_eval(EvalConfig(checkpoint=model, episodes=cfg.eval_episodes, seeds=cfg.seeds, baselines=cfg.baselines,
                            threads=cfg.threads))
    stamp("planning videos (far goals: poses uniform over the joint range)")
    films = DemoConfig(checkpoint=model, protocol="uniform", threads=cfg.threads)
    if (films.out_dir / "demo.json").exists():  # written last: a finished demo of the kept model, kept whole
        print(f"{films.out_dir} already holds the videos: kept")
    else:  # none, or a demo that did not finish: its files are removed and it is made again
        run_demo(films)
    stamp("done")
    print(f"model {model}; results {out / 'eval' / 'results.md'}; plot {out / 'eval' / 'results.png'}; "
          f"videos {out / 'videos'}; TensorBoard: tensorboard --logdir {shlex.quote(str(out))}")
    return 0


def _check_kept(out: Path, cfg: PipelineConfig) -> None:
    """Refuse a rerun whose settings differ from what ``out`` keeps, before anything runs: collection would
    add episodes to the data a kept model was trained on, and kept results would be reported as the new
    settings' (each stage kept its own without comparing)."""
    # a missing or damaged record ({}) checks nothing: the stage that reads it says so
    model, results = read_json(out / "model.json"), read_json(out / "eval" / "results.json")
    train, data = (model.get(key) or {} for key in ("train_config", "data"))
    evaluated = results.get("config") or {}
    kept = {"episodes": (data.get("episodes"), cfg.episodes, "model.json"),
            "preset": (train.get("preset"), cfg.preset, "model.json"),
            "steps": (train.get("steps"), cfg.training().steps, "model.json"),
            "eval_episodes": (evaluated.get("episodes"), cfg.eval_episodes, "eval/results.json"),
            "seeds": (evaluated.get("seeds"), cfg.seeds, "eval/results.json"),
            "baselines": (evaluated.get("baselines"), cfg.baselines, "eval/results.json")}
    differ = [f"--{name.replace('_', '-')} {was!r} ({where}), not {now!r}"
              for name, (was, now, where) in kept.items() if was is not None and was != now]
    if differ:
        raise ValueError(f"{out} holds a demo run made with other settings: {'; '.join(differ)}; rerun with "
                         f"those to resume or keep it, or pass another --out (nothing was changed)")


def _finished(out: Path, steps: int) -> bool:
    """Whether the run in ``out`` reached ``steps``. A damaged model.json is written again by training from
    the run's checkpoint; without one it is an error naming it (every later stage would need it), and
    nothing in the run is touched."""
    meta = out / "model.json"
    if not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("step") == steps
    except (ValueError, AttributeError) as e:
        if (out / "checkpoint.pt").is_file():
            return False
        raise ValueError(f"{meta}: not a readable model description ({e}); the run in {out} is kept as it is: "
                         f"move it away, or pass another --out, to start again") from e


COMMANDS = {
    "collect": (CollectConfig, run_collect, "collect pixel rollouts into HDF5 shards"),
    "convert": (ConvertConfig, run_convert, "rewrite a dataset as one stable-worldmodel .h5 file, or as our shards"),
    "video": (VideoConfig, run_video, "write an mp4 of dataset episodes"),
    "train": (TrainConfig, run_train, "train the world model (presets: demo, quick, hold, lewm-data, full)"),
    "probe": (ProbeConfig, run_probe, "linear and nonlinear probes of the latent: is the state a linear map of it?"),
    "eval": (EvalConfig, run_eval, "closed-loop success in MuJoCo beside reference methods (random, exploration, simulator)"),
    "demo": (DemoConfig, run_demo, "planning videos (mp4 + gif) and a summary sheet"),
    "bench": (BenchConfig, run_bench, "measure collection, training and planning speed, and planning quality"),
    "info": (InfoConfig, run_info, "what a model file is: architecture, training, data, planner, maker"),
    "export": (ExportConfig, run_export, "save what planning needs (the subgoal graph) in an older model file"),
    "study": (StudyConfig, run_study, "studies: why the goal is not always held; when the latent is linear"),
    "compare": (CompareConfig, run_compare, "two evaluations of the same episodes, episode by episode: is a setting "
                                            "better?"),
    "demo-pipeline": (PipelineConfig, run_pipeline, "the embedded default that `make demo` runs"),
}


def default_config(command: str, argv: list[str]):
    """The config whose values are the command's defaults (for ``train``: the typed preset's; for ``eval`` and
    ``demo``: the planner the typed checkpoint records)."""
    cls = COMMANDS[command][0]
    if cls is TrainConfig:
        return _train_defaults(argv)
    return cls(policy=_recorded_policy(argv)) if cls in (EvalConfig, DemoConfig) else cls()


def _main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that prints results."""
    return os.environ.get("RANK", "0") == "0"


def _configure_logging() -> None:
    """The library logs; the command line shows its messages on stderr (rank 0 all of them, other ranks only
    warnings), results go to stdout."""
    root = logging.getLogger()
    if not any(getattr(h, "_wm", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._wm = True
        root.addHandler(handler)
    root.setLevel(logging.INFO if _main_process() else logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # dm_control's "MuJoCo library version is: ..." lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    set_command(["wm", *argv])  # recorded with every result of this command
    try:
        return _main(argv)
    finally:
        set_command([])  # what runs next in this process (from Python) is not this command
        rundir = sys.modules.get("worldmodel.rundir")
        if rundir is not None:  # a checkpoint read for a resume that was refused before it loaded
            rundir.release_checkpoint()


def _main(argv: list[str]) -> int:
    _configure_logging()
    parser = argparse.ArgumentParser(prog="wm", description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    command = next((a for a in argv if not a.startswith("-")), None)
    defaults, parsers = None, {}
    try:
        for name, (cls, _, help_text) in COMMANDS.items():
            p = parsers[name] = sub.add_parser(name, help=help_text.replace("%", "%%"), allow_abbrev=False,
                                               description=(cls.__doc__ or "").strip().replace("``", ""))
            # Only the chosen command's options are built (a bad --preset is reported below).
            if name == command:
                defaults = default_config(name, argv)
                add_config_arguments(p, defaults)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's own parser: its usage, not wm's
            parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        run = COMMANDS[args.command][1]
        cfg = config_from_args(defaults if args.command == command else default_config(args.command, argv), args)
        if hasattr(cfg, "threads"):
            set_threads(cfg.threads)
        with sigterm_as_interrupt():  # `timeout`, `docker stop`, Slurm: the command cleans up as after Ctrl-C
            return run(cfg)
    except KeyboardInterrupt:  # what a command keeps (finished runs, episodes, a checkpoint) it says itself
        print(f"wm {command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"wm {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
