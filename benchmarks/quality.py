"""``wm bench --what plan-quality``: closed-loop success against planning time, the curve the planner's
defaults are chosen from."""

from __future__ import annotations

import numpy as np
import torch

from common.config import apply_overrides
from evaluation.evaluate import load_setup, world_model_rates
from planners.policy import PolicyConfig

QUALITY_SETTINGS = ((300, 30), (300, 10), (300, 5), (100, 10), (100, 30), (1000, 10))


def run(checkpoint: str, device: str = "auto", settings=QUALITY_SETTINGS, episodes: int = 50,
                protocol: str = "reach25", seed: int = 0, data: str = "", split: str = "val") -> str:
    """Closed-loop success (latched and held) against planning time, for CEM settings (samples x
    iterations) on a trained model: the curve the planner's defaults are chosen from. Every setting
    runs the same episodes with the same per-episode noise keys. ``data`` as for ``wm eval``: the
    dataset the model was trained on unless given; ``split`` the model's episodes they come from (val: the
    curve chooses settings, so it never runs on the test episodes results are reported on)."""
    setup = load_setup(checkpoint, data, episodes, device, split)
    search = PolicyConfig().plan
    lines = [f"Model `{checkpoint}`; {episodes} `{protocol}` episodes (seed {seed}) of {setup.split_note}, every "
             f"setting on the same "
             f"episodes; CEM, horizon {search.horizon}, {search.cost} cost, the default policy otherwise (rest "
             f"candidate, subgoals); device {setup.model.device}, torch threads {torch.get_num_threads()}.", ""]
    rows = []
    try:
        for n, it in settings:
            policy = apply_overrides(PolicyConfig(), {"samples": n, "iterations": it})
            rows.append((n, it, *world_model_rates(setup, policy, protocol, episodes, seed)))
    finally:
        setup.batch.close()
    base = next((r for r in rows if r[:2] == (300, 30)), rows[0])  # the published setting when it ran
    lines += [f"| samples x iterations | latched | held at end | ms per planning call ({episodes} problems) "
              f"| ms per problem | time vs {base[0]} x {base[1]} |", "|---|---|---|---|---|---|"]
    for n, it, latched, held, call in rows:
        lines.append(f"| {n} x {it} | {100 * latched:.0f}% | {100 * held:.0f}% | {1000 * call:.0f} | "
                     f"{1000 * call / episodes:.1f} | {call / base[4]:.2f}x |")
    return "\n".join(lines)


def subgoal_cost(checkpoint: str, device: str = "auto", episodes: int = 50, protocols=("reach25", "uniform"),
                 seed: int = 0, data: str = "", split: str = "val") -> str:
    """What subgoals cost: an episode's planning time (every plan call, routing included) with and without
    them, on the same episodes, and the time ``load_policy`` takes from the model files alone."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from evaluation.evaluate import EvalConfig, parse_protocols, run_protocol_seed
    from planners.policy import load_policy

    with tempfile.TemporaryDirectory() as tmp:  # the model files alone, no dataset beside them
        shutil.copy(checkpoint, Path(tmp) / "model.pt")
        shutil.copy(Path(checkpoint).with_suffix(".json"), Path(tmp) / "model.json")
        load_policy(Path(tmp) / "model.pt", device)  # warm (imports, allocator)
        start = time.perf_counter()
        load_policy(Path(tmp) / "model.pt", device)
        load_s = time.perf_counter() - start
    setup = load_setup(checkpoint, data, episodes, device, split)
    lines = [f"`load_policy` from `model.pt` + `model.json` alone (subgoal graph included): {load_s:.2f} s.", "",
             "| protocol | subgoals | latched | held | planning per episode (s, routing included) | with / without |",
             "|---|---|---|---|---|---|"]
    try:
        for protocol in parse_protocols(",".join(protocols)):
            per = {}
            for on in (False, True):
                policy = apply_overrides(PolicyConfig(), {"subgoals.enabled": on})
                cfg = EvalConfig(episodes=episodes, seeds=1, policy=policy, baselines="")
                records = run_protocol_seed(setup, cfg, protocol, seed, ["world_model"], {})
                r = records[0]
                per[on] = (np.mean([x["success"] for x in records]), np.mean([x["held"] for x in records]),
                           (r["plan_time_per_call_s"] * r["plan_calls"] + r["route_time_batch_s"]) / episodes)
            for on in (False, True):
                latched, held, t = per[on]
                lines.append(f"| {protocol.name} | {'on' if on else 'off'} | {100 * latched:.0f}% | {100 * held:.0f}% | "
                             f"{t:.3f} | {per[True][2] / per[False][2]:.2f}x |" if on else
                             f"| {protocol.name} | off | {100 * latched:.0f}% | {100 * held:.0f}% | {t:.3f} | 1.00x |")
    finally:
        setup.batch.close()
    return "\n".join(lines)
