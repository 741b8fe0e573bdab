"""Stored checkpoint layouts that transformers converts on load.

transformers 5 keeps mixture-of-experts weights stacked (``experts.gate_up_proj [E, 2I, H]``) but reads and
writes checkpoints in the families' original layout (``experts.N.w1.weight``, ``experts.N.w3.weight``, ...),
converting by its own weight-conversion rules.  A streamed widening plans on the model's keys, so each stacked
tensor is assembled from its stored pieces, grown by its recipe and cut back into pieces.  The conversion
itself is transformers' (``revert_weight_conversion``, model layout -> stored layout); its inverse is read off by
running it on a tensor of element indices, which is exact for conversions that only move elements (split,
chunk, transpose, stack): every index must come back exactly once, or the layout is refused.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError


def revert_conversion():
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers: stored keys are the model's keys
        return None
    return revert_weight_conversion


def row_ranges(model, key: str, shape) -> dict | None:
    """When the stored layout cuts a stacked (E, A, B) parameter ``key`` into whole rows of one expert each:
    {stored name: (expert, first row, rows)}; else None.  Read off the conversion run on a small (E, A, 1)
    tensor of element indices (the full-size index tensor of a 7B expert stack would be gigabytes)."""
    revert = revert_conversion()
    if revert is None or len(shape) != 3:
        return None
    n_exp, rows, cols = (int(d) for d in shape)
    try:
        out = revert(model, {key: torch.arange(n_exp * rows, dtype=torch.float64).reshape(n_exp, rows, 1)})
        real = revert(model, {key: torch.empty((n_exp, rows, cols), device="meta")})
    except Exception:  # noqa: BLE001 - a conversion that needs the real trailing size: the general path
        return None
    if set(out) != set(real):
        return None
    ranges, seen = {}, torch.zeros(n_exp * rows, dtype=torch.int64)
    for name, idx in out.items():
        flat = idx.reshape(-1).long()
        a = flat.numel()
        if a == 0 or tuple(idx.shape) != (a, 1) or tuple(real[name].shape) != (a, cols):
            return None
        e, r0 = divmod(int(flat[0]), rows)
        if r0 + a > rows or not torch.equal(flat, torch.arange(int(flat[0]), int(flat[0]) + a)):
            return None
        seen[flat] += 1
        ranges[name] = (e, r0, a)
    return ranges if bool((seen == 1).all()) else None


class StoredLayout:
    """Which stored tensors hold each model parameter whose stored layout differs (``pieces``), and the moves
    between the two layouts. ``model`` is built on the meta device; ``stored`` the checkpoint's tensor names."""

    def __init__(self, model, stored):
        self.model = model
        self.pieces: dict = {}  # model key -> its stored names
        self.owner: dict = {}  # stored name -> model key
        revert = revert_conversion()
        if revert is None:
            return
        self._revert = revert
        stored = set(stored)
        for key, t in model.state_dict().items():
            if key in stored:
                continue
            try:
                out = revert(model, {key: t})
            except Exception:  # noqa: BLE001 - a key the conversion does not touch in this form
                continue
            if set(out) != {key} and set(out) <= stored:
                self.pieces[key] = list(out)
                self.owner.update({name: key for name in out})

    def __getstate__(self):  # (sent to the checkpoint writer's workers: the meta model only where pieces need it)
        return self.__dict__ if self.pieces else {**self.__dict__, "model": None}

    def stored_shapes(self, key: str, shape) -> dict:
        """Stored name -> shape of the pieces of model parameter ``key`` at ``shape``."""
        out = self._revert(self.model, {key: torch.empty(tuple(shape), device="meta")})
        return {name: tuple(t.shape) for name, t in out.items()}

    def assemble(self, key: str, shape, read) -> torch.Tensor:
        """The model parameter ``key`` (of ``shape``) from its stored pieces (``read(name)`` -> tensor)."""
        ranges = row_ranges(self.model, key, shape) if len(shape) == 3 else None
        if ranges is not None:  # per-expert row ranges: each piece copied into place (no index tensors)
            out = None
            for name, (e, r0, a) in ranges.items():
                piece = read(name)
                if out is None:
                    out = torch.empty(tuple(int(d) for d in shape), dtype=piece.dtype)
                if tuple(piece.shape) != (a, int(shape[2])):
                    raise UnsupportedModelError(f"the stored tensor {name!r} does not have the shape transformers' "
                                                f"conversion of {key!r} gives")
                out[e, r0:r0 + a] = piece
            return out
        n = 1
        for d in shape:
            n *= int(d)
        where = self._revert(self.model, {key: torch.arange(n, dtype=torch.float64).reshape(tuple(shape))})
        flat, seen = None, torch.zeros(n, dtype=torch.int64)
        for name, index in where.items():
            piece = read(name)
            if flat is None:
                flat = torch.empty(n, dtype=piece.dtype)
            index = index.reshape(-1).long()
            if tuple(piece.shape) != tuple(where[name].shape):
                raise UnsupportedModelError(f"the stored tensor {name!r} does not have the shape transformers' "
                                            f"conversion of {key!r} gives")
            flat[index] = piece.reshape(-1)
            seen[index] += 1
        if flat is None or not bool((seen == 1).all()):
            raise UnsupportedModelError(f"transformers' conversion of {key!r} to its stored layout does not only move "
                                        "elements: it cannot be streamed")
        return flat.reshape(tuple(shape))

    def split(self, key: str, tensor: torch.Tensor) -> dict:
        """Stored name -> piece of the model parameter ``key`` holding ``tensor``."""
        return {name: t.contiguous() for name, t in self._revert(self.model, {key: tensor}).items()}
