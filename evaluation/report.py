"""What an evaluation reports: per protocol and method, latched and held-at-end success with intervals
that respect how episodes were drawn, steps to success, final-error quantiles, planning time; as JSON,
Markdown, a plot and TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.stats import cluster_bootstrap_interval

QUANTILES = (10, 25, 50, 75, 90)


def summarize(records: list[dict], methods, protocols) -> dict:
    summary = {}
    for protocol in protocols:
        for method in methods:
            rows = [r for r in records if r["protocol"] == protocol.name and r["method"] == method]
            if not rows:
                continue
            clusters = [r["source_episode"] for r in rows]
            latched = np.array([r["success"] for r in rows])
            held = np.array([r["held"] for r in rows])
            seeds = sorted({r["seed"] for r in rows})
            final = np.array([r["final_error"] for r in rows])
            steps = [r["steps_to_success"] for r in rows if r["success"]]
            s = {
                "protocol": protocol.name, "method": method, "episodes": len(rows),
                "source_episodes": len(set(clusters)),
                "success_rate": float(latched.mean()), "ci95": cluster_bootstrap_interval(latched, clusters),
                "held_rate": float(held.mean()), "held_ci95": cluster_bootstrap_interval(held, clusters),
                "per_seed": [float(np.mean([r["success"] for r in rows if r["seed"] == k])) for k in seeds],
                "held_per_seed": [float(np.mean([r["held"] for r in rows if r["seed"] == k])) for k in seeds],
                "final_error_quantiles": {q: float(np.quantile(final, q / 100)) for q in QUANTILES},
                "median_steps_to_success": float(np.median(steps)) if steps else None,
                "plan_time_per_call_s": float(np.mean([r["plan_time_per_call_s"] for r in rows])),
                "plan_time_per_episode_s": float(np.mean([r["plan_time_per_episode_s"] for r in rows])),
            }
            if method == "world_model":  # episodes that began too early for the history the model wants
                short = [r for r in rows if 0 <= r["history_frames"] < r["history_wanted"]]
                s["padded_history"] = len(short) if any(r["history_frames"] >= 0 for r in rows) else None
            summary[f"{protocol.name}/{method}"] = s
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def results_markdown(summary: dict, cfg, split_note: str) -> str:
    p = cfg.policy
    lines = [f"# Evaluation of `{cfg.checkpoint}`", "",
             f"{cfg.episodes} episodes x {cfg.seeds} seeds per protocol on {split_note}. Planner {p.plan.planner} "
             f"{p.plan.samples} samples x {p.plan.iterations} iterations, horizon {p.plan.horizon}, cost "
             f"{p.plan.cost}, replanning every {p.receding_horizon} chunk(s) (the lewm protocol fixes its own); "
             f"world-model start: {cfg.history} history. Success: every joint within {cfg.tolerance} rad of the "
             f"goal, latched = at some step >= 1, held = at the last step of the budget. Intervals: 95%, "
             f"bootstrap over source episodes.", "",
             "| protocol | method | latched success | 95% CI | held at end | 95% CI | per seed (latched / held) "
             "| final joint error p25 / p50 / p75 (rad) | median steps to success "
             f"| planning per call ({cfg.episodes} episodes at once) | per episode |",
             "|---" * 11 + "|"]
    for s in summary.values():
        q = s["final_error_quantiles"]
        steps = "-" if s["median_steps_to_success"] is None else f"{s['median_steps_to_success']:.0f}"
        plan = (f"{1000 * s['plan_time_per_call_s']:.0f} ms | {1000 * s['plan_time_per_episode_s']:.1f} ms"
                if s["plan_time_per_call_s"] else "- | -")
        seeds = ", ".join(f"{100 * a:.0f}/{100 * b:.0f}" for a, b in zip(s["per_seed"], s["held_per_seed"]))
        lines.append(f"| {s['protocol']} | {s['method']} | {_pct(s['success_rate'])} | "
                     f"{_pct(s['ci95'][0])}-{_pct(s['ci95'][1])} | {_pct(s['held_rate'])} | "
                     f"{_pct(s['held_ci95'][0])}-{_pct(s['held_ci95'][1])} | {seeds} | "
                     f"{q[25]:.3f} / {q[50]:.3f} / {q[75]:.3f} | {steps} | {plan} |")
    padded = [f"{s['protocol']}: {s['padded_history']} of {s['episodes']}" for s in summary.values()
              if s.get("padded_history")]
    if padded:
        lines += ["", "World-model episodes that started too early in their source episode for a full history "
                      "(left-padded as in training): " + "; ".join(padded) + "."]
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, curves: dict, tolerance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    rows = list(summary.values())
    x = np.arange(len(rows))
    for offset, key, ci, label, colour in ((-0.2, "success_rate", "ci95", "latched", "tab:blue"),
                                           (0.2, "held_rate", "held_ci95", "held at end", "tab:orange")):
        rate = np.array([100 * s[key] for s in rows])
        err = np.array([[100 * (s[key] - s[ci][0]), 100 * (s[ci][1] - s[key])] for s in rows]).T
        ax1.bar(x + offset, rate, width=0.4, yerr=err, capsize=3, color=colour, label=label)
    ax1.set_xticks(x, [f"{s['protocol']}\n{s['method']}" for s in rows], fontsize=8)
    ax1.set_ylabel("success (%) with 95% CI")
    ax1.set_ylim(0, 100)
    ax1.legend(fontsize=8)
    for (protocol, method), runs in curves.items():
        e = np.concatenate(runs)  # (episodes, T+1)
        ax2.plot(np.median(e, 0), label=f"{protocol} {method}")
    ax2.axhline(tolerance, color="k", linestyle="--", linewidth=1, label="success tolerance")
    ax2.set_yscale("log")
    ax2.set_xlabel("env step")
    ax2.set_ylabel("median max joint error (rad)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_to_tensorboard(logdir: Path, summary: dict, step: int) -> None:
    """Success rates at the model's training step, beside the training curves (``tensorboard --logdir runs``)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for s in summary.values():
            tag = f"eval/{s['protocol']}/{s['method']}"
            writer.add_scalar(f"{tag}/latched", s["success_rate"], step)
            writer.add_scalar(f"{tag}/held", s["held_rate"], step)
            writer.add_scalar(f"{tag}/final_error_median", s["final_error_quantiles"][50], step)
