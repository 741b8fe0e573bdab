"""``graphgrow check REF.onnx CAND.onnx``: do two ONNX models compute the same function?

Exit status: 0 equivalent, 1 not equivalent, 2 bad input (unreadable model, mismatched inputs/outputs, bad
option, onnxruntime failure).
"""

from __future__ import annotations

import json
import sys

from .. import onnx as gonnx
from ..compare import DEFAULT_ATOL, DEFAULT_RTOL
from ..onnx.checking import DEFAULT_BATCHES
from . import exit_codes, options

_DESCRIPTION = (
    "Run two ONNX models in onnxruntime on the same inputs and compare their outputs by position "
    "(output names may differ; the report uses the reference's names). Both models must have the same graph "
    "input names (inputs that are also initializers are ignored) with the same element types. "
    "Exit status: 0 equivalent, 1 not equivalent, 2 bad input.")

_EPILOG = (
    "Dynamic dimensions (a dim_param or a missing dim_value) are 1 unless --shape gives the full shape of that "
    "input (with --inputs, the .npz arrays' shapes are used for all batches instead); a named dimension set that "
    "way for one input also applies to other inputs that use the same name. An output passes when "
    "max_abs <= atol or max_rel <= rtol (max_rel = max_abs / max|reference|), over all batches.")


def run(args) -> int:
    result = gonnx.check(args.reference, args.candidate, inputs=args.inputs, batches=options.batches(args.batches),
                         shapes=options.shapes(args), atol=args.atol, rtol=args.rtol,
                         providers=options.providers(args.provider), seed=args.seed,
                         progress=options.progress(args))
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    sys.stdout.flush()
    return exit_codes.OK if result.passed else exit_codes.NOT_EQUIVALENT


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="compare two ONNX models' outputs in onnxruntime",
                       description=_DESCRIPTION, epilog=_EPILOG)
    p.add_argument("reference", metavar="REF.onnx", help="the reference model")
    p.add_argument("candidate", metavar="CAND.onnx", help="the candidate model (e.g. the widened one)")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="arrays keyed by input name, used as the first batch (shape and dtype must fit the model); "
                        "further batches are random")
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES, metavar="N",
                   help=f"number of batches to compare, including the --inputs batch (default {DEFAULT_BATCHES})")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=AxBxC",
                   help="full shape of input NAME, e.g. input=1x3x224x224 (repeatable). Needed to set dynamic "
                        "dimensions, which default to 1; use NAME= for a scalar")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL,
                   help=f"absolute tolerance (default {DEFAULT_ATOL:g})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                   help=f"relative tolerance, relative to max|reference| (default {DEFAULT_RTOL:g})")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="onnxruntime execution provider (default cpu; cuda needs onnxruntime-gpu)")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON (with \"equivalent\": true/false) instead of the table")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batches (default 0)")
    p.set_defaults(func=run)
