"""FusedConv2d on CPU for small convs and for inputs dense in both layouts (fusedconv/cpu.py: `small_conv_macs`,
`_channels_last_strided`).

A small conv on channels_last float32 input (batch 1, groups 1, a small input and weight,
few multiply-adds) stays on F.conv2d with a channels_last weight, where oneDNN's fused op costs more per call than
the conv computes; every other channels_last float32 conv takes the oneDNN route. A tensor dense in both layouts
with channels_last strides (a (N, C, 1, 1) oneDNN output) is routed as channels_last: PyTorch's native conv would
otherwise copy the whole weight on every call. Each route must compute the original chain's values in the input's
layout; which route a signature took is read from the module's route table.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN pointwise conv ops")
CL = torch.channels_last


def _block(cin, cout, k=3, stride=1, groups=1, seed=0):
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                        nn.ReLU()).eval()
    randomize_bn(ref, seed)
    return ref, FusedConv2d.from_modules(ref[0], ref[1], ref[2])


def _route_of(fused, x, residual=None):
    with torch.no_grad():
        y = fused(x, residual)
    (route,) = fused._cpu_state.routes.values()
    return route, y


def _check(ref, y, x, residual=None):
    with torch.no_grad():
        r = copy.deepcopy(ref).double()
        if residual is None:
            expect = r(x.double())
        else:  # conv -> BN -> (+ residual) -> ReLU
            expect = torch.relu(r[1](r[0](x.double())) + residual.double())
    assert max_rel_error(y, expect) < 1e-5
    assert y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("cin,cout,k,stride,size", [
    (16, 16, 3, 1, 16),   # 0.59M multiply-adds
    (128, 128, 3, 1, 4),  # 2.4M
    (64, 128, 3, 2, 8),   # strided
    (256, 64, 1, 1, 8),   # 1x1
    (3, 64, 3, 2, 32),    # a stem
])
def test_small_convs_stay_on_f_conv2d_with_a_channels_last_weight(cin, cout, k, stride, size, monkeypatch):
    ref, fused = _block(cin, cout, k, stride)
    x = torch.randn(1, cin, size, size).contiguous(memory_format=CL)
    seen = []
    real = cpu._conv2d
    monkeypatch.setattr(cpu, "_conv2d", lambda x, w, *a: seen.append(w.is_contiguous(memory_format=CL)) or
                        real(x, w, *a))
    route, y = _route_of(fused, x)
    assert route == cpu.FOLDED_CL
    assert seen == [True]  # the weight aten's conv reads without reordering it
    _check(ref, y, x)
    with torch.no_grad():  # later calls: the same route, the cached weight
        assert torch.equal(fused(x), y)
    assert seen == [True, True]


def test_small_conv_with_residual():
    ref, fused = _block(32, 32)
    x = torch.randn(1, 32, 8, 8).contiguous(memory_format=CL)
    residual = torch.randn(1, 32, 8, 8).contiguous(memory_format=CL)
    route, y = _route_of(fused, x, residual)
    assert route == cpu.FOLDED_CL
    _check(ref, y, x, residual)


@pytest.mark.parametrize("case", ["batch2", "depthwise", "large_input", "large_weight",
                                  "many_macs", "threshold_off"])
def test_outside_the_bounds_takes_onednn(case, monkeypatch):
    cin, cout, k, groups, shape = 32, 32, 3, 1, (1, 32, 8, 8)
    if case == "batch2":
        shape = (2, 32, 8, 8)
    elif case == "depthwise":
        groups = 32
    elif case == "large_input":  # 32 x 32 x 32 = 32768 elements, 1.05M multiply-adds
        k, shape = 1, (1, 32, 32, 32)
    elif case == "large_weight":  # 512 x 512 x 3 x 3 at 1x1: 2.4M weights, 2.4M multiply-adds
        cin, cout, shape = 512, 512, (1, 512, 1, 1)
    elif case == "many_macs":  # 64 -> 64 3x3 at 16x16: 9.4M multiply-adds, 16384 input elements
        cin, cout, shape = 64, 64, (1, 64, 16, 16)
    elif case == "threshold_off":
        monkeypatch.setattr(cpu, "small_conv_macs", 0)
    ref, fused = _block(cin, cout, k, groups=groups)
    x = torch.randn(*shape).contiguous(memory_format=CL)
    if case == "large_weight":  # channels_last strides (contiguous() leaves a 1x1 map's strides NCHW)
        x = x.as_strided(shape, (512, 1, 512, 512))
    route, y = _route_of(fused, x)
    assert route == cpu.ONEDNN, case
    _check(ref, y, x)


def test_dense_in_both_layouts_with_channels_last_strides_takes_onednn():
    ref, fused = _block(512, 512)
    x = torch.randn(1, 512, 1, 1)
    x_cl = x.as_strided(x.shape, (512, 1, 512, 512))  # oneDNN's strides for a (1, 512, 1, 1) output
    assert x_cl.is_contiguous() and x_cl.is_contiguous(memory_format=CL)
    assert cpu._channels_last_strided(x_cl) and not cpu._channels_last_strided(x)
    route, y = _route_of(fused, x_cl)
    assert route == cpu.ONEDNN
    _check(ref, y, x_cl)
    # The same tensor with NCHW's strides (an NCHW model's) stays on F.conv2d, as before.
    _, fused2 = _block(512, 512)
    route, y = _route_of(fused2, x)
    assert route == cpu.FOLDED
    with torch.no_grad():
        assert max_rel_error(y, copy.deepcopy(ref).double()(x.double())) < 1e-5


def _profile_counts(model, x, runs=2):
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(2):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    counts: dict[str, int] = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return {k: v // runs for k, v in counts.items()}


def test_resnet18_at_32x32_copies_no_weight_per_forward():
    """At 32x32 resnet18's last stage runs on 1x1 maps: before the strided-layout route, F.conv2d copied each of
    its 512x512x3x3 weights on every call (4 `aten::clone` per forward, 1.5-4 ms each)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(weights=None), 1).eval()
    fused = fusedconv.convert(copy.deepcopy(model))
    x = torch.randn(1, 3, 32, 32)
    counts = _profile_counts(fused, x)
    assert counts.get("aten::clone", 0) <= 1, counts  # at most the input's copy at the layout boundary
    with torch.no_grad():
        assert max_rel_error(fused(x), model(x)) < 1e-4


@pytest.mark.parametrize("size,layout", [(16, "NCHW"), (64, "channels_last")])
def test_layout_boundary_switches_only_where_a_conv_takes_onednn(size, layout):
    """At 16x16 every conv of this net is small (F.conv2d in either layout): channels_last would buy nothing, so the
    boundary keeps NCHW; at 64x64 the 32->32 convs take oneDNN and the boundary switches."""
    from fusedconv.cpu_boundary import layout_used

    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()).eval())
    fused = fusedconv.convert(copy.deepcopy(model))
    x = torch.randn(1, 3, size, size)
    assert layout_used(fused, x) == layout
    onednn = any(cpu.routes_onednn(m) for m in fused.modules())
    assert onednn == (layout == "channels_last")
    with torch.no_grad():
        out = fused(x)
        assert out.is_contiguous()
        assert max_rel_error(out, copy.deepcopy(model).double()(x.double())) < 1e-5
