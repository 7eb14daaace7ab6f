"""Planning in the world model's latent space: batched CEM and MPPI over action-chunk sequences, the MPC
policy, and waypoints along a graph of training frames. Imports no environment: a model is enough."""

from planners.base import Planner, PlanResult, shift_plan
from planners.cem import CEMPlanner
from planners.config import CEMConfig, MPPIConfig, PlannerConfig
from planners.costs import COSTS, final_cost, get_cost, sum_cost
from planners.mppi import MPPIPlanner
from planners.noise import problem_keys
from planners.policy import MPCPolicy, PolicyConfig, load_policy, make_planner, policy_config, recorded_planner
from planners.subgoals import SubgoalConfig

__all__ = [
    "CEMConfig",
    "CEMPlanner",
    "COSTS",
    "MPCPolicy",
    "MPPIConfig",
    "MPPIPlanner",
    "PlanResult",
    "Planner",
    "PlannerConfig",
    "PolicyConfig",
    "SubgoalConfig",
    "final_cost",
    "get_cost",
    "load_policy",
    "make_planner",
    "policy_config",
    "problem_keys",
    "recorded_planner",
    "shift_plan",
    "sum_cost",
]
