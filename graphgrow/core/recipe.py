"""Lazy weights: a parameter's new value as the core arithmetic steps to apply to its stored value.

Growing a checkpoint larger than memory plans on a weightless model (meta device): its parameters enter
the apply run as :class:`Recipe` s, and every arithmetic function of :mod:`~graphgrow.core.arithmetic` given
one records itself (the function, its index maps and factors) instead of computing.  The run's "new
weights" are then recipes, which the checkpoint writer applies tensor by tensor while streaming
(:meth:`Recipe.apply`): the same functions on the same arguments, so the streamed weights are the
in-memory ones.  Only what depends on nothing but the index maps can be recorded; a step that needs
random draws (noise, random pad) is refused by the caller.
"""

from __future__ import annotations

import functools

import numpy as np


class Recipe:
    """The value of parameter ``source`` (stored ``shape``) after ``steps``."""

    __array_priority__ = 100  # numpy defers ``scalar * recipe`` to us

    def __init__(self, source: str, shape, steps: tuple = (), out_shape=None):
        self.source = source
        self.source_shape = tuple(int(d) for d in shape)
        self.steps = steps
        self.shape = tuple(out_shape) if out_shape is not None else self.source_shape
        self.dtype = np.dtype(np.float32)  # the apply run computes in float32, as it reads real weights

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def then(self, fn, args: tuple, kwargs: dict, shape) -> "Recipe":
        return Recipe(self.source, self.source_shape, self.steps + ((fn, args, kwargs),), shape)

    def apply(self, arr: np.ndarray) -> np.ndarray:
        if tuple(arr.shape) != self.source_shape:
            raise ValueError(f"{self.source}: stored shape {tuple(arr.shape)}, planned from {self.source_shape}")
        for fn, args, kwargs in self.steps:
            arr = fn(arr, *args, **kwargs)
        return arr

    # scaling by a number (a tied head's 1/k folded into a norm, a norm gain's root of d'/d)
    def __mul__(self, k):
        return self.then(np.multiply, (np.asarray(k),), {}, self.shape)

    __rmul__ = __mul__

    def __truediv__(self, k):
        return self.then(np.divide, (np.asarray(k),), {}, self.shape)

    def __add__(self, k):  # an offset gain (1 + w) rescaled: (w + 1) s - 1
        return self.then(np.add, (np.asarray(k),), {}, self.shape)

    __radd__ = __add__

    def __sub__(self, k):
        return self.then(np.subtract, (np.asarray(k),), {}, self.shape)

    def reshape(self, *shape):
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        return self.then(np.reshape, (tuple(shape),), {}, _reshaped(self.shape, shape))

    def astype(self, dtype):
        return self  # the stored dtype is restored by the writer

    def __repr__(self):
        return f"Recipe({self.source!r}, {self.source_shape} -> {self.shape}, {len(self.steps)} steps)"


def _reshaped(old, new) -> tuple:
    new = list(new)
    if -1 in new:
        known = int(np.prod([d for d in new if d != -1]))
        new[new.index(-1)] = int(np.prod(old)) // max(known, 1)
    return tuple(new)


def recorded(shape_of, check=None):
    """Decorator: ``fn(arr, *args)`` given a :class:`Recipe` returns a longer recipe whose shape is
    ``shape_of(arr.shape, *args, **kwargs)`` (after ``check(*args, **kwargs)``, which raises what ``fn`` would
    raise on its arguments); given an array it computes as before."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(arr, *args, **kwargs):
            if isinstance(arr, Recipe):
                if check is not None:
                    check(*args, **kwargs)
                # (``run``, not ``fn``: pickle finds functions by name, and the module's name is ``run``; recipes
                # travel to the checkpoint writer's worker processes)
                return arr.then(run, args, kwargs, shape_of(arr.shape, *args, **kwargs))
            return fn(arr, *args, **kwargs)
        return run
    return wrap


def along(axis_pos: int, size_of):
    """Shape rule: the axis given as argument ``axis_pos`` (after the array) gets ``size_of(args, kwargs)``."""
    def rule(shape, *args, **kwargs):
        out = list(shape)
        out[args[axis_pos] % len(shape)] = int(size_of(args, kwargs))
        return tuple(out)
    return rule


def same_values(a, b) -> bool:
    """``np.array_equal`` where either may be a recipe: recipes of one source are compared on a random
    stand-in of its stored shape (memory: a few copies of that one tensor)."""
    if not isinstance(a, Recipe) and not isinstance(b, Recipe):
        return a is not None and b is not None and np.array_equal(a, b)
    if not (isinstance(a, Recipe) and isinstance(b, Recipe)) or a.source != b.source or a.shape != b.shape:
        return False
    probe = np.random.default_rng(0).standard_normal(a.source_shape).astype(np.float32)
    return np.array_equal(a.apply(probe), b.apply(probe))
