"""Forwards that take a dict (or another container) of inputs instead of a tensor.

A forward parameter is traced as a tensor-like Proxy, guarded "not None" (or "a tensor"). Used as a dict,
`d.get("mask") is not None` compares that Proxy by identity, which is always True while tracing: the graph kept
the branch for every call (a call without "mask" raised KeyError; one whose branch only scales the output was
silently off by 2x); the same for an object's attribute (`batch.scale is None`) and for a dict a child returns.
Such a forward is now left as written (tracing._ParamProxy refuses a parameter's non-tensor attributes,
_ValueProxy a computed value's dict lookups), its chains still fused where they are called with tensors; indexing a
dict (`d["x"]`) still traces. Every case in float64 against the original.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402

TOL = 1e-12  # float64: a real mistake shows as O(1)


def _t(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cbr():
    return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())


class DictInputs(nn.Module):
    """The whole model takes a dict: "x", and optionally "extra" (added) and "flag" (doubles the output)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(), _cbr()

    def forward(self, inputs):
        y = self.a(inputs["x"])
        if inputs.get("extra") is not None:
            y = y + inputs["extra"]
        y = self.b(y)
        if inputs.get("flag") is not None:
            y = y * 2
        return y


class DictBlock(nn.Module):
    """A block inside a model called with a dict it builds itself."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, feats):
        y = torch.relu(self.bn(self.conv(feats["x"])))
        return y * 2 if feats.get("double") is not None else y


class CallsDictBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = DictBlock()
        self.post = _cbr()

    def forward(self, x, double=None):
        return self.post(self.block({"x": x} if double is None else {"x": x, "double": double}))


class DictOfInputsIndexed(nn.Module):
    """A dict of inputs read only by key: the graph indexes it on every call, so the root keeps its flat forward."""

    def __init__(self):
        super().__init__()
        self.a = _cbr()

    def forward(self, inputs):
        return self.a(inputs["x"]) * inputs["scale"]


class ChildReturnsDict(nn.Module):
    def forward(self, x):
        return {"feat": x} if x.shape[0] > 1 else {"feat": x, "aux": x * 3}


class ReadsChildDict(nn.Module):
    """A block reading a dict its child returns, with a default (in a block trace every child is a leaf)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.child = ChildReturnsDict()

    def forward(self, x):
        out = self.child(torch.relu(self.bn(self.conv(x))))
        aux = out.get("aux")
        return out["feat"] if aux is None else out["feat"] + 1


class NamespaceInputs(nn.Module):
    """Inputs as attributes of an object (`batch.image`)."""

    def __init__(self):
        super().__init__()
        self.a = _cbr()

    def forward(self, batch):
        y = self.a(batch.image)
        return y if batch.scale is None else y * batch.scale


class Batch:
    def __init__(self, image, scale=None):
        self.image, self.scale = image, scale


def _converted(model, flatten):
    model = randomize_bn(model).double().eval()
    converted, report = fusedconv.convert(model, reparameterize=False, flatten=flatten, return_report=True)
    return model, converted, report


def _close(a, b):
    assert max_rel_error(a, b) < TOL


@pytest.mark.parametrize("flatten", [True, False])
def test_dict_of_inputs_at_the_root(flatten):
    model, converted, report = _converted(DictInputs(), flatten)
    assert len(report.fused) == 2  # the chains, called with tensors, are fused all the same
    x, extra = _t(0), _t(1)
    with torch.no_grad():
        for inputs in ({"x": x}, {"x": x, "extra": extra}, {"x": x, "flag": True},
                       {"x": x, "extra": extra, "flag": 1}, {"x": x, "extra": None}):
            _close(converted(inputs), model(inputs))


@pytest.mark.parametrize("flatten", [True, False])
def test_block_called_with_a_dict(flatten):
    model, converted, report = _converted(CallsDictBlock(), flatten)
    assert report.fused
    x = _t(0)
    with torch.no_grad():
        _close(converted(x), model(x))
        _close(converted(x, double=True), model(x, double=True))


@pytest.mark.parametrize("flatten", [True, False])
def test_object_of_inputs_at_the_root(flatten):
    model, converted, report = _converted(NamespaceInputs(), flatten)
    assert report.fused
    x = _t(0)
    with torch.no_grad():
        _close(converted(Batch(x)), model(Batch(x)))
        _close(converted(Batch(x, 3.0)), model(Batch(x, 3.0)))


def test_dict_of_inputs_read_by_key_keeps_the_flat_forward():
    model, converted, report = _converted(DictOfInputsIndexed(), True)
    assert report.fused
    assert fusedconv.graph.flat.flat_check(converted) is not None
    with torch.no_grad():
        for scale in (1.0, 3.0):
            inputs = {"x": _t(0), "scale": scale}
            _close(converted(inputs), model(inputs))


@pytest.mark.parametrize("flatten", [True, False])
def test_dict_returned_by_a_child_read_with_a_default(flatten):
    model, converted, report = _converted(ReadsChildDict(), flatten)
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.randn(batch, 4, 8, 8, dtype=torch.float64)
            _close(converted(x), model(x))


def test_tensor_parameters_still_trace_with_tensor_methods_and_indexing():
    # What the refusal leaves alone: a tensor parameter's own methods and integer / slice indexing.
    class Slicing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _cbr()

        def forward(self, x):
            return self.a(x[:, :4].contiguous()) + x.mean(dim=1, keepdim=True)

    model, converted, report = _converted(Slicing(), True)
    assert report.fused
    assert fusedconv.graph.flat.flat_check(converted) is not None  # the root still has its flat forward
    x = _t(0)
    with torch.no_grad():
        _close(converted(x), model(x))
