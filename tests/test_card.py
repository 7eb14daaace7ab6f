"""``wm info``: a model file described to whoever receives it, from what the file holds and no more."""

import json
import shutil

import torch

from conftest import collect_tiny, save_as_trained_on
from evaluation.card import model_card
from test_model import tiny_config
from wm import main
from worldmodel.model import WorldModel


def test_a_bare_model_file_says_what_it_is_and_what_it_lacks(tmp_path):
    torch.manual_seed(0)
    model = WorldModel(tiny_config("mlp", size=32, frameskip=2))
    path = model.save(tmp_path / "m.pt")
    card = model_card(path)
    parameters = sum(p.numel() for p in model.parameters())
    assert "a world model of `reacher-easy` from 32 px frames: conv encoder (8-16-32 channels) to a 16-d latent" in card
    assert f"{parameters / 1e6:.2f} M parameters" in card and "frameskip 2" in card
    assert "- **Planned with**: the default planner;" in card
    assert "- **Subgoal graph**: not saved; it is built from the training data" in card
    assert "**Training**" not in card and "**Data**" not in card and "Made by" not in card  # not recorded


def test_a_trained_models_card_names_its_data_planner_and_maker(tmp_path, capsys):
    data = collect_tiny(tmp_path / "data", episodes=4, steps=30)
    path = save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=2)), tmp_path / "m.pt", data)
    meta = json.loads(path.with_suffix(".json").read_text())
    meta.update(step=1200, train_config={"preset": "hold", "seed": 2},  # a hold run, written before the record
                metrics={"val": {"prediction_loss": 0.0123}, "probe": {"joints_mean": 0.987},
                         "closed_loop": {"reach25_latched": 1.0, "reach25_held": 0.85}},
                provenance={"command": "wm train --preset hold", "code": {"commit": "0123456789abcdef"},
                            "packages": {"torch": "2.13.0"}, "machine": {"cpu": "AMD EPYC", "cpu_cores": 2,
                                                                       "gpu": None, "torch_threads": 1},
                            "time_utc": "2026-12-01T23:58:54+00:00"})
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert main(["info", "--checkpoint", str(path)]) == 0
    card = capsys.readouterr().out
    assert "- **Training**: 1,200 steps (`--preset hold`, seed 2)." in card
    assert f"found at `{data}`: 4 episodes (2 train, 1 val, 1 test); its frames as `wm collect --env reacher-easy " \
           f"--size 32" in card
    assert ("`--samples 100 --iterations 10 --grad-steps 0 --noise-beta 0.0` over the default planner, as the model "
            "file records") in card
    assert ("prediction loss 0.0123; linear probe R^2 of the joint angles 0.987; `reach25` latched 100% / held 85%"
            in card)
    assert "Made by `wm train --preset hold` at commit `0123456789ab`" in card
    # resumed after a divergence with other recovery settings: "made by" is that resume command alone
    meta["history"] = [{"step": 600, "changed": {"lr": [0.001, 0.00025], "grad_clip": [1.0, 0.5]}},
                       {"step": 600, "new_settings": {"slow_weight": 0.0}}]
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert ("- **Training**: 1,200 steps (`--preset hold`, seed 2); from step 600 with `--lr 0.00025 --grad-clip "
            "0.5` (before: `--lr 0.001 --grad-clip 1.0`)." in model_card(path))
    meta["history"] = []
    meta.update(world_size=2, train_config={**meta["train_config"], "batch_size": 32})  # torchrun, 2 processes
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert ("- **Training**: 1,200 steps (`--preset hold`, seed 2), on 2 processes (a global batch of 64 windows)."
            in model_card(path))
    meta["train_config"]["steps"] = 5000  # stopped short: it resumes on as many processes (wm train refuses others)
    path.with_suffix(".json").write_text(json.dumps(meta))
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert (f"unfinished (`torchrun --nproc_per_node 2 -m wm train --out {tmp_path} --resume` continues it from "
            f"the `checkpoint.pt` beside it)" in model_card(path))
    (tmp_path / "checkpoint.pt").unlink()
    meta.update(world_size=1, train_config={"preset": "hold", "seed": 2})
    meta["train_config"]["steps"] = 5000  # a run stopped at step 1,200 of 5,000
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert "- **Training**: 1,200 steps of the 5,000 asked for: unfinished (`--preset hold`, seed 2)." in \
        model_card(path)  # the model file alone (no checkpoint to resume from)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert (f"unfinished (`wm train --out {tmp_path} --resume` continues it from the `checkpoint.pt` beside it) "
            f"(`--preset hold`, seed 2)." in model_card(path))
    (tmp_path / "checkpoint.pt").unlink()
    shutil.rmtree(data)  # the data gone: said, with where it was looked for and the collection of its kind
    card = model_card(path)
    assert f"`{data}`, not found (looked at `{data}`" in card and "`wm collect --env reacher-easy" in card
    # another dataset where it was (the default directory collected again): not the model's, said and refused
    collect_tiny(data, episodes=3, steps=30)
    assert f"`{data}` holds another dataset" in model_card(path)
    assert main(["eval", "--checkpoint", str(path), "--out", str(tmp_path / "eval")]) == 2
    said = capsys.readouterr().err
    assert "its dataset is not where it was recorded" in said and "holds another dataset (not its recorded" in said


def test_a_missing_or_damaged_model_file_is_named(tmp_path, capsys):
    assert main(["info", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt: no such checkpoint" in capsys.readouterr().err
    (tmp_path / "m.pt").write_bytes(b"not a model")
    (tmp_path / "m.json").write_text("{")
    assert main(["info", "--checkpoint", str(tmp_path / "m.pt")]) == 2
    assert "m.json: not valid JSON" in capsys.readouterr().err
