"""``graphgrow upcycle DIR --experts 8 --top-k 2 -o OUT`` and ``graphgrow grow-experts DIR --factor 2 -o OUT``:
a Hugging Face checkpoint directory turned into its mixture-of-experts twin (or its experts repeated), streamed
tensor by tensor in bounded memory (:mod:`graphgrow.hf.upcycle_stream`), written in the twin's stored layout,
checked against the input (layer by layer by default) before it is moved into place.  Same options, progress,
refusals and exit codes as ``widen DIR`` (:mod:`.checkpoint_dir`): bad input one sentence, exit 2, nothing
written; a failed check exit 1, nothing in place."""

from __future__ import annotations

from ..errors import InvalidArgumentError, VerificationError
from . import checkpoint_dir, options


def _layers(text):
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidArgumentError(f"--layers takes comma-separated layer indices, not {text!r}") from None


def _run(args, tag: str, grow) -> int:
    if not checkpoint_dir.is_checkpoint_dir(args.input):
        raise InvalidArgumentError(f"{args.input} is not a checkpoint directory")
    stream = checkpoint_dir.hf_module("upcycle_stream")
    out = checkpoint_dir.output_dir(args, tag)
    writers = checkpoint_dir.writer_options(args)
    say, tick = checkpoint_dir.progress_ticker(args)
    say(f"planning on {args.input} (weightless) ...")
    common = dict(check=checkpoint_dir.check_option(args), seed=args.seed, allow_pickle=args.allow_pickle,
                  overwrite=args.overwrite, progress=tick, check_progress=checkpoint_dir.check_ticker(args),
                  **writers)
    try:
        result = grow(stream, out, common)
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    rep = result["report"]
    return checkpoint_dir.finish(args, out, result, [rep.summary()] + [f"  {n}" for n in rep.notes])


def run_upcycle(args) -> int:
    return _run(args, "moe", lambda s, out, kw: s.upcycle_checkpoint(
        args.input, out, args.experts, args.top_k, router=args.router, shared=args.shared,
        layers=_layers(args.layers), noise=args.noise, **kw))


def run_grow(args) -> int:
    return _run(args, "experts", lambda s, out, kw: s.grow_experts_checkpoint(
        args.input, out, args.factor, keep_top_k=args.keep_top_k, **kw))


def _common(p) -> None:
    p.add_argument("input", metavar="DIR", help="a Hugging Face checkpoint directory (config.json + weights)")
    p.add_argument("-o", "--output", metavar="OUT", help="output directory (default DIR-moe / DIR-experts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the check against the input")
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    checkpoint_dir.add_options(p)


def add_parser(sub) -> None:
    u = sub.add_parser("upcycle", help="a dense Hugging Face checkpoint -> its mixture-of-experts twin (streamed)")
    _common(u)
    u.add_argument("--experts", type=int, default=8, help="routed experts per sparse layer (default 8)")
    u.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    u.add_argument("--router", choices=["zero", "random"], default="zero")
    u.add_argument("--shared", choices=["dense", "routed"], default=None,
                   help="families with a shared expert: which holds the dense MLP")
    u.add_argument("--layers", metavar="I,J,...", help="the layers made sparse (default all)")
    u.add_argument("--noise", type=float, default=0.0,
                   help="noise inside the experts, x std (NOT exact: only with --no-check)")
    u.set_defaults(func=run_upcycle)
    g = sub.add_parser("grow-experts", help="a mixture-of-experts checkpoint with every expert repeated (streamed)")
    _common(g)
    g.add_argument("--factor", type=int, default=2, help="copies of every expert (default 2)")
    g.add_argument("--keep-top-k", action="store_true", help="keep top-k (NOT exact: only with --no-check)")
    g.set_defaults(func=run_grow)
