"""``wm bench --what gpu``: everything a GPU must show, in one call (about 8 minutes on an H100/H200).

1. plan latency of CEM 300 x 30 x H5 (LeWM's setting) and of our default, batch 1 and 50, eager, in float32
   and with the model's matrix products in bf16 (``bf16``),
2. training throughput of the demo and full presets,
3. the same plan latencies with CUDA graphs: one per iteration (``compile``, ``reduce-overhead``), and one
   per plan (``cuda_graph``), of eager or of compiled iterations (on a CPU: compiled only),
4. a short training of the full preset on freshly collected data, and its closed-loop evaluation,
5. the test suite on the device (the code picks CUDA wherever it is asked for ``auto``), in the time left.

The cheap parts come first, so a machine lent for a few minutes answers the most. Each part that fails is
recorded with its error and the others still run; ``gpu_check.md`` and ``gpu_check.json`` are rewritten
after every part, so a run stopped from outside keeps what it measured. A part that would start after
``minutes`` is skipped and says so. ``dry_run`` runs every part with tiny settings on any device (the
test suite runs it on the CPU), so the command is known to work before a GPU is at hand.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.plan import LEWM_SEARCH
from benchmarks.timing import markdown_table
from common.config import apply_overrides
from common.device import resolve_device
from common.files import atomic_write_json, atomic_write_text, output_dir
from common.provenance import provenance, signed
from planners.config import PlannerConfig
from planners.policy import make_planner

OURS: dict = {}  # the default planner
ROOT = Path(__file__).parents[1]


def graph_modes(device: torch.device) -> dict[str, dict]:
    """The faster ways to run a plan, by name: planner settings on top of the eager ones."""
    if device.type != "cuda":
        return {"compiled": {"compile": True}}
    return {"CUDA graph per iteration (compiled)": {"compile": True},
            "one CUDA graph per plan": {"cuda_graph": True},
            "one CUDA graph per plan, compiled iteration": {"compile": True, "cuda_graph": True},
            "one CUDA graph per plan, bf16": {"cuda_graph": True, "bf16": True}}


def plan_latency(device: torch.device, dry_run: bool, modes: dict[str, dict]) -> list[dict]:
    """Median ms per plan for each (planner, batch, mode); each row's wall time includes its warm-up call
    (compiling and capturing). A row that fails records its error; the other rows still run. Where
    inductor declined CUDA graphs for a compiled graph, the mode says how many times."""
    from torch._dynamo.utils import counters

    from benchmarks.plan import demo_model, time_plan

    model = demo_model(device)
    settings = {"tiny CEM 8 x 2": {"samples": 8, "iterations": 2}} if dry_run else \
        {"CEM 300 x 30 x H5 (LeWM)": LEWM_SEARCH, f"default (CEM {PlannerConfig().budget()})": OURS}
    rows = []
    for label, over in settings.items():
        for batch in (1, 2) if dry_run else (1, 50):
            for mode, fast in modes.items():
                row = {"planner": label, "batch": batch, "mode": mode}
                start, skips = time.perf_counter(), counters["inductor"]["cudagraph_skips"]
                try:
                    planner = make_planner(model, apply_overrides(PlannerConfig(), {**over, **fast}))
                    row["ms_per_plan"] = 1000 * time_plan(planner, model, batch, 1 if dry_run else 10)
                except Exception as exc:  # noqa: BLE001 - recorded in the report, the other rows still run
                    row["error"] = _error(exc)
                row["row_seconds"] = time.perf_counter() - start
                if counters["inductor"]["cudagraph_skips"] > skips:
                    row["mode"] += f" (CUDA graphs declined {counters['inductor']['cudagraph_skips'] - skips} times)"
                rows.append(row)
    return rows


def training_throughput(device: torch.device, dry_run: bool) -> list[dict]:
    from benchmarks.train import steps_per_s
    from worldmodel.train import preset_config

    rows = []
    for preset in ("demo", "full"):
        cfg = preset_config(preset, {"latent_dim": 16, "batch_size": 4, "encoder.conv_channels": 4} if dry_run else {})
        rate = steps_per_s(cfg, device, cfg.batch_size, 2 if dry_run else 20)
        rows.append({"preset": preset, "steps_per_s": rate, "frames_per_s": rate * cfg.batch_size *
                     (cfg.model.history + cfg.n_pred)})
    return rows


def short_training(out: Path, device: torch.device, dry_run: bool) -> dict:
    """Collect, train the full preset (3,000 steps), evaluate reach25 (near goals) and uniform (far goals)
    on its test episodes; and the subgoal graph the model file keeps (far goals are routed on it)."""
    from envs.collect import CollectConfig, collect
    from evaluation.evaluate import EvalConfig, evaluate
    from worldmodel.graph import GraphConfig, saved_graph
    from worldmodel.model import WorldModel
    from worldmodel.train import preset_config, train

    remove_scratch(out)  # a check measures afresh: what an earlier check left is its own
    data = out / "data"
    episodes = 30 if dry_run else 2000
    start = time.perf_counter()
    collect(CollectConfig(episodes=episodes, steps=40 if dry_run else 100, size=64,
                          workers=1 if dry_run else min(16, os.cpu_count() or 1), out=str(data)), progress=False)
    collected = time.perf_counter() - start
    steps = 4 if dry_run else 3000
    small = {"latent_dim": 16, "batch_size": 8, "encoder.conv_channels": 4, "predictor.hidden": 32,
             "eval_episodes": 0, "val_every": 2, "ckpt_every": 2, "num_workers": 0} if dry_run else {}
    cfg = preset_config("full", {**small, "steps": steps, "device": str(device)}, data=str(data), out=str(out / "run"))
    start = time.perf_counter()
    train(cfg, progress=False)
    trained = time.perf_counter() - start
    report = evaluate(EvalConfig(checkpoint=str(out / "run" / "model.pt"), episodes=2 if dry_run else 50,
                                 seeds=1 if dry_run else 3, baselines="", device=str(device), out=str(out / "eval"),
                                 protocol="reach25,uniform",
                                 **({"policy": apply_overrides(EvalConfig().policy, {"samples": 8, "iterations": 1})}
                                    if dry_run else {})), progress=False)
    rates = {f"{p}_{k}": report["summary"][f"{p}/world_model"][f"{rate}_rate"]
             for p in ("reach25", "uniform") for k, rate in (("latched", "success"), ("held", "held"))}
    model_file = out / "run" / "model.pt"
    graph = saved_graph(WorldModel.load(model_file, device), GraphConfig(), str(model_file))
    return {"episodes": episodes, "collect_minutes": collected / 60, "train_minutes": trained / 60, "steps": steps,
            **rates, "graph": graph.summary() if graph is not None else None}


def test_suite(dry_run: bool, seconds: float) -> dict:
    """The test suite on this machine (its device), spread over up to 8 processes where pytest-xdist is
    installed, stopped after ``seconds``; not in a dry run (the suite runs that)."""
    if dry_run:
        return {"returncode": 0, "summary": "not run in a dry run", "failed": []}
    args = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider"]
    workers = min(8, os.cpu_count() or 1)
    if importlib.util.find_spec("xdist") and workers > 1:
        args += ["-n", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "COLUMNS": "400"}  # whole failure lines
    try:
        proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        return {"returncode": None, "summary": f"stopped after {seconds:.0f} s (the check's time ran out)",
                "failed": []}
    lines = proc.stdout.strip().splitlines()
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr.strip()[-500:],
            "failed": [line for line in lines if line.startswith(("FAILED ", "ERROR "))][:30]}


def _error(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" ({Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {str(exc)[:400]}{at}"


SCRATCH = ("data", "run", "eval")  # the short training's: collected, trained and evaluated afresh by every check


def remove_scratch(out: Path) -> None:
    for scratch in SCRATCH:
        shutil.rmtree(out / scratch, ignore_errors=True)


def run(device: str = "auto", out: str = "runs/gpu-check", dry_run: bool = False,
        minutes: float = 8.0) -> tuple[str, list[str]]:
    """Run every part, writing the report after each; returns the Markdown and the names of failed parts.
    Without a GPU only the ``dry_run`` runs (the whole check would take hours on a CPU)."""
    dev = resolve_device(device)
    if dev.type != "cuda" and not dry_run:
        raise ValueError(f"the GPU check needs a CUDA device, got {dev}: on a CPU its collection and training would "
                         f"take hours; --dry-run runs every part with tiny settings on any device")
    with output_dir(out) as where:  # a check stopped before its first report leaves no empty directory
        return _run(dev, where, dry_run, minutes)


def _run(dev: torch.device, where: Path, dry_run: bool, minutes: float) -> tuple[str, list[str]]:
    deadline = time.perf_counter() + 60 * minutes
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    result = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
              "dry_run": dry_run, "minutes": minutes, "seconds": {}, "failed": [], "provenance": provenance()}
    parts = {"plan_latency": lambda: plan_latency(dev, dry_run, {"eager": {}, "eager, bf16": {"bf16": True}}),
             "training": lambda: training_throughput(dev, dry_run),
             "plan_latency_graphs": lambda: {"skipped": "not in a dry run (compiling takes a minute on a CPU; "
                                                        "the planner tests check the graph capture)"}
             if dry_run else plan_latency(dev, dry_run, graph_modes(dev)),
             "short_training": lambda: short_training(where, dev, dry_run),
             "tests": lambda: test_suite(dry_run, deadline - time.perf_counter())}
    for part, fn in parts.items():
        start = time.perf_counter()
        if start > deadline:
            result[part] = {"skipped": f"not started: the check's {minutes:g} minutes had run out"}
        else:
            try:
                result[part] = fn()
            except Exception as exc:  # noqa: BLE001 - recorded, and the next part still runs
                result[part] = {"error": _error(exc)}
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM: the report says so; the next check measures afresh
                remove_scratch(where)
                result[part] = {"error": "stopped (Ctrl-C or SIGTERM) while it ran"}
                result["seconds"][part] = time.perf_counter() - start
                result["failed"].append(part)
                atomic_write_json(where / "gpu_check.json", result)
                atomic_write_text(where / "gpu_check.md", render(result) + "\n")
                logging.getLogger(__name__).warning(
                    "GPU check stopped during %s; its report so far is in %s; what it had collected or trained is "
                    "removed, whatever a message above says of resuming: every check measures afresh", part,
                    where / "gpu_check.md")
                raise
        result["seconds"][part] = time.perf_counter() - start
        value = result[part]
        rows = value if isinstance(value, list) else [value]
        if any("error" in r for r in rows) or (part == "tests" and value.get("returncode") not in (0, None)):
            result["failed"].append(part)
        atomic_write_json(where / "gpu_check.json", result)
        report = render(result)
        atomic_write_text(where / "gpu_check.md", report + "\n")
    return report, result["failed"]


def render(result: dict) -> str:
    """The Markdown report of what has run so far."""
    lines = [f"# GPU check on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}, "
             f"{result['cpus']} CPU cores){' - DRY RUN, tiny settings' if result['dry_run'] else ''}", "",
             f"Failed parts: {', '.join(result['failed'])}." if result["failed"] else "No part failed.", ""]
    for part, seconds in result["seconds"].items():
        value = result[part]
        if isinstance(value, dict) and ("error" in value or "skipped" in value):
            lines += [f"{part}: {value.get('error') or value.get('skipped')}", ""]
        elif part.startswith("plan_latency"):
            lines += markdown_table(
                [("planner", False), ("batch", False), ("mode", False), ("ms per plan", True),
                 ("row's seconds (warm-up included)", True)],
                [[r["planner"], str(r["batch"]), r["mode"], f"{r['ms_per_plan']:.2f}" if "ms_per_plan" in r
                  else r["error"], f"{r['row_seconds']:.1f}"] for r in value], absolute=True) + [""]
        elif part == "training":
            lines += markdown_table([("preset", False), ("training steps/s", True), ("frames/s", True)],
                                    [[r["preset"], f"{r['steps_per_s']:.1f}", f"{r['frames_per_s']:.0f}"]
                                     for r in value], absolute=True) + [""]
        elif part == "short_training":
            lines += [f"Full preset on {value['episodes']} fresh episodes (collected in "
                      f"{value['collect_minutes']:.1f} min): {value['steps']} steps in {value['train_minutes']:.1f} "
                      f"min; latched / held on its test episodes: reach25 {100 * value['reach25_latched']:.1f}% / "
                      f"{100 * value['reach25_held']:.1f}%, uniform {100 * value['uniform_latched']:.1f}% / "
                      f"{100 * value['uniform_held']:.1f}%.", ""]
            graph = value.get("graph")
            lines += [f"Its subgoal graph: {graph['nodes']} nodes, {graph['links_per_node']:.1f} links per node, "
                      f"{graph['components']} component(s), the largest {100 * graph['largest_component']:.0f}% of "
                      f"the nodes.", ""] if graph else ["Its model file keeps no subgoal graph.", ""]
        elif part == "tests":
            lines += [f"Tests: {value['summary']} (rc {value['returncode']}, {seconds:.0f} s)."]
            lines += [f"- {line}" for line in value["failed"]] + [""]
    lines.append("Seconds per part: " + ", ".join(f"{p} {s:.0f}" for p, s in result["seconds"].items()) + ".")
    return signed("\n".join(lines), result["provenance"]).rstrip("\n")
