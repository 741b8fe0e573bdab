"""``graphgrow widen|deepen checkpoint-500``: a Hugging Face Trainer checkpoint directory (trainer_state.json,
weights, optimizer.pt, ...) grown in memory with its optimizer state (:mod:`graphgrow.hf.trainer_checkpoint`),
so that ``Trainer.train(resume_from_checkpoint=OUT)`` continues from the grown model."""

from __future__ import annotations

import json
import os

from ..errors import InvalidArgumentError, VerificationError
from . import exit_codes, options

OPTIMIZER_MODES = ("reset", "copy", "dual")  # graphgrow.optim.MODES (this module must not import torch)


def is_trainer_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "trainer_state.json"))


def _refuse_streaming_options(args) -> None:
    """A Trainer checkpoint is grown in memory: the streamed writer's options do not apply."""
    for flag, value in (("--workers", args.workers), ("--ray", args.ray)):
        if value is not None:
            raise InvalidArgumentError(f"{flag} applies to model directories written in bounded memory, and "
                                       f"{args.input} is a Trainer checkpoint, grown in memory")


def _common(args) -> dict:
    return dict(optimizer_state=args.optimizer_state or "dual", check=not args.no_check, seed=args.seed,
                allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=options.progress(args))


def _finish(args, out: str, result: dict, widened: bool) -> int:
    rep = result.get("report")
    if args.report:
        data = rep.to_dict() if rep is not None else {}
        data["notes"] = list(data.get("notes", [])) + result["notes"]
        data["optimizer"] = result["optimizer"]
        options.write_text(args.report, json.dumps(data, indent=1))
    if rep is not None:
        check = "not verified (--no-check)" if rep.check is None else rep.check.summary()
        print(rep.summary() if widened else f"deepened: params {rep.params_before:,} -> {rep.params_after:,}; {check}")
        for note in rep.notes:
            print(f"  {note}")
        if widened and rep.check is None:
            print(f"  {check}")
    for note in result["notes"]:
        print(f"  {note}")
    print(f"wrote {out}")
    return exit_codes.OK


def widen(args, trainer, out: str) -> int:
    """``trainer``: graphgrow.hf.trainer_checkpoint (imported by the caller); ``out``: the output folder."""
    if args.noise or args.init != "net2net":
        raise InvalidArgumentError("--noise and --init random-pad are not available for checkpoint directories")
    _refuse_streaming_options(args)
    widths = options.widths(args)
    factor = args.factor if args.factor is not None else (None if widths else 1.41)
    try:
        result = trainer.widen_trainer_checkpoint(args.input, out, factor, widths=widths or None, only=args.only,
                                                  exclude=args.exclude, divisor=args.divisor, fill=not args.no_fill,
                                                  strict=args.strict, **_common(args))
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    return _finish(args, out, result, True)


def deepen(args, trainer, out: str) -> int:
    _refuse_streaming_options(args)
    try:
        result = trainer.deepen_trainer_checkpoint(args.input, out, after=args.after, block=args.block or "copy",
                                                   **_common(args))
    except VerificationError as exc:
        return options.not_equivalent(args, exc)
    return _finish(args, out, result, False)


def refuse_option(args) -> None:
    """--optimizer-state is for Trainer checkpoints alone."""
    if getattr(args, "optimizer_state", None) is not None:
        raise InvalidArgumentError(f"--optimizer-state applies to Trainer checkpoint directories (with "
                                   f"trainer_state.json), and {args.input} is not one")


def add_options(p) -> None:
    p.add_argument("--optimizer-state", choices=OPTIMIZER_MODES, default=None,
                   help="Trainer checkpoints (trainer_state.json + optimizer.pt): how the optimizer state follows the "
                        "growth: dual (default; the map the gradient obeys), copy (the weights' map), reset (none)")
