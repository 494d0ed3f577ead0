"""PyTorch's oneDNN switch (`torch.backends.mkldnn.flags(enabled=False)`, `torch.backends.mkldnn.enabled = False`):
while it is off a converted model runs no oneDNN op, as the original model does not, and gives the same outputs in
the same layout; once it is on again the oneDNN route is back (fusedconv/cpu.py `mkldnn_enabled`)."""

from __future__ import annotations

import copy

import pytest
import torch
from util import max_rel_error, randomize_bn

import fusedconv
from fusedconv import cpu
from fusedconv.cpu_boundary import layout_used
from fusedconv.modules import FusedConv2d

torchvision = pytest.importorskip("torchvision")
pytestmark = pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN conv ops")

TOL_FP32 = 1e-4
CL = torch.channels_last


def onednn_ops(fn, x) -> list[str]:
    """The oneDNN ops (by name) one call of `fn(x)` runs, from torch.profiler."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(x)
    return sorted({e.name for e in prof.events() if "mkldnn" in e.name})


def _resnet18():
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(weights=None), 3).eval()


@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_switched_off_after_warm_up_runs_no_onednn_op_and_agrees(freeze, layout):
    model = _resnet18()
    fused = fusedconv.convert(model, freeze=freeze)
    x = torch.randn(1, 3, 96, 96)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        for _ in range(3):  # layout check, routes, packed weights, the flat forward's kept states (freeze)
            fused(x)
        reference = copy.deepcopy(model).double()(x.double())
    assert onednn_ops(fused, x), "precondition: the converted model takes the oneDNN route when it is on"
    with torch.backends.mkldnn.flags(enabled=False):
        assert onednn_ops(fused, x) == []
        with torch.no_grad():
            y = fused(x)
            original = model.float()(x)
    assert max_rel_error(y, reference) < TOL_FP32
    assert y.shape == original.shape and y.stride() == original.stride()
    assert onednn_ops(fused, x), "the oneDNN route is back once the switch is on again"
    with torch.no_grad():
        assert max_rel_error(fused(x), reference) < TOL_FP32


def test_off_from_the_first_call_then_on():
    model = _resnet18()
    fused = fusedconv.convert(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        reference = model(x)
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            y = fused(x)
            assert onednn_ops(fused, x) == []
            # No layout switch at the boundary either: channels_last pays only for the oneDNN route.
            assert layout_used(fused, x) == "NCHW"
        finally:
            torch.backends.mkldnn.enabled = previous
        assert max_rel_error(y, reference) < TOL_FP32 and y.is_contiguous()
        # The layout boundary was not decided while oneDNN was off: the first call with it on checks and switches.
        assert onednn_ops(fused, x) and layout_used(fused, x) == "channels_last"
        z = fused(x)
    assert max_rel_error(z, reference) < TOL_FP32 and z.is_contiguous()


@pytest.mark.parametrize("residual", [False, True])
def test_lone_layer_channels_last_input(residual):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    bn = randomize_bn(torch.nn.Sequential(torch.nn.BatchNorm2d(32)), 1)[0].eval()
    layer = FusedConv2d.from_modules(conv, bn, act="relu")
    x = torch.randn(1, 16, 40, 40).contiguous(memory_format=CL)
    r = torch.randn(1, 32, 40, 40).contiguous(memory_format=CL) if residual else None
    with torch.no_grad():
        out = bn(conv(x))
        expected = torch.relu(out + r if residual else out)

        def call(t):
            return layer(t, r)

        call(x)
        assert onednn_ops(call, x)
        with torch.backends.mkldnn.flags(enabled=False):
            assert onednn_ops(call, x) == []
            y = call(x)
    assert max_rel_error(y, expected) < TOL_FP32 and y.is_contiguous(memory_format=CL)
