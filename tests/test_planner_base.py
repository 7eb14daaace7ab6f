"""Costs, warm-start shifting, batched scoring, and the contract every planner keeps."""

import pytest
import torch
from planner_fixtures import A, H, PLANNERS, CountingModel, LinearDynamics, make_problems, planner, planner_config

from planners.base import Planner, keep_best, shift_plan, take
from planners.config import PlannerConfig
from planners.costs import final_cost, get_cost, sum_cost
from planners.noise import problem_keys

NAMES = sorted(PLANNERS)


def test_costs_on_hand_made_inputs():
    z_goal = torch.tensor([[1.0, 0.0]])  # (B=1, D=2)
    z_pred = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]], [[1.0, 2.0], [3.0, 0.0]]]])  # (1, N=2, H=2, 2)
    assert torch.equal(final_cost(z_pred, z_goal), torch.tensor([[0.0, 4.0]]))
    assert torch.equal(sum_cost(z_pred, z_goal), torch.tensor([[1.0, 8.0]]))


def test_cost_lookup():
    assert get_cost("final") is final_cost and get_cost("sum") is sum_cost
    custom = lambda z_pred, z_goal: z_pred.sum((-1, -2))  # noqa: E731
    assert get_cost(custom) is custom
    with pytest.raises(ValueError, match="unknown cost"):
        get_cost("nope")


def test_shift_plan():
    plan = torch.arange(1.0, 4.0)[None, :, None].expand(2, 3, 2)  # (B=2, H=3, A=2): chunks 1, 2, 3
    assert torch.equal(shift_plan(plan, 1)[0, :, 0], torch.tensor([2.0, 3.0, 0.0]))
    assert torch.equal(shift_plan(plan, 2, fill="last")[0, :, 0], torch.tensor([3.0, 3.0, 3.0]))
    assert torch.equal(shift_plan(plan, 0), plan)
    assert torch.equal(shift_plan(plan, 5), torch.zeros_like(plan))


def test_take_and_keep_best():
    cand = torch.arange(6.0).reshape(2, 3, 1, 1)  # (B=2, N=3, H=1, A=1)
    picked = take(cand, torch.tensor([[2, 0], [1, 1]]))  # (B, K=2, H, A)
    assert torch.equal(picked[..., 0, 0], torch.tensor([[2.0, 0.0], [4.0, 4.0]]))
    best_a, best_c = torch.full((2, 1, 1), -1.0), torch.tensor([0.5, 0.5])
    a, c = keep_best(best_a, best_c, cand, torch.tensor([[3.0, 0.1, 2.0], [1.0, 2.0, 3.0]]))
    assert torch.equal(c, torch.tensor([0.1, 0.5])) and torch.equal(a.flatten(), torch.tensor([1.0, -1.0]))


def test_score_is_one_batched_rollout_matching_per_candidate_costs():
    model = CountingModel(LinearDynamics())
    p = Planner(model, PlannerConfig(horizon=H, samples=3, cost="final"))
    z, g, a = make_problems(model.model, 2, h=2)
    cand = torch.rand(2, 3, H, A) * 2 - 1  # (B, N, H, A)
    cost = p.score(p.context(z, a, g, problem_keys(0, range(2))), cand)  # (B, N)
    assert model.calls == 1 and model.rows == 6
    for b in range(2):
        for n in range(3):
            z_pred = model.model.rollout(z[b : b + 1], a[b : b + 1], cand[b, n][None])  # (1, H, D)
            assert torch.allclose(cost[b, n], final_cost(z_pred[None], g[b : b + 1])[0, 0])


def test_plan_validates_shapes():
    p = planner("cem")
    z, g, a = make_problems(p.model, 2, h=2)
    with pytest.raises(ValueError, match="a_hist"):
        p.plan(z, g)  # h=2 needs the action between the two history latents
    with pytest.raises(ValueError, match="z_goal"):
        p.plan(z, g[:1], a)
    with pytest.raises(ValueError, match="init"):
        p.plan(z, g, a, init=torch.zeros(2, H + 1, A))
    with pytest.raises(ValueError, match="action_dim"):
        Planner(object(), PlannerConfig())


@pytest.mark.parametrize("name", NAMES)
def test_actions_in_bounds(name):
    p = planner(name, samples=32, iterations=3)
    z, g, _ = make_problems(p.model, 3)
    res = p.plan(z, 50 * g, init=torch.full((3, H, A), 5.0))  # an unreachable goal pushes to the bounds
    assert res.actions.shape == (3, H, A) and res.cost.shape == (3,)
    assert res.actions.abs().max() <= 1.0 and res.actions.abs().max() > 0.99


@pytest.mark.parametrize("name", NAMES)
def test_unclamped_samples_are_scored_as_drawn(name):
    """``clamp_samples`` off (LeWM's planner): the model scores candidates beyond [-1, 1] too."""
    for clamp in (True, False):
        model = CountingModel(LinearDynamics())
        seen = []
        rollout = model.rollout
        model.rollout = lambda z, a, actions: (seen.append(actions.abs().max()), rollout(z, a, actions))[1]
        z, g, _ = make_problems(model.model, 3)
        planner(name, model, samples=32, iterations=2, clamp_samples=clamp).plan(z, 50 * g)
        assert (max(seen) <= 1.0) == clamp


@pytest.mark.parametrize("name", NAMES)
def test_bf16_scores_with_bf16_matrix_products_and_plans_in_float32(name):
    """``bf16``: every model call of the search (rest and final-mean checks included) runs under bf16
    autocast; the plan and its cost come back float32; off, nothing runs in bf16."""
    for bf16 in (False, True):
        model = CountingModel(LinearDynamics())
        seen = []
        rollout = model.rollout

        def spy(z, a, actions):
            seen.append((z[:, -1] @ z.new_ones(z.shape[-1], 1)).dtype)  # what a matmul of the model gives here
            return rollout(z, a, actions).float()  # float32 out, as our predictor's residual stream

        model.rollout = spy
        z, g, _ = make_problems(model.model, 3)
        res = planner(name, model, samples=16, iterations=2, bf16=bf16, rest_margin=0.1).plan(z, g)
        assert set(seen) == {torch.bfloat16 if bf16 else torch.float32} and len(seen) == 4  # 2 iterations, mean, rest
        assert res.actions.dtype == res.cost.dtype == torch.float32


@pytest.mark.parametrize("name", NAMES)
def test_seeding(name):
    z, g, _ = make_problems(LinearDynamics(), 2)
    p = planner(name, seed=3)
    first = p.plan(z, g).actions
    assert torch.equal(planner(name, seed=3).plan(z, g).actions, first)  # same seed, same plan
    assert not torch.equal(planner(name, seed=4).plan(z, g).actions, first)  # other seed, other plan
    assert not torch.equal(p.plan(z, g).actions, first)  # the stream goes on across replans
    p.reset()
    assert torch.equal(p.plan(z, g).actions, first)  # reset restarts it
    p.reset(4)
    assert torch.equal(p.plan(z, g).actions, planner(name, seed=4).plan(z, g).actions)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("h", [1, 2])
def test_batched_equals_single(name, h):
    """Each problem's noise comes from its own key, so a problem planned alone gets exactly the plan it
    gets in a batch; the costs may differ in the last bit (a matmul over 1 row can round differently
    from one over 5 rows)."""
    z, g, a = make_problems(LinearDynamics(), 5, h)
    keys = problem_keys(7, range(10, 15))
    batched = planner(name).plan(z, g, a, keys=keys)
    for b in range(5):
        alone = planner(name).plan(z[b : b + 1], g[b : b + 1], None if a is None else a[b : b + 1], keys=keys[b : b + 1])
        assert torch.equal(alone.actions[0], batched.actions[b])
        assert torch.allclose(alone.cost[0], batched.cost[b], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("grad_steps", [0, 3])
def test_a_problem_with_nan_latents_gets_a_nan_cost_and_the_others_their_plans(name, grad_steps):
    """NaN inputs are not read on the host (that would wait for the device), so they must show in the
    result: the problem's cost is NaN, not the search's starting infinity or a finite cost beside a plan
    of zeros; the other problems of the batch plan as they do alone. A stray NaN candidate (a cost of one's
    own that fails somewhere) is passed over, and a NaN warm start never yields a finite cost beside NaN
    actions."""
    z, g, _ = make_problems(LinearDynamics(), 3, 1)
    keys = problem_keys(7, range(3))
    clean = planner(name, grad_steps=grad_steps).plan(z, g, keys=keys)
    z_nan = z.clone()
    z_nan[1] = float("nan")
    result = planner(name, grad_steps=grad_steps).plan(z_nan, g, keys=keys)
    assert result.cost[1].isnan() and not result.cost[[0, 2]].isnan().any()
    assert torch.allclose(result.actions[[0, 2]], clean.actions[[0, 2]], atol=1e-5)
    init = torch.zeros(3, H, A)
    init[1] = float("nan")
    warm = planner(name, grad_steps=grad_steps).plan(z, g, init=init, keys=keys)
    assert not warm.cost.isinf().any() and (warm.cost.isnan() | warm.actions.isfinite().all(-1).all(-1)).all()

    def fails_for_one_candidate(z_pred, z_goal):  # (B, N, H, D), (B, D) -> (B, N)
        cost = (z_pred[:, :, -1] - z_goal[:, None]).square().sum(-1)
        return cost.index_fill(1, torch.tensor([3]), float("nan")) if cost.shape[1] > 3 else cost  # (a search's)
    stray = planner(name, grad_steps=grad_steps, cost=fails_for_one_candidate).plan(z, g, keys=keys)
    assert stray.cost.isfinite().all() and stray.actions.isfinite().all()
    assert (stray.cost <= clean.cost + 0.01).all()  # the search went on (an MPPI mean of NaN weights did not)


def test_plan_inputs_and_a_cost_of_ones_own_are_checked_by_name():
    z, g, _ = make_problems(LinearDynamics(), 2, 1)
    p = planner("cem")
    with pytest.raises(TypeError, match="z_hist must be a torch tensor, got ndarray"):
        p.plan(z.numpy(), g)
    with pytest.raises(TypeError, match="z_goal must be a torch tensor"):
        p.plan(z, g.numpy())
    with pytest.raises(ValueError, match=r"B >= 1, got torch.float32 \(0, 1, 4\)"):
        p.plan(z[:0], g[:0])
    per_step = lambda z_pred, z_goal: (z_pred - z_goal[:, None, None]).square().sum(-1)  # noqa: E731  (B, N, H)
    with pytest.raises(ValueError, match=r"one value per candidate, \(2, 64\) \(B, N\).*got \(2, 64, 5\)"):
        PLANNERS["cem"](LinearDynamics(), planner_config("cem", samples=64, cost=per_step)).plan(z, g)


def test_a_planner_config_built_directly_is_checked_as_settings_by_name_are():
    """``PlannerConfig(...)`` in Python refuses what ``apply_overrides`` and the command line refuse, naming
    the setting; numpy scalars (a grid of settings) are taken as the numbers they are."""
    import numpy as np

    from planners.config import CEMConfig

    for settings, said in [({"samples": 3.5}, "samples must be an integer"),
                           ({"iterations": 2.5}, "iterations must be an integer"),
                           ({"samples": "20"}, "samples must be an integer"), ({"rest": "no"}, "rest must be true"),
                           ({"action_cost": float("nan")}, "action_cost must be a finite number"),
                           ({"planner": "rrt"}, "planner must be one of")]:
        with pytest.raises(ValueError, match=said):
            PlannerConfig(**settings)
    with pytest.raises(ValueError, match="cem.init_std must be a finite number"):
        CEMConfig(init_std=float("inf"))
    cfg = PlannerConfig(samples=np.int64(30), grad_lr=np.float32(0.25), rest=np.bool_(False))
    assert (cfg.samples, cfg.grad_lr, cfg.rest) == (30, 0.25, False) and type(cfg.samples) is int
    with pytest.raises(ValueError, match="cem.elites <= samples, got cem.elites=30, samples=10"):
        PlannerConfig(samples=10, cem=CEMConfig(elites=30))


def test_another_planners_settings_are_refused_naming_them():
    """``--planner mppi --cem.elites 30`` planned with MPPI and dropped the elites silently; typed at their
    defaults they change nothing and are taken, and a planner class given the other's settings refuses them."""
    from common.config import apply_overrides
    from planners.config import CEMConfig, MPPIConfig

    with pytest.raises(ValueError, match=r"^--cem.elites: the mppi planner does not read it \(--planner mppi\)"):
        apply_overrides(PlannerConfig(), {"planner": "mppi", "cem.elites": 30})
    with pytest.raises(ValueError, match="--mppi.temperature, --mppi.momentum: the cem planner does not read them"):
        PlannerConfig(mppi=MPPIConfig(temperature=0.5, momentum=0.2))
    with pytest.raises(ValueError, match="--cem.init-std: the mppi planner does not read it"):
        PLANNERS["mppi"](LinearDynamics(), PlannerConfig(cem=CEMConfig(init_std=0.5)))
    taken = PlannerConfig(planner="mppi", cem=CEMConfig(elites=None), mppi=MPPIConfig(temperature=0.3))
    assert taken.mppi.temperature == 0.3


def test_a_setting_its_switch_turns_off_is_refused_naming_both():
    """``--no-rest --rest-margin 0.1`` planned without the rest sequence and dropped the margin silently (so did
    --grad-lr with --grad-steps 0, cem.keep_fraction without keep_elites, mppi.min_std without adapt_std);
    typed at their defaults they change nothing and are taken."""
    from common.config import apply_overrides

    for settings, said in (({"rest": False, "rest_margin": 0.1}, "--rest-margin: not read with --no-rest"),
                           ({"grad_steps": 0, "grad_lr": 0.1}, "--grad-lr: not read with --grad-steps 0"),
                           ({"cem.keep_elites": False, "cem.keep_fraction": 0.5},
                            "--cem.keep-fraction: not read with --no-cem.keep-elites"),
                           ({"planner": "mppi", "mppi.adapt_std": False, "mppi.min_std": 0.1},
                            "--mppi.min-std: not read with --no-mppi.adapt-std")):
        with pytest.raises(ValueError, match=f"^{said}, which turns off what it sets; leave it out"):
            apply_overrides(PlannerConfig(), settings)
    taken = apply_overrides(PlannerConfig(), {"rest": False, "rest_margin": 0.0, "grad_steps": 0, "grad_lr": 0.05})
    assert not taken.rest and taken.grad_steps == 0
    from planners.subgoals import SubgoalConfig

    with pytest.raises(ValueError, match="^--subgoals.reach, --subgoals.lookahead: not read with "
                                         "--no-subgoals.enabled, which turns off what they set; leave them out"):
        SubgoalConfig(enabled=False, reach=2.0, lookahead=4.0)
    assert not SubgoalConfig(enabled=False, reach=1.0).enabled


@pytest.mark.parametrize("name", NAMES)
def test_problems_of_a_batch_get_independent_noise(name):
    """Identical problems with different keys explore differently (no common random numbers), and the
    default keys differ per row."""
    z, g, a = make_problems(LinearDynamics(), 1, 2)
    rep = lambda x: x.expand(4, *x.shape[1:])  # noqa: E731  four copies of one problem
    plans = planner(name).plan(rep(z), rep(g), rep(a)).actions
    assert all(not torch.equal(plans[0], plans[k]) for k in range(1, 4))
    same = planner(name).plan(rep(z), rep(g), rep(a), keys=problem_keys(0, [5, 5, 5, 5])).actions
    assert all(torch.equal(same[0], same[k]) for k in range(1, 4))


@pytest.mark.parametrize("name", NAMES)
def test_rollout_calls_independent_of_batch_and_samples(name):
    counts = []
    for B, N in [(1, 8), (6, 40)]:
        model = CountingModel(LinearDynamics())
        z, g, _ = make_problems(model.model, B)
        planner(name, model, samples=N, iterations=4).plan(z, g)
        counts.append(model.calls)
        assert model.rows == 4 * B * N + B  # 4 iterations of B*N candidates, then the final mean
    assert counts == [5, 5]


@pytest.mark.parametrize("name", NAMES)
def test_warm_started_plans_run_warm_iterations(name):
    """A cold plan runs ``iterations``; one from a warm start ``warm_iterations`` (0: ``iterations``), and the
    warm start still helps: the refined plan is no worse than the plan it started from."""
    model = CountingModel(LinearDynamics())
    z, g, _ = make_problems(model.model, 3)
    p = planner(name, model, samples=16, iterations=6, warm_iterations=2)
    cold = p.plan(z, g)
    assert model.calls == 6 + 1  # iterations, then the final mean
    model.calls = 0
    warm = p.plan(z, g, init=cold.actions)
    assert model.calls == 2 + 1
    assert bool((warm.cost <= cold.cost + 1e-6).all())
    model.calls = 0
    planner(name, model, samples=16, iterations=6).plan(z, g, init=cold.actions)
    assert model.calls == 6 + 1
    with pytest.raises(ValueError, match="warm_iterations"):
        planner(name, model, warm_iterations=-1)


def test_more_warm_iterations_than_iterations_are_refused_naming_both():
    """Warm iterations replace ``iterations`` on a warm-started replan, which starts near a good plan: more of
    them than a cold plan runs is no amortisation, most likely the two settings swapped."""
    with pytest.raises(ValueError, match=r"warm_iterations \(--warm-iterations\) 5 must be at most iterations "
                                         r"\(--iterations\) 4"):
        PlannerConfig(iterations=4, warm_iterations=5)
    with pytest.raises(ValueError, match=r"warm_iterations \(--warm-iterations\) 9 .* iterations \(--iterations\) 8"):
        planner_config("cem", iterations=8, warm_iterations=9)
    assert PlannerConfig(iterations=4, warm_iterations=4).warm_iterations == 4  # as many: allowed (0 says the same)


def test_action_and_stay_costs_add_their_terms():
    """``action_cost`` adds w x the summed squared actions, ``stay_cost`` w x the squared latent change over
    the last chunk: a plan still moving at its end costs more than one that has stopped, at equal distance."""
    z_pred = torch.zeros(1, 2, H, 4)  # (B, N, H, D)
    z_pred[0, 0, -2:, 0] = torch.tensor([0.0, 1.0])  # candidate 0 still moves over its last chunk
    z_pred[0, 1, -2:, 0] = torch.tensor([1.0, 1.0])  # candidate 1 arrived a chunk earlier and stays
    goal = torch.zeros(1, 4)
    actions = torch.full((1, 2, H, A), 0.5)
    base = Planner(LinearDynamics(), PlannerConfig(horizon=H, cost="final"))
    plain = base.plan_cost(z_pred, goal, actions)
    assert torch.equal(plain, torch.tensor([[1.0, 1.0]]))
    stay = Planner(LinearDynamics(), PlannerConfig(horizon=H, cost="final", stay_cost=2.0)).plan_cost(z_pred, goal, actions)
    assert torch.equal(stay, torch.tensor([[3.0, 1.0]]))
    act = Planner(LinearDynamics(), PlannerConfig(horizon=H, cost="final", action_cost=0.1)).plan_cost(z_pred, goal, actions)
    assert torch.allclose(act, plain + 0.1 * 0.25 * H * A)
    with pytest.raises(ValueError, match="stay_cost"):
        PlannerConfig(horizon=1, stay_cost=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_custom_cost(name):
    model = LinearDynamics()
    z, g, _ = make_problems(model, 2)
    res = planner(name, model, cost="final").plan(z, g)
    z_pred = model.rollout(z, None, res.actions)  # (B, H, D)
    assert torch.allclose(res.cost, final_cost(z_pred[:, None], g)[:, 0])
    custom = planner(name, model, cost=lambda zp, zg: (zp - zg[:, None, None]).abs().sum((-1, -2))).plan(z, g)
    z_pred = model.rollout(z, None, custom.actions)
    assert torch.allclose(custom.cost, (z_pred - g[:, None]).abs().sum((-1, -2)))


@pytest.mark.parametrize("name", NAMES)
def test_config_rejects_nonsense(name):
    with pytest.raises(ValueError):
        planner(name, samples=0)


@pytest.mark.parametrize("name", NAMES)
def test_no_host_sync_while_planning(name, monkeypatch):
    """No tensor value reaches Python during planning (it would stall a GPU and break graph capture)."""
    z, g, a = make_problems(LinearDynamics(), 2, h=2)
    p = planner(name, iterations=2, grad_steps=2)  # the gradient steps too

    def sync(*args):
        raise AssertionError("host synchronisation inside plan()")

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, sync)
    p.plan(z, g, a, init=torch.zeros(2, H, A))


def _compiled_equals_eager(name: str, exact: bool):
    z, g, a = make_problems(LinearDynamics(), 3, h=2)
    eager = planner(name, samples=32, iterations=3).plan(z, g, a)
    compiled_planner = planner(name, samples=32, iterations=3, compile=True)
    compiled = compiled_planner.plan(z, g, a)
    again = compiled_planner.plan(z, g, a)  # the compiled step is reused across calls
    if exact:
        assert torch.equal(eager.actions, compiled.actions)
    else:  # inductor may reorder float arithmetic
        torch.testing.assert_close(eager.actions, compiled.actions, rtol=1e-4, atol=1e-5)
    assert again.actions.shape == compiled.actions.shape


@pytest.mark.parametrize("name", NAMES)
def test_compiled_iteration_captures_whole_and_plans_the_same(name, monkeypatch):
    """One planning iteration compiles into a single graph (fullgraph: no host sync, no data-dependent
    Python), and gives the eager plan. aot_eager traces exactly as inductor does, without its C++ build."""
    import planners.base

    torch._dynamo.reset()
    monkeypatch.setattr(planners.base, "COMPILE_BACKEND", "aot_eager")
    _compiled_equals_eager(name, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_inductor_compiled_iteration_plans_the_same(name):
    torch._dynamo.reset()
    _compiled_equals_eager(name, exact=False)


@pytest.mark.parametrize("name", NAMES)
def test_a_reached_goal_is_held_exactly(name):
    """At the goal of a system at rest, the rest sequence (all-zero actions) is the best plan: with it among
    the candidates the planner returns it exactly; from a warm start that moves, sampling only comes near."""
    model = LinearDynamics(spin=0.0)
    z = torch.randn(3, 1, 4, generator=torch.Generator().manual_seed(5))
    moving = torch.full((3, H, A), 0.3)  # the shifted plan that brought the arm here
    held = planner(name, model, cost="sum").plan(z, z[:, -1], init=moving)
    assert torch.equal(held.actions, torch.zeros_like(held.actions)) and torch.equal(held.cost, torch.zeros(3))
    sampled = planner(name, model, cost="sum", rest=False).plan(z, z[:, -1], init=moving)
    assert sampled.actions.abs().max() > 0


def test_coloured_noise_keeps_unit_variance_and_the_drift_that_moves_a_plans_end():
    """Red noise (beta 2) is mostly its slow components, the constant one included: a candidate's actions
    summed over the plan spread more than white noise's, not less, and each action keeps unit variance."""
    from planners.base import coloured
    from planners.noise import standard_normal

    white = standard_normal(problem_keys(0, range(2)), 0, (2000, 5, 2))  # (B, n, H chunks, 2 actions)
    red = coloured(white, 2.0, 1)
    assert red.var().item() == pytest.approx(1.0, abs=0.05)
    assert red.sum(2).std() > 1.1 * white.sum(2).std()  # the drift kept (it was normalised away: sums ~ 0)
    assert torch.allclose(coloured(white, 0.0, 1), white, atol=1e-5)  # beta 0: white noise as it was


def test_rest_margin_favours_the_rest_sequence_for_negative_costs_too():
    """A cost of one's own may be negative: a margin makes resting easier whatever the cost's sign."""
    lin = LinearDynamics()
    z_hist, z_goal, _ = make_problems(lin, 2, 1)
    for cost in ("sum", lambda z, g: -(1.0 / (1.0 + (z - g[:, None, None]).square().sum(-1))).sum(-1)):
        plain = planner("cem", lin, cost=cost).plan(z_hist, z_goal)
        generous = planner("cem", lin, cost=cost, rest_margin=1e6).plan(z_hist, z_goal)
        assert torch.all(generous.actions == 0) and not torch.all(plain.actions == 0)


def test_gradient_steps_need_clamped_samples():
    with pytest.raises(ValueError, match="grad_steps refine a plan within \\[-1, 1\\]: they need clamp_samples"):
        planner_config("cem", grad_steps=4, clamp_samples=False)
    planner_config("cem", grad_steps=0, clamp_samples=False)  # LeWM's planner: no gradient steps
