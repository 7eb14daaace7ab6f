import json

import pytest
import torch

from worldmodel.encoder import EncoderConfig
from worldmodel.model import CheckpointError, WorldModel, WorldModelConfig, check_model_file, read_model_meta
from worldmodel.predictor import PredictorConfig


def tiny_config(kind="mlp", size=32, latent=16, frameskip=2) -> WorldModelConfig:
    return WorldModelConfig(
        latent_dim=latent, history=2, frameskip=frameskip, image_size=size,
        encoder=EncoderConfig(conv_channels=8, conv_stages=3, proj_hidden=32),
        predictor=PredictorConfig(kind=kind, hidden=32, depth=2, heads=2))


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


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_the_first_frame_rollout_is_the_planners_rollout_from_one_frame(kind):
    torch.manual_seed(0)
    model = WorldModel(tiny_config(kind)).eval()
    with torch.no_grad():  # predictors start as "nothing moves": give them something to predict
        for p in model.predictor.parameters():
            p.normal_(0, 0.3)
    frames = torch.randint(0, 256, (3, 4, 32, 32, 3), dtype=torch.uint8)
    actions = torch.randn(3, 3, 4)
    z, _, roll = model(frames, actions, rollout_steps=2, from_first_frame=True)
    assert roll.shape == (6, 2, 16)
    assert torch.allclose(roll[:3], model.rollout(z[:, :2], actions[:, :1], actions[:, 1:3]), atol=1e-5)
    from_one = model.rollout(z[:, :1], None, actions[:, :2])  # what a planner with 1 frame of context computes
    assert torch.allclose(roll[3:], from_one, atol=1e-5)
    assert not torch.allclose(from_one, model.rollout(z[:, :2], actions[:, :1], actions[:, 1:3]), atol=1e-3)


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
    meta["config"]["latent_dim"] = 24
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match its config"):
        WorldModel.load(path)
    meta["format_version"] = 99
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m\.json: 'format_version' is 99; this code reads 1 to"):
        WorldModel.load(path)
    meta["format_version"] = 2
    meta["config"]["encoder"]["colour"] = "red"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown EncoderConfig keys"):
        WorldModel.load(path)
    for bad in ("[1, 2]", '{"format_version": 2}', "not json"):  # a list, no config, garbage
        (tmp_path / "m.json").write_text(bad)
        with pytest.raises(CheckpointError, match="m.json"):
            WorldModel.load(path)
    (tmp_path / "m.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        WorldModel.load(path)
    for read in (WorldModel.load, read_model_meta):  # neither the weights nor their description: no model at all
        with pytest.raises(CheckpointError, match=r"nothing\.pt: no such checkpoint"):
            read(tmp_path / "nothing.pt")
    # a run directory or the model's json given instead of its model.pt: said, with the file to give
    run = tmp_path / "run"
    run.mkdir()
    WorldModel(tiny_config()).save(run / "model.pt")
    for read in (WorldModel.load, read_model_meta):
        with pytest.raises(CheckpointError, match=r"run is a directory, not a model file .*; give .*run/model\.pt"):
            read(run)
        with pytest.raises(CheckpointError, match=r"model\.json is a model's description; give the weights file "
                                                  r"beside it, .*model\.pt"):
            read(run / "model.json")
    (tmp_path / "shard_000000_000009.h5").write_bytes(b"")  # a dataset file given as the model
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text('{"episodes": 1}')  # a dataset's manifest: not a description
    for read in (WorldModel.load, read_model_meta):
        with pytest.raises(CheckpointError, match=r"shard_000000_000009\.h5 is a dataset file, not a model file"):
            read(tmp_path / "shard_000000_000009.h5")
        with pytest.raises(CheckpointError, match=r"dataset\.json is a dataset's manifest, not a model file .*; its "
                                                  r"directory .*data is the dataset \(--data\)"):
            read(tmp_path / "data" / "dataset.json")


def test_a_model_json_beside_another_models_weights_is_refused(tmp_path):
    """model.json records the SHA-256 of its weights: a json of another model of the same config (another seed,
    or trained longer) beside these weights would describe another training, data split and planner."""
    torch.manual_seed(0)
    WorldModel(tiny_config()).save(tmp_path / "a.pt", extra={"step": 150})
    torch.manual_seed(1)
    WorldModel(tiny_config()).save(tmp_path / "b.pt", extra={"step": 30})
    assert WorldModel.load(tmp_path / "a.pt") is not None  # its own json
    (tmp_path / "a.json").write_bytes((tmp_path / "b.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"a\.json describes other weights than .*a\.pt \(its 'weights_sha256' "
                                              r"differs\): the model\.json of another model"):
        WorldModel.load(tmp_path / "a.pt")
    meta = json.loads((tmp_path / "a.json").read_text())
    del meta["weights_sha256"]  # a file written before models recorded it: loads, unchecked
    (tmp_path / "a.json").write_text(json.dumps(meta))
    WorldModel.load(tmp_path / "a.pt")


def test_format_1_checkpoints_still_load(tmp_path):
    """Format 1 kept the latent size, image size and history inside the sub-configs."""
    model = WorldModel(tiny_config()).eval()
    path = model.save(tmp_path / "m.pt")
    meta = json.loads((tmp_path / "m.json").read_text())
    c = meta["config"]
    meta["format_version"] = 1
    meta["config"] = {"frameskip": c["frameskip"], "env": c["env"],
                      "encoder": {**c["encoder"], "image_size": c["image_size"], "latent_dim": c["latent_dim"]},
                      "predictor": {**c["predictor"], "latent_dim": c["latent_dim"], "action_dim": 2 * c["frameskip"],
                                    "history": c["history"]}}
    (tmp_path / "m.json").write_text(json.dumps(meta))
    torch.save(model.state_dict(), path)  # formats 1 and 2 kept the plain state dict in model.pt
    loaded = WorldModel.load(path)
    assert loaded.cfg == model.cfg and loaded.extras == {}
    meta["format_version"], meta["config"] = 2, c  # format 2: today's config, the plain state dict
    (tmp_path / "m.json").write_text(json.dumps(meta))
    assert WorldModel.load(path).cfg == model.cfg


def test_an_older_model_json_beside_its_rewritten_model_pt_still_loads(tmp_path, monkeypatch):
    """Extras saved into a format-2 model (its graph, by an evaluation or `wm export`) rewrite model.pt first;
    when model.json cannot follow (a full disk), the pair still loads, the extras with it."""
    import errno

    import worldmodel.model as model_module

    model = WorldModel(tiny_config()).eval()
    path = model.save(tmp_path / "m.pt")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["format_version"] = 2
    (tmp_path / "m.json").write_text(json.dumps(meta))
    torch.save(model.state_dict(), path)  # format 2: the plain state dict

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model_module, "atomic_write_json", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model_module.save_extras(path, {"graph": {"nodes": torch.zeros(2, 3)}})
    assert json.loads((tmp_path / "m.json").read_text())["format_version"] == 2  # model.json did not follow
    loaded = WorldModel.load(path)
    assert loaded.cfg == model.cfg and torch.equal(loaded.extras["graph"]["nodes"], torch.zeros(2, 3))


def test_truncated_weights_fail_clearly(tmp_path):
    """Loading refuses them, and so does the check a command makes of its model files before any work (an
    evaluation of several models does not start its first to fail on the second)."""
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    check_model_file(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"m\.pt: cannot be read as a weights file"):
        WorldModel.load(path)
    with pytest.raises(CheckpointError, match=r"m\.pt: cannot be read as a weights file"):
        check_model_file(path)


def test_cuda_asked_for_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        WorldModel.load(path, "cuda")


def test_float32_latents_and_residuals_under_bf16_autocast():
    """Under bf16 autocast the matmuls may round, but latents stay float32 and an open-loop rollout stays
    close to the float32 one (the residual adds are float32: a bf16 stream would round |z| ~ 1 latents
    in steps of ~0.004-0.008, the size of the changes near a goal)."""
    torch.manual_seed(0)
    model = WorldModel(tiny_config()).eval()
    torch.nn.init.normal_(model.predictor.mlp[-1].weight, std=0.1)  # a trained predictor moves the latents
    frames = torch.randint(0, 256, (4, 3, 32, 32, 3), dtype=torch.uint8)
    actions = torch.randn(4, 6, 4) * 0.5
    with torch.no_grad():
        z32 = model.encode(frames)
        roll32 = model.rollout(z32[:, :2], actions[:, :1], actions[:, 1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = model.encode(frames)
            roll16 = model.rollout(z16[:, :2], actions[:, :1], actions[:, 1:])
            step16 = model.predictor(z16, actions[:, :3])
    assert z16.dtype == roll16.dtype == step16.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 latents in: the stream turns float32
        assert model.predictor(z16.bfloat16(), actions[:, :3]).dtype == torch.float32
    scale = (roll32 - z32[:, 1:2]).abs().mean()  # how far the rollout moves
    assert scale > 0.01
    assert (roll16 - roll32).abs().mean() < 0.1 * scale + 0.01 * z32.abs().mean()


def test_a_pickle_is_not_loaded(tmp_path):
    """weights_only=True: a file holding arbitrary objects is refused, not executed."""
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    torch.save({"evil": object()}, path)
    with pytest.raises(CheckpointError, match="cannot be read as a weights file"):
        WorldModel.load(path)


def test_corrupt_bytes_and_non_finite_weights_are_refused(tmp_path):
    """torch checks no checksum: a flipped byte inside a tensor would load as a wrong weight, and NaN weights
    would plan nothing (0% success, exit 0). Both name the file."""
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"m\.pt: cannot be read as a weights file .*checksum .* does not match"):
        WorldModel.load(path)
    state = WorldModel(tiny_config()).state_dict()
    state["predictor.mlp.0.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"m\.pt: predictor\.mlp\.0\.weight holds non-finite values"):
        WorldModel.load(path)


def test_a_pickle_is_refused_without_advice_to_unpickle(tmp_path):
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    torch.save({"evil": object()}, path)
    with pytest.raises(CheckpointError, match=r"objects other than tensors and plain containers \(object\)") as info:
        WorldModel.load(path)
    assert "weights_only" not in str(info.value) and "can still be loaded" not in str(info.value)


def test_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path):
    """A config may not ask for more than the code allows, and a config that disagrees with its weights is
    found on shapes alone (latent_dim 1e6 would have allocated gigabytes first)."""
    import time

    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    meta = json.loads((tmp_path / "m.json").read_text())
    for bad in (10**6, 10**9):
        meta["config"]["latent_dim"] = bad
        (tmp_path / "m.json").write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match=rf"m\.json: .*--latent-dim {bad} \(must be <= 4096\)"):
            WorldModel.load(path)
    meta["config"]["latent_dim"] = 4096
    meta["config"]["predictor"]["hidden"] = 16384  # allowed sizes, but not these weights: refused on shapes
    (tmp_path / "m.json").write_text(json.dumps(meta))
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="do not match its config"):
        WorldModel.load(path)
    assert time.perf_counter() - start < 5
    meta["config"]["encoder"].update(conv_channels=1024, conv_stages=8)  # each allowed, together too many
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"m\.json: this architecture has [\d,]+ parameters"):
        WorldModel.load(path)


@pytest.mark.parametrize("change, message", [
    ({"config.latent_dim": "64"}, r"latent_dim must be an integer, got '64'"),
    ({"config.latent_dim": 64.0}, r"latent_dim must be an integer, got 64\.0"),
    ({"config.latent_dim": True}, r"latent_dim must be an integer, got True"),
    ({"step": "ten"}, r"'step' must be a count of steps, got 'ten'"),
    ({"step": -5}, r"'step' must be a count of steps, got -5"),
    ({"data": "runs/demo/data"}, r"'data' must be the record of the training data"),
    ({"data": {"path": "d", "fingerprint": "f", "train": "all"}}, r"'data\.train' must be episode uids"),
    ({"data": {"path": "d", "fingerprint": "f", "train": [1, 2]}}, r"'data\.train' must list episode uids"),
    ({"data": {"path": 3, "fingerprint": "f", "train": []}}, r"'data\.path' must be the dataset's path"),
    ({"data": {"path": "d"}}, r"'data' must record 'fingerprint' and 'train'"),
    ({"data": {"fingerprint": "f", "train": [], "relative_to_model": 5}}, r"'data\.relative_to_model' must be"),
    ({"data": {"fingerprint": "f", "train": [], "absolute": 7}}, r"'data\.absolute' must be the dataset's absolute"),
    ({"data": {"fingerprint": "f", "train": [], "recording": {"env": "reacher-easy", "size": "big"}}},
     r"'data\.recording': file attribute 'size' must be an integer"),
    ({"data": {"fingerprint": "f", "train": [], "recording": {"env": "reacher-easy", "size": 64,
                                                               "hide_target": "no"}}},
     r"'data\.recording': file attribute 'hide_target' must be true or false"),
    ({"data": {"fingerprint": "f", "train": [], "recording": {"size": 64}}}, r"file attribute 'env' must be"),
    ({"provenance": {"code": None}}, r"'provenance\.code' must be the code's version"),
    ({"metrics": {"probe": 3}}, r"'metrics\.probe' must be the measurements of that name"),
    ({"train_config": {"seed": [1]}}, r"'train_config\.seed' must be a seed"),
])
def test_crafted_model_json_names_the_file_and_field(tmp_path, change, message):
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt")
    meta = json.loads((tmp_path / "m.json").read_text())
    for key, value in change.items():
        *parents, leaf = key.split(".")
        target = meta
        for name in parents:
            target = target[name]
        target[leaf] = value
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"m\.json: .*{message}"):
        WorldModel.load(path)


def test_a_training_checkpoint_given_as_the_model_says_which_file_is_the_model(tmp_path):
    WorldModel(tiny_config()).save(tmp_path / "model.pt")
    torch.save({"step": 1}, tmp_path / "checkpoint.pt")  # a run directory's training state
    with pytest.raises(CheckpointError, match=r"checkpoint.pt is a training run's checkpoint \(what --resume reads\); "
                                              r"the model to evaluate, plan with or film is .*model.pt"):
        WorldModel.load(tmp_path / "checkpoint.pt")
    (tmp_path / "model.pt").unlink()
    with pytest.raises(CheckpointError, match=r"its config checkpoint.json is missing beside it"):
        WorldModel.load(tmp_path / "checkpoint.pt")


def test_a_recording_that_leaves_out_defaults_reads_with_them(tmp_path):
    """A model.json's data recording without the look, target or action repeat (an older file, or one made by
    hand) is read with our shards' defaults, as its data would be, not a KeyError where it is used."""
    path = WorldModel(tiny_config()).save(tmp_path / "m.pt", extra={"data": {
        "fingerprint": "f", "train": [], "recording": {"env": "reacher-easy", "size": 64}}})
    rec = read_model_meta(path)["data"]["recording"]
    assert (rec["render_quality"], rec["hide_target"], rec["action_repeat"], rec["render_size"]) == ("fast", True, 1, 64)
