"""Studies: measurements that answer a question about the model or the planner, each from one command
(``wm study``), on validation episodes unless said otherwise."""

from pathlib import Path

from common.files import json_text, write_together
from common.provenance import provenance, signed

# What a study says of kept parts measured with other settings (``common.files.KeptRuns``)
STUDY_ADVICE = "give another --out, or delete its units directory to measure everything again"
RESULTS = ("results.png", "results.md", "results.json")  # what a study writes, in that order: results.json last


def write_results(out: Path, result: dict, text: str, plot) -> dict:
    """``results.png`` (``plot(result, path)``), ``results.md`` (``text``) and ``results.json`` (``result``),
    signed with one provenance, all or none of them (never a mix with an earlier study's), the JSON last: it
    says the study finished. Returns what the JSON holds."""
    made = provenance()
    png, md, js = (out / name for name in RESULTS)
    write_together({png: lambda tmp: plot(result, tmp), md: signed(text, made),
                    js: json_text({**result, "provenance": made})})
    return {**result, "provenance": made}
