"""FusedConv3d on CPU: the folded conv on oneDNN where fusedconv/cpu_conv3d.py says it pays, F.conv3d elsewhere.

Each routed call is compared in float64 with the original Conv3d -> BatchNorm3d(eval) -> activation on the same
float32 input, and the ops it ran are counted (a dispatch mode sees `mkldnn_convolution` for the oneDNN route and
`convolution` for F.conv3d); the switches, gradients, channels_last_3d input and small convs keep F.conv3d.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fusedconv import cpu, cpu_conv3d
from util import OpCounter, conv3d_pair, conv3d_reference64, count_ops, count_ops_switched_off, max_rel_error

pytestmark = pytest.mark.skipif(not (cpu.available() and cpu_conv3d._mkldnn_convolution is not None),
                                reason="this PyTorch build has no oneDNN convolution")
TOL_FP32 = 1e-5


# (cin, cout, conv kwargs, input D x H x W): each pays (module doc of cpu_conv3d).
ROUTED = [
    (16, 24, dict(kernel_size=3, padding=1), (4, 16, 16)),
    (32, 48, dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), (4, 32, 32)),
    (64, 32, dict(kernel_size=(3, 1, 1), padding=(1, 0, 0), bias=False), (4, 16, 16)),
    (128, 64, dict(kernel_size=3, padding=2, dilation=2), (2, 8, 8)),
]


@pytest.mark.parametrize("cin,cout,kwargs,size", ROUTED)
@pytest.mark.parametrize("act,post", [("relu", False), ("silu", True), ("identity", False)])
def test_routed_conv_matches_float64_and_runs_onednn(cin, cout, kwargs, size, act, post):
    ref, fused = conv3d_pair(cin, cout, act, post, **kwargs)
    x = torch.randn(1, cin, *size)
    counts = count_ops(fused, x)
    with torch.no_grad():
        y = fused(x)
        own = ref(x)
    assert counts["mkldnn_convolution"] == 1 and counts["convolution"] == 0, counts
    assert max_rel_error(y.double(), conv3d_reference64(ref, x)) < TOL_FP32
    assert y.shape == own.shape and y.stride() == own.stride()  # the layout the original conv returns


def test_routed_conv_with_residual():
    ref, fused = conv3d_pair(16, 16, "relu", padding=1, kernel_size=3)
    x, residual = torch.randn(1, 16, 4, 16, 16), torch.randn(1, 16, 4, 16, 16)
    before = residual.clone()
    counts = count_ops(fused, x, residual)
    with torch.no_grad():
        y = fused(x, residual)
    assert counts["mkldnn_convolution"] == 1
    assert max_rel_error(y.double(), conv3d_reference64(ref, x, residual)) < TOL_FP32
    assert torch.equal(residual, before)


def test_no_reference_kernel_left_for_a_routed_conv():
    """The profiler sees oneDNN's conv and not PyTorch's im2col one (what the original layer runs here)."""
    ref, fused = conv3d_pair(16, 24, kernel_size=3, padding=1)
    x = torch.randn(1, 16, 4, 16, 16)
    with torch.no_grad():
        for module, expect, absent in ((fused, "aten::mkldnn_convolution", "aten::slow_conv3d_forward"),
                                       (ref, "aten::slow_conv3d_forward", "aten::mkldnn_convolution")):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                module(x)
            names = {e.key for e in prof.key_averages()}
            assert expect in names and absent not in names, (module, sorted(names))


@pytest.mark.parametrize("switch", ["fusedconv", "torch"])
def test_switches_keep_f_conv3d(switch):
    ref, fused = conv3d_pair(16, 24, kernel_size=3, padding=1)
    x = torch.randn(1, 16, 4, 16, 16)
    counts = count_ops_switched_off(switch, fused, x)
    assert counts["convolution"] == 1 and counts["mkldnn_convolution"] == 0
    assert count_ops(fused, x)["mkldnn_convolution"] == 1  # back on: the route again


@pytest.mark.parametrize("cin,cout,kwargs,size", [
    (256, 256, dict(kernel_size=1), (4, 16, 16)),                 # 1x1x1: one matrix product already
    (256, 256, dict(kernel_size=3, padding=1), (1, 2, 2)),        # a 1x2x2 output
    (45, 64, dict(kernel_size=(3, 1, 1), padding=(1, 0, 0)), (4, 16, 16)),  # a short reduction
    (8, 8, dict(kernel_size=3, padding=1), (2, 8, 8)),            # small
])
def test_convs_that_do_not_pay_keep_f_conv3d(cin, cout, kwargs, size):
    ref, fused = conv3d_pair(cin, cout, **kwargs)
    x = torch.randn(1, cin, *size)
    counts = count_ops(fused, x)
    assert counts["convolution"] == 1 and counts["mkldnn_convolution"] == 0
    with torch.no_grad():
        assert max_rel_error(fused(x).double(), conv3d_reference64(ref, x)) < TOL_FP32


CL3D = torch.channels_last_3d


@pytest.mark.parametrize("cin,cout,kwargs,size,routed", [
    (32, 32, dict(kernel_size=3, padding=1), (4, 16, 16), True),                   # 28M MACs
    (64, 64, dict(kernel_size=1), (8, 28, 28), True),                              # 1x1x1, 26M MACs
    (256, 512, dict(kernel_size=1, stride=2), (2, 14, 14), True),                  # 6.4M MACs
    (8, 8, dict(kernel_size=3, padding=1), (2, 8, 8), False),                      # 0.2M MACs
    (64, 64, dict(kernel_size=3, padding=1), (8, 56, 56), False),                  # PyTorch takes oneDNN itself
])
def test_channels_last_3d_input_in_the_original_layout(cin, cout, kwargs, size, routed):
    """Channels_last_3d input: oneDNN where PyTorch would run its reference kernel on a conv of 4M multiply-adds
    or more; the output has the layout the original conv returns (NCDHW from the reference kernel, channels_last_3d
    where PyTorch took oneDNN itself)."""
    ref, fused = conv3d_pair(cin, cout, **kwargs)
    x = torch.randn(1, cin, *size).contiguous(memory_format=CL3D)
    counts = count_ops(fused, x)
    with torch.no_grad():
        y, own = fused(x), ref(x)
    assert (counts["mkldnn_convolution"], counts["convolution"]) == ((1, 0) if routed else (0, 1)), counts
    assert y.stride() == own.stride()
    assert max_rel_error(y.double(), conv3d_reference64(ref, x)) < TOL_FP32


def test_input_needing_grad_keeps_f_conv3d_and_its_gradient():
    ref, fused = conv3d_pair(16, 24, kernel_size=3, padding=1)
    x = torch.randn(1, 16, 4, 16, 16, requires_grad=True)
    x64 = x.detach().double().requires_grad_(True)
    counter = OpCounter()
    with counter:
        y = fused(x)
    assert counter.counts["convolution"] == 1 and counter.counts["mkldnn_convolution"] == 0
    y.sum().backward()
    ref64 = copy.deepcopy(ref).double()
    ref64(x64).sum().backward()
    assert max_rel_error(x.grad.double(), x64.grad) < 1e-4


def test_pays_channels_last_rule():
    # PyTorch's own oneDNN cases stay with it: batch 2, groups, a 7x7 kernel, N * C * D * H above 20480.
    assert not cpu_conv3d.pays_channels_last((2, 32, 4, 16, 16), (32, 32, 3, 3, 3), (2, 32, 4, 16, 16), 1)
    assert not cpu_conv3d.pays_channels_last((1, 32, 4, 16, 16), (32, 8, 3, 3, 3), (1, 32, 4, 16, 16), 4)
    assert not cpu_conv3d.pays_channels_last((1, 3, 8, 64, 64), (64, 3, 3, 7, 7), (1, 64, 8, 32, 32), 1)
    assert not cpu_conv3d.pays_channels_last((1, 64, 8, 56, 56), (64, 64, 3, 3, 3), (1, 64, 8, 56, 56), 1)
    assert cpu_conv3d.pays_channels_last((1, 32, 4, 16, 16), (32, 32, 3, 3, 3), (1, 32, 4, 16, 16), 1)
    assert not cpu_conv3d.pays_channels_last((1, 8, 2, 8, 8), (8, 8, 3, 3, 3), (1, 8, 2, 8, 8), 1)


def test_pays_rule():
    assert not cpu_conv3d.pays((256, 256, 1, 1, 1), (1, 256, 4, 16, 16))  # 1x1x1 (else large enough)
    assert cpu_conv3d.pays((144, 64, 1, 3, 3), (1, 144, 4, 32, 32))     # 4096 positions, 340M MACs
    assert not cpu_conv3d.pays((512, 256, 3, 3, 3), (1, 512, 1, 4, 4))  # 16 positions
    assert cpu_conv3d.pays((256, 256, 3, 3, 3), (1, 256, 1, 8, 8))      # 64 positions, a long reduction
    assert cpu_conv3d.pays((512, 512, 3, 3, 3), (1, 512, 1, 7, 7))      # 49 positions (r3d_18's layer4)
    assert not cpu_conv3d.pays((512, 512, 3, 3, 3), (1, 512, 2, 4, 4))  # 32 positions
    assert not cpu_conv3d.pays((64, 45, 3, 1, 1), (1, 64, 4, 16, 16))   # reduction 135
    assert not cpu_conv3d.pays((128, 64, 3, 1, 1), (1, 128, 2, 16, 16))  # 512 positions, reduction 192


def test_decision_is_per_geometry_not_only_per_shape():
    """The per-signature cache keys on stride / padding / dilation too: the same input and weight shapes at stride
    1 pay (4096 output positions), at stride (1, 4, 4) do not (256)."""
    x = torch.randn(1, 32, 4, 32, 32)
    weight, bias = torch.randn(48, 32, 1, 3, 3) * 0.05, torch.randn(48)
    with torch.no_grad():
        assert cpu_conv3d.conv3d(x, weight, bias, (1, 1, 1), (0, 1, 1), (1, 1, 1), 1) is not None
        assert cpu_conv3d.conv3d(x, weight, bias, (1, 4, 4), (0, 1, 1), (1, 1, 1), 1) is None
        y = cpu_conv3d.conv3d(x, weight, bias, (1, 1, 1), (0, 1, 1), (1, 1, 1), 1)
    ref = torch.nn.functional.conv3d(x.double(), weight.double(), bias.double(), 1, (0, 1, 1))
    assert max_rel_error(y.double(), ref) < TOL_FP32


def test_vmap_keeps_f_conv3d():
    """Inside torch.func.vmap the route steps aside: vmap has no batching rule for mkldnn_convolution (it warned
    and looped per sample before this check); the result is the original's."""
    ref, fused = conv3d_pair(16, 24, kernel_size=3, padding=1)
    xs = torch.randn(3, 1, 16, 4, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            y = torch.func.vmap(fused)(xs)
    expected = torch.stack([conv3d_reference64(ref, x) for x in xs])
    assert max_rel_error(y.double(), expected) < TOL_FP32


def test_decision_is_per_layout():
    """A 1x1x1 conv stays on F.conv3d for NCDHW input and takes oneDNN for channels_last_3d input of the same shape
    (the per-signature cache keys on the layout)."""
    ref, fused = conv3d_pair(64, 64, kernel_size=1)
    x = torch.randn(1, 64, 8, 28, 28)
    assert count_ops(fused, x)["mkldnn_convolution"] == 0
    xc = x.contiguous(memory_format=CL3D)
    assert count_ops(fused, xc)["mkldnn_convolution"] == 1
    with torch.no_grad():
        assert max_rel_error(fused(xc).double(), conv3d_reference64(ref, x)) < TOL_FP32
