"""fusedconv/layout.py: a fused layer's output has the memory format the original conv + BN + activation give it —
channels_last when the input or the weight is (a model moved with `.to(memory_format=torch.channels_last)`) — so
code that reads the layout (`is_contiguous()`, `randn_like`) computes the same; checked in float64 against the
original, on every path (the eager CPU routes, the autograd path), for the fused layer kinds that fold a 2-d
weight."""

from __future__ import annotations

import copy
import itertools
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusedconv
from fusedconv.layout import _strides, dense_copy, dense_format, suggests_channels_last

CL = torch.channels_last


def _random_weight(rng: random.Random) -> torch.Tensor:
    """A 4-d tensor with sizes 1-4 in a random dimension order, sometimes a slice (not dense)."""
    shape = [rng.choice([1, 2, 3, 4]) for _ in range(4)]
    perm = list(range(4))
    rng.shuffle(perm)
    phys = [shape[p] for p in perm]
    if rng.random() < 0.3:
        base = torch.randn(phys[0] * 2, *phys[1:])[: phys[0]]
    else:
        base = torch.randn(*phys)
    return base.permute(*[perm.index(i) for i in range(4)])


def test_suggests_channels_last_is_what_pytorchs_conv_answers():
    rng, seen = random.Random(0), 0
    for _ in range(400):
        w = _random_weight(rng)
        y = F.conv2d(torch.randn(1, w.shape[1], 5, 6), w)
        cout, ho, wo = y.shape[1:]
        cl, nchw = y.stride() == (ho * wo * cout, 1, wo * cout, cout), y.stride() == (cout * ho * wo, ho * wo, wo, 1)
        if cl == nchw:
            continue  # the two layouts' strides coincide for this output
        seen += 1
        assert cl == suggests_channels_last(w), (tuple(w.shape), w.stride())
    assert seen > 200


def test_strides_are_those_of_a_new_tensor():
    for shape in itertools.product([0, 1, 2, 3], repeat=4):
        for fmt in (torch.contiguous_format, CL):
            assert _strides(shape, fmt) == torch.empty(shape, memory_format=fmt).stride()


def test_dense_copy_gives_exact_strides():
    # A depthwise weight moved to channels_last: contiguous but for its size-1 dimension, and read as channels_last
    # (`.contiguous()` would keep it so).
    dw = torch.randn(4, 1, 3, 3).to(memory_format=CL)
    assert dw.is_contiguous() and suggests_channels_last(dw) and suggests_channels_last(dw.contiguous())
    assert dense_copy(dw, dw, 4) is dw
    plain = dense_copy(dw.clone(memory_format=torch.contiguous_format), dw, 4)
    assert suggests_channels_last(plain) and torch.equal(plain, dw)
    one = torch.randn(1, 1, 3, 3).to(memory_format=CL)  # a conv to one channel: NCHW strides (layout.dense_format)
    assert suggests_channels_last(one) and dense_format(one, 1) == torch.contiguous_format
    assert not suggests_channels_last(dense_copy(one, one, 1))
    w8 = torch.randn(8, 3, 3, 3).to(memory_format=CL)
    assert dense_copy(w8, w8, 8) is w8 and suggests_channels_last(dense_copy(w8.contiguous(), w8, 8))
    assert torch.equal(dense_copy(w8.contiguous(), w8, 8), w8)


class LayoutReader(nn.Module):
    """Reads its input's layout: a branch on it, and noise drawn in memory order (randn_like)."""

    def forward(self, x):
        y = x * 2.0 if x.is_contiguous() else x - 1.0
        torch.manual_seed(7)
        return y + 0.01 * torch.randn_like(y)


def _models():
    def cba(cin, cout, k=3, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return layers + ([nn.ReLU()] if act else [])
    return {
        "conv_bn_act": lambda: nn.Sequential(*cba(3, 8), LayoutReader(), *cba(8, 6, k=1, act=False), LayoutReader()),
        "depthwise": lambda: nn.Sequential(*cba(3, 6), *cba(6, 6, groups=6), LayoutReader()),
        "one_channel": lambda: nn.Sequential(*cba(3, 1), LayoutReader(), *cba(1, 4), LayoutReader()),
        "post_bn": lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), LayoutReader()),
        "transposed": lambda: nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                                            LayoutReader()),
        "wide": lambda: nn.Sequential(*cba(16, 64), LayoutReader(), *cba(64, 64), LayoutReader()),
    }


def _randomized(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


TOL = {torch.float64: 1e-12, torch.float32: 1e-4}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("when", ["before_convert", "after_convert"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", sorted(_models()))
def test_channels_last_weights_give_the_originals_layout_and_values(kind, dtype, when):
    torch.manual_seed(0)
    original = _randomized(_models()[kind]()).to(dtype)
    cin = next(m for m in original.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))).in_channels
    if when == "before_convert":
        original = original.to(memory_format=CL)
        converted = fusedconv.convert(copy.deepcopy(original))
    else:
        converted = fusedconv.convert(copy.deepcopy(original))
        with torch.no_grad():
            converted(torch.randn(1, cin, 12, 12, dtype=dtype))  # states built for the old weights first
        original, converted = original.to(memory_format=CL), converted.to(memory_format=CL)
    assert any(type(m).__module__.startswith("fusedconv") for m in converted.modules())  # something was fused
    for x in (torch.randn(1, cin, 12, 12, dtype=dtype), torch.randn(2, cin, 12, 12, dtype=dtype).to(memory_format=CL)):
        with torch.no_grad():
            ref = original(x)
            for _ in range(2):
                out = converted(x)
                assert out.stride() == ref.stride() and _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("kind", ["conv_bn_act", "transposed"])
def test_the_autograd_path_gives_the_originals_layout(kind):
    original = _randomized(_models()[kind]()).double().to(memory_format=CL)
    converted = fusedconv.convert(copy.deepcopy(original))
    x = torch.randn(1, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    ref, out = original(x), converted(x)
    assert out.stride() == ref.stride() and _rel(out, ref) < 1e-12
    g_ref, = torch.autograd.grad(ref.sum(), x)
    g_out, = torch.autograd.grad(out.sum(), x)
    assert _rel(g_out, g_ref) < 1e-12
