"""``graphgrow widen IN.onnx``: Net2WiderNet on an ONNX file, verified in onnxruntime, written atomically."""

from __future__ import annotations

from .. import onnx as gonnx
from ..errors import GraphGrowError, VerificationError
from . import checkpoint_dir, exit_codes, options


def run(args) -> int:
    if checkpoint_dir.is_checkpoint_dir(args.input):
        return checkpoint_dir.widen(args)
    checkpoint_dir.directory_only(args)
    say = options.progress(args)
    out_path = options.output_paths(args, "wide")
    widths = options.widths(args)
    factor = args.factor if args.factor is not None else (None if widths else 1.41)
    try:
        result = gonnx.widen(args.input, factor, widths=widths or None, only=args.only, exclude=args.exclude,
                             divisor=args.divisor, init=args.init, noise=args.noise, noise_mode=args.noise_mode,
                             seed=args.seed, shapes=options.shapes(args), check=not args.no_check, atol=args.atol,
                             rtol=args.rtol, batches=options.batches(args.batches), providers=options.providers(args.provider),
                             progress=say, fill=not args.no_fill, strict=args.strict)
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    reasons = result.frozen_reasons()
    if not result.widened:
        top = max(reasons, key=reasons.get) if reasons else "the factor adds no channel"
        raise GraphGrowError(f"nothing can be widened in {args.input}: {top}")
    say(f"writing {out_path} ...")
    written = result.save(out_path)
    if args.report:
        options.write_report(args.report, result)
    print(result.summary())
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  frozen ({n}): {reason}")
    if result.check is None:
        print("  not verified (--no-check)" if args.no_check else "  not verified: init/noise are not function-preserving")
    print(f"wrote {', '.join(written)}")
    return exit_codes.OK


def add_parser(sub) -> None:
    w = sub.add_parser("widen", help="widen an ONNX model (Net2WiderNet), verify it in onnxruntime, write it")
    w.add_argument("input", metavar="IN.onnx|DIR",
                   help="an ONNX file, or a Hugging Face checkpoint directory (config.json + safetensors), or a "
                        "Trainer checkpoint directory (trainer_state.json + optimizer.pt: grown with its optimizer "
                        "state, see --optimizer-state)")
    w.add_argument("--factor", type=float, default=None, help="new width = round(old x factor) (default 1.41)")
    w.add_argument("-o", "--output", metavar="OUT",
                   help="output path (default IN.wide.onnx; for a directory DIR-wide)")
    w.add_argument("--widths", metavar="FILE.json", help="explicit widths {producer node name: width}")
    w.add_argument("--width", action="append", metavar="NAME=N",
                   help="explicit width of one producer node (NAME=heads:N: N attention heads)")
    w.add_argument("--only", metavar="REGEX", help="widen only producer nodes matching REGEX")
    w.add_argument("--exclude", metavar="REGEX", help="do not widen producer nodes matching REGEX")
    w.add_argument("--divisor", type=int, default=1, help="round new widths up to a multiple of N")
    w.add_argument("--init", choices=["net2net", "random-pad"], default="net2net")
    w.add_argument("--noise", type=float, default=0.0, help="symmetry-breaking noise, x weight std")
    w.add_argument("--noise-mode", choices=["exact", "paper"], default="exact")
    w.add_argument("--no-fill", action="store_true",
                   help="normalized residual streams grow by whole factors only (no fill + rescale)")
    w.add_argument("--strict", action="store_true",
                   help="fail (exit 2) instead of leaving a space narrower than asked because its norms allow only "
                        "whole factors")
    checkpoint_dir.add_options(w)
    options.add_rewrite_options(w)
    w.set_defaults(func=run)
