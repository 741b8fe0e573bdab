"""Command line: ``graphgrow widen|deepen|check|inspect`` on ONNX files, ``graphgrow demo|zoo`` on the zoo.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args) -> exit code``; they call the
public APIs (:mod:`graphgrow.onnx`, :mod:`graphgrow.api`).  The ONNX subcommands never import torch; ``demo``
does.  Exit codes: :mod:`graphgrow.cli.exit_codes`.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import GraphGrowError
from . import check, deepen, demo, exit_codes, inspect, upcycle, widen, zoo

SUBCOMMANDS = (demo, zoo, widen, inspect, deepen, upcycle, check)  # in the order of --help


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphgrow", description="Function-preserving growth (Net2Net) of neural networks.")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-space details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return exit_codes.BAD_INPUT
    return run_guarded(args.func, args)


def run_guarded(func, args) -> int:
    """Run a subcommand: a GraphGrowError becomes one line on stderr and exit code 2."""
    try:
        return func(args)
    except GraphGrowError as exc:
        print(f"graphgrow: error: {exc}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    except KeyboardInterrupt:
        print("graphgrow: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED


__all__ = ["main", "build_parser", "run_guarded"]
