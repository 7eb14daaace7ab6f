"""``wm bench --what plan-quality``: closed-loop success against planning time, the curve the planner's
defaults are chosen from."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.timing import absolute_shown, alternating, markdown_table, paired_ratio
from common.config import apply_overrides, as_options, model_paths
from common.text import counted
from evaluation.evaluate import load_setup, world_model_records
from evaluation.protocols import LEWM_NOTE, LEWM_POLICY, protocol_named
from evaluation.stats import format_p, paired_counts, sign_test
from planners.policy import PolicyConfig, recorded_planner

# Each row: policy settings by name over the default policy. The first is LeWM's planner as released (its
# per-call time is the reference); then the default (a small CEM refined by gradient steps, red noise); the
# same with white noise, as it was before; the same CEM without gradient steps; the full CEM the default
# replaced, without and with gradient steps; and budgets of a third of that CEM's rollouts without them.
QUALITY_SETTINGS = (
    LEWM_POLICY, {},
    {"noise_beta": 0.0}, {"grad_steps": 0},
    {"samples": 100, "iterations": 10, "grad_steps": 0}, {"samples": 100, "iterations": 10},
    {"samples": 50, "iterations": 6, "grad_steps": 0}, {"samples": 100, "iterations": 3, "grad_steps": 0},
)


def check_planner_free(protocols) -> None:
    """A ``ValueError`` for protocols that fix the planner (``lewm``, ``lewm-history``: LeWM's as released):
    every setting of a planning benchmark would plan alike there, under its own label."""
    fixed = [name for name in protocols if protocol_named(name).policy]
    if fixed:
        raise ValueError(f"--protocol {', '.join(fixed)}: fixes its planner, so every setting compared would plan "
                         f"alike; the planning benchmarks take protocols that leave it free (reach25, reach50, "
                         f"uniform, reachK, lewm-mpc)")


def setting_label(policy: PolicyConfig, lewm: bool) -> str:
    """How a row of the curve reads: samples x iterations (warm-started ones, bf16, noise other than the
    default's), LeWM's planner named."""
    p = policy.plan
    extras = [f"warm {p.warm_iterations}"] * bool(p.warm_iterations) + ["bf16"] * p.bf16
    if p.noise_beta != PolicyConfig().plan.noise_beta and not lewm:  # LeWM's note says its noise
        extras.append("white noise" if p.noise_beta == 0 else f"noise beta {p.noise_beta:g}")
    label = p.budget() + (f" ({', '.join(extras)})" if extras else "")
    return f"LeWM's planner, {label}" if lewm else label


def run(checkpoint: str, device: str = "auto", settings=QUALITY_SETTINGS, episodes: int = 50,
        protocols: tuple[str, ...] = ("reach25",), seed: int = 0, data: str = "", split: str = "val") -> str:
    """Closed-loop success (latched and held) against planning time, for policy settings (``settings``: dicts
    of settings by name) on trained models: the curve the planner's defaults are chosen from.

    ``checkpoint`` is one model or several, comma-separated: their episodes are pooled, so a choice rests on
    more episodes and more than one training run. Every setting runs the same episodes (``episodes`` per
    model and protocol) with the same per-episode noise keys, so each is compared with the default policy
    episode by episode (held better / worse, and a two-sided sign test). Times are relative to the first
    row's per planning call. ``data`` as for ``wm eval``: the dataset each model was trained on unless
    given; ``split`` the models' episodes they come from (val: the curve chooses settings, so it never runs
    on the test episodes results are reported on)."""
    check_planner_free(protocols)
    checkpoints = model_paths(checkpoint)
    policies = [apply_overrides(PolicyConfig(), overrides) for overrides in settings]
    labels = [setting_label(p, overrides == LEWM_POLICY) for p, overrides in zip(policies, settings)]
    reference = next((i for i, p in enumerate(policies) if p == PolicyConfig()), None)  # the default policy
    batches = [[] for _ in settings]  # per setting: the records of each (model, protocol), in one order
    notes = []
    for model_path in checkpoints:
        setup = load_setup(model_path, data, episodes, device, split)
        notes.append(setup.split_note)
        device = str(setup.model.device)  # resolved, for the report
        try:
            for protocol in protocols:
                for i, policy in enumerate(policies):
                    batches[i].append(world_model_records(setup, policy, protocol, episodes, seed))
        finally:
            setup.batch.close()
    search = PolicyConfig().plan
    where = notes[0] if len(notes) == 1 else f"the {split} episodes of each of {len(notes)} models"
    lines = [f"Model(s) {', '.join(f'`{c}`' for c in checkpoints)}; {counted(episodes, 'episode')} per model and "
             f"protocol (seed {seed}) of {where}, every setting on the same episodes; CEM, horizon {search.horizon}, "
             f"{search.cost} cost, the default policy otherwise (rest candidate, subgoals) but for LeWM's planner "
             f"({LEWM_NOTE}); device {device}, torch threads {torch.get_num_threads()}.", ""]
    call_s = [float(np.mean([b[0]["plan_time_per_call_s"] for b in batch])) for batch in batches]
    episode_s = [float(np.mean([b[0]["plan_time_per_episode_s"] for b in batch])) for batch in batches]
    rows = []
    for i, batch in enumerate(batches):
        cells = []
        for k, protocol in enumerate(protocols):
            records = [r for b in batch[k::len(protocols)] for r in b]
            cells.append(f"{_percent(records, 'success')} / {_percent(records, 'held')}")
        vs = "-"
        if reference is not None and i != reference:
            mine = [r["held"] for b in batch for r in b]
            ref = [r["held"] for b in batches[reference] for r in b]
            better, worse = paired_counts(mine, ref)
            vs = f"{better} / {worse} ({format_p(sign_test(better, worse))})"
        rows.append([labels[i], *cells, vs, f"{1000 * call_s[i]:.0f}", f"{1000 * call_s[i] / episodes:.1f}",
                     f"{call_s[i] / call_s[0]:.3f}x", f"{episode_s[i]:.2f}", f"{episode_s[i] / episode_s[0]:.2f}x"])
    lines += markdown_table(
        [("setting", False), *((f"{p}: latched / held", False) for p in protocols),
         ("held vs the default: better / worse (sign test p)", False),
         (f"ms per planning call ({episodes} problems)", True), ("ms per problem", True),
         ("time per call vs the first row", False), ("planning per episode (s)", True),
         ("planning per episode vs the first row", False)], rows, absolute_shown(torch.device(device)))
    return "\n".join(lines)


def _percent(records: list[dict], key: str) -> str:
    return f"{100 * np.mean([r[key] for r in records]):.1f}%"


def subgoal_cost(checkpoint: str, device: str = "auto", episodes: int = 50, protocols=("reach25", "uniform"),
                 seed: int = 0, data: str = "", split: str = "val", repeats: int = 3) -> str:
    """What subgoals cost: an episode's planning time (every plan call, routing included) with and without
    them, on the same episodes, planned as the model file records, and the time ``load_policy`` takes from
    the model files alone.

    Each setting runs ``repeats`` times, alternating (``benchmarks.timing``): the ratio is the median over
    pairs of runs adjacent in time, which share the machine's drift. The subgoal code's own time (routing
    when an episode starts, cold, finding the waypoint at each planning call) is timed within the same runs,
    and the plans in which an arm strayed beyond the paths solved for it are counted (none is the rule)."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from planners import subgoals
    from planners.policy import load_policy

    if repeats < 1:  # before any work
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    check_planner_free(protocols)

    def load_time(path: Path, with_graph: bool) -> float:
        start = time.perf_counter()
        load_policy(path, device, **({} if with_graph else {"subgoals.enabled": False}))
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:  # the model files alone, no dataset beside them
        model_file = Path(tmp) / "model.pt"
        shutil.copy(checkpoint, model_file)
        shutil.copy(Path(checkpoint).with_suffix(".json"), model_file.with_suffix(".json"))
        load_policy(model_file, device)  # warm (imports, allocator)
        loads = alternating(lambda: load_time(model_file, True), lambda: load_time(model_file, False), repeats)
    setup = load_setup(checkpoint, data, episodes, device, split)
    recorded = recorded_planner(checkpoint)  # read once: every run plans so
    absolute = absolute_shown(setup.model.device)
    seconds = f"{np.median(loads[0]):.2f} s, " if absolute else ""
    lines = [f"`load_policy` from `model.pt` + `model.json` alone, subgoal graph included: {seconds}"
             f"{paired_ratio(*loads)} of the time without the graph ({counted(repeats, 'alternating load')} of "
             f"each).", "",
             f"{counted(repeats, 'run')} of each setting, alternating (off, on, on, off, ...); "
             f"{'times are the median (min-max) over runs, ' if absolute else ''}the ratio the median (min-max) over "
             f"the {counted(repeats, 'pair')} of runs adjacent in time (one pair: its ratio alone). "
             f"Planned as the model file records: {as_options(recorded) or 'the default planner'}.", ""]
    rows = []
    try:
        for protocol in protocols:
            def run_setting(on: bool, protocol=protocol) -> list[dict]:
                subgoals.forget_routes()  # every run routes its goals from scratch, as a fresh policy does
                policy = apply_overrides(PolicyConfig(), {**recorded, "subgoals.enabled": on})
                return world_model_records(setup, policy, protocol, episodes, seed)

            runs = dict(zip((False, True), alternating(lambda: run_setting(False), lambda: run_setting(True), repeats)))
            per_episode = {on: np.array([rec[0]["plan_time_per_episode_s"] for rec in runs[on]]) for on in runs}
            for on in (False, True):
                records = [x for rec in runs[on] for x in rec]
                t = per_episode[on]
                own = np.array([(rec[0]["route_time_batch_s"] + rec[0]["waypoint_time_batch_s"]) / len(rec)
                                for rec in runs[on]])
                strays = sum(rec[0]["route_strays_batch"] for rec in runs[on])
                ratio = paired_ratio(per_episode[True], per_episode[False]) if on else "1.00x"
                rows.append([protocol, "on" if on else "off", _percent(records, "success"), _percent(records, "held"),
                             f"{np.median(t):.3f} ({t.min():.3f}-{t.max():.3f})", ratio,
                             f"{np.median(own):.4f}" if on else "-", f"{100 * np.median(own / t):.1f}%" if on else "-",
                             str(strays) if on else "-"])
    finally:
        setup.batch.close()
    lines += markdown_table([("protocol", False), ("subgoals", False), ("latched", False), ("held", False),
                             ("planning per episode (s, routing included)", True), ("with / without", False),
                             ("subgoal code per episode (s: routing + waypoints)", True),
                             ("its share of planning", False),
                             ("plans with an arm beyond the solved paths, all runs", False)], rows, absolute)
    return "\n".join(lines)
