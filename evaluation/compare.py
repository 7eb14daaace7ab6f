"""``wm compare``: two evaluations of the same episodes, episode by episode.

Choosing a setting means running ``wm eval`` with and without it on the same validation episodes (same
models, data, protocols, seeds and tolerance: the episodes are then the same) and asking whether it reaches
or holds the goal in clearly more episodes than it loses. Paired counts and a two-sided sign test say that
far more sharply than two rates side by side; this is the rule every default of the project was chosen by.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from common.config import option
from common.files import atomic_write_json, atomic_write_text, output_dir, read_json
from common.provenance import provenance, signed
from common.text import counted
from evaluation.report import LABELS
from evaluation.stats import format_p, paired_counts, sign_test

METRICS = {"success": "latched", "held": "held at the end"}
SAME_EPISODE = ("source_episode", "t0", "goal_qpos")  # what makes two records the same episode
KEY_FIELDS = ("run", "protocol", "seed", "index", "method")  # what pairs a record with its episode in the other
RECORD_FIELDS = (*KEY_FIELDS, *METRICS)  # what a comparison reads of a record
NOT_SETTINGS = {"out", "overwrite"}  # where the results were written
RUN_CONDITIONS = {"device", "threads"}  # where and how fast it ran: planning times depend on them, outcomes do not


@dataclass
class CompareConfig:
    """wm compare: two evaluations of the same episodes, episode by episode (paired counts and sign tests)."""

    base: str = option("", "the evaluation compared against: an output directory of wm eval or its results.json",
                       path=True)
    new: str = option("", "the evaluation with the setting under test, on the same episodes", path=True)
    alpha: float = option(0.05, "the p-value below which a difference is called clear")
    out: str = option("", "also write compare.md and compare.json (with the provenance) in this directory", path=True)

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha must be in (0, 1), got {self.alpha}")


def results_file(path: str) -> Path:
    """The results.json given, or the one in the directory given."""
    where = Path(path)
    return where / "results.json" if where.is_dir() else where


def load_results(path: str, option_name: str) -> dict:
    """A finished evaluation's results.json (given or in the directory given); a clear error naming it."""
    if not path:
        raise ValueError(f"give {option_name}: a `wm eval` output directory or its results.json")
    if not Path(path).exists():
        raise ValueError(f"{option_name} {path}: no such directory or file")
    file = results_file(path)
    if not file.exists():
        raise ValueError(f"{option_name} {file}: missing; `wm eval` writes it last, when the evaluation finishes")
    results = read_json(file)
    if not isinstance(results.get("episodes"), list) or not results["episodes"]:
        why = "no field episodes" if results else "not a readable JSON object"
        raise ValueError(f"{option_name} {file}: not the results.json of a finished `wm eval` ({why})")
    for field in ("config", "provenance"):
        if field in results and not isinstance(results[field], dict):
            raise ValueError(f"{option_name} {file}: field {field} is not an object")
    for i, record in enumerate(results["episodes"]):
        if not isinstance(record, dict):
            raise ValueError(f"{option_name} {file}: episodes[{i}] is not a record (an object), got {record!r}")
        missing = [field for field in RECORD_FIELDS if field not in record]
        if missing:
            raise ValueError(f"{option_name} {file}: episodes[{i}] has no field {', '.join(missing)}")
        for field in KEY_FIELDS:  # what pairs it: a list or an object can be no episode's key
            if isinstance(record[field], (list, dict)):
                raise ValueError(f"{option_name} {file}: episodes[{i}] field {field} is not a number or a name, got "
                                 f"{record[field]!r}")
        for metric in METRICS:  # what is counted: a string "false" would count as a success, null as a miss
            if not isinstance(record[metric], bool):
                raise ValueError(f"{option_name} {file}: episodes[{i}] field {metric} is not true or false, got "
                                 f"{record[metric]!r}")
    _check_listed_once(results["episodes"], f"{option_name} {file}")
    return results


def _check_listed_once(records: list[dict], where: str) -> None:
    """A ValueError naming the first episode listed twice: paired twice, it would be counted twice."""
    first: dict = {}
    for i, record in enumerate(records):
        j = first.setdefault(_key(record), i)
        if j != i:
            run, protocol, seed, index, method = _key(record)
            raise ValueError(f"{where}: episodes[{i}] is episodes[{j}] again ({protocol} seed {seed} episode {index}, "
                             f"model {run}, method {method}): each episode is counted once; this is not a results.json "
                             f"as `wm eval` writes it")


def _key(record: dict) -> tuple:
    return tuple(record[field] for field in KEY_FIELDS)


def _flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for name, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}."))
        elif name not in NOT_SETTINGS:
            out[f"{prefix}{name}"] = value
    return out


def _differences(base: dict, new: dict) -> dict:
    a, b = _flat(base), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _settings(results: dict) -> dict:
    """What an evaluation measured: its settings and the code's commit (from its provenance)."""
    config = {k: v for k, v in (results.get("config") or {}).items() if k not in RUN_CONDITIONS}
    return {**config, "code": (results.get("provenance") or {}).get("code")}


def _conditions(results: dict) -> dict:
    """What its planning times depend on besides: --device and --threads, the torch threads it ran with and the
    machine (CPU, cores, GPU; from its provenance)."""
    config, made = results.get("config") or {}, results.get("provenance") or {}
    machine = dict(made.get("machine") or {})
    threads = machine.pop("torch_threads", None)  # results.json records them beside its provenance too
    return {**{k: config.get(k) for k in sorted(RUN_CONDITIONS)},
            "torch_threads": results.get("torch_threads", threads), "machine": machine}


def setting_changes(base: dict, new: dict) -> dict:
    """{setting: (base's value, new's value)} for every setting the two evaluations differ in."""
    return _differences(_settings(base), _settings(new))


def condition_changes(base: dict, new: dict) -> dict:
    """{condition: (base's value, new's value)} for every condition of their planning times that differs."""
    return _differences(_conditions(base), _conditions(new))


def paired(base_results: dict, new_results: dict) -> dict:
    """{(protocol, method): [(base record, new record)]} of the episodes both evaluations ran; a ValueError
    when they were scored at other tolerances, or when one of them is not the same episode (another start or
    goal)."""
    tolerances = [(results.get("config") or {}).get("tolerance") for results in (base_results, new_results)]
    if tolerances[0] != tolerances[1]:
        raise ValueError(f"--tolerance {tolerances[0]} in --base and {tolerances[1]} in --new: latched and held "
                         f"mean other things at each; to compare tolerances, score the same episodes at both "
                         f"(`wm eval --score-at`)")
    base = {_key(r): r for r in base_results["episodes"]}
    pairs: dict = {}
    for record in new_results["episodes"]:
        other = base.get(_key(record))
        if other is None:
            continue
        for field in SAME_EPISODE:
            if other.get(field) != record.get(field):
                run, protocol, seed, index, _ = _key(record)
                raise ValueError(f"not the same episodes: {protocol} seed {seed} episode {index} (model {run}) has "
                                 f"{field} {other.get(field)!r} in --base and {record.get(field)!r} in --new; "
                                 f"compare evaluations of the same models, data, split, protocols and tolerance")
        pairs.setdefault((record["protocol"], record["method"]), []).append((other, record))
    if not pairs:
        raise ValueError("the two evaluations share no episode (another protocol, method or seed in each)")
    return pairs


def _counts(pairs: list[tuple[dict, dict]], metric: str) -> dict:
    better, worse = paired_counts([n[metric] for _, n in pairs], [b[metric] for b, _ in pairs])
    rate = lambda side: 100 * sum(bool(p[side][metric]) for p in pairs) / len(pairs)  # noqa: E731
    return {"base": rate(0), "new": rate(1), "better": better, "worse": worse, "p": sign_test(better, worse)}


def _time_ratio(pairs: list[tuple[dict, dict]]) -> float | None:
    """New's mean planning time per call over base's (world-model rows; None where not timed)."""
    times = [(b.get("plan_time_per_call_s"), n.get("plan_time_per_call_s")) for b, n in pairs]
    times = [(b, n) for b, n in times if b and n and math.isfinite(b) and math.isfinite(n)]
    return sum(n for _, n in times) / sum(b for b, _ in times) if times else None


def compare(base_path: str, new_path: str) -> dict:
    """Paired counts per (protocol, method) and over all protocols per method, with the settings that differ and
    the conditions of their planning times that do (the time ratios then withheld: None)."""
    base, new = load_results(base_path, "--base"), load_results(new_path, "--new")
    if os.path.samefile(results_file(base_path), results_file(new_path)):
        raise ValueError(f"--base and --new are the same evaluation ({results_file(new_path)}): compared with itself, "
                         f"every episode ties; give as --new the evaluation run with the setting under test")
    if base == new:  # a run again differs at least in where it was written, when, and its planning times
        raise ValueError(f"--new {results_file(new_path)} holds exactly the results of --base "
                         f"{results_file(base_path)} (the same output directory, provenance and records: a copy of "
                         f"one evaluation?): compared with itself, every episode ties")
    pairs = paired(base, new)
    conditions = condition_changes(base, new)
    time_ratio = (lambda these: None) if conditions else _time_ratio
    rows = []
    for (protocol, method), these in sorted(pairs.items()):
        rows.append({"protocol": protocol, "method": method, "episodes": len(these), "time_ratio": time_ratio(these),
                     **{m: _counts(these, m) for m in METRICS}})
    for method in sorted({m for _, m in pairs}):
        protocols = [p for p, m in pairs if m == method]
        if len(protocols) > 1:
            these = [pair for p in protocols for pair in pairs[(p, method)]]
            rows.append({"protocol": "all", "method": method, "episodes": len(these),
                         "time_ratio": time_ratio(these), **{m: _counts(these, m) for m in METRICS}})
    unmatched = len(base["episodes"]) + len(new["episodes"]) - 2 * sum(len(v) for v in pairs.values())
    return {"base": base_path, "new": new_path, "changes": setting_changes(base, new), "conditions": conditions,
            "rows": rows, "unmatched_records": unmatched}


def _listed(changes: dict) -> str:
    return "; ".join(f"`{k}` {a!r} -> {b!r}" for k, (a, b) in changes.items())


def markdown(result: dict, alpha: float) -> str:
    """The comparison as a table, with what changed and what the counts say."""
    changes, conditions = result["changes"], result["conditions"]
    lines = [f"# `{result['new']}` against `{result['base']}`", "",
             f"Settings that differ: {_listed(changes) if changes else 'none'}.", ""]
    if conditions:
        lines += [f"Ran differently: {_listed(conditions)}. Planning times are not compared (withheld); latched "
                  f"and held still are.", ""]
    lines += ["| protocol | method | episodes | latched: base -> new | better / worse | p | held at the end: base -> "
              "new | better / worse | p | time per call, new / base |", "|---|---|---|---|---|---|---|---|---|---|"]
    pooled = {r["method"] for r in result["rows"] if r["protocol"] == "all"}
    for row in result["rows"]:
        cells = []
        for metric in METRICS:
            c = row[metric]
            cells += [f"{c['base']:.1f}% -> {c['new']:.1f}%", f"{c['better']} / {c['worse']}",
                      format_p(c["p"], alpha)]
        ratio = f"{row['time_ratio']:.2f}x" if row["time_ratio"] else "withheld" if conditions else "-"
        method = LABELS.get(row["method"], row["method"])
        lines.append(f"| {row['protocol']} | {method} | {row['episodes']} | {' | '.join(cells)} | {ratio} |")
    # what the counts say: over all protocols where there are several, else per protocol
    verdicts = [_verdict(row, metric, name, alpha) for row in result["rows"]
                if row["protocol"] == "all" or row["method"] not in pooled for metric, name in METRICS.items()]
    lines += ["", "Better / worse: episodes only the new evaluation (only the base) succeeded in; p: two-sided sign "
              f"test over them (ties carry no information). Clear at p < {alpha:g}.", ""]
    lines += [f"- {v}" for v in verdicts]
    if result["unmatched_records"]:
        n = result["unmatched_records"]
        lines += ["", f"{counted(n, 'record')} of one evaluation {'has' if n == 1 else 'have'} no counterpart in "
                      f"the other (protocols, methods or seeds only one ran) and {'is' if n == 1 else 'are'} left out."]
    return "\n".join(lines) + "\n"


def _verdict(row: dict, metric: str, name: str, alpha: float) -> str:
    c = row[metric]
    where = "all protocols" if row["protocol"] == "all" else row["protocol"]
    if c["p"] < alpha:
        way = "more" if c["better"] > c["worse"] else "less"
        return (f"{where}, {LABELS.get(row['method'], row['method'])}: new is {name} clearly {way} often "
                f"({c['better']} better / {c['worse']} worse, p {format_p(c['p'], alpha)})")
    return (f"{where}, {LABELS.get(row['method'], row['method'])}: {name}, no clear difference "
            f"(p {format_p(c['p'], alpha)})")


def write_comparison(result: dict, alpha: float, out: str) -> None:
    """compare.md and compare.json in ``out``, each atomically, with what made them."""
    made = provenance()
    with output_dir(out) as where:
        atomic_write_text(where / "compare.md", signed(markdown(result, alpha), made))
        atomic_write_json(where / "compare.json", {**result, "alpha": alpha, "provenance": made})
