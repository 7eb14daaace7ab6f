"""The command line a new user types: defaults that chain, help that shows the preset, refusals up front."""

import json
from pathlib import Path

import pytest
import torch

from conftest import run_wm
from wm import add_config_arguments, config_from_args, default_config, main
from worldmodel.model import PRESET_PLANNER
from worldmodel.train import planner_settings, preset_config

TINY_MODEL = ["--latent-dim", 16, "--history", 2, "--encoder.conv-channels", 8, "--encoder.proj-hidden", 32,
              "--predictor.hidden", 32, "--predictor.depth", 2, "--batch-size", 8, "--n-pred", 2, "--rollout-steps", 2,
              "--val-every", 2, "--ckpt-every", 2, "--sigreg-directions", 16, "--eval-episodes", 2, "--device", "cpu"]


def test_commands_chain_with_their_defaults(tmp_path):
    """collect -> train -> eval -> probe with no paths typed: one default dataset and one run directory.
    Training again is a no-op; evaluating again keeps the first results."""
    run_wm("collect", "--episodes", 10, "--steps", 40, "--size", 32, "--workers", 1, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "runs" / "demo" / "data").glob("*.h5"))
    run_wm("train", "--steps", 4, *TINY_MODEL, cwd=tmp_path)
    meta = json.loads((tmp_path / "runs" / "demo" / "model.json").read_text())
    assert meta["step"] == 4 and meta["data"]["path"] == "runs/demo/data"
    assert "reach25_latched" in meta["metrics"]["closed_loop"]
    assert meta["provenance"]["command"].startswith("wm train --steps 4 ")  # what made the model, and where
    manifest = json.loads((tmp_path / "runs" / "demo" / "data" / "dataset.json").read_text())
    assert manifest["provenance"]["command"] == "wm collect --episodes 10 --steps 40 --size 32 --workers 1"
    card = run_wm("info", cwd=tmp_path).stdout  # what the model file is, for whoever receives it
    assert "- **Training**: 4 steps (`--preset demo`, seed 0)." in card and "runs/demo/data`: 10 episodes" in card
    assert "- **Subgoal graph**: saved in the model file" in card and "`reach25` latched" in card
    again = run_wm("train", "--steps", 4, *TINY_MODEL, cwd=tmp_path)
    assert "already holds this finished run" in again.stderr
    eval_args = ["eval", "--episodes", 2, "--seeds", 1, "--samples", 8, "--iterations", 1, "--sim-samples", 8,
                 "--sim-iterations", 1]
    out = run_wm(*eval_args, cwd=tmp_path).stdout
    assert "test episodes of the dataset the model was trained on" in out
    results = json.loads((tmp_path / "runs" / "demo" / "eval" / "results.json").read_text())
    assert results["provenance"]["command"] == "wm " + " ".join(map(str, eval_args))
    scored = {r["source_episode"] for r in results["episodes"]}  # never a training (or validation) episode
    assert scored and scored <= set(meta["data"]["test"]) and not scored & set(meta["data"]["train"] + meta["data"]["val"])
    refused = run_wm(*eval_args, check=False, cwd=tmp_path)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    probe = run_wm("probe", "--mlp-steps", 20, cwd=tmp_path).stdout
    assert "| linear (ridge) |" in probe and "| nonlinear (MLP) |" in probe
    report = json.loads((tmp_path / "runs" / "demo" / "probe.json").read_text())
    assert report["scored_episodes"] == 1 and {"linear", "nonlinear", "gap", "gaussianity"} <= set(report)
    assert "**Warning**: scored on only 1 episode(s): an R^2 divides by the variance" in probe  # low R^2 explained
    assert run_wm("probe", cwd=tmp_path, check=False).returncode == 2  # kept unless --overwrite


def test_help_shows_the_presets_values_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--preset", "full", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimiser steps (default: 20000)" in text and "(default: 1024)" in text  # the full preset
    assert "--encoder.kind {conv,vit}" in text and "--predictor.kind {mlp,transformer}" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--cem.elites", "--cem.momentum", "--mppi.temperature", "--samples", "--cost {final,sum}"):
        assert option in text


def test_every_command_has_help_and_a_misspelt_option_shows_the_commands_usage(capsys):
    from wm import COMMANDS

    for name in COMMANDS:  # a help text with a bare % once broke argparse's formatting of one command
        with pytest.raises(SystemExit) as info:
            main([name, "--help"])
        assert info.value.code == 0, name
        assert f"usage: wm {name}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["eval", "--polcy", "x"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "wm eval: error: unrecognized arguments: --polcy x" in err and "--samples" in err


def test_a_bad_choice_is_refused_before_any_data_is_loaded(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--encoder.kind", "resnet", "--data", str(tmp_path / "none")])
    assert info.value.code == 2 and "invalid choice: 'resnet'" in capsys.readouterr().err
    assert main(["train", "--steps", "0", "--data", str(tmp_path / "none")]) == 2
    assert "--steps 0" in capsys.readouterr().err
    assert main(["train", "--preset", "huge"]) == 2
    assert "--preset must be one of" in capsys.readouterr().err
    assert main(["eval", "--protocol", "reach0"]) == 2
    assert "--protocol" in capsys.readouterr().err


def test_an_option_declared_once_reaches_the_command_line():
    """Every field of the nested configs is an option; values typed override the preset's."""
    import argparse

    parser = argparse.ArgumentParser()
    cfg = preset_config("full")
    add_config_arguments(parser, cfg)
    args = parser.parse_args(["--encoder.vit-heads", "4", "--encoder.vit-width", "256", "--predictor.heads", "8",
                              "--no-compile", "--image-size", "none"])
    new = config_from_args(cfg, args)
    assert (new.model.encoder.vit_heads, new.model.encoder.vit_width, new.model.predictor.heads) == (4, 256, 8)
    assert new.model.image_size is None and new.steps == 20000 and new.model.predictor.hidden == 1024


def test_outputs_and_tools_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """`wm bench --what plan-quality` and `wm video` refuse an unwritable --out, and `wm video` a missing
    ffmpeg, before they run or read anything; `--cem.init-std nan`, and `--cuda-graph` on a CPU, are refused
    before anything too."""
    import imageio_ffmpeg

    import benchmarks.quality
    import envs.dataset

    monkeypatch.setattr(benchmarks.quality, "run", lambda *a, **k: pytest.fail("benchmarked before checking"))
    monkeypatch.setattr(envs.dataset, "EpisodeStore", lambda *a, **k: pytest.fail("read before checking"))
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--what", "plan-quality", "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["video", "--data", str(tmp_path), "--out", str(tmp_path / "file" / "v.mp4")]) == 2
    assert "file" in capsys.readouterr().err
    assert main(["video", "--data", str(tmp_path), "--out", str(tmp_path / "v")]) == 2  # imageio has no writer
    assert "--out must name an .mp4 file, got" in capsys.readouterr().err

    def missing():
        raise RuntimeError("No ffmpeg exe could be found")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", missing)
    assert main(["video", "--data", str(tmp_path), "--out", str(tmp_path / "v.mp4")]) == 2
    assert "writing mp4 videos needs ffmpeg" in capsys.readouterr().err
    assert main(["eval", "--cem.init-std", "nan", "--data", str(tmp_path / "none")]) == 2
    assert "cem.init_std must be a finite number, got nan" in capsys.readouterr().err
    for command in ("eval", "demo"):  # a whole-plan CUDA graph on a CPU: refused before anything is read
        assert main([command, "--cuda-graph", "--device", "cpu", "--data", str(tmp_path / "none")]) == 2
        assert "--cuda-graph needs CUDA, but --device cpu runs on the CPU here" in capsys.readouterr().err


def test_the_demo_pipeline_names_a_damaged_model_json_and_keeps_the_run(tmp_path):
    """A truncated model.json (a full disk, a kill mid-write by another tool) in a run without a checkpoint
    stops `make demo` with an error naming the file, not a JSON traceback, and leaves the run's files as they
    were; with a checkpoint, training writes it again."""
    from wm import _finished

    assert not _finished(tmp_path, 3500)
    (tmp_path / "model.json").write_text('{"step": 3500}')
    assert _finished(tmp_path, 3500) and not _finished(tmp_path, 2500)
    (tmp_path / "model.json").write_text('{"step": 35')
    with pytest.raises(ValueError, match="model.json: not a readable model description"):
        _finished(tmp_path, 3500)
    assert (tmp_path / "model.json").read_text() == '{"step": 35'
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # a run with a checkpoint: training writes model.json again
    assert not _finished(tmp_path, 3500)


def test_the_demo_pipeline_refuses_other_settings_over_a_kept_run_before_any_stage(tmp_path, monkeypatch, capsys):
    """A rerun with another --episodes collected into the data the kept model was trained on (then training
    refused), and one with other evaluation settings reported the kept results as theirs."""
    import wm

    monkeypatch.setattr(wm, "run_collect", lambda cfg: pytest.fail("collected over a kept run"))
    (tmp_path / "eval").mkdir()
    (tmp_path / "model.json").write_text(json.dumps({"step": 20, "train_config": {"steps": 20, "preset": "quick"},
                                                     "data": {"episodes": 12}}))
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"config": {"episodes": 1, "seeds": 1,
                                                                           "baselines": ""}}))
    same = ["demo-pipeline", "--out", str(tmp_path), "--episodes", "12", "--steps", "20", "--eval-episodes", "1",
            "--seeds", "1", "--baselines", ""]
    for option, value, said in (("--episodes", "16", "--episodes 12 (model.json), not 16"),
                                ("--steps", "30", "--steps 20 (model.json), not 30"),
                                ("--preset", "demo", "--preset 'quick' (model.json), not 'demo'"),
                                ("--eval-episodes", "2", "--eval-episodes 1 (eval/results.json), not 2"),
                                ("--baselines", "random", "--baselines '' (eval/results.json), not 'random'")):
        assert main(same + [option, value]) == 2
        assert said in capsys.readouterr().err
    wm._check_kept(tmp_path, _parsed(same))  # the same settings resume or keep the run


def test_the_demo_pipeline_keeps_finished_videos_and_makes_unfinished_ones_again(tmp_path, monkeypatch, capsys):
    """A rerun of a finished `make demo` kept nothing of its videos: it filmed them again with --overwrite, which
    removed the finished ones first, so a stop during that stage lost them. A finished demo is kept now; an
    unfinished one is made again."""
    import wm

    films = []
    monkeypatch.setattr(wm, "run_collect", lambda cfg: None)
    monkeypatch.setattr(wm, "run_train", lambda cfg: None)
    monkeypatch.setattr(wm, "run_demo", lambda cfg: films.append(cfg) or 0)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text("{}")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "episode_000.mp4").write_bytes(b"an unfinished demo")
    argv = ["demo-pipeline", "--out", str(tmp_path)]
    assert main(argv) == 0 and len(films) == 1 and not films[0].overwrite
    (tmp_path / "videos" / "demo.json").write_text("{}")  # the demo finished
    assert main(argv) == 0 and len(films) == 1
    assert f"{tmp_path / 'videos'} already holds the videos: kept" in capsys.readouterr().out


def test_a_rerun_of_a_finished_demo_keeps_its_model_without_advising_an_option_it_lacks(tmp_path, monkeypatch,
                                                                                          capsys, caplog):
    """Training told a rerun of a finished `make demo` to pass --overwrite, which `wm demo-pipeline` does not
    have; the finished model is kept, and said so."""
    import wm
    from conftest import write_synthetic
    from test_train import TINY

    monkeypatch.setattr(wm, "run_collect", lambda cfg: write_synthetic(Path(cfg.out), n_episodes=6, steps=20))
    presets = []
    monkeypatch.setattr(wm, "preset_config", lambda name, **kw: presets.append(name) or preset_config(name, TINY, **kw))
    monkeypatch.setattr(wm, "run_eval", lambda cfg: 0)
    monkeypatch.setattr(wm, "run_demo", lambda cfg: 0)
    argv = ["demo-pipeline", "--out", str(tmp_path / "demo"), "--steps", "4", "--episodes", "6"]
    assert main(argv) == 0 and (tmp_path / "demo" / "model.pt").is_file()
    assert set(presets) == {"quick"}  # what `make demo` trains
    caplog.clear()
    capsys.readouterr()
    monkeypatch.setattr(wm, "run_collect", lambda cfg: None)
    assert main(argv) == 0
    said = capsys.readouterr()
    assert f"{tmp_path / 'demo'} already holds the trained model: kept" in said.out
    assert "--overwrite" not in said.out + said.err + caplog.text


def _parsed(argv: list[str]):
    """The config ``wm`` builds from ``argv`` (the command first), as ``main`` does."""
    import argparse

    parser = argparse.ArgumentParser()
    cfg = default_config(argv[0], argv)
    add_config_arguments(parser, cfg)
    return config_from_args(cfg, parser.parse_args(argv[1:]))


def test_eval_and_demo_plan_a_model_as_its_file_records_unless_typed(tmp_path, caplog, capsys):
    """A model whose preset chose another planner on validation (model.json's ``planner``) is planned so by
    wm eval and wm demo, said on stderr and shown by --help; the options typed override it; models that
    disagree must be told how to plan alike; a bad record is refused naming the file."""
    from test_model import tiny_config
    from worldmodel.model import WorldModel

    hold, hold2, plain, bad = (str(tmp_path / f"{name}.pt") for name in ("hold", "hold2", "plain", "bad"))
    model = WorldModel(tiny_config("mlp", size=32, frameskip=2))
    for path in (hold, hold2):  # two models recording the same planner
        model.save(path, extra={"planner": {"samples": 100, "iterations": 10, "grad_steps": 0}})
    model.save(plain)
    model.save(bad, extra={"planner": {"samples": 0}})
    plan = lambda cfg: (cfg.policy.plan.samples, cfg.policy.plan.iterations, cfg.policy.plan.grad_steps)  # noqa: E731
    default = plan(_parsed(["eval", "--checkpoint", plain]))
    assert default != (100, 10, 0) and plan(_parsed(["eval"])) == default  # no model file: the default planner
    with caplog.at_level("INFO", logger="wm"):
        assert plan(_parsed(["eval", "--checkpoint", hold])) == (100, 10, 0)
    said = "hold.pt: planned with --samples 100 --iterations 10 --grad-steps 0, as its model file records"
    assert said in caplog.text
    assert plan(_parsed(["demo", "--checkpoint", hold, "--samples=20"])) == (20, 10, 0)
    assert plan(_parsed(["eval", "--checkpoint", f"{hold},{hold2}", "--out", "o"])) == (100, 10, 0)
    with pytest.raises(ValueError, match=r"the models plan with different settings \(.*hold.pt: --grad-steps 0 "
                                         r"--iterations 10; .*plain.pt: --grad-steps \d+ --iterations \d+\); type "
                                         r"--grad-steps, --iterations to plan them alike"):
        _parsed(["eval", "--checkpoint", f"{hold},{plain}", "--out", "o", "--samples", "50"])
    mixed = _parsed(["eval", "--checkpoint", f"{hold},{plain}", "--out", "o", "--samples", "50", "--iterations", "4",
                     "--grad-steps", "8"])
    assert plan(mixed) == (50, 4, 8)
    assert main(["eval", "--checkpoint", bad]) == 2
    assert "bad.json: 'planner': " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--checkpoint", hold, "--help"])
    assert "(default: 100)" in " ".join(capsys.readouterr().out.split())


def test_a_typed_planner_leaves_out_the_settings_a_model_records_for_another(tmp_path):
    """A model file recording CEM settings planned with ``--planner mppi``: those settings are the other
    planner's, so they are dropped, not refused as if the user had typed them; without --planner they hold."""
    from test_model import tiny_config
    from worldmodel.model import WorldModel

    path = str(tmp_path / "m.pt")
    WorldModel(tiny_config("mlp", size=32, frameskip=2)).save(path, extra={"planner": {"cem.elites": 3,
                                                                                      "samples": 40}})
    assert _parsed(["eval", "--checkpoint", path]).policy.plan.cem.elites == 3
    mppi = _parsed(["eval", "--checkpoint", path, "--planner", "mppi"]).policy.plan
    assert (mppi.planner, mppi.samples) == ("mppi", 40)  # the shared settings it records still hold
    with pytest.raises(ValueError, match=r"--cem.elites: the mppi planner does not read it"):  # typed: refused
        _parsed(["eval", "--checkpoint", path, "--planner=mppi", "--cem.elites", "5"])


def test_export_saves_the_graph_in_the_model_file_so_it_plans_without_its_data(synthetic_data, tmp_path, capsys,
                                                                               monkeypatch, caplog):
    """wm export builds the subgoal graph from the recorded (or given) dataset and keeps it in model.pt; the
    model then plans without its data, also with a graph of other settings; --data given to a model that
    already holds the graph is said unread; without the graph and without its data, the error says how to
    give it."""
    import shutil

    from conftest import save_as_trained_on
    from test_model import tiny_config
    from planners.policy import load_policy
    from worldmodel.graph import GraphConfig, saved_graph
    from worldmodel.model import WorldModel

    moved = tmp_path / "moved"
    shutil.copytree(synthetic_data, moved)
    model = WorldModel(tiny_config("mlp", size=32, frameskip=2))
    path = str(save_as_trained_on(model, tmp_path / "m.pt", moved))
    shutil.rmtree(moved)  # the dataset is not where the model records it
    assert main(["export", "--checkpoint", path, "--device", "cpu"]) == 2
    assert "subgoals need its training frames: pass --data with the dataset it was trained on" in \
        capsys.readouterr().err
    assert main(["export", "--checkpoint", path, "--data", str(synthetic_data), "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "holds its subgoal graph" in said and "not read" not in said
    assert saved_graph(WorldModel.load(path, "cpu"), GraphConfig()) is not None
    assert main(["export", "--checkpoint", path, "--data", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "nowhere: no such dataset" in err and "not read" not in out  # the path checked before anything said
    with caplog.at_level("INFO"):
        assert main(["export", "--checkpoint", path, "--data", str(synthetic_data), "--device", "cpu"]) == 0
    assert f"{synthetic_data} not read: {path} holds its subgoal graph, built with these settings" in caplog.text
    assert main(["export", "--checkpoint", path, "--device", "cpu"]) == 0  # no data needed now

    # A graph of other settings made the model's own: model.json records them, so it still plans alone, and
    # `wm info` says so; planning once with yet other settings builds a graph but leaves the file's alone.
    assert main(["export", "--checkpoint", path, "--data", str(synthetic_data), "--graph.neighbours", "4"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "m.json").read_text())["planner"] == {"subgoals.neighbours": 4}
    assert load_policy(path, device="cpu").graph is not None  # from the file alone: its dataset is gone
    assert main(["info", "--checkpoint", path]) == 0 and "plan alone" in capsys.readouterr().out
    load_policy(path, device="cpu", data=str(synthetic_data), **{"subgoals.radius": 0.9})
    assert saved_graph(WorldModel.load(path, "cpu"), GraphConfig(neighbours=4)) is not None
    assert json.loads((tmp_path / "m.json").read_text())["planner"] == {"subgoals.neighbours": 4}
    meta = json.loads((tmp_path / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, "planner": {}}))  # a record that does not say so
    assert main(["info", "--checkpoint", path]) == 0
    assert "built with other settings (`--subgoals.neighbours 4`, " in capsys.readouterr().out
    # a graph that cannot be saved (a read-only or full disk) is a failure, not "holds its subgoal graph"
    import worldmodel.model

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(worldmodel.model, "save_extras", full_disk)
    assert main(["export", "--checkpoint", path, "--data", str(synthetic_data), "--graph.neighbours", "5"]) == 2
    said = capsys.readouterr()
    assert "the subgoal graph was built but could not be saved" in said.err and "holds its" not in said.out
    # training with other graph settings records them with the graph it saves
    assert planner_settings(preset_config("hold", {"graph.radius": 0.8})) == {
        **PRESET_PLANNER["hold"], "subgoals.radius": 0.8}


def test_a_graph_saved_before_the_detour_check_plans_as_built_and_gives_way_to_a_checked_one(synthetic_data,
                                                                                           tmp_path, capsys):
    """A model file whose graph predates ``--subgoals.detour`` (its settings lack it) was built keeping every
    link: without its data it still plans with that graph when told so, and the error that asks for its
    data says how; with its data the checked graph is built and replaces it (no other setting differs)."""
    import shutil

    from conftest import save_as_trained_on
    from test_model import tiny_config
    from planners.policy import load_policy
    from worldmodel.graph import GraphConfig, held_graph_config, holds_graph
    from worldmodel.model import WorldModel, save_extras

    moved = tmp_path / "moved"
    shutil.copytree(synthetic_data, moved)
    path = str(save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=2)), tmp_path / "m.pt", moved))
    assert main(["export", "--checkpoint", path, "--graph.detour", "0", "--device", "cpu"]) == 0
    model = WorldModel.load(path, "cpu")
    state = model.extras["graph"]
    older = {**state, "config": {k: v for k, v in state["config"].items() if k != "detour"}}
    save_extras(path, {"graph": older}, planner={})  # as an earlier version saved it
    model = WorldModel.load(path, "cpu")
    assert holds_graph(model, GraphConfig(detour=0)) and not holds_graph(model, GraphConfig())
    shutil.rmtree(moved)  # the dataset is not where the model records it
    with pytest.raises(ValueError, match="or plan with the graph its file holds \\(--subgoals.detour 0.0\\)"):
        load_policy(path, device="cpu")
    assert load_policy(path, device="cpu", **{"subgoals.detour": 0.0}).graph is not None
    load_policy(path, device="cpu", data=str(synthetic_data))  # builds the checked graph, which replaces it
    assert holds_graph(WorldModel.load(path, "cpu"), GraphConfig())  # it plans alone as the default now
    assert load_policy(path, device="cpu").graph is not None
    load_policy(path, device="cpu", data=str(synthetic_data), **{"subgoals.radius": 0.9})  # other settings:
    assert holds_graph(WorldModel.load(path, "cpu"), GraphConfig())  # the file's own graph stays
    save_extras(path, {"graph": {**state, "config": "damaged"}})  # its graph records no settings it can read
    model = WorldModel.load(path, "cpu")
    assert held_graph_config(model) == {} and not holds_graph(model, GraphConfig(detour=0))
    capsys.readouterr()
    assert main(["info", "--checkpoint", path]) == 0 and "built with other settings (unrecorded)" in \
        capsys.readouterr().out


def test_export_says_once_that_data_it_does_not_need_is_not_read(synthetic_data, tmp_path, capsys, caplog):
    """A model file that holds its graph: `wm export --data X` leaves X unread and says so once (the library's
    message, on stderr), not again on stdout."""
    from conftest import save_as_trained_on
    from test_model import tiny_config
    from worldmodel.model import WorldModel

    path = str(save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=2)), tmp_path / "m.pt",
                                  synthetic_data))
    assert main(["export", "--checkpoint", path, "--device", "cpu"]) == 0  # built from its recorded data
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["export", "--checkpoint", path, "--data", str(synthetic_data), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "holds its subgoal graph" in out and (out + caplog.text).count("not read") == 1
    assert f"{synthetic_data} not read: {path} holds its subgoal graph, built with these settings" in caplog.text


@pytest.mark.parametrize("argv, said", [
    (["collect", "--size", "-1"], "--size -1 (must be >= 32)"),
    (["collect", "--size", "300"], "--size 300 (must be <= 256)"),
    (["collect", "--action-repeat", "0"], "--action-repeat 0 (must be >= 1)"),
    (["collect", "--seed", "-1"], "--seed -1 (must be >= 0)"),
    (["train", "--seed", "-1"], "--seed -1 (must be >= 0)"),
    (["demo", "--tolerance", "0"], "--tolerance 0.0 (must be > 0)"),
    (["demo", "--bank-frames", "0"], "--bank-frames 0 (must be >= 1)"),
    (["demo", "--checkpoint", "a.pt,b.pt"], "--checkpoint: wm demo films one model, got 'a.pt,b.pt'"),
    (["demo", "--checkpoint", "runs/x,1/model.pt"], "--checkpoint runs/x,1/model.pt: no such file (nor, read as a "
                                                    "comma list, any of"),
    (["eval", "--checkpoint", "runs/x ü,1/model.pt"], "--checkpoint runs/x ü,1/model.pt: no such file"),
    (["study", "--what", "identifiability", "--identifiability.steps", "-1"],
     "--identifiability.steps -1 (must be >= 1)"),
    (["eval", "--samples", "0"], "horizon, samples and iterations must be >= 1"),
    (["bench", "--what", "plan", "--dry-run"], "--dry-run is the GPU check's (--what gpu)"),
    (["collect", "--size", "64", "--image-size", "100"], "--image-size (image_size) must be an integer from 8 to "
                                                         "--size 64"),  # stored larger than rendered: an upsample
    (["collect", "--size", "16", "--image-size", "12"], "--size 16 (must be >= 32)"),  # the size first
    (["export", "--graph.radius", "-1", "--graph.neighbours", "0"], "invalid subgoal graph settings: neighbours 0 "
                                                                    "(must be >= 1), radius -1.0 (must be > 0)"),
    (["convert", "--format", "shards", "--out", "d", "--compression", "gzip"], "--compression: the swm format's "
                                                                                "only"),  # not ignored
    (["convert", "--format", "shards", "--out", "d", "--overwrite"], "--overwrite: the swm format's only"),
    (["convert", "--out", "d/x.h5", "--image-size", "2"], "--image-size (image_size) must be an integer in [8, 4096]"),
    (["convert", "--data", "d.h5", "--out", "./d.h5"], "--out d.h5 would replace the dataset it converts (--data "),
])
def test_settings_that_make_no_sense_are_refused_before_any_work(argv, said, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert said in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was created


@pytest.mark.parametrize("command, flag", [
    ("collect", "--out"), ("train", "--out"), ("train", "--data"), ("convert", "--out"), ("eval", "--out"),
    ("eval", "--data"), ("probe", "--data"), ("demo", "--out"), ("study", "--data"), ("video", "--out"),
    ("compare", "--base"), ("bench", "--data"), ("export", "--checkpoint")])
def test_a_path_typed_empty_is_refused(command, flag, tmp_path, capsys, monkeypatch):
    """An unset shell variable (``--out "$OUT"``) is neither the working directory nor the option's default."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([command, flag, ""])
    assert info.value.code == 2
    assert f"argument {flag}: must name a path, got an empty string" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_run_is_not_trained_into_its_dataset(tmp_path, capsys):
    """--out naming the --data directory (typed another way) is refused before any work: the run's model,
    checkpoints and logs would go among the shards."""
    from conftest import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, n_episodes=6, steps=40)
    before = sorted(data.iterdir())
    argv = ["train", "--data", str(data), "--out", f"{data}/../data/", *map(str, TINY_MODEL), "--eval-episodes", "0",
            "--steps", "2", "--frameskip", "2"]
    assert main(argv) == 2
    said = capsys.readouterr().err
    assert f"would be written into the dataset it trains on (--data {data.resolve()}); choose an --out" in said
    assert sorted(data.iterdir()) == before


def test_a_resumed_run_forgets_overwrite_and_finds_its_data_from_anywhere(tmp_path, monkeypatch, caplog):
    """A run started with --overwrite and stopped resumes with --resume alone (the flag was how it started),
    and from another working directory it finds its data by what its model.json records, and names it plainly
    (not as project/run/../data)."""
    from conftest import write_synthetic
    from test_train import _poison_loss

    project = tmp_path / "project"
    write_synthetic(project / "data", n_episodes=6, steps=40)
    monkeypatch.chdir(project)
    base = ["train", "--data", "data", "--out", "run", *map(str, TINY_MODEL), "--eval-episodes", "0", "--frameskip", "2"]
    assert main([*base, "--steps", "2"]) == 0  # a finished run, replaced below
    _poison_loss(monkeypatch, after=5)  # stops after its checkpoint of step 4
    assert main([*base, "--steps", "8", "--overwrite"]) == 2
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)  # "data" typed in project/ is not here
    (project / "run" / "model.json").unlink()  # --resume needs only the checkpoint
    write_synthetic(tmp_path / "data", n_episodes=6, steps=40, noise=True)  # another dataset where "data" points
    with caplog.at_level("INFO", logger="worldmodel.train"):
        assert main(["train", "--out", "project/run", "--resume"]) == 0
    meta = json.loads((project / "run" / "model.json").read_text())
    data = (project / "data").resolve()
    assert meta["step"] == 8 and meta["data"]["path"] == str(data)
    assert f"data: {data} (shards" in caplog.text


def test_outputs_of_one_command_are_not_replaced_by_another(tmp_path, capsys):
    """An evaluation never writes over finished results, whatever else is missing beside them, nor into a
    demo's directory; a demo never into an evaluation's or a study's; a copy of a model is not pooled with it."""
    import shutil

    from test_model import tiny_config
    from conftest import collect_tiny, save_as_trained_on
    from worldmodel.model import WorldModel

    data = collect_tiny(tmp_path / "data", episodes=8, steps=60)
    model = save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    small = ["--checkpoint", str(model), "--episodes", "1", "--seeds", "1", "--samples", "8", "--iterations", "1",
             "--threads", "1"]
    assert main(["eval", *small, "--baselines", "", "--out", str(tmp_path / "e")]) == 0
    (tmp_path / "e" / "index.html").unlink()
    capsys.readouterr()
    assert main(["eval", *small, "--baselines", "", "--out", str(tmp_path / "e")]) == 2
    said = capsys.readouterr().err
    assert "already holds the results of reach25" in said and "other weights" not in said
    recorded = json.loads((tmp_path / "e" / "results.json").read_text())["weights_sha256"]
    assert recorded == [json.loads((tmp_path / "m.json").read_text())["weights_sha256"]]  # results name their weights
    torch.manual_seed(1)
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)  # retrained
    assert main(["eval", *small, "--baselines", "", "--out", str(tmp_path / "e")]) == 2
    assert f"measured on other weights than {model} holds now" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", str(model), "--episodes", "1", "--no-gif", "--out", str(tmp_path / "e")]) == 2
    assert "holds finished results (results.json" in capsys.readouterr().err
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "demo.json").write_text("{}")
    assert main(["eval", *small, "--baselines", "", "--out", str(tmp_path / "v")]) == 2
    assert "holds a demo's videos (demo.json)" in capsys.readouterr().err
    (tmp_path / "copy").mkdir()
    for name in ("m.pt", "m.json"):
        shutil.copy(tmp_path / name, tmp_path / "copy" / name)
    pooled = f"{model},{tmp_path / 'copy' / 'm.pt'}"
    assert main(["eval", "--checkpoint", pooled, *small[2:], "--baselines", "", "--out", str(tmp_path / "p")]) == 2
    assert "holds the same weights as" in capsys.readouterr().err and not (tmp_path / "p").exists()
    for meta in (tmp_path / "m.json", tmp_path / "copy" / "m.json"):  # files from before model.json recorded it
        json.dump({k: v for k, v in json.loads(meta.read_text()).items() if k != "weights_sha256"}, meta.open("w"))
    assert main(["eval", "--checkpoint", pooled, *small[2:], "--baselines", "", "--out", str(tmp_path / "p")]) == 2
    assert "holds the same weights as" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["--what", "identifiability", "--checkpoint", "m.pt", "--split", "test", "--device", "cpu"],
     "--checkpoint, --split, --device: the identifiability study does not read them (--what identifiability); "
     "leave them out"),
    (["--identifiability.steps", "5"], "--identifiability.steps: the hold study does not read it (--what hold)"),
    (["--what", "one-frame", "--identifiability.workers", "1", "--episodes", "3"],
     "--identifiability.workers: the one-frame study does not read it (--what one-frame); leave it out"),
])
def test_a_study_refuses_options_it_does_not_read(argv, said, tmp_path, capsys, monkeypatch):
    """Typed, they were ignored; typed at their defaults they change nothing, and are taken."""
    from studies import hold, identifiability, one_frame
    from wm import StudyConfig

    monkeypatch.chdir(tmp_path)
    for module, name in ((hold, "run_all"), (one_frame, "run"), (identifiability, "run")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the study ran"))
    assert main(["study", *argv]) == 2
    assert said in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert StudyConfig(what="identifiability", split="val", episodes=50, seeds=2).seeds == 2
    assert StudyConfig(what="hold", episodes=3).identifiability.steps == 1000


def test_the_hold_study_takes_one_model_whose_path_holds_a_comma(tmp_path):
    from wm import StudyConfig

    one = tmp_path / "run ü,1" / "model.pt"
    one.parent.mkdir()
    one.write_bytes(b"")
    assert StudyConfig(checkpoint=str(one)).checkpoint == str(one)
    for name in ("a.pt", "b.pt"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match="the hold study takes one model"):
        StudyConfig(checkpoint=f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}")
    with pytest.raises(ValueError, match="x,1/model.pt: no such file"):
        StudyConfig(checkpoint="runs/x,1/model.pt")


def test_the_tables_of_options_a_command_does_not_read_name_its_options():
    """A misspelt name in a refusal table would refuse nothing, silently: each is a setting of its command (or,
    ending in ".", the prefix of some), and each table has a row for every choice of --what."""
    import dataclasses

    from common.config import config_fields
    from wm import NOT_READ_BY_BENCH, NOT_READ_BY_STUDY, BenchConfig, StudyConfig

    for table, cls in ((NOT_READ_BY_BENCH, BenchConfig), (NOT_READ_BY_STUDY, StudyConfig)):
        names = [f.name for f in config_fields(cls())]
        for names_of_what in table.values():
            for name in names_of_what:
                assert name in names or (name.endswith(".") and any(n.startswith(name) for n in names)), name
        choices = [f for f in dataclasses.fields(cls) if f.name == "what"][0].metadata.get("choices")
        assert choices is None or set(table) <= set(choices)
