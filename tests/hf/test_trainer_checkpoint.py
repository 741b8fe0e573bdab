"""`graphgrow widen|deepen checkpoint-N`: a Hugging Face Trainer checkpoint grown with its optimizer state, then
resumed by a Trainer: the first loss after resuming is the loss the teacher computed on that batch, training
goes on, and what the Trainer loaded is the grown optimizer state; bad inputs are one line, exit 2, nothing
written."""

import copy
import math
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # (the Trainer needs it)

from graphgrow import optim  # noqa: E402
from graphgrow.cli import main, trainer_dir  # noqa: E402
from graphgrow.hf.trainer_checkpoint import trainer_groups  # noqa: E402

from hf_testing import DENSE_BASE, DENSE_VOCAB  # noqa: E402

SAVED, STEPS = 3, 6  # the checkpoint grown is checkpoint-3; a run goes to step 6


class Tokens(torch.utils.data.Dataset):
    """24 random sequences (6 batches of 4), each its own labels."""

    def __init__(self):
        self.x = torch.randint(3, DENSE_VOCAB, (24, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class Recording(transformers.Trainer):
    """A Trainer that keeps every training loss it computes and the optimizer state it resumed with."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.losses, self.loaded = [], None

    def compute_loss(self, model, inputs, *a, **k):
        out = super().compute_loss(model, inputs, *a, **k)
        self.losses.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.loaded = copy.deepcopy(self.optimizer.state_dict())  # (training updates it in place)


def arguments(out):
    return transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to=[], dataloader_num_workers=0, per_device_train_batch_size=4,
        max_steps=STEPS, save_steps=SAVED, logging_steps=1, learning_rate=1e-2, weight_decay=0.1, seed=0,
        disable_tqdm=True, save_only_model=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The teacher's run: checkpoint-3 and the losses of steps 1-6."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DENSE_BASE))
    out = tmp_path_factory.mktemp("run")
    trainer = Recording(model=model, args=arguments(out), train_dataset=Tokens())
    trainer.train()
    assert len(trainer.losses) == STEPS
    return {"ckpt": out / f"checkpoint-{SAVED}", "losses": trainer.losses}


def batch():
    return torch.randint(3, DENSE_VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))


def eval_loss(path) -> float:
    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return float(model(input_ids=batch(), labels=batch()).loss)


def resume(path, tmp_path):
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    trainer = Recording(model=model, args=arguments(tmp_path / "resumed"), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=str(path))
    return model, trainer


def states_by_name(state: dict, model) -> dict:
    """{parameter name: its state} of an optimizer state_dict numbered by the Trainer's grouping of ``model``."""
    names = {i: n for g, ns in zip(state["param_groups"], trainer_groups(model)) for i, n in zip(g["params"], ns)}
    return {names[i]: s for i, s in state["state"].items()}


def rel(a, b) -> float:
    return abs(a - b) / abs(a)


def check_resumed(run, out, tmp_path, mode):
    """The grown checkpoint's loss is the teacher's; resuming, the first training loss is the teacher run's at
    that step, the next ones are finite, and the Trainer loaded the grown optimizer.pt."""
    figures = {"before": eval_loss(run["ckpt"]), "after": eval_loss(out)}
    assert rel(figures["before"], figures["after"]) <= 1e-5, figures
    model, trainer = resume(out, tmp_path)
    assert len(trainer.losses) == STEPS - SAVED and all(math.isfinite(x) for x in trainer.losses)
    teacher_next = run["losses"][SAVED]  # step SAVED + 1 of the teacher's run: its weights at checkpoint-SAVED
    assert rel(teacher_next, trainer.losses[0]) <= 1e-5, (teacher_next, trainer.losses[0])
    print(f"\n{out.name} ({mode}): eval loss {figures['before']:.7f} -> {figures['after']:.7f} (rel "
          f"{rel(figures['before'], figures['after']):.1e}); resumed step {SAVED + 1}: teacher {teacher_next:.7f}, "
          f"grown {trainer.losses[0]:.7f} (rel {rel(teacher_next, trainer.losses[0]):.1e}); then "
          f"{', '.join(f'{x:.4f}' for x in trainer.losses[1:])}")
    written = torch.load(out / "optimizer.pt", weights_only=True)
    loaded = states_by_name(trainer.loaded, model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert set(loaded) == set(states_by_name(written, model))
    for name, state in states_by_name(written, model).items():
        for key, value in state.items():
            assert torch.equal(loaded[name][key].cpu(), value), (name, key)
            if value.dim():
                assert tuple(value.shape) == shapes[name]
    return figures, loaded


def teacher_state(run):
    model = transformers.LlamaForCausalLM.from_pretrained(run["ckpt"])
    return states_by_name(torch.load(run["ckpt"] / "optimizer.pt", weights_only=True), model)


def same_files(src, out):
    """Everything but the weights and optimizer.pt is the input's, byte for byte."""
    grown = {"model.safetensors", "config.json", "generation_config.json", "optimizer.pt"}
    for name in os.listdir(src):
        if name not in grown:
            assert (src / name).read_bytes() == (out / name).read_bytes(), name


# (copy mode replays the growth as dual does: slow on 2 shared cores, so outside the default run)
@pytest.mark.parametrize("mode", ["dual", pytest.param("copy", marks=pytest.mark.slow), "reset"])
def test_widened_checkpoint_resumes(run, tmp_path, mode):
    out = tmp_path / "wide"
    assert main(["widen", str(run["ckpt"]), "--factor", "2", "-o", str(out), "--optimizer-state", mode]) == 0
    assert transformers.AutoConfig.from_pretrained(out).hidden_size == 2 * DENSE_BASE["hidden_size"]
    same_files(run["ckpt"], out)
    _, loaded = check_resumed(run, out, tmp_path, mode)
    if mode == "reset":
        return
    # the final norm's gains are replicated (each channel twice); its consumer, lm_head, divides its columns, so
    # each copy's gradient is half the original's: dual maps m -> m / 2, v -> v / 4, copy keeps them
    teacher = teacher_state(run)["model.norm.weight"]
    student = loaded["model.norm.weight"]
    scale = {"dual": (0.5, 0.25), "copy": (1.0, 1.0)}[mode]
    for key, s in zip(("exp_avg", "exp_avg_sq"), scale):
        want = torch.sort(torch.cat([teacher[key], teacher[key]]) * s).values
        assert torch.allclose(torch.sort(student[key].cpu()).values, want, rtol=1e-6, atol=0), key
    assert float(student["step"]) == float(teacher["step"]) == SAVED


@pytest.mark.parametrize("mode", ["dual", pytest.param("copy", marks=pytest.mark.slow)])
def test_deepened_checkpoint_resumes(run, tmp_path, mode):
    out = tmp_path / "deep"
    assert main(["deepen", str(run["ckpt"]), "--after", "model.layers.0", "-o", str(out),
                 "--optimizer-state", mode]) == 0
    assert transformers.AutoConfig.from_pretrained(out).num_hidden_layers == DENSE_BASE["num_hidden_layers"] + 1
    same_files(run["ckpt"], out)
    _, loaded = check_resumed(run, out, tmp_path, mode)
    # the copy (model.layers.1) starts fresh where no teacher entry stands behind it: its zeroed projections; under
    # dual the whole copy, whose gradient is 0 at the growth point (behind them); every other parameter has state
    copied = [n for n, _ in transformers.LlamaForCausalLM.from_pretrained(out).named_parameters()
              if n.startswith("model.layers.1.")]
    fresh = copied if mode == "dual" else [n for n in copied if n.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(fresh) == {"dual": 9, "copy": 2}[mode]
    assert set(loaded) == set(dict(transformers.LlamaForCausalLM.from_pretrained(out).named_parameters())) - set(fresh)
    # the layers around the copy are unchanged, and so are their gradients: their state is the teacher's
    teacher = teacher_state(run)
    for old, new in (("model.embed_tokens.weight",) * 2, ("model.layers.0.mlp.up_proj.weight",) * 2,
                     ("model.layers.1.self_attn.q_proj.weight", "model.layers.2.self_attn.q_proj.weight"),
                     ("lm_head.weight",) * 2):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded[new][key].cpu(), teacher[old][key]), (new, key)


def test_cli_modes_are_the_optimizer_modes():
    assert trainer_dir.OPTIMIZER_MODES == optim.MODES


def refused(argv, out, capsys, words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(w in err for w in words), err
    assert not out.exists() and not [n for n in os.listdir(out.parent) if "graphgrow" in n]
    return err


@pytest.fixture
def spare(run, tmp_path):
    path = tmp_path / "checkpoint-3"
    shutil.copytree(run["ckpt"], path)
    return path


class Unsafe:
    """An object a weights_only load refuses to build."""


def test_pickled_optimizer_is_refused(spare, tmp_path, capsys):
    state = torch.load(spare / "optimizer.pt", weights_only=True)
    state["extra"] = Unsafe()
    torch.save(state, spare / "optimizer.pt")
    refused(["widen", str(spare), "--factor", "2", "-o", str(tmp_path / "out")], tmp_path / "out", capsys,
            ["weights_only=True", "Unsafe", "nothing was written"])


def test_mismatched_state_shape_is_refused(spare, tmp_path, capsys):
    state = torch.load(spare / "optimizer.pt", weights_only=True)
    state["state"][1]["exp_avg"] = torch.zeros(5, 5)
    torch.save(state, spare / "optimizer.pt")
    refused(["widen", str(spare), "--factor", "2", "-o", str(tmp_path / "out")], tmp_path / "out", capsys,
            ["'exp_avg' of parameter index 1 (model.layers.0.self_attn.q_proj.weight)", "[5, 5]"])


def test_other_grouping_is_refused(spare, tmp_path, capsys):
    state = torch.load(spare / "optimizer.pt", weights_only=True)
    state["param_groups"] = [{**state["param_groups"][0], "params": [p for g in state["param_groups"]
                                                                      for p in g["params"]]}]
    torch.save(state, spare / "optimizer.pt")
    refused(["deepen", str(spare), "--after", "model.layers.0", "-o", str(tmp_path / "out")], tmp_path / "out",
            capsys, ["Trainer's grouping", "cannot be matched"])


def test_no_optimizer_state(spare, tmp_path, capsys):
    os.remove(spare / "optimizer.pt")
    out = tmp_path / "out"
    refused(["widen", str(spare), "--factor", "2", "-o", str(out)], out, capsys,
            ["no optimizer.pt", "--optimizer-state reset"])
    # asked for explicitly: the model grows alone and the resumed Trainer starts a fresh optimizer
    assert main(["widen", str(spare), "--factor", "2", "-o", str(out), "--optimizer-state", "reset"]) == 0
    assert not (out / "optimizer.pt").exists() and (out / "scheduler.pt").exists()
