"""Checking a grown checkpoint directory against its original in bounded memory: the whole model is run, one
layer at a time.

Loading both models whole for an end-to-end comparison needs memory for both in float32 (23 GiB at 1.1 B
parameters grown x2; a 7 B model cannot be checked on this machine).  Instead each model is run as a *chain
of skeletons*: the family's own class built from the config with one layer per stack and a vocabulary cut
to a few hundred token rows.  The skeleton holding layer i runs the family's forward (masks, rotary
embeddings, position biases all computed by the family's code) with layer i's input replaced, through a
forward hook, by the hidden state layer i-1 produced in the previous skeleton, and its output is carried to
the next.  After the last layer the input of the head is captured and the full head is applied in row
chunks read from the checkpoint, so every vocabulary row is compared.  The original and the grown model
run the same token ids; their logits must agree within the stored dtype's tolerance, as in the
whole-model check: this is that check, computed layer by layer.

Which token rows: every id of the input is drawn from the kept rows (``VOCAB_ROWS`` of them, at random);
the embedding is cut to those rows, which removes rows, not arithmetic.

A family whose layers pass the next one more than the hidden state (a state carried across layers other
than through ``hidden_states``) would be chained wrongly; so, before the check, the chain of layers 0 and 1
of the original is compared with a skeleton holding both, run as the family runs them.  A family failing
that, or one whose layers are not built alike (a per-layer shape no config field restates), is reported
as :class:`ChainUnavailable`; the caller then falls back to the whole-model check.

While a checkpoint is written (:class:`ChainedCheck`), the writer writes the shared tensors first and then
the layers in the order the chain runs them, and the check runs each layer as soon as its tensors are
written: it reads back what the writer has just read and written, from the page cache rather than from disk
(a 7 B model grown x1.5 is 43 GB to read back, 2 minutes at this disk's speed).

Arithmetic: float32, or float64 for a checkpoint holding float64 tensors (its weights' rounding is float64's; its
tolerance, 1e-6, covers the float32 arithmetic the families' own code does inside a float64 model).  Memory: one
skeleton at a time (one layer in float32, the cut embeddings and a chunk of head rows).
A sparse layer's stacked experts ([E, A, B]: E x the dense MLP, 1.1 GB in float32 for 8 experts of a 1.1 B model's MLP)
are not loaded as a stack: the skeleton runs the family's eager experts loop, which reads the stack one expert at
a time (``gate_up_proj[e]``), and each such read loads that expert from the checkpoint (:class:`_PerExpert`); the
layer then holds one expert in float32.  A family whose experts code uses the stack otherwise is run with the
stack loaded whole.

Experts the routing leaves idle: a zero router ties every expert, so the family picks the same k for every token
and the other experts never run; a corrupted one would pass.  Where the writer states that the experts are copies
(``copies``: the sets of experts that each hold one expert's tensors, as upcycling and expert growth write them:
:func:`graphgrow.core.moe.copy_sets`), the check runs each sparse layer again with its expert slots rotated within
their sets (slot j reads the copy r places on in its set) until every expert has run, and each rotated output must
equal the layer's own output: a copy that differs from the expert the routing picked shows there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import UnsupportedModelError
from .checkpoint import Checkpoint
from .layout import row_ranges
from .moe_twins import EXPERT_FIELDS

VOCAB_ROWS = 256  # token rows kept by a skeleton
HEAD_CHUNK_ROWS = 4096  # head rows applied at a time in the full-vocabulary comparison
BATCH, SEQ = 2, 16  # the token ids run through both models (one chained pass each): every weight of a layer
# meets 32 tokens, and the forward of a 7 B layer stays well under its read time


class ChainUnavailable(UnsupportedModelError):
    """This family's layers cannot be run one at a time (the sentence says why)."""


@dataclass
class Side:
    """One checkpoint to run: its tensors, transformers config, model class, stacks (encoder first) and stored
    layout (:class:`~.layout.StoredLayout`, or None)."""

    ckpt: Checkpoint
    config: object
    cls: type
    stacks: list
    layout: object = None


@dataclass
class ChainResult:
    """What one chained run of a model produced."""

    head_input: torch.Tensor | None  # the hidden state the head reads (None: the model has no vocabulary head)
    output: torch.Tensor  # the skeleton's own first output (logits over the kept rows, or the hidden state)
    head_names: tuple | None = None  # the head weight's key, and the key it is tied to (or None)


@dataclass
class LayerCheck:
    """The figures of a layer-by-layer check."""

    layers: int = 0
    max_rel: float = 0.0
    rows_checked: int = 0
    experts_run: int = 0  # routed experts of the grown model run (by the routing or a rotation), over all layers
    experts_total: int = 0
    rotated_max_rel: float = 0.0  # the largest difference a rotation of copied experts made to a layer's output
    notes: list = field(default_factory=list)


def chain_stacks(stacks: list, name: str) -> list:
    """The stacks in the order the model runs them, or ChainUnavailable (per-stage stacks, several stacks
    that are not an encoder and a decoder)."""
    if any(s.index is not None for s in stacks):
        raise ChainUnavailable(f"{name}: its layers are grouped in stages")
    if len(stacks) == 1:
        return list(stacks)
    enc = [s for s in stacks if "encoder" in s.path]
    dec = [s for s in stacks if "decoder" in s.path]
    if len(stacks) == 2 and len(enc) == 1 and len(dec) == 1:
        return enc + dec
    raise ChainUnavailable(f"{name}: it has {len(stacks)} layer stacks that are not one encoder and one decoder")


def _vocab_fields(config) -> list:
    size = getattr(config, "vocab_size", None)
    return [k for k, v in config.to_dict().items() if k.endswith("vocab_size") and v == size and isinstance(v, int)]


def skeleton_config(config, stacks: list, layers: dict, rows: int | None):
    """``config`` with each stack holding the given layers (per-layer list fields cut to them) and, where
    ``rows`` is given, a vocabulary of ``rows`` tokens."""
    cfg = copy.deepcopy(config)
    data = config.to_dict()
    if _expert_count(data):  # the eager loop reads the stacked experts one at a time (see _PerExpert)
        cfg._experts_implementation = "eager"
    for s in stacks:
        chosen = layers[s.path]
        setattr(cfg, s.field, len(chosen))
        if len(stacks) == 1:
            for key, value in data.items():
                if isinstance(value, list) and len(value) == s.n and key not in ("architectures", "mlp_only_layers") \
                        and key not in s.keep:
                    setattr(cfg, key, [value[i] for i in chosen])
            for key in ("first_k_dense_replace", "num_dense_layers"):  # DeepSeek/GLM-MoE, LFM2-MoE: first k dense
                dense = data.get(key)
                if isinstance(dense, int) and not isinstance(dense, bool):
                    setattr(cfg, key, sum(1 for i in chosen if i < dense))
            _sparse_by_rule(cfg, data, chosen)
            _sparse_by_range(cfg, data, chosen)
    if rows is not None:
        for key in _vocab_fields(config):
            setattr(cfg, key, rows)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value >= rows:
                setattr(cfg, key, 0)  # (ids only name rows: a padding index must exist; it changes no arithmetic)
    return cfg


def _sparse_by_rule(cfg, data: dict, chosen: list) -> None:
    """Qwen2/3-MoE's sparse layers are set by index (``mlp_only_layers``, every ``decoder_sparse_step``-th layer): the
    skeleton's layers keep the kind the chosen ones have (an upcycled ``layers=`` subset is sparse where it was)."""
    step, only = data.get("decoder_sparse_step"), data.get("mlp_only_layers")
    if not isinstance(step, int) or isinstance(step, bool) or not isinstance(only, list):
        return
    experts = data.get("num_experts") or data.get("num_local_experts") or 0
    sparse = [i not in only and experts > 0 and step > 0 and (i + 1) % step == 0 for i in chosen]
    cfg.decoder_sparse_step = 1
    cfg.mlp_only_layers = [k for k, is_sparse in enumerate(sparse) if not is_sparse]


def _sparse_by_range(cfg, data: dict, chosen: list) -> None:
    """ERNIE 4.5 MoE's sparse layers: layer i when ``moe_layer_start_index <= i <= moe_layer_end_index`` and
    ``(i + 1) % moe_layer_interval == 0``.  The skeleton's layers get a start, end and interval giving each the kind
    the chosen layer has; ChainUnavailable where no such triple exists (the skeletons hold one or two layers: one
    always does)."""
    keys = ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval")
    start, end, interval = (data.get(k) for k in keys)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end, interval)):
        return
    end = data.get("num_hidden_layers", 0) - 1 if end == -1 else end  # (as the config's __post_init__ reads -1)

    def sparse(i, a, b, step):
        return step > 0 and (i + 1) % step == 0 and a <= i <= b

    want = [sparse(i, start, end, interval) for i in chosen]
    n = len(chosen)
    for step in range(1, n + 2):
        for a in range(n + 1):
            for b in range(a - 1, n):  # (b < a: no sparse layer; never -1, which the config reads as "the last")
                if b >= 0 and [sparse(k, a, b, step) for k in range(n)] == want:
                    cfg.moe_layer_start_index, cfg.moe_layer_end_index, cfg.moe_layer_interval = a, b, step
                    return
    raise ChainUnavailable(f"{type(cfg).__name__}: moe_layer_start_index / moe_layer_end_index / moe_layer_interval "
                           f"cannot give {n} layers the kinds of layers {chosen}")


def _expert_count(data: dict) -> int:
    return next((v for k in EXPERT_FIELDS if isinstance(v := data.get(k), int) and not isinstance(v, bool) and v > 1),
                0)


def compute_dtype(config) -> torch.dtype:
    """The dtype the check runs a model in: float64 where the checkpoint stores float64 (``graphgrow_float64``,
    set by :func:`load_skeleton`), else float32."""
    return torch.float64 if getattr(config, "graphgrow_float64", False) else torch.float32


def _side_dtype(side: Side) -> torch.dtype:
    names = side.ckpt.names()
    return torch.float64 if any(side.ckpt.dtype(n) == torch.float64 for n in names) else torch.float32


def _build(cls, cfg):
    """The skeleton, its parameters allocated but not initialised (each one is loaded next; untouched pages
    cost no memory); buffers (rotary frequencies, position ids) computed by the family's constructor."""
    from transformers import initialization

    with initialization.no_init_weights():
        model = cls(cfg)
    return model.to(compute_dtype(cfg)).eval()


def _source_keys(key: str, stacks: list, layers: dict) -> tuple:
    """The checkpoint keys that may hold skeleton parameter ``key``: its own layer's, then the stack's first
    layer's (a parameter only the first layer builds, such as T5's relative position bias, is read there)."""
    for s in stacks:
        head = s.path + "."
        if key.startswith(head):
            idx, _, rest = key[len(head):].partition(".")
            return f"{head}{layers[s.path][int(idx)]}.{rest}", f"{head}0.{rest}"
    return key, key


def _tied_source(model, key: str) -> str | None:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return tied.get(key)


def _read(side: Side, names: tuple):
    for name in names:
        if name in side.ckpt:
            return side.ckpt.get(name)
        layout = side.layout
        if layout is not None and name in layout.pieces:
            return layout.assemble(name, tuple(layout.model.state_dict()[name].shape), side.ckpt.get)
    return None


def _cut_vocab(tensor, shape: tuple, vocab: int, rows, key: str):
    if tuple(tensor.shape) == shape:
        return tensor
    if rows is not None and tensor.dim() == len(shape):
        axes = [a for a, (have, want) in enumerate(zip(tensor.shape, shape)) if have != want]
        if len(axes) == 1 and tensor.shape[axes[0]] == vocab and shape[axes[0]] == len(rows):
            return tensor.index_select(axes[0], rows)
    raise ChainUnavailable(f"the skeleton builds {key!r} as {list(shape)}, the checkpoint holds "
                           f"{list(tensor.shape)}: this family's layers are not all built alike")


class _NeedsWhole(Exception):
    """The family's experts code used a stacked expert parameter other than one expert at a time."""


class _PerExpert:
    """A stacked expert parameter [E, A, B] of a skeleton that holds one expert at a time: ``stack[e]`` loads
    expert ``slot(e)`` from the checkpoint, in the check's dtype (the last one kept for the next read); any other
    use raises :class:`_NeedsWhole`, and the layer is run again with the stack loaded whole."""

    def __init__(self, shape: tuple, read, dtype=torch.float32):
        self.shape, self.dtype, self.device, self.ndim = torch.Size(shape), dtype, torch.device("cpu"), 3
        self.read, self.slot, self.used = read, None, set()
        self.kept = (None, None)

    def size(self, dim=None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 3

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.shape[0]:
            raise _NeedsWhole(f"indexed by {type(index).__name__}")
        self.used.add(index)
        expert = self.slot(index) if self.slot is not None else index
        if self.kept[0] != expert:
            self.kept = (None, None)  # (the previous expert freed before the next is read)
            self.kept = (expert, self.read(expert).to(self.dtype))
        return self.kept[1]

    def __getattr__(self, name):
        raise _NeedsWhole(f"its .{name} was read")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # (the stack passed whole: Llama 4's bmm)
        raise _NeedsWhole(f"passed to {getattr(func, '__name__', func)}")


def _expert_reader(side: Side, names: tuple, shape: tuple):
    """read(e) -> expert e of the stacked parameter stored under one of ``names`` (at ``shape``), reading that
    expert's bytes only; None where the stored layout does not keep each expert's rows whole."""
    for name in names:
        if name in side.ckpt:
            if tuple(side.ckpt.shape(name)) != shape:
                return None
            return lambda e, n=name: side.ckpt.get_rows(n, e, e + 1)[0]
        layout = side.layout
        if layout is not None and name in layout.pieces:
            stored = _renamed(layout, name, shape)
            if stored is not None:  # (GraniteMoE: the stack stored whole under another name)
                return lambda e, n=stored: side.ckpt.get_rows(n, e, e + 1)[0]
            ranges = row_ranges(layout.model, name, shape)
            if ranges is None:
                return None
            parts: dict = {}
            for stored, (e, r0, a) in ranges.items():
                parts.setdefault(e, []).append((stored, r0, a))

            def read(e, parts=parts):
                out = None
                for stored, r0, a in parts[e]:
                    piece = side.ckpt.get(stored)
                    if out is None:
                        out = torch.empty(shape[1:], dtype=piece.dtype)
                    out[r0:r0 + a] = piece
                return out
            return read
    return None


def _renamed(layout, key: str, shape: tuple) -> str | None:
    """The stored name of stacked parameter ``key`` where the stored layout only renames it (every element in
    place), else None; read off the conversion run on a small (E, A, 1) tensor of element indices."""
    from .layout import revert_conversion

    if len(layout.pieces[key]) != 1:
        return None
    n_exp, rows = int(shape[0]), int(shape[1])
    index = torch.arange(n_exp * rows, dtype=torch.float64).reshape(n_exp, rows, 1)
    try:
        out = revert_conversion()(layout.model, {key: index})
    except Exception:  # noqa: BLE001 - a conversion that needs the real trailing size: not a plain rename
        return None
    (name, moved), = out.items()
    return name if tuple(moved.shape) == (n_exp, rows, 1) and torch.equal(moved, index) else None


def _per_expert(module, key: str, stack: _PerExpert) -> None:
    owner, _, attr = key.rpartition(".")
    sub = module.get_submodule(owner)
    del sub._parameters[attr]
    setattr(sub, attr, stack)


def per_expert_stacks(model) -> list:
    """The skeleton's stacked expert parameters held one expert at a time (:class:`_PerExpert`)."""
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, _PerExpert)]


def load_skeleton(side: Side, layers: dict, rows, per_expert: bool = True):
    """The skeleton of ``side`` holding ``layers`` (stack path -> original indices), cut to the token
    ``rows`` (a sorted LongTensor, or None for models without a vocabulary).  ``per_expert``: its stacked expert
    parameters are read one expert at a time as the family's experts loop asks (:class:`_PerExpert`) where the
    stored layout allows."""
    cfg = skeleton_config(side.config, side.stacks, layers, None if rows is None else len(rows))
    dtype = _side_dtype(side)
    cfg.graphgrow_float64 = dtype == torch.float64
    model = _build(side.cls, cfg)
    params = dict(model.named_parameters())
    experts = _expert_count(side.config.to_dict()) if per_expert else 0
    state, stacks = {}, {}
    for key, target in model.state_dict().items():
        names = _source_keys(key, side.stacks, layers)
        if experts and key in params and target.dim() == 3 and target.shape[0] == experts:
            read = _expert_reader(side, names, tuple(target.shape))
            if read is not None:
                stacks[key] = _PerExpert(tuple(target.shape), read, dtype)
                continue
        tensor = _read(side, names)
        if tensor is None:
            if key in params and _tied_source(model, key) is None:
                raise ChainUnavailable(f"{side.cls.__name__}: the skeleton's {key!r} is not stored as {names[0]!r}")
            continue  # a tied parameter, or a buffer the constructor computed
        state[key] = _cut_vocab(tensor, tuple(target.shape), side.config.vocab_size if rows is not None else None,
                                rows, key).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for key, stack in stacks.items():
        _per_expert(model, key, stack)
    model.tie_weights()
    return model


def _head(model):
    """The vocabulary head module of a skeleton, or None."""
    try:
        head = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, torch.nn.Linear) else None


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _run_layer(model, layer_path: str, carried, call, capture_head: bool):
    """``call(model)`` with the input of the skeleton's only layer at ``layer_path`` replaced by ``carried``;
    returns (the layer's output hidden state, the head's input or None, the call's first output)."""
    layer = model.get_submodule(layer_path)
    seen: dict = {}

    def replace_input(module, args, kwargs):
        if carried is None:
            return None
        if args:
            return (carried,) + tuple(args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise ChainUnavailable(f"{type(module).__name__} is called without a hidden_states argument")
        return args, {**kwargs, "hidden_states": carried}

    def keep_output(module, args, output):
        seen["hidden"] = _first(output)

    handles = [layer.register_forward_pre_hook(replace_input, with_kwargs=True),
               layer.register_forward_hook(keep_output)]
    head = _head(model) if capture_head else None
    if head is not None:
        handles.append(head.register_forward_pre_hook(lambda m, args: seen.__setitem__("head", args[0])))
    try:
        with torch.no_grad():
            out = call(model)
    finally:
        for h in handles:
            h.remove()
    if "hidden" not in seen:
        raise ChainUnavailable(f"{type(model).__name__}: layer {layer_path} did not run")
    return seen["hidden"], seen.get("head"), _first(out.to_tuple() if hasattr(out, "to_tuple") else out)


class _Chain:
    """One model run layer by layer (``only``: stack path -> the layers to chain, all of them by default):
    :meth:`step` runs the next layer's skeleton and carries its hidden state on."""

    def __init__(self, side: Side, inputs: dict, rows, only: dict | None = None, copies: list | None = None):
        self.side, self.inputs, self.rows, self.copies = side, inputs, rows, copies
        self.order = [(k, stack, i) for k, stack in enumerate(side.stacks)
                      for i in (only[stack.path] if only else range(stack.n))]
        self.pos = 0
        self.carried = self.enc_out = self.result = None
        self.experts_run = self.experts_total = 0
        self.rotated = 0.0  # the largest rel difference a rotation of copied experts made to a layer's output

    @property
    def done(self) -> bool:
        return self.pos == len(self.order)

    @property
    def next_layer(self) -> tuple:
        """(stack number, layer index) of the layer :meth:`step` runs next."""
        k, _, i = self.order[self.pos]
        return k, i

    def step(self) -> str:
        from transformers.modeling_outputs import BaseModelOutput

        side, inputs = self.side, self.inputs
        k, stack, i = self.order[self.pos]
        if self.pos and self.order[self.pos - 1][0] != k:
            self.carried = None  # the decoder starts from its own embeddings
        last = self.pos == len(self.order) - 1 or self.order[self.pos + 1][0] != k
        is_encoder = len(side.stacks) == 2 and k == 0
        layers = {s.path: [i] if s is stack else [0] for s in side.stacks}
        if is_encoder:
            call = (lambda m: m.get_encoder()(**{n: v for n, v in inputs.items() if not n.startswith("decoder_")}))
        elif self.enc_out is not None:
            call = (lambda m, e=self.enc_out: m(**inputs, encoder_outputs=BaseModelOutput(last_hidden_state=e),
                                                 use_cache=False))
        else:
            call = (lambda m: m(**inputs, use_cache=False)) if _uses_cache(side.config) else (lambda m: m(**inputs))
        path, carried = f"{stack.path}.0", self.carried
        model, (hidden, head_in, out) = _run_skeleton(
            side, layers, self.rows, lambda m: _run_layer(m, path, carried, call, capture_head=last and not is_encoder))
        self._rotate_experts(model, path, carried, call, hidden)
        self.carried = hidden
        if last and is_encoder:
            self.enc_out = out  # the encoder's final output (after its final norm)
        elif last:
            head = _head(model)
            names = None
            if head is not None and self.rows is not None and head.weight.shape[0] == len(self.rows):
                names = _head_names(side, model, head)
            self.result = ChainResult(head_in if names else None, out, names)
        del model
        self.pos += 1
        return f"{stack.path}.{i}"

    def _rotate_experts(self, model, path: str, carried, call, hidden) -> None:
        """Run the layer again with its copied experts' slots rotated until every expert has run (see the module's
        docstring); each rotated output is compared with ``hidden``, the layer's own."""
        stacks = per_expert_stacks(model)
        if not stacks:
            return
        n = stacks[0].shape[0]
        used = set().union(*(s.used for s in stacks))
        sets = self.copies if self.copies and sum(len(s) for s in self.copies) == n else [[j] for j in range(n)]
        where = {j: (s, i) for s in sets for i, j in enumerate(s)}
        group = max(len(s) for s in sets)
        self.experts_total += n

        def rotation(r):
            return lambda j: where[j][0][(where[j][1] + r) % len(where[j][0])]

        covered = set(used)
        try:
            while group > 1 and len(covered) < n:
                r = max(range(1, group), key=lambda r: len({rotation(r)(j) for j in used} - covered))
                gain = {rotation(r)(j) for j in used} - covered
                if not gain:
                    break  # (a group the routing never picked: its copies cannot be told from the others here)
                for s in stacks:
                    s.slot = rotation(r)
                rotated = _run_layer(model, path, carried, call, capture_head=False)[0]
                self.rotated = max(self.rotated, _rel(hidden, rotated))
                covered |= gain
        finally:
            for s in stacks:
                s.slot = None
        self.experts_run += len(covered)


def _run_skeleton(side: Side, layers: dict, rows, run) -> tuple:
    """(the skeleton holding ``layers``, ``run(skeleton)``): its stacked experts read one at a time, or, where the
    family's experts code uses a stack otherwise (:class:`_NeedsWhole`), loaded whole and run again."""
    model = None
    try:
        model = load_skeleton(side, layers, rows)
        return model, run(model)
    except _NeedsWhole:
        pass  # (the skeleton is rebuilt outside the handler: its traceback holds the first one)
    model = None  # (the first skeleton freed before the second is loaded)
    model = load_skeleton(side, layers, rows, per_expert=False)
    return model, run(model)


def run_chain(side: Side, inputs: dict, rows, only: dict | None = None) -> ChainResult:
    """``side``'s model on ``inputs``, one layer at a time (``only``: stack path -> the layers to chain, all of
    them by default)."""
    chain = _Chain(side, inputs, rows, only)
    while not chain.done:
        chain.step()
    return chain.result


def _head_names(side: Side, model, head) -> tuple | None:
    """(the head weight's stored key, the key it is tied to) in the full model's names (a module reachable under
    two names, as GPT-NeoX's embed_out and lm_head, is read under the stored one)."""
    keys = [n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight]
    stored = [k for k in keys if _stored_name(side, k)]
    key = (stored or keys or [None])[0]
    return (key, _tied_source(model, key)) if key else None


def _uses_cache(config) -> bool:
    return getattr(config, "use_cache", None) is not None


def _stored_name(side: Side, key: str | None) -> str | None:
    """The stored tensor holding model parameter ``key`` whole (itself, or its one renamed piece), or None."""
    if key is None or key in side.ckpt:
        return key
    pieces = side.layout.pieces.get(key, ()) if side.layout is not None else ()
    if len(pieces) != 1 or tuple(side.ckpt.shape(pieces[0])) != tuple(side.layout.model.state_dict()[key].shape):
        return None
    return pieces[0]


def _head_rows(side: Side, names: tuple, start: int, stop: int):
    """Rows ``start:stop`` of the stored head (``names``: its key, then the embedding it is tied to) and of its
    bias."""
    for name in names:
        name = _stored_name(side, name)
        if name is not None:
            dtype = _side_dtype(side)
            weight = side.ckpt.get_rows(name, start, stop).to(dtype)
            bias_name = name.rsplit(".", 1)[0] + ".bias"
            bias = side.ckpt.get_rows(bias_name, start, stop).to(dtype) if (
                name == names[0] and bias_name in side.ckpt) else None
            return weight, bias
    raise ChainUnavailable(f"the head {names[0]!r} is not stored")


def compare_heads(old: Side, new: Side, a: ChainResult, b: ChainResult) -> tuple:
    """max |logit difference| and max |logit| over every vocabulary row, the head applied in row chunks."""
    worst_diff, worst_ref = 0.0, 0.0
    vocab = old.config.vocab_size
    for start in range(0, vocab, HEAD_CHUNK_ROWS):
        stop = min(vocab, start + HEAD_CHUNK_ROWS)
        wa, ba = _head_rows(old, a.head_names, start, stop)
        wb, bb = _head_rows(new, b.head_names, start, stop)
        la, lb = F.linear(a.head_input, wa, ba), F.linear(b.head_input, wb, bb)
        worst_diff = max(worst_diff, float((la - lb).abs().max()))
        worst_ref = max(worst_ref, float(la.abs().max()))
    return worst_diff, worst_ref


def draw_inputs(side: Side, rows, gen: torch.Generator) -> dict:
    cfg = side.config
    if rows is None:  # pixels
        size = getattr(cfg, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return {"pixel_values": torch.randn((BATCH, getattr(cfg, "num_channels", 3)) + size, generator=gen)}
    ids = torch.randint(0, len(rows), (BATCH, SEQ), generator=gen)
    kw = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False):
        kw["decoder_input_ids"] = ids[:, : SEQ // 2]
    return kw


def _rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def require_chainable(side: Side, inputs: dict, rows, tolerance: float = 1e-5) -> None:
    """ChainUnavailable unless layers 0 and 1 of each stack, chained, compute what a skeleton holding both
    computes (the family passes its layers nothing but the hidden state)."""
    both = {s.path: [0, 1] if s.n >= 2 else [0] for s in side.stacks}
    if all(len(v) == 1 for v in both.values()):
        return
    kw = {"use_cache": False} if _uses_cache(side.config) else {}

    def run(model):
        with torch.no_grad():
            return _first(model(**inputs, **kw).to_tuple())

    model, whole = _run_skeleton(side, both, rows, run)
    del model
    chained = run_chain(side, inputs, rows, only=both).output
    if tuple(whole.shape) != tuple(chained.shape) or not _rel(whole, chained) <= tolerance:
        raise ChainUnavailable(f"{side.cls.__name__}'s layers pass each other more than the hidden state (run one "
                               f"at a time they differ from the family's forward)")


def layer_of(name: str, stacks: list) -> tuple | None:
    """(stack number, layer index) of the layer tensor ``name`` belongs to, or None (embeddings, final norm,
    head: every skeleton holds those)."""
    for k, s in enumerate(stacks):
        head = s.path + "."
        if name.startswith(head):
            idx = name[len(head):].partition(".")[0]
            if idx.isdigit():
                return k, int(idx)
    return None


class ChainedCheck:
    """The layer-by-layer check of ``new`` against ``old``, runnable while ``new`` is being written: each
    :meth:`advance` runs the layers whose tensors are written (``written``: a set of tensor names), reading
    them back while they are still in the page cache; :meth:`finish` runs the rest and returns the figures
    (``max_rel`` over the full vocabulary where the model has a head).  ChainUnavailable where the family
    cannot be chained; the caller compares max_rel with ``tolerance``."""

    def __init__(self, old: Side, new: Side, *, tolerance: float, seed: int = 0, progress=None,
                 copies: list | None = None):
        name = old.cls.__name__
        old.stacks, new.stacks = chain_stacks(old.stacks, name), chain_stacks(new.stacks, name)
        self.old, self.new, self.tolerance, self.progress = old, new, tolerance, progress
        gen = torch.Generator().manual_seed(seed)
        vocab = getattr(old.config, "vocab_size", None)
        rows = None
        if isinstance(vocab, int) and "input_ids" == getattr(old.cls, "main_input_name", "input_ids"):
            rows = torch.randperm(vocab, generator=gen)[:VOCAB_ROWS].sort().values
        self.rows = rows
        inputs = draw_inputs(old, rows, gen)
        require_chainable(old, inputs, rows)
        self.a, self.b = _Chain(old, inputs, rows), _Chain(new, inputs, rows, copies=copies)
        self.total = len(self.a.order) + len(self.b.order)
        self.layer = {n: layer_of(n, new.stacks) for n in new.ckpt.names()}

    def _needs(self) -> list:
        """The stored tensors the new model's next skeleton reads: the shared ones (embeddings, norms, head),
        the first layer of every stack, and its own layer's."""
        k, i = self.b.next_layer
        return [n for n, at in self.layer.items() if at is None or at[1] == 0 or at == (k, i)]

    def _step(self, chain: _Chain) -> None:
        name = chain.step()
        if self.progress is not None:
            self.progress(self.a.pos + self.b.pos, self.total, name)

    def advance(self, written) -> None:
        """Run every layer of the new model whose tensors are in ``written`` (and the original's layers up to
        it, in step, so both read what the writer has just read and written)."""
        while not self.b.done and all(n in written for n in self._needs()):
            while not self.a.done and self.a.pos <= self.b.pos:
                self._step(self.a)
            self._step(self.b)

    def finish(self) -> LayerCheck:
        while not self.a.done:
            self._step(self.a)
        while not self.b.done:
            self._step(self.b)
        a, b, name = self.a.result, self.b.result, self.old.cls.__name__
        result = LayerCheck(layers=sum(s.n for s in self.new.stacks))
        if tuple(a.output.shape) != tuple(b.output.shape):
            raise ChainUnavailable(f"{name}: the grown model's output is {list(b.output.shape)}, the original's "
                                   f"{list(a.output.shape)}")
        result.max_rel = _rel(a.output, b.output)  # the family's own outputs on the kept rows (post-processing too)
        result.experts_run, result.experts_total = self.b.experts_run, self.b.experts_total
        result.rotated_max_rel = self.b.rotated
        result.max_rel = max(result.max_rel, self.b.rotated)
        vocab = getattr(self.old.config, "vocab_size", None)
        if a.head_names is not None and b.head_names is not None:
            diff, ref = compare_heads(self.old, self.new, a, b)
            result.max_rel = max(result.max_rel, diff / max(ref, 1e-30))
            result.rows_checked = vocab
        elif self.rows is not None:
            result.rows_checked = len(self.rows)
        return result
