"""A Hugging Face model captured as a graph the fx analysis reads.

Symbolic tracing cannot enter transformers' forward functions (mask builders, pytree outputs, cache
objects); ``torch.export`` can.  :class:`ModelOutputs` turns the model into a function of positional
tensors returning its output tensors (no cache: the grown model's cache is the model's own business),
:func:`capture` exports it and lifts the ATen graph (:mod:`graphgrow.fx.aten`), whose ``get_attr`` targets
are the model's state_dict keys.
"""

from __future__ import annotations

import copy
import inspect
import sys

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import InvalidArgumentError, TraceError, first_line
from ..fx.aten import lift_exported

_PREFIX = "model."
ENCODER_STATES = ("encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions")


def is_pretrained(model) -> bool:
    """True for a ``transformers.PreTrainedModel`` (without importing transformers when it is not loaded)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


class NamedInputs(tuple):
    """Example inputs given by keyword (``{"input_ids": ..., "decoder_input_ids": ...}``): the tensors in the
    order given, with their parameter names.  A plain tuple means positional inputs."""

    names: tuple = ()

    def __new__(cls, mapping: dict):
        out = super().__new__(cls, mapping.values())
        out.names = tuple(mapping)
        return out


def input_names(inputs) -> tuple:
    """The keyword names of ``inputs`` (empty for positional inputs)."""
    return getattr(inputs, "names", ())


class ModelOutputs(nn.Module):
    """``model(*inputs)`` (or ``model(**dict(zip(names, inputs)))``) without a cache, as the tuple of its output
    tensors (logits first).  Keyword inputs keep every wrapper a function of positional tensors, which is what
    the export, the checks and the random draws of the verification work with."""

    def __init__(self, model: nn.Module, names: tuple = ()):
        super().__init__()
        self.model = model
        self.names = tuple(names)
        params = inspect.signature(model.forward).parameters
        self.kwargs = {"use_cache": False} if "use_cache" in params else {}
        if "return_dict" in params:
            self.kwargs["return_dict"] = True

    def forward(self, *inputs):
        if self.names:
            out = self.model(**dict(zip(self.names, inputs)), **self.kwargs)
        else:
            out = self.model(*inputs, **self.kwargs)
        if hasattr(out, "items"):
            # an encoder-decoder's encoder_last_hidden_state is the decoder's input, not an answer of the model
            # (like the hidden states it is not asked for): its width is free to grow
            drop = ENCODER_STATES if "logits" in out and getattr(self.model.config, "is_encoder_decoder", False) \
                else ()
            values = [v for k, v in out.items() if k not in drop]
        else:
            values = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(v for v in values if isinstance(v, torch.Tensor))


def as_inputs(example_inputs) -> tuple:
    """A tuple of tensors (a :class:`NamedInputs` where they were given by keyword, as a dict)."""
    if example_inputs is None:
        raise InvalidArgumentError("example_inputs are required: pass the input_ids (or pixel_values) tensor the "
                                   "model accepts, a tuple of them, or a dict of keyword tensors")
    if isinstance(example_inputs, NamedInputs):
        return example_inputs
    if isinstance(example_inputs, dict):
        if not example_inputs or not all(isinstance(k, str) for k in example_inputs):
            raise InvalidArgumentError("example_inputs given as a dict must map parameter names to tensors")
        inputs = NamedInputs(example_inputs)
    else:
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise InvalidArgumentError("example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors")
    return inputs


def capture(model: nn.Module, inputs: tuple) -> fx.GraphModule:
    """The lifted export of ``ModelOutputs(model)`` on ``inputs``; get_attr targets are state_dict keys."""
    from .exportable import exportable

    wrapper = ModelOutputs(model, input_names(inputs))
    try:
        with torch.no_grad(), exportable(model):
            program = torch.export.export(wrapper, tuple(inputs), strict=False)
    except Exception as exc:  # noqa: BLE001 - any capture failure is reported in one sentence
        raise TraceError(f"torch.export cannot capture {type(model).__name__}: {first_line(exc)}") from None
    gm = lift_exported(program.module(), _PREFIX)
    _rows_as_embedding(gm)
    from .scales import mark_head_dim_scales, mark_width_scales, mark_width_tables

    if getattr(model, "config", None) is not None:
        mark_width_scales(gm, model.config)
        mark_head_dim_scales(gm, model.config)
    mark_width_tables(gm, model)
    return gm


def _rows_as_embedding(gm: fx.GraphModule) -> None:
    """``weight[ids]`` of a 2-d parameter (aten.index with one index tensor: Whisper's decoder positions) is
    ``F.embedding(ids, weight)``: written so, the table is read as an embedding (its columns grow)."""
    params = dict(gm.named_parameters())
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.index.Tensor and len(node.args) == 2:
            w, idx = node.args
            if isinstance(w, fx.Node) and w.op == "get_attr" and w.target in params and params[w.target].ndim == 2 \
                    and isinstance(idx, (list, tuple)) and len(idx) == 1 and isinstance(idx[0], fx.Node):
                node.target, node.args = torch.nn.functional.embedding, (idx[0], w)
    gm.recompile()


def tied_groups(model: nn.Module) -> dict:
    """state_dict key -> every key holding the same tensor (tied embeddings, shared layers)."""
    by_tensor: dict = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(name)
    return {n: names for names in by_tensor.values() for n in names}


def rebuilt(model: nn.Module, config, state: dict) -> nn.Module:
    """``type(model)(config)`` holding ``state``: the family's own code at the new sizes.

    Submodules the original was built without (``BertModel(add_pooling_layer=False)`` keeps ``pooler = None``;
    such constructor arguments are not in the config) are left out the same way."""
    new = type(model)(config)
    for name, _ in list(new.named_modules()):
        parent, _, attr = name.rpartition(".")
        try:
            old_parent = model.get_submodule(parent)
        except AttributeError:
            continue
        if attr and attr in old_parent.__dict__ and old_parent.__dict__[attr] is None:
            setattr(new.get_submodule(parent), attr, None)
    new.to(dtype=next(model.parameters()).dtype)
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new
