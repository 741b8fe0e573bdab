"""Net2DeeperNet, frontend-neutral: block specifications, identity weights, non-negativity.

A new block goes on the output ``x`` of one node and every user of ``x`` then
reads the block's output.  The block computes ``x`` again:

- ``conv-bn`` / ``conv-bn-relu``: for each kernel of the ``kernel`` spec, a
  convolution with an identity kernel (1 at the centre, stride 1, same
  padding), a batch norm set to the identity in eval mode (γ = sqrt(var + eps),
  β = mean) and, for ``conv-bn-relu``, a ReLU.  ReLU(x) = x only where x ≥ 0,
  so ``conv-bn-relu`` is accepted only where a non-negativity analysis proves
  the input non-negative.
- ``linear``: an identity matrix on the last axis, with a ReLU only where it is
  exact (non-negative input).
- ``residual``: x + body(x) where the body's last batch norm (or last linear
  layer) is zero, exact for any activation.

This module holds the parts both frontends share: spec parsing, the numpy
weights, the non-negativity lattice and the report.  numpy only (no torch).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgumentError

BLOCKS = ("conv-bn-relu", "conv-bn", "linear", "residual")
CONV_BLOCKS = ("conv-bn-relu", "conv-bn")
BN_EPS = 1e-5


# --------------------------------------------------------------------------------------------- block specification

@dataclass(frozen=True)
class BlockSpec:
    """What to insert: the block kind and the kernel of each convolution stage."""

    block: str
    kernels: tuple  # one tuple of odd sizes per stage, e.g. ((1, 3), (3, 1)); () = every spatial axis gets k
    kernel_text: str

    def stage_kernels(self, spatial: int) -> list:
        """Kernel sizes of each conv stage for a tensor with ``spatial`` spatial axes."""
        out = []
        for k in self.kernels:
            if len(k) == 1:
                out.append(tuple(k) * spatial)
            elif len(k) == spatial:
                out.append(tuple(k))
            else:
                raise InvalidArgumentError(
                    f"kernel {'x'.join(map(str, k))} has {len(k)} sizes but the tensor has {spatial} spatial "
                    f"axes")
        return out


def parse_kernel(kernel) -> tuple:
    """``3`` → ((3,),); ``"1x3+3x1"`` → ((1, 3), (3, 1)); every size odd and positive."""
    if isinstance(kernel, bool):
        raise InvalidArgumentError(f"kernel must be an odd integer or a text like '1x3+3x1', not {kernel!r}")
    if isinstance(kernel, (int, np.integer)):
        stages = [(int(kernel),)]
    elif isinstance(kernel, (tuple, list)) and kernel and all(isinstance(k, (int, np.integer)) for k in kernel):
        stages = [tuple(int(k) for k in kernel)]
    elif isinstance(kernel, str) and re.fullmatch(r"\s*\d+(x\d+)*(\s*\+\s*\d+(x\d+)*)*\s*", kernel):
        stages = [tuple(int(v) for v in part.strip().split("x")) for part in kernel.split("+")]
    else:
        raise InvalidArgumentError(f"kernel must be an odd integer or a text like '1x3+3x1', not {kernel!r}")
    for st in stages:
        for k in st:
            if k < 1 or k % 2 == 0:
                raise InvalidArgumentError(
                    f"kernel size {k} is not a positive odd number: an identity convolution with 'same' padding "
                    f"needs a centre tap")
    return tuple(stages)


def block_spec(block: str, kernel) -> BlockSpec:
    if block not in BLOCKS:
        raise InvalidArgumentError(f"block must be one of {', '.join(BLOCKS)}, not {block!r}")
    stages = parse_kernel(kernel)
    return BlockSpec(block, stages, kernel if isinstance(kernel, str) else "x".join(map(str, stages[0])))


def block_form(spec: BlockSpec, ndim: int, where: str) -> str:
    """'conv' or 'linear': how the block acts on a tensor of rank ``ndim``; refuses ranks with no channel axis."""
    if ndim < 2:
        raise InvalidArgumentError(f"{where} has no channel axis (a tensor of rank {ndim}); a block needs a batch "
                                   f"axis and a channel axis")
    if spec.block in CONV_BLOCKS:
        if ndim not in (3, 4, 5):
            raise InvalidArgumentError(f"{where} is a rank-{ndim} tensor: block {spec.block!r} needs N x C x spatial "
                                       f"(rank 3 to 5); use the linear block for features on the last axis")
        return "conv"
    if spec.block == "linear":
        if ndim not in (2, 3):
            raise InvalidArgumentError(f"{where} is a rank-{ndim} tensor: block 'linear' acts on the last axis of "
                                       f"N x F or N x L x F tensors; use a conv block for N x C x H x W")
        return "linear"
    # residual: conv body on images, linear body on features (and on N x L x F token sequences)
    return "conv" if ndim >= 4 else "linear"


# --------------------------------------------------------------------------------------------------- identity weights

def identity_conv_weight(channels: int, kernel: tuple, dtype=np.float32) -> np.ndarray:
    """(C, C, *kernel) with a 1 at the centre of the diagonal taps: conv(x) = x with 'same' padding."""
    w = np.zeros((channels, channels) + tuple(kernel), dtype=dtype)
    centre = tuple(k // 2 for k in kernel)
    idx = np.arange(channels)
    w[(idx, idx) + centre] = 1
    return w


def same_padding(kernel: tuple) -> tuple:
    return tuple(k // 2 for k in kernel)


def identity_bn(mean: np.ndarray, var: np.ndarray, eps: float = BN_EPS) -> dict:
    """Batch-norm parameters that are the identity in eval mode for running statistics (mean, var).

    y = (x - mean) / sqrt(var + eps) * γ + β with γ = sqrt(var + eps), β = mean.  (γ = 1, β = 0 with the
    default statistics mean 0 / var 1 would scale by 1/sqrt(1 + eps).)
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    return {"weight": np.sqrt(var + eps), "bias": mean.copy(), "running_mean": mean.copy(),
            "running_var": var.copy()}


class ChannelStats:
    """Per-channel mean and (biased) variance, merged batch by batch (Chan et al.'s parallel update, float64).

    Biased, because that is what batch norm divides by in training mode: with γ² = var + eps and β = mean the
    block is the identity on batches that have these statistics.  Each batch adds ``(count, mean, m2)`` where m2
    is the sum of squared deviations from the batch mean, so a frontend can reduce on its own device and hand
    over per-channel vectors only.
    """

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, count: int, mean, m2):
        mean, m2 = np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64)
        if count == 0:
            return
        if self.mean is None:
            self.n, self.mean, self.m2 = count, mean, m2
            return
        delta = mean - self.mean
        total = self.n + count
        self.mean = self.mean + delta * count / total
        self.m2 = self.m2 + m2 + delta ** 2 * self.n * count / total
        self.n = total

    def add_array(self, a, channel_axis: int = 1):
        a = np.moveaxis(np.asarray(a, dtype=np.float64), channel_axis, 0)
        a = a.reshape(a.shape[0], -1)
        m = a.mean(axis=1)
        self.add(a.shape[1], m, ((a - m[:, None]) ** 2).sum(axis=1))

    def result(self) -> tuple:
        if self.mean is None:
            raise InvalidArgumentError("calibrate gave no batches")
        return self.mean, self.m2 / self.n


def activation_stats(samples: list, channel_axis: int = 1) -> tuple:
    """(mean, biased variance) per channel of a list of arrays, over every other axis."""
    st = ChannelStats()
    for a in samples:
        st.add_array(a, channel_axis)
    return st.result()


def default_init(rng: np.random.Generator, shape: tuple, dtype=np.float32, fan_in: int | None = None) -> np.ndarray:
    """torch's default Conv/Linear init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    ``fan_in`` defaults to the product of the weight's trailing axes; pass it for biases."""
    if fan_in is None:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


# ------------------------------------------------------------------------------------------------- non-negativity

# op kinds of the lattice; each frontend maps its ops onto these names
NONNEG_SOURCES = frozenset({"relu", "relu6", "sigmoid", "softmax", "hardsigmoid", "softplus", "exp", "abs",
                            "clamp_nonneg", "zeros"})
# non-negative when every tensor operand is
PRESERVES_ALL = frozenset({"identity", "move", "pool", "concat", "add", "mul", "div", "min", "mean", "sum", "pad_zero",
                           "resize", "sqrt"})
# non-negative when any operand is (max(a, b) ≥ a)
PRESERVES_ANY = frozenset({"max"})


@dataclass
class Sign:
    """Result of the non-negativity analysis for one value."""

    nonneg: bool
    reason: str = ""  # for nonneg=False: the first op on the way that cannot be shown to give x ≥ 0

    @staticmethod
    def yes() -> "Sign":
        return Sign(True)

    @staticmethod
    def no(reason: str) -> "Sign":
        return Sign(False, reason)


def combine_sign(kind: str | None, operands: list, what: str) -> Sign:
    """Sign of an op's output from its kind and the signs of its tensor operands (constants included)."""
    if kind in NONNEG_SOURCES:
        return Sign.yes()
    if kind in PRESERVES_ALL:
        for s in operands:
            if not s.nonneg:
                return Sign.no(s.reason)
        return Sign.yes() if operands else Sign.no(f"{what} has no operand known to be non-negative")
    if kind in PRESERVES_ANY:
        if any(s.nonneg for s in operands):
            return Sign.yes()
        return Sign.no(operands[0].reason if operands else f"{what} has no operand")
    return Sign.no(f"{what} may give negative values")


def constant_sign(values, what: str) -> Sign:
    v = np.asarray(values)
    if v.dtype.kind in "biu":
        return Sign.yes() if v.dtype.kind in "bu" or v.size == 0 or v.min() >= 0 else Sign.no(f"{what} is negative")
    if v.dtype.kind == "f":
        return Sign.yes() if v.size == 0 or np.nanmin(v) >= 0 else Sign.no(f"{what} has negative entries")
    return Sign.no(f"{what} is not numeric")


# ------------------------------------------------------------------------------------------------------- report

@dataclass
class Insertion:
    """One inserted block."""

    after: str           # the node whose output the block reads
    name: str            # the new block's name (module path or node-name prefix)
    block: str
    form: str            # conv / linear
    channels: int
    kernels: list
    activation: bool     # a ReLU inside the chain
    nonneg_reason: str   # why the input is (or is not) known non-negative

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DeepenReport:
    insertions: list = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    check: object = None
    train_deviation: float | None = None             # rel. deviation in training mode, without calibration
    train_deviation_calibrated: float | None = None  # the same after calibration
    calibration_batches: int = 0
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        kinds = sorted({i.block for i in self.insertions})
        line = (f"{len(self.insertions)} block(s) inserted ({', '.join(kinds)}); "
                f"params {self.params_before:,} -> {self.params_after:,}")
        if self.check is not None:
            line += f"; {self.check.summary()}"
        if self.train_deviation is not None:
            line += f"; training-mode rel. deviation {self.train_deviation:.3g}"
            if self.train_deviation_calibrated is not None:
                line += f" -> {self.train_deviation_calibrated:.3g} calibrated on {self.calibration_batches} batches"
        return line

    def to_dict(self) -> dict:
        return {
            "insertions": [i.to_dict() for i in self.insertions],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "check": self.check.to_dict() if self.check is not None and hasattr(self.check, "to_dict") else None,
            "train_deviation": self.train_deviation,
            "train_deviation_calibrated": self.train_deviation_calibrated,
            "calibration_batches": self.calibration_batches,
            "notes": list(self.notes),
        }


def select_names(candidates: dict, after, what: str) -> list:
    """Insertion points chosen by ``after``: a regex that must match a whole name, or a list of exact names.

    ``candidates`` maps each name to its insertion points (a module called twice has two).  Returns
    ``(name, point)`` pairs, each point once, under the first name that chose it.
    """
    if isinstance(after, str):
        try:
            rx = re.compile(after)
        except re.error as exc:
            raise InvalidArgumentError(f"after is not a valid regular expression: {exc}") from None
        names = [n for n in candidates if rx.fullmatch(n)]
        if not names:
            near = [n for n in candidates if rx.search(n)][:3]
            hint = f" (it matches part of {', '.join(near)}; the whole name must match)" if near else ""
            raise InvalidArgumentError(f"after={after!r} matches no {what}{hint}")
    elif isinstance(after, (list, tuple)) and after and all(isinstance(a, str) for a in after):
        missing = [a for a in after if a not in candidates]
        if missing:
            raise InvalidArgumentError(f"after names {missing[0]!r}, which is not a {what} of the model")
        names = list(after)
    else:
        raise InvalidArgumentError(f"after must be a regular expression or a list of names, not {after!r}")
    chosen, seen = [], set()
    for n in names:
        for p in candidates[n]:
            if p not in seen:
                seen.add(p)
                chosen.append((n, p))
    return chosen
