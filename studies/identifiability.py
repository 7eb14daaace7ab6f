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
from common.files import (atomic_write_json, field_at, keeping_what_was_measured, kept_fields, kept_measurement,
                          output_lock, prepare_output_dir, saying_what_is_kept)
from common.text import counted
from studies import write_results

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
    """Collect the datasets, train every run and seed, measure each; results.png, results.md and results.json
    (last: it says the study finished) in ``cfg.out``. Runs already measured there are kept (an interrupted
    study resumes); they are checked, and so are the datasets there, before anything is collected."""
    from envs.collect import CollectConfig, collect

    out = prepare_output_dir(cfg.out)
    short = [n for _, n in DATASETS.values() if n]  # the datasets of a fixed size
    if short and min(short) >= cfg.episodes:
        log.warning(f"--identifiability.episodes {cfg.episodes}: the short dataset ({min(short)} episodes) is not "
                    f"shorter than the others, so its row says nothing of data size")
    kept = {(label, seed): _kept(cfg, out, label, seed) for label in RUNS for seed in range(cfg.seeds)}
    data = {name: str(out / f"data-{name}") for name in DATASETS}
    _check_data(cfg, data)
    results = {}
    with saying_what_is_kept(out / "runs", KEPT_PARTS):
        for name, (policy, episodes) in DATASETS.items():
            collect(CollectConfig(episodes=episodes or cfg.episodes, policy=policy, workers=cfg.workers,
                                  out=data[name]), progress=progress)
        for label, (dataset, settings) in RUNS.items():
            for seed in range(cfg.seeds):
                row = kept[label, seed] or _one(cfg, out, label, data[dataset], settings, seed, progress)
                results.setdefault(label, []).append(row)
    summary = {"config": cfg.__dict__, "runs": results, "table": _table(results)}
    with keeping_what_was_measured(out / "runs", KEPT_PARTS):
        return write_results(out, summary, markdown(summary), plot)


def _run_dir(out: Path, label: str, seed: int) -> Path:
    return out / "runs" / f"{_slug(label)}-s{seed}"


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:40]


def _kept(cfg: IdentifiabilityConfig, out: Path, label: str, seed: int) -> dict | None:
    """The run's measurements kept in ``out`` by an earlier study, None if there are none; kept ones measured
    with other settings, or damaged, are an error naming the file and the field."""
    done = _run_dir(out, label, seed) / "study.json"
    if not done.is_file():
        return None
    row = kept_measurement(done, _measured_with(cfg), f"choose another output directory, or delete {done.parent} "
                                                      f"to measure that run again")
    return kept_fields(done, row, dict.fromkeys(TABLE_FIELDS, "number"),
                       "delete it to measure that run again (its training is kept)")


def _check_data(cfg: IdentifiabilityConfig, data: dict) -> None:
    """Each dataset already in the study's output holds no episode beyond the ones this run asks for (the
    collection refuses to shrink one, naming its own options)."""
    from envs.collect import CollectConfig, existing_episodes

    for name, (policy, fixed) in DATASETS.items():
        if not Path(data[name]).is_dir():
            continue
        wanted = fixed or cfg.episodes
        with output_lock(data[name]):  # existing_episodes clears what killed collections left there
            held = existing_episodes(CollectConfig(episodes=wanted, policy=policy, out=data[name]))
        if held and max(held) >= wanted:
            fix = "delete it to collect it again" if fixed else \
                f"pass --identifiability.episodes {max(held) + 1} or more"
            raise ValueError(f"{data[name]} already holds {len(held)} episodes (up to episode {max(held)}), more than "
                             f"the {wanted} this study asks for; {fix}, or give another --out")


def _one(cfg: IdentifiabilityConfig, out: Path, label: str, data: str, settings: dict, seed: int, progress: bool):
    """Train one run (a run that stopped part-way continues from its checkpoint; a finished training is kept
    as it is), then its probes and closed-loop success on its test split."""
    from evaluation.evaluate import closed_loop_rates
    from worldmodel.datasplit import split_episodes, training_episodes
    from worldmodel.model import WorldModel, read_model_meta
    from worldmodel.probe import identifiability
    from worldmodel.train import preset_config, train

    run_dir = _run_dir(out, label, seed)
    train(preset_config("demo", {**settings, "steps": cfg.steps, "seed": seed, "eval_episodes": 0}, data=data,
                        out=str(run_dir), resume=(run_dir / "checkpoint.pt").is_file()), progress=progress)
    checkpoint = run_dir / "model.pt"
    model, meta = WorldModel.load(checkpoint, "cpu"), read_model_meta(checkpoint)
    from envs.dataset import EpisodeStore

    store = EpisodeStore(data, image_size=model.cfg.image_size)
    test, _ = split_episodes(store, meta, "test")
    result = identifiability(model, store, training_episodes(store, meta), test, mlp_steps=cfg.mlp_steps)
    latched, held = closed_loop_rates(str(checkpoint), data, "test", cfg.eval_episodes)
    row = {"label": label, "seed": seed, "settings": settings, "data": data, "measured_with": _measured_with(cfg),
           "linear": result["linear"], "nonlinear": result["nonlinear"], "gap": result["gap"],
           "gaussianity": result["gaussianity"], "reach25_latched": latched, "reach25_held": held}
    atomic_write_json(run_dir / "study.json", row)
    return row


def _measured_with(cfg: IdentifiabilityConfig) -> dict:
    """The study's settings a kept run's measurements depend on."""
    return {"steps": cfg.steps, "episodes": cfg.episodes, "eval_episodes": cfg.eval_episodes,
            "mlp_steps": cfg.mlp_steps}


# the table's columns: each the mean of these fields of a run's study.json (a kept one must hold them)
COLUMNS = {"linear R2 (joints)": ("linear.joints_mean",), "nonlinear R2 (joints)": ("nonlinear.joints_mean",),
           "linear R2 (velocities)": ("linear.vel_shoulder", "linear.vel_wrist"),
           "nonlinear R2 (velocities)": ("nonlinear.vel_shoulder", "nonlinear.vel_wrist"),
           "latent SIGReg statistic": ("gaussianity.latent_sigreg",), "reach25 latched": ("reach25_latched",),
           "reach25 held": ("reach25_held",)}
TABLE_FIELDS = tuple(field for fields in COLUMNS.values() for field in fields)
KEPT_PARTS = "*/study.json"  # in runs/: each run's measurements, kept as it finishes


def _table(results: dict) -> list[dict]:
    """Per run: the mean and spread over seeds of each headline number."""
    rows = []
    for label, runs in results.items():
        row = {"run": label, "seeds": len(runs)}
        for name, fields in COLUMNS.items():
            values = [float(np.mean([field_at(r, f) for f in fields])) for r in runs]  # kept: checked present
            row[name] = (float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None)
        rows.append(row)
    return rows


def markdown(summary: dict) -> str:
    rows = summary["table"]
    names = [k for k in rows[0] if k not in ("run", "seeds")]
    fmt = lambda v: f"{v[0]:.3f}" + (f" +- {v[1]:.3f}" if v[1] is not None else "")  # noqa: E731
    references = [r["gaussianity"]["gaussian_reference"]["latent_sigreg"] for runs in summary.get("runs", {}).values()
                  for r in runs if "gaussian_reference" in r["gaussianity"]]  # runs kept from before lack it
    reference = f"{np.mean(references):.2f}" if references else "about 0.55"
    config = summary["config"]
    lines = [f"Each run: the demo preset for {counted(config['steps'], 'step')}, "
             f"{counted(config['seeds'], 'training seed')} (mean +- sd over seeds); probes fit on training "
             f"episodes and scored on test episodes; the SIGReg statistic of the standardised test latents "
             f"({reference} for Gaussian samples of the same shape); closed-loop reach25 on "
             f"{counted(config['eval_episodes'], 'test episode')}.", "",
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
    config = summary["config"]
    fig.suptitle(f"Identifiability: short runs of {counted(config['steps'], 'step')}, "
                 f"{counted(config['seeds'], 'seed')}, test episodes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
