import json

import pytest
import torch

from worldmodel.encoder import EncoderConfig
from worldmodel.model import CheckpointError, WorldModel, WorldModelConfig
from worldmodel.predictor import PredictorConfig


def tiny_config(kind="mlp", size=32, latent=16, frameskip=2) -> WorldModelConfig:
    return WorldModelConfig(
        encoder=EncoderConfig(image_size=size, latent_dim=latent, conv_channels=8, conv_stages=3, proj_hidden=32),
        predictor=PredictorConfig(kind=kind, latent_dim=latent, action_dim=2 * frameskip, history=2, hidden=32,
                                  depth=2, heads=2),
        frameskip=frameskip)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_forward_and_rollout_shapes(kind):
    model = WorldModel(tiny_config(kind)).eval()
    frames = torch.randint(0, 256, (3, 4, 32, 32, 3), dtype=torch.uint8)
    actions = torch.randn(3, 3, 4)
    z, pred, roll = model(frames, actions, rollout_steps=2)
    assert z.shape == (3, 4, 16) and pred.shape == (3, 3, 16) and roll.shape == (3, 2, 16)
    # the training rollout is the planner's rollout: from the first 2 (history) latents on
    assert torch.allclose(roll, model.rollout(z[:, :2], actions[:, :1], actions[:, 1:3]), atol=1e-6)
    assert model(frames, actions)[2] is None
    out = model.rollout(z[:, :2], torch.randn(3, 1, 4), torch.randn(3, 5, 4))
    assert out.shape == (3, 5, 16)


def test_wrong_image_size_is_a_clear_error():
    model = WorldModel(tiny_config())
    with pytest.raises(ValueError, match="32, 32, 3"):
        model.encode(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))


def test_save_load_round_trip(tmp_path):
    model = WorldModel(tiny_config("transformer")).eval()
    path = model.save(tmp_path / "m.pt", extra={"step": 3})
    loaded = WorldModel.load(path)
    frames = torch.randint(0, 256, (5, 32, 32, 3), dtype=torch.uint8)
    assert torch.equal(model.encode(frames), loaded.encode(frames))
    assert json.loads((tmp_path / "m.json").read_text())["step"] == 3


def test_mismatched_checkpoints_fail_clearly(tmp_path):
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["config"]["encoder"]["latent_dim"] = 24
    meta["config"]["predictor"]["latent_dim"] = 24
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match its config"):
        WorldModel.load(path)
    meta["format_version"] = 99
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        WorldModel.load(path)
    meta["format_version"] = 1
    meta["config"]["encoder"]["colour"] = "red"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown EncoderConfig keys"):
        WorldModel.load(path)
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        WorldModel.load(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        WorldModel.load(tmp_path / "nothing.pt")


def test_a_pickle_is_not_loaded(tmp_path):
    """weights_only=True: a file holding arbitrary objects is refused, not executed."""
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    torch.save({"evil": object()}, path)
    with pytest.raises(CheckpointError, match="cannot be read as a weights file"):
        WorldModel.load(path)
