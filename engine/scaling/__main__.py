"""`python -m engine.scaling fit|plan|layout ...`: scaling-law fits, the compute planner and the layout planner.

Each subcommand lives with its code (`fit_cli.cli_main`, `planner.cli_main`) and returns an exit status; user errors
are one line on stderr.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "fit": ("engine.scaling.fit_cli", "fit a loss law (Chinchilla Approaches 2 and 3) to a table of runs"),
    "plan": ("engine.scaling.planner", "compute-optimal model and data sizes for a FLOP budget or a cluster"),
    "layout": ("engine.scaling.layout", "the fastest tp x pp x cp x dp layouts of a model on a cluster that fit"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<6} {text}" for name, (_, text) in COMMANDS.items()]
        usage = "usage: python -m engine.scaling {" + "|".join(COMMANDS) + "} ...\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        print(usage)
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
