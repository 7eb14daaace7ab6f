"""When is the latent a linear map of the arm's state? The LeJEPA theory's test, run on short trainings.

The theory (linear identifiability of LeJEPA world models) says: with Gaussian latents and stationary
dynamics with additive noise, prediction plus an isotropic Gaussian regulariser (SIGReg) recovers the
true state up to a linear map; the Gaussian is the only latent distribution with that guarantee; and the
guarantee degrades gracefully as the conditions are violated. Each run here trains the demo architecture
briefly under one change and measures, on its test episodes: the linear (ridge) and nonlinear (MLP) probe
R^2 of the state, their gap, how Gaussian the latents are, and closed-loop ``reach25`` success.

The runs: SIGReg weight 0 (prediction alone), 0.01, the default 0.05 and 0.2; the same machinery pulling
the projections towards a uniform or a Laplace distribution instead of N(0, 1); data of i.i.d. uniform
actions, of smooth sweeps alone and of the demo's mixture of sweeps and jitter (the reference); and a
short dataset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import check_at_least, option
from common.files import atomic_write_json, atomic_write_text, kept_measurement, prepare_output_dir
from common.provenance import provenance, signed

log = logging.getLogger(__name__)

# name -> (dataset, training settings by name); the reference run first
RUNS = {
    "reference (mixed data, SIGReg 0.05)": ("mixed", {}),
    "SIGReg 0 (prediction alone)": ("mixed", {"sigreg_weight": 0.0}),
    "SIGReg 0.01": ("mixed", {"sigreg_weight": 0.01}),
    "SIGReg 0.2": ("mixed", {"sigreg_weight": 0.2}),
    "uniform target": ("mixed", {"sigreg_target": "uniform"}),
    "Laplace target": ("mixed", {"sigreg_target": "laplace"}),
    "i.i.d. uniform actions": ("random", {}),
    "smooth sweeps only": ("smooth", {}),
    "short dataset (100 episodes)": ("short", {}),
}
DATASETS = {"mixed": ("mixed", None), "random": ("random", None), "smooth": ("smooth", None), "short": ("mixed", 100)}


@dataclass
class IdentifiabilityConfig:
    """The study's size: short runs side by side (about an hour on 2 CPU cores with the defaults)."""

    steps: int = option(1000, "training steps of each run")
    seeds: int = option(1, "training seeds of each run (intervals need 2 or more)", cli=False)
    episodes: int = option(450, "episodes of each collected dataset (the short one has 100)")
    eval_episodes: int = option(50, "closed-loop reach25 episodes on each run's test split")
    mlp_steps: int = option(1500, "optimiser steps of the nonlinear probe")
    workers: int = option(2, "collection worker processes")
    out: str = option("runs/study-identifiability", "where datasets, runs and the results go (resumes there)",
                      cli=False, path=True)

    def __post_init__(self):
        check_at_least(self, 1, ("steps", "seeds", "episodes", "eval_episodes", "mlp_steps", "workers"),
                       "identifiability.")


def run(cfg: IdentifiabilityConfig, progress: bool = True) -> dict:
    """Collect the datasets, train every run and seed, measure each; results.json, results.md and
    results.png in ``cfg.out``. Runs already measured there are kept (an interrupted study resumes)."""
    from envs.collect import CollectConfig, collect

    out = prepare_output_dir(cfg.out)
    short = [n for _, n in DATASETS.values() if n]  # the datasets of a fixed size
    if short and min(short) >= cfg.episodes:
        log.warning(f"--identifiability.episodes {cfg.episodes}: the short dataset ({min(short)} episodes) is not "
                    f"shorter than the others, so its row says nothing of data size")
    data = {}
    for name, (policy, episodes) in DATASETS.items():
        data[name] = str(out / f"data-{name}")
        collect(CollectConfig(episodes=episodes or cfg.episodes, policy=policy, workers=cfg.workers,
                              out=data[name]), progress=progress)
    results = {}
    for label, (dataset, settings) in RUNS.items():
        for seed in range(cfg.seeds):
            results.setdefault(label, []).append(_one(cfg, out, label, data[dataset], settings, seed, progress))
    summary = {"config": cfg.__dict__, "runs": results, "table": _table(results), "provenance": provenance()}
    atomic_write_json(out / "results.json", summary)
    atomic_write_text(out / "results.md", signed(markdown(summary), summary["provenance"]))
    plot(summary, out / "results.png")
    return summary


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:40]


def _one(cfg: IdentifiabilityConfig, out: Path, label: str, data: str, settings: dict, seed: int, progress: bool):
    """Train one run (or keep the one there), then its probes and closed-loop success on its test split."""
    from evaluation.evaluate import closed_loop_rates
    from worldmodel.datasplit import split_episodes, training_episodes
    from worldmodel.model import WorldModel, read_model_meta
    from worldmodel.probe import identifiability
    from worldmodel.train import preset_config, train

    run_dir = out / "runs" / f"{_slug(label)}-s{seed}"
    done, measured_with = run_dir / "study.json", _measured_with(cfg)
    if done.is_file():
        return kept_measurement(done, measured_with, f"choose another output directory, or delete {run_dir} to "
                                                     f"measure that run again")
    # a run that stopped part-way continues from its checkpoint; a finished one is kept as it is
    train(preset_config("demo", {**settings, "steps": cfg.steps, "seed": seed, "eval_episodes": 0}, data=data,
                        out=str(run_dir), resume=(run_dir / "checkpoint.pt").is_file()), progress=progress)
    checkpoint = run_dir / "model.pt"
    model, meta = WorldModel.load(checkpoint, "cpu"), read_model_meta(checkpoint)
    from envs.dataset import EpisodeStore

    store = EpisodeStore(data, image_size=model.cfg.image_size)
    test, _ = split_episodes(store, meta, "test")
    result = identifiability(model, store, training_episodes(store, meta), test, mlp_steps=cfg.mlp_steps)
    latched, held = closed_loop_rates(str(checkpoint), data, "test", cfg.eval_episodes)
    row = {"label": label, "seed": seed, "settings": settings, "data": data, "measured_with": measured_with,
           "linear": result["linear"], "nonlinear": result["nonlinear"], "gap": result["gap"],
           "gaussianity": result["gaussianity"], "reach25_latched": latched, "reach25_held": held}
    atomic_write_json(done, row)
    return row


def _measured_with(cfg: IdentifiabilityConfig) -> dict:
    """The study's settings a kept run's measurements depend on."""
    return {"steps": cfg.steps, "episodes": cfg.episodes, "eval_episodes": cfg.eval_episodes,
            "mlp_steps": cfg.mlp_steps}


def _table(results: dict) -> list[dict]:
    """Per run: the mean and spread over seeds of each headline number."""
    keys = {"linear R2 (joints)": lambda r: r["linear"]["joints_mean"],
            "nonlinear R2 (joints)": lambda r: r["nonlinear"]["joints_mean"],
            "linear R2 (velocities)": lambda r: np.mean([r["linear"]["vel_shoulder"], r["linear"]["vel_wrist"]]),
            "nonlinear R2 (velocities)": lambda r: np.mean([r["nonlinear"]["vel_shoulder"],
                                                            r["nonlinear"]["vel_wrist"]]),
            "latent SIGReg statistic": lambda r: r["gaussianity"]["latent_sigreg"],
            "reach25 latched": lambda r: r["reach25_latched"], "reach25 held": lambda r: r["reach25_held"]}
    rows = []
    for label, runs in results.items():
        row = {"run": label, "seeds": len(runs)}
        for name, get in keys.items():
            values = [float(get(r)) for r in runs]
            row[name] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None)
        rows.append(row)
    return rows


def markdown(summary: dict) -> str:
    rows = summary["table"]
    names = [k for k in rows[0] if k not in ("run", "seeds")]
    fmt = lambda v: f"{v[0]:.3f}" + (f" +- {v[1]:.3f}" if v[1] is not None else "")  # noqa: E731
    lines = [f"Each run: the demo preset for {summary['config']['steps']} steps, {summary['config']['seeds']} "
             f"training seed(s) (mean +- sd over seeds); probes fit on training episodes and scored on test "
             f"episodes; the SIGReg statistic of the standardised test latents (about 1 for a Gaussian); "
             f"closed-loop reach25 on {summary['config']['eval_episodes']} test episodes.", "",
             "| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {r['run']} | " + " | ".join(fmt(r[n]) for n in names) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path) -> None:
    """Linear against nonlinear R^2 of the joints per run (left), the latents' SIGReg statistic (middle),
    closed-loop success (right)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure to leak, no backend switched

    rows = summary["table"]
    x = np.arange(len(rows))
    fig = Figure(figsize=(16, 5))
    axes = fig.subplots(1, 3)
    panels = ((("linear R2 (joints)", "tab:blue"), ("nonlinear R2 (joints)", "tab:orange")),
              (("latent SIGReg statistic", "tab:purple"),),
              (("reach25 latched", "tab:green"), ("reach25 held", "tab:olive")))
    for ax, bars in zip(axes, panels):
        width = 0.8 / len(bars)
        for k, (name, colour) in enumerate(bars):
            mean = [r[name][0] for r in rows]
            err = [r[name][1] or 0 for r in rows]
            ax.bar(x + (k - (len(bars) - 1) / 2) * width, mean, width, yerr=err, color=colour, label=name,
                   edgecolor="black", linewidth=0.5, capsize=2)
        ax.set_xticks(x, [r["run"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    axes[1].set_yscale("log")
    axes[0].set_ylim(0, 1.05)
    axes[2].set_ylim(0, 1.05)
    fig.suptitle(f"Identifiability: short runs of {summary['config']['steps']} steps, "
                 f"{summary['config']['seeds']} seed(s), test episodes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
