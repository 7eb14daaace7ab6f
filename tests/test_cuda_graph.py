"""``planners.cuda_graph``: a whole plan captured once and replayed. On a CPU the capture is replaced by
one that replays by running the captured function again into the same output tensors, which checks
everything but CUDA itself: each call's inputs reach the replay, outputs are copied out, one capture per
shape. The CUDA tests run where a GPU is (``wm bench --what gpu`` runs the suite there)."""

import pytest
import torch
from planner_fixtures import A, H, PLANNERS, LinearDynamics, make_problems, planner

import planners.cuda_graph
from planners.cuda_graph import CapturedSearch, capture_cuda_graph

NAMES = sorted(PLANNERS)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class RerunCapture:
    """Stands in for ``capture_cuda_graph``: ``replay`` reruns ``fn`` and writes into the first outputs."""

    def __init__(self):
        self.captures = 0

    def __call__(self, fn, device):
        self.captures += 1
        outputs = fn()

        def replay():
            again = fn()
            outputs.actions.copy_(again.actions)
            outputs.cost.copy_(again.cost)

        return replay, outputs


@pytest.mark.parametrize("name", NAMES)
def test_a_captured_plan_equals_the_plain_one_call_after_call(name, monkeypatch):
    capture = RerunCapture()
    monkeypatch.setattr(planners.cuda_graph, "capture_cuda_graph", capture)
    model = LinearDynamics()
    settings = dict(rest_margin=0.1, warm_iterations=2, grad_steps=2)
    plain, captured = planner(name, model, **settings), planner(name, model, **settings, cuda_graph=True)
    z, g, a = make_problems(model, 3, h=2)
    z2, g2, a2 = make_problems(model, 3, h=2, seed=1)
    calls = [(z, g, a, None), (z, g, a, None), (z2, g2, a2, torch.rand(3, H, A) - 0.5), (z, g, a, None)]
    results = []
    for zh, goal, ah, init in calls:  # new goals, a warm start, and the same problem again (fresh noise)
        want, got = plain.plan(zh, goal, ah, init=init), captured.plan(zh, goal, ah, init=init)
        assert torch.equal(want.actions, got.actions) and torch.equal(want.cost, got.cost)
        results.append(got)
    assert not torch.equal(results[0].actions, results[1].actions)  # each call's noise streams reach the replay
    assert capture.captures == 2  # one per (shapes, iterations): a warm start runs 2 iterations here
    captured.plan(z[:2], g[:2], a[:2])
    assert capture.captures == 3  # another batch size is captured once more


@pytest.mark.parametrize("name", NAMES)
def test_a_captured_bf16_plan_runs_without_the_autocast_cache(name, monkeypatch):
    """Autocast's cache of cast weights is freed when its context exits, so a CUDA graph must not capture
    reads of it: a captured bf16 search scores with the cache off, an eager one with it on."""
    monkeypatch.setattr(planners.cuda_graph, "capture_cuda_graph", RerunCapture())
    for captured in (False, True):
        model, seen = LinearDynamics(), set()
        z, g, _ = make_problems(model, 2)
        rollout = model.rollout
        model.rollout = lambda z, a, actions: (seen.add((torch.is_autocast_enabled("cpu"),
                                                         torch.is_autocast_cache_enabled())), rollout(z, a, actions))[1]
        planner(name, model, bf16=True, cuda_graph=captured).plan(z, g)
        assert seen == {(True, not captured)}


def test_callers_get_copies_of_the_graphs_outputs():
    search = CapturedSearch(lambda x: planners.base.PlanResult(x * 2, x.sum(-1)), capture=RerunCapture())
    first = search(torch.ones(2, 1))
    second = search(torch.full((2, 1), 3.0))
    assert torch.equal(first.actions, torch.full((2, 1), 2.0)) and torch.equal(second.actions, torch.full((2, 1), 6.0))


def test_cuda_graph_without_cuda_is_a_clear_error():
    from test_model import tiny_config
    from worldmodel.model import WorldModel

    with pytest.raises(ValueError, match="cuda_graph captures CUDA graphs: it needs the model on CUDA, got cpu"):
        planner("cem", WorldModel(tiny_config("mlp", size=32)), cuda_graph=True)
    with pytest.raises(ValueError, match="must be on CUDA, got cpu"):
        capture_cuda_graph(lambda: None, torch.device("cpu"))


@CUDA
@pytest.mark.parametrize("compiled", [False, True])
def test_a_cuda_graph_plans_as_the_eager_planner_does(compiled):
    from test_model import tiny_config
    from worldmodel.model import WorldModel

    torch.manual_seed(0)
    model = WorldModel(tiny_config("mlp", size=32)).cuda().eval()
    B, h, d = 4, model.history, model.cfg.latent_dim
    plain = planner("cem", model, samples=64, iterations=5, rest_margin=0.1)
    graphed = planner("cem", model, samples=64, iterations=5, rest_margin=0.1, cuda_graph=True, compile=compiled)
    for seed in range(3):  # the first call captures, the later ones replay with new inputs
        g = torch.Generator().manual_seed(seed)
        z_hist, z_goal = torch.randn(B, h, d, generator=g).cuda(), torch.randn(B, d, generator=g).cuda()
        a_hist = (torch.rand(B, h - 1, model.action_dim, generator=g) * 2 - 1).cuda()
        want, got = plain.plan(z_hist, z_goal, a_hist), graphed.plan(z_hist, z_goal, a_hist)
        torch.testing.assert_close(got.actions, want.actions, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.cost, want.cost, rtol=1e-4, atol=1e-6)
