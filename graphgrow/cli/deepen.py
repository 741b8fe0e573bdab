"""``graphgrow deepen IN.onnx --after REGEX``: Net2DeeperNet on an ONNX file, verified, written atomically."""

from __future__ import annotations

import re

from .. import onnx as gonnx
from ..core.deepen import BLOCKS
from ..errors import InvalidArgumentError, VerificationError
from . import checkpoint_dir, exit_codes, options


def run(args) -> int:
    if args.after is None and args.block != "stack":
        raise InvalidArgumentError("--after is required (where the blocks go); only --block stack repeats the whole "
                                   "layer stack without it")
    if checkpoint_dir.is_checkpoint_dir(args.input):
        return checkpoint_dir.deepen(args)
    checkpoint_dir.directory_only(args)
    if args.block == "stack" or args.times is not None:
        raise InvalidArgumentError(f"--block stack and --times apply to checkpoint directories, and {args.input} is "
                                   "not a directory")
    say = options.progress(args)
    out_path = options.output_paths(args, "deep")
    kernel = int(args.kernel) if re.fullmatch(r"\s*-?\d+\s*", args.kernel) else args.kernel
    try:
        result = gonnx.deepen(args.input, after=args.after, block=args.block or "conv-bn-relu", kernel=kernel, seed=args.seed,
                              shapes=options.shapes(args), check=not args.no_check, atol=args.atol, rtol=args.rtol,
                              batches=options.batches(args.batches), providers=options.providers(args.provider), progress=say)
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    say(f"writing {out_path} ...")
    written = result.save(out_path)
    if args.report:
        options.write_report(args.report, result)
    print(result.summary())
    for ins in result.insertions[:20]:
        if ins.block == "copy":
            continue
        k = "+".join("x".join(map(str, k)) for k in ins.kernels) if ins.kernels else "-"
        print(f"  {ins.block:13s} kernel {k:12s} {ins.channels:5d} ch  after {ins.after}")
    for note in result.notes[:20]:
        print(f"  {note}")
    if len(result.insertions) > 20:
        print(f"  ... and {len(result.insertions) - 20} more")
    if result.check is None:
        print("  not verified (--no-check)")
    print(f"wrote {', '.join(written)}")
    return exit_codes.OK


def add_parser(sub) -> None:
    d = sub.add_parser("deepen", help="deepen an ONNX model (Net2DeeperNet), verify it in onnxruntime, write it")
    d.add_argument("input", metavar="IN.onnx|DIR")
    d.add_argument("--after", default=None, metavar="REGEX",
                   help="node or value names (the whole name must match) whose output gets a block (required, "
                        "except with --block stack, where it may name whole stacks to repeat)")
    d.add_argument("--block", choices=list(BLOCKS) + ["copy", "stack"], default=None,
                   help="conv-bn-relu (default for ONNX files; only after provably non-negative values), conv-bn, "
                        "linear, residual; copy: block expansion, --after names module scopes such as layers.3 "
                        "(the default for checkpoint directories); stack: G_stack on a checkpoint directory, the "
                        "whole layer stack repeated --times times (NOT function-preserving: the deviation is "
                        "reported)")
    d.add_argument("--times", type=int, default=None, metavar="G",
                   help="--block stack: how many times the layer stack is repeated (default 2)")
    d.add_argument("--kernel", default="3", help="odd kernel size or a factorized chain like 1x3+3x1 (default 3)")
    d.add_argument("-o", "--output", metavar="OUT.onnx", help="output path (default IN.deep.onnx)")
    checkpoint_dir.add_options(d)
    options.add_rewrite_options(d)
    d.set_defaults(func=run)
