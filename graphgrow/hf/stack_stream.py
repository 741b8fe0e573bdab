"""``graphgrow deepen DIR --block stack --times g``: G_stack on a checkpoint directory, streamed tensor by
tensor like block copy (:func:`graphgrow.hf.stream.deepen_checkpoint`): each layer's tensors written once per
repeat, the config stating g x L layers.  Not function-preserving, so there is nothing to verify: unless
``check`` is "none", the deviation (max rel of the logits against the source on a few token ids) is measured
with both models loaded whole and reported, never raised."""

from __future__ import annotations

import torch

from ..core.report import GrowthReport
from ..errors import InvalidArgumentError, UnsupportedModelError
from .checkpoint import Checkpoint, rewrite_checkpoint
from .deepen import StackCopies, stacked_layers
from .stacks import layer_stacks, stacked_config
from .stream import check_mode, meta_model


class StackStream:
    """What :func:`~.checkpoint.rewrite_checkpoint` writes for G_stack: each source tensor under every key it is
    copied to (the same values: nothing is zeroed in a repeat)."""

    def __init__(self, src: Checkpoint, copies: StackCopies):
        self.src, self.copies = src, copies

    def outputs(self, name):
        return [(new, self.src.shape(name), self.src.dtype(name)) for new, _ in self.copies.targets(name)]

    def compute(self, name, tensor):
        return {new: tensor for new, _ in self.copies.targets(name)}


def stack_checkpoint(path, out_dir, *, after=None, times: int = 2, check="layers", seed: int = 0,
                     allow_pickle: bool = False, overwrite: bool = False, progress=None, workers=None,
                     executor=None) -> dict:
    """The layer stacks of the checkpoint directory ``path`` repeated ``times`` times into ``out_dir``; a
    summary dict (notes, the new config, the report with its measured deviation)."""
    if isinstance(times, bool) or not isinstance(times, int) or times < 2:
        raise InvalidArgumentError(f"--times must be an integer >= 2 (how many times the layer stack is repeated), "
                                   f"not {times!r}")
    mode = check_mode(check)
    src = Checkpoint.open(path, allow_pickle=allow_pickle)
    model = meta_model(src)
    stacks = stacked_layers(layer_stacks(model), after)
    config = stacked_config(model.config, stacks, times)
    copies = StackCopies(stacks, times)
    with torch.device("meta"):
        built = {k: tuple(v.shape) for k, v in type(model)(config).state_dict().items()}
    planned = {new: tuple(src.shape(n)) for n in src.names() for new, _ in copies.targets(n)}
    wrong = sorted(k for k, shape in planned.items() if built.get(k) != shape)
    if wrong:
        raise UnsupportedModelError(f"{type(model).__name__} cannot repeat its layer stack: for {wrong[0]!r} the "
                                    f"repeated config builds {list(built[wrong[0]]) if wrong[0] in built else 'none'}")
    written = rewrite_checkpoint(src, out_dir, config.to_diff_dict(), StackStream(src, copies),
                                 overwrite=overwrite, progress=progress, workers=workers, executor=executor)
    params = sum(v.numel() for v in model.parameters())
    report = GrowthReport([], params_before=params, params_after=params + (times - 1) * sum(
        p.numel() for s in stacks for p in model.get_submodule(s.path).parameters()),
        function_preserving=False, not_preserving="block=stack (G_stack)")
    report.notes.extend(f"config {s.label}: {s.n} -> {s.n * times}; {s.path} repeated {times} times (layer i is "
                        f"also layer i + {s.n})" for s in stacks)
    if mode != "none":
        report.deviation = _deviation(type(model), path, written, model.config.vocab_size, seed)
        report.notes.append(f"NOT function-preserving: logits differ from the original's by max_rel "
                            f"{report.deviation:.3g} (measured with both models loaded whole)")
    return {"notes": report.notes, "config": config, "check": None, "report": report}


def _deviation(cls, path: str, out: str, vocab: int, seed: int) -> float:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = (cls.from_pretrained(p, torch_dtype=torch.float32).eval()(input_ids=ids, use_cache=False).logits
                for p in (path, out))
    return float((a - b).abs().max() / a.abs().max())
