"""`wm compare`: two evaluations of the same episodes, paired episode by episode."""

import json

import pytest

from evaluation.compare import compare, markdown
from wm import main


def record(index, protocol="reach25", success=True, held=True, method="world_model", t0=None, seconds=1.0):
    return {"run": 0, "protocol": protocol, "seed": 0, "index": index, "method": method, "checkpoint": "m.pt",
            "source_episode": f"ep{index % 3}", "t0": index if t0 is None else t0, "goal_qpos": [0.1 * index, 0.0],
            "success": success, "held": held, "plan_time_per_call_s": seconds}


def write(path, records, config=None, top=None, **settings):
    """A results.json of ``records``; ``config`` adds to its settings, ``top`` to its other fields."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"protocol": "reach25", "tolerance": 0.05, "device": "auto", "threads": 0, "out": str(path),
              "policy": {"plan": {"samples": 100, **settings}}, **(config or {})}
    (path / "results.json").write_text(json.dumps({"config": config, "episodes": records, **(top or {})}))
    return path


def made_on(gpu, threads, commit="abc"):
    """A provenance record of a machine with ``gpu`` (None: none) running ``threads`` torch threads."""
    machine = {"cpu": "Xeon", "cpu_cores": 16, "torch_threads": threads, "gpu": gpu, "platform": "linux"}
    return {"torch_threads": threads, "provenance": {"code": {"commit": commit, "dirty": False}, "machine": machine}}


def test_paired_counts_say_which_episodes_changed(tmp_path):
    # base holds 2 of 12; new holds 11: 9 better, 0 worse on reach25; on uniform 1 better, 3 worse
    base = [record(i, held=i < 2) for i in range(12)] + [record(i, "uniform", held=i < 4) for i in range(6)]
    new = [record(i, held=i != 5, seconds=0.5) for i in range(12)] + \
          [record(i, "uniform", held=i in (0, 5)) for i in range(6)]
    result = compare(str(write(tmp_path / "a", base)), str(write(tmp_path / "b", new, samples=300) / "results.json"))
    assert result["changes"] == {"policy.plan.samples": (100, 300)}  # not where each was written
    rows = {r["protocol"]: r for r in result["rows"]}
    reach = rows["reach25"]["held"]
    assert (reach["better"], reach["worse"]) == (9, 0) and reach["p"] == pytest.approx(2 / 2**9)
    assert (rows["uniform"]["held"]["better"], rows["uniform"]["held"]["worse"]) == (1, 3)
    assert rows["all"]["episodes"] == 18 and (rows["all"]["held"]["better"], rows["all"]["held"]["worse"]) == (10, 3)
    assert rows["reach25"]["time_ratio"] == pytest.approx(0.5)
    text = markdown(result, 0.05)
    assert "| reach25 | world model (MPC) | 12 | 100.0% -> 100.0% | 0 / 0 | 1.0 | 16.7% -> 91.7% | 9 / 0 |" in text
    assert "all protocols, world model (MPC): held at the end, no clear difference (p 0.092)" in text
    assert "Ran differently" not in text and "| 0.50x |" in text


def test_p_values_read_as_the_verdict_does(tmp_path):
    # 13 better, 4 worse: p 0.049, clear at 0.05; rounded to 0.05 it read as not below 0.05
    base = [record(i, held=i >= 13) for i in range(20)]
    new = [record(i, held=i < 13 or i >= 17) for i in range(20)]
    result = compare(str(write(tmp_path / "a", base)), str(write(tmp_path / "b", new)))
    assert result["rows"][0]["held"]["p"] == pytest.approx(0.049, abs=5e-4)
    text = markdown(result, 0.05)
    assert "clearly more often (13 better / 4 worse, p 0.049)" in text and "| 13 / 4 | 0.049 |" in text


def test_timings_compare_only_where_the_evaluations_ran_alike(tmp_path):
    # --device auto on a GPU machine and on a CPU one: the same settings, other planning times
    records = [record(i) for i in range(4)]
    base = write(tmp_path / "a", records, top=made_on(None, 2))
    gpu = write(tmp_path / "b", [record(i, seconds=0.1) for i in range(4)], top=made_on("NVIDIA H200", 16, "def"))
    result = compare(str(base), str(gpu))
    assert result["changes"] == {"code.commit": ("abc", "def")}  # what was measured: still comparable
    assert result["conditions"] == {"machine.gpu": (None, "NVIDIA H200"), "torch_threads": (2, 16)}
    assert result["rows"][0]["time_ratio"] is None and result["rows"][0]["held"]["p"] == 1.0
    text = markdown(result, 0.05)
    assert "Ran differently: `machine.gpu` None -> 'NVIDIA H200';" in text and "Planning times are not compared" in text
    assert text.count("| withheld |") == 1
    threads = compare(str(base), str(write(tmp_path / "c", records, config={"device": "cpu", "threads": 1},
                                           top=made_on(None, 2))))
    assert threads["conditions"] == {"device": ("auto", "cpu"), "threads": (0, 1)} and not threads["changes"]


def test_records_left_out_are_counted_in_words_that_agree(tmp_path):
    base = write(tmp_path / "a", [record(i) for i in range(4)])
    one = markdown(compare(str(base), str(write(tmp_path / "b", [record(i) for i in range(3)]))), 0.05)
    assert "1 record of one evaluation has no counterpart in the other (protocols, methods or seeds only one " \
           "ran) and is left out." in one
    two = markdown(compare(str(base), str(write(tmp_path / "c", [record(i) for i in range(2)]))), 0.05)
    assert "2 records of one evaluation have no counterpart" in two and "and are left out." in two


def test_other_tolerances_are_refused_even_on_the_same_episodes(tmp_path):
    base = write(tmp_path / "a", [record(i) for i in range(4)])
    with pytest.raises(ValueError, match=r"--tolerance 0.05 in --base and 0.0501 in --new"):
        compare(str(base), str(write(tmp_path / "b", [record(i) for i in range(4)], config={"tolerance": 0.0501})))


@pytest.mark.parametrize("damage, why", [
    (lambda r: r["episodes"][1].pop("run"), r"episodes\[1\] has no field run"),
    (lambda r: r["episodes"][0].pop("held"), r"episodes\[0\] has no field held"),
    (lambda r: r.update(episodes=[1, 2]), r"episodes\[0\] is not a record \(an object\), got 1"),
    (lambda r: r.update(config=[1]), "field config is not an object"),
    (lambda r: r.update(config=[]), "field config is not an object"),  # empty, not taken for none
    (lambda r: r["episodes"][2].update(success="false"), r"episodes\[2\] field success is not true or false, "
                                                         r"got 'false'"),  # counted as a success
    (lambda r: r["episodes"][3].update(held=None), r"episodes\[3\] field held is not true or false, got None"),
    (lambda r: r["episodes"][1].update(run=[0]), r"episodes\[1\] field run is not a number or a name, got \[0\]")],
    ids=["no run", "no held", "not records", "config not an object", "config an empty list", "success a string",
         "held null", "run a list"])
def test_damaged_records_are_clear_errors(tmp_path, capsys, damage, why):
    base = write(tmp_path / "a", [record(i) for i in range(4)])
    results = json.loads((base / "results.json").read_text())
    damage(results)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"--new .*b/results.json: " + why):
        compare(str(base), str(tmp_path / "b"))
    assert main(["compare", "--base", str(base), "--new", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "b/results.json" in err and "Traceback" not in err


@pytest.mark.parametrize("side", ["--base", "--new"])
def test_an_episode_listed_twice_is_an_error_naming_it(tmp_path, capsys, side):
    # paired once per listing, a duplicate would count its episode twice in the counts and the p-value
    listed = {"--base": write(tmp_path / "a", [record(i) for i in range(4)]),
              "--new": write(tmp_path / "b", [record(i, held=False) for i in range(4)])}
    write(listed[side], [record(i) for i in (0, 1, 2, 1, 3)])
    assert main(["compare", "--base", str(listed["--base"]), "--new", str(listed["--new"])]) == 2
    out, err = capsys.readouterr()
    assert (f"{side} {listed[side] / 'results.json'}: episodes[3] is episodes[1] again (reach25 seed 0 episode 1, "
            f"model 0, method world_model)") in err and "better / worse" not in out


def test_an_evaluation_compared_with_itself_is_refused(tmp_path, capsys):
    # every episode ties: a table of no differences that answers nothing (a mistyped --base or --new)
    base = write(tmp_path / "a", [record(i) for i in range(4)])
    assert main(["compare", "--base", str(base), "--new", str(base / "results.json")]) == 2
    out, err = capsys.readouterr()
    assert f"--base and --new are the same evaluation ({base / 'results.json'})" in err and "better / worse" not in out
    copy = tmp_path / "copy"  # a copy of the directory is no second evaluation either
    copy.mkdir()
    (copy / "results.json").write_bytes((base / "results.json").read_bytes())
    with pytest.raises(ValueError, match=r"--new .*copy/results.json holds exactly the results of --base .*a/results"):
        compare(str(base), str(copy))


def test_other_episodes_or_no_evaluation_are_clear_errors(tmp_path, capsys):
    base = write(tmp_path / "a", [record(i) for i in range(4)])
    moved = write(tmp_path / "b", [record(i, t0=i + 1) for i in range(4)])
    with pytest.raises(ValueError, match=r"not the same episodes: reach25 seed 0 episode 0 \(model 0\) has t0 0 in "
                                         r"--base and 1 in --new"):
        compare(str(base), str(moved))
    with pytest.raises(ValueError, match=r"--new .*nowhere: no such directory or file"):
        compare(str(base), str(tmp_path / "nowhere"))
    (tmp_path / "running").mkdir()  # an evaluation not finished: no results.json yet
    with pytest.raises(ValueError, match=r"--new .*running/results.json: missing; `wm eval` writes it last"):
        compare(str(base), str(tmp_path / "running"))
    (tmp_path / "running" / "results.json").write_text('{"episodes": [')  # damaged
    with pytest.raises(ValueError, match=r"results.json: not the results.json of a finished .*not a readable JSON"):
        compare(str(base), str(tmp_path / "running"))
    (tmp_path / "running" / "results.json").write_text('{"protocols": {}}')
    with pytest.raises(ValueError, match=r"results.json: not the results.json of a finished .*no field episodes"):
        compare(str(base), str(tmp_path / "running"))
    assert main(["compare", "--base", str(base)]) == 2
    assert "give --new: a `wm eval` output directory" in capsys.readouterr().err
    again = write(tmp_path / "again", [record(i) for i in range(4)])  # the same settings, run again
    assert main(["compare", "--base", str(base), "--new", str(again), "--out", str(tmp_path / "c")]) == 0
    assert "Settings that differ: none." in capsys.readouterr().out
    kept = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert kept["alpha"] == 0.05 and kept["provenance"]["command"].startswith("wm compare --base")
    assert "Made by `wm compare" in (tmp_path / "c" / "compare.md").read_text()
    (tmp_path / "notes.md").write_text("mine")  # --out a file: refused before the comparison is printed
    assert main(["compare", "--base", str(base), "--new", str(again), "--out", str(tmp_path / "notes.md")]) == 2
    out, err = capsys.readouterr()
    assert "notes.md" in err and "Settings that differ" not in out and (tmp_path / "notes.md").read_text() == "mine"
    assert main(["compare", "--base", str(base), "--new", str(tmp_path / "none"), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()  # a refused comparison leaves no empty directory
