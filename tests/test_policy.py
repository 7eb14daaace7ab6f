import numpy as np
import pytest
import torch

from envs import ReacherPixels
from common.config import apply_overrides
from planners.policy import MPCPolicy, PolicyConfig, load_policy, policy_config, recorded_planner
from test_model import tiny_config
from worldmodel.model import PRESET_PLANNER, CheckpointError, WorldModel


@pytest.fixture
def model():
    torch.manual_seed(0)
    return WorldModel(tiny_config("mlp", size=32, frameskip=2)).eval()


def small(receding_horizon: int = 1, **kw) -> PolicyConfig:
    """A small CEM policy without subgoals."""
    return apply_overrides(PolicyConfig(), {"samples": 16, "cem.elites": 4, "iterations": 2, "horizon": 3,
                                            "subgoals.enabled": False, "receding_horizon": receding_horizon, **kw})


def test_policy_runs_an_episode_end_to_end(model):
    env = ReacherPixels(size=32)
    obs, _ = env.reset(seed=0)
    policy = MPCPolicy(model, small(receding_horizon=1))
    policy.reset(env.render_goal([0.5, -0.5]))
    for _ in range(12):
        action = policy.act(obs)
        assert action.shape == (2,) and action.dtype == np.float32 and np.all(np.abs(action) <= 1)
        obs, *_ = env.step(action)
    env.close()
    assert len(policy.plan_times) == 6  # a replan at each of the 6 chunk boundaries (frameskip 2)
    assert policy.last_prediction.shape == (1, 16)


def test_retarget_heads_for_a_new_goal_without_starting_again(model):
    """A goal sequence: the policy keeps its history and the chunk in play, and plans for the new goal from
    the next chunk boundary on."""
    env = ReacherPixels(size=32)
    obs, _ = env.reset(seed=0)
    policy = MPCPolicy(model, small())
    with pytest.raises(RuntimeError, match="reset"):
        policy.retarget(env.render_goal([0.5, -0.5]))
    first, second = env.render_goal([0.5, -0.5]), env.render_goal([-1.0, 1.0])
    policy.reset(first)
    for _ in range(5):  # two chunks and one step into the third (frameskip 2)
        obs, *_ = env.step(policy.act(obs))
    history, playing = policy._z_hist, policy._chunk_host.copy()
    policy.retarget(second)
    assert policy._t == 5 and policy._z_hist is history and len(policy.plan_times) == 3  # nothing restarted
    obs, *_ = env.step(action := policy.act(obs))
    assert np.array_equal(action, playing[0, 1])  # the chunk in play is played to its end
    policy.act(obs)  # a boundary: the next plan heads for the new goal
    with torch.no_grad():
        assert torch.allclose(policy.last_target, model.encode(torch.from_numpy(second)[None]), atol=1e-6)
    assert len(policy.plan_times) == 4
    with pytest.raises(ValueError, match="2 goals for 1 episodes"):
        policy.retarget(np.stack([first, second]))
    env.close()


@pytest.mark.parametrize("receding, plans", [(1, 6), (2, 3), (3, 2)])
def test_replans_every_receding_horizon_chunks(model, receding, plans):
    policy = MPCPolicy(model, small(receding_horizon=receding))
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    policy.reset(frames)
    for _ in range(12):
        assert policy.act_batch(frames).shape == (3, 2)
    assert len(policy.plan_times) == plans


def test_plays_the_planned_chunk_between_replans(model):
    policy = MPCPolicy(model, small(receding_horizon=3))
    frame = np.zeros((32, 32, 3), np.uint8)
    policy.reset(frame)
    actions = np.stack([policy.act(frame) for _ in range(6)])  # 3 chunks of 2 env steps, one plan
    assert np.allclose(actions.reshape(3, 4), policy._plan[0].numpy(), atol=1e-6)


def test_plays_and_remembers_a_plan_beyond_the_action_range_clipped(model, monkeypatch):
    """A plan scored unclamped (LeWM's planner) may leave [-1, 1]: the env plays it clipped, and the history
    the next plan starts from holds what was played."""
    from planners.base import PlanResult

    policy = MPCPolicy(model, small(receding_horizon=1, clamp_samples=False, grad_steps=0))
    frame = np.zeros((32, 32, 3), np.uint8)
    policy.reset(frame)
    plan = torch.linspace(-3, 3, 3 * model.action_dim).reshape(1, 3, model.action_dim)
    monkeypatch.setattr(policy.planner, "plan", lambda *a, **k: PlanResult(plan, torch.zeros(1)))
    played = np.stack([policy.act(frame) for _ in range(4)])  # two chunks of 2 env steps
    assert np.abs(played).max() == 1.0
    assert np.allclose(played[:2].reshape(-1), plan[0, 0].clamp(-1, 1).numpy())
    assert torch.equal(policy._a_hist[0, -1], plan[0, 0].clamp(-1, 1))  # the chunk played, as history


def test_bad_inputs_are_clear_errors(model):
    policy = MPCPolicy(model, small())
    with pytest.raises(RuntimeError, match="reset"):
        policy.act(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="32, 32, 3"):
        policy.reset(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        policy.reset(np.zeros((32, 32, 3), np.float32))
    policy.reset(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"must be \(32, 32, 3\) .*got \(48, 48, 3\)$"):
        policy.act(np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ValueError, match=r"act takes one observation \(32, 32, 3\), got \(32, 32\)"):
        policy.act(np.zeros((32, 32), np.uint8))  # a grey frame: named as given
    with pytest.raises(ValueError, match=r"got \(2, 32, 32\)$"):
        policy.act_batch(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="receding_horizon"):
        MPCPolicy(model, small(receding_horizon=4))
    with pytest.raises(ValueError, match=rf"--context {model.history + 1}: the model conditions on at most "
                                         rf"{model.history} frames"):
        MPCPolicy(model, small(context=model.history + 1))  # more frames than it has seen: refused, not cut
    with pytest.raises(ValueError, match="unknown settings"):
        small(**{"cem.temperature": 1.0})
    with pytest.raises(ValueError, match="planner must be one of"):
        small(planner="rrt")


def test_bad_goal_latents_are_refused_before_the_episodes_change(model):
    """``reset_latent`` names ``z_goal`` for a wrong shape, size, dtype or type, and the episodes under way
    go on as if it had not been called."""
    env = ReacherPixels(size=32)
    obs, _ = env.reset(seed=0)
    policy = MPCPolicy(model, small())
    policy.reset(env.render_goal([0.5, -0.5]))
    policy.act(obs)
    goal = policy._z_goal.clone()
    for bad in (torch.randn(16), torch.randn(1, 10), torch.zeros(1, 16, dtype=torch.long), torch.randn(0, 16),
                np.zeros((1, 16), np.float32)):
        with pytest.raises(ValueError, match=r"z_goal must be a float tensor of goal latents \(B, 16\)"):
            policy.reset_latent(bad)
        assert torch.equal(policy._z_goal, goal)
        policy.act(obs)
    for bad in (torch.full((1, 16), float("nan")), torch.full((1, 16), float("inf"))):  # it planned the rest plan
        with pytest.raises(ValueError, match=r"z_goal holds NaN or inf values"):
            policy.reset_latent(bad)
        assert torch.equal(policy._z_goal, goal)
    env.close()


def test_read_only_frames_are_taken_without_a_warning(model, recwarn):
    env = ReacherPixels(size=32)
    obs, _ = env.reset(seed=0)
    goal = env.render_goal([0.5, -0.5])
    env.close()
    obs.setflags(write=False)
    goal.setflags(write=False)
    policy = MPCPolicy(model, small())
    policy.reset(goal)
    policy.act(obs)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_load_policy(model, tmp_path):
    model.save(tmp_path / "m.pt")
    policy = load_policy(tmp_path / "m.pt", device="cpu", planner="mppi", samples=8, iterations=2, horizon=2,
                         **{"subgoals.enabled": False})
    assert policy.planner.cfg.samples == 8 and policy.planner.cfg.horizon == 2
    assert policy.planner.cfg.cost == "sum"  # the default: a final-step cost keeps deferring arrival under MPC
    final = load_policy(tmp_path / "m.pt", device="cpu", cost="final", **{"cem.elites": 3, "subgoals.enabled": False})
    assert final.planner.cfg.cost == "final" and final.planner.n_elites == 3  # settings by name reach the planner
    policy.reset(np.zeros((32, 32, 3), np.uint8))
    assert policy.act(np.zeros((32, 32, 3), np.uint8)).shape == (2,)
    with pytest.raises(CheckpointError):
        load_policy(tmp_path / "missing.pt")


def test_a_model_is_planned_as_its_file_records_unless_told_otherwise(model, tmp_path):
    """model.json's ``planner`` (a preset's validated settings) is what load_policy plans with; the settings
    given override it; a bad record is an error naming the file and the setting."""
    model.save(tmp_path / "m.pt", extra={"planner": {"samples": 12, "iterations": 3, "grad_steps": 0}})
    plain = {"subgoals.enabled": False}
    policy = load_policy(tmp_path / "m.pt", device="cpu", **plain)
    assert (policy.planner.cfg.samples, policy.planner.cfg.iterations, policy.planner.cfg.grad_steps) == (12, 3, 0)
    policy = load_policy(tmp_path / "m.pt", device="cpu", samples=8, **plain)
    assert (policy.planner.cfg.samples, policy.planner.cfg.iterations) == (8, 3)
    assert recorded_planner(tmp_path / "m.pt") == {"samples": 12, "iterations": 3, "grad_steps": 0}
    model.save(tmp_path / "plain.pt")
    assert recorded_planner(tmp_path / "plain.pt") == {} and policy_config(tmp_path / "plain.pt") == PolicyConfig()
    model.save(tmp_path / "older.pt", extra={"train_config": {"preset": "hold"}})  # written before the record
    assert recorded_planner(tmp_path / "older.pt") == PRESET_PLANNER["hold"]
    older = load_policy(tmp_path / "older.pt", device="cpu", samples=20, iterations=4, grad_steps=8, **plain)
    assert older.planner.cfg.noise_beta == 0 != PolicyConfig().plan.noise_beta  # typed budgets keep its white noise
    # a hold model recorded before its preset pinned white noise is planned with it, as it was chosen
    model.save(tmp_path / "before.pt", extra={"train_config": {"preset": "hold"},
                                              "planner": {"samples": 100, "iterations": 10, "grad_steps": 0}})
    assert recorded_planner(tmp_path / "before.pt") == PRESET_PLANNER["hold"]
    model.save(tmp_path / "told.pt", extra={"train_config": {"preset": "hold"}, "planner": {}})  # the record rules
    assert recorded_planner(tmp_path / "told.pt") == {}
    model.save(tmp_path / "dashes.pt", extra={"planner": {"grad-steps": 0}})  # as typed: one name still
    assert recorded_planner(tmp_path / "dashes.pt") == {"grad_steps": 0}
    model.save(tmp_path / "cem.pt", extra={"planner": {"cem.elites": 3, "samples": 40}})  # CEM's own setting
    mppi = policy_config(tmp_path / "cem.pt", {"planner": "mppi"}).plan  # not read by MPPI: left out, not refused
    assert (mppi.planner, mppi.samples, policy_config(tmp_path / "cem.pt").plan.cem.elites) == ("mppi", 40, 3)
    for bad, says in (({"samples": "many"}, "samples"), ({"cem.warmth": 1}, "cem.warmth"), ([100], "'planner'")):
        model.save(tmp_path / "bad.pt", extra={"planner": bad})
        with pytest.raises(CheckpointError, match=rf"bad.json: .*{says}"):
            load_policy(tmp_path / "bad.pt", device="cpu", **plain)


def test_frames_go_to_the_device_only_at_chunk_boundaries(model, monkeypatch):
    """act_batch checks every frame but copies and encodes only every frameskip steps (frameskip 2 here)."""
    policy = MPCPolicy(model, small())
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    policy.reset(frames)
    uploads = []
    real = policy._to_device
    monkeypatch.setattr(policy, "_to_device", lambda x: uploads.append(len(x)) or real(x))
    for _ in range(8):
        policy.act_batch(frames)
    assert uploads == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="non-empty"):
        policy.act_batch(np.zeros((0, 32, 32, 3), np.uint8))


def test_history_shorter_than_the_models_is_used_as_training_pads(model):
    """set_history with the frames before the start equals a padded start when the history is the start
    frame repeated with zero chunks."""
    frame = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    plain = MPCPolicy(model, small())
    plain.reset(frame)
    primed = MPCPolicy(model, small())
    primed.reset(frame)
    primed.set_history(frame[:, None], np.zeros((1, 1, model.action_dim), np.float32))  # history 2: one frame
    assert np.array_equal(plain.act(frame[0]), primed.act(frame[0]))
    with pytest.raises(RuntimeError, match="before the first act"):
        primed.set_history(frame[:, None], np.zeros((1, 1, model.action_dim), np.float32))


def test_load_policy_on_cuda_without_cuda_is_a_clear_error(model, tmp_path, monkeypatch):
    model.save(tmp_path / "m.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        load_policy(tmp_path / "m.pt", device="cuda", **{"subgoals.enabled": False})


def test_no_host_sync_while_replanning(model):
    """A replan (waypoint lookup on the subgoal graph and the plan itself) never reads a tensor on the
    host: on a GPU it would stall the pipeline at every chunk. Only the chunk's copy to the host, once per
    chunk, is allowed, outside the replan. The guard is shown able to fail on a tensor read."""
    from contextlib import ExitStack
    from unittest import mock

    graph = _graph()
    cfg = apply_overrides(small(), {"subgoals.enabled": True, "subgoals.reach": 0.5})
    policy = MPCPolicy(model, cfg, graph)
    real = policy._replan

    def no_sync(*args):
        raise AssertionError("host synchronisation inside a replan")

    def guarded(*args):
        with ExitStack() as stack:
            for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
                stack.enter_context(mock.patch.object(torch.Tensor, name, no_sync))
            real(*args)

    policy._replan = guarded
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    policy.reset(frames)
    for _ in range(6):  # three chunks of frameskip 2: three replans
        policy.act_batch(frames)
    assert len(policy.plan_times) == 3 and policy._route is not None
    # the subgoal code's own time, apart: routing at reset, the solve at the first boundary (host work, outside
    # the replan), a look after each of the three plans at whether an arm neared the edge of the solve
    assert len(policy.waypoint_times) == 3 and len(policy.route_times) == 1 + 1 + 3
    from planners import subgoals

    real_targets = subgoals.targets
    sloppy = lambda *a: real_targets(*a) if bool(a[1].near.any()) or True else None  # noqa: E731 (reads a flag)
    with mock.patch.object(subgoals, "targets", sloppy), pytest.raises(AssertionError, match="host synchronisation"):
        policy.act_batch(frames)
        policy.act_batch(frames)  # the next chunk boundary replans


def test_settings_by_name_and_history_edges_are_clear_errors(model, tmp_path):
    """Each value is checked by its setting's type and range before anything runs: NaN, a string for a
    number, 2.5 for a count, a device nothing runs on, a word for a switch; NaN history chunks too."""
    model.save(tmp_path / "m.pt")
    for overrides, message in (({"cem.init_std": float("nan")}, r"cem\.init_std must be a finite number, got nan"),
                               ({"samples": "100"}, r"samples must be an integer, got '100'"),
                               ({"samples": 2.5}, r"samples must be an integer, got 2\.5"),
                               ({"subgoals": "maybe"}, r"unknown settings \['subgoals'\]"),
                               ({"subgoals.enabled": "maybe"}, r"subgoals\.enabled must be true or false, got 'maybe'")):
        with pytest.raises(ValueError, match=message):
            load_policy(tmp_path / "m.pt", device="cpu", **overrides)
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        load_policy(tmp_path / "m.pt", device="meta", **{"subgoals.enabled": False})
    policy = MPCPolicy(model, small())
    policy.reset(np.zeros((1, 32, 32, 3), np.uint8))
    chunks = np.full((1, 1, model.action_dim), np.nan, np.float32)
    with pytest.raises(ValueError, match=r"history: chunks must hold the actions played, finite and in \[-1, 1\]"):
        policy.set_history(np.zeros((1, 1, 32, 32, 3), np.uint8), chunks)
    with pytest.raises(ValueError, match="finite and in"):
        policy.set_history(np.zeros((1, 1, 32, 32, 3), np.uint8), np.full((1, 1, model.action_dim), 3.0, np.float32))
    policy.set_history(np.zeros((1, 0, 32, 32, 3), np.uint8), np.zeros((1, 0, model.action_dim)))  # none: at rest
    # keys given as a list are checked (integers that fit int32), for the policy and the planner alike
    for bad in ([-1, 2**40], [0.5]):
        with pytest.raises(ValueError, match=r"keys must be integers in \[-2\^31, 2\^31\)"):
            policy.reset(np.zeros((2, 32, 32, 3), np.uint8), keys=bad)
    z = torch.zeros(2, 1, model.cfg.latent_dim, dtype=torch.float64)  # float64 latents: cast, planned
    assert policy.planner.plan(z, z[:, 0], keys=[3, 4]).actions.shape[0] == 2
    with pytest.raises(ValueError, match=rf"z_hist holds 7-d latents; this model's are {model.cfg.latent_dim}-d"):
        policy.planner.plan(torch.zeros(2, 1, 7), torch.zeros(2, 7))


def _graph(dim: int = 16):
    from worldmodel.graph import GraphConfig, LatentGraph

    g = torch.Generator().manual_seed(0)
    return LatentGraph.from_trajectories([torch.randn(12, dim, generator=g).cumsum(0) * 0.1 for _ in range(6)],
                                         GraphConfig(radius=5.0))


def test_plans_beyond_the_solved_paths_are_counted_over_every_route(model):
    """``route_strays`` (what evaluation records and the subgoal benchmark reports) sums the routes' counts
    over the policy's life: a retarget's new route does not drop what the old one met."""
    policy = MPCPolicy(model, apply_overrides(small(), {"subgoals.enabled": True, "subgoals.reach": 0.5}), _graph())
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    policy.reset(frames)
    for _ in range(4):
        policy.act_batch(frames)
    assert policy.route_strays == 0  # the arms never left what was solved for them
    first = policy._route
    first.strays = 2  # as ``subgoals.cover`` counts plans that met an arm beyond the solve
    policy.retarget(frames)
    assert policy._route is not first and policy._route.strays == 0 and policy.route_strays == 2
    policy._route.strays = 1
    assert policy.route_strays == 3


def test_step_replanning_replans_between_boundaries_and_changes_nothing_far_from_the_goal(model, monkeypatch):
    """``step_replan always`` plans at every step once the history spans it; ``near`` with no problem near
    its goal plays exactly what chunk-boundary replanning plays."""
    frames = np.random.default_rng(1).integers(0, 256, (12, 2, 32, 32, 3), dtype=np.uint8)  # (T, B, ...)
    always = MPCPolicy(model, small(step_replan="always"))
    always.reset(frames[0])
    acts = [always.act_batch(f) for f in frames]
    # boundaries (frameskip 2) at 0, 2, ..., 10; between them once two frames 2 steps apart exist: 3, 5, ..., 11
    assert len(always.plan_times) == 6 + 5 and np.all(np.abs(np.stack(acts)) <= 1)
    from planners import subgoals

    real = subgoals.targets

    def never_near(*args):  # the goals stay far: waypoints, and no problem counts as near
        out = real(*args)
        route = args[1]
        route.near[:] = False
        return out

    monkeypatch.setattr(subgoals, "targets", never_near)
    runs = {}
    for mode in ("never", "near"):
        cfg = small(step_replan=mode, **{"subgoals.enabled": True})
        policy = MPCPolicy(model, cfg, _graph())
        policy.reset(frames[0][:, ::-1].copy())
        runs[mode] = np.stack([policy.act_batch(f) for f in frames])
    assert np.array_equal(runs["never"], runs["near"])
    with pytest.raises(ValueError, match="receding_horizon 1"):
        small(receding_horizon=2, step_replan="always")


def test_a_model_file_plans_alone_from_anywhere(tmp_path, monkeypatch):
    """model.pt + model.json copied to another directory, the dataset deleted, the script run from an empty
    directory: the default policy (subgoals included) loads and plans exactly as it does beside its data."""
    import shutil

    from conftest import write_synthetic
    from test_train import tiny
    from worldmodel.train import train

    data = write_synthetic(tmp_path / "data", n_episodes=6, steps=20, noise=True)
    train(tiny(data, tmp_path / "run", steps=4), progress=False)
    frames = np.random.default_rng(3).integers(0, 256, (3, 2, 32, 32, 3), dtype=np.uint8)

    def plans(checkpoint):
        policy = load_policy(checkpoint, device="cpu", samples=16, iterations=2)
        policy.reset(frames[0])
        return np.stack([policy.act_batch(f) for f in frames]), policy

    here, policy = plans(tmp_path / "run" / "model.pt")
    assert policy.graph is not None  # subgoals on, from the graph saved with the model
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("model.pt", "model.json"):
        shutil.copy(tmp_path / "run" / name, elsewhere / name)
    shutil.rmtree(data)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    there, _ = plans(elsewhere / "model.pt")
    assert np.array_equal(here, there)
    from envs.storage import DatasetError

    with pytest.raises(DatasetError, match="nowhere: no such dataset .given for the subgoal graph"):
        load_policy(elsewhere / "model.pt", device="cpu", data=str(tmp_path / "nowhere"))  # a typo is not ignored


def test_bf16_planning_on_a_cpu_without_bf16_units_is_said_once(monkeypatch, caplog):
    """`--bf16` planned 3-7x slower than float32 on a CPU without bf16 instructions (README: Planning): a
    command asked for it there says so, once, and says nothing where the CPU has them or torch cannot tell."""
    import common.device
    from planners.policy import check_policy_device

    for units, warnings in ((False, 1), (True, 0), (None, 0)):
        common.device.warn_bf16_without_units.cache_clear()
        monkeypatch.setattr(common.device, "cpu_has_bf16_units", lambda: units)
        caplog.clear()
        for _ in range(2):  # a config checked twice (e.g. by dataclasses.replace) says it once
            check_policy_device(small(bf16=True), "cpu")
            check_policy_device(small(), "cpu")
        said = [r.getMessage() for r in caplog.records if "--bf16 on a CPU without bf16 instructions" in r.getMessage()]
        assert len(said) == warnings, (units, said)
    common.device.warn_bf16_without_units.cache_clear()


def test_the_bf16_probe_agrees_with_the_cpus_flags():
    """What the warning above rests on: torch's probe finds bf16 units where Linux lists AVX512-BF16, and only
    where it lists AVX512-BF16 or AMX (AMX also needs the kernel's permission, which the flags do not show)."""
    from pathlib import Path

    from common.device import cpu_has_bf16_units

    cpuinfo = Path("/proc/cpuinfo")
    if cpu_has_bf16_units() is None or not cpuinfo.exists():
        pytest.skip("no probe in this torch, or not Linux")
    flags = {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}
    assert cpu_has_bf16_units() >= ("avx512_bf16" in flags)
    assert cpu_has_bf16_units() <= bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
