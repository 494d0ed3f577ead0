"""Blocks called with a list of tensors (patterns.LIST): torchvision's DenseNet layers take `Tensor | list[Tensor]`
and their dense block calls them with the list of the features so far.

A forward that tests its argument's type is traced a second time with the argument as a list; that trace keeps a
specialization (guard: "is a list") only when it fuses the same chains and never iterates or unpacks the list.
Every case is checked in float64 against the original block called the same way, and `fallback_calls` tells
whether a call took the fused specialization or the block's own forward.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import FusedConv2d  # noqa: E402
from fusedconv.graph import flat  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

TOL = 1e-12  # float64: a real mistake shows as O(1)


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _convert(model, **kwargs):
    model = randomize_bn(model).double().eval()
    return model, fusedconv.convert(model, reparameterize=False, **kwargs)


class DenseLike(nn.Module):
    """DenseNet's layer in small: a tensor becomes a one-element list, a list is concatenated as given."""

    def __init__(self, c_in=6, c_out=4):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()

    def forward(self, x):
        feats = [x] if isinstance(x, Tensor) else x
        return self.relu(self.bn(self.conv(torch.cat(feats, 1))))


class ListBranches(nn.Module):
    """Different code for a list, the same chain: the first element convolved, the last added after it."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        if isinstance(x, Tensor):
            return torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn(self.conv(x[0]))) + x[-1]


class ListOtherChain(ListBranches):
    """For a list the add comes before the activation: another chain (a residual epilogue), so lists keep the
    block's own forward (the specializations of one block share their fused modules)."""

    def forward(self, x):
        if isinstance(x, Tensor):
            return torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.bn(self.conv(x[0])) + x[-1])


class Unpacks(ListBranches):
    """Unpacks a list into two names: a graph would bake in the length, so lists keep the block's own forward."""

    def forward(self, x):
        if isinstance(x, Tensor):
            return torch.relu(self.bn(self.conv(x)))
        a, b = x
        return torch.relu(self.bn(self.conv(a))) + b


class DenseStack(nn.Module):
    """The dense block's loop: each layer gets the list of all features so far."""

    def __init__(self, c0=4, growth=2, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(DenseLike(c0 + i * growth, growth) for i in range(layers))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


@torch.no_grad()
def test_list_call_takes_a_fused_specialization_and_matches():
    original, converted = _convert(DenseLike())
    table = guard_table(converted)
    assert table is not None and any("x is a list" in d for d in table.describe())
    a, b, c = _t(1, 2, 5, 5), _t(1, 3, 5, 5, seed=1), _t(1, 1, 5, 5, seed=2)
    for arg in ([a, b, c], [torch.cat([a, b, c], 1)], torch.cat([a, b, c], 1)):
        assert max_rel_error(converted(arg), original(arg)) < TOL
    assert table.fallback_calls == 0
    assert isinstance(converted.conv, FusedConv2d)


@torch.no_grad()
def test_list_branch_differs_from_tensor_branch():
    original, converted = _convert(ListBranches())
    x, y = _t(2, 4, 6, 6), _t(2, 4, 6, 6, seed=1)
    for arg in (x, [x, y], [x, x, y]):
        assert max_rel_error(converted(arg), original(arg)) < TOL
    assert guard_table(converted).fallback_calls == 0


@torch.no_grad()
def test_list_branch_with_another_chain_takes_the_fallback():
    original, converted = _convert(ListOtherChain())
    x, y = _t(2, 4, 6, 6), _t(2, 4, 6, 6, seed=1)
    assert max_rel_error(converted(x), original(x)) < TOL
    assert guard_table(converted).fallback_calls == 0
    assert max_rel_error(converted([x, y]), original([x, y])) < TOL
    assert guard_table(converted).fallback_calls == 1


@torch.no_grad()
def test_tuple_and_other_sequences_take_the_fallback():
    original, converted = _convert(ListBranches())
    x, y = _t(2, 4, 6, 6), _t(2, 4, 6, 6, seed=1)
    assert max_rel_error(converted((x, y)), original((x, y))) < TOL
    assert guard_table(converted).fallback_calls == 1


@torch.no_grad()
def test_unpacking_forward_keeps_lists_on_the_fallback():
    original, converted = _convert(Unpacks())
    table = guard_table(converted)
    assert not any("is a list" in d for d in table.describe())
    x, y = _t(2, 4, 6, 6), _t(2, 4, 6, 6, seed=1)
    assert max_rel_error(converted([x, y]), original([x, y])) < TOL
    assert table.fallback_calls == 1
    # A list of three: the original raises, and so does the converted block (no graph took the first two).
    with pytest.raises(ValueError):
        original([x, y, x])
    with pytest.raises(ValueError):
        converted([x, y, x])


@torch.no_grad()
def test_dense_stack_flat_forward_inlines_list_calls():
    original, converted = _convert(DenseStack())
    assert flat.flat_check(converted) is not None
    x = _t(1, 4, 7, 7)
    assert max_rel_error(converted(x), original(x)) < TOL
    assert all(guard_table(layer).fallback_calls == 0 for layer in converted.layers)
    assert all(isinstance(layer.conv, FusedConv2d) for layer in converted.layers)


@torch.no_grad()
def test_dense_stack_without_flat_forward_dispatches_lists():
    original, converted = _convert(DenseStack(), flatten=False)
    x = _t(1, 4, 7, 7)
    assert max_rel_error(converted(x), original(x)) < TOL
    assert all(guard_table(layer).fallback_calls == 0 for layer in converted.layers)


@torch.no_grad()
def test_torchvision_densenet_fuses_its_dense_layers():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    original, converted = _convert(tv.models.densenet121(weights=None))
    layers = [m for m in converted.modules() if type(m).__name__ == "_DenseLayer"]
    assert len(layers) == 58 and all(isinstance(m.conv1, FusedConv2d) for m in layers)
    x = _t(1, 3, 32, 32)
    for _ in range(2):
        assert max_rel_error(converted(x), original(x)) < TOL
    assert flat.flat_check(converted) is not None
    assert all(guard_table(m).fallback_calls == 0 for m in layers)


@torch.no_grad()
def test_list_calls_compose_with_export_compile_and_jit_trace():
    original, converted = _convert(DenseStack())
    x, x2 = _t(1, 4, 7, 7), _t(1, 4, 7, 7, seed=3)
    ep = torch.export.export(converted, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets
    assert max_rel_error(ep.module()(x2), original(x2)) < TOL
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    assert max_rel_error(compiled(x2), original(x2)) < TOL
    traced = torch.jit.trace(converted, (x,), check_trace=False)
    assert max_rel_error(traced(x2), original(x2)) < TOL
