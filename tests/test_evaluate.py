import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from common.config import apply_overrides
from conftest import run_wm as _wm
from conftest import collect_tiny, save_as_trained_on
from envs import joint_error
from envs.dataset import EpisodeStore
from envs.vector import ReacherBatch
from evaluation.baselines import SIMULATOR_BUDGET, simulator_controller
from evaluation.evaluate import EvalConfig, Setup, batch_like, run_episodes, world_model_controller
from evaluation.protocols import LEWM_POLICY, PROTOCOLS, episode_records, sample_episodes
from evaluation.stats import cluster_warning, design_effect, format_p, sign_test, success_interval, wilson_interval
from planners.policy import PolicyConfig
from planners.subgoals import SubgoalConfig
from test_model import tiny_config
from worldmodel.model import WorldModel

WRIST = (-2.8, 2.8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return collect_tiny(tmp_path_factory.mktemp("eval") / "data", episodes=10, steps=60)


def test_joint_errors_wrapped_and_raw():
    """Wrapped (ours): across the +-pi seam a pose is near; raw (LeWM as released): 2 pi - 0.02 away."""
    a, b = np.array([math.pi - 0.01, 0.0]), np.array([-math.pi + 0.01, 0.0])
    assert math.isclose(joint_error(a, b), 0.02, abs_tol=1e-9)
    assert math.isclose(joint_error(a, b, wrap=False), 2 * math.pi - 0.02, abs_tol=1e-9)
    assert math.isclose(joint_error(np.array([0.3, -0.2]), np.zeros(2), wrap=False), 0.3)


def test_success_counts_from_step_one_and_held_is_the_last_step():
    errors = np.array([[0.5, 0.2, 0.04, 0.3],   # reached at step 2, drifted away
                       [0.5, 0.4, 0.3, 0.2],    # never
                       [0.01, 0.5, 0.5, 0.5],   # within tolerance only at step 0: no success
                       [0.5, 0.3, 0.04, 0.01]])  # reached and held
    r = episode_records(errors, tolerance=0.05)
    assert r["success"].tolist() == [True, False, False, True]
    assert r["held"].tolist() == [False, False, False, True]
    assert r["steps_to_success"].tolist() == [2, -1, -1, 2]
    assert np.allclose(r["final_error"], [0.3, 0.2, 0.5, 0.01]) and np.allclose(r["min_error"], [0.04, 0.2, 0.5, 0.01])


def test_models_that_share_source_episodes_do_not_count_them_twice():
    """Two models on one dataset's shared held-out episodes (or a baseline, which runs alike for each): the
    interval rests on the source episodes, not on twice as many."""
    from evaluation.report import summarize

    outcomes = [True, False, True, True, False, True, True, True]
    one = [{"protocol": "reach25", "method": "random", "seed": 0, "run": 0, "source_episode": f"e{j}",
            "success": ok, "held": ok, "steps_to_success": 1 if ok else -1, "final_error": 0.01 if ok else 1.0,
            "min_error": 0.01, "plan_time_per_call_s": 0.0, "plan_time_per_episode_s": 0.0,
            "start_qpos": [1.0, 2.0], "goal_qpos": [1.0, 2.5]} for j, ok in enumerate(outcomes)]
    alone = summarize(one, ["random"], [PROTOCOLS["reach25"]], 0.05)["reach25/random"]
    pooled = summarize(one + [{**r, "run": 1} for r in one], ["random"], [PROTOCOLS["reach25"]],
                       0.05)["reach25/random"]
    assert pooled["source_episodes"] == alone["source_episodes"] == 8 and pooled["episodes"] == 16
    assert pooled["ci95"] == pytest.approx(alone["ci95"], abs=1e-9)  # the copies add no information


def test_the_same_episodes_scored_at_another_tolerance():
    """Scored at the draw's own tolerance the rates are the headline's; at a larger one they follow each
    episode's closest approach (latched) and final error (held), per seed and per trained model too."""
    from evaluation.report import summarize

    errors = np.array([[0.5, 0.2, 0.04, 0.3],   # latched at 0.05; at 0.1 latched, not held
                       [0.08, 0.4, 0.08, 0.09],  # only at 0.1: latched and held; began within 0.1
                       [0.5, 0.3, 0.2, 0.2],    # never
                       [0.5, 0.3, 0.04, 0.01]])  # latched and held at both
    per = episode_records(errors, tolerance=0.05)
    records = [{"protocol": "reach25", "method": "random", "seed": j % 2, "run": j // 2, "source_episode": f"e{j}",
                "success": bool(per["success"][j]), "held": bool(per["held"][j]),
                "steps_to_success": int(per["steps_to_success"][j]), "final_error": float(per["final_error"][j]),
                "min_error": float(per["min_error"][j]), "plan_time_per_call_s": 0.0, "plan_time_per_episode_s": 0.0,
                "start_qpos": [1.0, 2.0], "goal_qpos": [1.0, 2.0 + (0.08 if j == 1 else 0.5) * (-1) ** j]}
               for j in range(4)]  # the second episode began within 0.1 of its goal
    s = summarize(records, ["random"], [PROTOCOLS["reach25"]], 0.05, [0.05, 0.1])["reach25/random"]
    same, wider = s["other_tolerances"]["0.05"], s["other_tolerances"]["0.1"]
    for key in ("success_rate", "held_rate", "ci95", "held_ci95", "per_seed", "held_per_seed", "per_run",
                "held_per_run", "between_runs_sd"):
        assert same[key] == s[key], key
    assert (s["success_rate"], s["held_rate"]) == (0.5, 0.25)
    assert (wider["success_rate"], wider["held_rate"]) == (0.75, 0.5)
    assert wider["per_seed"] == [0.5, 1.0] and wider["held_per_run"] == [0.5, 0.5]
    assert (same["started_within"], wider["started_within"]) == (0, 1)  # a start the larger tolerance holds
    assert s["started_within"] == 0
    from evaluation.report import results_markdown

    at = summarize(records, ["random"], [PROTOCOLS["reach25"]], 0.1)  # a draw that kept a start within it
    text = results_markdown(at, EvalConfig(tolerance=0.1), "the test episodes")
    assert at["reach25/random"]["started_within"] == 1 and "began already within 0.1 rad of their goals" in text
    assert "(i.i.d. uniform): 1 of 4." in text
    assert "began already" not in results_markdown({"reach25/random": s}, EvalConfig(), "the test episodes")
    lewm = summarize([{**r, "protocol": "lewm"} for r in records], ["random"], [PROTOCOLS["lewm"]], 0.05)
    theirs = "The starts of lewm come instead from rows of the model's **training** episodes"
    assert theirs in results_markdown(lewm, EvalConfig(lewm_rows="train"), "the test episodes")  # their draw
    assert "**training**" not in results_markdown(lewm, EvalConfig(), "the test episodes")
    own = EvalConfig(policy=apply_overrides(PolicyConfig(), {"cost": joint_error}), baselines="random")
    assert "cost envs.reacher.joint_error," in results_markdown(lewm, own, "the test episodes")  # as results.json
    assert EvalConfig(score_at="0.1, 0.05,0.1").other_tolerances == [0.1]  # --tolerance itself is the headline
    for bad in ("0.1,x", "0", "-0.1", "nan"):
        with pytest.raises(ValueError, match="--score-at"):
            EvalConfig(score_at=bad)


def test_lewm_rule_on_a_synthetic_trace():
    """Shoulder goal at -pi + 0.01; the arm reaches pi - 0.01 (0.02 rad away through the seam): a success
    under the wrapped rule, not under LeWM's raw one."""
    goal = np.array([-math.pi + 0.01, 0.5])
    qpos = np.array([[0.0, 0.0], [math.pi - 0.2, 0.45], [math.pi - 0.01, 0.49]])
    wrapped = episode_records(joint_error(qpos, goal)[None], 0.05)
    raw = episode_records(joint_error(qpos, goal, wrap=False)[None], 0.05)
    assert wrapped["success"][0] and wrapped["held"][0] and not raw["success"][0]


def test_episodes_start_apart_from_their_goal_25_steps_later(data):
    store = EpisodeStore(data)
    ids = store.split("val", 0.3, 0)
    eps = sample_episodes(store, ids, PROTOCOLS["reach25"], 20, 0, WRIST, tolerance=0.3)
    rows = set()
    for j, i, t0, q, goal in zip(eps["index"], eps["episode"], eps["t0"], eps["qpos"], eps["goal_qpos"]):
        assert i in ids and j == len(rows)
        assert np.array_equal(store.states(i)["qpos"][t0], q)
        assert np.array_equal(store.states(i)["qpos"][t0 + 25], goal)
        assert joint_error(q, goal) >= 0.3  # never a free success
        rows.add((i, t0))
    assert len(rows) == 20  # distinct start rows
    again = sample_episodes(store, ids, PROTOCOLS["reach25"], 20, 0, WRIST, tolerance=0.3)
    assert np.array_equal(again["t0"], eps["t0"])
    uniform = sample_episodes(store, ids, PROTOCOLS["uniform"], 50, 0, WRIST, tolerance=0.05)
    assert np.all(np.abs(uniform["goal_qpos"][:, 1]) <= 2.8) and uniform["goal_qpos"][:, 0].std() > 1
    assert np.all(joint_error(uniform["qpos"], uniform["goal_qpos"]) >= 0.05)
    # Splits of as many rows (two models' test episodes, validation and test) draw the same start positions;
    # their uniform goals are their start rows' own, not the positions': other rows, other goals.
    other = [i for i in range(len(store)) if i not in ids][:len(ids)]
    assert [store.episodes[i].steps for i in other] == [store.episodes[i].steps for i in ids]
    elsewhere = sample_episodes(store, other, PROTOCOLS["uniform"], 50, 0, WRIST, tolerance=0.05)
    assert np.array_equal(elsewhere["t0"], uniform["t0"])  # the same positions...
    assert not np.isclose(elsewhere["goal_qpos"], uniform["goal_qpos"]).all(1).any()  # ...and no goal in common
    # a start row drawn in two evaluations (every row of one episode, drawn alone and beside another) has the
    # same goal in both
    rows = store.episodes[ids[0]].steps + 1
    alone = sample_episodes(store, ids[:1], PROTOCOLS["uniform"], rows, 0, WRIST, tolerance=0.05)
    beside = sample_episodes(store, ids[:1] + other[:1], PROTOCOLS["uniform"], 2 * rows, 0, WRIST, tolerance=0.05)
    goal_of = {(int(i), int(t)): g for i, t, g in zip(beside["episode"], beside["t0"], beside["goal_qpos"])}
    assert len(alone["t0"]) == rows and all(np.array_equal(goal_of[(int(i), int(t))], g)
                                            for i, t, g in zip(alone["episode"], alone["t0"], alone["goal_qpos"]))
    with pytest.raises(ValueError, match="usable start rows"):
        sample_episodes(store, ids[:1], PROTOCOLS["reach25"], 1000, 0, WRIST, tolerance=0.05)
    far = dataclasses.replace(PROTOCOLS["reach50"], goal_offset=70)  # further ahead than the 60-step episodes
    with pytest.raises(ValueError, match=r"0 usable start rows \(the goal 70 steps later"):
        sample_episodes(store, ids, far, 1, 0, WRIST, tolerance=0.05)


def test_a_reach_protocol_of_any_distance(data):
    """reachK: the goal K env steps later in the same episode, budget 2K, drawn from its own stream; the named
    protocols are unchanged (reach25 is reach25, drawn as before)."""
    from evaluation.protocols import draw_stream, parse_protocols, protocol_named

    store = EpisodeStore(data)
    ids = store.split("val", 0.3, 0)
    (ten,) = parse_protocols("reach10")
    assert (ten.goal_offset, ten.budget, ten.wrap) == (10, 20, True)
    eps = sample_episodes(store, ids, ten, 10, 0, WRIST, tolerance=0.05)
    for i, t0, goal in zip(eps["episode"], eps["t0"], eps["goal_qpos"]):
        assert np.array_equal(store.states(i)["qpos"][t0 + 10], goal)
    assert protocol_named("reach25") is PROTOCOLS["reach25"] and draw_stream(PROTOCOLS["reach25"]) == 0
    assert draw_stream(ten) != draw_stream(protocol_named("reach11"))
    for bad in ("reach0", "reach07", "reach501", "reachx", "reach 10"):
        with pytest.raises(ValueError, match=r"is not reach25, reach50, uniform, .* or reachK"):
            parse_protocols(bad)


def test_budget_is_the_number_of_steps(data):
    store = EpisodeStore(data)
    protocol = PROTOCOLS["reach25"]
    eps = sample_episodes(store, list(range(10)), protocol, 3, 0, WRIST, 0.05)
    batch = ReacherBatch("reacher-easy", 3, size=32)
    calls = []
    errors = run_episodes(batch, eps, protocol, lambda: calls.append(1) or np.zeros((3, 2)))
    assert errors.shape == (3, 51) and len(calls) == 50
    assert np.allclose(errors[:, 0], joint_error(eps["qpos"], eps["goal_qpos"]))
    batch.close()


class SpyPlanner:
    """Records what the MPC policy hands the planner; plans zeros."""

    def __init__(self, horizon, action_dim):
        from planners.config import PlannerConfig

        self.cfg, self.action_dim, self.calls = PlannerConfig(horizon=horizon), action_dim, []

    def reset(self, seed=None):
        pass

    def plan(self, z_hist, z_goal, a_hist=None, init=None, keys=None):
        from planners.base import PlanResult

        self.calls.append((z_hist.clone(), None if a_hist is None else a_hist.clone()))
        return PlanResult(torch.zeros(len(z_hist), self.cfg.horizon, self.action_dim), torch.zeros(len(z_hist)))


def test_world_model_starts_with_the_history_of_the_episode(data, monkeypatch):
    """The first plan sees the encoded frames t0 - 2*fs, t0 - fs and t0 and the two action chunks between
    them, exactly as a training window holds them; an episode starting too early is left-padded."""
    import dataclasses

    import evaluation.evaluate as ev

    store = EpisodeStore(data)
    torch.manual_seed(0)
    model = WorldModel(dataclasses.replace(tiny_config("mlp", size=32, frameskip=5), history=3)).eval()
    spy = SpyPlanner(5, model.action_dim)
    real = ev.MPCPolicy
    monkeypatch.setattr(ev, "MPCPolicy", lambda m, cfg, graph: real(m, cfg, graph, planner=spy))
    protocol = PROTOCOLS["reach25"]
    eps = sample_episodes(store, list(range(10)), protocol, 6, 0, WRIST, 0.05)
    for b, t0 in ((0, 3), (1, 7), (2, 12)):  # too early for any history; one frame; two frames
        eps["t0"][b] = t0
        for k in ("qpos", "qvel", "target"):
            eps[k][b] = store.states(int(eps["episode"][b]))[k][t0]
    batch = ReacherBatch("reacher-easy", 6, size=32)
    setup = Setup(model, {}, store, list(range(10)), "", batch)
    no_graph = EvalConfig(policy=PolicyConfig(subgoals=SubgoalConfig(enabled=False)))  # every episode is held out
    act, policy, real = world_model_controller(setup, no_graph, protocol, eps, np.zeros((6, 32, 32, 3), np.uint8), 0)
    batch.reset_to(eps["qpos"], eps["qvel"], eps["target"], render=False)
    act()
    batch.close()
    z_hist, a_hist = spy.calls[0]
    assert z_hist.shape == (6, 3, 16) and a_hist.shape == (6, 2, 10)
    assert real[:3].tolist() == [0, 1, 2]
    zero = np.zeros((5, 2), np.float32)
    with torch.no_grad():
        for b in range(6):
            ep, t0 = store.episode(int(eps["episode"][b])), int(eps["t0"][b])
            if real[b] == 2:
                frames, chunks = [t0 - 10, t0 - 5, t0], [ep["action"][t0 - 10:t0 - 5], ep["action"][t0 - 5:t0]]
            elif real[b] == 1:  # the oldest real frame repeated, a zero chunk before it
                frames, chunks = [t0 - 5, t0 - 5, t0], [zero, ep["action"][t0 - 5:t0]]
            else:  # no history: the start frame three times, zero chunks (the padded start)
                frames, chunks = [t0, t0, t0], [zero, zero]
            torch.testing.assert_close(z_hist[b], model.encode(torch.from_numpy(ep["pixels"][frames])),
                                       rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a_hist[b], torch.from_numpy(np.stack([c.reshape(-1) for c in chunks])))


def test_lewm_history_gives_lewms_planner_the_frames_before_the_start(data, monkeypatch):
    """``lewm-history`` draws ``lewm``'s episodes and plans with LeWM's planner, but its first plan sees the
    encoded frames before the start as a training window holds them, where ``lewm`` sees the start alone."""
    import dataclasses

    import evaluation.evaluate as ev

    store = EpisodeStore(data)
    torch.manual_seed(0)
    model = WorldModel(dataclasses.replace(tiny_config("mlp", size=32, frameskip=5), history=3)).eval()
    batch = ReacherBatch("reacher-easy", 4, size=32)
    setup = Setup(model, {}, store, list(range(10)), "", batch)
    seen = {}
    for name in ("lewm", "lewm-history"):
        protocol = PROTOCOLS[name]
        eps = sample_episodes(store, list(range(10)), protocol, 4, 0, WRIST, 0.05)
        spy = SpyPlanner(5, model.action_dim)
        real = ev.MPCPolicy
        monkeypatch.setattr(ev, "MPCPolicy", lambda m, cfg, graph: real(m, cfg, graph, planner=spy))
        act, policy, _ = world_model_controller(setup, EvalConfig(), protocol, eps,
                                                np.zeros((4, 32, 32, 3), np.uint8), 0)
        monkeypatch.setattr(ev, "MPCPolicy", real)
        batch.reset_to(eps["qpos"], eps["qvel"], eps["target"], render=False)
        act()
        plan = policy.cfg.plan
        assert (plan.samples, plan.iterations, plan.cost, policy.cfg.receding_horizon) == (300, 30, "final", 5)
        assert not policy.cfg.subgoals.enabled
        seen[name] = eps, spy.calls[0][0]
    batch.close()
    (eps, one), (same, three) = seen["lewm"], seen["lewm-history"]
    assert np.array_equal(eps["episode"], same["episode"]) and np.array_equal(eps["t0"], same["t0"])
    assert one.shape == (4, 1, 16) and three.shape == (4, 3, 16)
    torch.testing.assert_close(three[:, -1], one[:, 0])  # the same stored start frame, last
    full = np.flatnonzero(same["t0"] >= 10)  # episodes old enough for two frames before the start
    assert len(full)
    with torch.no_grad():
        for b in full:
            ep, t0 = store.episode(int(same["episode"][b])), int(same["t0"][b])
            torch.testing.assert_close(three[b], model.encode(torch.from_numpy(ep["pixels"][[t0 - 10, t0 - 5, t0]])),
                                       rtol=1e-4, atol=1e-5)


def test_simulator_baseline_reaches_most_goals_and_batching_agrees(data):
    """The ceiling: CEM on the true dynamics reaches most reach25 goals; a batch of episodes gives the
    same result as each episode alone (each plans with its own noise key)."""
    store = EpisodeStore(data)
    protocol = PROTOCOLS["reach25"]
    eps = sample_episodes(store, list(range(10)), protocol, 6, 0, WRIST, 0.05)
    cfg = PolicyConfig()
    batch = ReacherBatch("reacher-easy", 6, size=32)
    act, _ = simulator_controller(batch, cfg, 5, eps, seed=0, samples=100, iterations=8)
    together = run_episodes(batch, eps, protocol, act)
    batch.close()
    assert episode_records(together, 0.05)["success"].mean() >= 4 / 6
    for i in (0, 3):
        one = {k: v[i:i + 1] for k, v in eps.items()}
        single = ReacherBatch("reacher-easy", 1, size=32)
        act, _ = simulator_controller(single, cfg, 5, one, seed=0, samples=100, iterations=8)
        alone = run_episodes(single, one, protocol, act)
        single.close()
        assert np.allclose(alone[0], together[i], atol=1e-9)


def test_the_simulator_reference_plans_without_gradient_steps_and_at_least_the_full_budget():
    """The simulator is not differentiable: its CEM takes no gradient steps, and where the world model's
    planner samples less because of them, the reference keeps the budget of at least 100 x 10."""
    batch = ReacherBatch("reacher-easy", 1, size=32)
    eps = {"goal_qpos": np.zeros((1, 2)), "index": np.array([0])}
    try:
        _, policy = simulator_controller(batch, PolicyConfig(), 5, eps, seed=0)
        assert (policy.planner.cfg.samples, policy.planner.cfg.iterations) == SIMULATOR_BUDGET
        assert policy.planner.cfg.grad_steps == 0
        lewm = apply_overrides(PolicyConfig(), LEWM_POLICY)
        _, policy = simulator_controller(batch, lewm, 5, eps, seed=0)
        cfg = policy.planner.cfg
        assert (cfg.samples, cfg.iterations, cfg.cem.elites, cfg.grad_steps) == (300, 30, 30, 0)
        _, policy = simulator_controller(batch, PolicyConfig(), 5, eps, seed=0, samples=8, iterations=1)
        assert (policy.planner.cfg.samples, policy.planner.cfg.iterations) == (8, 1)
        warm = apply_overrides(PolicyConfig(), {"iterations": 10, "warm_iterations": 5})  # a budget of its own:
        _, policy = simulator_controller(batch, warm, 5, eps, seed=0, samples=8, iterations=3)  # warm within it
        assert (policy.planner.cfg.iterations, policy.planner.cfg.warm_iterations) == (3, 3)
        mppi = apply_overrides(PolicyConfig(), {"planner": "mppi", "mppi.temperature": 0.3})  # CEM's defaults
        _, policy = simulator_controller(batch, mppi, 5, eps, seed=0, samples=8, iterations=1)
        assert policy.planner.cfg.planner == "cem" and policy.planner.cfg.mppi.temperature == 0.1
    finally:
        batch.close()


def test_a_protocol_that_fixes_the_planner_plans_none_of_the_configured_planners_own_settings():
    """``--planner mppi --mppi.temperature 0.3 --protocol reach25,lewm``: reach25 plans MPPI as typed, lewm plans
    LeWM's CEM, without MPPI's settings (which a CEM config refuses: the evaluation failed at lewm)."""
    from types import SimpleNamespace

    from evaluation.evaluate import protocol_policy

    setup, cfg = SimpleNamespace(action_std=lambda: 0.7), SimpleNamespace(
        policy=apply_overrides(PolicyConfig(), {"planner": "mppi", "mppi.temperature": 0.3}))
    free = protocol_policy(setup, cfg, PROTOCOLS["reach25"], seed=1).plan
    assert (free.planner, free.mppi.temperature, free.seed) == ("mppi", 0.3, 1)
    for name in ("lewm", "lewm-history"):
        fixed = protocol_policy(setup, cfg, PROTOCOLS[name], seed=1).plan
        assert (fixed.planner, fixed.samples, fixed.cem.init_std, fixed.mppi.temperature) == ("cem", 300, 0.7, 0.1)


def test_simulator_references_plan_under_the_protocols_settings(data, monkeypatch):
    """``simulator`` sees the velocities and ``simulator-pose`` does not; on ``lewm`` both plan with what
    the protocol fixes for every planner (LeWM's CEM, its initial std of one unit of the data's actions, its
    unclamped samples, its white noise)."""
    import evaluation.evaluate as ev

    seen = []
    real = ev.simulator_controller

    def spy(batch, pcfg, *args, **kwargs):
        seen.append((pcfg, kwargs["sees_velocity"]))
        return real(batch, pcfg, *args, **kwargs)

    monkeypatch.setattr(ev, "simulator_controller", spy)
    store = EpisodeStore(data)
    batch = ReacherBatch("reacher-easy", 2, size=32, action_repeat=2)
    setup = Setup(WorldModel(tiny_config("mlp", size=32, frameskip=5)), {}, store, list(range(10)), "", batch)
    cfg = EvalConfig(episodes=2, sim_samples=8, sim_iterations=1)
    rows = ev.run_protocol_seed(setup, cfg, PROTOCOLS["lewm"], 0, ["simulator", "simulator-pose"], {})
    batch.close()
    assert [r["method"] for r in rows] == ["simulator"] * 2 + ["simulator-pose"] * 2
    assert [v for _, v in seen] == [True, False]
    for pcfg, _ in seen:
        assert pcfg.plan.cem.init_std == pytest.approx(setup.action_std()) and pcfg.plan.cost == "final"
        assert pcfg.receding_horizon == 5 and pcfg.plan.cem.plan_from == "mean"
        assert not pcfg.plan.clamp_samples  # LeWM's CEM scores its samples as drawn
        assert pcfg.plan.noise_beta == 0 != PolicyConfig().plan.noise_beta  # white noise, whatever our default


def test_intervals():
    lo, hi = wilson_interval(45, 50)
    assert 0.78 < lo < 0.9 < hi < 0.97
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == 1.0
    rng = np.random.default_rng(0)
    independent = rng.uniform(size=150) < 0.8
    clustered = np.repeat(rng.uniform(size=15) < 0.8, 10)  # 15 source episodes, each drawn 10 times
    w_ind = np.subtract(*success_interval(independent, np.arange(150))[::-1])
    w_clu = np.subtract(*success_interval(clustered, np.repeat(np.arange(15), 10))[::-1])
    assert w_clu > 1.8 * w_ind  # correlated episodes carry less information: a wider interval
    assert design_effect(clustered, np.repeat(np.arange(15), 10)) > 5 and design_effect(independent, np.arange(150)) < 2


def test_a_higher_rate_never_gets_a_lower_bound_below_a_lower_rates():
    """The contradiction of mixing two methods: 150 episodes from 40 source episodes, all successes, must
    not get a wider interval than 147 of them; every rate is also inside its interval."""
    clusters = np.arange(150) % 40
    perfect = success_interval(np.ones(150), clusters)
    for failures in (1, 3, 6, 15):
        outcomes = np.ones(150)
        outcomes[np.random.default_rng(failures).choice(150, failures, replace=False)] = 0
        lo, hi = success_interval(outcomes, clusters)
        assert lo <= outcomes.mean() <= hi and lo < perfect[0]
    assert perfect[1] == 1.0 and perfect[0] > 0.97


def test_sign_test_of_paired_episodes():
    assert sign_test(7, 4) == pytest.approx(0.549, abs=1e-3)  # 2 * P(X <= 4), X ~ Binomial(11, 1/2)
    assert sign_test(0, 10) == pytest.approx(2 / 1024) and sign_test(10, 0) == sign_test(0, 10)
    assert sign_test(0, 0) == 1.0  # no episode tells them apart
    assert [format_p(p) for p in (0.549, 0.0049, 0.0002, 1.0)] == ["0.55", "0.0049", "< 0.001", "1.0"]
    assert [format_p(p, 0.05) for p in (0.0498, 0.0502, 0.05)] == ["0.0498", "0.050", "0.050"]  # as the verdict


def test_few_source_episodes_are_warned_about():
    assert cluster_warning(np.repeat(np.arange(4), 10)) and "4 source" in cluster_warning(np.repeat(np.arange(4), 10))
    assert cluster_warning(np.arange(40)) is None


def test_wm_eval_smoke_writes_results_and_keeps_them(data, tmp_path):
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    args = ["eval", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 3, "--seeds", 2,
            "--samples", 16, "--iterations", 2, "--sim-samples", 16, "--sim-iterations", 2,
            "--protocol", "reach25,uniform,lewm", "--score-at", "0.1"]
    out = _wm(*args).stdout
    assert "| reach25 | world model (MPC) |" in out and "| lewm | world model (LeWM's planner) |" in out
    assert "| uniform | world model (MPC) | 0.1 |" in out  # the same episodes scored at 0.1 rad too
    assert re.search(r"\| uniform \| world model \(MPC\) \| 0\.1 \|.* \| \d of 6 \|\n", out)  # starts within it
    for name in ("results.json", "results.md", "results.png", "index.html"):
        assert (tmp_path / "eval" / name).exists()  # beside the checkpoint by default
    assert _page_links(tmp_path / "eval" / "index.html") == {"results.png"}
    assert "<table>" in (tmp_path / "eval" / "index.html").read_text()
    assert "16 samples x 2 iterations, horizon 5, cost sum, then 8 gradient steps (step 0.05)" in \
        (tmp_path / "eval" / "results.md").read_text()  # the planner as it ran, its gradient steps too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logged = EventAccumulator(str(tmp_path / "eval" / "tb"))
    logged.Reload()
    assert {"eval/reach25/world_model/latched", "eval/uniform/world_model/held_at_0.1"} <= set(logged.Tags()["scalars"])
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert len(report["episodes"]) == 3 * 2 * 4 * 3  # protocols x seeds x methods x episodes
    assert report["data"] == [str(data)]  # the dataset each model's episodes came from
    assert set(report["summary"]) == {f"{p}/{m}" for p in ("reach25", "uniform", "lewm")
                                      for m in ("world_model", "random", "exploration", "simulator")}
    assert all("held" in r for r in report["episodes"])
    mpc = [r for r in report["episodes"] if r["method"] == "world_model"]
    for r in mpc:  # an episode's planning: its share of every call of its batch, and of the routing
        share = (r["plan_time_per_call_s"] * r["plan_calls"] + r["route_time_batch_s"]) / 3
        assert r["plan_calls"] >= 2 and r["plan_time_per_episode_s"] == pytest.approx(share)
        assert 0 <= r["route_strays_batch"] <= r["plan_calls"]  # plans that met a stray arm (untrained: some)
    again = _wm(*args, check=False)  # a second run does not overwrite the first's results
    assert again.returncode == 2 and "already holds the results of reach25,uniform,lewm (72 episode records" in again.stderr and "--overwrite" in again.stderr
    assert _wm(*args[:-4], "--protocol", "reach25", "--overwrite").returncode == 0


def test_an_interrupted_evaluation_resumes_where_it_stopped_with_the_same_results(data, tmp_path, monkeypatch):
    """Ctrl-C in the middle of ``wm eval``: the (model, protocol, seed, method) runs measured are kept, the
    same command measures only the rest, and the results equal an uninterrupted run's (also when it adds
    seeds and baselines); other settings over the kept runs are refused, naming the file and the field."""
    import evaluation.evaluate as ev

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    cfg = lambda out, **kw: apply_overrides(EvalConfig(  # noqa: E731
        checkpoint=str(tmp_path / "m.pt"), data=str(data), episodes=3, seeds=2, protocol="reach5,reach3",
        baselines="random,simulator", sim_samples=8, sim_iterations=1, out=str(tmp_path / out)),
        {"samples": 8, "iterations": 2, **kw})
    whole = ev.evaluate(cfg("whole"), progress=False)
    real, calls, stop_at = ev.run_episodes, [], [5]

    def counted(*args, **kwargs):  # Ctrl-C as the fifth method run starts
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "run_episodes", counted)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg("cut"), progress=False)
    kept = sorted(p.name for p in (tmp_path / "cut" / "units").iterdir())
    assert len(kept) == 4 and not (tmp_path / "cut" / "results.json").exists()
    assert "model0-reach5-seed0-world_model.json" in kept
    with pytest.raises(ValueError, match=r"model0-reach5-seed0-world_model.json: field measured_with.samples is 8, "
                                         r"this run asks for 12; pass --overwrite"):
        ev.evaluate(cfg("cut", samples=12), progress=False)
    unit = tmp_path / "cut" / "units" / "model0-reach5-seed0-world_model.json"
    intact = unit.read_text()
    damaged = json.loads(intact)
    del damaged["result"]["records"]
    unit.write_text(json.dumps(damaged))
    with pytest.raises(ValueError, match=r"model0-reach5-seed0-world_model.json: field result.records is missing"):
        ev.evaluate(cfg("cut"), progress=False)
    for damage, why in ((lambda records: records[1].update(success="no"), r"records.1.success is 'no', not true or "
                         r"false"),  # numpy's TypeError from the sum, a traceback
                        (lambda records: records[0].update(final_error=None), r"records.0.final_error holds None"),
                        (lambda records: records.pop(), r"records.2.success is missing")):  # a record short
        damaged = json.loads(intact)
        damage(damaged["result"]["records"])
        unit.write_text(json.dumps(damaged))
        with pytest.raises(ValueError, match=r"model0-reach5-seed0-world_model.json: field result." + why):
            ev.evaluate(cfg("cut"), progress=False)
    unit.write_text(intact)
    calls.clear()
    stop_at[0] = 0
    # the same data, device and threads spelt otherwise measure alike: not refused
    resumed = ev.evaluate(cfg("cut", data=f"{data}/.", device="cpu", threads=torch.get_num_threads()),
                          progress=False)
    assert len(calls) == 2 * 2 * 3 - 4  # only what was missing ran
    strip = lambda rows: [{k: v for k, v in r.items() if "_time_" not in k} for r in rows]  # noqa: E731  timings
    assert strip(resumed["episodes"]) == strip(whole["episodes"])
    assert strip(resumed["summary"].values()) == strip(whole["summary"].values())
    assert not (tmp_path / "cut" / "units").exists()  # all in results.json once it is written
    calls.clear()
    stop_at[0] = 2  # a run of one seed and one baseline, stopped; then the same with more seeds and baselines
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg("grown", seeds=1, baselines="random"), progress=False)
    calls.clear()
    stop_at[0] = 0
    grown = ev.evaluate(cfg("grown"), progress=False)
    assert len(calls) == 2 * 2 * 3 - 1 and strip(grown["episodes"]) == strip(whole["episodes"])
    # --overwrite over finished results, stopped: the same command resumes (the old results stay till then)
    calls.clear()
    stop_at[0] = 3
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg("whole", overwrite=True), progress=False)
    assert (tmp_path / "whole" / "results.json").exists() and len(list((tmp_path / "whole" / "units").iterdir())) == 2
    calls.clear()
    stop_at[0] = 0
    again = ev.evaluate(cfg("whole", overwrite=True), progress=False)
    assert len(calls) == 2 * 2 * 3 - 2 and strip(again["episodes"]) == strip(whole["episodes"])
    assert len(list((tmp_path / "whole" / "tb").iterdir())) == 1  # the replaced results' scalars went with them
    calls.clear()
    stop_at[0] = 2  # stopped again; then --overwrite with other settings measures the kept part again
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(cfg("whole", overwrite=True), progress=False)
    calls.clear()
    stop_at[0] = 0
    assert ev.evaluate(cfg("whole", samples=12, overwrite=True), progress=False)["config"]["policy"]["plan"][
        "samples"] == 12
    assert len(calls) == 2 * 2 * 3


def test_a_protocol_that_cannot_be_drawn_is_refused_before_the_first_runs(data, tmp_path, monkeypatch):
    """A protocol listed last whose goals lie beyond every held-out episode: refused before any episode of the
    ones before it runs (in a long evaluation those would be lost)."""
    import evaluation.evaluate as ev

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    monkeypatch.setattr(ev, "run_episodes", lambda *a, **k: pytest.fail("ran before the last protocol was checked"))
    with pytest.raises(ValueError, match=r"reach400: 0 usable start rows"):
        ev.evaluate(EvalConfig(checkpoint=str(tmp_path / "m.pt"), data=str(data), episodes=2, seeds=1,
                               protocol="reach25,reach400", baselines="", out=str(tmp_path / "e")), progress=False)
    assert not (tmp_path / "e").exists()


def test_sigterm_stops_an_evaluation_like_ctrl_c(data, tmp_path, monkeypatch, capsys):
    """SIGTERM (``timeout``, ``docker stop``, Slurm) to ``wm eval``: exit status 130, the runs it finished
    kept for the rerun, its lock released; a demo stopped so before writing anything leaves no directory."""
    import os
    import signal

    import evaluation.evaluate as ev
    from wm import main

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    real, calls = ev.run_episodes, []

    def terminated_at_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "run_episodes", terminated_at_second)
    base = ["--checkpoint", str(tmp_path / "m.pt"), "--data", str(data), "--samples", "8", "--iterations", "1"]
    assert main(["eval", *base, "--episodes", "2", "--seeds", "2", "--protocol", "reach25", "--baselines", "",
                 "--out", str(tmp_path / "e")]) == 130
    said = capsys.readouterr()  # said, not only an exit status
    assert "stopped: 1 finished part(s) kept in " in said.err and "the same command measures only the rest" in said.err
    assert said.err.endswith("wm eval: interrupted\n")
    assert [p.name for p in (tmp_path / "e" / "units").iterdir()] == ["model0-reach25-seed0-world_model.json"]
    assert not (tmp_path / "e" / ".wm.lock").exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    import evaluation.demo as demo

    monkeypatch.setattr(demo, "check_ffmpeg", lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["demo", *base, "--episodes", "1", "--out", str(tmp_path / "d")]) == 130
    assert not (tmp_path / "d").exists()


def squared_final_distance(z_pred, z_goal):
    """A cost of one's own, as Python may give the planner: (B, N, H, D), (B, D) -> (B, N)."""
    return ((z_pred[:, :, -1] - z_goal[:, None]) ** 2).sum(-1)


def test_an_evaluation_with_a_cost_function_of_ones_own_finishes_and_resumes(data, tmp_path, monkeypatch):
    """A callable cost is recorded by its module and name in results.json. An interrupted run resumes its kept
    runs when the cost is a module-level function; a lambda has no name to be found again by, so a rerun in
    another process (here: another lambda alike) is refused over the kept runs, naming the field: nothing is
    mixed."""
    import evaluation.evaluate as ev

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    cfg = lambda out, cost: apply_overrides(EvalConfig(  # noqa: E731
        checkpoint=str(tmp_path / "m.pt"), data=str(data), episodes=2, seeds=2, protocol="reach25", baselines="",
        out=str(tmp_path / out)), {"samples": 8, "iterations": 1, "cost": cost})
    real, calls = ev.run_episodes, []

    def stop_second(*args, **kwargs):  # Ctrl-C as the second seed starts
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    for out, cost in (("named", squared_final_distance), ("lambda", lambda z, g: z.sum((-1, -2)))):
        monkeypatch.setattr(ev, "run_episodes", stop_second)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate(cfg(out, cost), progress=False)
    monkeypatch.setattr(ev, "run_episodes", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    ev.evaluate(cfg("named", squared_final_distance), progress=False)
    assert len(calls) == 1  # only the second seed
    recorded = json.loads((tmp_path / "named" / "results.json").read_text())["config"]["policy"]["plan"]["cost"]
    assert recorded == "test_evaluate.squared_final_distance"
    with pytest.raises(ValueError, match=r"seed0-world_model.json: field measured_with.cost is '<function .*<lambda> "
                                         r"at 0x.*pass --overwrite"):
        ev.evaluate(cfg("lambda", lambda z, g: z.sum((-1, -2))), progress=False)


def test_wm_demo_smoke_writes_videos_and_sheet(data, tmp_path):
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    out = _wm("demo", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 2, "--samples", 8,
              "--iterations", 1, "--bank-frames", 50).stdout
    assert "wrote 2 videos (and 2 gifs)" in out
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert names == ["demo.json", "demo.md", "episode_00.gif", "episode_00.mp4", "episode_01.gif", "episode_01.mp4",
                     "index.html", "summary.png"]
    import imageio.v2 as imageio
    frames = imageio.mimread(tmp_path / "videos" / "episode_00.mp4")
    assert len(frames) == 51  # the start frame and one per step of the 50-step budget
    assert _page_links(tmp_path / "videos" / "index.html") == {"episode_00.mp4", "episode_01.mp4", "summary.png"}
    again = _wm("demo", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 1, check=False)
    assert again.returncode == 2 and "already holds a demo" in again.stderr and "--overwrite" in again.stderr
    _wm("demo", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 1, "--samples", 8, "--iterations", 1,
        "--bank-frames", 50, "--no-gif", "--overwrite")
    names = sorted(p.name for p in (tmp_path / "videos").iterdir())  # no stale video of the earlier demo is left
    assert names == ["demo.json", "demo.md", "episode_00.mp4", "index.html", "summary.png"]
    again = imageio.mimread(tmp_path / "videos" / "episode_00.mp4")
    assert np.array_equal(again[0], frames[0])  # episode 0 is episode 0, however many are filmed
    # a demo that did not finish (interrupted before its demo.json, written last) does not block the command
    (tmp_path / "videos" / "demo.json").unlink()
    (tmp_path / "videos" / "episode_07.mp4").write_bytes(b"partial")
    rerun = _wm("demo", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 1, "--samples", 8,
                "--iterations", 1, "--bank-frames", 50, "--no-gif")
    assert "of a demo that did not finish" in rerun.stderr and not (tmp_path / "videos" / "episode_07.mp4").exists()


def test_wm_demo_films_goal_poses_of_ones_own(data, tmp_path):
    """--goal-pose films one video per pose given, from --start-pose at rest (or the protocol's starts), under
    the protocol's budget; bad poses are refused before any work, naming the option."""
    from evaluation.demo import DemoConfig, make_demo

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    cfg = lambda **k: DemoConfig(**{"checkpoint": str(tmp_path / "m.pt"), "data": str(data), "gif": False,  # noqa: E731
                                    "bank_frames": 50, "out": str(tmp_path / "v"), **k})
    small = {"policy": apply_overrides(PolicyConfig(), {"samples": 8, "iterations": 1})}
    done = make_demo(cfg(goal_pose="1.0,-1.2; -2.5,0.8", start_pose="0.3,0.1", **small), progress=False)
    assert done["goal_qpos"] == [[1.0, -1.2], [-2.5, 0.8]] and done["start_qpos"] == [[0.3, 0.1], [0.3, 0.1]]
    assert sorted(p.name for p in (tmp_path / "v").glob("*.mp4")) == ["goal_00.mp4", "goal_01.mp4"]
    import imageio.v2 as imageio
    first = imageio.mimread(tmp_path / "v" / "goal_00.mp4")
    assert len(first) == PROTOCOLS["reach25"].budget + 1
    md = (tmp_path / "v" / "demo.md").read_text()
    assert "| goal_01 | (0.30, 0.10) | (-2.50, 0.80) |" in md
    drawn = make_demo(cfg(goal_pose="1.0,-1.2", overwrite=True, **small), progress=False)  # the protocol's start
    assert drawn["start_qpos"] != [[0.3, 0.1]] and drawn["goal_qpos"] == [[1.0, -1.2]]
    seq = make_demo(cfg(goal_pose="1.0,-1.2; -2.5,0.8", start_pose="0.3,0.1", goal_sequence=True, overwrite=True,
                        **small), progress=False)  # one video, the goals in turn from one start
    assert sorted(p.name for p in (tmp_path / "v").glob("*.mp4")) == ["sequence.mp4"]
    assert len(imageio.mimread(tmp_path / "v" / "sequence.mp4")) == 2 * PROTOCOLS["reach25"].budget + 1
    assert seq["goal_qpos"] == [[1.0, -1.2], [-2.5, 0.8]] and len(seq["success"]) == len(seq["held"]) == 2
    assert seq["start_qpos"][0] == [0.3, 0.1]  # goal 1 starts where goal 0 ended:
    assert joint_error(seq["start_qpos"][1], seq["goal_qpos"][0]) == pytest.approx(seq["final_error"][0])
    assert _page_links(tmp_path / "v" / "index.html") == {"sequence.mp4", "summary.png"}
    make_demo(cfg(goal_pose="1.0,-1.2", overwrite=True, **small), progress=False)  # no stale sequence left beside
    assert sorted(p.name for p in (tmp_path / "v").glob("*.mp4")) == ["goal_00.mp4"]
    far = make_demo(cfg(goal_pose="1.0,-1.2", start_pose="0.3,0.1", protocol="reach61", overwrite=True, **small),
                    progress=False)  # every pose given: the protocol's budget and rule only, none of its rows
    assert far["start_qpos"] == [[0.3, 0.1]] and len(imageio.mimread(tmp_path / "v" / "goal_00.mp4")) == 123
    from evaluation.demo import demo_markdown  # a shoulder that went round is shown wrapped, as errors count it

    went_round = dict(seq, start_qpos=[[0.3, 0.1], [3.79, 0.8]])
    assert "| goal_01 | (-2.49, 0.80) |" in demo_markdown(cfg(goal_pose="0,0"), PROTOCOLS["reach25"], went_round,
                                                          ["goal_00", "goal_01"])
    for bad, match in (({"goal_pose": "1.0"}, "--goal-pose: '1.0' is not a pose"),
                       ({"goal_pose": "1,nan"}, "--goal-pose: '1,nan' is not a pose"),
                       ({"goal_pose": ";"}, "--goal-pose: no pose"),
                       ({"goal_pose": "0,0;;1,1"}, "--goal-pose: an empty pose in '0,0;;1,1'"),
                       ({"start_pose": "0,0"}, "--start-pose is for your own goals"),
                       ({"goal_pose": "0,0;1,1;2,2", "start_pose": "0,0;1,1"}, "2 poses for 3 goals"),
                       ({"goal_pose": "0,0", "protocol": "lewm"}, "stored frames"),
                       ({"goal_sequence": True}, "--goal-sequence visits the poses of --goal-pose"),
                       ({"goal_pose": "0,0;1,1", "start_pose": "0,0;1,1", "goal_sequence": True}, "one start")):
        with pytest.raises(ValueError, match=match):
            DemoConfig(**{"checkpoint": str(tmp_path / "m.pt"), **bad})
    with pytest.raises(ValueError, match=r"--goal-pose: a wrist angle beyond the joint limit"):
        make_demo(cfg(goal_pose="0,3.0", out=str(tmp_path / "refused")), progress=False)
    assert not (tmp_path / "refused").exists()  # refused before it wrote anything: no empty directory


def test_wm_demo_films_poses_of_ones_own_from_the_model_file_alone(data, tmp_path):
    """A model handed on without its dataset still films goals and starts of your own: its environments are
    rebuilt from the recording the model keeps, its subgoal graph is in the model file, and the panels of
    training frames are left out (none to show). Without --start-pose, or from a model that does not record how
    its data was rendered, the missing dataset is a clear error."""
    import shutil

    import imageio.v2 as imageio

    from evaluation.demo import DemoConfig, make_demo
    from worldmodel.graph import GraphConfig, graph_for_checkpoint

    moved = tmp_path / "data"
    shutil.copytree(data, moved)
    model = WorldModel(tiny_config("mlp", size=32, frameskip=5))
    save_as_trained_on(model, tmp_path / "m.pt", moved)
    graph_for_checkpoint(model, tmp_path / "m.pt", GraphConfig(), str(moved))  # kept in the model file
    small = {"policy": apply_overrides(PolicyConfig(), {"samples": 8, "iterations": 1}), "gif": False}
    with_data = make_demo(DemoConfig(checkpoint=str(tmp_path / "m.pt"), goal_pose="1.0,-1.2", start_pose="0.3,0.1",
                                     out=str(tmp_path / "with"), bank_frames=50, **small), progress=False)
    shutil.rmtree(moved)
    cfg = lambda **k: DemoConfig(**{"checkpoint": str(tmp_path / "m.pt"), "goal_pose": "1.0,-1.2",  # noqa: E731
                                    "out": str(tmp_path / "alone"), **small, **k})
    alone = make_demo(cfg(start_pose="0.3,0.1"), progress=False)
    assert alone["start_qpos"] == [[0.3, 0.1]] and alone["goal_qpos"] == [[1.0, -1.2]]
    assert alone["final_error"] == with_data["final_error"]  # the same environment, model, graph and plans
    frames = [imageio.mimread(tmp_path / d / "goal_00.mp4") for d in ("with", "alone")]
    assert len(frames[1]) == PROTOCOLS["reach25"].budget + 1
    assert frames[1][0].shape[1] < frames[0][0].shape[1]  # no panel of training frames
    assert "filmed from the model file alone" in (tmp_path / "alone" / "demo.md").read_text()
    with pytest.raises(ValueError, match="its dataset is not where it was recorded.*give --start-pose too"):
        make_demo(cfg(out=str(tmp_path / "drawn")), progress=False)  # the protocol's starts need the dataset
    with pytest.raises(ValueError, match="not where it was recorded.*give --goal-pose and --start-pose, to film"):
        make_demo(cfg(goal_pose="", out=str(tmp_path / "drawn")), progress=False)
    meta = json.loads((tmp_path / "m.json").read_text())
    del meta["data"]["recording"]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not record how its data was rendered"):
        make_demo(cfg(start_pose="0,0", out=str(tmp_path / "old")), progress=False)


def _page_links(page) -> set:
    """The files a page shows (img and video sources); each must exist beside it."""
    from html.parser import HTMLParser

    found = set()

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag in ("img", "video"):
                found.add(dict(attrs)["src"])

    Links().feed(page.read_text())
    assert all((page.parent / name).is_file() for name in found), found
    return found


def test_bad_evaluation_inputs_are_clear_errors(data, tmp_path, monkeypatch):
    """A model of one env on another env's data, an output that is a file, and a missing model among several:
    refused before any work."""
    from conftest import write_synthetic
    from evaluation.evaluate import evaluate

    WorldModel(tiny_config("mlp", size=32, frameskip=5)).save(tmp_path / "m.pt")  # a reacher-easy model
    gym = write_synthetic(tmp_path / "gym", n_episodes=4, steps=30, size=32, env="gym-reacher")
    with pytest.raises(ValueError, match=r"holds 'gym-reacher' episodes, but env='reacher-easy' was asked for \(the env of the model"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "m.pt"), data=str(gym), out=str(tmp_path / "e1")), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        evaluate(EvalConfig(checkpoint=str(tmp_path / "m.pt"), data=str(data), out=str(tmp_path / "file")),
                 progress=False)
    with pytest.raises(ValueError, match="--episodes"):
        EvalConfig(episodes=0)
    # a protocol or a method named twice would count its episodes twice, narrowing every interval
    with pytest.raises(ValueError, match="--protocol names reach25 twice"):
        EvalConfig(protocol="reach25,uniform,reach25")
    with pytest.raises(ValueError, match="--baselines names random twice"):
        EvalConfig(baselines="random,random")
    for option, value in (("sim_samples", 0), ("sim_iterations", -1)):  # not "the default", nor a late failure
        flag = "--" + option.replace("_", "-")
        with pytest.raises(ValueError, match=f"{flag} must be >= 1 \\(or left out\\), got {value}"):
            EvalConfig(**{option: value})

    def my_cost(z, goal):
        return (z - goal).pow(2).sum(-1)

    own = apply_overrides(EvalConfig().policy, {"cost": my_cost})  # a cost of one's own has no joint counterpart
    with pytest.raises(ValueError, match=r"cost test_evaluate.*my_cost has no joint-angle counterpart for the "
                                         r"simulator, simulator-pose baseline"):
        EvalConfig(policy=own, baselines="random,simulator,simulator-pose")
    assert EvalConfig(policy=own, baselines="random").policy.plan.cost is my_cost
    import evaluation.evaluate as ev

    # a list of models with one missing: refused before the first is evaluated, and nothing is created
    monkeypatch.setattr(ev, "load_setup", lambda *a, **k: pytest.fail("evaluated before checking every model"))
    with pytest.raises(ValueError, match=r"gone.pt: no such checkpoint"):
        evaluate(EvalConfig(checkpoint=f"{tmp_path / 'm.pt'},{tmp_path / 'gone.pt'}", out=str(tmp_path / "e2")),
                 progress=False)
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "t.pt", data)
    with pytest.raises(ValueError, match=r"m.pt does not record its dataset; pass --data"):  # nor the data
        evaluate(EvalConfig(checkpoint=f"{tmp_path / 't.pt'},{tmp_path / 'm.pt'}", out=str(tmp_path / "e2")),
                 progress=False)
    assert not (tmp_path / "e2").exists()
    twice = f"{tmp_path / 't.pt'},{tmp_path / 'm.pt'},{tmp_path}/../{tmp_path.name}/t.pt"  # one model, two spellings
    with pytest.raises(ValueError, match=r"--checkpoint names one model twice .*t\.pt.*: pooled with itself"):
        EvalConfig(checkpoint=twice, out=str(tmp_path / "e3"))
    with pytest.raises(ValueError, match="names one model twice"):  # the same short name, spelt alike
        EvalConfig(checkpoint="a.pt,a.pt", out=str(tmp_path / "e3"))
    # a model whose path holds a comma is one model (a list is split only where no such file exists)
    monkeypatch.undo()  # before evaluation.demo is imported: it would keep the patched load_setup for good
    from evaluation.demo import DemoConfig

    (tmp_path / "run,v2").mkdir()
    comma = save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "run,v2" / "m.pt",
                               data)
    assert EvalConfig(checkpoint=str(comma), out=str(tmp_path / "e4")).checkpoints == [str(comma)]
    assert DemoConfig(checkpoint=str(comma)).checkpoint == str(comma)


def test_subgoal_graph_holds_training_frames_only(data):
    """The graph's nodes are frames of the episodes the model trained on, one per chunk: never the
    held-out episodes that evaluation goals come from."""
    from worldmodel.graph import GraphConfig

    store = EpisodeStore(data)
    model = WorldModel(tiny_config("mlp", size=32, frameskip=5)).eval()
    train = [i for i in range(len(store)) if i not in (0, 3)]
    setup = Setup(model, {}, store, [0, 3], "", None, train=train)
    graph = setup.graph(GraphConfig())
    assert len(graph.nodes) == sum(store.episodes[i].steps // 5 + 1 for i in train)
    with torch.no_grad():
        first = model.encode(torch.from_numpy(store.frames(train[0], np.array([0, 5]))))
    torch.testing.assert_close(graph.nodes[:2], first, atol=1e-4, rtol=1e-3)  # batches of 2 and of many frames
    assert setup.graph(GraphConfig()) is graph  # built once


def test_graph_of_a_model_in_training_uses_and_keeps_its_running_statistics(data):
    """Built mid-training (the closed-loop check), the graph encodes as the planner will (eval mode) and
    leaves the BatchNorm statistics that go into the checkpoint untouched."""
    from worldmodel.graph import GraphConfig, LatentGraph

    store = EpisodeStore(data)
    model = WorldModel(tiny_config("mlp", size=32, frameskip=5)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = LatentGraph.build(model, store, [1, 2], GraphConfig())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        want = model.eval().encode(torch.from_numpy(store.frames(1, np.array([0]))))
    # eval-mode statistics, not the batch's (those differ by far more); a batch of one frame and a batch of many
    # take different convolution paths, up to about 1e-5 apart
    torch.testing.assert_close(graph.nodes[:1], want, atol=1e-4, rtol=1e-3)


def test_evaluation_renders_as_the_dataset_was_collected(tmp_path):
    """Data collected with --image-size (rendered at 64, stored at 32): the evaluation's frames of a stored
    state equal the stored frames, i.e. it renders at 64 and area-resizes too."""
    out = tmp_path / "small"
    collect_tiny(out, episodes=1, steps=4, size=64, image_size=32)
    store = EpisodeStore(out)
    s = store.episode(0)
    batch = batch_like(store, 1)
    try:
        frames = batch.reset_to(s["qpos"][:1], s["qvel"][:1], s["target"][:1])
    finally:
        batch.close()
    assert np.array_equal(frames[0], s["pixels"][0])


def test_choosing_never_touches_the_test_episodes(data, tmp_path, monkeypatch):
    """What chooses settings (the planning-quality curve, the closed-loop check during training) draws its
    episodes from validation only; the check is shown able to fail by asking the curve for the test split."""
    import evaluation.evaluate as ev
    from benchmarks import quality
    from worldmodel.datasplit import split_episodes

    model = WorldModel(tiny_config("mlp", size=32, frameskip=5))
    save_as_trained_on(model, tmp_path / "m.pt", data)
    meta = json.loads((tmp_path / "m.json").read_text())
    store = EpisodeStore(data)
    val, test = (set(store.index_of_uids(meta["data"][s])) for s in ("val", "test"))
    seen = []
    real = ev.sample_episodes
    monkeypatch.setattr(ev, "sample_episodes", lambda st, ids, *a, **k: seen.append(set(ids)) or real(st, ids, *a, **k))
    quality.run(str(tmp_path / "m.pt"), "cpu", settings=({"samples": 8, "iterations": 1},), episodes=2, data=str(data))
    train = sorted(store.index_of_uids(meta["data"]["train"]))
    ev.closed_loop_check(model, store, train, sorted(val), episodes=2, planner={"iterations": 1})
    assert len(seen) == 2 and all(ids == val for ids in seen) and not any(ids & test for ids in seen)
    quality.run(str(tmp_path / "m.pt"), "cpu", settings=({"samples": 8, "iterations": 1},), episodes=2, data=str(data), split="test")
    assert seen[-1] == test  # the spy sees a split when one is used
    assert set(split_episodes(store, meta, "val")[0]) == val


def _small_eval(checkpoint, data, out, **kw):
    small = {"episodes": 2, "baselines": "", "policy": apply_overrides(PolicyConfig(), {"samples": 8, "iterations": 1})}
    return EvalConfig(checkpoint=str(checkpoint), data=str(data), out=str(out), seeds=1, **{**small, **kw})


def test_episodes_recorded_otherwise_than_the_training_data_are_said(data, tmp_path, caplog):
    """Evaluating on data of another look (or action repeat) than the model trained on is allowed (a test of
    robustness), never silent: a warning names each difference, and the report carries it."""
    import logging

    from evaluation.evaluate import evaluate

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    assert json.loads((tmp_path / "m.json").read_text())["data"]["recording"]["render_quality"] == "fast"
    other = collect_tiny(tmp_path / "standard", episodes=8, steps=60, render_quality="standard")
    with caplog.at_level(logging.WARNING):
        evaluate(_small_eval(tmp_path / "m.pt", other, tmp_path / "e"), progress=False)
    said = "render_quality 'standard' (the model's training data: 'fast')"
    assert said in caplog.text and said in (tmp_path / "e" / "results.md").read_text()
    evaluate(_small_eval(tmp_path / "m.pt", data, tmp_path / "same"), progress=False)
    assert "recorded otherwise" not in (tmp_path / "same" / "results.md").read_text()


def test_a_failed_evaluation_leaves_no_partial_output_and_is_not_finished(data, tmp_path, monkeypatch):
    """A full disk while plotting: the error names the file and says what is kept; no 0-byte results.png, no
    results.json (written last), so the rerun is not refused as finished."""
    import evaluation.evaluate as ev
    from evaluation.evaluate import evaluate

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    cfg = _small_eval(tmp_path / "m.pt", data, tmp_path / "e")

    def full_disk(summary, curves, tolerance, path, *rest):
        open(path, "wb").close()
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ev, "plot_results", full_disk)
    with pytest.raises(OSError, match=r"could not write .*results.png \(No space left on device\); what was "
                                      r"measured is kept in .*units: the same command"):
        evaluate(cfg, progress=False)
    monkeypatch.undo()
    # none of the results; what was measured is kept (units), so the rerun only writes the results
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["units"]
    monkeypatch.setattr(ev, "run_episodes", lambda *a, **k: pytest.fail("measured again"))
    evaluate(cfg, progress=False)  # not "already holds": it never finished
    assert {"results.json", "results.md", "results.png"} <= {p.name for p in (tmp_path / "e").iterdir()}
    with pytest.raises(ValueError, match="already holds"):
        evaluate(cfg, progress=False)


def test_a_failed_overwrite_keeps_the_earlier_results_whole(data, tmp_path, monkeypatch):
    """--overwrite whose plot hits a full disk: the earlier evaluation's results.md, index.html, tb/ and
    results.json are all kept as they were (results.md used to be the new run's beside the old results.json);
    the same command then writes the new ones, all of them, without measuring again."""
    import evaluation.evaluate as ev
    from evaluation.evaluate import evaluate

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    evaluate(_small_eval(tmp_path / "m.pt", data, tmp_path / "e"), progress=False)
    out = tmp_path / "e"
    files = lambda: {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    cfg = _small_eval(tmp_path / "m.pt", data, out, baselines="random", overwrite=True)
    plot = ev.plot_results

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ev, "plot_results", full_disk)
    with pytest.raises(OSError, match=r"could not write .*results.png \(No space left on device\)"):
        evaluate(cfg, progress=False)
    assert {k: v for k, v in files().items() if k.parts[0] != "units"} == before
    monkeypatch.setattr(ev, "plot_results", plot)
    monkeypatch.setattr(ev, "run_episodes", lambda *a, **k: pytest.fail("measured again"))
    evaluate(cfg, progress=False)
    assert "random actions" in (out / "results.md").read_text() and "random" in (out / "results.json").read_text()
    assert not (out / "units").exists() and not list(out.glob("*.tmp*"))


def test_one_evaluation_at_a_time_into_a_directory(data, tmp_path):
    from common.files import OutputLockedError, output_lock
    from evaluation.evaluate import evaluate

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    (tmp_path / "e").mkdir()
    with output_lock(tmp_path / "e"):
        with pytest.raises(OutputLockedError, match="is in use by another run"):
            evaluate(_small_eval(tmp_path / "m.pt", data, tmp_path / "e"), progress=False)
    assert not (tmp_path / "e" / "results.json").exists()


def test_too_many_episodes_are_refused_before_the_environments_exist(data, tmp_path, monkeypatch):
    import evaluation.evaluate as ev
    from evaluation.evaluate import evaluate

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    monkeypatch.setattr(ev, "batch_like", lambda *a: pytest.fail("environments allocated before the check"))
    cfg = _small_eval(tmp_path / "m.pt", data, tmp_path / "e")
    cfg.episodes = 100_000_000
    with pytest.raises(ValueError, match=r"--episodes 100000000: the model's \d+ test episodes .* have \d+ start rows"):
        evaluate(cfg, progress=False)
    assert not (tmp_path / "e").exists()  # the output directory it made is not left behind, empty


def test_a_dataset_error_is_not_blamed_on_the_models_env(data, tmp_path):
    from evaluation.evaluate import evaluate

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    with pytest.raises(ValueError, match="no such dataset") as info:
        evaluate(_small_eval(tmp_path / "m.pt", tmp_path / "nowhere", tmp_path / "e"), progress=False)
    assert "the env of the model" not in str(info.value)


def test_demo_checks_its_output_its_lock_and_ffmpeg_before_any_work(data, tmp_path, monkeypatch):
    import evaluation.demo as demo
    import imageio_ffmpeg

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    monkeypatch.setattr(demo, "load_setup", lambda *a, **k: pytest.fail("worked before checking"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        demo.make_demo(demo.DemoConfig(checkpoint=str(tmp_path / "m.pt"), out=str(tmp_path / "file")), progress=False)

    def missing():
        raise RuntimeError("No ffmpeg exe could be found")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", missing)
    with pytest.raises(RuntimeError, match="writing mp4 videos needs ffmpeg"):
        demo.make_demo(demo.DemoConfig(checkpoint=str(tmp_path / "m.pt"), out=str(tmp_path / "v")), progress=False)
    from common.files import OutputLockedError, output_lock

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "demo.json").write_text("{}")  # another demo's file, not removed while it runs
    with output_lock(tmp_path / "d"):
        with pytest.raises(OutputLockedError, match="is in use by another run"):
            demo.make_demo(demo.DemoConfig(checkpoint=str(tmp_path / "m.pt"), out=str(tmp_path / "d"), overwrite=True),
                           progress=False)
    assert (tmp_path / "d" / "demo.json").exists()


def test_recorded_paths_mean_the_same_from_anywhere(tmp_path, monkeypatch):
    """A run directory moved together with its dataset finds it from any working directory; when the data
    is gone, the error says which paths were tried and how to give another (--data)."""
    from conftest import write_synthetic
    from test_train import tiny
    from worldmodel.datasplit import load_with_data
    from worldmodel.train import train

    project = tmp_path / "project"
    write_synthetic(project / "data", n_episodes=6, steps=20)
    monkeypatch.chdir(project)
    train(tiny("data", "run", steps=2, save_graph=False), progress=False)  # relative paths, as a user types them
    (tmp_path / "project").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    _, _, store, data = load_with_data(tmp_path / "moved" / "run" / "model.pt", device="cpu")
    assert len(store) == 6 and data == str(tmp_path / "moved" / "data")  # said plainly, not moved/run/../data
    import shutil

    shutil.rmtree(tmp_path / "moved" / "data")
    with pytest.raises(ValueError, match=r"not where it was recorded \(tried .*moved/data.*\); pass --data "
                                         r"\(`wm collect --env reacher-easy --size 32 .*` records data of its kind\)"):
        load_with_data(tmp_path / "moved" / "run" / "model.pt", device="cpu")


def test_an_episode_is_the_same_whatever_the_number_drawn(data):
    """Episode j of a protocol and seed does not depend on how many are drawn: a demo's episode 0 is the
    evaluation's episode 0."""
    store = EpisodeStore(data)
    for name in ("reach25", "uniform"):
        few = sample_episodes(store, list(range(10)), PROTOCOLS[name], 3, 0, WRIST, 0.05)
        many = sample_episodes(store, list(range(10)), PROTOCOLS[name], 12, 0, WRIST, 0.05)
        for key in ("episode", "t0", "qpos", "goal_qpos"):
            assert np.array_equal(few[key], many[key][:3]), (name, key)


def test_lewm_success_counts_every_control_step_on_raw_angles(data):
    """LeWM's rule: joint angles checked after every control step, inside an action repeat too, without
    wrapping; held at the end is the state after the last one."""
    errors = np.array([[[0.5, 0.5], [0.3, 0.04], [0.2, 0.06]]])  # (B=1, budget+1=3, R=2): inside step 1 only
    rec = episode_records(errors, 0.05)
    assert rec["success"][0] and not rec["held"][0] and rec["steps_to_success"][0] == 1
    assert rec["final_error"][0] == 0.06 and rec["min_error"][0] == 0.04
    store = EpisodeStore(data)
    eps = sample_episodes(store, list(range(10)), PROTOCOLS["lewm"], 3, 0, WRIST, 0.05)
    batch = ReacherBatch("reacher-easy", 3, size=32, action_repeat=2)
    errs = run_episodes(batch, eps, PROTOCOLS["lewm"], lambda: np.ones((3, 2)))
    batch.close()
    assert errs.shape == (3, 51, 2) and np.allclose(errs[:, 0, 0], joint_error(eps["qpos"], eps["goal_qpos"], False))
    assert not np.allclose(errs[:, 1:, 0], errs[:, 1:, 1])  # the arm moved between the two control steps


def test_lewm_training_rows_are_drawn_as_their_evaluation_draws_them(data):
    from evaluation.protocols import lewm_training_rows

    store = EpisodeStore(data)
    eps = lewm_training_rows(store, [0, 1, 2], 5)
    rows = [(i, t) for i in (0, 1, 2) for t in range(store.episodes[i].steps + 1 - 25)]
    picked = np.random.default_rng(42).choice(len(rows), size=5, replace=False)
    assert [(int(i), int(t)) for i, t in zip(eps["episode"], eps["t0"])] == [rows[k] for k in picked]
    for i, t, g in zip(eps["episode"], eps["t0"], eps["goal_qpos"]):
        assert np.array_equal(g, store.states(int(i))["qpos"][t + 25])


@pytest.mark.slow
def test_the_pages_open_in_a_real_browser(data, tmp_path):
    """A real headless browser (Debian's chromium) loads wm eval's and wm demo's pages: the table, the plot
    and the videos are in the page it renders, and the screenshot is not blank."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium here (apt-get install chromium)")
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    _wm("eval", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 2, "--seeds", 1, "--samples", 8,
        "--iterations", 1, "--baselines", "random")
    _wm("demo", "--checkpoint", tmp_path / "m.pt", "--data", data, "--episodes", 2, "--samples", 8, "--iterations", 1,
        "--bank-frames", 50, "--no-gif")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=3000"]
    for page, wanted in ((tmp_path / "eval" / "index.html", ("<table>", "results.png")),
                         (tmp_path / "videos" / "index.html", ("<video", "episode_00.mp4", "summary.png"))):
        dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                             timeout=120).stdout
        assert all(w in dom for w in wanted), dom[:500]
        shot = tmp_path / f"{page.parent.name}.png"
        subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
                       capture_output=True, timeout=120)
        import imageio.v2 as imageio

        pixels = imageio.imread(shot)
        assert pixels.std() > 5  # something was drawn: text, a table, images


def test_the_report_says_when_the_planner_scored_in_bf16():
    from evaluation.report import results_markdown

    for bf16 in (False, True):
        text = results_markdown({}, apply_overrides(EvalConfig(), {"bf16": bf16}), "the test episodes")
        assert ("cost sum, bf16 matrix products, then 8 gradient steps" in text) == bf16


def test_the_report_says_one_seed_not_one_seeds():
    from evaluation.report import results_markdown

    one = {"episodes": 1, "seeds": 1, "iterations": 1, "grad_steps": 1, "receding_horizon": 1}
    text = results_markdown({}, apply_overrides(EvalConfig(), one), "the test episodes")
    assert "1 episode x 1 seed per protocol" in text and "x 1 iteration," in text and "1 gradient step (" in text
    assert "every 1 chunk (" in text and "(1 episode at once)" in text
    assert "4 episodes x 2 seeds per protocol" in results_markdown(
        {}, apply_overrides(EvalConfig(), {"episodes": 4, "seeds": 2}), "the test episodes")


def test_the_random_and_exploration_baselines_play_each_episode_its_own_actions():
    """Episode j's baseline actions are the same whatever else its batch holds (any --episodes), so two
    evaluations of different sizes compare episode by episode, not noise."""
    from evaluation.baselines import exploration_controller, random_controller

    for make in (lambda idx: random_controller(idx, 3), lambda idx: exploration_controller(idx, 3, ["mixed"] * len(idx))):
        alone, batched = make([2]), make([0, 1, 2])
        for _ in range(5):
            a, b = alone(), batched()
            assert a.shape == (1, 2) and b.shape == (3, 2) and np.array_equal(a[0], b[2])
            assert not np.array_equal(b[0], b[1])


def test_the_exploration_baseline_replays_each_files_own_policy_and_refuses_data_without_one(tmp_path):
    """Collections put together keep each file's policy (the dataset as a whole records none), and the
    exploration baseline replays it per episode; a file that records no policy of ours is refused, named,
    before anything is measured, instead of being replayed as random actions."""
    import shutil

    import h5py

    from envs.dataset import EpisodeStore
    from evaluation.baselines import exploration_controller, exploration_policies
    from evaluation.evaluate import evaluate

    both = tmp_path / "both"
    both.mkdir()
    for policy, seed in (("smooth", 1), ("random", 2)):
        src = collect_tiny(tmp_path / policy, episodes=3, steps=40, policy=policy, seed=seed)
        for f in sorted(src.glob("*.h5")):
            shutil.copy(f, both / f"{policy}_{f.name}")
    store = EpisodeStore(both)
    assert "policy" not in store.attrs
    policies = exploration_policies(store, range(len(store)))
    assert sorted(set(policies)) == ["random", "smooth"]
    assert [store.policy(i) for i in range(len(store))] == [str(store.episodes[i].shard.name).split("_")[0]
                                                            for i in range(len(store))]
    act = exploration_controller([0, 1], 0, ["smooth", "random"])
    smooth_alone, random_alone = exploration_controller([0], 0, ["smooth"]), exploration_controller([1], 0, ["random"])
    for _ in range(3):
        a = act()
        assert np.array_equal(a[0], smooth_alone()[0]) and np.array_equal(a[1], random_alone()[0])

    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", both)
    unrecorded = next(both.glob("random_*.h5"))
    with h5py.File(unrecorded, "a") as f:
        del f.attrs["policy"]
    with pytest.raises(ValueError, match=f"{unrecorded.name}.*records none of ours.*--baselines"):
        evaluate(_small_eval(tmp_path / "m.pt", both, tmp_path / "e", baselines="exploration"), progress=False)
    assert not list((tmp_path / "e").rglob("*.json"))  # refused before the world model's first run was measured


def test_a_context_beyond_the_models_history_is_refused_before_any_long_work(data, tmp_path, monkeypatch):
    """`--context` longer than the model's history: `wm demo` refuses it before encoding its retrieval bank,
    `wm eval` before its first episode."""
    import evaluation.demo as demo
    import evaluation.evaluate
    from evaluation.demo import DemoConfig, make_demo
    from evaluation.evaluate import evaluate

    model = WorldModel(tiny_config("mlp", size=32, frameskip=5))
    save_as_trained_on(model, tmp_path / "m.pt", data)
    monkeypatch.setattr(demo, "frame_bank", lambda *a: pytest.fail("the bank was encoded"))
    too_long = apply_overrides(PolicyConfig(), {"context": model.history + 1})
    said = rf"--context {model.history + 1}: the model conditions on at most {model.history} frames"
    with pytest.raises(ValueError, match=said):
        make_demo(DemoConfig(checkpoint=str(tmp_path / "m.pt"), data=str(data), episodes=1, policy=too_long),
                  progress=False)
    real = evaluation.evaluate.run_protocol_seed
    monkeypatch.setattr("evaluation.evaluate.run_protocol_seed", lambda *a: pytest.fail("an episode ran"))
    with pytest.raises(ValueError, match=said):
        evaluate(_small_eval(tmp_path / "m.pt", data, tmp_path / "e", policy=too_long), progress=False)
    monkeypatch.setattr("evaluation.evaluate.run_protocol_seed", real)  # lewm fixes its own context: it runs
    evaluate(_small_eval(tmp_path / "m.pt", data, tmp_path / "lewm", policy=too_long, protocol="lewm", episodes=1),
             progress=False)
