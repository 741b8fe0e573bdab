"""``graphgrow demo``: widen a bundled zoo model (default: the narrow Inception-BN teacher), verify it in
onnxruntime.  The one subcommand that imports torch."""

from __future__ import annotations

import json
import sys
import time

from ..errors import GraphGrowError
from . import exit_codes, options


def _log(args, msg):
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr if not sys.stdout.isatty() else sys.stdout, flush=True)


def run(args) -> int:
    import torch

    from .. import api, models
    from ..verify import check

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
        d = rep.to_dict()
        d["onnxruntime_check"] = chk.to_dict()
        options.write_text(args.report, json.dumps(d, indent=1))
    if args.verbose:
        print(rep.table())
    return exit_codes.OK if chk.passed else exit_codes.NOT_EQUIVALENT


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="widen a bundled model (default: the narrow Inception-BN teacher) and verify it")
    d.add_argument("--model", default="inception_bn_narrow", help="zoo model name (see `graphgrow zoo`)")
    d.add_argument("--factor", type=float, default=1.41)
    d.add_argument("--noise", type=float, default=0.0, help="exact symmetry-breaking noise (x weight std)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--batches", type=int, default=3)
    d.add_argument("--report", metavar="FILE.json", help="write the growth report as JSON")
    d.set_defaults(func=run)
