"""``wm bench --what plan-quality``: closed-loop success against planning time, the curve the planner's
defaults are chosen from."""

from __future__ import annotations

import torch

from common.config import apply_overrides
from evaluation.evaluate import load_setup, world_model_rates
from evaluation.protocols import LEWM_NOTE, LEWM_POLICY
from planners.policy import PolicyConfig

# Each row: policy settings by name over the default policy. The first is LeWM's planner as released (its
# per-call time is the reference); then CEM budgets; then the default with its warm-started replans refined
# by fewer iterations (the previous plan is the amortised proposal: an episode's first plan runs 10).
QUALITY_SETTINGS = (
    LEWM_POLICY,
    {"samples": 300, "iterations": 30}, {"samples": 300, "iterations": 10}, {"samples": 100, "iterations": 30},
    {"samples": 100, "iterations": 10}, {"samples": 100, "iterations": 3},
    {"samples": 100, "iterations": 10, "warm_iterations": 3}, {"samples": 100, "iterations": 10, "warm_iterations": 2},
    {"samples": 100, "iterations": 10, "warm_iterations": 1},
)


def setting_label(policy: PolicyConfig, lewm: bool) -> str:
    """How a row of the curve reads: samples x iterations (warm-started ones), LeWM's planner named."""
    p = policy.plan
    label = f"{p.samples} x {p.iterations}" + (f" (warm {p.warm_iterations})" if p.warm_iterations else "")
    return f"LeWM's planner, {label}" if lewm else label


def run(checkpoint: str, device: str = "auto", settings=QUALITY_SETTINGS, episodes: int = 50,
        protocol: str = "reach25", seed: int = 0, data: str = "", split: str = "val") -> str:
    """Closed-loop success (latched and held) against planning time, for policy settings (``settings``: dicts
    of settings by name) on a trained model: the curve the planner's defaults are chosen from. Every setting
    runs the same episodes with the same per-episode noise keys; times are relative to the first row's per
    planning call. ``data`` as for ``wm eval``: the dataset the model was trained on unless given; ``split``
    the model's episodes they come from (val: the curve chooses settings, so it never runs on the test
    episodes results are reported on)."""
    setup = load_setup(checkpoint, data, episodes, device, split)
    search = PolicyConfig().plan
    lines = [f"Model `{checkpoint}`; {episodes} `{protocol}` episodes (seed {seed}) of {setup.split_note}, every "
             f"setting on the same episodes; CEM, horizon {search.horizon}, {search.cost} cost, the default policy "
             f"otherwise (rest candidate, subgoals) but for LeWM's planner ({LEWM_NOTE}); device "
             f"{setup.model.device}, torch threads {torch.get_num_threads()}.", ""]
    rows = []
    try:
        for overrides in settings:
            policy = apply_overrides(PolicyConfig(), overrides)
            label = setting_label(policy, overrides == LEWM_POLICY)
            rows.append((label, *world_model_rates(setup, policy, protocol, episodes, seed)))
    finally:
        setup.batch.close()
    base = rows[0]
    lines += [f"| setting | latched | held at end | ms per planning call ({episodes} problems) | ms per problem "
              f"| time per call vs the first row | planning per episode (s) |", "|---|---|---|---|---|---|---|"]
    for label, latched, held, call, episode in rows:
        lines.append(f"| {label} | {100 * latched:.0f}% | {100 * held:.0f}% | {1000 * call:.0f} | "
                     f"{1000 * call / episodes:.1f} | {call / base[3]:.3f}x | {episode:.2f} |")
    return "\n".join(lines)


def subgoal_cost(checkpoint: str, device: str = "auto", episodes: int = 50, protocols=("reach25", "uniform"),
                 seed: int = 0, data: str = "", split: str = "val") -> str:
    """What subgoals cost: an episode's planning time (every plan call, routing included) with and without
    them, on the same episodes, and the time ``load_policy`` takes from the model files alone."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

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
        for protocol in protocols:
            per = {on: world_model_rates(setup, apply_overrides(PolicyConfig(), {"subgoals.enabled": on}), protocol,
                                         episodes, seed) for on in (False, True)}
            for on in (False, True):
                latched, held, _, t = per[on]
                lines.append(f"| {protocol} | {'on' if on else 'off'} | {100 * latched:.0f}% | {100 * held:.0f}% | "
                             f"{t:.3f} | {t / per[False][3]:.2f}x |")
    finally:
        setup.batch.close()
    return "\n".join(lines)
