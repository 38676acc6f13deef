"""The ``medp2x`` command: ``medp2x inspect|surgery|convert|scan|evaluate ...``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from medp2x import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medp2x", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medp2x {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"medp2x.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed, for the reports' "reproduce" line
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as err:  # user errors: one clear line, no traceback
        print(f"medp2x {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave that cannot be written (a file, a folder)
        if err.filename is None:  # not about a path: a bug, keep its traceback
            raise
        print(
            f"medp2x {args.command}: error: cannot write {err.filename2 or err.filename}: "
            f"{err.strerror}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
