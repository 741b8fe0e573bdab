"""Optimizer state follows the growth (graphgrow.optim): the dual map's defining property (the grown model's
gradient at the growth point is the dual map of the teacher's), and reset / copy / dual with Adam, AdamW and
SGD momentum on plain models (CNN, the zoo LM)."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import graphgrow
from graphgrow.errors import InvalidArgumentError
from graphgrow.models.transformer import tiny_lm
from graphgrow.optim import OptimizerStateError, grow_optimizer, growth_map


class ResBlock(nn.Module):  # pre-activation: the branch ends with a conv
    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block = ResBlock(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(torch.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


def _trained_bn(model):
    with torch.no_grad():  # statistics and gains away from their initial values
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.double().eval()


def _grads(model, loss):
    params = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss(model), list(params.values()))))


def dual_error(teacher, student, loss) -> tuple:
    """(max rel error of the dual map's prediction over mapped, used entries; names of parameters with no
    prediction (no teacher entry, or an unused copy))."""
    gmap = growth_map(teacher, student)
    predicted = gmap.dual_gradient(_grads(teacher, loss))
    worst, none = 0.0, []
    for name, g in _grads(student, loss).items():
        g, p = g.numpy(), predicted[name]
        ok = ~np.isnan(p)
        if not ok.any():
            none.append(name)
            continue
        worst = max(worst, float(np.abs(g[ok] - p[ok]).max() / max(np.abs(g).max(), 1e-300)))
    return worst, none, gmap


def _cnn_loss(x, y):
    return lambda m: ((m(x) - y) ** 2).sum()


def _lm_loss(ids):
    return lambda m: nn.functional.cross_entropy(m(ids)[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return _trained_bn(SmallCNN()), torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return tiny_lm(layers=2).double().eval(), torch.randint(0, 256, (2, 12))


def test_dual_map_cnn_widen_replication(cnn):
    model, x, y = cnn
    student = graphgrow.widen(model, 2, example_inputs=(x,))
    worst, none, _ = dual_error(model, student, _cnn_loss(x, y))
    assert worst <= 1e-10 and none == []
    student = graphgrow.widen(model, 1.5, example_inputs=(x,))  # uneven copies: still every copy alike
    worst, none, _ = dual_error(model, student, _cnn_loss(x, y))
    assert worst <= 1e-10 and none == []


def test_dual_map_cnn_block_copy(cnn):
    model, x, y = cnn
    student = graphgrow.deepen(model, after="block", block="copy", example_inputs=(x,))
    worst, none, gmap = dual_error(model, student, _cnn_loss(x, y))
    assert worst <= 1e-10
    # the copy's zeroed projection (conv2) has no teacher entry; the rest of the copy copies the
    # block but receives no gradient at the growth point: both start fresh under "dual"
    copied = {n for n in dict(student.named_parameters()) if n.startswith("block_copy.")}
    assert set(none) == copied
    assert {n for n in copied if gmap.maps[n].mapped.any()} == gmap.unused


def test_dual_map_zoo_lm(lm):
    model, ids = lm
    for factor in (2, 1.5):  # replication (GQA groups copied whole); fill + rescale
        student = graphgrow.widen(model, factor, example_inputs=(ids,))
        worst, none, gmap = dual_error(model, student, _lm_loss(ids))
        assert worst <= 1e-10 and none == [], factor
    # fill + rescale: the filled channels have no single teacher entry
    filled = gmap.maps["embed.weight"]
    assert 0.6 < filled.mapped.mean() < 0.7
    student = graphgrow.deepen(model, after=r"layers\.1", block="copy", example_inputs=(ids,))
    worst, none, gmap = dual_error(model, student, _lm_loss(ids))
    assert worst <= 1e-10 and none and all(n.startswith("layers_1_copy.") for n in none)


def _train(model, opt, loss, steps=3):
    for _ in range(steps):
        opt.zero_grad()
        loss(model).backward()
        opt.step()


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_modes(lm, name):
    model, ids = lm
    import copy

    model = copy.deepcopy(model).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = OPTIMIZERS[name]([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}])
    _train(model, opt, _lm_loss(ids))
    student = graphgrow.widen(model, 2, example_inputs=(ids,))
    gmap = growth_map(model, student)
    names = {id(p): n for n, p in model.named_parameters()}
    teacher_state = {names[id(p)]: s for p, s in opt.state.items()}
    key = "momentum_buffer" if name == "sgd" else "exp_avg"
    flat = gmap.flatten({n: s[key] for n, s in teacher_state.items()})
    for mode in ("reset", "copy", "dual"):
        grown_model = copy.deepcopy(student)  # (trained on below)
        grown = grow_optimizer(opt, model, grown_model, mode)
        assert type(grown) is type(opt) and len(grown.param_groups) == 2
        # groups kept by name: a grown matrix decays, a grown gain does not
        by_name = dict(grown_model.named_parameters())
        wd = {n: g["weight_decay"] for g in grown.param_groups for n, p in by_name.items()
              if any(p is q for q in g["params"])}
        assert set(wd) == set(by_name)
        assert all((wd[n] == 0.0) == (by_name[n].ndim < 2) for n in by_name)
        state = {n: grown.state[p] for n, p in by_name.items() if p in grown.state}
        if mode == "reset":
            assert state == {}
            continue
        assert set(state) == set(by_name)
        for n, s in state.items():
            m = gmap.maps[n]
            f = m.coef[m.mapped] if mode == "copy" else m.coef[m.mapped] / gmap.gram[m.sources()]
            want = f * flat[m.sources()]
            assert np.allclose(s[key].numpy().reshape(-1)[m.mapped], want, rtol=1e-12, atol=0)
            if name != "sgd":
                assert float(s["step"]) == 3.0
                sq = gmap.flatten({t: st["exp_avg_sq"] for t, st in teacher_state.items()})
                f2 = f if mode == "copy" else f * f
                assert np.allclose(s["exp_avg_sq"].numpy().reshape(-1)[m.mapped], f2 * sq[m.sources()], rtol=1e-12)
        _train(grown_model, grown, _lm_loss(ids), steps=2)  # and it trains on
        assert all(torch.isfinite(p).all() for p in grown_model.parameters())


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_dual_state_stays_dual_through_a_step(lm, name):
    """One more step on the same batch: the grown optimizer's state is the dual map of the teacher's state after
    that step (the step adds the grown gradient, itself the dual map of the teacher's): the state describes the
    grown model's gradients as it described the teacher's.  The copy map does not have this property."""
    import copy

    model, ids = lm
    model = copy.deepcopy(model)
    opt = OPTIMIZERS[name](model.parameters())
    _train(model, opt, _lm_loss(ids), steps=3)
    student = graphgrow.widen(model, 2, example_inputs=(ids,))
    gmap = growth_map(model, student)
    key = "momentum_buffer" if name == "sgd" else "exp_avg"
    errors = {}
    for mode in ("copy", "dual"):
        s = copy.deepcopy(student)
        grown = grow_optimizer(opt, model, s, mode)
        t = copy.deepcopy(model)
        t_opt = OPTIMIZERS[name](t.parameters())
        t_opt.load_state_dict(opt.state_dict())
        _train(t, t_opt, _lm_loss(ids), steps=1)
        _train(s, grown, _lm_loss(ids), steps=1)
        names = {id(p): n for n, p in t.named_parameters()}
        flat = gmap.flatten({names[id(p)]: st[key] for p, st in t_opt.state.items()})
        worst = 0.0
        for n, p in s.named_parameters():
            m = gmap.maps[n]
            want = m.coef[m.mapped] / gmap.gram[m.sources()] * flat[m.sources()]
            got = grown.state[p][key].numpy().reshape(-1)[m.mapped]
            worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        errors[mode] = worst
    assert errors["dual"] <= 1e-10 and errors["copy"] > 1e-2


def test_refusals(lm):
    import copy

    model, ids = lm
    model = copy.deepcopy(model)
    student = graphgrow.widen(model, 2, example_inputs=(ids,))
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(InvalidArgumentError, match="one of"):
        grow_optimizer(opt, model, student, "both")
    plain = tiny_lm(layers=2, dim=128).double()
    with pytest.raises(InvalidArgumentError, match="no record of its growth"):
        grow_optimizer(opt, model, plain, "dual")
    other = tiny_lm(layers=2).double()
    with pytest.raises(OptimizerStateError, match="does not reproduce"):
        growth_map(other, student)
    foreign = torch.optim.Adam([nn.Parameter(torch.zeros(3))])
    with pytest.raises(InvalidArgumentError, match="not a parameter of the teacher"):
        grow_optimizer(foreign, model, student, "dual")
    ada = torch.optim.Adadelta(model.parameters())
    _train(model, ada, _lm_loss(ids), steps=1)
    student = graphgrow.widen(model, 2, example_inputs=(ids,))
    with pytest.raises(OptimizerStateError, match="'acc_delta' has no known dual map"):
        grow_optimizer(ada, model, student, "dual")
    assert len(grow_optimizer(ada, model, student, "copy").state) == len(list(student.parameters()))
    # a saved state whose tensor does not match its parameter
    from graphgrow.optim import grow_optimizer_state

    sd = ada.state_dict()
    sd["state"][0]["square_avg"] = torch.zeros(3)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(OptimizerStateError, match="'square_avg' of 'embed.weight' has shape \\[3\\]"):
        grow_optimizer_state(sd, [names], [names], growth_map(model, student), "copy")


def test_entries_without_a_teacher_entry_start_fresh(lm, cnn):
    """Filled channels (fill + rescale) get zero state with the parameter's step; an identity block's parameters
    get no state (the optimizer starts them at step 0)."""
    import copy

    model, ids = lm
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, opt, _lm_loss(ids), steps=2)
    student = graphgrow.widen(model, 1.5, example_inputs=(ids,))
    for mode in ("copy", "dual"):
        grown = grow_optimizer(opt, model, student, mode)
        gmap = growth_map(model, student)
        p = dict(student.named_parameters())["embed.weight"]
        m = gmap.maps["embed.weight"]
        avg = grown.state[p]["exp_avg"].numpy().reshape(-1)
        assert (~m.mapped).sum() > 0 and not avg[~m.mapped].any() and avg[m.mapped].any()
        assert float(grown.state[p]["step"]) == 2.0
    cnn_model, x, y = cnn
    cnn_model = copy.deepcopy(cnn_model)
    opt = torch.optim.SGD(cnn_model.parameters(), lr=1e-3, momentum=0.9)
    _train(cnn_model, opt, _cnn_loss(x, y), steps=2)
    deep = graphgrow.deepen(cnn_model, after="block", block="conv-bn", example_inputs=(x,))
    grown = grow_optimizer(opt, cnn_model, deep, "dual")
    new = [n for n in dict(deep.named_parameters()) if n not in dict(cnn_model.named_parameters())]
    params = dict(deep.named_parameters())
    assert new and all(params[n] not in grown.state for n in new)
    assert all(params[n] in grown.state for n in dict(cnn_model.named_parameters()))
    assert sum(len(g["params"]) for g in grown.param_groups) == len(params)
