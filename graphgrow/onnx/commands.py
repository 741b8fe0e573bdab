"""`graphgrow widen` and `graphgrow inspect` on ONNX files (no torch import)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from ..errors import GraphGrowError, InvalidArgumentError, VerificationError
from .checkcmd import parse_shape


def _progress(args):
    quiet = getattr(args, "quiet", False) or not sys.stderr.isatty()
    verbose = getattr(args, "verbose", False)
    start = time.perf_counter()

    def say(msg):
        if verbose or not quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def _shapes(args) -> dict:
    out = {}
    for text in args.shape or []:
        name, shape = parse_shape(text)
        out[name] = shape
    return out


def _widths(args) -> dict:
    widths = {}
    if args.widths:
        try:
            with open(args.widths) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"cannot read widths file {args.widths}: {exc}") from None
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise InvalidArgumentError(f"widths file {args.widths} must hold a JSON object of name: integer width")
        widths.update(data)
    for item in args.width or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise InvalidArgumentError(f"--width expects NAME=N, got {item!r}")
        try:
            widths[name] = int(value)
        except ValueError:
            raise InvalidArgumentError(f"--width {item!r}: {value!r} is not an integer") from None
    return widths


def default_output(path: str, tag: str = "wide") -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{tag}{ext or '.onnx'}"


def not_equivalent(args, exc: VerificationError) -> int:
    """A failed verification: one line, the report if asked for, nothing else written, exit code 1."""
    print(f"graphgrow: not equivalent, nothing written: {exc}", file=sys.stderr)
    if args.report and exc.report is not None:
        _write_report(args.report, exc.report)
    return 1


def run_widen(args) -> int:
    from .engine import widen_model_serialized
    from .io import check_output_path, is_binary_onnx, load_model, save_model

    say = _progress(args)
    out_path = check_output_path(args.output or default_output(args.input), args.input)
    say(f"loading {args.input} ...")
    model = load_model(args.input)
    widths = _widths(args)
    factor = args.factor if args.factor is not None else (None if widths else 1.41)
    try:
        wide, report, data = widen_model_serialized(
            model, factor, widths=widths or None, only=args.only, exclude=args.exclude, divisor=args.divisor,
            init=args.init, noise=args.noise, noise_mode=args.noise_mode, seed=args.seed, shapes=_shapes(args),
            check=not args.no_check, atol=args.atol, rtol=args.rtol, batches=args.batches, providers=args.provider,
            progress=say, reference=args.input if is_binary_onnx(args.input) else None)
    except VerificationError as exc:
        return not_equivalent(args, exc)
    if not report.widened:
        reasons = report.frozen_reasons()
        top = max(reasons, key=reasons.get) if reasons else "the factor adds no channel"
        raise GraphGrowError(f"nothing can be widened in {args.input}: {top}")
    say(f"writing {out_path} ...")
    written = save_model(wide, out_path, data)
    if args.report:
        _write_report(args.report, report)
    print(report.summary())
    reasons = report.frozen_reasons()
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  frozen ({n}): {reason}")
    if report.check is None:
        print("  not verified (--no-check)" if args.no_check else "  not verified: init/noise are not function-preserving")
    print(f"wrote {', '.join(written)}")
    return 0


def _write_report(path, report):
    from .io import check_output_path

    check_output_path(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    os.replace(tmp, path)


def space_groups(an) -> list:
    """Groups of spaces coupled by ties (add, concat+add, groups, shuffles): they widen together."""
    cls = an.constraints.classes()
    groups: dict = {}
    for sp in an.produced:
        keys = set(np.unique(cls[sp.chan_ids]).tolist())
        groups.setdefault(min(keys), set()).add(sp.name)
        for k in keys:
            groups.setdefault(k, set()).add(sp.name)
    merged = []
    for g in groups.values():
        if len(g) > 1 and g not in merged:
            merged.append(g)
    # union overlapping sets
    out: list = []
    for g in merged:
        for o in out:
            if o & g:
                o |= g
                break
        else:
            out.append(set(g))
    return [sorted(g) for g in out]


def run_inspect(args) -> int:
    from .engine import analyze_model
    from .io import check_output_path, load_model

    say = _progress(args)
    if args.dot:
        check_output_path(args.dot)
    model = load_model(args.input)
    say("analysing channel spaces ...")
    report, an = analyze_model(model, _shapes(args))
    groups = space_groups(an)
    if args.json:
        d = report.to_dict()
        d["groups"] = groups
        print(json.dumps(d, indent=1))
    else:
        rows = [f"{'space':48s} {'size':>6s}  {'status':10s} consumers / reason"]
        for s in report.spaces:
            status = "frozen" if s.frozen_reasons else "widenable"
            detail = "; ".join(s.frozen_reasons) if s.frozen_reasons else ", ".join(s.consumers[:3])
            rows.append(f"{s.name[-48:]:48s} {s.old_width:6d}  {status:10s} {detail}")
        print("\n".join(rows))
        n_frozen = sum(1 for s in report.spaces if s.frozen_reasons)
        print(f"{len(report.spaces)} channel spaces, {len(report.spaces) - n_frozen} widenable, {n_frozen} frozen; "
              f"{len(groups)} coupled groups; params {report.params_before:,}")
        for g in groups[:20]:
            print(f"  coupled: {', '.join(g[:6])}{' ...' if len(g) > 6 else ''}")
    if args.dot:
        _write_dot(args.dot, report, groups)
    return 0


def _write_dot(path, report, groups):
    lines = ["graph channel_spaces {", "  node [shape=box, fontsize=10];"]
    ids = {s.name: f"s{i}" for i, s in enumerate(report.spaces)}
    for s in report.spaces:
        color = "tomato" if s.frozen_reasons else "palegreen"
        label = f"{s.name}\\n{s.old_width} ch" + (f"\\n{s.frozen_reasons[0][:60]}" if s.frozen_reasons else "")
        label = label.replace('"', "'")
        lines.append(f'  {ids[s.name]} [label="{label}", style=filled, fillcolor={color}];')
    for g in groups:
        for a, b in zip(g, g[1:]):
            lines.append(f"  {ids[a]} -- {ids[b]} [style=dashed];")
    for s in report.spaces:
        for c in s.consumers:
            if c in ids and c != s.name:
                lines.append(f"  {ids[s.name]} -- {ids[c]};")
    lines.append("}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def add_rewrite_options(p) -> None:
    """Options shared by the commands that rewrite a model (widen, deepen): seed, verification, shapes, report."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime equivalence check")
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--shape", action="append", metavar="NAME=AxBxC",
                   help="size of dynamic input dimensions (default 1 for each)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--report", metavar="FILE.json", help="write the report as JSON")


def add_parsers(sub) -> None:
    w = sub.add_parser("widen", help="widen an ONNX model (Net2WiderNet), verify it in onnxruntime, write it")
    w.add_argument("input", metavar="IN.onnx")
    w.add_argument("--factor", type=float, default=None, help="new width = round(old x factor) (default 1.41)")
    w.add_argument("-o", "--output", metavar="OUT.onnx", help="output path (default IN.wide.onnx)")
    w.add_argument("--widths", metavar="FILE.json", help="explicit widths {producer node name: width}")
    w.add_argument("--width", action="append", metavar="NAME=N", help="explicit width of one producer node")
    w.add_argument("--only", metavar="REGEX", help="widen only producer nodes matching REGEX")
    w.add_argument("--exclude", metavar="REGEX", help="do not widen producer nodes matching REGEX")
    w.add_argument("--divisor", type=int, default=1, help="round new widths up to a multiple of N")
    w.add_argument("--init", choices=["net2net", "random-pad"], default="net2net")
    w.add_argument("--noise", type=float, default=0.0, help="symmetry-breaking noise, x weight std")
    w.add_argument("--noise-mode", choices=["exact", "paper"], default="exact")
    add_rewrite_options(w)
    w.set_defaults(func=run_widen)
    i = sub.add_parser("inspect", help="show the channel spaces of an ONNX model and what couples them")
    i.add_argument("input", metavar="IN.onnx")
    i.add_argument("--json", action="store_true")
    i.add_argument("--dot", metavar="FILE.dot", help="write the spaces and their couplings for graphviz")
    i.add_argument("--shape", action="append", metavar="NAME=AxBxC")
    i.set_defaults(func=run_inspect)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graphgrow")
    add_parsers(p.add_subparsers(dest="command"))
    return p
