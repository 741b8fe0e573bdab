"""Forward functions torch.export can capture, put in place of ones it cannot for the time of a capture.

A mixture of experts written as a loop over the experts a batch happens to hit (``for e in
mask.nonzero()``) has a data-dependent trip count: torch.export stops at the guard on its length
(``Eq(u0, 0)``).  transformers routes most families' experts through its exportable implementations
(``use_experts_implementation``); the ones it does not (DBRX's) are captured here as the same sum over every
expert, each token weighted by its routing weight to that expert (0 where it is not routed there).  Only the
capture reads the substitute: the grown model is the family's own code, verified against the original.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def _dbrx_experts(self, hidden_states, top_k_index, top_k_weights):
    """DbrxExperts.forward as a dense sum over the experts (same function, no data-dependent shapes)."""
    batch = hidden_states.shape[0]
    x = hidden_states.reshape(-1, self.hidden_size)
    split = (-1, self.ffn_hidden_size, self.hidden_size)
    w1, v1, w2 = (p.view(split) for p in (self.mlp.w1, self.mlp.v1, self.mlp.w2))
    out = None  # the terms summed directly: no zeros buffer for the widening analysis to read
    for e in range(self.num_experts):
        weight = (top_k_weights * (top_k_index == e)).sum(-1, keepdim=True)
        # DbrxExpertGLU.forward with x @ w1[e].T written F.linear(x, w1[e]): each expert's slice of the viewed
        # parameter applied as a weight, as the analysis reads experts applied one at a time
        inner = self.mlp.activation_fn(F.linear(x, w1[e])) * F.linear(x, v1[e])
        term = torch.matmul(inner, w2[e]) * weight
        out = term if out is None else out + term
    return out.view(batch, -1, self.hidden_size)


def _is_dbrx_experts(m) -> bool:
    mlp = getattr(m, "mlp", None)
    return type(m).__name__ == "DbrxExperts" and all(isinstance(getattr(mlp, w, None), torch.nn.Parameter)
                                                     for w in ("w1", "v1", "w2"))


# (test on a module, its exportable forward)
SUBSTITUTES = ((_is_dbrx_experts, _dbrx_experts),)


@contextlib.contextmanager
def exportable(model: torch.nn.Module):
    """Within the block, the modules of ``model`` listed in :data:`SUBSTITUTES` run their exportable forward."""
    patched = []
    for m in model.modules():
        for test, forward in SUBSTITUTES:
            if test(m) and "forward" not in vars(m):
                m.forward = forward.__get__(m)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
