"""Tensors the forward computes while it is traced: fx runs an op with no traced argument once, at trace time, and the
graph keeps its result as a constant. A random draw (`torch.randn(1, c, 1, 1)`), a computation on a buffer
(`self.gain.relu()`) or on a plain tensor attribute (`self.mask.sigmoid()`) would then be the same on every call,
whatever the random state or an in-place edit of the tensor; a write into a plain tensor attribute would happen
once. Found by bench/random_sweep.py (relative errors 0.2-1.3 before the fix). Each model below is checked against
the original in float64, with the whole-model flat forward and without it (model_code.TensorLineage, ScopeTracer's
buffer proxies, tracing.trace_scope).
"""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv.graph import model_code  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

TOL = 1e-12


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)


class BufferGain(_Block):
    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.linspace(-0.5, 1.5, 4).view(1, -1, 1, 1))

    def forward(self, x):
        return self.bn(self.conv(x)) * self.gain.relu()


class AttributeGain(_Block):
    def __init__(self):
        super().__init__()
        self.mask = torch.linspace(-1.0, 1.0, 4).view(1, -1, 1, 1).double()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) * self.mask.sigmoid()


class Noise(_Block):
    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + torch.randn(1, 4, 1, 1).to(x)


class AttributeCounter(_Block):
    def __init__(self):
        super().__init__()
        self.calls = torch.zeros(())

    def forward(self, x):
        self.calls.add_(1)
        return F.relu(self.bn(self.conv(x)))


class BufferCounter(_Block):
    """A buffer the forward updates: `self.calls += 1` (in place, then set again on the module)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return F.relu(self.bn(self.conv(x)))


class ConstantScale(_Block):
    """A tensor made from plain values only: the same on every call, a graph may hold it."""

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) * torch.tensor(0.5, dtype=x.dtype)


def _pair(block: type, flatten: bool):
    torch.manual_seed(0)
    model = nn.Sequential(block(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    randomize_bn(model, example=x)
    model = model.double()
    return model, fusedconv.convert(model, flatten=flatten), x.double()


def _outputs(model, x, calls=3):
    out = []
    with torch.no_grad():
        for i in range(calls):
            torch.manual_seed(i)
            out.append(model(x))
    return out


def _same(a: list, b: list) -> float:
    return max(max_rel_error(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("block, tensor", [(BufferGain, "0.gain"), (AttributeGain, "0.mask")])
def test_edit_of_a_tensor_the_forward_computes_from_is_seen(block, tensor, flatten):
    model, converted, x = _pair(block, flatten)
    _outputs(converted, x)
    for m in (model, converted):
        owner, _, name = tensor.rpartition(".")
        with torch.no_grad():
            getattr(m.get_submodule(owner), name).mul_(-2.0)
    assert _same(_outputs(converted, x), _outputs(model, x)) < TOL


@pytest.mark.parametrize("flatten", [True, False])
def test_a_random_draw_in_the_forward_is_drawn_on_every_call(flatten):
    model, converted, x = _pair(Noise, flatten)
    got, want = _outputs(converted, x), _outputs(model, x)
    assert _same(got, want) < TOL
    assert max_rel_error(want[0], want[1]) > 1e-3  # (the draws differ from call to call)


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("block", [AttributeCounter, BufferCounter])
def test_a_write_into_a_tensor_happens_on_every_call(block, flatten):
    model, converted, x = _pair(block, flatten)
    assert float(converted[0].calls) == float(model[0].calls)  # (the trace's write undone)
    _outputs(converted, x)
    _outputs(model, x)
    assert float(converted[0].calls) == float(model[0].calls)


def test_a_tensor_made_of_plain_values_keeps_the_rewrite():
    model, converted, x = _pair(ConstantScale, False)
    assert guard_table(converted[0]) is not None and type(converted[0].conv) is FusedConv2d
    assert _same(_outputs(converted, x), _outputs(model, x)) < TOL


@pytest.mark.parametrize("block, reason", [(Noise, "a random draw (randn)"), (AttributeGain, "sigmoid"),
                                           (AttributeCounter, "writes into a tensor in place (add_)")])
def test_the_report_says_why_the_block_was_left_as_written(block, reason):
    torch.manual_seed(0)
    model = nn.Sequential(block(), nn.Conv2d(4, 2, 1)).eval().double()
    _, report = fusedconv.convert(model, return_report=True)
    assert reason in str(report)


def test_lineage_tells_computed_tensors_from_plain_ones():
    lineage = model_code.TensorLineage()
    state = torch.ones(3)
    watched = model_code.WatchedCode()
    watched.lineage = lineage
    with model_code._TensorValueReads(watched):
        pure = torch.zeros(3) + torch.tensor(1.0)
        from_state = state * 2
        drawn = torch.randn(3)
        same = state.contiguous()
        pure.add_(1)
    assert id(pure) in lineage.pure and id(pure) not in lineage.computed
    assert "mul" in lineage.computed[id(from_state)][1] and "randn" in lineage.computed[id(drawn)][1]
    assert id(same) not in lineage.computed  # the attribute itself: a graph holding it holds the live tensor
    assert lineage.writes == []
    with model_code._TensorValueReads(watched):
        state.add_(1)
        torch.mul(pure, 2.0, out=state)
    assert len(lineage.writes) == 2 and "add_" in lineage.writes[0] and "mul" in lineage.writes[1]
    lineage.restore()
    assert torch.equal(state, torch.ones(3))  # (the trace's writes undone, newest first)


def test_copies_of_the_converted_model_see_the_edit_too():
    model, converted, x = _pair(BufferGain, True)
    copied = copy.deepcopy(converted)
    _outputs(copied, x)
    with torch.no_grad():
        model[0].gain.mul_(-2.0)
        copied[0].gain.mul_(-2.0)
    assert _same(_outputs(copied, x), _outputs(model, x)) < TOL
