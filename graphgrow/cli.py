"""Command line: ``graphgrow widen|deepen|check|inspect`` on ONNX files, ``graphgrow demo`` on the zoo.

The ONNX subcommands never import torch; ``demo`` does.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import GraphGrowError

EXIT_OK, EXIT_NOT_EQUIVALENT, EXIT_BAD_INPUT = 0, 1, 2


def _log(args, msg):
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr if not sys.stdout.isatty() else sys.stdout, flush=True)


def cmd_demo(args) -> int:
    """Widen a bundled zoo model and verify it in onnxruntime."""
    import torch

    from . import models
    from . import api
    from .verify import check

    if args.model not in models.ZOO:
        raise GraphGrowError(f"unknown zoo model {args.model!r}; choose from {', '.join(models.ZOO)}")
    torch.manual_seed(args.seed)
    entry = models.ZOO[args.model]
    model = entry.build().eval()
    inputs = models.example_inputs(args.model, batch=2, seed=args.seed)
    t0 = time.perf_counter()
    _log(args, f"[1/3] widening {args.model} ({entry.description}) by {args.factor} ...")
    wide = api.widen(model, args.factor, example_inputs=inputs, seed=args.seed, noise=args.noise)
    t1 = time.perf_counter()
    rep = wide.graphgrow_report
    _log(args, f"      {rep.summary()}  [{t1 - t0:.1f}s]")
    _log(args, f"[2/3] exporting both models to ONNX and comparing in onnxruntime ({args.batches} batches) ...")
    chk = check(model, wide, inputs, backend="onnxruntime", batches=args.batches, floor=True)
    t2 = time.perf_counter()
    print(chk.table())
    _log(args, f"[3/3] {chk.summary()}  [{t2 - t1:.1f}s]")
    if args.report:
        import json

        d = rep.to_dict()
        d["onnxruntime_check"] = chk.to_dict()
        with open(args.report, "w") as f:
            json.dump(d, f, indent=1)
    if args.verbose:
        print(rep.table())
    return EXIT_OK if chk.passed else EXIT_NOT_EQUIVALENT


def cmd_zoo(args) -> int:
    from . import models

    for name, e in models.ZOO.items():
        print(f"{name:22s} input {str(e.input_shape):18s} {e.description}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphgrow", description="Function-preserving growth (Net2Net) of neural networks.")
    p.add_argument("-q", "--quiet", action="store_true", help="print only results")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-space details")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="widen a bundled model (default: the narrow Inception-BN teacher) and verify it")
    d.add_argument("--model", default="inception_bn_narrow", help="zoo model name (see `graphgrow zoo`)")
    d.add_argument("--factor", type=float, default=1.41)
    d.add_argument("--noise", type=float, default=0.0, help="exact symmetry-breaking noise (x weight std)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batches", type=int, default=3)
    d.add_argument("--report", metavar="FILE.json", help="write the growth report as JSON")
    d.set_defaults(func=cmd_demo)
    z = sub.add_parser("zoo", help="list the bundled reference models")
    z.set_defaults(func=cmd_zoo)
    from .onnx.checkcmd import add_check_parser
    from .onnx.commands import add_parsers
    from .onnx.deepen import add_deepen_parser

    add_parsers(sub)
    add_deepen_parser(sub)
    add_check_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    return run_guarded(args.func, args)


def run_guarded(func, args) -> int:
    """Run a subcommand: a GraphGrowError becomes one line on stderr and exit code 2."""
    try:
        return func(args)
    except GraphGrowError as exc:
        print(f"graphgrow: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("graphgrow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
