"""``wm``: the command line over envs, worldmodel and planners. Nothing imports this module."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    raise SystemExit("wm: no subcommands yet")


if __name__ == "__main__":
    sys.exit(main())
