"""Planning in the world model's latent space: batched CEM and MPPI over action-chunk sequences."""

from planners.base import Planner, PlannerConfig, PlanResult, shift_plan
from planners.cem import CEMConfig, CEMPlanner
from planners.costs import COSTS, final_cost, get_cost, sum_cost
from planners.mppi import MPPIConfig, MPPIPlanner
from planners.policy import MPCPolicy, load_policy, make_planner

__all__ = [
    "CEMConfig",
    "CEMPlanner",
    "COSTS",
    "MPPIConfig",
    "MPCPolicy",
    "MPPIPlanner",
    "PlanResult",
    "Planner",
    "PlannerConfig",
    "final_cost",
    "get_cost",
    "load_policy",
    "make_planner",
    "shift_plan",
    "sum_cost",
]
