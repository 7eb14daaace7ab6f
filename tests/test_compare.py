"""`wm compare`: two evaluations of the same episodes, paired episode by episode."""

import json

import pytest

from evaluation.compare import compare, markdown
from wm import main


def record(index, protocol="reach25", success=True, held=True, method="world_model", t0=None, seconds=1.0):
    return {"run": 0, "protocol": protocol, "seed": 0, "index": index, "method": method, "checkpoint": "m.pt",
            "source_episode": f"ep{index % 3}", "t0": index if t0 is None else t0, "goal_qpos": [0.1 * index, 0.0],
            "success": success, "held": held, "plan_time_per_call_s": seconds}


def write(path, records, **settings):
    path.mkdir(parents=True, exist_ok=True)
    config = {"protocol": "reach25", "out": str(path), "policy": {"plan": {"samples": 100, **settings}}}
    (path / "results.json").write_text(json.dumps({"config": config, "episodes": records}))
    return path


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
    assert "| reach25 | world model (MPC) | 12 | 100.0% -> 100.0% | 0 / 0 | 1.00 | 16.7% -> 91.7% | 9 / 0 |" in text
    assert "all protocols, world model (MPC): held at the end, no clear difference (p 0.09)" in text


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
    assert main(["compare", "--base", str(base), "--new", str(base), "--out", str(tmp_path / "c")]) == 0
    assert "Settings that differ: none." in capsys.readouterr().out
    kept = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert kept["alpha"] == 0.05 and kept["provenance"]["command"].startswith("wm compare --base")
    assert "Made by `wm compare" in (tmp_path / "c" / "compare.md").read_text()
    (tmp_path / "notes.md").write_text("mine")  # --out a file: refused before the comparison is printed
    assert main(["compare", "--base", str(base), "--new", str(base), "--out", str(tmp_path / "notes.md")]) == 2
    out, err = capsys.readouterr()
    assert "notes.md" in err and "Settings that differ" not in out and (tmp_path / "notes.md").read_text() == "mine"
    assert main(["compare", "--base", str(base), "--new", str(tmp_path / "none"), "--out", str(tmp_path / "d")]) == 2
    assert not (tmp_path / "d").exists()  # a refused comparison leaves no empty directory
