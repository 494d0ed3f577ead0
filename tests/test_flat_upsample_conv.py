"""A conv after a nearest 2x upsampling computed at the source resolution (fusedconv/graph/flat_upsample_conv.py):
the phase kernels and views are the upsampled conv exactly (float64), a converted decoder takes the path and
matches the original model, edits of the conv are seen, and everything the path does not cover runs the graph's
own calls."""

from __future__ import annotations

import copy
import functools
import io
import os
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from util import max_rel_error, randomize_bn  # noqa: E402

import fusedconv  # noqa: E402
from fusedconv import cpu  # noqa: E402
from fusedconv.graph import flat_upsample_conv as fuc  # noqa: E402
from fusedconv.graph.flat_concat import nearest_blocks  # noqa: E402
from fusedconv.graph.flat_fused import fused_call  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

CL = torch.channels_last
pytestmark = pytest.mark.skipif(not cpu.available(), reason="this PyTorch build has no oneDNN convolution ops")


def _t(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("n,cin,h,w,cout", [(1, 3, 5, 7, 4), (2, 8, 1, 1, 3), (1, 5, 6, 1, 2), (3, 2, 4, 4, 6)])
def test_phase_kernels_are_the_upsampled_3x3_conv(n, cin, h, w, cout):
    x = _t(n, cin, h, w, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    y = F.conv2d(x, fuc.phase_weight(weight), padding=1).contiguous(memory_format=CL)
    assert y.shape == (n, 4 * cout, h + 1, w + 1)
    out = torch.full((n, cout, 2 * h, 2 * w), float("nan"), dtype=torch.float64).contiguous(memory_format=CL)
    src, dst = fuc.phase_view(y, out)
    dst.copy_(src)
    assert not out.isnan().any()  # every output pixel written, by exactly one phase
    assert max_rel_error(out, ref) < 1e-13


def test_a_1x1_conv_runs_before_the_upsampling():
    x = _t(2, 5, 3, 4, dtype=torch.float64)
    weight = torch.randn(7, 5, 1, 1, dtype=torch.float64)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight)
    out = torch.full((2, 7, 6, 8), float("nan"), dtype=torch.float64).contiguous(memory_format=CL)
    src, dst = nearest_blocks(out, F.conv2d(x, weight), 2, 2)
    dst.copy_(src)
    assert max_rel_error(out, ref) < 1e-13


def _block(cin, cout, k=3, act=nn.ReLU, stride=1, dilation=1, groups=1):
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


class Decoder(nn.Module):
    """One decoder step in a given form, behind two encoder convs (so its inputs are the converted model's own
    channels_last tensors)."""

    def __init__(self, form: str, act=nn.ReLU, k: int = 3, conv_kwargs: dict | None = None):
        super().__init__()
        self.form = form
        self.low = _block(3, 8, stride=2)
        self.skip = _block(3, 6)
        self.rows = _block(3, 8, stride=(2, 1))
        cin = {"cat": 14, "reversed": 14, "alone": 8, "two": 22, "scale3": 14, "factor1": 12, "rows2": 14}[form]
        self.conv = _block(cin, 6, k=k, act=act, **(conv_kwargs or {}))

    def forward(self, x):
        low, skip = self.low(x), self.skip(x)
        if self.form == "cat":
            return self.conv(torch.cat([F.interpolate(low, scale_factor=2, mode="nearest"), skip], 1))
        if self.form == "reversed":
            return self.conv(torch.cat([skip, F.interpolate(low, size=skip.shape[2:])], dim=1))
        if self.form == "alone":
            return self.conv(F.interpolate(low, scale_factor=2.0))
        if self.form == "two":
            half = low * 0.5
            return self.conv(torch.cat([F.interpolate(low, scale_factor=2), skip,
                                        F.interpolate(half, scale_factor=2)], 1))
        if self.form == "scale3":  # not a factor of 2: the graph's own calls
            return self.conv(torch.cat([F.interpolate(low, scale_factor=3)[..., :skip.shape[2], :skip.shape[3]],
                                        skip], 1))
        if self.form == "factor1":  # an "upsampling" to the same size: a copy
            return self.conv(torch.cat([F.interpolate(skip, size=skip.shape[2:]), skip], 1))
        if self.form == "rows2":  # rows only
            return self.conv(torch.cat([F.interpolate(self.rows(x), scale_factor=(2.0, 1.0)), skip], 1))
        raise AssertionError(self.form)


@pytest.fixture
def fast(monkeypatch):
    """The calls that computed at the source resolution."""
    taken = []
    at_source = fuc._at_source_resolution

    def counted(state, items):
        y = at_source(state, items)
        taken.append(y is not None)
        return y

    monkeypatch.setattr(fuc, "_at_source_resolution", counted)
    return taken


def _check(model, fast, x, expect_fast: bool, tol=1e-4, **convert_kwargs):
    model = randomize_bn(model).eval()
    fc = fusedconv.convert(copy.deepcopy(model), **convert_kwargs)
    with torch.no_grad():
        fc(x)  # the first call decides the CPU layout boundary and routes the conv
        fast.clear()
        out = fc(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert max_rel_error(out, ref) < tol
    assert fast == [True] if expect_fast else not any(fast)
    return model, fc, out


@pytest.mark.parametrize("form", ["cat", "reversed", "alone", "two"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Hardswish, nn.Identity, nn.ReLU6, nn.GELU,
                                 functools.partial(nn.LeakyReLU, 0.2)],
                         ids=["relu", "silu", "hardswish", "identity", "relu6", "gelu", "leaky_relu"])
@pytest.mark.parametrize("k", [3, 1])
def test_converted_decoder_computes_at_the_source_resolution(fast, form, act, k):
    torch.manual_seed(0)
    _, fc, out = _check(Decoder(form, act, k), fast, _t(2, 3, 12, 10), True)
    assert out.is_contiguous(memory_format=CL)
    table = guard_table(fc)
    assert "1 convs after an upsampling computed at the source resolution" in " ".join(table.entries[0].described)
    assert table.fallback_calls == 0


@pytest.mark.parametrize("conv_kwargs", [dict(stride=2), dict(dilation=2), dict(groups=2), dict(k=5)],
                         ids=["stride2", "dilated", "grouped", "5x5"])
def test_other_geometries_run_the_graph_calls(fast, conv_kwargs):
    torch.manual_seed(0)
    kwargs = dict(conv_kwargs)
    k = kwargs.pop("k", 3)
    _check(Decoder("cat", k=k, conv_kwargs=kwargs), fast, _t(2, 3, 12, 12), False)


@pytest.mark.parametrize("form", ["scale3", "factor1", "rows2"])
def test_other_factors_run_the_graph_calls(fast, form):
    torch.manual_seed(0)
    _check(Decoder(form), fast, _t(2, 3, 12, 12), False)


def test_float64_and_gradients_run_the_graph_calls(fast):
    torch.manual_seed(0)
    model = randomize_bn(Decoder("cat")).double().eval()
    fc = fusedconv.convert(copy.deepcopy(model))
    x = _t(1, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        fc(x)
        fast.clear()
        assert max_rel_error(fc(x), model(x)) < 1e-12
    assert not any(fast)
    fc, model = fc.float(), model.float()
    x = _t(1, 3, 12, 12).requires_grad_()
    out = fc(x)
    assert out.requires_grad and max_rel_error(out.detach(), model(x).detach()) < 1e-4
    assert not any(fast)


def test_small_convs_at_batch_1_stay_on_their_route(fast):
    # The module routes a small batch-1 conv to F.conv2d (cpu.small_conv_macs: oneDNN's per-call cost exceeds
    # such a conv's work), and two oneDNN calls would cost more still: the graph's calls run.
    torch.manual_seed(0)
    _check(Decoder("cat"), fast, _t(1, 3, 12, 12), False)
    # ... also once the module has run the oneDNN route for a larger input.
    model = randomize_bn(Decoder("cat")).eval()
    fc = fusedconv.convert(copy.deepcopy(model))
    with torch.no_grad():
        for x in (_t(2, 3, 12, 12), _t(2, 3, 12, 12), _t(1, 3, 12, 12), _t(1, 3, 12, 12)):
            fast.clear()
            out = fc(x)
        assert max_rel_error(out, copy.deepcopy(model).double()(x.double())) < 1e-4
    assert not any(fast)


def test_edits_of_the_conv_are_seen(fast):
    torch.manual_seed(0)
    x = _t(2, 3, 12, 12)
    model, fc, _ = _check(Decoder("cat"), fast, x, True)
    with torch.no_grad():
        for m in (model, fc):
            m.conv[0].weight.mul_(-1.5)  # in place: the version counter moves
        fc.conv[0].shift.add_(0.25)  # shift = BN bias - mean * scale
        model.conv[1].bias.add_(0.25)
        ref = copy.deepcopy(model).double()(x.double())
        fast.clear()
        # The first call after an edit is the module's own (it refolds); the next computes at the source
        # resolution again, from the new fold.
        assert all(max_rel_error(fc(x), ref) < 1e-4 for _ in range(2))
    assert fast == [True]
    with torch.no_grad():
        model.conv[0].weight.data.add_(0.25)  # through .data: seen after refresh
        fc.conv[0].weight.data.add_(0.25)
        fusedconv.refresh(fc)
        ref = copy.deepcopy(model).double()(x.double())
        fast.clear()
        assert all(max_rel_error(fc(x), ref) < 1e-4 for _ in range(2))
    assert fast == [True]


def test_copies_and_frozen_models_keep_the_path(fast):
    torch.manual_seed(0)
    model = randomize_bn(Decoder("two")).eval()
    fc = fusedconv.convert(copy.deepcopy(model))
    buf = io.BytesIO()
    torch.save(fc, buf)
    buf.seek(0)
    x = _t(2, 3, 8, 8)
    ref = copy.deepcopy(model).double()(x.double())
    for other in (copy.deepcopy(fc), torch.load(buf, weights_only=False),
                  fusedconv.convert(copy.deepcopy(model), freeze=True)):
        with torch.no_grad():
            other(x)
            fast.clear()
            assert max_rel_error(other(x), ref) < 1e-4
        assert fast == [True]


class Conv(nn.Conv2d):
    """A conv called as flat_fused.fused_call calls a FusedConv2d leaf."""

    def forward(self, x, residual=None, residual_private=False):
        return super().forward(x)


class Reused(nn.Module):
    def __init__(self, form):
        super().__init__()
        self.form = form
        self.conv = Conv(6, 4, 3, padding=1)

    def forward(self, x, skip):
        u = F.interpolate(x, scale_factor=2)
        if self.form == "plain":
            return self.conv(u)
        if self.form == "reused":  # the upsampled tensor is read again
            return self.conv(u) + u.sum()
        if self.form == "written_between":  # x changes between the upsampling and the conv
            x.mul_(3)
            return self.conv(u)
        raise AssertionError(self.form)


class _ConvLeaf(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Conv) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("form,rewritten", [("plain", 1), ("reused", 0), ("written_between", 0)])
def test_graph_rewrite_only_where_safe(form, rewritten):
    model = Reused(form)
    gm = fx.GraphModule(model, _ConvLeaf().trace(model))
    # fused_call stands in for the FusedConv2d leaf call the flat graph makes of the conv.
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            with gm.graph.inserting_before(node):
                conv = gm.graph.get_attr("conv")
                new = gm.graph.call_function(fused_call, (None, conv, *node.args))
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    assert fuc.fuse_upsample_conv(gm.graph) == rewritten
    gm.recompile()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert (fuc.upsample_conv in calls) == bool(rewritten)
    x, skip = _t(1, 6, 5, 5), _t(1, 3, 10, 10, seed=1)
    with torch.no_grad():
        assert torch.equal(gm(x.clone(), skip), model(x.clone(), skip))


def test_smp_unet_decoder_convs_all_take_the_path(fast):
    smp = pytest.importorskip("segmentation_models_pytorch")
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=2, decoder_channels=(32, 16, 16, 8, 8))
    model = randomize_bn(model).eval()
    fc = fusedconv.convert(copy.deepcopy(model))
    assert "5 convs after an upsampling" in " ".join(guard_table(fc).entries[0].described)
    x = _t(2, 3, 64, 64)  # (at batch 1 its small first decoder convs stay on F.conv2d: cpu.small_conv_macs)
    with torch.no_grad():
        fc(x)
        fast.clear()
        out = fc(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert fast == [True] * 5
    assert max_rel_error(out, ref) < 1e-4
