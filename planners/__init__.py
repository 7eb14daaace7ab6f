"""Planning in the world model's latent space: batched CEM and MPPI over action-chunk sequences, the MPC
policy, waypoints from a graph of training frames, and the closed-loop evaluation."""

from planners.base import Planner, PlannerConfig, PlanResult, shift_plan
from planners.cem import CEMConfig, CEMOptions, CEMPlanner
from planners.costs import COSTS, final_cost, get_cost, sum_cost
from planners.mppi import MPPIConfig, MPPIOptions, MPPIPlanner
from planners.noise import problem_keys
from planners.policy import MPCPolicy, PolicyConfig, load_policy, make_planner, policy_from_config
from planners.subgoals import SubgoalConfig, SubgoalGraph

__all__ = [
    "CEMConfig",
    "CEMOptions",
    "CEMPlanner",
    "COSTS",
    "MPPIConfig",
    "MPPIOptions",
    "MPCPolicy",
    "MPPIPlanner",
    "PlanResult",
    "Planner",
    "PlannerConfig",
    "PolicyConfig",
    "SubgoalConfig",
    "SubgoalGraph",
    "final_cost",
    "get_cost",
    "load_policy",
    "make_planner",
    "policy_from_config",
    "problem_keys",
    "shift_plan",
    "sum_cost",
]
