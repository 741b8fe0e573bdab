"""``graphgrow widen|deepen DIR``: a Hugging Face checkpoint directory (config.json + safetensors) grown in
bounded memory (:mod:`graphgrow.hf.stream`), written in the same layout, checked before it is moved into
place. torch and transformers are imported only here, only for directories."""

from __future__ import annotations

import json
import os

from ..errors import GraphGrowError, InvalidArgumentError, VerificationError
from . import exit_codes, options, trainer_dir


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isdir(path)


def hf_module(name: str = "stream"):
    """``graphgrow.hf.<name>``, or one sentence naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(f"graphgrow.hf.{name}")
    except ImportError as exc:
        raise GraphGrowError(f"growing a checkpoint directory needs torch, transformers and safetensors "
                             f"(pip install 'graphgrow[hf]'): {exc}") from None


def output_dir(args, tag: str) -> str:
    out = args.output or f"{os.path.normpath(args.input)}-{tag}"
    if args.report:
        options.check_report_path(args.report, args.input)
    return out


def _ticker(say, line):
    """A progress callback ``(done, total, name)`` saying ``line(done, total, name)`` every tenth of the way."""
    state = {"next": 0.0}

    def tick(done, total, name):
        if total and done / total >= state["next"]:
            say(line(done, total, name))
            state["next"] = done / total + 0.1

    return tick


def progress_ticker(args):
    say = options.progress(args)
    return say, _ticker(say, lambda done, total, name: f"{100 * done / total:3.0f}% of {total / 2 ** 30:.2f} GiB "
                                                       f"({name})")


def check_option(args):
    """The check asked for: --no-check wins; --check layers (the default) or full."""
    return "none" if args.no_check else args.check


def check_ticker(args):
    return _ticker(options.progress(args),
                   lambda done, total, name: f"checking layer by layer: {done}/{total} layers ({name})")


def _check_line(check) -> str:
    if not check:
        return "  not verified (--no-check)"
    how = (f"layer by layer, {check['layers']} layers, {check['vocab_rows']} vocabulary rows"
           if check.get("check") == "layers" else "whole models")
    line = (f"  checked ({how}): max relative error {check['max_rel']:.1e} (tolerance {check['tolerance']:.0e}, "
            f"{check['checked_dtype']})")
    return line + (f"\n  {check['note']}" if check.get("note") else "")


def finish(args, out: str, result: dict, lines: list) -> int:
    check = result.get("check")
    if args.report:
        rep = result.get("report")
        data = rep.to_dict() if rep is not None else {"notes": result.get("notes", [])}
        data["check"] = check
        options.write_text(args.report, json.dumps(data, indent=1))
    for line in lines:
        print(line)
    print(_check_line(check))
    print(f"wrote {out}")
    return exit_codes.OK


def directory_only(args) -> None:
    """Options only a checkpoint directory takes, refused for a file."""
    for flag, value in (("--workers", args.workers), ("--ray", args.ray),
                        ("--optimizer-state", args.optimizer_state)):
        if value is not None:
            raise InvalidArgumentError(f"{flag} applies to checkpoint directories, and {args.input} is not a directory")


def writer_options(args) -> dict:
    """workers= and executor= for the stream functions, checked before any planning: a Ray cluster is connected
    to now (an address that does not answer is refused before any work)."""
    if args.workers is not None and args.workers < 1:
        raise InvalidArgumentError(f"--workers must be at least 1, not {args.workers}")
    if args.ray is None:
        return {"workers": args.workers}
    from ..hf.parallel import RayWriter

    ray = RayWriter(args.ray, workers=args.workers)
    ray.connect()
    return {"executor": ray}


def widen(args) -> int:
    if trainer_dir.is_trainer_checkpoint(args.input):
        return trainer_dir.widen(args, hf_module("trainer_checkpoint"), output_dir(args, "wide"))
    trainer_dir.refuse_option(args)
    if args.noise or args.init != "net2net":
        raise InvalidArgumentError("--noise and --init random-pad are not available for checkpoint directories")
    stream = hf_module()
    out = output_dir(args, "wide")
    writers = writer_options(args)
    say, tick = progress_ticker(args)
    widths = options.widths(args)
    factor = args.factor if args.factor is not None else (None if widths else 1.41)
    say(f"planning on {args.input} (weightless) ...")
    try:
        result = stream.widen_checkpoint(args.input, out, factor, widths=widths or None, only=args.only,
                                         exclude=args.exclude, divisor=args.divisor, fill=not args.no_fill,
                                         strict=args.strict, check=check_option(args), seed=args.seed,
                                         allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=tick,
                                         check_progress=check_ticker(args), **writers)
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    rep = result["report"]
    return finish(args, out, result, [rep.summary()] + [f"  {n}" for n in rep.notes])


def deepen(args) -> int:
    if trainer_dir.is_trainer_checkpoint(args.input):
        return trainer_dir.deepen(args, hf_module("trainer_checkpoint"), output_dir(args, "deep"))
    trainer_dir.refuse_option(args)
    stream = hf_module()
    out = output_dir(args, "deep")
    writers = writer_options(args)
    say, tick = progress_ticker(args)
    if args.block == "stack":  # G_stack: not function-preserving, its deviation measured instead of a check
        result = hf_module("stack_stream").stack_checkpoint(
            args.input, out, after=args.after, times=2 if args.times is None else args.times, check=check_option(args), seed=args.seed,
            allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=tick, **writers)
        print(result["report"].summary())
        return finish(args, out, result, [f"  {n}" for n in result["notes"]])
    if args.times is not None:
        raise InvalidArgumentError("--times applies to --block stack (how many times the layer stack is repeated)")
    try:
        result = stream.deepen_checkpoint(args.input, out, after=args.after, block=args.block or "copy",
                                          check=check_option(args), seed=args.seed, allow_pickle=args.allow_pickle,
                                          overwrite=args.overwrite, progress=tick, check_progress=check_ticker(args),
                                          **writers)
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    return finish(args, out, result, [f"  {n}" for n in result["notes"]])


def add_options(p) -> None:
    trainer_dir.add_options(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="checkpoint directories: read pickled .bin weights (loaded with weights_only=True)")
    p.add_argument("--overwrite", action="store_true",
                   help="checkpoint directories: replace a non-empty output directory")
    p.add_argument("--check", choices=["layers", "full"], default="layers",
                   help="checkpoint directories: compare the models layer by layer in bounded memory (default), "
                        "or load both whole")
    p.add_argument("--workers", type=int, metavar="N",
                   help="checkpoint directories: processes writing the shards (default: the CPU count, capped by "
                        "memory and by the size; 1: this process; with --ray: tasks in flight at most)")
    p.add_argument("--ray", metavar="auto|ADDRESS",
                   help="checkpoint directories: write the shards as tasks on a Ray cluster (auto: the running one); "
                        "input and output must be on storage every node sees at the same path (pip install "
                        "'graphgrow[ray]')")
