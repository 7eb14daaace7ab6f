"""The studies: the hold diagnosis's measurements, the one-frame study and the identifiability study's machinery
(tiny settings)."""

import json
import logging
import shutil
from pathlib import Path

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
        frames = sum(setup.store.episodes[i].steps + 1 for i in setup.episodes)
        with pytest.raises(ValueError, match=rf"takes {frames + 1} goal poses, each from a frame of its own, and "
                                             rf"the {len(setup.episodes)} validation episodes .* have {frames} frames"):
            hold.pose_discrimination(setup, goals=frames + 1)  # each goal its own frame: too few of them
    finally:
        setup.batch.close()
    assert len(d["latent_median"]) == len(hold.LEVELS) and 0 <= d["tolerance_ranked"] <= 1
    # each level is ranked against the level nearest twice it (of two as near, the smaller): 0.1 against 0.2
    assert d["twice"] == [0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.14, 0.2, 0.2, None]
    row = hold.report({"discrimination": d, "settling": [], "holding": []}, "m").split("\n| 0.1 | ")[1]
    assert row.splitlines()[0].endswith("% (0.2) |")
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
    runs = [run(0.9, 0), run(0.7, 1)]
    for r, ref in zip(runs, (0.5, 0.6)):  # the Gaussian reference each run measured, read against
        r["gaussianity"]["gaussian_reference"] = {"latent_sigreg": ref}
    text = markdown({"config": {"steps": 5, "seeds": 2, "eval_episodes": 2}, "table": table, "runs": {"r": runs}})
    assert "(0.55 for Gaussian samples of the same shape)" in text


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


@pytest.fixture
def quick_study(tmp_path, monkeypatch):
    """The identifiability study over two runs of one dataset, its collection and its runs faked (no training):
    (the module, a config, what was collected and measured)."""
    import envs.collect
    from common.files import atomic_write_json
    from studies import identifiability as study

    monkeypatch.setattr(study, "RUNS", {"reference": ("smooth", {}), "uniform target": ("smooth",
                                                                                         {"sigreg_target": "uniform"})})
    monkeypatch.setattr(study, "DATASETS", {"smooth": ("smooth", None)})
    calls = {"collected": [], "measured": []}

    def collect(cfg, progress):
        Path(cfg.out).mkdir(exist_ok=True)
        calls["collected"].append(cfg.episodes)

    def one(cfg, out, label, data, settings, seed, progress):
        calls["measured"].append(label)
        probe = {"joints_mean": 0.9, "vel_shoulder": 0.5, "vel_wrist": 0.4}
        row = {"label": label, "seed": seed, "measured_with": study._measured_with(cfg), "linear": probe,
               "nonlinear": probe, "gaussianity": {"latent_sigreg": 1.2}, "reach25_latched": 1.0, "reach25_held": 0.5}
        (out / "runs" / f"{study._slug(label)}-s{seed}").mkdir(parents=True)
        atomic_write_json(out / "runs" / f"{study._slug(label)}-s{seed}" / "study.json", row)
        return row

    monkeypatch.setattr(envs.collect, "collect", collect)
    monkeypatch.setattr(study, "_one", one)
    return study, study.IdentifiabilityConfig(episodes=20, workers=1, out=str(tmp_path / "study")), calls


def test_the_identifiability_study_checks_what_it_keeps_before_collecting(quick_study, monkeypatch):
    """A resume with another setting, a damaged kept run (a field missing, a string, a NaN) or a dataset larger
    than asked for is refused by file and field before anything is collected, naming the study's own option."""
    import dataclasses

    import envs.collect

    study, cfg, calls = quick_study
    study.run(cfg, progress=False)
    out = Path(cfg.out)
    for name in ("results.json", "results.md", "results.png"):
        (out / name).unlink()
    with pytest.raises(ValueError, match=r"reference-s0/study.json: field measured_with.episodes is 20, this run "
                                         r"asks for 22"):
        study.run(dataclasses.replace(cfg, episodes=22), progress=False)
    kept = out / "runs" / "uniform-target-s0" / "study.json"
    good = json.loads(kept.read_text())
    for damage, problem in ((lambda r: r.pop("gaussianity"), "gaussianity.latent_sigreg is missing"),
                            (lambda r: r.update(reach25_held="lots"), "reach25_held holds 'lots', not a finite number"),
                            (lambda r: r["linear"].update(vel_wrist=float("nan")), "linear.vel_wrist holds nan")):
        row = json.loads(json.dumps(good))
        damage(row)
        kept.write_text(json.dumps(row))
        with pytest.raises(ValueError, match=rf"uniform-target-s0/study.json: field {problem}"):
            study.run(cfg, progress=False)
    assert calls == {"collected": [20], "measured": ["reference", "uniform target"]}  # nothing more
    shutil.rmtree(out / "runs")  # no kept run: the dataset is checked
    monkeypatch.setattr(envs.collect, "existing_episodes", lambda cfg: set(range(22)))
    with pytest.raises(ValueError, match=r"data-smooth already holds 22 episodes \(up to episode 21\), more than the "
                                         r"20 this study asks for; pass --identifiability.episodes 22 or more"):
        study.run(cfg, progress=False)
    assert calls["collected"] == [20]


def test_a_failed_identifiability_write_is_not_finished_and_the_rerun_measures_nothing(quick_study, monkeypatch):
    """A file-size limit while writing the results: an error naming the file, no results.json (written last: it
    says the study finished), and the same command writes them without measuring again."""
    import errno

    study, cfg, calls = quick_study
    real = study.plot

    def too_large(summary, path):
        raise OSError(errno.EFBIG, "File too large")
    monkeypatch.setattr(study, "plot", too_large)
    with pytest.raises(OSError, match=r"could not write .*study/results.png \(File too large\); what was measured "
                                      r"is kept in .*study/runs: the same command"):
        study.run(cfg, progress=False)
    assert list(Path(cfg.out).glob("results*")) == []  # nothing half-written, nothing that says finished
    monkeypatch.setattr(study, "plot", real)
    study.run(cfg, progress=False)
    assert all((Path(cfg.out) / name).is_file() for name in ("results.json", "results.md", "results.png"))
    assert calls["measured"] == ["reference", "uniform target"]  # each run measured once


def test_a_failed_write_keeps_the_earlier_studys_results_whole(tmp_path, monkeypatch):
    """A full disk while results.json is written over a finished study (--overwrite): its results.png and
    results.md stay the earlier study's (they used to be the new one's beside the old results.json)."""
    import errno

    import common.files
    from studies import write_results

    plot = lambda result, path: Path(path).write_bytes(json.dumps(result).encode())  # noqa: E731
    write_results(tmp_path, {"rate": 1}, "first", plot)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = common.files._write_all

    def full_at_json(fh, data):  # the new results.json (the plot is written by matplotlib, not here)
        if b'"rate": 2' in data:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fh, data)
    monkeypatch.setattr(common.files, "_write_all", full_at_json)
    with pytest.raises(OSError, match=r"No space left on device.*results\.json"):
        write_results(tmp_path, {"rate": 2}, "second", plot)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temporary left


def test_a_study_removes_the_temporaries_of_a_killed_study_and_only_those(quick_study, tmp_path, caplog):
    """A study killed while writing its results leaves ``results.<pid>.tmp.md`` and the like; the next one in that
    directory removes them, as `wm eval` and `wm probe` do (a file not ours stays)."""
    import wm

    out = tmp_path / "killed"
    out.mkdir()
    left = [out / f"results.999999.tmp{suffix}" for suffix in (".png", ".md", ".json")]
    for path in [*left, out / "notes.999999.tmp.md"]:
        path.write_text("half")
    with caplog.at_level(logging.WARNING):
        assert wm.main(["study", "--what", "identifiability", "--identifiability.episodes", "20",
                        "--identifiability.workers", "1", "--out", str(out)]) == 0
    assert not any(path.exists() for path in left) and (out / "notes.999999.tmp.md").read_text() == "half"
    assert f"removed {left[1]}: left by an interrupted run (process 999999)" in caplog.text
    assert (out / "results.json").is_file()


def test_an_interrupted_identifiability_study_says_how_many_runs_it_kept(quick_study, monkeypatch, caplog):
    study, cfg, calls = quick_study
    real = study._one

    def stopped(cfg, out, label, *args):
        if label == "uniform target":
            raise KeyboardInterrupt
        return real(cfg, out, label, *args)
    monkeypatch.setattr(study, "_one", stopped)
    with pytest.raises(KeyboardInterrupt):
        study.run(cfg, progress=False)
    assert f"stopped: 1 finished part(s) kept in {cfg.out}/runs; the same command measures only the rest" in \
        caplog.text


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
    assert (result["checkpoint"], result["split"], result["episodes"], result["seeds"]) == (str(ckpt), "test", 2, 1)
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
    if study == "hold":  # a damaged kept part: an error naming the file and the field, not a traceback or a NaN
        kept = tmp_path / "units" / "seed0.json"
        good = kept.read_text()
        for damage, problem in ((lambda r: r.pop("holding"), "holding.episodes is missing"),
                                (lambda r: r["settling"].update(held="lots"), "settling.held holds 'lots'"),
                                (lambda r: r["settling"].update(latched=float("nan")), "settling.latched holds nan")):
            part = json.loads(good)
            damage(part["result"])
            kept.write_text(json.dumps(part))
            with pytest.raises(ValueError, match=rf"units/seed0.json: field result.{problem}"):
                run(episodes=2, units=tmp_path / "units")
        kept.write_text(good)
    else:  # one-frame: a kept part without its rows
        kept = tmp_path / "units" / "model0-seed0.json"
        good = kept.read_text()
        part = json.loads(good)
        part["result"].pop("rows")
        kept.write_text(json.dumps(part))
        with pytest.raises(ValueError, match=r"units/model0-seed0.json: field result.rows is missing"):
            run(episodes=2, units=tmp_path / "units")
        kept.write_text(good)
    calls.clear()
    stop_at[0] = 0
    assert as_json(run(episodes=2, units=tmp_path / "units")) == whole and len(calls) == 1  # only seed 1 ran
