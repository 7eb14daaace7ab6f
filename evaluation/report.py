"""What an evaluation reports: per protocol and method, latched and held-at-end success with one interval
method (``evaluation.stats``), steps to success, final-error quantiles, planning time, and, when several
trained models are evaluated together, the spread between them; as JSON, Markdown, a plot and
TensorBoard scalars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.files import callable_name
from common.text import counted
from envs import joint_error
from evaluation.protocols import protocol_named
from evaluation.stats import METHOD, cluster_warning, success_interval

QUANTILES = (10, 25, 50, 75, 90)
# What each method is, in every report.
LABELS = {"world_model": "world model (MPC)", "random": "random actions (i.i.d. uniform)",
          "exploration": "exploration policy (the data's own)",
          "simulator": "CEM on the true state, hand-made joint cost (reference)",
          "simulator-pose": "CEM on the true pose, velocity unseen (one frame's view)"}
COLOURS = {"world_model": "tab:blue", "random": "tab:gray", "exploration": "tab:olive", "simulator": "tab:green",
           "simulator-pose": "tab:cyan"}


def method_label(method: str, protocol) -> str:
    """What a row of a report is: the world model's row names the planner a protocol fixes (LeWM's)."""
    if method == "world_model" and protocol.planner_name:
        return f"world model ({protocol.planner_name})"
    return LABELS[method]


def summarize(records: list[dict], methods, protocols, tolerance: float, other_tolerances=()) -> dict:
    """Per protocol and method: rates pooled over every episode (of every run), intervals over source
    episodes (whichever runs drew them), per-seed and per-run rates, the spread between runs, how many episodes began
    within ``tolerance`` of their goals; and the same rates with the same episodes scored at each of
    ``other_tolerances`` (rad), from their closest and final errors."""
    summary = {}
    for protocol in protocols:
        for method in methods:
            rows = [r for r in records if r["protocol"] == protocol.name and r["method"] == method]
            if not rows:
                continue
            # one cluster per source episode (its uid), whichever models ran it: models that share held-out
            # episodes (or baselines that run alike for each) do not count them as independent twice
            clusters = [r["source_episode"] for r in rows]
            final = np.array([r["final_error"] for r in rows])
            steps = [r["steps_to_success"] for r in rows if r["success"]]
            start = joint_error([r["start_qpos"] for r in rows], [r["goal_qpos"] for r in rows], protocol.wrap)
            s = {
                "protocol": protocol.name, "method": method, "label": method_label(method, protocol),
                "episodes": len(rows), "source_episodes": len(set(clusters)), "interval": METHOD,
                "warning": cluster_warning(clusters),
                **_rates_of(rows, np.array([r["success"] for r in rows]), np.array([r["held"] for r in rows]),
                            clusters),
                "started_within": int((start < tolerance).sum()),  # only where the draw keeps such starts
                "final_error_quantiles": {q: float(np.quantile(final, q / 100)) for q in QUANTILES},
                "median_steps_to_success": float(np.median(steps)) if steps else None,
                "plan_time_per_call_s": float(np.mean([r["plan_time_per_call_s"] for r in rows])),
                "plan_time_per_episode_s": float(np.mean([r["plan_time_per_episode_s"] for r in rows])),
            }
            if other_tolerances:  # latched: closest approach after step 0 within it; held: the final error
                closest = np.array([r["min_error"] for r in rows])
                s["other_tolerances"] = {f"{t:g}": {**_rates_of(rows, closest < t, final < t, clusters),
                                                    "started_within": int((start < t).sum())}
                                         for t in other_tolerances}
            if method == "world_model":  # episodes that began too early for the history the model wants
                short = [r for r in rows if 0 <= r["history_frames"] < r["history_wanted"]]
                s["padded_history"] = len(short) if any(r["history_frames"] >= 0 for r in rows) else None
            summary[f"{protocol.name}/{method}"] = s
    return summary


def _rates_of(rows: list[dict], latched: np.ndarray, held: np.ndarray, clusters: list[str]) -> dict:
    """Latched and held rates of ``rows`` (outcomes ``latched``, ``held``: (n,) bools) with their intervals
    over ``clusters``, per evaluation seed, and, when several trained models ran, per model with the
    standard deviation between them (the spread a user sees between training runs)."""
    def per(key: str, outcome: np.ndarray) -> list[float]:
        keys = np.array([r.get(key, 0) for r in rows])
        return [float(outcome[keys == k].mean()) for k in sorted(set(keys.tolist()))]

    out = {"success_rate": float(latched.mean()), "ci95": success_interval(latched, clusters),
           "held_rate": float(held.mean()), "held_ci95": success_interval(held, clusters),
           "per_seed": per("seed", latched), "held_per_seed": per("seed", held)}
    if len({r.get("run", 0) for r in rows}) > 1:
        out["per_run"], out["held_per_run"] = per("run", latched), per("run", held)
        out["between_runs_sd"] = float(np.std(out["per_run"], ddof=1))
        out["held_between_runs_sd"] = float(np.std(out["held_per_run"], ddof=1))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rates(s: dict, key: str, ci: str, runs: str, sd: str) -> str:
    text = f"{_pct(s[key])} | {_pct(s[ci][0])}-{_pct(s[ci][1])}"
    if runs in s:
        text += f" | {', '.join(f'{100 * r:.1f}' for r in s[runs])} (sd {100 * s[sd]:.1f})"
    return text


def _latched_and_held(s: dict) -> str:
    """The table cells of a row's latched and held rates: each with its interval (and per model, pooled)."""
    return (f"{_rates(s, 'success_rate', 'ci95', 'per_run', 'between_runs_sd')} | "
            f"{_rates(s, 'held_rate', 'held_ci95', 'held_per_run', 'held_between_runs_sd')}")


def _started_within(rates: dict, episodes: int) -> str:
    """How many of a row's ``episodes`` began already within a tolerance."""
    return f"{rates['started_within']} of {episodes}"


def results_markdown(summary: dict, cfg, split_note: str, checkpoints: list[str] | None = None) -> str:
    p = cfg.policy
    checkpoints = checkpoints or [cfg.checkpoint]
    pooled = len(checkpoints) > 1
    models = ", ".join(f"`{c}`" for c in checkpoints)
    grad = counted(p.plan.grad_steps, "gradient step")
    refined = f", then {grad} (step {p.plan.grad_lr})" if p.plan.grad_steps else ""
    cost = p.plan.cost if isinstance(p.plan.cost, str) else callable_name(p.plan.cost)  # as results.json names it
    lines = [f"# Evaluation of {models}", "",
             f"{counted(cfg.episodes, 'episode')} x {counted(cfg.seeds, 'seed')} per protocol"
             f"{' and model' if pooled else ''} on {split_note}. Planner {p.plan.planner} "
             f"{counted(p.plan.samples, 'sample')} x {counted(p.plan.iterations, 'iteration')}"
             f"{f' ({p.plan.warm_iterations} when warm-started)' if p.plan.warm_iterations else ''}, horizon "
             f"{p.plan.horizon}, cost {cost}{', bf16 matrix products' if p.plan.bf16 else ''}"
             f"{refined}, replanning "
             f"every {counted(p.receding_horizon, 'chunk')} (the "
             f"lewm protocol fixes its own); world-model start: {cfg.history} history. Success: every joint within "
             f"{cfg.tolerance} rad of the goal, latched = at some step >= 1, held = at the last step of the budget. "
             f"Intervals: {METHOD}." + (" Rates pool every model's episodes; per model: each trained model's rate "
                                        "and the standard deviation between them." if pooled else ""), ""]
    drawn = sorted({s["protocol"] for s in summary.values()
                    if protocol_named(s["protocol"]).from_training_rows(cfg.lewm_rows)})
    if drawn:
        lines[-1:-1] = [f"The starts of {', '.join(drawn)} come instead from rows of the model's **training** "
                        f"episodes, as LeWM's evaluation draws them (`--lewm-rows train`)."]
    per_model = " | per model (sd)" if pooled else ""
    header = (f"| protocol | method | latched | 95% CI{per_model} | held at end | 95% CI{per_model} | per seed (latched "
              f"/ held) | final joint error p25 / p50 / p75 / p90 (rad) | median steps to success | planning per call "
              f"({counted(cfg.episodes, 'episode')} at once) | per episode (its share of all calls and routing) |")
    lines += [header, "|---" * header.count(" | ") + "|---|"]
    for s in summary.values():
        q = s["final_error_quantiles"]
        steps = "-" if s["median_steps_to_success"] is None else f"{s['median_steps_to_success']:.0f}"
        plan = (f"{1000 * s['plan_time_per_call_s']:.0f} ms | {s['plan_time_per_episode_s']:.2f} s"
                if s["plan_time_per_call_s"] else "- | -")
        seeds = ", ".join(f"{100 * a:.0f}/{100 * b:.0f}" for a, b in zip(s["per_seed"], s["held_per_seed"]))
        lines.append(f"| {s['protocol']} | {s['label']} | {_latched_and_held(s)} | {seeds} | "
                     f"{q[25]:.3f} / {q[50]:.3f} / {q[75]:.3f} / {q[90]:.3f} | {steps} | {plan} |")
    others = [(s, t, o) for s in summary.values() for t, o in s.get("other_tolerances", {}).items()]
    if others:
        tol = cfg.tolerance
        lines += ["", f"The same episodes scored at other tolerances. They were drawn for {tol} rad: where starts "
                      f"come from held-out episodes, none within {tol} rad of its goal is drawn, while one within a "
                      f"larger tolerance may be (counted in the last column).", "",
                  f"| protocol | method | tolerance (rad) | latched | 95% CI{per_model} | held at end | 95% "
                  f"CI{per_model} | started within it |", "|---" * (8 + 2 * pooled) + "|"]
        lines += [f"| {s['protocol']} | {s['label']} | {t} | {_latched_and_held(o)} | {_started_within(o, s['episodes'])} |"
                  for s, t, o in others]
    warnings = [f"{s['protocol']}, {s['label']}: {s['warning']}" for s in summary.values() if s.get("warning")]
    if warnings:
        lines += ["", "**Warning**: " + "; ".join(warnings) + "."]
    began = [f"{s['protocol']}, {s['label']}: {_started_within(s, s['episodes'])}" for s in summary.values()
             if s.get("started_within")]
    if began:
        lines += ["", f"Episodes that began already within {cfg.tolerance} rad of their goals (drawn from rows "
                      f"of the training episodes, as LeWM's evaluation draws them, where no start is excluded): "
                      + "; ".join(began) + "."]
    padded = [f"{s['protocol']}: {s['padded_history']} of {s['episodes']}" for s in summary.values()
              if s.get("padded_history")]
    if padded:
        lines += ["", "World-model episodes that started too early in their source episode for a full history "
                      "(left-padded as in training): " + "; ".join(padded) + "."]
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, curves: dict, tolerance: float, path: Path, title: str = "",
                 other_tolerances=()) -> None:
    """Bars of latched (solid) and held-at-end (hatched) success per protocol and method, one colour per
    method in both panels, every bar labelled with its value above its interval (a 0% bar shows as its label
    and outline), the methods named below the bars; median joint error over the episode on the right, with
    the tolerance (and any other scored at)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure to leak, no backend switched
    from matplotlib.patches import Patch

    fig = Figure(figsize=(14, 5.2))
    ax1, ax2 = fig.subplots(1, 2)
    rows = list(summary.values())
    protocols = list(dict.fromkeys(s["protocol"] for s in rows))
    methods = list(dict.fromkeys(s["method"] for s in rows))
    width = 0.8 / (2 * len(methods))
    for m, method in enumerate(methods):
        for k, (key, ci, hatch) in enumerate((("success_rate", "ci95", None), ("held_rate", "held_ci95", "//"))):
            xs, rates, errs = [], [], []
            for p, protocol in enumerate(protocols):
                s = summary.get(f"{protocol}/{method}")
                if s is None:
                    continue
                xs.append(p - 0.4 + width * (2 * m + k + 0.5))
                rates.append(100 * s[key])
                errs.append([100 * (s[key] - s[ci][0]), 100 * (s[ci][1] - s[key])])
            ax1.bar(xs, rates, width=width, yerr=np.array(errs).T if errs else None, capsize=2,
                    color=COLOURS[method], alpha=0.9 if hatch is None else 0.45, hatch=hatch, edgecolor="black",
                    linewidth=0.6)
            for x, r, (_, up) in zip(xs, rates, errs):  # above the interval, where no error bar hides it
                ax1.annotate(f"{r:.0f}", (x, r + up), xytext=(0, 2), textcoords="offset points", ha="center",
                             fontsize=6)
    ax1.set_xticks(range(len(protocols)), protocols)
    ax1.set_ylabel("success (%) with 95% interval")
    ax1.set_ylim(0, 112)
    methods_seen = [Patch(facecolor=COLOURS[m], edgecolor="black", linewidth=0.6, label=LABELS[m]) for m in methods]
    ax1.legend(handles=methods_seen, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.07),
               ncol=min(2, len(methods)))  # below the bars: it hides none; the title says solid and hatched
    ax1.set_title("success: latched (solid) and held at the end (hatched)", fontsize=9)
    styles = ["-", "--", ":", "-."]
    for (protocol, method), runs in curves.items():
        e = np.concatenate(runs)  # (episodes, T+1)
        ax2.plot(np.median(e, 0), color=COLOURS[method], linestyle=styles[protocols.index(protocol) % len(styles)],
                 label=f"{protocol}, {summary[f'{protocol}/{method}']['label']}")
    ax2.axhline(tolerance, color="k", linestyle="--", linewidth=1, label="success tolerance")
    for t in other_tolerances:
        ax2.axhline(t, color="k", linestyle=":", linewidth=0.8, label=f"also scored at {t:g} rad")
    ax2.set_yscale("log")
    ax2.set_xlabel("env step")
    ax2.set_ylabel("median largest joint error (rad)")
    ax2.set_title("median joint error over the episode", fontsize=9)
    ax2.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def log_to_tensorboard(logdir: Path, summary: dict, step: int) -> None:
    """Success rates at the model's training step, beside the training curves (``tensorboard --logdir runs``)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as writer:
        for s in summary.values():
            tag = f"eval/{s['protocol']}/{s['method']}"
            writer.add_scalar(f"{tag}/latched", s["success_rate"], step)
            writer.add_scalar(f"{tag}/held", s["held_rate"], step)
            writer.add_scalar(f"{tag}/final_error_median", s["final_error_quantiles"][50], step)
            for t, o in s.get("other_tolerances", {}).items():  # the same episodes at --score-at tolerances
                writer.add_scalar(f"{tag}/latched_at_{t}", o["success_rate"], step)
                writer.add_scalar(f"{tag}/held_at_{t}", o["held_rate"], step)
