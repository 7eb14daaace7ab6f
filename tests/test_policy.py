import numpy as np
import pytest
import torch

from envs import ReacherPixels
from common.config import apply_overrides
from planners.policy import MPCPolicy, PolicyConfig, load_policy
from test_model import tiny_config
from worldmodel.model import CheckpointError, WorldModel


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


def test_bad_inputs_are_clear_errors(model):
    policy = MPCPolicy(model, small())
    with pytest.raises(RuntimeError, match="reset"):
        policy.act(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="32, 32, 3"):
        policy.reset(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        policy.reset(np.zeros((32, 32, 3), np.float32))
    policy.reset(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="32, 32, 3"):
        policy.act(np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="receding_horizon"):
        MPCPolicy(model, small(receding_horizon=4))
    with pytest.raises(ValueError, match="unknown settings"):
        small(**{"cem.temperature": 1.0})
    with pytest.raises(ValueError, match="planner must be one of"):
        small(planner="rrt")


def test_load_policy(model, tmp_path):
    model.save(tmp_path / "m.pt")
    policy = load_policy(tmp_path / "m.pt", device="cpu", planner="mppi", samples=8, iterations=2, horizon=2,
                         **{"subgoals.enabled": False})
    assert policy.planner.cfg.samples == 8 and policy.planner.cfg.horizon == 2
    assert policy.planner.cfg.cost == "sum"  # the MPC default; the bare planners keep "final"
    policy.reset(np.zeros((32, 32, 3), np.uint8))
    assert policy.act(np.zeros((32, 32, 3), np.uint8)).shape == (2,)
    with pytest.raises(CheckpointError):
        load_policy(tmp_path / "missing.pt")


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
