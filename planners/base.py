"""What every planner shares: the dynamics contract, batched scoring, noise streams, warm starts.

The model is anything with
``rollout(z_hist (M, h, D), a_hist (M, h-1, A) | None, actions (M, H, A)) -> (M, H, D)``.
A planner solves B independent problems at once, each with N candidate action sequences, and scores
all B*N candidates with ONE ``rollout`` call per iteration: no Python loop over problems or candidates.

Randomness: problem b draws its noise from its own counter-based stream (``planners.noise``), keyed
by ``keys[b]`` (by default from the planner's seed and b; an evaluation passes (seed, episode index)).
So problems of one batch get independent noise, and a problem draws exactly the same noise whether it
is planned alone or inside a batch, given the same key: the same plan up to the rounding of the batched
matrix products (bit for bit where the model's products round alike at both batch sizes).

The iteration loop has static shapes, holds no generator state and never reads a tensor on the host,
so ``compile=True`` can compile one iteration (CUDA graphs through ``mode="reduce-overhead"`` on CUDA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor

from planners.config import STREAMS_PER_CALL, PlannerConfig
from planners.costs import CostFn, get_cost
from planners.cuda_graph import CapturedSearch
from planners.noise import as_keys, problem_keys, standard_normal
from planners.refine import descend, keep_lower

@dataclass
class PlanResult:
    """The best action sequence found for each problem and its predicted cost."""

    actions: Tensor  # (B, H, A) in [-1, 1] (with clamp_samples off, as sampled: the policy clips what it plays)
    cost: Tensor  # (B,)


class Context(NamedTuple):
    """One planning call's inputs, the history already repeated once per candidate."""

    z_hist: Tensor  # (B*N, h, D)
    a_hist: Tensor | None  # (B*N, h-1, A)
    z_goal: Tensor  # (B, D)
    keys: Tensor  # (B,) int32: each problem's noise stream


def shift_plan(actions: Tensor, n_executed: int, fill: str = "zero") -> Tensor:
    """Warm start: drop the ``n_executed`` chunks already executed and pad the tail.

    The tail lies beyond the old horizon, so the old plan knows nothing about it; ``"zero"`` (default)
    pads with the same uninformed mean a cold start uses, ``"last"`` repeats the last planned chunk.
    Zero also suits a goal pose held at rest: repeating a last (often braking) chunk overshoots it.
    """
    if fill not in ("zero", "last"):
        raise ValueError(f"fill must be 'zero' or 'last', got {fill!r}")
    H = actions.shape[-2]
    n = min(max(int(n_executed), 0), H)
    pad = actions[..., -1:, :] if fill == "last" else torch.zeros_like(actions[..., -1:, :])  # (..., 1, A)
    return torch.cat([actions[..., n:, :], pad.expand(*actions.shape[:-2], n, actions.shape[-1])], dim=-2)


def take(cand: Tensor, idx: Tensor) -> Tensor:
    """Pick candidates per problem: ``cand (B, N, H, A)``, ``idx (B, K)`` -> ``(B, K, H, A)``."""
    return cand.gather(1, idx[:, :, None, None].expand(-1, -1, *cand.shape[2:]))


def keep_best(best_a: Tensor, best_c: Tensor, cand: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
    """Running best over iterations, branch-free (no host sync): best (B, H, A), (B,); cand (B, N, H, A).
    A candidate with a NaN cost is passed over; a problem whose candidates are all NaN offers NaN."""
    nan = cost.isnan()  # (B, N)
    c, i = cost.masked_fill(nan, float("inf")).min(dim=1)  # (B,), (B,)
    c = c.masked_fill(nan.all(dim=1), float("nan"))
    return keep_lower(best_a, best_c, take(cand, i[:, None])[:, 0], c)


class Planner:
    """Base class: validates inputs, keys the noise, scores candidates; subclasses define the search as
    ``initial_state`` + ``iteration`` (one batched rollout) + ``result``.

    ``cfg`` is a ``PlannerConfig`` (default: its defaults); ``action_dim`` (the chunk size A) is read from
    ``model.action_dim`` unless given.
    """

    kind = ""  # the ``PlannerConfig.planner`` this class is

    def __init__(self, model: Any, cfg: PlannerConfig | None = None, action_dim: int | None = None):
        cfg = cfg if cfg is not None else PlannerConfig(planner=self.kind or "cem")
        if self.kind and cfg.planner != self.kind:  # this class decides; its own checks of the shared settings run
            cfg = dataclasses.replace(cfg, planner=self.kind)
        self.model, self.cfg = model, cfg
        self.action_dim = action_dim if action_dim is not None else getattr(model, "action_dim", None)
        if self.action_dim is None:
            raise ValueError("pass action_dim or give the model an `action_dim` attribute")
        self.cost_fn: CostFn = get_cost(self.cfg.cost)
        self.steps_per_chunk = getattr(model, "frameskip", 1)  # a chunk holds this many env actions
        self._seed, self._calls = self.cfg.seed, 0
        self._step = self.iteration
        if self.cfg.compile:  # inside a captured whole plan, the iteration gets no CUDA graphs of its own
            self._step = compile_iteration(self.iteration, cuda_graphs=not self.cfg.cuda_graph)
        device = getattr(model, "device", None)
        if self.cfg.cuda_graph and device is not None and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graph captures CUDA graphs: it needs the model on CUDA, got {device}")
        self._search = CapturedSearch(self.search) if self.cfg.cuda_graph else self.search

    @property
    def latent_dim(self) -> int | None:
        """The size of the model's latents (``model.cfg.latent_dim``), None when the model does not say."""
        return getattr(getattr(self.model, "cfg", None), "latent_dim", None)

    def reset(self, seed: int | None = None) -> None:
        """Restart the noise streams (from ``seed`` if given, else from the current seed)."""
        self._seed = self._seed if seed is None else int(seed)
        self._calls = 0

    def default_keys(self, batch: int, device) -> Tensor:
        """Keys of problems 0..B-1 under the planner's seed."""
        return problem_keys(self._seed, range(batch), device)

    @torch.no_grad()
    def plan(
        self, z_hist: Tensor, z_goal: Tensor, a_hist: Tensor | None = None, init: Tensor | None = None,
        keys: Tensor | None = None,
    ) -> PlanResult:
        """Plan B problems: ``z_hist (B, h, D)``, ``z_goal (B, D)``, ``a_hist (B, h-1, A)`` (None when
        h == 1), ``init (B, H, A)`` a warm start (e.g. ``shift_plan`` of the previous plan) or None (zeros),
        ``keys (B,)`` int32 noise keys (``planners.noise.problem_keys``; a list of integers too; None: from
        the seed and the row). Shapes and the latent size are checked, not values (that would wait for the
        device): a problem with NaN latents gets a NaN cost, the others their own plans; a candidate whose
        cost is NaN is passed over.
        A warm-started plan runs ``warm_iterations`` iterations when that is set, else ``iterations``.

        Each call advances the noise streams, so an MPC loop gets fresh noise at every replan;
        ``reset`` restarts them.
        """
        for name, x in (("z_hist", z_hist), ("z_goal", z_goal), ("a_hist", a_hist), ("init", init)):
            if x is not None and not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
        if z_hist.ndim != 3 or not z_hist.is_floating_point() or not len(z_hist):
            raise ValueError(f"z_hist must be latents (B, h, D) of floats, B >= 1, got {z_hist.dtype} "
                             f"{tuple(z_hist.shape)}")
        B, h, D = z_hist.shape
        H, A = self.cfg.horizon, self.action_dim
        if D != (self.latent_dim or D):
            raise ValueError(f"z_hist holds {D}-d latents; this model's are {self.latent_dim}-d")
        z_hist, z_goal = z_hist.float(), z_goal.float()  # the model's dtype (float64 latents, say, are cast)
        a_hist, init = (None if x is None else x.float() for x in (a_hist, init))
        if z_goal.shape != (B, D):
            raise ValueError(f"z_goal must be {(B, D)}, got {tuple(z_goal.shape)}")
        if (a_hist is None) != (h == 1) or (a_hist is not None and a_hist.shape != (B, h - 1, A)):
            want, got = "None" if h == 1 else (B, h - 1, A), None if a_hist is None else tuple(a_hist.shape)
            raise ValueError(f"a_hist must be {want} for a history of {h}, got {got}")
        if init is not None and init.shape != (B, H, A):
            raise ValueError(f"init must be {(B, H, A)}, got {tuple(init.shape)}")
        keys = self.default_keys(B, z_hist.device) if keys is None else as_keys(keys, B, z_hist.device)
        mean = z_hist.new_zeros(B, H, A) if init is None else init.to(z_hist).clamp(-1, 1)  # (B, H, A)
        # A warm start already lies near a good plan: it may be refined with fewer iterations.
        iterations = self.cfg.warm_iterations if init is not None and self.cfg.warm_iterations else self.cfg.iterations
        # One stream per iteration of this call, built on the device without a host copy.
        streams = torch.arange(iterations, device=z_hist.device, dtype=torch.int32) + self._calls * STREAMS_PER_CALL
        self._calls += 1
        return self._search(z_hist, a_hist, z_goal, mean, keys, streams)

    def search(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor, keys: Tensor,
               streams: Tensor) -> PlanResult:
        """The whole search of one ``plan`` call: pure tensor code (``cuda_graph`` captures it), its model
        calls under bf16 autocast when ``bf16`` (the model keeps its latents float32 under autocast). A
        captured search runs without autocast's cache of cast weights, as CUDA graphs require: the cache is
        freed when the context exits, and a replay would read the freed copies."""
        with torch.autocast(z_hist.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16,
                            cache_enabled=not self.cfg.cuda_graph):
            result = self.optimize(z_hist, a_hist, z_goal, mean, keys, streams)
            if self.cfg.grad_steps:
                result = self.refine(z_hist, a_hist, z_goal, result)
            if self.cfg.rest and self.cfg.rest_margin:
                result = self.prefer_rest(z_hist, a_hist, z_goal, result)
        return result

    def refine(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, result: PlanResult) -> PlanResult:
        """The search's plan refined by ``grad_steps`` gradient steps on its actions (``planners.refine``):
        a rollout and its backward pass of B rows per step."""
        def cost_of(actions: Tensor) -> Tensor:  # (B, H, A) -> (B,)
            return self.plan_cost(self.model.rollout(z_hist, a_hist, actions)[:, None], z_goal, actions[:, None])[:, 0]
        return PlanResult(*descend(cost_of, result.actions, result.cost, self.cfg.grad_steps, self.cfg.grad_lr))

    def prefer_rest(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, result: PlanResult) -> PlanResult:
        """The rest sequence instead of the plan found when its predicted cost is within ``rest_margin``
        (relative) of the plan's: near a held goal, a move the model rates only a little better is more
        likely its error than a real gain (one more rollout of B rows)."""
        rest = torch.zeros_like(result.actions)
        cost = self.plan_cost(self.model.rollout(z_hist, a_hist, rest)[:, None], z_goal, rest[:, None])[:, 0]
        take_rest = cost <= result.cost + self.cfg.rest_margin * result.cost.abs()  # (B,); a cost may be negative
        return PlanResult(torch.where(take_rest[:, None, None], rest, result.actions),
                          torch.where(take_rest, cost, result.cost))

    def optimize(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor, keys: Tensor,
                 streams: Tensor) -> PlanResult:
        """The search from the initial mean ``(B, H, A)``: one ``iteration`` per stream ``(iterations,)``."""
        ctx = self.context(z_hist, a_hist, z_goal, keys)
        state = self.initial_state(mean)
        for stream in streams:  # (iterations,): one per iteration
            state = self._step(ctx, stream, *state)
        return self.finish(z_hist, a_hist, z_goal, *self.result(state))

    def initial_state(self, mean: Tensor) -> tuple[Tensor, ...]:
        """The search state before the first iteration, from the initial mean ``(B, H, A)``."""
        raise NotImplementedError

    def iteration(self, ctx: Context, stream: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """One refinement: sample, score with one batched rollout, update. Pure tensor code."""
        raise NotImplementedError

    def result(self, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """(final mean (B, H, A), best candidate seen (B, H, A), its cost (B,)) of a search state."""
        raise NotImplementedError

    def finish(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, mean: Tensor, best_a: Tensor,
               best_c: Tensor) -> PlanResult:
        """Score the final mean too (one rollout of B rows) and return the better of it and the best
        candidate seen. The mean averages noise away (it wins on smooth costs); the best candidate
        guards against a mean that falls between two good modes. Both costs are exact.
        """
        cost = self.plan_cost(self.model.rollout(z_hist, a_hist, mean)[:, None], z_goal, mean[:, None])  # (B, 1)
        return PlanResult(*keep_best(best_a, best_c, mean[:, None], cost))

    def context(self, z_hist: Tensor, a_hist: Tensor | None, z_goal: Tensor, keys: Tensor) -> Context:
        """Repeat each problem's history once per candidate, once per ``plan`` call."""
        n = self.cfg.samples
        a = None if a_hist is None else repeat(a_hist, "b h a -> (b n) h a", n=n)  # (B*N, h-1, A)
        return Context(repeat(z_hist, "b h d -> (b n) h d", n=n), a, z_goal, keys)  # (B*N, h, D)

    def score(self, ctx: Context, cand: Tensor) -> Tensor:
        """Costs of candidates ``(B, N, H, A)`` -> ``(B, N)`` with one batched ``rollout`` call."""
        z = self.model.rollout(ctx.z_hist, ctx.a_hist, rearrange(cand, "b n h a -> (b n) h a"))  # (B*N, H, D)
        return self.plan_cost(rearrange(z, "(b n) h d -> b n h d", b=cand.shape[0]), ctx.z_goal, cand)  # (B, N)

    def plan_cost(self, z_pred: Tensor, z_goal: Tensor, actions: Tensor) -> Tensor:
        """The cost of candidates: the latent cost of their predictions ``(B, N, H, D)``, plus
        ``action_cost`` times their summed squared actions ``(B, N, H, A)``, plus ``stay_cost`` times the
        squared latent change over the last chunk (motion still going on at the plan's end): -> ``(B, N)``."""
        cost = self.cost_fn(z_pred, z_goal)
        if cost.shape != z_pred.shape[:2]:  # a cost of one's own of another shape would fail deep in the search
            raise ValueError(f"the cost must give one value per candidate, {tuple(z_pred.shape[:2])} (B, N) for "
                             f"z_pred {tuple(z_pred.shape)}, got {tuple(cost.shape)}")
        if self.cfg.action_cost:
            cost = cost + self.cfg.action_cost * actions.square().sum((-1, -2))
        if self.cfg.stay_cost:
            cost = cost + self.cfg.stay_cost * (z_pred[:, :, -1] - z_pred[:, :, -2]).square().sum(-1)
        return cost

    def fixed_candidates(self, mean: Tensor) -> Tensor:
        """Candidates scored in every iteration besides the samples: the rest sequence (all-zero actions)
        when ``cfg.rest``, else none: (B, 0 or 1, H, A)."""
        return mean.new_zeros(mean.shape[0], int(self.cfg.rest), *mean.shape[1:])

    def sample(self, ctx: Context, stream: Tensor, mean: Tensor, std: Tensor, n: int) -> Tensor:
        """``n`` Gaussian candidates around ``mean (B, H, A)`` with ``std (B, H, A)``, clamped to [-1, 1]
        (unless ``clamp_samples`` is off); problem b's noise comes from its own stream ``(ctx.keys[b], stream)``."""
        eps = standard_normal(ctx.keys, stream, (n, *mean.shape[1:]), mean.dtype)  # (B, n, H, A)
        if self.cfg.noise_beta:
            eps = coloured(eps, self.cfg.noise_beta, self.steps_per_chunk)
        cand = mean[:, None] + std[:, None] * eps  # (B, n, H, A)
        return cand.clamp(-1, 1) if self.cfg.clamp_samples else cand


def coloured(eps: Tensor, beta: float, steps_per_chunk: int) -> Tensor:
    """White noise (B, n, H, A) made temporally correlated along the plan's env steps (H chunks of
    ``steps_per_chunk`` actions): power spectrum ~ 1 / f^beta (1: pink, 2: red, as iCEM; the constant
    component weighted as the lowest frequency), scaled by the filter's gain back to unit variance in
    expectation. Low frequencies dominate, so a candidate keeps pushing the same way for a while instead of
    dithering; a sequence's own mean is kept (it is what moves where the plan ends)."""
    B, n, H, A = eps.shape
    x = rearrange(eps, "b n h (k d) -> b n d (h k)", k=steps_per_chunk)  # (B, n, dims, T)
    T = x.shape[-1]
    if T < 2:  # one env step: nothing to correlate (and no spread to scale by)
        return eps
    freq = torch.fft.rfftfreq(T, device=eps.device, dtype=eps.dtype)  # (T//2 + 1,)
    scale = torch.where(freq > 0, freq, freq[1] if T > 1 else freq.new_ones(())).pow(-beta / 2)
    x = torch.fft.irfft(torch.fft.rfft(x, dim=-1) * scale, n=T, dim=-1)
    bins = torch.full_like(scale, 2.0)  # each rfft bin stands for two of the full spectrum, but 0 (and T/2)
    bins[0] = 1
    if T % 2 == 0:
        bins[-1] = 1
    x = x / ((bins * scale.square()).sum() / T).sqrt()  # the variance a unit white input comes out with
    return rearrange(x, "b n d (h k) -> b n h (k d)", k=steps_per_chunk)


COMPILE_BACKEND = "inductor"  # the tests' fast check of graph capture swaps in "aot_eager"


def compile_iteration(fn, cuda_graphs: bool = True):
    """``torch.compile`` of a planner iteration: CUDA graphs (``reduce-overhead``) when it runs on CUDA and
    ``cuda_graphs`` (off where the whole plan is captured as one graph: ``planners.cuda_graph``).

    ``fullgraph=True``: a graph break (a host sync, data-dependent Python control flow) is an error, not
    a silent slowdown. One graph serves every iteration of every call with the same shapes; other
    shapes (another batch size or horizon) compile once more.
    """
    compiled = {}

    def step(ctx: Context, stream: Tensor, *state: Tensor):
        graphs = ctx.z_goal.is_cuda and cuda_graphs
        mode = "reduce-overhead" if graphs else "default"
        if mode not in compiled:
            options = {"mode": mode} if COMPILE_BACKEND == "inductor" else {}
            compiled[mode] = torch.compile(fn, backend=COMPILE_BACKEND, fullgraph=True, dynamic=False, **options)
        out = compiled[mode](ctx, stream, *state)
        # A CUDA graph's outputs live in its static memory, which its next replay overwrites: the
        # state fed back into it is copied out first (a few small tensors).
        return tuple(t.clone() for t in out) if graphs else out

    return step
