"""Optimizer state that follows a growth: :func:`grow_optimizer` (a live ``torch.optim`` optimizer) and
:func:`grow_optimizer_state` (a saved state_dict, e.g. a Trainer checkpoint's ``optimizer.pt``).

Every growth function (:func:`graphgrow.widen`, :func:`graphgrow.deepen`, :func:`graphgrow.upcycle`,
:func:`graphgrow.grow_experts`) records the call that made its result (``result.graphgrow_growth``).
:func:`growth_map` replays it on four float64 probe copies of the teacher and reads, for every grown parameter
entry, the teacher entry it copies and its coefficient (:mod:`graphgrow.core.state_map`, docs/maths.md §10);
one backward pass of both models on the growth's example inputs finds the copies the function does not use
at the growth point (a block copy behind its zeroed projection) and the parameters whose gradient does not
follow the dual map (copies serving different consumers: multi-query key/value heads).  The state tensors then
follow:

* ``"reset"``: no state (a fresh optimizer, step 0), what training from the grown model did before;
* ``"copy"``: the weights' map (``state' = coef * state[source]``);
* ``"dual"``: the gradient's map at the growth point (first moments ``coef / G``, second moments its square;
  unused copies and parameters the dual map misses start fresh, named in ``optimizer.graphgrow_fresh``), so
  Adam's moments describe the grown model's gradients as they described the teacher's.

Scalars (``step``) are kept; entries with no single teacher entry (filled channels, zeroed projections,
identity blocks, random pads) start at zero, and a parameter with none at all gets no state.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .core import state_map
from .errors import GraphGrowError, InvalidArgumentError

MODES = ("reset", "copy", "dual")
# state tensors shaped like their parameter, by how they follow the gradient (torch.optim's and transformers'
# Adafactor names); anything else shaped like a parameter is refused under "dual"
ORDER = {"exp_avg": 1, "momentum_buffer": 1, "grad_avg": 1, "exp_inf": "abs",
         "exp_avg_sq": 2, "max_exp_avg_sq": 2, "square_avg": 2, "sum": 2}
FACTORED = ("exp_avg_sq_row", "exp_avg_sq_col")  # Adafactor: the row and column means of a second moment


class OptimizerStateError(GraphGrowError):
    """Optimizer state that cannot follow a growth (a mismatched shape, an unknown kind of state)."""


@dataclass
class GrowthMap:
    """For every parameter of the grown model, which teacher entries its entries copy (see module doc)."""

    teacher_shapes: dict  # teacher parameter name -> shape, in named_parameters order
    maps: dict  # student parameter name -> core.state_map.EntryMap
    unused: set = field(default_factory=set)  # student parameters with a source but zero gradient at the growth
    # student parameters whose measured gradient does not follow the dual map (copies with different consumers:
    # key/value heads split across query groups) -> why; under "dual" they start fresh like the unused ones
    not_dual: dict = field(default_factory=dict)
    offsets: dict = field(default_factory=dict)

    def __post_init__(self):
        at = 0
        for name, shape in self.teacher_shapes.items():
            self.offsets[name] = at
            at += int(np.prod(shape, dtype=np.int64))
        self.size = at
        bounds = np.array(list(self.offsets.values()) + [at])
        self._names = list(self.teacher_shapes)
        self._bounds = bounds
        self.gram = None  # (set by growth_map once the unused copies are known: update_gram)

    def update_gram(self) -> None:
        """The dual map's denominators G over the copies it counts (neither unused nor missing the dual map)."""
        self.gram = state_map.gram({k: m for k, m in self.maps.items() if k not in self.unused
                                    and k not in self.not_dual}, self.size)

    def teacher_of(self, entries: np.ndarray) -> np.ndarray:
        """The teacher parameter index (into ``teacher_shapes``) of global entries."""
        return np.searchsorted(self._bounds, entries, side="right") - 1

    def main_source(self, name: str) -> str | None:
        """The teacher parameter most entries of student parameter ``name`` copy (None: none)."""
        src = self.maps[name].sources()
        if not src.size:
            return None
        return self._names[int(np.bincount(self.teacher_of(src)).argmax())]

    def dual_gradient(self, teacher_grads: dict) -> dict:
        """What the dual map predicts for the grown model's gradient (mapped entries; NaN elsewhere): the
        property that defines it, for tests."""
        flat = self.flatten(teacher_grads)
        out = {}
        for name, m in self.maps.items():
            pred = np.full(m.coef.shape, np.nan)
            if name not in self.unused and name not in self.not_dual:
                pred[m.mapped] = state_map.factors(m, "dual", self.gram) * flat[m.sources()]
            out[name] = pred.reshape(m.shape)
        return out

    def flatten(self, per_param: dict) -> np.ndarray:
        """Teacher-shaped tensors (name -> tensor/array; missing: zeros) as one float64 vector."""
        flat = np.zeros(self.size, np.float64)
        for name, value in per_param.items():
            if value is None:
                continue
            a = value.detach().double().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            flat[self.offsets[name]:self.offsets[name] + a.size] = a.reshape(-1)
        return flat


def _probe_kwargs(kwargs: dict) -> dict:
    kw = dict(kwargs)
    kw["verify"] = "none"
    for key, off in (("noise", 0.0), ("calibrate", None), ("progress", None)):
        if key in kw:
            kw[key] = off
    kw["example_inputs"] = _double(kw.get("example_inputs"))
    return kw


def _double(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_double(a) for a in x)
    if isinstance(x, dict):
        return {k: _double(v) for k, v in x.items()}
    return x


def growth_map(teacher: nn.Module, student: nn.Module) -> GrowthMap:
    """The :class:`GrowthMap` of ``student``, grown from ``teacher`` by a graphgrow growth function."""
    growth = getattr(student, "graphgrow_growth", None)
    if growth is None:
        raise InvalidArgumentError("the grown model carries no record of its growth: pass the model that "
                                   "graphgrow.widen / deepen / upcycle / grow_experts returned")
    params = dict(teacher.named_parameters())
    shapes = {k: tuple(p.shape) for k, p in params.items()}
    sizes = [p.numel() for p in params.values()]
    n = int(sum(sizes))
    index, permuted, perm = state_map.probe_values(n)
    probes = {"zero": np.zeros(n), "ones": np.ones(n), "index": index, "permuted": permuted}
    values = {}
    for kind in state_map.PROBES:
        model = copy.deepcopy(teacher).double()
        with torch.no_grad():
            at = 0
            for (name, p), size in zip(model.named_parameters(), sizes):
                p.copy_(torch.from_numpy(probes[kind][at:at + size]).view(p.shape))
                at += size
        grown = growth.func(model, **_probe_kwargs(growth.keywords))
        values[kind] = {k: p.detach().cpu().numpy() for k, p in grown.named_parameters()}
        del model, grown
    actual = dict(student.named_parameters())
    shapes_back = {k: v.shape for k, v in values["zero"].items()}
    if shapes_back != {k: tuple(p.shape) for k, p in actual.items()}:
        raise OptimizerStateError("replaying the recorded growth on the teacher does not give the grown model's "
                                  "parameters (names or shapes differ): is `teacher` the model it was grown from?")
    maps = {k: state_map.read_probes(values["zero"][k], values["ones"][k], values["index"][k],
                                     values["permuted"][k], perm) for k in actual}
    gmap = GrowthMap(shapes, maps)
    _require_reproduces(gmap, params, actual, values["zero"], growth.keywords)
    inputs = growth.keywords.get("example_inputs")
    inputs = inputs if inputs is not None else _example_ids(teacher)
    if inputs is None:  # (no input to measure gradients on: every copy counted, the dual map unchecked)
        gmap.update_gram()
        return gmap
    g_teacher, g_student = _grads(teacher, inputs), _grads(student, inputs)
    gmap.unused = _unused_copies(gmap, g_teacher, g_student)
    gmap.update_gram()
    gmap.not_dual = _not_dual(gmap, g_teacher, g_student)  # (measured with the unused copies left out)
    if gmap.not_dual:
        gmap.update_gram()
    return gmap


TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _require_reproduces(gmap: GrowthMap, teacher_params: dict, student_params: dict, constant: dict,
                        kwargs: dict) -> None:
    """The map read off the probes, applied to the teacher's real weights, gives the student's (where the
    growth draws nothing: no noise, no random pad); otherwise the teacher is not the student's."""
    if kwargs.get("noise") or kwargs.get("init", "net2net") != "net2net" or kwargs.get("router") == "random":
        return
    flat = gmap.flatten(teacher_params)
    for name, m in gmap.maps.items():
        p = student_params[name]
        got = p.detach().double().cpu().numpy().reshape(-1)[m.mapped]
        want = m.coef[m.mapped] * flat[m.sources()] + constant[name].reshape(-1)[m.mapped]
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
        if got.size and np.abs(got - want).max() > TOL.get(p.dtype, 1e-5) * scale:
            raise OptimizerStateError(f"replaying the recorded growth on the teacher does not reproduce the grown "
                                      f"model's {name!r}: is `teacher` the model it was grown from?")


def _outputs(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        out = model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        out = model(*inputs)
    else:
        out = model(inputs)
    if hasattr(out, "logits"):
        return [out.logits]
    leaves = torch.utils._pytree.tree_flatten(out)[0]
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def _grads(model: nn.Module, inputs, seed: int = 0) -> dict:
    """Gradients of a fixed random projection of the outputs, in eval mode, on a copy (the user's models and
    their .grad untouched); frozen parameters (requires_grad False: ERNIE's score correction) have none."""
    work = copy.deepcopy(model).eval()
    params = {k: p for k, p in work.named_parameters() if p.requires_grad}
    outs = _outputs(work, inputs)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: g for k, g in zip(params, grads)}


def _example_ids(model: nn.Module):
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        return None
    return torch.randint(0, int(vocab), (2, 12), generator=torch.Generator().manual_seed(0))


def _unused_copies(gmap: GrowthMap, g_teacher: dict, g_student: dict) -> set:
    """Student parameters that copy teacher entries whose gradient is nonzero but have none themselves at the
    growth point (a copied block behind its zeroed output projection; an expert no token reaches): the dual map
    gives them fresh state and counts only the used copies."""
    flat = gmap.flatten(g_teacher)
    unused = set()
    for name, m in gmap.maps.items():
        g = g_student.get(name)
        if m.mapped.any() and (g is None or not bool(g.any())) and np.abs(flat[m.sources()]).max() > 0:
            unused.add(name)
    return unused


DUAL_TOL = 1e-4  # relative: float32 gradients differ by rounding (1e-6); a map that does not hold, by 0.1 to 1


def _not_dual(gmap: GrowthMap, g_teacher: dict, g_student: dict) -> dict:
    """The student parameters whose gradient at the growth point is not what the dual map predicts from the
    teacher's (measured on one batch) -> the measured relative error.  The dual map assumes that the copies of
    a unit share its consumers (each receives 1/k of its gradient); copies that serve different consumers, as
    key/value heads whose query groups are split between the copies, do not, and get fresh state."""
    predicted = gmap.dual_gradient(g_teacher)
    scale = max((float(g.abs().max()) for g in g_student.values() if g is not None), default=0.0)
    out = {}
    for name, pred in predicted.items():
        g = g_student.get(name)
        ok = ~np.isnan(pred)
        if g is None or not ok.any():
            continue
        got = g.detach().double().cpu().numpy()
        floor = max(float(np.abs(got).max()), 1e-6 * scale)  # (a gradient that is zero but for rounding: not judged)
        err = float(np.abs(got[ok] - pred[ok]).max()) / max(floor, 1e-300)
        if err > DUAL_TOL:
            out[name] = err
    return out


def grow_optimizer_state(state_dict: dict, teacher_groups: list, student_groups: list, gmap: GrowthMap | None,
                         mode: str = "dual") -> dict:
    """A torch optimizer ``state_dict`` of the teacher rewritten for the grown model.

    ``teacher_groups`` / ``student_groups``: each param group's parameter names in index order (the order the
    optimizer was given them; the student's as the optimizer that loads the result will be built).  Group
    hyperparameters are kept group by group. ``gmap`` may be None under ``"reset"`` (no state to map:
    replaying the growth is not needed)."""
    if mode not in MODES:
        raise InvalidArgumentError(f"optimizer state mode must be one of {MODES}, not {mode!r}")
    groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
        raise OptimizerStateError("the optimizer state is not a torch optimizer state_dict (no 'state' and "
                                  "'param_groups')")
    if len(groups) != len(teacher_groups) or len(student_groups) != len(teacher_groups):
        raise OptimizerStateError(f"the optimizer has {len(groups)} parameter groups, the model's grouping gives "
                                  f"{len(teacher_groups)} (teacher) and {len(student_groups)} (grown)")
    names = {}
    for i, (group, tnames) in enumerate(zip(groups, teacher_groups)):
        if len(group["params"]) != len(tnames):
            raise OptimizerStateError(f"parameter group {i} of the optimizer holds {len(group['params'])} "
                                      f"parameters, the model's grouping gives {len(tnames)}")
        names.update(zip(group["params"], tnames))
    state = {names[i]: s for i, s in state_dict["state"].items() if i in names}
    if gmap is None and mode != "reset":
        raise InvalidArgumentError(f"mode {mode!r} needs the growth map (graphgrow.optim.growth_map)")
    if gmap is not None:
        _require_shapes(state, gmap)
    new_groups, at = [], 0
    for group, snames in zip(groups, student_groups):
        new_groups.append({**group, "params": list(range(at, at + len(snames)))})
        at += len(snames)
    if mode == "reset":
        return {"state": {}, "param_groups": new_groups}
    keys = {k for s in state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0}
    if mode == "dual":
        unknown = sorted(k for k in keys if k not in ORDER and k not in FACTORED)
        if unknown:
            raise OptimizerStateError(f"optimizer state {unknown[0]!r} has no known dual map (known: "
                                      f"{', '.join(sorted(ORDER) + list(FACTORED))}); use mode 'copy' or 'reset'")
    flats = {k: gmap.flatten({n: s.get(k) for n, s in state.items()}) for k in keys if k not in FACTORED}
    if any(k in keys for k in FACTORED):
        flats["_factored"] = gmap.flatten({n: _unfactored(s) for n, s in state.items()})
    new_state = {}
    student_names = [n for g in student_groups for n in g]
    for index, name in enumerate(student_names):
        grown = _grown_state(name, state, flats, gmap, mode)
        if grown:
            new_state[index] = grown
    return {"state": new_state, "param_groups": new_groups}


def _require_shapes(state: dict, gmap: GrowthMap) -> None:
    for name, s in state.items():
        shape = gmap.teacher_shapes.get(name)
        if shape is None:
            raise OptimizerStateError(f"the optimizer holds state for {name!r}, which the model does not have")
        for key, value in s.items():
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            want = {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}.get(key, shape)
            if tuple(value.shape) != tuple(want):
                raise OptimizerStateError(f"optimizer state {key!r} of {name!r} has shape {list(value.shape)}, the "
                                          f"parameter {list(shape)}")


def _unfactored(s: dict):
    """Adafactor's second moment as the rank-one estimate it uses (row x col / mean of row)."""
    if "exp_avg_sq_row" not in s:
        return s.get("exp_avg_sq")
    row, col = s["exp_avg_sq_row"].double(), s["exp_avg_sq_col"].double()
    return row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(-1, keepdim=True).unsqueeze(-1).clamp_min(1e-30)


def _grown_state(name: str, state: dict, flats: dict, gmap: GrowthMap, mode: str) -> dict:
    m = gmap.maps[name]
    source = gmap.main_source(name)
    if source is None or source not in state or (mode == "dual" and (name in gmap.unused or name in gmap.not_dual)):
        return {}  # no teacher entry behind it (an unused copy, a gradient the dual map misses): started fresh
    out = {}
    for key, value in state[source].items():
        if not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value.clone() if torch.is_tensor(value) else value  # step and other scalars kept
        elif key in FACTORED:
            if key == "exp_avg_sq_row":
                full = state_map.state_of(m, flats["_factored"], mode, 2, gmap.gram)
                out["exp_avg_sq_row"] = _tensor(full.mean(-1), value)
                out["exp_avg_sq_col"] = _tensor(full.mean(-2), state[source]["exp_avg_sq_col"])
        else:
            out[key] = _tensor(state_map.state_of(m, flats[key], mode, ORDER.get(key, 1), gmap.gram), value)
    return out


def _tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=like.dtype, device=like.device)


def grow_optimizer(optimizer: torch.optim.Optimizer, teacher: nn.Module, student: nn.Module,
                   mode: str = "dual") -> torch.optim.Optimizer:
    """A new optimizer of ``optimizer``'s class over ``student``'s parameters, its state grown with them.

    Each grown parameter joins the group of the teacher parameter most of its entries copy (so weight-decay
    groups are kept by name); one that copies none joins the group of the teacher parameter of the same name,
    else of the longest common module path.  Learning-rate schedulers hold their optimizer: rebuild them on the
    new one (``scheduler.load_state_dict`` of the old one's state keeps their position)."""
    if mode not in MODES:
        raise InvalidArgumentError(f"optimizer state mode must be one of {MODES}, not {mode!r}")
    by_id = {id(p): n for n, p in teacher.named_parameters()}
    teacher_groups = []
    for i, group in enumerate(optimizer.param_groups):
        missing = [p for p in group["params"] if id(p) not in by_id]
        if missing:
            raise InvalidArgumentError(f"parameter group {i} of the optimizer holds a tensor of shape "
                                       f"{list(missing[0].shape)} that is not a parameter of the teacher")
        teacher_groups.append([by_id[id(p)] for p in group["params"]])
    gmap = growth_map(teacher, student) if mode != "reset" else None
    student_params = dict(student.named_parameters())
    group_of = {n: i for i, names in enumerate(teacher_groups) for n in names}
    student_groups = [[] for _ in teacher_groups]
    for name, p in student_params.items():
        g = _group_of(name, gmap, group_of) if p.requires_grad else None
        if g is not None:
            student_groups[g].append(name)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    import inspect

    takes = inspect.signature(type(optimizer).__init__).parameters  # (AdamW's defaults hold more than it takes)
    defaults = {k: v for k, v in optimizer.defaults.items() if k in takes}
    grown = type(optimizer)([{**h, "params": [student_params[n] for n in names]}
                             for h, names in zip(hyper, student_groups)], **defaults)
    if gmap is not None:
        grown.load_state_dict(grow_optimizer_state(optimizer.state_dict(), teacher_groups, student_groups, gmap,
                                                   mode))
    # which parameters started fresh under "dual", and why (the map the gradient obeys could not be used)
    grown.graphgrow_fresh = ({**{n: "a copy with no gradient at the growth point" for n in sorted(gmap.unused)},
                              **{n: f"its gradient does not follow the dual map (measured rel error {e:.2g})"
                                 for n, e in sorted(gmap.not_dual.items())}}
                             if gmap is not None and mode == "dual" else {})
    return grown


def _group_of(name: str, gmap: GrowthMap | None, group_of: dict):
    source = gmap.main_source(name) if gmap is not None else None
    if source is not None:
        return group_of.get(source)  # (None: copies a parameter the optimizer does not train)
    if name in group_of:
        return group_of[name]
    if not group_of:
        return None
    parts = name.split(".")

    def common(other: str) -> int:
        n = 0
        for a, b in zip(parts, other.split(".")):
            if a != b:
                break
            n += 1
        return n

    best = max(group_of, key=common)
    return group_of[best]
