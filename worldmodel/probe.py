"""Linear probes: how much of the true state a linear map recovers from the latent.

The LeJEPA theory says an isotropic-Gaussian embedding trained to predict keeps the state linearly
identifiable; R^2 of a ridge regression from latent to state, on held-out episodes, is the check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from worldmodel.latents import encode_episodes, every

PROBE_TARGETS = ("cos_shoulder", "sin_shoulder", "cos_wrist", "sin_wrist", "finger_x", "finger_y")
JOINT_TARGETS = PROBE_TARGETS[:4]
PROBE_STATES = ("qpos", "finger")  # the true states the targets are computed from


def state_targets(qpos: np.ndarray, finger: np.ndarray) -> np.ndarray:
    """(N, 2) joint angles and (N, 2) fingertip xy -> (N, 6) probe targets (angles as cos/sin)."""
    return np.stack([np.cos(qpos[:, 0]), np.sin(qpos[:, 0]), np.cos(qpos[:, 1]), np.sin(qpos[:, 1]),
                     finger[:, 0], finger[:, 1]], 1)


def fit_ridge(x: Tensor, y: Tensor, ridge: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Closed-form ridge on standardised inputs: returns (W (D, K), b (K,)) with y ~ x @ W + b."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    xs = (x - mu) / sd
    ym = y.mean(0)
    gram = xs.T @ xs + ridge * len(xs) * torch.eye(xs.shape[1], dtype=xs.dtype)
    w = torch.linalg.solve(gram, xs.T @ (y - ym)) / sd[:, None]  # undo the standardisation
    return w, ym - mu @ w


def r2_score(y: Tensor, y_hat: Tensor) -> Tensor:
    """Coefficient of determination per column: 1 - SS_res / SS_tot."""
    y, y_hat = y.double(), y_hat.double()
    ss_res = ((y - y_hat) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return 1 - ss_res / ss_tot


def probe_r2(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, ridge: float = 1e-3) -> dict:
    """Fit on train, R^2 per target on test, plus the mean over the joint targets."""
    w, b = fit_ridge(z_train, y_train, ridge)
    r2 = r2_score(y_test, z_test.double() @ w + b)
    out = {name: float(v) for name, v in zip(PROBE_TARGETS, r2)}
    out["joints_mean"] = float(np.mean([out[k] for k in JOINT_TARGETS]))
    return out


def encode_frames(model, store, episode_ids, stride: int = 5, batch_size: int = 512):
    """Latents (N, D) on the CPU and probe targets (N, 6) of every ``stride``-th frame of the given episodes."""
    encoded = encode_episodes(model, store, episode_ids, every(stride), batch_size)
    targets = [state_targets(store.states(i)["qpos"][t], store.states(i)["finger"][t])
               for i, t in _by_episode(encoded)]
    return encoded["z"].cpu(), torch.from_numpy(np.concatenate(targets))


def _by_episode(encoded: dict):
    """(episode, positions) of each episode of ``encode_episodes``' output, in order."""
    ends = np.cumsum(encoded["counts"])
    return [(int(encoded["episode"][end - 1]), encoded["t"][end - n:end]) for n, end in zip(encoded["counts"], ends)]


def run_probe(model, store, train_ids, test_ids, stride: int = 5) -> dict:
    """R^2 of the probe from ``model``'s latents, trained on ``train_ids``, scored on ``test_ids``."""
    z_tr, y_tr = encode_frames(model, store, train_ids, stride)
    z_te, y_te = encode_frames(model, store, test_ids, stride)
    return probe_r2(z_tr, y_tr, z_te, y_te)


def probe_checkpoint(checkpoint: str, data: str = "", device: str = "auto", out: str = "", split: str = "test") -> dict:
    """``wm probe``: R^2 of the trained encoder next to the same architecture untrained (the floor), fit on
    the episodes the model trained on and scored on held-out ones (``worldmodel.datasplit``). Writes
    ``probe.json`` and ``probe.md`` (beside the checkpoint unless ``out``)."""
    from worldmodel.datasplit import load_with_data, probe_split
    from common.files import atomic_write_json

    trained, meta, store, data = load_with_data(checkpoint, data, device)
    store.require_states(PROBE_STATES, "linear probes")
    fit, test, note = probe_split(store, meta, split)
    print(f"probing {checkpoint} (step {meta.get('step')}) on {data}: fit on {len(fit)} episodes, scored on "
          f"{len(test)}: {note}", flush=True)
    torch.manual_seed(0)
    untrained = type(trained)(trained.cfg).to(trained.device)  # same architecture, random weights: the floor
    rows = {}
    for label, model in (("trained", trained), ("untrained (floor)", untrained)):
        print(f"  encoding frames with the {label} encoder", flush=True)
        rows[label] = run_probe(model, store, fit, test)
    names = [*PROBE_TARGETS, "joints_mean"]
    md = ["| encoder | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    md += [f"| {label} | " + " | ".join(f"{r2[n]:.3f}" for n in names) + " |" for label, r2 in rows.items()]
    markdown = (f"Linear-probe R^2 of `{checkpoint}` (step {meta.get('step')}) on `{data}`; fit on {len(fit)} "
                f"episodes, scored on {len(test)} ({note}).\n\n" + "\n".join(md) + "\n")
    where = Path(out) if out else Path(checkpoint).parent
    where.mkdir(parents=True, exist_ok=True)
    atomic_write_json(where / "probe.json", {"checkpoint": str(checkpoint), "step": meta.get("step"), "data": str(data),
                                             "fit_episodes": len(fit), "scored_episodes": len(test), "split": note,
                                             "r2": rows})
    (where / "probe.md").write_text(markdown)
    return {"r2": rows, "markdown": markdown, "json": str(where / "probe.json"), "md": str(where / "probe.md")}
