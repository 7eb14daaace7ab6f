"""The README, its results in full (docs/RESULTS.md) and its notes (docs/NOTES.md) stay true to the code: every
`wm` command in their code blocks is accepted by the command line as written, the README's Python closed loop
runs, every option they name exists, and every test they cite as evidence exists."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

import wm

ROOT = Path(__file__).resolve().parents[1]
DOCS = {name: (ROOT / name).read_text() for name in ("README.md", "docs/RESULTS.md", "docs/NOTES.md")}  # held to the code
README, ALL_DOCS = DOCS["README.md"], "\n".join(DOCS.values())


def block_commands(text: str) -> list[str]:
    """The `wm ...` commands of the fenced code blocks, continuation lines joined, comments dropped: whole lines,
    the body of a one-line `for v in a b; do ...; done` loop (``$v`` its first value), and what `-m wm` runs."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            loop = re.match(r"for (\w+) in (\S+)[^;]*; do (.*); done$", line)
            if loop:
                line = re.sub(rf"\$\{{?{loop[1]}\}}?", loop[2], loop[3])
            line = re.sub(r"^\S*torchrun .*?-m (wm .*)", r"\1", line)
            if line.startswith("wm "):
                commands.append(line)
    return commands


def test_loops_and_torchrun_lines_are_read_as_the_commands_they_run():
    text = "```bash\nfor s in 1 2; do wm train --seed $s --out r_s$s; done   # both\n" \
           "torchrun --standalone --nproc_per_node=2 -m wm train --out x\n```\n"
    assert block_commands(text) == ["wm train --seed 1 --out r_s1", "wm train --out x"]


def test_the_readme_commands_are_accepted_as_written(monkeypatch, capsys):
    assert len(block_commands(README)) >= 15  # the README's walk-through, not an empty match
    commands = [(name, command) for name, text in DOCS.items() for command in block_commands(text)]
    parsed = []
    for sub, (cls, _, help_text) in list(wm.COMMANDS.items()):
        monkeypatch.setitem(wm.COMMANDS, sub, (cls, lambda cfg: parsed.append(cfg) or 0, help_text))
    monkeypatch.setattr(wm, "set_threads", lambda n: None)  # nothing runs: only the parse and the configs' checks
    for name, command in commands:
        rc = wm.main(shlex.split(command)[1:])
        assert rc == 0, f"{name}: `{command}` is refused: {capsys.readouterr().err.strip()[-300:]}"
    assert len(parsed) == len(commands)


def test_a_misspelt_option_would_be_caught(monkeypatch, capsys):
    """The check above can fail: a README line with an option the command does not have is refused."""
    (command,) = block_commands("```bash\nwm eval --protocl reach25\n```")
    with pytest.raises(SystemExit):
        wm.main(shlex.split(command)[1:])
    assert "unrecognized arguments: --protocl" in capsys.readouterr().err


def our_options() -> set[str]:
    """Every option string of every `wm` command (presets do not add options)."""
    options = set()
    for name in wm.COMMANDS:
        parser = argparse.ArgumentParser()
        wm.add_config_arguments(parser, wm.default_config(name, []))
        options |= {s for action in parser._actions for s in action.option_strings}
    return options


# Options in the README that are not ours: torchrun's, TensorBoard's, and tyro's spelling of ours (quoted to say
# why we did not adopt it); and families of ours (`--identifiability.*`, `--graph.*`, `--subgoals.*`).
OTHER_TOOLS = {"--nproc", "--standalone", "--logdir", "--policy.plan.samples", "--policy.subgoals.no-enabled",
               "--identifiability", "--graph", "--subgoals"}


def test_every_option_the_readme_names_exists():
    text = ALL_DOCS
    code = re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", re.sub(r"```.*?```", "", text, flags=re.S))
    named = {m for span in code for m in re.findall(r"(?<![\w-])(--[a-z][a-z0-9.-]*[a-z0-9])", span)} - OTHER_TOOLS
    assert len(named) >= 50
    assert sorted(named - our_options()) == []


def test_the_tests_the_readme_cites_exist():
    """Every test the README or its notes cite exists: `test_name` (a parametrized case by its base name) in
    some test file, and `test_file.py::test_name` in that file."""
    defined = {path.name: set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
               for path in (ROOT / "tests").glob("test_*.py")}
    bare = set(re.findall(r"`(test_\w+)(?:\[[^\]`]*\])?`", ALL_DOCS))
    in_file = set(re.findall(r"(test_\w+\.py)::(test_\w+)", ALL_DOCS))
    assert len(bare) >= 20 and len(in_file) >= 20
    assert sorted(bare - set().union(*defined.values())) == []
    assert sorted((f, t) for f, t in in_file if t not in defined.get(f, ())) == []


def test_the_readme_closed_loop_runs_as_written(tmp_path, capsys):
    """The Python closed loop of Planning runs as written, with a tiny untrained model in place of the demo's,
    a cheap search and a few steps: the API it shows is the API there is."""
    from test_model import tiny_config
    from worldmodel.model import WorldModel

    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    block = next(b for b in blocks if "gym.make(" in b and "load_policy(" in b)
    WorldModel(tiny_config("mlp", size=64)).save(tmp_path / "m.pt")
    swaps = {'load_policy("runs/demo/model.pt")': f'load_policy({str(tmp_path / "m.pt")!r}, samples=4, iterations=1, '
                                                   f'**{{"subgoals.enabled": False}})',
             "range(100)": "range(3)"}
    code = block
    for shown, tiny in swaps.items():
        assert shown in code, f"README's closed loop no longer holds {shown}"
        code = code.replace(shown, tiny)
    exec(compile(code, "README: the closed loop", "exec"), {})
    error, success = capsys.readouterr().out.split()
    assert float(error) >= 0 and success in ("True", "False")
