"""The studies: the hold diagnosis's measurements and the identifiability study's machinery (tiny settings)."""

import numpy as np
import pytest
import torch

from conftest import collect_tiny, save_as_trained_on
from studies import hold
from test_model import tiny_config
from worldmodel.model import WorldModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return collect_tiny(tmp_path_factory.mktemp("studies") / "data", episodes=8, steps=40)


def test_a_failed_episode_is_classified_by_what_the_arm_did():
    still, moving = np.zeros((51, 2)), np.full((51, 2), 1.0)  # rad/s: 0.02 rad per env step
    far = np.full(51, 0.3)
    assert hold.classify(far, still, 0.05) == "never arrived"
    arrived = np.r_[np.full(30, 0.3), np.full(11, 0.02), np.full(10, 0.08)]
    assert hold.classify(arrived, moving, 0.05) == "arrived, still moving at the end"
    assert hold.classify(arrived, still, 0.05) == "arrived, stopped off the goal"


def test_latent_distance_against_joint_error_is_measured_on_rendered_poses(data, tmp_path):
    from evaluation.evaluate import load_setup

    torch.manual_seed(0)
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    setup = load_setup(str(tmp_path / "m.pt"), str(data), 2, "cpu", split="val")
    try:
        d = hold.pose_discrimination(setup, goals=3, directions=2)
    finally:
        setup.batch.close()
    assert len(d["latent_median"]) == len(hold.LEVELS) and 0 <= d["tolerance_ranked"] <= 1
    assert d["pixel_median"][-1] > d["pixel_median"][0] > 0  # a larger joint error changes more pixels
    assert np.allclose(d["joint_error_median"], hold.LEVELS, rtol=0.05)


def test_the_identifiability_table_reports_mean_and_spread_over_seeds():
    from studies.identifiability import _table, markdown

    def run(lin, seed):
        joints = {k: lin for k in ("joints_mean", "vel_shoulder", "vel_wrist")}
        return {"linear": joints, "nonlinear": {k: 0.99 for k in joints}, "gaussianity": {"latent_sigreg": 1.5},
                "reach25_latched": 1.0, "reach25_held": 0.8, "seed": seed}

    table = _table({"reference": [run(0.9, 0), run(0.7, 1)]})
    assert table[0]["linear R2 (joints)"][0] == pytest.approx(0.8) and table[0]["linear R2 (joints)"][1] > 0.1
    assert "0.800 +- 0.141" in markdown({"config": {"steps": 5, "seeds": 2, "eval_episodes": 2}, "table": table})


def test_the_identifiability_study_runs_end_to_end(tmp_path, monkeypatch):
    from studies import identifiability as study

    monkeypatch.setattr(study, "RUNS", {"reference": ("smooth", {}), "uniform target": ("smooth",
                                                                                         {"sigreg_target": "uniform"})})
    monkeypatch.setattr(study, "DATASETS", {"smooth": ("smooth", None)})
    cfg = study.IdentifiabilityConfig(steps=2, episodes=8, eval_episodes=2, mlp_steps=5, workers=1,
                                      out=str(tmp_path / "study"))
    summary = study.run(cfg, progress=False)
    assert [r["run"] for r in summary["table"]] == ["reference", "uniform target"]
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / "study" / name).is_file()
