"""Studies: measurements that answer a question about the model or the planner, each from one command
(``wm study``), on validation episodes unless said otherwise."""

from pathlib import Path

from common.files import atomic_write, atomic_write_json, atomic_write_text
from common.provenance import provenance, signed

# What a study says of kept parts measured with other settings (``common.files.KeptRuns``)
STUDY_ADVICE = "give another --out, or delete its units directory to measure everything again"


def write_results(out: Path, result: dict, text: str, plot) -> dict:
    """``results.png`` (``plot(result, path)``), ``results.md`` (``text``) and ``results.json`` (``result``),
    each atomically and signed with one provenance, the JSON last: it says the study finished. Returns what the
    JSON holds."""
    made = provenance()
    atomic_write(out / "results.png", lambda tmp: plot(result, tmp), keep_suffix=True)
    atomic_write_text(out / "results.md", signed(text, made))
    atomic_write_json(out / "results.json", {**result, "provenance": made})
    return {**result, "provenance": made}
