"""Branches on the inputs' shapes in the whole-model flat forward (fusedconv/graph/flat_shape_tests.py), and dict /
list subclasses the forward builds: the model is flattened, the guard checks every call's shapes (a call the traced
branch does not cover runs the model's own forward, raising its own error), and an OrderedDict comes back an
OrderedDict. Float64, against the unconverted model called the same way. (Plain lists and dicts read by the traced
code: tests/test_flat_forward.py.)"""

from __future__ import annotations

import collections
import copy
import io
import operator
import os
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.graph.flat import NotNone, flat_check  # noqa: E402
from fusedconv.graph.flat_shape_tests import MAX_SHAPE_TESTS, ShapeTest, shape_only  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

TOL = 1e-12


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Checked(nn.Module):
    """Tests its input's shape first, as smp's segmentation models do, then two conv blocks."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stride = 8
        self.a, self.b = _block(3, 4), _block(4, 4)

    def forward(self, x):
        if self.form == "divisible":
            h, w = x.shape[-2:]
            if h % self.stride != 0 or w % self.stride != 0:
                raise RuntimeError(f"Wrong input shape height={h}, width={w}")
        elif self.form == "unbatched":
            if x.dim() == 3:
                x = x.unsqueeze(0)
        elif self.form == "else_raises":  # the branch taken as False raises: not flattened
            if x.size(1) == 3:
                pass
            else:
                raise RuntimeError("three channels")
        elif self.form == "value":  # a branch on the input's values, not its shape: not flattened
            if x.sum() > 0:
                x = -x
        elif self.form == "many":
            for k in range(MAX_SHAPE_TESTS + 1):
                if x.shape[2] == 1000 + k:
                    raise RuntimeError("unreachable")
        return self.b(self.a(x))


def _convert(model):
    model = randomize_bn(model).double().eval()
    return model, fusedconv.convert(copy.deepcopy(model), reparameterize=False, return_report=True)


def _flattened(fc) -> bool:
    table = guard_table(fc)
    return table is not None and flat_check(fc) is not None


def test_a_divisibility_test_is_guarded_per_call():
    model, (fc, report) = _convert(Checked("divisible"))
    assert _flattened(fc), report.notes
    table = guard_table(fc)
    assert any("shape test" in label and "% 8" in label for _, label in table.entries[0].checks)
    assert " % " not in table.entries[0].src  # the test's nodes left the graph: the guard computes it
    with torch.no_grad():
        for shape in ((1, 3, 16, 16), (2, 3, 8, 24)):
            assert max_rel_error(fc(_x(*shape)), model(_x(*shape))) < TOL
        assert table.fallback_calls == 0
        for shape in ((1, 3, 12, 16), (1, 3, 16, 4)):
            with pytest.raises(RuntimeError) as ours:
                fc(_x(*shape))
            with pytest.raises(RuntimeError) as theirs:
                model(_x(*shape))
            assert str(ours.value) == str(theirs.value)
        assert table.fallback_calls == 2
        # An attribute the test read is guarded too: the traced branch baked stride 8 in.
        fc.stride = model.stride = 3
        x = _x(1, 3, 16, 16)
        with pytest.raises(RuntimeError) as ours:
            fc(x)
        with pytest.raises(RuntimeError) as theirs:
            model(x)
        assert str(ours.value) == str(theirs.value)


def test_the_other_branch_runs_the_models_own_forward():
    model, (fc, report) = _convert(Checked("unbatched"))
    assert _flattened(fc), report.notes
    table = guard_table(fc)
    with torch.no_grad():
        assert max_rel_error(fc(_x(2, 3, 8, 8)), model(_x(2, 3, 8, 8))) < TOL
        assert table.fallback_calls == 0
        x = _x(3, 8, 8)
        assert max_rel_error(fc(x), model(x)) < TOL
        assert table.fallback_calls == 1


@pytest.mark.parametrize("form", ["else_raises", "value", "many"])
def test_forwards_left_as_they_are(form):
    model, (fc, report) = _convert(Checked(form))
    assert not _flattened(fc)
    assert any("flat forward" in n for n in report.notes), report.notes
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        assert max_rel_error(fc(x), model(x)) < TOL


def test_copies_keep_the_tests():
    model, (fc, _) = _convert(Checked("divisible"))
    buf = io.BytesIO()
    torch.save(fc, buf)
    buf.seek(0)
    for other in (copy.deepcopy(fc), torch.load(buf, weights_only=False)):
        table = guard_table(other)
        with torch.no_grad():
            assert max_rel_error(other(_x(1, 3, 8, 8)), model(_x(1, 3, 8, 8))) < TOL
            assert table.fallback_calls == 0
            with pytest.raises(RuntimeError, match="Wrong input shape"):
                other(_x(1, 3, 9, 8))


def test_a_frozen_model_tests_every_call_too():
    model, _ = _convert(Checked("divisible"))
    frozen = fusedconv.convert(copy.deepcopy(model), freeze=True)
    with torch.no_grad():
        for _ in range(3):  # the frozen leaf states are kept from the second call on
            assert max_rel_error(frozen(_x(1, 3, 16, 16)), model(_x(1, 3, 16, 16))) < TOL
        with pytest.raises(RuntimeError, match="Wrong input shape height=12, width=16"):
            frozen(_x(1, 3, 12, 16))


def test_shape_test_function():
    graph = fx.Graph()
    x, _ = graph.placeholder("x"), graph.placeholder("flag")
    shape = graph.call_function(getattr, (x, "shape"))
    h = graph.call_function(operator.getitem, (shape, 2))
    test = graph.call_function(operator.mod, (h, 8))
    size = graph.call_method("size", (x, 1))
    not_shape = graph.call_method("sum", (x,))
    assert shape_only(test) and shape_only(size) and not shape_only(not_shape)
    assert not shape_only(graph.call_function(operator.add, (h, not_shape)))
    t = ShapeTest(graph, test, NotNone)
    assert t.text == "(x.shape[2] % 8)"
    assert t(torch.zeros(1, 1, 16, 3), None) is True     # 16 % 8 == 0: the test is False
    assert t(torch.zeros(1, 1, 12, 3), None) is False    # 12 % 8 == 4: True
    assert t([1, 2], None) is False                      # no shape: the model's own forward answers
    assert t(NotNone(), None) is True                    # the probe flatten checks its guard with
    assert t(torch.zeros(1, 1, 16, 3), None) is True and t(torch.zeros(1, 1, 12, 3), None) is False


@pytest.mark.parametrize("arch,kwargs", [("FPN", {}), ("UnetPlusPlus", {"encoder_depth": 3,
                                                                         "decoder_channels": (32, 16, 8)})])
def test_smp_models_that_test_their_input_shape_are_flattened(arch, kwargs):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model, (fc, report) = _convert(getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, **kwargs))
    assert _flattened(fc), report.notes
    table = guard_table(fc)
    x = _x(1, 3, 64, 64)
    with torch.no_grad():
        assert max_rel_error(fc(x), model(x)) < TOL
        assert table.fallback_calls == 0
        with pytest.raises(RuntimeError) as ours:
            fc(_x(1, 3, 68, 64))
        with pytest.raises(RuntimeError) as theirs:
            model(_x(1, 3, 68, 64))
        assert str(ours.value) == str(theirs.value)


class _Features(dict):
    pass


class ReturnsMapping(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = _block(3, 4), _block(4, 4)

    def forward(self, x):
        out = collections.OrderedDict() if self.kind == "ordered" else _Features()
        out["a"] = self.a(x)
        out["b"] = self.b(out["a"])
        return out


@pytest.mark.parametrize("kind", ["ordered", "subclass"])
def test_mappings_the_forward_returns_keep_their_type(kind):
    model, (fc, report) = _convert(ReturnsMapping(kind))
    assert _flattened(fc) == (kind == "ordered"), report.notes
    x = _x(1, 3, 8, 8)
    with torch.no_grad():
        out, ref = fc(x), model(x)
    assert type(out) is type(ref) and list(out) == ["a", "b"]
    assert all(max_rel_error(out[k], ref[k]) < TOL for k in ref)
