"""Shapes of every node of a traced graph on the example inputs: torch.fx's ShapeProp, on the meta device.

Widening and deepening need the shape (and dtype) of every tensor of the original run, and the Python
values computed from them (``x.size(1)``, ``x.shape``).  :func:`record_shapes` runs torch.fx's
:class:`~torch.fx.passes.shape_prop.ShapeProp` with the parameters, buffers and inputs swapped for
meta tensors (no arithmetic, no memory), so recording costs a graph walk, not a forward pass; a graph
that cannot run on meta tensors (data-dependent Python, ops without meta kernels, tensors held as plain
attributes) runs once for real instead.  Either way ``node.meta["tensor_meta"]`` is set, as ShapeProp
does, and the returned dict holds what the label run reads.
"""

from __future__ import annotations

import contextlib
import re
import io

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_map

from ..core.memory import available_memory
from ..errors import InputMismatchError, UnsupportedModelError, first_line


class TensorMeta:
    """Shape and dtype of a tensor of the original run (a pytree leaf, unlike a namedtuple)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape = tuple(shape)
        self.dtype = dtype


def _tensor_meta(v):
    return TensorMeta(tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v


class _Recorder(ShapeProp):
    def __init__(self, gm, off_meta: bool = False):
        super().__init__(gm)
        self.values: dict = {}
        self.off_meta = off_meta  # a graph captured on the meta device, run for real: its literal devices too

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n] = tree_map(_tensor_meta, out)
        return out

    def call_function(self, target, args, kwargs):
        return super().call_function(target, *self._cpu(args, kwargs))

    def call_method(self, target, args, kwargs):
        return super().call_method(target, *self._cpu(args, kwargs))

    def _cpu(self, args, kwargs):
        if not self.off_meta:
            return args, kwargs
        return tree_map(_cpu_device, args), tree_map(_cpu_device, kwargs)


def _cpu_device(v):
    if isinstance(v, torch.device) and v.type == "meta":
        return torch.device("cpu")
    # (a weightless example input is zeros: meta_inputs builds it so)
    return torch.zeros_like(v, device="cpu") if isinstance(v, torch.Tensor) and v.is_meta else v


def _stored_state(gm: fx.GraphModule) -> dict | None:
    """Real values for the meta-device parameters and buffers of ``gm``, from each tensor's ``graphgrow_load``
    (a weightless checkpoint model, :func:`graphgrow.hf.stream.meta_model`); {} when none is on the meta device,
    None when one has no way to its value."""
    state = {}
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    need = sum(v.numel() * v.element_size() for _, v in tensors if v.is_meta)
    have = available_memory()
    if have and need > have // 2:
        raise UnsupportedModelError(f"this model's graph needs data to be shaped (a size read from values, such as "
                                    f"JetMoE's .tolist() of its routing), and its {need / 2 ** 30:.1f} GiB of weights "
                                    f"do not fit in half of the {have / 2 ** 30:.1f} GiB available")
    for k, v in tensors:
        if v.is_meta:
            load = getattr(v, "graphgrow_load", None)
            if load is None:
                return None
            state[k] = load().to(v.dtype)
    return state


class TrainingFlags:
    """Put a model in eval mode for the duration of a block and restore every flag."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.eval()

    def __exit__(self, *exc):
        for m, f in self.flags.items():
            m.training = f


def _on_meta(gm: fx.GraphModule, inputs: tuple) -> dict:
    state = {k: torch.empty_like(v, device="meta")
             for k, v in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))}
    meta_inputs = tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, inputs)
    rec = _Recorder(gm)
    # ShapeProp prints the traceback of a failing node before raising; here a failure only means "run it for real"
    with _reparametrize_module(gm, state, tie_weights=True), contextlib.redirect_stderr(io.StringIO()):
        rec.propagate(*meta_inputs)
    return rec.values


def record_shapes(gm: fx.GraphModule, inputs: tuple) -> dict:
    """node -> :class:`TensorMeta` (tensors) or the value itself (anything else), in eval mode.

    Raises :class:`InputMismatchError` when the inputs do not fit the model."""
    with TrainingFlags(gm), torch.no_grad():
        try:
            return _on_meta(gm, inputs)
        except Exception:  # noqa: BLE001 - not runnable on meta tensors: run it for real
            pass
        # a weightless model whose graph needs data (JetMoE sizes its expert batches by .tolist() of the routing)
        # runs once on its stored weights, loaded for this run only (memory: the model's weights)
        state = _stored_state(gm)
        rec = _Recorder(gm, off_meta=bool(state))
        try:
            with _reparametrize_module(gm, state or {}, tie_weights=True):
                rec.propagate(*(tree_map(_cpu_device, inputs) if state else inputs))
        except Exception as exc:  # noqa: BLE001 - user input problem
            raise InputMismatchError(f"the example inputs do not fit the model: {_failure(exc)}") from None
        return rec.values


def _failure(exc: BaseException) -> str:
    """The failing op and its error, from ShapeProp's wrapper (whose own message dumps the node's metadata)."""
    cause = exc.__cause__
    if cause is None:
        return first_line(exc)
    node = re.search(r"node=%(\S+) : .*?target=([\w.]+)", str(exc))
    where = f"{node.group(2)} at node {node.group(1)!r}: " if node else ""
    return where + first_line(cause)
