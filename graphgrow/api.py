"""Public Python API: :func:`widen`, :func:`deepen` and :func:`analyze` on torch modules."""

from __future__ import annotations

import torch.nn as nn

from .core.report import GrowthReport, record_growth
from .errors import InvalidArgumentError, VerificationError, first_line
from .core.growth import (check_factor, check_options, kept_head_notes, require_head_widths, require_reachable,
                          space_reports, widen_targets)
from .fx.engine import FxAnalysis, count_params, plan_and_apply, rebuild
from .core.sites import GrowOptions
from .core.plan import WidenPlan
from .hf.capture import is_pretrained
from .verify import verify_growth

VERIFY = ("torch", "onnxruntime", "none")


def analyze(model: nn.Module, example_inputs) -> GrowthReport:
    """Channel spaces of ``model`` and, for each that cannot grow, the op and why."""
    an = FxAnalysis(model, example_inputs)
    report = GrowthReport(space_reports(an.produced, WidenPlan.identity(an.table, an.constraints)), params_before=count_params(model),
                          params_after=count_params(model), opaque_leaves=list(an.leaves))
    for s in report.spaces:
        if s.frozen_reasons == ["not selected for widening"]:
            s.frozen_reasons = []
    return report


def widen(model: nn.Module, factor: float | None = 1.41, *, example_inputs, widths=None, only=None, exclude=None,
          divisor: int = 1, init: str = "net2net", noise: float = 0.0, noise_mode: str = "exact", seed: int = 0,
          verify: str = "torch", atol: float | None = None, rtol: float | None = None, fill: bool = True,
          strict: bool = False, progress=None) -> nn.Module:
    """Net2WiderNet: a wider copy of ``model`` computing the same function.

    The result has the original's submodule names and state_dict keys, with
    layers resized; the original is never modified.  The report is attached as
    ``result.graphgrow_report``.  ``verify="torch"`` (default) checks the result
    eagerly, ``"onnxruntime"`` exports both and compares in onnxruntime; a
    failed check raises :class:`VerificationError`.

    Normalized residual streams (LayerNorm, RMSNorm) grow by uniform replication at integer factors and by
    fill + rescale otherwise (``fill=False``: they stay); ``strict=True`` raises instead of leaving a space
    narrower than asked because a norm allows only integer factors there.
    """
    if verify not in VERIFY:
        raise InvalidArgumentError(f"verify must be one of {VERIFY}, not {verify!r}")
    if is_pretrained(model):  # a transformers model: captured by torch.export, rebuilt from its new config
        from .hf.widen import widen_pretrained

        return widen_pretrained(model, factor, example_inputs=example_inputs, widths=widths, only=only,
                                exclude=exclude, divisor=divisor, init=init, noise=noise, noise_mode=noise_mode,
                                seed=seed, verify=verify, atol=atol, rtol=rtol, fill=fill, strict=strict,
                                progress=progress)
    factor = check_factor(factor, widths)
    check_options(init, noise_mode, divisor, noise)
    fill = bool(fill) and init == "net2net"
    an = FxAnalysis(model, example_inputs)
    targets = widen_targets(an.produced, an.constraints, factor, widths, only, exclude, divisor)
    options = GrowOptions(noise=noise, noise_mode=noise_mode, init=init, seed=seed)
    plan, run, rounds = plan_and_apply(an, targets, options, seed, progress, fill=fill)
    if strict:
        require_reachable(an.produced, plan, targets)
    require_head_widths(an.produced, plan, an.constraints, widths)
    result = rebuild(an, run)
    preserving = init == "net2net" and not (noise > 0 and noise_mode == "paper")
    report = GrowthReport(space_reports(an.produced, plan, targets), params_before=count_params(model),
                          params_after=count_params(result), function_preserving=preserving,
                          opaque_leaves=list(an.leaves), rounds=rounds)
    report.notes.extend(kept_head_notes(an.produced, an.constraints, plan))
    if preserving and verify != "none":
        def widen64():  # the same widening computed in float64 (same plan, same draws): the exact reference
            return widen(_double_copy(model), factor, example_inputs=_double_inputs(an.inputs), widths=widths,
                         only=only, exclude=exclude, divisor=divisor, init=init, noise=noise, noise_mode=noise_mode,
                         seed=seed, verify="none", fill=fill)

        try:
            verify_growth(model, result, an.inputs, report, "widened", verify, atol, rtol, seed, widen64)
        except VerificationError as exc:
            if not plan.fills:
                raise
            # fill + rescale assumed what the stream's new channels hold; where the numbers disagree (an op
            # the label analysis cannot see into), the normalized streams stay instead
            result = widen(model, factor, example_inputs=example_inputs, widths=widths, only=only,
                           exclude=exclude, divisor=divisor, init=init, noise=noise, noise_mode=noise_mode,
                           seed=seed, verify=verify, atol=atol, rtol=rtol, fill=False, strict=strict,
                           progress=progress)
            result.graphgrow_report.notes.append(f"fill + rescale did not verify ({first_line(exc)}); "
                                                 "normalized streams kept their width")
            return result
    result.graphgrow_report = report
    return record_growth(result, widen, factor=factor, example_inputs=example_inputs, widths=widths, only=only,
                         exclude=exclude, divisor=divisor, init=init, noise=noise, noise_mode=noise_mode, seed=seed,
                         fill=fill, strict=strict)


def _double_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def _double_inputs(inputs: tuple) -> tuple:
    import torch

    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in inputs)


def deepen(model: nn.Module, *, after, block: str = "conv-bn-relu", kernel=3, calibrate=None, example_inputs,
           seed: int = 0, verify: str = "torch", atol: float | None = None, rtol: float | None = None,
           times: int = 2) -> nn.Module:
    """Net2DeeperNet: a deeper copy of ``model`` computing the same function (in eval mode).

    ``after`` picks where blocks go: a regular expression that must match a whole node name, module path
    (e.g. ``"layer1.0"``, ``"blocks[.][0-9]+"``) or a list of such names; each block reads that output and every
    former user reads the block.  ``block`` is ``"conv-bn-relu"`` (only where the input is provably
    non-negative), ``"conv-bn"``, ``"linear"`` (a ReLU only where exact) or ``"residual"`` (x + body(x) with a
    zero last layer).  ``kernel`` is an odd size or a factorized chain such as ``"1x3+3x1"`` (one identity
    conv-BN(-ReLU) per stage).  ``calibrate``, an iterable of input batches, sets the new batch norms' statistics
    from data so the blocks are close to the identity in training mode too; the training-mode deviation before
    and after calibration is reported.  The result is a ``torch.fx.GraphModule`` (state_dict keys of the
    original parameters kept) with the report as ``result.graphgrow_report``; it is verified like
    :func:`widen` (``verify="torch"``, ``"onnxruntime"`` or ``"none"``).

    On a transformers model ``block="stack"`` is G_stack: the whole layer stack repeated ``times`` times
    (``after=None``, or a pattern matching every layer of the stacks to repeat); NOT function-preserving, the
    measured deviation in ``result.graphgrow_report.deviation``.
    """
    from .fx.deepen import calibrate_blocks, deepen_module, train_mode_deviation

    if verify not in VERIFY:
        raise InvalidArgumentError(f"verify must be one of {VERIFY}, not {verify!r}")
    if is_pretrained(model):  # block expansion, stated by the config's num_hidden_layers
        from .hf.deepen import deepen_pretrained

        result = deepen_pretrained(model, after=after, block=block if block != "conv-bn-relu" else "copy",
                                   example_inputs=example_inputs, seed=seed, verify=verify, atol=atol, rtol=rtol,
                                   times=times)
        return record_growth(result, deepen, after=after, block=block, example_inputs=example_inputs, seed=seed,
                             times=times)
    if block == "copy":  # block expansion on a plain model: a copy of each chosen residual block, adding 0
        from .fx.block_copy import copy_blocks

        if calibrate is not None:
            raise InvalidArgumentError("block='copy' needs no calibration: the copy holds the block's own weights")
        result, report, inputs = copy_blocks(model, after=after, example_inputs=example_inputs)
        paths, batches = [], None
    else:
        result, report, paths, batches, inputs = deepen_module(model, after=after, block=block, kernel=kernel,
                                                                calibrate=calibrate, example_inputs=example_inputs,
                                                                seed=seed)
    if batches is not None:
        report.calibration_batches = len(batches)
        report.train_deviation = train_mode_deviation(model, result, batches, seed)
        calibrate_blocks(result, paths, batches, seed)
        report.train_deviation_calibrated = train_mode_deviation(model, result, batches, seed)
    if verify != "none":
        def deepen64():  # the same blocks computed in float64 (no calibration: its statistics are float32 data)
            if batches is not None:
                raise InvalidArgumentError("calibrated blocks are not re-derived in float64")
            return deepen(_double_copy(model), after=after, block=block, kernel=kernel,
                          example_inputs=_double_inputs(inputs), seed=seed, verify="none")

        verify_growth(model, result, inputs, report, "deepened", verify, atol, rtol, seed, deepen64)
    result.graphgrow_report = report
    return record_growth(result, deepen, after=after, block=block, kernel=kernel, calibrate=calibrate,
                         example_inputs=example_inputs, seed=seed)
