"""``graphgrow inspect IN.onnx``: the channel spaces of an ONNX model and what couples them (nothing changed)."""

from __future__ import annotations

import json

from .. import onnx as gonnx
from . import exit_codes, options


def run(args) -> int:
    if args.dot:
        from ..onnx.io import check_output_path

        check_output_path(args.dot, args.input)
    result = gonnx.analyze(args.input, options.shapes(args), progress=options.progress(args))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.table())
        print(result.summary())
        for g in result.groups[:20]:
            print(f"  coupled: {', '.join(g[:6])}{' ...' if len(g) > 6 else ''}")
    if args.dot:
        options.write_text(args.dot, result.to_dot())
    return exit_codes.OK


def add_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show the channel spaces of an ONNX model and what couples them")
    i.add_argument("input", metavar="IN.onnx")
    i.add_argument("--json", action="store_true")
    i.add_argument("--dot", metavar="FILE.dot", help="write the spaces and their couplings for graphviz")
    i.add_argument("--shape", action="append", metavar="NAME=AxBxC")
    i.set_defaults(func=run)
