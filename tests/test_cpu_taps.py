"""The CPU tap route for convs to one output channel (fusedconv/cpu_taps.py, cpu.TAPS) and convert making a lone such
conv a FusedConv2d for it (graph/legality.lone_conv_gains).

The route sums the taps in another order than a direct conv, so "same function" is checked in float64 against
nn.Conv2d (-> BatchNorm -> activation, + residual), to ~1e-13, and float32 to fp32 rounding; which route a call took
is read from the module's route table.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu, cpu_taps, ops  # noqa: E402
from fusedconv.activations import ActivationSpec  # noqa: E402
from fusedconv.graph.legality import LONE_DETAIL  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

CL = torch.channels_last
# Large enough for the route (cpu_taps.MIN_OUTPUT_PIXELS) at every padding used below.
SIDE = 52


@pytest.mark.parametrize("c_out, k, padding, dilation", [(1, 3, 1, 1), (2, 3, 0, 1), (3, 3, 3, 1), (1, 5, 2, 1),
                                                        (1, 3, 2, 2), (2, 3, 1, 3), (1, 2, 0, 1), (1, 3, 20, 20)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("batch", [1, 2])
def test_conv_taps_is_conv2d_in_float64(c_out, k, padding, dilation, fmt, batch):
    torch.manual_seed(c_out * 100 + k * 10 + padding)
    x = torch.randn(batch, 5, 13, 17, dtype=torch.float64).contiguous(memory_format=fmt)
    w = torch.randn(c_out, 5, k, k, dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64)
    expect = F.conv2d(x, w, b, padding=padding, dilation=dilation)
    got = cpu_taps.conv_taps(x, cpu_taps.tap_weight(w), b, (k, k), (padding, padding), (dilation, dilation),
                             expect.shape[2:])
    assert got.shape == expect.shape
    assert max_rel_error(got, expect) < 1e-13
    nobias = cpu_taps.conv_taps(x, cpu_taps.tap_weight(w), None, (k, k), (padding, padding), (dilation, dilation),
                                expect.shape[2:])
    assert max_rel_error(nobias, F.conv2d(x, w, None, padding=padding, dilation=dilation)) < 1e-13


def _fused(c_out, act="relu", k=3, stride=1, groups=1, c_in=6, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups), nn.BatchNorm2d(c_out)).eval()
    randomize_bn(ref, seed)
    ref = ref.to(dtype)
    return ref, FusedConv2d.from_modules(ref[0], ref[1], act)


def _routes(module):
    return set(module._cpu_state.routes.values())


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("act, with_residual", [("relu", False), ("silu", True), ("identity", True),
                                               ("leaky_relu", True)])
def test_fused_module_takes_the_tap_route(dtype, tol, fmt, act, with_residual):
    c_out = 1
    ref, fused = _fused(c_out, ActivationSpec(act, 0.1 if act == "leaky_relu" else 0.0), dtype=dtype)
    x = torch.randn(2, 6, SIDE, SIDE, dtype=dtype).contiguous(memory_format=fmt)
    residual = torch.randn(2, c_out, SIDE, SIDE, dtype=dtype) if with_residual else None
    with torch.no_grad():
        y = fused(x, residual)
        r = copy.deepcopy(ref).double()
        expect = r(x.double()) + (residual.double() if with_residual else 0)
        expect = _act(expect, act)
    assert _routes(fused) == {cpu.TAPS}
    assert max_rel_error(y, expect) < tol
    # The output keeps the input's layout, as on every CPU route.
    assert y.is_contiguous(memory_format=fmt)


def _act(t, name):
    return {"relu": torch.relu, "silu": F.silu, "identity": lambda v: v,
            "leaky_relu": lambda v: F.leaky_relu(v, 0.1)}[name](t)


@pytest.mark.parametrize("case", ["small_output", "two_outputs", "7x7", "stride_2", "1x1"])
def test_other_convs_keep_their_routes(case):
    if case == "small_output":
        _, fused = _fused(1)
        x = torch.randn(1, 6, 20, 20)
    elif case == "two_outputs":
        _, fused = _fused(2)
        x = torch.randn(1, 6, SIDE, SIDE)
    elif case == "7x7":  # 49 taps > MAX_TAPS
        _, fused = _fused(1, k=7)
        x = torch.randn(1, 6, SIDE, SIDE)
    elif case == "stride_2":
        _, fused = _fused(1, stride=2)
        x = torch.randn(1, 6, 2 * SIDE, 2 * SIDE)
    else:
        _, fused = _fused(1, k=1)
        x = torch.randn(1, 6, SIDE, SIDE)
    with torch.no_grad():
        fused(x)
    assert cpu.TAPS not in _routes(fused)


def test_edits_are_seen_and_a_new_weight_shape_reroutes():
    _, fused = _fused(1)
    x = torch.randn(1, 6, SIDE, SIDE)
    with torch.no_grad():
        before = fused(x)
        fused.weight.data = torch.randn_like(fused.weight)  # keeps the version counter, moves the data pointer
        after = fused(x)
        assert _routes(fused) == {cpu.TAPS}
        fresh = FusedConv2d(fused.weight, fused.scale, fused.shift, padding=1, activation="relu")
        cpu.enabled = False  # (the reference takes no fast-path state of its own)
        try:
            expect = fresh(x)
        finally:
            cpu.enabled = True
        assert max_rel_error(after, expect) < 1e-5 and max_rel_error(after, before) > 1e-3
        # Eight output channels: the same module no longer takes the route.
        fused.weight = nn.Parameter(torch.randn(8, 6, 3, 3), requires_grad=False)
        fused.scale, fused.shift = torch.ones(8), torch.zeros(8)
        y = fused(x)
    assert _routes(fused) == {cpu.FOLDED}
    assert max_rel_error(y, F.conv2d(x, fused.weight, None, padding=1).relu()) < 1e-5


class _Net(nn.Module):
    """A body, then a lone 3x3 conv to `classes` channels in a traced forward and another as a Sequential head (two
    outputs: a sum of the two would be re-parameterized into one conv first)."""

    def __init__(self, classes=1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.aux = nn.Conv2d(8, classes, 3, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, classes, 3, padding=1), nn.Identity())

    def forward(self, x):
        f = self.body(x)
        return self.head(f), self.aux(f)


@pytest.mark.parametrize("flatten", [True, False])
def test_convert_makes_lone_few_channel_convs_fused_modules(flatten):
    model = randomize_bn(_Net().eval(), 3).double()  # converted in float64: the fold is then float64 too
    x = torch.randn(1, 3, SIDE, SIDE, dtype=torch.float64)
    fused, report = fusedconv.convert(model, return_report=True, flatten=flatten)
    assert type(fused.aux) is FusedConv2d and type(fused.head[0]) is FusedConv2d
    assert fused.aux.cuda_kernel is False and fused.head[0].cuda_kernel is False
    assert type(fused.body[0]) is FusedConv2d and fused.body[0].cuda_kernel is True
    assert sum(r.detail == LONE_DETAIL and r.status == "fused" for r in report.rows) == 2, report
    with torch.no_grad():
        for _ in range(3):  # later calls: the flat forward's direct calls take the route too
            for got, expect in zip(fused(x), model(x)):
                assert max_rel_error(got, expect) < 1e-12
    assert _routes(fused.head[0]) == {cpu.TAPS} and _routes(fused.aux) == {cpu.TAPS}


def test_convert_leaves_lone_convs_with_more_outputs_alone():
    model = randomize_bn(_Net(classes=2).eval(), 3)
    fused = fusedconv.convert(model)
    assert type(fused.aux) is nn.Conv2d and type(fused.head[0]) is nn.Conv2d


def test_lone_conv_keeps_the_library_conv_where_the_kernel_would_run(monkeypatch):
    # On CUDA FusedConv2d calls the Triton op; a lone conv made a FusedConv2d for its CPU route keeps the library
    # conv there. Here the op's routing is patched to answer True for a CPU tensor, and the op to fail if called.
    model = randomize_bn(_Net().eval(), 3)
    fused = fusedconv.convert(model, flatten=False)
    x = torch.randn(1, 3, SIDE, SIDE)

    def no_op(*args, **kwargs):
        raise AssertionError("the fused op was called for a lone conv")

    monkeypatch.setattr(ops, "use_kernel", lambda x, w: True)
    monkeypatch.setattr(ops, "conv_bn_act", no_op)
    with torch.no_grad():
        f = model.body(x)
        assert max_rel_error(fused.head[0](f), model.head[0](f)) < 1e-5
        with pytest.raises(AssertionError, match="fused op was called"):
            fused.body[0](x)  # the body's conv + BN + ReLU does take the op
