"""``wm bench --what gpu``: everything a GPU must show, in one call (about 8 minutes on an H100/H200).

1. the test suite on the device (the code picks CUDA wherever it is asked for ``auto``),
2. plan latency of CEM 300 x 30 x H5 (LeWM's setting) and of our default, batch 1 and 50: eager, compiled
   (``torch.compile``) and compiled with CUDA graphs (``reduce-overhead``),
3. training throughput of the demo and full presets,
4. a short training of the full preset on freshly collected data, and its closed-loop evaluation.

It writes ``gpu_check.md`` and ``gpu_check.json``. ``dry_run`` runs every part with tiny settings on any
device (the test suite runs it on the CPU), so the command is known to work before a GPU is at hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.config import apply_overrides
from common.device import resolve_device
from common.files import atomic_write_json, atomic_write_text, prepare_output_dir
from planners.config import PlannerConfig
from planners.policy import make_planner

LEWM = {"samples": 300, "iterations": 30, "horizon": 5, "cem.elites": 30}
OURS: dict = {}  # the default planner


def plan_latency(device: torch.device, dry_run: bool) -> list[dict]:
    """Median ms per plan for each (planner, batch, mode); compiled means CUDA graphs on CUDA
    (``planners.base.compile_iteration`` uses ``reduce-overhead`` there)."""
    from benchmarks.plan import demo_model, time_plan

    model = demo_model(device)
    settings = {"tiny CEM 8 x 2": {"samples": 8, "iterations": 2}} if dry_run else \
        {"CEM 300 x 30 x H5 (LeWM)": LEWM, "default (CEM 100 x 10)": OURS}
    rows = []
    for label, over in settings.items():
        for batch in (1, 2) if dry_run else (1, 50):
            for compiled in (False,) if dry_run else (False, True):
                planner = make_planner(model, apply_overrides(PlannerConfig(), {**over, "compile": compiled}))
                mode = ("CUDA graphs" if device.type == "cuda" else "compiled") if compiled else "eager"
                rows.append({"planner": label, "batch": batch, "mode": mode,
                             "ms_per_plan": 1000 * time_plan(planner, model, batch, 1 if dry_run else 5)})
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
    """Collect, train the full preset (3,000 steps), evaluate reach25 on its test episodes."""
    from envs.collect import CollectConfig, collect
    from evaluation.evaluate import EvalConfig, evaluate
    from worldmodel.train import preset_config, train

    data = out / "data"
    episodes = 30 if dry_run else 2000
    collect(CollectConfig(episodes=episodes, steps=40 if dry_run else 100, size=64, workers=1 if dry_run else 16,
                          out=str(data)), progress=False)
    steps = 4 if dry_run else 3000
    small = {"latent_dim": 16, "batch_size": 8, "encoder.conv_channels": 4, "predictor.hidden": 32,
             "eval_episodes": 0, "val_every": 2, "ckpt_every": 2, "num_workers": 0} if dry_run else {}
    cfg = preset_config("full", {**small, "steps": steps, "device": str(device)}, data=str(data), out=str(out / "run"))
    start = time.perf_counter()
    train(cfg, progress=False)
    trained = time.perf_counter() - start
    report = evaluate(EvalConfig(checkpoint=str(out / "run" / "model.pt"), episodes=2 if dry_run else 50,
                                 seeds=1 if dry_run else 3, baselines="", device=str(device), out=str(out / "eval"),
                                 **({"policy": apply_overrides(EvalConfig().policy, {"samples": 8, "iterations": 1})}
                                    if dry_run else {})), progress=False)
    s = report["summary"]["reach25/world_model"]
    return {"train_minutes": trained / 60, "steps": steps, "reach25_latched": s["success_rate"],
            "reach25_held": s["held_rate"]}


def test_suite(dry_run: bool) -> dict:
    """The test suite, run on this machine (its device); not in a dry run (the suite runs that)."""
    if dry_run:
        return {"returncode": 0, "summary": "not run in a dry run", "seconds": 0.0}
    args = [sys.executable, "-m", "pytest", "-q", "-x"]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-1] if proc.stdout else "",
            "seconds": time.perf_counter() - start}


def run(device: str = "auto", out: str = "runs/gpu-check", dry_run: bool = False) -> str:
    dev = resolve_device(device)
    where = prepare_output_dir(out)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    result = {"device": name, "torch": torch.__version__, "dry_run": dry_run,
              "tests": test_suite(dry_run), "plan_latency": plan_latency(dev, dry_run),
              "training": training_throughput(dev, dry_run), "short_training": short_training(where, dev, dry_run)}
    lines = [f"# GPU check on {name} (torch {torch.__version__}){' - DRY RUN, tiny settings' if dry_run else ''}", "",
             f"Tests: {result['tests']['summary']} (rc {result['tests']['returncode']}, "
             f"{result['tests']['seconds']:.0f} s).", "", "| planner | batch | mode | ms per plan |", "|---|---|---|---|"]
    lines += [f"| {r['planner']} | {r['batch']} | {r['mode']} | {r['ms_per_plan']:.2f} |" for r in result["plan_latency"]]
    lines += ["", "| preset | steps/s | frames/s |", "|---|---|---|"]
    lines += [f"| {r['preset']} | {r['steps_per_s']:.1f} | {r['frames_per_s']:.0f} |" for r in result["training"]]
    t = result["short_training"]
    lines += ["", f"Full preset, {t['steps']} steps in {t['train_minutes']:.1f} min: reach25 latched "
                  f"{100 * t['reach25_latched']:.1f}%, held {100 * t['reach25_held']:.1f}% (test episodes)."]
    atomic_write_json(where / "gpu_check.json", result)
    atomic_write_text(where / "gpu_check.md", "\n".join(lines) + "\n")
    return "\n".join(lines)
