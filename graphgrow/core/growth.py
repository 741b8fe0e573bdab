"""The frontend-neutral widening loop: targets from user options, plan, apply, freeze on conflict."""

from __future__ import annotations

import math
import re

import numpy as np

from ..errors import InvalidArgumentError, UnsupportedModelError
from .plan import GrowthConstraints, solve_plan, target_width
from .report import SpaceReport

MAX_ROUNDS = 200


class NotUnderstood(Exception):
    """A relation cannot be applied to this op as it is used here: the op is treated as opaque."""


class Conflict(Exception):
    """A site of the widened graph does not reproduce the original; freeze ``chans``."""

    def __init__(self, node, chans, reason):
        super().__init__(reason)
        self.node = node
        self.chans = chans
        self.reason = reason


def check_factor(factor, widths):
    if factor is None:
        if not widths:
            raise InvalidArgumentError("give a factor > 1 or explicit widths")
        return None
    try:
        f = float(factor)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"factor must be a number > 1, not {factor!r}") from None
    if not math.isfinite(f) or f <= 1.0:
        raise InvalidArgumentError(f"factor must be a finite number > 1, got {factor!r}")
    return f


INITS = ("net2net", "random-pad")
NOISE_MODES = ("exact", "paper")


def check_options(init, noise_mode, divisor, noise) -> None:
    """Validate the growth options common to every frontend."""
    if init not in INITS:
        raise InvalidArgumentError(f"init must be one of {INITS}, not {init!r}")
    if noise_mode not in NOISE_MODES:
        raise InvalidArgumentError(f"noise_mode must be one of {NOISE_MODES}, not {noise_mode!r}")
    if not (isinstance(divisor, int) and divisor >= 1):
        raise InvalidArgumentError(f"divisor must be a positive integer, not {divisor!r}")
    if not (noise >= 0):
        raise InvalidArgumentError(f"noise must be >= 0, not {noise!r}")


def compile_regex(pattern, what):
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidArgumentError(f"{what} is not a valid regular expression: {exc}") from None


def widen_targets(produced: list, constraints: GrowthConstraints, factor, widths, only, exclude, divisor,
                  what: str = "producer module") -> dict:
    """Target width of every producer space; spaces left out by only/exclude are frozen with that reason."""
    names = {sp.name for sp in produced}
    only_re, excl_re = compile_regex(only, "only"), compile_regex(exclude, "exclude")
    if only_re is not None and not any(only_re.search(n) for n in names):
        raise InvalidArgumentError(f"only={only!r} matches no {what} (e.g. {', '.join(sorted(names)[:3])})")
    if excl_re is not None and not any(excl_re.search(n) for n in names):
        raise InvalidArgumentError(f"exclude={exclude!r} matches no {what}")
    widths = dict(widths or {})
    for name, w in list(widths.items()):
        if name not in names:
            raise InvalidArgumentError(f"widths names {name!r}, which is not a {what} of this model")
        sp = next(s for s in produced if s.name == name)
        if isinstance(w, dict):
            widths[name] = w = heads_width(sp, w, constraints)
        if not isinstance(w, (int, np.integer)) or isinstance(w, bool) or w < sp.size:
            raise InvalidArgumentError(f"widths[{name!r}] = {w} is smaller than its current width {sp.size}")
    targets = {}
    per_head = constraints.head_dim_params()  # (they keep head_dim's width: no target)
    for sp in produced:
        if sp.id in per_head and sp.name not in widths:
            continue
        if sp.name in widths:
            targets[sp.id] = int(widths[sp.name])
            continue
        if only_re is not None and not only_re.search(sp.name):
            constraints.freeze_space(sp, f"not selected by only={only!r}")
            continue
        if excl_re is not None and excl_re.search(sp.name):
            constraints.freeze_space(sp, f"excluded by exclude={exclude!r}")
            continue
        if factor is not None:
            targets[sp.id] = target_width(sp.size, factor, divisor)
    return targets


def grow(constraints: GrowthConstraints, targets: dict, seed: int, attempt, upstream, progress=None,
         fill: bool = True):
    """Plan, try, and freeze what conflicts until the widened graph is consistent.

    ``attempt(plan)`` runs the frontend's apply pass and returns its result or
    raises :class:`Conflict`; ``upstream(conflict, frozen)`` returns free
    channels upstream of the conflict when its own channels are all frozen.
    Returns ``(plan, result, rounds)``.
    """
    rounds = 0
    table = constraints.table
    while True:
        rounds += 1
        if rounds > MAX_ROUNDS:
            raise UnsupportedModelError(f"no consistent widening found after {MAX_ROUNDS} rounds")
        plan = solve_plan(constraints, targets, seed=seed, fill=fill)
        try:
            return plan, attempt(plan), rounds
        except Conflict as c:
            frozen = constraints.frozen
            chans = c.chans[~frozen[c.chans]] if len(c.chans) else c.chans
            if len(chans) == 0:
                chans = upstream(c, frozen)
            if len(chans) == 0:
                # last resort: keep everything (the unchanged graph is consistent by construction)
                chans = np.nonzero(~frozen[: table.num_chans])[0]
                if len(chans) == 0:
                    raise UnsupportedModelError(f"the label replay of {c.reason} fails even unchanged") from None
            constraints.freeze(chans, c.reason)
            if progress:
                progress(f"round {rounds}: froze {len(chans)} channels at {c.reason}")


def space_reports(produced: list, plan, targets: dict | None = None) -> list:
    out = []
    for sp in produced:
        new = plan.new_size(sp)
        reasons = list(sp.frozen_reasons)
        target = (targets or {}).get(sp.id, sp.size)
        if new < target and not reasons:
            for other in plan.tied_spaces(sp):
                if other.frozen_reasons:
                    reasons.append(f"tied to {other.name!r}, which stays: {other.frozen_reasons[0]}")
                    break
        if new < target and not reasons and sp.id in plan.notes:
            reasons.append(plan.notes[sp.id])
        if new < target and not reasons:
            for other in plan.tied_spaces(sp):
                if other.id in plan.notes:
                    reasons.append(f"tied to {other.name!r}: {plan.notes[other.id]}")
                    break
        if new == sp.size and not reasons and sp.id in plan.notes:
            reasons.append(plan.notes[sp.id])
        if new == sp.size and not reasons:
            reasons = ["the factor adds no channel at this width" if targets else "not selected for widening"]
        out.append(SpaceReport(sp.name, sp.size, new, list(sp.producers), list(sp.consumers), list(sp.carriers),
                               reasons, normalized=sp.id in plan.normalized, head_dim=plan.units.get(sp.id, 1)))
    return out


def kept_head_notes(produced: list, constraints, plan) -> list:
    """One note per attention projection whose heads kept their number and grew head_dim (ALiBi, reason (c))."""
    return [f"{sp.name}: heads keep their number and grow head_dim ({constraints.inner_heads[sp.id]})"
            for sp in produced if sp.id in constraints.inner_heads and plan.new_size(sp) > sp.size]


def require_reachable(produced: list, plan, targets: dict) -> None:
    """``strict``: every space reaches its target, or one sentence names the first that cannot and the rule."""
    for sp in produced:
        if plan.new_size(sp) < targets.get(sp.id, sp.size) and sp.id in plan.notes:
            raise InvalidArgumentError(f"{sp.name!r} cannot grow from {sp.size} to {targets[sp.id]}: "
                                       f"{plan.notes[sp.id]}")


def heads_width(sp, spec: dict, constraints: GrowthConstraints) -> int:
    """``{"heads": n}`` for an attention projection: the width holding ``n`` heads (head_dim kept)."""
    heads = constraints.heads_of.get(sp.id)
    if set(spec) != {"heads"} or not isinstance(spec["heads"], int) or isinstance(spec["heads"], bool):
        raise InvalidArgumentError(f"widths[{sp.name!r}] must be a width or {{'heads': n}}, not {spec!r}")
    if heads is None:
        raise InvalidArgumentError(f"widths[{sp.name!r}] asks for heads, but {sp.name!r} is not cut into "
                                   "attention heads")
    n = spec["heads"]
    if n < heads:
        raise InvalidArgumentError(f"widths[{sp.name!r}] asks for {n} heads, fewer than its {heads}")
    return sp.size * n // heads


def require_head_widths(produced: list, plan, constraints: GrowthConstraints, widths: dict) -> None:
    """Explicit widths of attention projections must be met exactly: heads are copied whole, and key/value
    heads grow with their query groups (one sentence naming the space and the rule otherwise)."""
    for sp in produced:
        if sp.name not in (widths or {}) or sp.id not in constraints.unit_size:
            continue
        want = widths[sp.name]
        want = heads_width(sp, want, constraints) if isinstance(want, dict) else int(want)
        got = plan.new_size(sp)
        if got != want:
            u = constraints.unit_size[sp.id]
            group = constraints.head_groups.get(sp.id, 1)
            rule = (f"its heads ({u} channels each) are copied whole" if want % u else
                    f"its heads grow in steps of {group} (each key/value head with its query group of {group})"
                    if group > 1 else "tied spaces pin it")
            raise InvalidArgumentError(f"widths[{sp.name!r}] = {want} cannot be met ({got} is the nearest "
                                       f"exact width): {rule}")
