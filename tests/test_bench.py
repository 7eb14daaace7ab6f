"""``benchmarks``: the planning-speed table and the plan-quality curve run end to end (tiny settings)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import collect_tiny, save_as_trained_on
from benchmarks import plan as bench
from benchmarks import quality
from test_model import tiny_config
from worldmodel.model import WorldModel


def test_plan_bench_table_has_a_row_per_setting_and_a_measured_speed_up(monkeypatch):
    monkeypatch.setattr(bench, "demo_model", lambda dev: WorldModel(tiny_config("mlp", size=32)).to(dev).eval())
    report = bench.run("cpu", samples=(8,), iterations=(2,), horizons=(2,), batches=(1, 3), naive_budget_s=30,
                       repeats=2, bf16_settings=((8, 2, 2),))
    rows = [line for line in report.splitlines() if re.match(r"\| (cem|mppi) \| 8 \| 2 \| 2 \|", line)]
    assert len(rows) == 4  # two planners x two batch sizes
    assert rows[0].endswith("| 1.00x | 1.000x |") and all(re.search(r"\| [\d.]+x \| [\d.]+x \|$", r) for r in rows)
    assert " ms" not in report  # on a CPU: ratios against the same run's baseline, no absolute times
    speed_up = re.search(r"\| 8 \| 2 \| 2 \| (\d+)x \|", report)
    assert speed_up, report  # the naive reference ran, and its ratio is printed
    against = report.split("(LeWM's setting)")[1].split("What planning")[0]
    assert re.findall(r"\| (\d) \| [\d.]+x \([\d.]+-[\d.]+\) \|", against) == ["1", "3"]  # the default vs LeWM's
    fair = re.search(r"\| 8 \| 2 \| 2 \| [\d.]+x \([\d.]+-[\d.]+\) \|", report.split("fair")[1])
    assert fair, report  # so did the fair one (problems one at a time, candidates batched), 2 alternating pairs
    bf16 = re.findall(r"\| 8 \| 2 \| 2 \| (\d) \| [\d.]+x \([\d.]+-[\d.]+\) \|", report.split("bf16 is faster")[1])
    assert bf16 == ["1", "3"], report  # bf16 against float32, per batch size, 2 alternating pairs each


def test_lewms_search_in_the_speed_benchmarks_is_its_planners_as_the_lewm_protocol_runs_it():
    """The speed benchmarks time LeWM's CEM search with the settings its protocol plans with, and the labels
    (CEM 300 x 30 x 5, top 30, no gradient steps, white noise) say what that is."""
    assert bench.LEWM_SEARCH == {"samples": 300, "iterations": 30, "horizon": 5, "cem.elites": 30, "grad_steps": 0,
                                 "noise_beta": 0.0}


def test_absolute_columns_are_printed_on_a_gpu_only():
    from benchmarks.timing import markdown_table

    columns, rows = [("setting", False), ("ms", True), ("vs row 1", False)], [["a", "2.0", "1.00x"]]
    assert markdown_table(columns, rows, absolute=False) == ["| setting | vs row 1 |", "|---|---|", "| a | 1.00x |"]
    assert markdown_table(columns, rows, absolute=True)[2] == "| a | 2.0 | 1.00x |"


def test_collect_bench_tables_hold_ratios_on_a_cpu(monkeypatch):
    """``wm bench --what collect``'s tables from stand-in measurements: each ratio the median over rounds of
    the ratio within a round (not a ratio of medians), the worker counts taking turns."""
    from benchmarks import data as data_bench

    rounds = {"dm_control physics.render": [100.0, 200.0, 100.0], "ours, standard quality": [300.0, 200.0, 200.0],
              "ours, fast quality": [1200.0, 800.0, 800.0]}
    monkeypatch.setattr(data_bench, "bench_render", lambda size, repeats: rounds)
    calls = []
    monkeypatch.setattr(data_bench, "bench_collect", lambda size, workers: calls.append(workers) or 100.0 * workers)
    monkeypatch.setattr(data_bench, "loader_episodes", lambda size: 2)
    monkeypatch.setattr(data_bench, "collect", lambda *args, **kwargs: None)
    monkeypatch.setattr(data_bench, "bench_loader", lambda path, spec, repeats: {
        "from disk (h5py, open handles)": [50.0, 100.0, 50.0], "in memory": [400.0, 400.0, 400.0]})
    monkeypatch.setattr(data_bench, "policy_coverage", lambda policy: {"cells_per_episode": 1.0,
                                                                       "displacement_25_steps": 0.5})
    monkeypatch.setattr(data_bench, "absolute_shown", lambda device=None: False)  # a CPU machine, also on a GPU one
    report = data_bench.run(sizes=(64,), workers=(1, 2), repeats=3)
    assert "| 64 | 2.00x (1.00-3.00) | 4.00x (4.00-4.00) |" in report  # medians' ratio would say 1.50x
    assert calls == [1, 2, 2, 1, 1, 2] and "| 64 | 2.00x (2.00-2.00) |" in report
    assert "| 64 | 2 | 8.00x (4.00-8.00) |" in report
    assert "frames/s" not in report and "windows/s" not in report  # on a CPU: no absolute rates
    assert "3 rounds of 200 frames" in report  # and one round is one, not "1 rounds"
    assert "1 round of one collection" in data_bench.run(sizes=(64,), workers=(1,), repeats=1)


def test_alternating_runs_pair_each_run_with_its_neighbour_in_time():
    from benchmarks.timing import alternating, paired_ratio

    order = []
    a, b = alternating(lambda: order.append("a") or len(order), lambda: order.append("b") or len(order), 3)
    assert "".join(order) == "abbaab" and a == [1, 4, 5] and b == [2, 3, 6]  # run r of each adjacent in time
    assert paired_ratio([2.0, 3.0, 8.0], [1.0, 1.0, 2.0]) == "3.00x (2.00-4.00)" and paired_ratio([3], [2]) == "1.50x"
    assert paired_ratio([1.2, 1.4, 1.5], [100.0, 100.0, 100.0]) == "0.014x (0.012-0.015)"  # small ratios keep a digit
    with pytest.raises(ValueError, match="repeats"):
        alternating(lambda: 0, lambda: 0, 0)


def test_round_robin_times_every_setting_once_per_round():
    from benchmarks.timing import round_robin

    order = []
    runs = {k: (lambda k=k: order.append(k) or len(order)) for k in "xyz"}
    out = round_robin(runs, {"x": 3, "y": 1, "z": 2})
    assert "".join(order) == "xyzzxx"  # rounds: x y z, then z x reversed, then x alone
    assert out == {"x": [1, 5, 6], "y": [2], "z": [3, 4]}


def test_train_bench_has_a_row_per_encoder_against_the_first(monkeypatch):
    from benchmarks import train as train_bench

    sizes, autocast = [], []  # the frame size each row's model is built for; whether each step ran in bf16
    monkeypatch.setattr(train_bench, "WorldModel", lambda cfg: sizes.append(cfg.image_size) or WorldModel(cfg))
    losses = train_bench.world_model_losses
    monkeypatch.setattr(train_bench, "world_model_losses",
                        lambda *args: autocast.append(torch.is_autocast_enabled("cpu")) or losses(*args))
    report = train_bench.run("cpu", steps=1, encoders={"a": {"encoder.conv_channels": 2},
                                                       "b": {"encoder.conv_channels": 4, "image_size": 32}}, repeats=2)
    rows = re.findall(r"\| (\w(?:, bf16 autocast)?) \| ([\d.]+)x \(", report)
    assert [r[0] for r in rows] == ["a", "b", "a, bf16 autocast"] and rows[0][1] == "1.00" and float(rows[1][1]) > 0
    assert sizes == [64, 32, 64]  # a row's frame size is what its model sees (the frames are made to match)
    # on a CPU, training's float32 for the encoders; the last row (the first's model) under bf16 autocast
    # warm-ups in row order, then the rounds (the second in reverse order): a, b, a in bf16
    assert autocast == [False, False, True] * 2 + [True, False, False]


def test_plan_quality_has_a_row_per_setting_timed_against_the_first(tmp_path):
    from evaluation.protocols import LEWM_POLICY

    data = collect_tiny(tmp_path / "data", episodes=6, steps=60)
    for name in ("a", "b"):  # two models pooled
        save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / f"{name}.pt", data)
    lewm = LEWM_POLICY | {"samples": 12, "iterations": 2, "cem.elites": 4}  # its planner, a tiny budget
    settings = (lewm, {}, {"samples": 16, "iterations": 3, "warm_iterations": 1, "bf16": True, "noise_beta": 0.0})
    report = quality.run(f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}", "cpu", settings=settings, episodes=3,
                         protocols=("reach25", "uniform"), data=str(data))
    assert "| setting | reach25: latched / held | uniform: latched / held | held vs the default" in report
    cell = r"([\d.]+)% / ([\d.]+)%"
    rows = re.findall(rf"\| ([^|]+) \| {cell} \| {cell} \| ([^|]+) \| ([\d.]+)x \| ([\d.]+)x \|", report)
    assert [r[0] for r in rows] == ["12 x 2 (white noise)", "20 x 4 + 8 gradient steps",
                                    "16 x 3 + 8 gradient steps (warm 1, bf16, white noise)"]
    assert rows[0][6:] == ("1.000", "1.00") and float(rows[2][6]) > 0  # per call and per episode, vs the first row
    # each rate pools 2 models x 3 episodes: a multiple of 1/6
    assert all(abs(float(x) * 6 / 100 - round(float(x) * 6 / 100)) < 0.01 for r in rows for x in r[1:5])
    assert rows[1][5] == "-"  # the default is the reference of the paired comparison
    better, worse, p = re.fullmatch(r"(\d+) / (\d+) \((< )?([\d.]+)\)", rows[0][5].strip()).group(1, 2, 4)
    assert int(better) + int(worse) <= 12 and 0 < float(p) <= 1


def test_the_gpu_check_runs_end_to_end_on_a_cpu(tmp_path):
    """``wm bench --what gpu --dry-run``: every part of the one-call GPU check with tiny settings, so the
    command is known to work before a GPU machine is at hand."""
    import json

    from benchmarks import gpu

    report, failed = gpu.run("cpu", str(tmp_path / "check"), dry_run=True)
    result = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert "DRY RUN" in report and (tmp_path / "check" / "gpu_check.md").is_file() and failed == []
    assert (tmp_path / "check" / "gpu_check.md").read_text().rstrip().splitlines()[-1].startswith("Made by")
    assert len(result["plan_latency"]) == 4 and {r["preset"] for r in result["training"]} == {"demo", "full"}
    assert {r["mode"] for r in result["plan_latency"]} == {"eager", "eager, bf16"}  # float32 and bf16 scoring
    import torch

    again = gpu.short_training(tmp_path / "check", torch.device("cpu"), dry_run=True)  # a second check measures
    assert again["steps"] == 4 and again["train_minutes"] > 0  # afresh, not refused by the first one's outputs
    assert 0 <= result["short_training"]["uniform_held"] <= 1 and result["short_training"]["steps"] == 4
    assert result["short_training"]["graph"]["components"] >= 1 and "Its subgoal graph: " in report
    assert "skipped" in result["plan_latency_graphs"]  # compiling is the planner tests' to check on a CPU
    assert list(result["seconds"]) == ["plan_latency", "training", "plan_latency_graphs", "short_training", "tests"]


def test_a_failing_part_of_the_gpu_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    import json

    import wm
    from benchmarks import gpu

    def boom(*args):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(gpu, "training_throughput", boom)
    rates = {f"{p}_{k}": 1 for p in ("reach25", "uniform") for k in ("latched", "held")}
    monkeypatch.setattr(gpu, "short_training", lambda *args: {"episodes": 1, "collect_minutes": 0, "train_minutes": 0,
                                                              "steps": 1, **rates})
    report, failed = gpu.run("cpu", str(tmp_path / "check"), dry_run=True)
    assert failed == ["training"] and "training: RuntimeError: no kernel image for this device" in report
    assert "uniform 100.0% / 100.0%" in report  # the parts after the failed one ran
    assert json.loads((tmp_path / "check" / "gpu_check.json").read_text())["failed"] == ["training"]
    assert wm.run_bench(wm.BenchConfig(what="gpu", dry_run=True, device="cpu", out=str(tmp_path / "cli"))) == 1

    _, failed = gpu.run("cpu", str(tmp_path / "late"), dry_run=True, minutes=0)  # out of time before the first part
    result = json.loads((tmp_path / "late" / "gpu_check.json").read_text())
    assert failed == [] and all("not started" in result[part]["skipped"] for part in result["seconds"])


def test_the_gpu_check_refuses_a_cpu_and_a_stop_is_reported_and_removes_its_scratch(tmp_path, monkeypatch, caplog):
    """Without a GPU only the dry run runs (the whole check would take hours); a check stopped in a part
    reports the parts before and the stopped one as failed, and removes what the stopped part had collected
    (a check measures afresh, whatever that part says of resuming)."""
    import json

    import torch

    from benchmarks import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="the GPU check needs a CUDA device, got cpu"):
        gpu.run("auto", str(tmp_path / "cpu"))
    assert not (tmp_path / "cpu").exists()

    def stopped(out, *args):
        (out / "data").mkdir()  # part of a collection
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu, "plan_latency", lambda *args: [])
    monkeypatch.setattr(gpu, "training_throughput", lambda *args: [])
    monkeypatch.setattr(gpu, "short_training", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu.run("cpu", str(tmp_path / "check"), dry_run=True)
    result = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert list(result["seconds"]) == ["plan_latency", "training", "plan_latency_graphs", "short_training"]
    assert "stopped" in result["short_training"]["error"] and not (tmp_path / "check" / "data").exists()
    assert result["failed"] == ["short_training"] and "Failed parts: short_training" in (
        tmp_path / "check" / "gpu_check.md").read_text()
    assert "every check measures afresh" in caplog.text and "gpu_check.md" in caplog.text

    monkeypatch.setattr(gpu, "plan_latency", lambda *args: stopped(tmp_path / "check"))  # stopped in its first
    with pytest.raises(KeyboardInterrupt):  # part: an earlier check's report there is not left looking current
        gpu.run("cpu", str(tmp_path / "check"), dry_run=True)
    result = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    assert list(result["seconds"]) == ["plan_latency"] and result["failed"] == ["plan_latency"]


def test_subgoal_cost_compares_the_same_episodes_with_and_without(tmp_path, monkeypatch):
    from benchmarks import quality

    data = collect_tiny(tmp_path / "data", episodes=6, steps=60)
    save_as_trained_on(WorldModel(tiny_config("mlp", size=32, frameskip=5)), tmp_path / "m.pt", data)
    meta = json.loads((tmp_path / "m.json").read_text())  # planned as its file records: a small CEM
    (tmp_path / "m.json").write_text(json.dumps({**meta, "planner": {"samples": 6, "grad_steps": 0}}))
    monkeypatch.setattr(quality, "absolute_shown", lambda device: True)  # the times too, as on a GPU
    planned, real = [], quality.world_model_records
    monkeypatch.setattr(quality, "world_model_records",
                        lambda setup, policy, *a: planned.append(policy.plan.samples) or real(setup, policy, *a))
    report = quality.subgoal_cost(str(tmp_path / "m.pt"), "cpu", episodes=2, protocols=("reach25",), data=str(data),
                                  repeats=2)
    assert planned == [6] * 4 and "Planned as the model file records: --samples 6 --grad-steps 0." in report
    assert re.search(r"graph included: [\d.]+ s, [\d.]+x \([\d.]+-[\d.]+\) of the time without", report)
    assert "2 runs of each setting" in report
    rows = {line.split(" | ")[1]: line.split(" | ") for line in report.splitlines() if line.startswith("| reach25 |")}
    assert set(rows) == {"off", "on"} and rows["off"][6] == "-" and float(rows["on"][6]) > 0  # routing timed
    assert re.fullmatch(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", rows["on"][5])  # the median ratio of 2 pairs
    assert rows["off"][8] == "- |" and re.fullmatch(r"\d+ \|", rows["on"][8])  # plans that met a stray arm


def test_bench_protocol_reaches_both_closed_loop_benchmarks(tmp_path, monkeypatch):
    import inspect

    import wm

    defaults = {name: inspect.signature(fn).parameters["protocols"].default
                for name, fn in (("plan-quality", quality.run), ("subgoals", quality.subgoal_cost))}
    assert defaults == {"plan-quality": ("reach25",), "subgoals": ("reach25", "uniform")}
    seen = {}

    def recorder(name):
        def bench(*args, **kwargs):
            seen[name] = kwargs.get("protocols")
            return "a report"
        return bench

    monkeypatch.setattr(quality, "run", recorder("plan-quality"))
    monkeypatch.setattr(quality, "subgoal_cost", recorder("subgoals"))
    for what in ("plan-quality", "subgoals"):
        wm.run_bench(wm.BenchConfig(what=what, protocol="uniform", out=str(tmp_path / what)))
    assert seen == {"plan-quality": ("uniform",), "subgoals": ("uniform",)}
    for what in ("plan-quality", "subgoals"):  # no --protocol: each benchmark's own default
        wm.run_bench(wm.BenchConfig(what=what, out=str(tmp_path / f"{what}-default")))
    assert seen == {"plan-quality": None, "subgoals": None}


def test_a_busy_machine_is_said_in_the_report_and_one_benchmark_runs_at_a_time(tmp_path, monkeypatch):
    """Timing that begins while other work runs says so in the report; a second benchmark into the same
    directory is refused rather than timing the first."""
    import os

    import wm
    from benchmarks import timing
    from common.files import OutputLockedError, output_lock

    monkeypatch.setattr(quality, "run", lambda *a, **k: "a report")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert timing.busy_machine_note() == ""
    wm.run_bench(wm.BenchConfig(what="plan-quality", out=str(tmp_path / "quiet")))
    assert "Warning" not in (tmp_path / "quiet" / "bench_plan-quality.md").read_text()
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(timing, "available_cores", lambda: 2)
    assert timing.busy_machine_note().startswith("**Warning**: the load average was 9.0 on 2 core(s)")
    wm.run_bench(wm.BenchConfig(what="plan-quality", out=str(tmp_path / "busy")))
    assert "the load average was 9.0 on 2 core(s) when this benchmark began" in (
        tmp_path / "busy" / "bench_plan-quality.md").read_text()
    with output_lock(tmp_path / "busy"):
        with pytest.raises(OutputLockedError):
            wm.run_bench(wm.BenchConfig(what="plan-quality", out=str(tmp_path / "busy")))


@pytest.mark.parametrize("what", ["plan-quality", "subgoals"])
def test_planning_benchmarks_refuse_protocols_that_fix_the_planner(what, tmp_path):
    """Under ``lewm`` every row would be LeWM's planner, whatever its label: refused before any work, from the
    command line and from Python alike."""
    import wm

    for name in ("lewm", "lewm-history"):
        with pytest.raises(ValueError, match=f"--protocol {name}: fixes its planner"):
            wm.BenchConfig(what=what, protocol=f"reach25,{name}", out=str(tmp_path / "b"))
    bench_fn = quality.run if what == "plan-quality" else quality.subgoal_cost
    with pytest.raises(ValueError, match="--protocol lewm: fixes its planner"):
        bench_fn(str(tmp_path / "missing.pt"), "cpu", protocols=("lewm",))
    wm.BenchConfig(what=what, protocol="lewm-mpc,reach10", out=str(tmp_path / "b"))  # planner left free: taken
    if what == "subgoals":  # one model's cost, named as the option
        with pytest.raises(ValueError, match="--checkpoint: --what subgoals measures one model, got 'a.pt,b.pt'"):
            wm.BenchConfig(what=what, checkpoint="a.pt,b.pt")
    assert not (tmp_path / "b").exists()


def test_a_stop_during_bench_all_keeps_the_sections_already_measured(tmp_path, monkeypatch, capsys):
    """``--what all`` saves each section as it finishes: a Ctrl-C in the planning tables keeps the collection
    and training ones (minutes of measurements)."""
    import wm
    from benchmarks import data as data_bench
    from benchmarks import plan as plan_bench
    from benchmarks import train as train_bench

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_bench, "run", lambda **kwargs: "the collection table")
    monkeypatch.setattr(train_bench, "run", lambda *args, **kwargs: "the training table")
    monkeypatch.setattr(plan_bench, "run", stopped)
    assert wm.main(["bench", "--what", "all", "--out", str(tmp_path / "b")]) == 130
    saved = (tmp_path / "b" / "bench_all.md").read_text()
    assert "# wm bench collect" in saved and "the collection table" in saved and "the training table" in saved
    assert "# wm bench plan" not in saved and "the training table" in capsys.readouterr().out


@pytest.mark.parametrize("argv, said", [
    (["--checkpoint", "m.pt"], "--checkpoint: wm bench --what all does not read it (it runs collect, train and "
                               "plan); leave it out"),
    (["--what", "collect", "--device", "cpu"], "--device: wm bench --what collect does not read it; leave it out"),
    (["--what", "plan", "--episodes", "3", "--split", "test"],
     "--episodes, --split: wm bench --what plan does not read them; leave them out"),
    (["--what", "plan-quality", "--repeats", "5"], "--repeats: wm bench --what plan-quality does not read it"),
    (["--what", "gpu", "--protocol", "uniform"], "--protocol: wm bench --what gpu does not read it"),
])
def test_a_benchmark_refuses_options_it_does_not_read(argv, said, tmp_path, capsys, monkeypatch):
    """Typed, they were ignored (``wm bench --checkpoint`` timed no model of its own); typed at their defaults
    they change nothing, and are taken."""
    import wm
    from benchmarks import data as data_bench
    from benchmarks import gpu as gpu_bench
    from benchmarks import train as train_bench

    for module, name in ((data_bench, "run"), (train_bench, "run"), (bench, "run"), (quality, "run"),
                         (gpu_bench, "run")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("the benchmark ran"))
    assert wm.main(["bench", *argv, "--out", str(tmp_path / "b")]) == 2
    assert said in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert wm.BenchConfig(what="subgoals", repeats=5, episodes=3, split="test").repeats == 5
    assert wm.BenchConfig(what="plan", device="auto", checkpoint=wm.DEFAULT_CHECKPOINT).what == "plan"
