"""The rooms and the way imports flow between them: common <- envs <- worldmodel <- planners <- evaluation
<- benchmarks <- studies <- wm; planners never import envs; no module imports another that (through any chain,
function-level imports included) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).parents[1]
LAYERS = ("common", "envs", "worldmodel", "planners", "evaluation", "benchmarks", "studies", "wm")
FORBIDDEN = {("planners", "envs")}  # the planning core needs no environment: a model is enough to plan


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of ours by dotted name: ``envs.dataset``, ``envs`` (its __init__), ``wm``."""
    found = {"wm": root / "wm.py"}
    for package in LAYERS[:-1]:
        for path in sorted((root / package).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Our modules ``path`` imports anywhere in it (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in known)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def layer(module: str) -> str:
    return module.split(".")[0]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_room_is_seen():
    graph = import_graph()
    assert {layer(m) for m in graph} == set(LAYERS)
    assert len(graph) > 40


def against_the_flow(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    rank = {name: k for k, name in enumerate(LAYERS)}
    return [(m, dep) for m, deps in graph.items() for dep in deps
            if rank[layer(dep)] > rank[layer(m)] or (layer(m), layer(dep)) in FORBIDDEN]


def test_imports_flow_one_way():
    wrong = against_the_flow(import_graph())
    assert not wrong, f"imports against the flow {' <- '.join(LAYERS)}: {wrong}"


def test_no_import_cycle():
    assert cycle(import_graph()) is None, f"import cycle: {' -> '.join(cycle(import_graph()))}"


def test_the_checks_can_fail(tmp_path):
    """On a tree with a planner that imports an environment, a dataset that imports evaluation inside a
    function, and a circle between two data modules, every check fires."""
    files = {"wm.py": "", "planners/policy.py": "from envs.reacher import ReacherPixels\n",
             "envs/reacher.py": "", "envs/dataset.py": "def f():\n    from evaluation import report\n",
             "envs/storage.py": "from envs import swm\n", "envs/swm.py": "import envs.storage\n",
             "evaluation/report.py": ""}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert set(against_the_flow(graph)) == {("planners.policy", "envs.reacher"),
                                            ("envs.dataset", "evaluation.report")}
    assert cycle(graph) in (["envs.storage", "envs.swm", "envs.storage"], ["envs.swm", "envs.storage", "envs.swm"])
