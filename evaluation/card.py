"""What a model file is, for whoever receives one: ``wm info``.

A few Markdown lines read from ``model.json`` and ``model.pt`` (never unpickled): the architecture, the
training run and its data, how it is planned, whether it plans alone, what training measured at the end,
and what made it.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.config import as_options
from common.provenance import provenance_line
from common.text import counted
from envs.storage import collect_command
from planners.policy import policy_config, recorded_planner
from worldmodel.datasplit import locate_data
from worldmodel.graph import held_graph_config, saved_graph
from worldmodel.model import WorldModel, read_model_meta


def model_card(checkpoint: str | Path) -> str:
    """The card of ``checkpoint`` (a ``model.pt``); a ``CheckpointError`` naming the file if it does not load."""
    model = WorldModel.load(checkpoint, "cpu")  # checks the file and its weights against the config, as planning would
    meta = read_model_meta(checkpoint)
    cfg, train = model.cfg, meta.get("train_config", {})
    enc, pred = cfg.encoder, cfg.predictor
    backbone = (f"conv encoder ({'-'.join(str(enc.conv_channels * 2**i) for i in range(enc.conv_stages))} channels)"
                if enc.kind == "conv" else f"ViT encoder (width {enc.vit_width}, depth {enc.vit_depth}, patch "
                                           f"{enc.patch_size})")
    parameters = sum(p.numel() for p in model.parameters())
    lines = [f"# `{checkpoint}`", "",
             f"- **Model**: a world model of `{cfg.env}` from {cfg.image_size} px frames: {backbone} to a "
             f"{cfg.latent_dim}-d latent, {pred.kind} predictor ({pred.hidden} x {pred.depth}), history "
             f"{cfg.history}, frameskip {cfg.frameskip}; {parameters / 1e6:.2f} M parameters."]
    if "step" in meta:
        how = [f"`--preset {train['preset']}`"] * ("preset" in train) + [f"seed {train['seed']}"] * ("seed" in train)
        how = f" ({', '.join(how)})" if how else ""
        planned, run = train.get("steps"), Path(checkpoint).parent
        world, batch = meta.get("world_size", 1), train.get("batch_size")  # torchrun's processes resume it
        launch = f"torchrun --nproc_per_node {world} -m wm" if world > 1 else "wm"
        resume = (f" (`{launch} train --out {run} --resume` continues it from the `checkpoint.pt` beside it)"
                  if (run / "checkpoint.pt").is_file() else "")
        unfinished = (f" of the {planned:,} asked for: unfinished{resume}"
                      if isinstance(planned, int) and planned > meta["step"] else "")
        processes = (f", on {world} processes" + (f" (a global batch of {world * batch:,} windows)"
                                                   if isinstance(batch, int) else "") if world > 1 else "")
        steps = counted(meta["step"], "step", fmt=",")
        lines.append(f"- **Training**: {steps}{unfinished}{how}{processes}{_changes(meta)}.")
    data = meta.get("data")
    if data:
        found, tried, not_it = locate_data(meta, checkpoint)
        also = "".join(f"; `{path}` {why}" for path, why in not_it.items())
        where = (f"found at `{os.path.normpath(found)}`" if found else
                 f"not found (looked at {', '.join(f'`{path}`' for path in tried)}{also}; the commands that read "
                 f"it take `--data`)")
        splits = ", ".join(f"{len(data.get(s, []))} {s}" for s in ("train", "val", "test"))
        recording = data.get("recording")
        command = collect_command(recording) if isinstance(recording, dict) else None
        kind = f"; its frames as `{command}` records them" if command else ""
        episodes = counted(data.get("episodes"), "episode")
        lines.append(f"- **Data**: `{data.get('path')}`, {where}: {episodes} ({splits}){kind}.")
    planner = recorded_planner(checkpoint)
    lines.append("- **Planned with**: " + (f"`{as_options(planner)}` over the default planner, as the model file "
                                           f"records (chosen by its training or by `wm export`)" if planner else
                                           "the default planner") + "; the options typed to `wm eval` or `wm demo` "
                                                                    "override it.")
    graph = model.extras.get("graph")
    if graph and saved_graph(model, policy_config(checkpoint).subgoals.graph) is None:
        lines.append(f"- **Subgoal graph**: saved in the model file, but built with other settings "
                     f"({_graph_config(held_graph_config(model))}) than it is planned with: "
                     f"planning with subgoals builds it again from the training data (`wm export` with those "
                     f"settings makes the file plan with it).")
    else:
        lines.append(f"- **Subgoal graph**: saved in the model file ({len(graph['nodes']):,} training frames, "
                     f"{len(graph['src']):,} links): `model.pt` and `model.json` plan alone." if graph else
                     "- **Subgoal graph**: not saved; it is built from the training data when the model is first "
                     "planned with (`wm export` saves it).")
    lines += _measured(meta.get("metrics", {}))
    if isinstance(meta.get("provenance"), dict):
        lines += ["", provenance_line(meta["provenance"])]
    return "\n".join(lines) + "\n"


def _changes(meta: dict) -> str:
    """The settings a resumed run changed (its history's ``changed``: the way back from a divergence), by step:
    what made the model is otherwise only its last command, ``--resume`` with the new values."""
    said = []
    for entry in meta.get("history", []):
        changed = entry.get("changed") if isinstance(entry, dict) else None
        if not isinstance(changed, dict) or not all(isinstance(v, list) and len(v) == 2 for v in changed.values()):
            continue
        said.append(f"; from step {entry.get('step')} with `{as_options({k: v[1] for k, v in changed.items()})}` "
                    f"(before: `{as_options({k: v[0] for k, v in changed.items()})}`)")
    return "".join(said)


def _graph_config(config: dict) -> str:
    """How a saved graph was built, as the planner's options spell it."""
    return ", ".join(f"`--subgoals.{k.replace('_', '-')} {v}`" for k, v in config.items()) or "unrecorded"


def _measured(metrics: dict) -> list[str]:
    """What training measured at its end, on validation episodes."""
    said = []
    if "val" in metrics:
        said.append(f"prediction loss {metrics['val']['prediction_loss']:.4f}")
    if "joints_mean" in metrics.get("probe", {}):
        said.append(f"linear probe R^2 of the joint angles {metrics['probe']['joints_mean']:.3f}")
    loop = metrics.get("closed_loop", {})
    if "reach25_latched" in loop:
        said.append(f"`reach25` latched {100 * loop['reach25_latched']:.0f}% / held {100 * loop['reach25_held']:.0f}% "
                    f"(a small closed-loop check)")
    return [f"- **At the end of training**, on validation episodes: {'; '.join(said)}."] if said else []
