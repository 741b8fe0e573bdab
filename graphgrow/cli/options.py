"""Option parsing and output helpers shared by the subcommands (no torch import)."""

from __future__ import annotations

import json
import os
import sys
import time

from ..compare import DEFAULT_ATOL, DEFAULT_RTOL, resolve_providers
from ..errors import InvalidArgumentError
from ..onnx.checking import DEFAULT_BATCHES, check_batches
from . import exit_codes


def progress(args):
    """A function printing timestamped progress lines on stderr (when it is a terminal, or with -v; not with -q)."""
    quiet = getattr(args, "quiet", False) or not sys.stderr.isatty()
    verbose = getattr(args, "verbose", False)
    start = time.perf_counter()

    def say(msg):
        if verbose or not quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def parse_shape(text: str) -> tuple:
    """``"NAME=1x3x224x224"`` -> ``("NAME", (1, 3, 224, 224))``; ``"NAME="`` is a scalar."""
    name, eq, dims = str(text).rpartition("=")
    if not eq or not name:
        raise InvalidArgumentError(f"--shape {text!r} is malformed: expected NAME=AxBxC, e.g. input=1x3x224x224")
    dims = dims.strip()
    if not dims:
        return name, ()
    out = []
    for part in dims.replace(",", "x").split("x"):
        part = part.strip()
        if not part.isdigit():
            raise InvalidArgumentError(f"--shape {text!r} is malformed: dimensions must be non-negative integers "
                                       f"separated by 'x', e.g. {name}=1x3x224x224")
        out.append(int(part))
    return name, tuple(out)


def shapes(args) -> dict:
    """``--shape NAME=AxBxC ...`` as ``{name: shape}``."""
    out: dict = {}
    for text in args.shape or []:
        name, shape = parse_shape(text)
        if name in out and out[name] != shape:
            raise InvalidArgumentError(f"--shape given twice for input {name!r} with different shapes")
        out[name] = shape
    return out


def widths(args) -> dict:
    """``--widths FILE.json`` and ``--width NAME=N ...`` (or ``NAME=heads:N``) as ``{producer name: width}``."""
    out = {}
    if args.widths:
        try:
            with open(args.widths) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot read widths file {args.widths}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) or isinstance(v, dict) for v in data.values()):
            raise InvalidArgumentError(f"widths file {args.widths} must hold a JSON object of name: integer width "
                                       "or {\"heads\": n}")
        out.update(data)
    for item in args.width or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise InvalidArgumentError(f"--width expects NAME=N, got {item!r}")
        try:
            out[name] = {"heads": int(value[6:])} if value.startswith("heads:") else int(value)
        except ValueError:
            raise InvalidArgumentError(f"--width {item!r}: {value!r} is not an integer or heads:N") from None
    return out


def providers(name: str) -> list:
    """``--provider cpu|cuda`` as onnxruntime provider names; a missing provider is refused in option terms."""
    try:
        return resolve_providers(name)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(str(exc).replace("providers='cpu'", "--provider cpu")) from None


def batches(value) -> int:
    """``--batches N``, refused in option terms unless positive."""
    return check_batches(value, "--batches")


def default_output(path: str, tag: str) -> str:
    """``model.onnx`` -> ``model.<tag>.onnx``."""
    root, ext = os.path.splitext(path)
    return f"{root}.{tag}{ext or '.onnx'}"


def check_report_path(path: str, source: str) -> str:
    from ..onnx.io import check_output_path

    return check_output_path(path, source)


def output_paths(args, tag: str) -> str:
    """The model's output path (``-o`` or the default), checked with the ``--report`` path before any work."""
    from ..onnx.io import check_output_path

    if getattr(args, "report", None):
        check_output_path(args.report, args.input)
    return check_output_path(args.output or default_output(args.input, tag), args.input)


def write_text(path: str, text: str) -> None:
    """Write ``text`` atomically (temporary file + rename)."""
    from ..onnx.io import check_output_path

    check_output_path(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(path: str, report) -> None:
    write_text(path, json.dumps(report.to_dict(), indent=1))


def not_equivalent(args, exc) -> int:
    """A failed verification: one line, the report if asked for, nothing else written."""
    print(f"graphgrow: not equivalent, nothing written: {exc}", file=sys.stderr)
    if args.report and exc.report is not None:
        write_report(args.report, exc.report)
    return exit_codes.NOT_EQUIVALENT


def add_rewrite_options(p) -> None:
    """Options shared by the commands that rewrite a model (widen, deepen): seed, verification, shapes, report."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime equivalence check")
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL)
    p.add_argument("--batches", type=int, default=DEFAULT_BATCHES)
    p.add_argument("--shape", action="append", metavar="NAME=AxBxC",
                   help="size of dynamic input dimensions (default 1 for each)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
