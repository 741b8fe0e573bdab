"""Growing a Hugging Face ``Trainer`` checkpoint directory (``checkpoint-500/``: trainer_state.json, the model's
config and weights, optimizer.pt, scheduler.pt, rng_state*.pth, training_args.bin) so that
``Trainer(model=<the grown model>, ...).train(resume_from_checkpoint=OUT)`` continues from it.

The model is loaded whole with ``from_pretrained`` and grown in memory (:func:`graphgrow.widen` /
:func:`graphgrow.deepen`, verified as they verify): the sizes supported are those that fit in memory several
times over (the model and its grown copy, a float64 copy of each while :func:`graphgrow.optim.growth_map` replays
the growth on probes, the optimizer state of both).  The bounded-memory writer of :mod:`.stream` serves plain
model directories, which carry no optimizer state.

optimizer.pt holds parameters by index only.  The Trainer numbers them by its own grouping
(``Trainer.create_optimizer``: the parameters ``Trainer.get_decay_parameter_names`` names, then the others, in
``named_parameters`` order); the same function, transformers' own, names the indices here, every state
tensor's shape is checked against the parameter so named, and anything that does not fit (another grouping,
frozen parameters, a custom optimizer) is refused rather than guessed.  The student's state is numbered by the
same rule on the grown model, which is what the resumed Trainer builds.  The state itself is mapped by
:func:`graphgrow.optim.grow_optimizer_state` (modes reset, copy, dual).

Everything else (scheduler.pt, trainer_state.json, the RNG states, training_args.bin, tokenizer files) is
copied unchanged.  The output is written to a temporary directory beside it and renamed into place: nothing
is written when anything fails, and the input is only read.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile

import torch

from ..errors import GraphGrowError, InvalidArgumentError, ModelFileError, UnsupportedModelError, first_line
from ..optim import MODES, grow_optimizer_state, growth_map
from .checkpoint import Checkpoint, allowed_roots, check_inside, check_output_dir, move_into_place

TRAINER_STATE, OPTIMIZER = "trainer_state.json", "optimizer.pt"

# model weights in any format (the grown model is written anew; a stale copy beside it would load as the model)
_MODEL_WEIGHTS = re.compile(r"(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                            r"(\.index\.json)?")
# optimizer or model state of trainings this module does not grow: DeepSpeed, FSDP, XLA/SageMaker shards, PEFT
_FOREIGN_STATE = re.compile(r"global_step\d+|.*fsdp.*|optimizer\.bin|optimizer_\d+|rank\d+-of-\d+-optimizer\.pt|"
                            r"optimizer\.pt_.*|adapter_model\..*|adapter_config\.json")


class OptimizerFileError(ModelFileError):
    """optimizer.pt cannot be read safely, or its state does not fit the model's parameters."""


def is_trainer_checkpoint(path) -> bool:
    """A directory the Trainer saved: it holds trainer_state.json beside the model."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, TRAINER_STATE))


def _refuse_foreign_state(path: str) -> None:
    for name in sorted(os.listdir(path)):
        if _FOREIGN_STATE.fullmatch(name):
            raise UnsupportedModelError(f"{path} holds {name}, state of a DeepSpeed, FSDP, sharded or adapter "
                                        "training that graphgrow cannot grow (only a plain Trainer checkpoint: model "
                                        "weights and one optimizer.pt)")


def load_optimizer_state(path: str) -> dict:
    """optimizer.pt read with ``torch.load(weights_only=True)``: tensors and plain containers only, no code run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f"it pickles {found.group(1)}" if found else first_line(exc)
        raise OptimizerFileError(f"{path} holds objects torch.load(weights_only=True) refuses to unpickle ({what}); "
                                  "graphgrow never runs pickled code, so nothing was written") from None
    except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged file
        raise OptimizerFileError(f"{path} is not a loadable optimizer state: {first_line(exc)}") from None
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if (not isinstance(state.get("state") if isinstance(state, dict) else None, dict) or not isinstance(groups, list)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        raise OptimizerFileError(f"{path} is not a torch optimizer state_dict (a dict with 'state' and "
                                  "'param_groups', each group listing its 'params')")
    return state


def trainer_groups(model) -> list:
    """The parameter names of each group ``Trainer.create_optimizer`` builds for ``model`` (weight decay, then
    none), in the order the optimizer numbers them; the rule is transformers' own
    ``Trainer.get_decay_parameter_names`` (it reads only the model, so it runs on a Trainer not set up)."""
    import transformers

    try:
        decay = set(transformers.Trainer.get_decay_parameter_names(object.__new__(transformers.Trainer), model))
    except Exception as exc:  # noqa: BLE001 - a future version may read the Trainer's own fields
        raise UnsupportedModelError(f"transformers {transformers.__version__}'s Trainer.get_decay_parameter_names "
                                    f"cannot be called outside a Trainer ({first_line(exc)})") from None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n in names if n in decay], [n for n in names if n not in decay]]


def _group_sizes(state: dict) -> list:
    return [len(g["params"]) for g in state["param_groups"]]


def name_indices(state: dict, groups: list, shapes: dict, where: str) -> dict:
    """{optimizer index: parameter name}, matched group by group, with every state tensor's shape checked
    against its parameter; refused in one sentence where the optimizer was grouped otherwise."""
    sizes, expected = _group_sizes(state), [len(g) for g in groups]
    if sizes != expected:
        raise OptimizerFileError(f"{where}'s parameter groups hold {sizes} parameters and the Trainer's grouping of "
                                  f"the model (weight decay, then none) gives {expected}: the optimizer was not built "
                                  "by Trainer.create_optimizer over these parameters (a custom optimizer or frozen "
                                  "parameters), so its indices cannot be matched to names")
    names: dict = {}
    for group, group_names in zip(state["param_groups"], groups):
        for index, name in zip(group["params"], group_names):
            if index in names:
                raise OptimizerFileError(f"{where} lists parameter index {index} in two groups")
            names[index] = name
    for index, entry in state["state"].items():
        if index not in names:
            raise OptimizerFileError(f"{where} holds state for parameter index {index}, which no group lists")
        if not isinstance(entry, dict):
            raise OptimizerFileError(f"{where}: the state of parameter index {index} is not a dict")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[names[index]]:
                raise OptimizerFileError(f"{where}: state {key!r} of parameter index {index} ({names[index]}) has "
                                          f"shape {list(value.shape)}, the parameter {list(shapes[names[index]])}: "
                                          "the indices do not match the Trainer's grouping of this model, or the "
                                          "optimizer keeps state not shaped like its parameters")
    return names


def _shapes(model) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def grow_state(state: dict, teacher, student, mode: str, where: str) -> dict:
    """The student's optimizer state_dict: the teacher's indices named by the Trainer's grouping, mapped by
    :func:`graphgrow.optim.grow_optimizer_state` along the recorded growth, checked against the student."""
    teacher_groups, student_groups = trainer_groups(teacher), trainer_groups(student)
    name_indices(state, teacher_groups, _shapes(teacher), where)
    # reset: no state over the student's groups, their hyperparameters kept (the resumed Trainer still loads
    # scheduler.pt, which it loads only beside an optimizer.pt), and no map (growth_map replays the growth 4 times)
    gmap = growth_map(teacher, student) if mode != "reset" else None
    grown = grow_optimizer_state(state, teacher_groups, student_groups, gmap, mode=mode)
    # the resumed Trainer will number the student by the same rule: what it loads must fit it exactly
    name_indices(grown, student_groups, _shapes(student), f"the grown {OPTIMIZER}")
    return grown


def _example_inputs(model, seed: int):
    """Token ids (or pixels) for the growth's capture and check, drawn from the vocabulary."""
    from .stream import meta_inputs

    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(model.config, "vocab_size", None) or 2

    def real(t):
        if t.dtype in (torch.long, torch.int):
            return torch.randint(0, vocab, t.shape, generator=gen, dtype=t.dtype)
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    inputs = meta_inputs(model)
    names = getattr(inputs, "names", ())
    return dict(zip(names, map(real, inputs))) if names else tuple(map(real, inputs))


@contextlib.contextmanager
def _quiet():
    """transformers' progress bars and warnings while loading and saving would be more lines on stderr."""
    import transformers

    logging = transformers.utils.logging
    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _load_model(src: Checkpoint):
    from .stream import model_class

    cls, config = model_class(src)
    try:
        with _quiet():
            return cls.from_pretrained(src.path, config=config, dtype="auto").eval()
    except GraphGrowError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad directory
        raise ModelFileError(f"transformers cannot load {src.path} as {cls.__name__}: {first_line(exc)}") from None


def _copied_files(src: Checkpoint, written: set) -> list:
    """Paths (relative) copied unchanged: all but the model's weights, optimizer.pt and what save_pretrained wrote."""
    roots, found = allowed_roots(src.path), []
    for folder, dirs, files in os.walk(src.path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            rel = os.path.relpath(os.path.join(folder, file), src.path)
            if rel in written or rel == OPTIMIZER or _MODEL_WEIGHTS.fullmatch(rel):
                continue
            check_inside(src.path, rel, roots)
            found.append(rel)
    return found


def _write(src: Checkpoint, out: str, student, state: dict | None) -> list:
    """The grown checkpoint written beside ``out`` and renamed into place; returns the files copied."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.graphgrow-", dir=os.path.dirname(out))
    try:
        with _quiet():
            student.save_pretrained(tmp)
        if state is not None:
            torch.save(state, os.path.join(tmp, OPTIMIZER))
        written = {os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs}
        copied = _copied_files(src, written)
        for rel in copied:
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copy2(os.path.join(src.path, rel), os.path.join(tmp, rel))
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return copied


def grow_trainer_checkpoint(path, out_dir, grow, *, optimizer_state: str = "dual", allow_pickle: bool = False,
                            overwrite: bool = False, seed: int = 0, progress=None) -> dict:
    """Grow the Trainer checkpoint ``path`` into ``out_dir`` with ``grow(model, example_inputs)`` (a
    :func:`graphgrow.widen` / :func:`graphgrow.deepen` call); returns a summary dict (the grown model's report,
    config, notes, the optimizer's figures).  ``optimizer_state``: how the optimizer state follows (reset,
    copy, dual: :mod:`graphgrow.optim`); without optimizer.pt only "reset" is accepted, and no optimizer.pt
    is written (the resumed Trainer starts a fresh optimizer)."""
    say = progress or (lambda msg: None)
    if optimizer_state not in MODES:
        raise InvalidArgumentError(f"optimizer_state must be one of {MODES}, not {optimizer_state!r}")
    path = os.fspath(path)
    if not is_trainer_checkpoint(path):
        raise InvalidArgumentError(f"{path} is not a Trainer checkpoint directory (it holds no {TRAINER_STATE})")
    src = Checkpoint.open(path, allow_pickle=allow_pickle)
    out = check_output_dir(src, out_dir, overwrite)
    _refuse_foreign_state(path)
    opt_path, state, notes = os.path.join(path, OPTIMIZER), None, []
    if os.path.isfile(opt_path):
        state = load_optimizer_state(opt_path)
    elif optimizer_state != "reset":
        raise OptimizerFileError(f"{path} holds no {OPTIMIZER}, so there is no optimizer state to grow; pass "
                                  "--optimizer-state reset (optimizer_state='reset') to grow the model alone and let "
                                  "the resumed Trainer start a fresh optimizer")
    else:
        notes.append(f"no {OPTIMIZER}: none written, so the resumed Trainer starts a fresh optimizer and learning-rate "
                     "schedule (it loads scheduler.pt only beside an optimizer.pt)")
    say(f"loading {path} ...")
    teacher = _load_model(src)
    if state is not None:  # (checked before the growth: a state that does not fit is refused at once)
        name_indices(state, trainer_groups(teacher), _shapes(teacher), opt_path)
    say("growing the model ...")
    student = grow(teacher, _example_inputs(teacher, seed))
    figures = None
    if state is not None:
        say(f"growing {OPTIMIZER} ({optimizer_state}) ...")
        state = grow_state(state, teacher, student, optimizer_state, opt_path)
        figures = {"mode": optimizer_state, "groups": _group_sizes(state), "parameters_with_state": len(state["state"])}
        notes.append(f"{OPTIMIZER}: {figures['parameters_with_state']} parameters' state grown ({optimizer_state}), "
                     f"groups of {figures['groups']} parameters")
    say(f"writing {out} ...")
    copied = _write(src, out, student, state)
    notes.append(f"copied unchanged: {', '.join(copied) if copied else 'nothing'}")
    report = getattr(student, "graphgrow_report", None)
    return {"report": report, "config": student.config, "notes": notes, "optimizer": figures}


def widen_trainer_checkpoint(path, out_dir, factor=1.41, *, widths=None, only=None, exclude=None, divisor: int = 1,
                             fill: bool = True, strict: bool = False, check: bool = True, **kwargs) -> dict:
    """:func:`graphgrow.widen` (the same options) of the Trainer checkpoint ``path``; ``kwargs``: those of
    :func:`grow_trainer_checkpoint`."""
    from .widen import widen_pretrained

    seed = kwargs.get("seed", 0)

    def grow(model, inputs):  # (widen_pretrained records its call on the result, for optim.growth_map)
        return widen_pretrained(model, factor, example_inputs=inputs, widths=widths, only=only, exclude=exclude,
                     divisor=divisor, fill=fill, strict=strict, seed=seed, verify="torch" if check else "none")

    return grow_trainer_checkpoint(path, out_dir, grow, **kwargs)


def deepen_trainer_checkpoint(path, out_dir, *, after, block: str = "copy", check: bool = True, **kwargs) -> dict:
    """:func:`graphgrow.deepen` (block expansion) of the Trainer checkpoint ``path``; ``kwargs``: those of
    :func:`grow_trainer_checkpoint`."""
    from ..core.report import record_growth
    from .deepen import deepen_pretrained

    seed = kwargs.get("seed", 0)

    def grow(model, inputs):
        result = deepen_pretrained(model, after=after, block=block, example_inputs=inputs, seed=seed,
                                   verify="torch" if check else "none")
        return record_growth(result, deepen_pretrained, after=after, block=block, example_inputs=inputs, seed=seed)

    return grow_trainer_checkpoint(path, out_dir, grow, **kwargs)
