"""The backward formula of `fusedconv::conv_bn_act` (fusedconv/ops_backward.py): gradcheck in float64 against finite
differences for every activation, with and without the residual, over strides, padding, dilation and groups; and a
converted ExportedProgram in grad mode, eager and under torch.compile, against the original program's gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fusedconv import ops
from fusedconv.graph.exported import convert_exported
from fusedconv.kernels.reference import ACTIVATIONS
from tests.util import max_rel_error, randomize_bn


def _op(x, weight, scale, shift, residual, geometry, activation, param):
    stride, padding, dilation, groups = geometry
    return ops.conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, param)


GEOMETRIES = {
    "3x3": ((1, 1), (1, 1), (1, 1), 1),
    "strided_dilated": ((2, 1), (2, 1), (2, 1), 1),
    "grouped": ((1, 1), (0, 1), (1, 1), 2),
}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", (False, True))
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_gradcheck_float64(activation, residual, geometry):
    g = torch.Generator().manual_seed(hash((activation, residual, geometry)) % 1000)
    stride, padding, dilation, groups = GEOMETRIES[geometry]
    x = torch.randn(2, 4, 7, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(6, 4 // groups, 3, 2, generator=g, dtype=torch.float64)
    scale = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(6, generator=g, dtype=torch.float64)
    out = _op(x, weight, scale, shift, None, GEOMETRIES[geometry], activation, 0.1)
    res = torch.randn(out.shape, generator=g, dtype=torch.float64) if residual else None
    inputs = [t.requires_grad_() for t in (x, weight, scale, shift) + ((res,) if residual else ())]

    def f(x, weight, scale, shift, res=None):
        return _op(x, weight, scale, shift, res, GEOMETRIES[geometry], activation, 0.1)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_only_for_what_requires_it():
    x, weight = torch.randn(1, 3, 5, 5, requires_grad=True), torch.randn(4, 3, 3, 3)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    y = _op(x, weight, scale, shift, None, GEOMETRIES["3x3"], "silu", 0.0)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert weight.grad is None and scale.grad is None


class _Net(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return nn.functional.hardswish(self.bn2(self.conv2(y)) + y)


def _grads(module, x):
    x = x.clone().requires_grad_()
    y = module(x)
    y.double().square().sum().backward()
    params = {name.removeprefix("_orig_mod."): p for name, p in module.named_parameters()}
    return y.detach(), x.grad, params


@pytest.mark.parametrize("compiled", (False, True))
def test_converted_program_in_grad_mode(compiled):
    torch.manual_seed(0)
    model = randomize_bn(_Net().eval().double(), 2)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    ep = torch.export.export(model, (x,))
    converted = convert_exported(ep)
    assert any(n.target is torch.ops.fusedconv.conv_bn_act.default for n in converted.graph.nodes)
    module = converted.module()
    if compiled:  # AOTAutograd traces the op's backward when the parameters require grad
        module = torch.compile(module, backend="aot_eager")
    y, gx, params = _grads(module, x)
    y_ref, gx_ref, params_ref = _grads(ep.module(), x)
    assert max_rel_error(y, y_ref) < 1e-12
    assert max_rel_error(gx, gx_ref) < 1e-10
    # The convs' weights stay parameters of the converted program (the BN became its fused scale / shift).
    for name in ("conv1.weight", "conv2.weight"):
        assert max_rel_error(params[name].grad, params_ref[name].grad) < 1e-10
