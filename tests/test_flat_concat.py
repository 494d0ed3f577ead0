"""Nearest upsampling written into a concatenation (fusedconv/graph/flat_concat.py): the same values, dtype and
strides as `F.interpolate` then `torch.cat`, the eager ops wherever that is not certain, and the graph rewrite
only where moving the upsampling to the cat cannot change what it reads."""

from __future__ import annotations

import copy
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
from fusedconv.graph import flat, flat_concat  # noqa: E402
from fusedconv.graph.flat_concat import fuse_upsample_cat, upsample_cat  # noqa: E402
from fusedconv.graph.specialize import guard_table  # noqa: E402

CL = torch.channels_last


def _t(*shape, fmt=torch.contiguous_format, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = torch.randn(*shape, generator=g).to(dtype)
    else:
        x = torch.randint(0, 100, shape, generator=g, dtype=dtype)
    return x.contiguous(memory_format=fmt)


def _eager(items, dim):
    return torch.cat([F.interpolate(i[0], size=i[1], scale_factor=i[2], mode="nearest") if type(i) is tuple else i
                      for i in items], dim)


def _identical(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert out.stride() == ref.stride(), (out.stride(), ref.stride())
    assert torch.equal(out, ref)


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.uint8])
@pytest.mark.parametrize("up", [
    ((5, 7), (10, 14), None),   # size, factor 2
    ((5, 7), None, 2.0),        # scale_factor
    ((5, 7), None, (1.0, 2.0)),  # one dimension only
    ((5, 7), (5, 14), None),
    ((6, 6), 12, None),          # one int size
    ((10, 14), (10, 14), None),  # factor 1: a copy
], ids=["size2", "scale2", "scale_1x2", "size_1x2", "int_size", "factor1"])
def test_fast_path_is_eager_exactly(fmt, dtype, up):
    (h, w), size, scale = up
    x = _t(2, 6, h, w, fmt=fmt, dtype=dtype)
    out_hw = _eager([(x, size, scale)], 1).shape[2:]
    skip = _t(2, 3, *out_hw, fmt=fmt, dtype=dtype, seed=1)
    items = [(x, size, scale), skip]
    assert flat_concat._plan(items, 1) is not None  # the strided copy ran, not the eager ops
    _identical(upsample_cat(items, 1), _eager(items, 1))
    # Several upsampled parts, in any order, and dim -3.
    items = [skip, (x, size, scale), (x.mul(2) if dtype.is_floating_point else x * 2, size, scale)]
    _identical(upsample_cat(items, -3), _eager(items, -3))


@pytest.mark.parametrize("case", [
    "factor3", "factor1.5_size", "mixed_layouts", "one_channel", "dim2", "other_dtype", "grad", "subclass",
])
def test_falls_back_to_the_eager_ops(case):
    x, skip = _t(1, 4, 5, 5, fmt=CL), _t(1, 3, 10, 10, fmt=CL, seed=1)
    items, dim = [(x, (10, 10), None), skip], 1
    if case == "factor3":
        items = [(x, (15, 15), None), _t(1, 3, 15, 15, fmt=CL)]
    elif case == "factor1.5_size":
        items = [(_t(1, 4, 4, 4, fmt=CL), (6, 6), None), _t(1, 3, 6, 6, fmt=CL)]
    elif case == "mixed_layouts":
        items = [(x, (10, 10), None), skip.contiguous()]
    elif case == "one_channel":  # dense in both layouts: eager's output layout rests on tie-breaks
        items = [(x[:, :1].contiguous(memory_format=CL), (10, 10), None), skip]
    elif case == "dim2":
        items, dim = [(x, (10, 10), None), _t(1, 4, 3, 10, fmt=CL)], 2
    elif case == "other_dtype":
        items = [(x, (10, 10), None), skip.double()]
    elif case == "grad":
        x.requires_grad_(True)
    elif case == "subclass":
        items = [(x.as_subclass(_Sub), (10, 10), None), skip]
    assert flat_concat._plan(items, dim) is None
    out = upsample_cat(items, dim)
    ref = _eager(items, dim)
    assert out.stride() == ref.stride() and torch.equal(out.detach(), ref.detach())
    if case == "grad":  # gradients flow as through the eager ops
        out.sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 4.0))


class _Sub(torch.Tensor):
    pass


def test_mismatched_sizes_raise_eagers_error():
    items = [(_t(1, 4, 5, 5, fmt=CL), (10, 10), None), _t(1, 3, 9, 10, fmt=CL)]
    with pytest.raises(RuntimeError) as ours:
        upsample_cat(items, 1)
    with pytest.raises(RuntimeError) as eager:
        _eager(items, 1)
    assert str(ours.value) == str(eager.value)


class Decoder(nn.Module):
    """cat(upsample(x), skip) in the forms the rewrite must take and must leave."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x, skip):
        if self.form == "plain":
            return torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1)
        if self.form == "two":
            d = x * 2
            return torch.cat([F.interpolate(x, size=skip.shape[2:]), skip, F.interpolate(d, scale_factor=2.0)], 1)
        if self.form == "bilinear":
            return torch.cat([F.interpolate(x, scale_factor=2, mode="bilinear"), skip], dim=1)
        if self.form == "reused":  # the upsampled tensor is read twice
            u = F.interpolate(x, scale_factor=2)
            return torch.cat([u, skip], 1) + u.sum()
        if self.form == "written_between":  # x changes between the upsampling and the cat
            u = F.interpolate(x, scale_factor=2)
            x.mul_(3)
            return torch.cat([u, skip], 1)
        raise AssertionError(self.form)


@pytest.mark.parametrize("form,rewritten", [
    ("plain", 1), ("two", 1), ("bilinear", 0), ("reused", 0), ("written_between", 0)])
def test_graph_rewrite_only_where_safe(form, rewritten):
    gm = fx.symbolic_trace(Decoder(form))
    assert fuse_upsample_cat(gm.graph) == rewritten
    gm.recompile()
    x, skip = _t(1, 4, 5, 5, fmt=CL), _t(1, 3, 10, 10, fmt=CL, seed=1)
    ref = Decoder(form)(x.clone(), skip)
    out = gm(x.clone(), skip)
    assert out.stride() == ref.stride() and torch.equal(out, ref)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert (upsample_cat in calls) == bool(rewritten)
    assert (F.interpolate in calls) == (form != "plain" and form != "two")


class TinyUnet(nn.Module):
    """Encoder convs, a decoder that upsamples and concatenates the encoder's features (smp's Unet in small)."""

    def __init__(self):
        super().__init__()

        def block(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.enc = nn.ModuleList([block(3, 8), block(8, 16, 2), block(16, 24, 2)])
        self.dec = nn.ModuleList([block(24 + 16, 16), block(16 + 8, 8)])
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        feats = []
        for b in self.enc:
            x = b(x)
            feats.append(x)
        x = feats.pop()
        for b in self.dec:
            skip = feats.pop()
            x = b(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="nearest"), skip], dim=1))
        return self.head(x)


@pytest.fixture
def cats_only(monkeypatch):
    """Convert without the conv-after-upsampling rewrite (tests/test_flat_upsample_conv.py), which takes these
    cats into the convs they feed."""
    monkeypatch.setattr(flat, "fuse_upsample_conv", lambda graph: 0)


def test_converted_unet_writes_its_decoder_cats_and_stays_exact(cats_only):
    torch.manual_seed(0)
    model = randomize_bn(TinyUnet()).double().eval()
    fc = fusedconv.convert(copy.deepcopy(model), reparameterize=False)
    table = guard_table(fc)
    assert table is not None and "2 upsample + cat written as one" in " ".join(table.entries[0].described)
    assert "flat_concat_upsample_cat" in table.entries[0].src
    for fmt in (torch.contiguous_format, CL):
        x = _t(2, 3, 16, 16, fmt=fmt, dtype=torch.float64)
        with torch.no_grad():
            ref, out = model(x), fc(x)
        assert max_rel_error(out, ref) < 1e-12
        assert out.is_contiguous() == ref.is_contiguous()
    assert table.fallback_calls == 0


def test_converted_unet_float32_matches_and_takes_the_fast_path(monkeypatch, cats_only):
    torch.manual_seed(0)
    model = randomize_bn(TinyUnet()).eval()
    fc = fusedconv.convert(copy.deepcopy(model))
    fast = []
    plan = flat_concat._plan
    monkeypatch.setattr(flat_concat, "_plan", lambda items, dim: fast.append(plan(items, dim)) or fast[-1])
    x = _t(1, 3, 32, 32)
    with torch.no_grad():
        for _ in range(2):  # the first call decides the CPU layout boundary
            fast.clear()
            out = fc(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert max_rel_error(out, ref) < 1e-4
    assert len(fast) == 2 and all(p is not None for p in fast)


def test_pickled_and_copied_unet_keep_the_rewrite(cats_only):
    import io

    torch.manual_seed(0)
    model = randomize_bn(TinyUnet()).double().eval()
    fc = fusedconv.convert(copy.deepcopy(model), reparameterize=False)
    buf = io.BytesIO()
    torch.save(fc, buf)
    buf.seek(0)
    x = _t(1, 3, 16, 16, dtype=torch.float64)
    for other in (copy.deepcopy(fc), torch.load(buf, weights_only=False)):
        table = guard_table(other)
        assert "flat_concat_upsample_cat" in table.entries[0].src
        with torch.no_grad():
            assert max_rel_error(other(x), model(x)) < 1e-12
        assert table.fallback_calls == 0
