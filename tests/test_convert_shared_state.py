"""convert over state a model uses in more than one place, or writes while it runs: the converted model stays the
original's function after convert and after an in-place edit (float64, against the original given the same edit).

Each case was found by bench/random_sweep.py on generated home-made models:
  * a conv weight tied between two convs (`self.b.weight = self.a.weight`): each fused layer kept a copy;
  * a conv called twice on the same input, once inside a sum of branches the merge pass took over and once
    outside it: the merged conv was a snapshot of weights the block still used live;
  * a value written in place between a branch and the sum it feeds (`z = b(y); y.clamp_(...); z + y`): the merged
    conv read the written value for both terms;
  * a BatchNorm its owner keeps in training mode inside an eval-mode model (test-time adaptation): convert
    refused the whole model.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import FusedConv2d  # noqa: E402

TOL = 1e-9


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _prepare(model: nn.Module) -> nn.Module:
    model = model.double().eval()
    randomize_bn(model, seed=3)
    return model


def _scale_(model: nn.Module, name: str) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].mul_(1.5)


class TiedWeight(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b, self.bn_b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.bn_b(self.b(F.relu(self.bn_a(self.a(x)))))


class TiedWithPlainConv(TiedWeight):
    """The tie between a conv that is fused and one that is not (its output read twice: no BN fold)."""

    def forward(self, x):
        y = self.a(x)
        return self.bn_b(self.b(F.relu(self.bn_a(y)))) + y


@pytest.mark.parametrize("cls", [TiedWeight, TiedWithPlainConv])
@pytest.mark.parametrize("flatten", [True, False])
def test_a_tied_conv_weight_stays_one_tensor(cls, flatten):
    model = _prepare(cls())
    out = fusedconv.convert(model, flatten=flatten)
    assert any(isinstance(m, FusedConv2d) for m in out.modules())
    assert out.a.weight is out.b.weight
    x = _x(2, 4, 8, 8)
    with torch.no_grad():
        assert max_rel_error(out(x), model(x)) < TOL
        _scale_(model, "a.weight")
        _scale_(out, "a.weight")
        assert max_rel_error(out(x), model(x)) < TOL


def test_a_tie_convert_cannot_keep_warns():
    """A BN before a conv folds into a new weight for that conv: the tie with the other conv cannot follow."""

    class BnBeforeTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1, bias=False))
            self.other = nn.Conv2d(4, 4, 1, bias=False)
            self.other.weight = self.pre[1].weight

        def forward(self, x):
            return self.pre(x) + self.other(x)

    model = _prepare(BnBeforeTied())
    with pytest.warns(UserWarning, match=r"fusedconv: other\.weight, pre\.1\.weight were one tensor"):
        out, report = fusedconv.convert(model, return_report=True)
    assert any("were one tensor" in n for n in report.notes)
    x = _x(2, 4, 6, 6)
    with torch.no_grad():
        assert max_rel_error(out(x), model(x)) < TOL


class CalledTwice(nn.Module):
    """conv(bn(x)) twice: once alone, once inside `* relu6(... + 3)`; the merge takes one call only."""

    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 6, 1, bias=False)

    def forward(self, x):
        return self.conv(self.bn(x)) * F.relu6(self.conv(self.bn(x)) + 3) / 6


class WrittenBetween(nn.Module):
    """`z + y` where y is written in place after z was computed from it."""

    def __init__(self, c=3):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.a(x)
        z = self.b(y)
        y.clamp_(max=0.5)
        return z + y


@pytest.mark.parametrize("entry", ["convert", "reparameterize"])
def test_a_module_called_outside_its_merged_sum_is_not_merged(entry):
    model = _prepare(CalledTwice())
    out, report = getattr(fusedconv, entry)(model, return_report=True)
    assert not any(r.kind == "reparam" and r.status == "fused" for r in report.rows)
    assert any(r.kind == "reparam" and "also called outside the merged sum" in r.detail for r in report.rows)
    x = _x(2, 3, 5, 5)
    with torch.no_grad():
        assert max_rel_error(out(x), model(x)) < TOL
        for name in ("conv.weight", "bn.weight"):
            _scale_(model, name)
            _scale_(out, name)
            assert max_rel_error(out(x), model(x)) < TOL


class WrittenBetweenLayers(nn.Module):
    """The same with the layers as attributes (the chain pass, not the Sequential one), the write into the
    residual, a view of it or by an in-place activation module; the residual also the conv's input or not."""

    def __init__(self, write: str, residual_only: bool, c=3):
        super().__init__()
        self.residual_only = residual_only  # the written value is the residual only, not the conv's input too
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.inplace_act = nn.ReLU6(inplace=True)
        self.write = write

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        z = self.bn2(self.conv2(x if self.residual_only else y))
        if self.write == "view":
            y[:, :1].mul_(0.5)
        elif self.write == "module":
            self.inplace_act(y)
        else:
            y.sub_(0.25)
        return z + y


@pytest.mark.parametrize("entry", ["convert", "reparameterize"])
def test_an_in_place_write_between_branches_and_their_sum_stops_the_merge(entry):
    model = _prepare(WrittenBetween())
    out, report = getattr(fusedconv, entry)(model, return_report=True)
    assert any(r.kind == "reparam" and "clamp_ writes a tensor in place" in r.detail for r in report.rows)
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        assert max_rel_error(out(x), model(x)) < TOL


@pytest.mark.parametrize("write", ["plain", "view", "module"])
@pytest.mark.parametrize("residual_only", [True, False])
@pytest.mark.parametrize("flatten", [True, False])
def test_a_residual_written_before_its_add_is_not_fused(write, residual_only, flatten):
    model = _prepare(WrittenBetweenLayers(write, residual_only))
    out, report = fusedconv.convert(model, return_report=True, flatten=flatten)
    assert not any(r.status == "fused" and "add" in r.detail for r in report.rows)
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        assert max_rel_error(out(x), model(x)) < TOL
    model32 = model.float()
    out32 = fusedconv.convert(model32, flatten=flatten)
    with torch.no_grad():
        assert max_rel_error(out32(x.float()), model32(x.float())) < 1e-5


class AdaptingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.adapt = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return self.adapt(self.stem(x))


def test_a_batchnorm_kept_in_training_mode_is_left_as_it_is():
    """Test-time adaptation: model.eval(), then its BNs back in training mode; they normalize by the batch and
    update their statistics, in the converted model as in the original."""
    model = _prepare(AdaptingNet())
    model.adapt[1].train()
    out, report = fusedconv.convert(model, return_report=True)
    assert isinstance(out.stem[0], FusedConv2d)
    assert type(out.adapt[1]) is nn.BatchNorm2d and out.adapt[1].training
    x = _x(4, 3, 6, 6)
    with torch.no_grad():
        for _ in range(2):
            assert max_rel_error(out(x), model(x)) < TOL
    assert torch.allclose(out.adapt[1].running_mean, model.adapt[1].running_mean, rtol=0, atol=1e-12)
    assert torch.equal(out.adapt[1].num_batches_tracked, model.adapt[1].num_batches_tracked)


def test_a_model_left_in_training_mode_is_still_refused():
    model = _prepare(AdaptingNet()).train()
    with pytest.raises(RuntimeError, match=r"model: expected a model in eval mode \(call model.eval\(\) first\)"):
        fusedconv.convert(model)
    with pytest.raises(RuntimeError, match=r"model: expected a model in eval mode"):
        fusedconv.reparameterize(model)


def test_a_block_with_a_training_batchnorm_is_not_handed_to_its_own_reparameterize():
    """A block fx cannot trace goes to its own `reparameterize()`, which would fold a BN that normalizes by
    the batch: not while one of its modules is in training mode."""

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)
            self.called = False

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: not traceable
                x = x * 1.0
            return self.bn(self.conv(x))

        def reparameterize(self):
            self.called = True
            return self

    model = _prepare(Untraceable())
    model.bn.train()
    out, report = fusedconv.reparameterize(model, return_report=True)
    assert not out.called
    assert any("is in training mode" in r.detail for r in report.rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = _x(2, 3, 5, 5)
        ref = copy.deepcopy(model)
        with torch.no_grad():
            assert max_rel_error(out(x), ref(x)) < TOL


class LooksInto(nn.Module):
    """A forward reading into its children besides calling them; `boost` (a flag) sends an edited model to a
    guarded block's fallback, which runs this forward over the converted children."""

    def __init__(self, read: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn, self.act = nn.BatchNorm2d(4), nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
        self.read, self.boost = read, False

    def forward(self, x):
        y = self.body(self.act(self.bn(self.conv(x))))
        if self.read == "eps":
            y = y + self.bn.eps * 1000.0
        elif self.read == "isinstance":
            y = y + float(isinstance(self.bn, nn.BatchNorm2d))
        elif self.read == "bias":
            y = y + self.conv.bias.view(1, -1, 1, 1)
        elif self.read == "class":
            y = y + float(self.act.__class__ is nn.ReLU)
        elif self.read == "nested":
            y = y + self.body[1].running_mean.view(1, -1, 1, 1)
        elif self.read == "hasattr":
            y = y + float(hasattr(self.body[1], "running_var"))
        if self.boost:
            y = y * 1.5
        return y


@pytest.mark.parametrize("read", ["eps", "isinstance", "bias", "class", "nested", "hasattr"])
@pytest.mark.parametrize("flatten", [True, False])
def test_modules_the_forward_looks_into_keep_their_chains(read, flatten):
    model = _prepare(LooksInto(read))
    out, report = fusedconv.convert(model, return_report=True, flatten=flatten)
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        assert max_rel_error(out(x), model(x)) < TOL
        out.boost = model.boost = True  # (a guard miss: the block's own forward over its converted children)
        assert max_rel_error(out(x), model(x)) < TOL
    looked = {"eps": "bn", "isinstance": "bn", "bias": "conv", "class": "act", "nested": "body.1",
              "hasattr": "body.1"}[read]
    assert type(out.get_submodule(looked)) is type(model.get_submodule(looked))


def test_the_bytecode_scan_names_what_the_forward_reads():
    """Every branch of the forward counts (the scan reads code, not one call); the first read of a module names it."""
    from fusedconv.graph.inspected import inspected_modules

    model = LooksInto("eps")
    found = {path: inspected_modules(model).get(id(m)) for path, m in model.named_modules() if path}
    # (a direct child's parameter, `self.conv.bias`, is a get_attr of the graph: the passes keep the conv for it)
    assert found == {"conv": None, "bn": "LooksInto.forward reads self.bn.eps",
                     "act": "LooksInto.forward reads self.act.__class__", "body": None, "body.0": None,
                     "body.1": "LooksInto.forward reads self.body.1.running_mean", "body.2": None}

    class Tests(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.ReLU(), nn.ModuleDict({"k": nn.Identity()})

        def forward(self, x):
            return x if isinstance(self.b["k"], nn.Identity) else self.a(x)

    t = Tests()
    assert inspected_modules(t) == {id(t.b["k"]): "Tests.forward calls isinstance() on self.b.k"}
    assert inspected_modules(TiedWeight()) == {}  # calls only


class ReadsItsConvWeight(nn.Module):
    """The conv stays beside its fused module (the forward reads its weight): the two must share that weight, and
    an edit of the conv's bias (folded into the shift) must reach the call."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) + 0.1 * self.conv.weight.mean()


@pytest.mark.parametrize("name", ["conv.weight", "conv.bias"])
@pytest.mark.parametrize("flatten", [True, False])
def test_a_conv_kept_beside_its_fused_module_follows_edits(name, flatten):
    model = _prepare(ReadsItsConvWeight())
    out = fusedconv.convert(model, flatten=flatten)
    fused = [m for m in out.modules() if isinstance(m, FusedConv2d)]
    assert len(fused) == 1 and fused[0].weight is out.conv.weight
    x = _x(2, 3, 6, 6)
    with torch.no_grad():
        assert max_rel_error(out(x), model(x)) < TOL
        _scale_(model, name)
        _scale_(out, name)
        assert max_rel_error(out(x), model(x)) < TOL
