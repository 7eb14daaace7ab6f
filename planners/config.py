"""A planner's settings, in one shape: what every planner has, and each planner's own, nested by name.

``PlannerConfig`` is what a planner takes (``CEMPlanner(model, cfg)``). Settings are reached by the
names the command line uses: ``samples``, ``iterations``, ``cem.elites``, ``mppi.temperature``. Adding
a CEM option is one field in ``CEMConfig`` (with its check) and its use in ``CEMPlanner``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.config import check_types, nested, option, typed_options
from planners.costs import COSTS

PLANNER_KINDS = ("cem", "mppi")


def other_planners_settings(planner: str) -> tuple[str, ...]:
    """The prefixes of the settings that only planners other than ``planner`` read (``"mppi."`` for cem)."""
    return tuple(f"{kind}." for kind in PLANNER_KINDS if kind != planner)


STREAMS_PER_CALL = 4096  # noise streams a plan call may use (one per iteration): iterations must stay below


@dataclass
class CEMConfig:
    """What only CEM has."""

    elites: int | None = option(None, "best candidates the Gaussian is refit to (default: a tenth of the samples, "
                                      "at least 2)")
    init_std: float = option(1.0, "initial std of the Gaussian (actions lie in [-1, 1])")
    min_std: float = option(0.05, "floor of the std, so the search never freezes")
    momentum: float = option(0.1, "weight of the old mean and std in each refit (0: jump to the elites' fit)")
    keep_elites: bool = option(True, "carry the top elites into the next iteration's candidates (else the "
                                     "current mean is the first candidate, as in LeWM)")
    keep_fraction: float = option(0.3, "share of the elites carried (at least 1); carrying all slows convergence")
    plan_from: str = option("best", "the plan returned: the better of the best candidate seen and the final "
                                    "mean (best), or the final mean (mean, as LeWM)", choices=("best", "mean"))

    def __post_init__(self):
        check_types(self, "cem.")
        if not (self.init_std > 0 and self.min_std >= 0 and 0 <= self.momentum < 1 and 0 < self.keep_fraction <= 1):
            raise ValueError(f"need cem.init_std > 0, cem.min_std >= 0, 0 <= cem.momentum < 1 and "
                             f"0 < cem.keep_fraction <= 1, got {self}")
        if self.elites is not None and self.elites < 2:
            raise ValueError(f"cem.elites must be >= 2, got {self.elites}")

    def n_elites(self, samples: int) -> int:
        """``elites``, or a tenth of the samples (at least 2): 30 of 300."""
        return self.elites if self.elites is not None else max(2, round(samples / 10))

    def n_kept(self, samples: int) -> int:
        """How many elites are carried into the next iteration (fewer than ``samples``)."""
        if not self.keep_elites:
            return 0
        return min(max(1, round(self.keep_fraction * self.n_elites(samples))), samples - 1)

    def n_carry(self, samples: int) -> int:
        """Candidates carried into each iteration: the kept elites, or the current mean alone. The first
        iteration carries the initial (warm-start) mean in every slot, so every iteration has one shape."""
        return max(1, self.n_kept(samples))

    def check(self, p: "PlannerConfig") -> None:
        """What CEM needs of the shared settings."""
        if not 2 <= self.n_elites(p.samples) <= p.samples:
            raise ValueError(f"need 2 <= cem.elites <= samples, got cem.elites={self.n_elites(p.samples)}, "
                             f"samples={p.samples}")
        if p.samples < self.n_carry(p.samples) + int(p.rest) + 1:
            raise ValueError(f"samples ({p.samples}) must leave room for a fresh sample beside the carried ones")


@dataclass
class MPPIConfig:
    """What only MPPI has; ``samples`` x ``iterations`` is the same rollout budget as CEM's."""

    temperature: float = option(0.1, "softmax temperature on the costs; small: greedy, large: plain average")
    normalize: bool = option(True, "measure cost gaps in units of the median gap: temperature unitless")
    noise_std: float = option(0.5, "initial std of the perturbations (actions lie in [-1, 1])")
    adapt_std: bool = option(True, "refit the std to the weighted spread (else keep noise-std)")
    min_std: float = option(0.02, "floor of the adapted std")
    momentum: float = option(0.0, "weight of the old mean and std in each update")

    def __post_init__(self):
        check_types(self, "mppi.")
        if not (self.temperature > 0 and self.noise_std > 0 and self.min_std >= 0 and 0 <= self.momentum < 1):
            raise ValueError(f"need mppi.temperature > 0, mppi.noise_std > 0, mppi.min_std >= 0 and "
                             f"0 <= mppi.momentum < 1, got {self}")

    def check(self, p: "PlannerConfig") -> None:
        """What MPPI needs of the shared settings."""
        if p.samples < 2 + int(p.rest):
            raise ValueError(f"MPPI needs samples >= {2 + int(p.rest)}, got {p.samples}")


@dataclass
class PlannerConfig:
    """A planner: which one, the settings every planner has, and each planner's own."""

    planner: str = option("cem", "the search: cem or mppi", choices=PLANNER_KINDS)
    horizon: int = option(5, "planned action chunks H")
    samples: int = option(20, "candidate sequences N scored per iteration and problem")
    iterations: int = option(4, "refinement iterations, one batched rollout each")
    warm_iterations: int = option(0, "iterations of a plan that starts from the previous one (a warm start, as "
                                     "every replan of an episode but its first does), at most --iterations; "
                                     "0: iterations")
    grad_steps: int = option(8, "gradient steps on the best plan's actions after the search (Adam through the "
                                "predictor; 0: none): the fine corrections that hold a goal, which samples find "
                                "only by chance")
    grad_lr: float = option(0.05, "step size of those gradient steps, in action units")
    cost: Any = option("sum", "distance of the predicted latents to the goal's, summed over the plan (sum) or at "
                              "its last step only (final); in Python also a callable "
                              "(z_pred (B,N,H,D), z_goal (B,D)) -> (B,N)", choices=tuple(COSTS))
    action_cost: float = option(0.0, "weight of the summed squared actions in the cost (0: none); near the goal it "
                                     "makes the planner prefer small moves to large ones the model rates alike")
    stay_cost: float = option(0.0, "weight of the predicted motion over the plan's last chunk (squared latent "
                                   "change) in the cost (0: none): prefers plans that end at rest, not passing "
                                   "through the goal")
    rest: bool = option(True, "score the all-zero action sequence (letting the arm come to rest) among every "
                              "iteration's candidates, so a plan that holds a reached goal is found exactly")
    clamp_samples: bool = option(True, "clamp sampled actions to [-1, 1] before the model scores them (off: the "
                                       "model scores them as sampled and the env clips what is played, as LeWM's "
                                       "planner does)")
    noise_beta: float = option(2.0, "colour of the sampling noise along the plan's env steps: power ~ 1/f^beta "
                                    "(0: white; 2: red, temporally correlated, as iCEM: held the goal at the end "
                                    "more often on validation)")
    rest_margin: float = option(0.0, "with rest: play the rest sequence when its predicted cost is within this "
                                     "fraction of the best plan's (0: only when it is the best)")
    seed: int = option(0, "seed of the noise streams; same seed, same plan", cli=False)
    compile: bool = option(False, "torch.compile one planning iteration (CUDA graphs on CUDA)")
    bf16: bool = option(False, "score candidates with the model's matrix products in bf16 (torch autocast; latents, "
                               "residual adds and costs stay float32): faster where the hardware has bf16 units "
                               "(GPUs, CPUs with AVX512-BF16 or AMX), slower elsewhere")
    cuda_graph: bool = option(False, "CUDA only: capture each plan call's whole search (every iteration) as one "
                                     "CUDA graph, replayed on later calls of the same shapes; with --compile the "
                                     "iteration is compiled without CUDA graphs of its own")
    cem: CEMConfig = nested(CEMConfig, "CEM only")
    mppi: MPPIConfig = nested(MPPIConfig, "MPPI only")

    def budget(self) -> str:
        """The search's size as reports name it: ``100 x 10`` (samples x iterations), ``20 x 4 + 8 gradient
        steps``."""
        steps = f" + {self.grad_steps} gradient steps" if self.grad_steps else ""
        return f"{self.samples} x {self.iterations}{steps}"

    def __post_init__(self):
        check_types(self)
        if min(self.horizon, self.samples, self.iterations) < 1:
            raise ValueError(f"horizon, samples and iterations must be >= 1, got {self.horizon}, {self.samples}, "
                             f"{self.iterations}")
        if max(self.iterations, self.warm_iterations) >= STREAMS_PER_CALL or self.warm_iterations < 0:
            raise ValueError(f"iterations and warm_iterations must be in [1, {STREAMS_PER_CALL}) (warm_iterations 0: "
                             f"iterations), got {self.iterations}, {self.warm_iterations}")
        if self.warm_iterations > self.iterations:  # a warm start lies near a good plan: it needs fewer, not more
            raise ValueError(f"warm_iterations (--warm-iterations) {self.warm_iterations} must be at most iterations "
                             f"(--iterations) {self.iterations}: they replace it on a warm-started replan, to refine "
                             f"the previous plan in fewer (0: iterations)")
        if self.grad_steps < 0 or not self.grad_lr > 0:
            raise ValueError(f"need grad_steps >= 0 and grad_lr > 0, got {self.grad_steps}, {self.grad_lr}")
        if self.grad_steps and not self.clamp_samples:  # steps are kept in [-1, 1], the plan they refine is not
            raise ValueError("grad_steps refine a plan within [-1, 1]: they need clamp_samples (with "
                             "--no-clamp-samples give --grad-steps 0)")
        if self.rest_margin < 0 or self.seed < 0:
            raise ValueError(f"rest_margin and seed must be >= 0, got {self.rest_margin}, {self.seed}")
        if self.action_cost < 0 or self.stay_cost < 0:
            raise ValueError(f"action_cost and stay_cost must be >= 0, got {self.action_cost}, {self.stay_cost}")
        if self.stay_cost and self.horizon < 2:
            raise ValueError("stay_cost needs a horizon of at least 2 chunks")
        if not 0 <= self.noise_beta <= 4:
            raise ValueError(f"noise_beta must be in [0, 4], got {self.noise_beta}")
        if not (callable(self.cost) or self.cost in COSTS):
            raise ValueError(f"cost must be one of {sorted(COSTS)} or a callable, got {self.cost!r}")
        getattr(self, self.planner).check(self)  # the chosen planner's needs of the shared settings
        unread = typed_options(self, other_planners_settings(self.planner))
        if unread:  # another planner's settings would be ignored
            them = "it" if len(unread) == 1 else "them"
            raise ValueError(f"{', '.join(unread)}: the {self.planner} planner does not read {them} (--planner "
                             f"{self.planner}); leave {them} out")
        # a setting its switch turns off would be ignored too (one left at its default was not typed)
        switched_off = {"rest_margin": (not self.rest, "--no-rest"),
                        "grad_lr": (not self.grad_steps, "--grad-steps 0"),
                        "cem.keep_fraction": (not self.cem.keep_elites, "--no-cem.keep-elites"),
                        "mppi.min_std": (not self.mppi.adapt_std, "--no-mppi.adapt-std")}
        for name, (off, switch) in switched_off.items():
            if off and (unread := typed_options(self, [name])):
                raise ValueError(f"{unread[0]}: not read with {switch}, which turns off what it sets; leave it out")
