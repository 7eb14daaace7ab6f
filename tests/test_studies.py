"""The studies: the hold diagnosis's measurements, the one-frame study and the identifiability study's machinery
(tiny settings)."""

import json
import shutil

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


def test_the_identifiability_study_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Ctrl-C in the first run's training; run again, the study continues that run from its checkpoint and
    finishes; a kept run measured with other settings is refused, not mixed into the table."""
    import dataclasses
    import os
    import signal

    from studies import identifiability as study
    from worldmodel import train as train_module

    monkeypatch.setattr(study, "RUNS", {"reference": ("smooth", {}), "uniform target": ("smooth",
                                                                                         {"sigreg_target": "uniform"})})
    monkeypatch.setattr(study, "DATASETS", {"smooth": ("smooth", None)})
    cfg = study.IdentifiabilityConfig(steps=3, episodes=8, eval_episodes=2, mlp_steps=5, workers=1,
                                      out=str(tmp_path / "study"))
    real, calls = train_module.world_model_losses, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # during step 1: steps 0 and 1 complete and are saved
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "world_model_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run(cfg, progress=False)
    first = tmp_path / "study" / "runs" / "reference-s0"
    assert torch.load(first / "checkpoint.pt", weights_only=True)["step"] == 2 and not (first / "study.json").exists()
    monkeypatch.setattr(train_module, "world_model_losses", real)
    summary = study.run(cfg, progress=False)
    assert [r["run"] for r in summary["table"]] == ["reference", "uniform target"]
    assert json.loads((first / "model.json").read_text())["step"] == 3
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / "study" / name).is_file()
    with pytest.raises(ValueError, match=r"reference-s0/study.json: field measured_with.steps is 3, .* asks for 4"):
        study.run(dataclasses.replace(cfg, steps=4), progress=False)


def test_a_short_dataset_no_shorter_than_the_others_is_warned_about(tmp_path, monkeypatch, caplog):
    import envs.collect
    from studies import identifiability as study

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # the warning comes before any collection
    monkeypatch.setattr(envs.collect, "collect", stop)
    for episodes, warned in ((100, True), (101, False)):
        caplog.clear()
        with pytest.raises(KeyboardInterrupt):
            study.run(study.IdentifiabilityConfig(episodes=episodes, out=str(tmp_path / "s")), progress=False)
        assert ("the short dataset (100 episodes) is not shorter than the others" in caplog.text) == warned


def test_recorded_actions_replay_the_episode_and_from_rest_they_do_not(data):
    """The one-frame study replays a method's played actions: from the true start they give the same joint
    errors; from the same pose at rest (what one frame shows) another trajectory."""
    from envs.dataset import EpisodeStore
    from envs.vector import ReacherBatch
    from evaluation.evaluate import run_episodes
    from evaluation.protocols import PROTOCOLS, sample_episodes
    from studies.one_frame import replay

    store, proto = EpisodeStore(data), PROTOCOLS["lewm"]
    batch = ReacherBatch("reacher-easy", 4, size=32)
    try:
        eps = sample_episodes(store, list(range(8)), proto, 4, 0, batch.physics.wrist_range, 0.05)
        rng = np.random.default_rng(0)
        trace = {}
        played = run_episodes(batch, eps, proto, lambda: rng.uniform(-1, 1, (4, 2)), trace=trace)
        again = run_episodes(batch, eps, proto, replay(trace["action"]))
        rest = run_episodes(batch, dict(eps, qvel=np.zeros_like(eps["qvel"])), proto, replay(trace["action"]))
    finally:
        batch.close()
    assert np.array_equal(again, played)
    moving = np.abs(eps["qvel"]).max(1) > 0.1
    assert moving.any() and (np.abs(rest - played)[moving, -1].max(-1) > 1e-3).all()


def test_the_one_frame_study_splits_the_misses_and_writes_its_report(data, tmp_path, capsys):
    """LeWM's planner on a (random) world model and on the pose-only simulator, each first plan replayed from rest:
    the perfect model of one frame reaches every goal from rest, the shares add up, the CLI writes it."""
    import wm
    from studies import one_frame

    torch.manual_seed(0)
    ckpt = save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    result = one_frame.run(str(ckpt), "val", episodes=2, device="cpu", progress=False)
    pose, world = result["summary"]["simulator-pose"], result["summary"]["world_model"]
    history = result["summary"]["world_model_history"]  # it sees the motion: nothing to replay from rest
    assert history["first_plan_at_rest"] is None and history["closest_at_rest"] is None
    assert pose["first_plan_at_rest"] == 1.0 and pose["episodes"] == world["episodes"] == history["episodes"] == 2
    for s in (pose, world):
        assert s["first_plan"] + s["lost_to_velocity"] + s["missed_at_rest_too"] == pytest.approx(1)
        assert s["first_plan_at_rest"] == pytest.approx(s["first_plan"] - s["reached_only_moving"] +
                                                        s["lost_to_velocity"])
        assert s["latched"] >= s["first_plan"]  # the first plan's steps are the episode's first
        assert s["closest_at_rest"] == sorted(s["closest_at_rest"])
    text = one_frame.report(result)
    assert "| the world model |" in text and "(`lewm-history`, a counterfactual) |" in text
    for suffix in (".pt", ".json"):  # the same model in a second file
        shutil.copyfile(ckpt.with_suffix(suffix), (tmp_path / "copy").with_suffix(suffix))
    assert wm.main(["study", "--what", "one-frame", "--checkpoint", f"{ckpt},{tmp_path / 'copy.pt'}", "--episodes",
                    "2", "--device", "cpu", "--out", str(tmp_path / "study")]) == 0  # two models, pooled
    for name in ("results.json", "results.md", "results.png"):
        assert (tmp_path / "study" / name).is_file()
    pooled = json.loads((tmp_path / "study" / "results.json").read_text())
    assert pooled["summary"]["world_model"]["episodes"] == 4
    assert pooled["summary"]["world_model"]["latched"] == pytest.approx(world["latched"])  # the same model twice
    with pytest.raises(ValueError, match="one model"):
        wm.StudyConfig(what="hold", checkpoint=f"{ckpt},{ckpt}")
    from common.files import output_lock

    again = ["study", "--what", "one-frame", "--checkpoint", str(ckpt), "--episodes", "2", "--device", "cpu",
             "--out", str(tmp_path / "study")]
    assert wm.main(again) == 2  # a finished study is kept, not replaced by one with other settings
    assert "already holds finished results (results.json: a study's or an evaluation's); pass --overwrite" in \
        capsys.readouterr().err
    with output_lock(tmp_path / "study"):  # one study at a time writes there
        assert wm.main([*again, "--overwrite"]) == 2
    assert json.loads((tmp_path / "study" / "results.json").read_text())["summary"] == pooled["summary"]
    assert wm.main([*again, "--overwrite"]) == 0
    assert json.loads((tmp_path / "study" / "results.json").read_text())["summary"]["world_model"]["episodes"] == 2


def test_the_hold_study_runs_from_the_command_line(data, tmp_path, monkeypatch):
    """It studies the model planned as its file records (here a small CEM without gradient steps)."""
    import wm
    from studies import hold

    torch.manual_seed(0)
    ckpt = save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    meta = json.loads(ckpt.with_suffix(".json").read_text())
    ckpt.with_suffix(".json").write_text(json.dumps({**meta, "planner": {"samples": 6, "grad_steps": 0}}))
    planned, real = [], hold.one_seed

    def spied(setup, policy, *args, **kwargs):
        planned.append(policy)
        return real(setup, policy, *args, **kwargs)

    monkeypatch.setattr(hold, "one_seed", spied)
    assert wm.main(["study", "--what", "hold", "--checkpoint", str(ckpt), "--episodes", "2", "--split", "test",
                    "--device", "cpu"]) == 0
    out = tmp_path / "study-hold"
    result = json.loads((out / "results.json").read_text())
    assert len(result["settling"]) == 1 and 0 <= result["settling"][0]["held"] <= 1
    assert "test episodes" in (out / "results.md").read_text() and (out / "results.png").is_file()
    assert not (out / "units").exists()  # the parts kept for a resume go once the results are written
    assert [(p.plan.samples, p.plan.grad_steps) for p in planned] == [(6, 0)]
    held = {**result, "holding": [{"episodes": [], "a_candidate_holds": None, "model_ranks_a_holder_first": None}]}
    assert "| 0 | 0 | - | - |" in hold.report(held, str(ckpt))  # no failed episode: a row that says so


@pytest.mark.parametrize("study", ["one-frame", "hold"])
def test_an_interrupted_study_resumes_with_the_results_of_an_uninterrupted_one(data, tmp_path, monkeypatch, study):
    """Ctrl-C in a study's second seed: the parts done are kept in ``units``, the rerun measures only the
    rest and gives what an uninterrupted run gives; kept parts measured otherwise are refused by name."""
    from studies import hold, one_frame

    ckpt = save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    module, part, entry = (one_frame, "one_seed", one_frame.run) if study == "one-frame" else \
        (hold, "one_seed", hold.run_all)
    run = lambda **kw: entry(str(ckpt), seeds=2, device="cpu", progress=False, **kw)  # noqa: E731  (val episodes)
    as_json = lambda x: json.loads(json.dumps(x))  # noqa: E731
    whole = as_json(run(episodes=2))
    real, calls, stop_at = getattr(module, part), [], [2]

    def counted(*args, **kwargs):  # Ctrl-C as the second seed starts
        calls.append(1)
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, part, counted)
    with pytest.raises(KeyboardInterrupt):
        run(episodes=2, units=tmp_path / "units")
    with pytest.raises(ValueError, match=r"(seed0|discrimination).json: field measured_with.episodes is 2, this run "
                                         r"asks for 3"):
        run(episodes=3, units=tmp_path / "units")
    calls.clear()
    stop_at[0] = 0
    assert as_json(run(episodes=2, units=tmp_path / "units")) == whole and len(calls) == 1  # only seed 1 ran
