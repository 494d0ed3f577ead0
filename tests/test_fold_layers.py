"""Fold math for every conv-like layer against PyTorch's own modules in float64.

Conv1d / Conv3d and ConvTranspose1d/2d/3d + BatchNorm (groups, dilation, stride, output_padding, bias or not,
affine or not), Linear + BatchNorm1d on 2-D inputs, a BatchNorm after the activation as a post-affine, and a
BatchNorm before a conv / linear where that is exact — plus the refusals (zero padding, transposed conv).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedconv import fold
from util import max_rel_error, randomize_bn

TOL64 = 1e-12
BN_FOR = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_FOR = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT_FOR = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SPATIAL = {1: (11,), 2: (7, 6), 3: (5, 4, 6)}


def random_bn(cls, c, *, affine=True, seed=0):
    bn = cls(c, affine=affine)
    randomize_bn(nn.Sequential(bn), seed)
    return bn.eval().double()


def _geometries():
    return [dict(stride=s, dilation=d, groups=g, bias=b)
            for s, d, g, b in itertools.product([1, 2], [1, 2], [1, 3], [False, True])][::2]


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("geometry", _geometries(), ids=lambda g: "-".join(f"{k}{int(v)}" for k, v in g.items()))
@pytest.mark.parametrize("affine", [True, False])
@torch.no_grad()
def test_conv_nd_bn_fold(nd, geometry, affine):
    torch.manual_seed(nd)
    conv = CONV_FOR[nd](6, 9, 3, padding=1, **geometry).double()
    bn = random_bn(BN_FOR[nd], 9, affine=affine, seed=nd)
    x = torch.randn(2, 6, *SPATIAL[nd], dtype=torch.float64)
    w, b = fold.fold_layer_bn_weights(conv, bn)
    assert w.shape == conv.weight.shape and w.dtype == torch.float64
    assert max_rel_error(conv._conv_forward(x, w, b), bn(conv(x))) < TOL64


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("stride,output_padding,dilation,groups,bias", [
    (1, 0, 1, 1, True), (2, 1, 1, 1, False), (2, 1, 2, 3, True), (3, 2, 1, 3, False), (2, 0, 1, 1, True),
])
@pytest.mark.parametrize("affine", [True, False])
@torch.no_grad()
def test_conv_transpose_bn_fold(nd, stride, output_padding, dilation, groups, bias, affine):
    torch.manual_seed(10 + nd)
    convt = CONVT_FOR[nd](6, 9, 3, stride=stride, padding=1, output_padding=output_padding, dilation=dilation,
                          groups=groups, bias=bias).double()
    bn = random_bn(BN_FOR[nd], 9, affine=affine, seed=nd + 3)
    x = torch.randn(2, 6, *SPATIAL[nd], dtype=torch.float64)
    w, b = fold.fold_layer_bn_weights(convt, bn)
    assert w.shape == convt.weight.shape  # (Cin, Cout/groups, k...) kept
    assert max_rel_error(convt_apply(convt, x, w, b), bn(convt(x))) < TOL64
    # The layout trap the fold must avoid: scaling along dim 0 as for a conv is wrong (when it even fits).
    scale = fold.layer_bn_scale_shift(convt, bn, torch.float64)[0]
    if convt.weight.shape[0] <= scale.numel():
        wrong = convt.weight * scale[: convt.weight.shape[0]].view(-1, *([1] * (convt.weight.dim() - 1)))
        assert max_rel_error(convt_apply(convt, x, wrong, b), bn(convt(x))) > 1e-3


def convt_apply(convt, x, w, b):
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[x.dim() - 2]
    return fn(x, w, b, convt.stride, convt.padding, convt.output_padding, convt.groups, convt.dilation)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@torch.no_grad()
def test_linear_bn1d_fold(bias, affine):
    torch.manual_seed(20)
    lin = nn.Linear(7, 5, bias=bias).double()
    bn = random_bn(nn.BatchNorm1d, 5, affine=affine, seed=21)
    x = torch.randn(4, 7, dtype=torch.float64)
    w, b = fold.fold_layer_bn_weights(lin, bn)
    assert max_rel_error(nn.functional.linear(x, w, b), bn(lin(x))) < TOL64


@torch.no_grad()
def test_linear_bn1d_on_3d_input_is_an_output_affine_along_dim_1():
    """BatchNorm1d on (N, C, L) normalises dim 1, not the linear's out features: scale/shift along dim 1."""
    torch.manual_seed(22)
    lin = nn.Linear(7, 5).double()
    bn = random_bn(nn.BatchNorm1d, 3, seed=23)
    x = torch.randn(4, 3, 7, dtype=torch.float64)
    scale, shift = fold.fold_bn(bn, None, torch.float64)
    out = lin(x) * scale.view(1, -1, 1) + shift.view(1, -1, 1)
    assert max_rel_error(out, bn(lin(x))) < TOL64


@pytest.mark.parametrize("nd", [1, 2, 3])
@torch.no_grad()
def test_post_affine_bn_after_activation(nd):
    torch.manual_seed(30 + nd)
    conv = CONV_FOR[nd](4, 6, 3, padding=1).double()
    bn1, bn2 = random_bn(BN_FOR[nd], 6, seed=31), random_bn(BN_FOR[nd], 6, seed=32)
    x = torch.randn(2, 4, *SPATIAL[nd], dtype=torch.float64)
    s1, t1 = fold.layer_bn_scale_shift(conv, bn1, torch.float64)
    s2, t2 = fold.post_affine(bn2, torch.float64)
    view = (1, -1) + (1,) * nd
    y = conv._conv_forward(x, conv.weight, None) * s1.view(view) + t1.view(view)
    y = torch.nn.functional.gelu(y) * s2.view(view) + t2.view(view)
    assert max_rel_error(y, bn2(nn.functional.gelu(bn1(conv(x))))) < TOL64


@pytest.mark.parametrize("nd,kernel,padding,padding_mode,groups", [
    (2, 1, 0, "zeros", 1), (2, 3, 0, "zeros", 3), (1, 3, 0, "zeros", 1), (3, 1, 0, "zeros", 3),
    (2, 3, 1, "reflect", 1), (1, 3, 1, "replicate", 3), (2, 3, 1, "circular", 1),
])
@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_bn_before_conv_folds_when_exact(nd, kernel, padding, padding_mode, groups, bias):
    torch.manual_seed(40 + nd)
    bn = random_bn(BN_FOR[nd], 6, seed=41)
    conv = CONV_FOR[nd](6, 9, kernel, padding=padding, padding_mode=padding_mode, groups=groups, bias=bias).double()
    assert fold.bn_before_reason(bn, conv) is None
    x = torch.randn(2, 6, *SPATIAL[nd], dtype=torch.float64)
    w, b = fold.fold_bn_into_next(bn, conv)
    assert max_rel_error(conv._conv_forward(x, w, b), conv(bn(x))) < TOL64


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_bn_before_linear_folds(bias):
    torch.manual_seed(50)
    bn = random_bn(nn.BatchNorm1d, 7, seed=51)
    lin = nn.Linear(7, 5, bias=bias).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    w, b = fold.fold_bn_into_next(bn, lin)
    assert max_rel_error(nn.functional.linear(x, w, b), lin(bn(x))) < TOL64


@torch.no_grad()
def test_bn_before_zero_padded_conv_is_refused_and_really_inexact():
    bn = random_bn(nn.BatchNorm2d, 4, seed=60)
    conv = nn.Conv2d(4, 5, 3, padding=1).double()
    reason = fold.bn_before_reason(bn, conv)
    assert reason is not None and "zero-padded" in reason
    with pytest.raises(ValueError, match=r"bn: cannot fold into the following Conv2d: .*zero-padded"):
        fold.fold_bn_into_next(bn, conv)
    # The refusal is real: folding as if there were no padding differs at the borders.
    s, t = fold.fold_bn(bn, None, torch.float64)
    w = conv.weight * s.view(1, -1, 1, 1)
    b = conv.bias + (conv.weight * t.view(1, -1, 1, 1)).sum((1, 2, 3))
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    assert max_rel_error(conv._conv_forward(x, w, b), conv(bn(x))) > 1e-3


def test_bn_before_transposed_conv_and_mismatches_are_refused():
    bn = random_bn(nn.BatchNorm2d, 4)
    assert "transposed" in fold.bn_before_reason(bn, nn.ConvTranspose2d(4, 5, 1))
    assert "5 input channels" in fold.bn_before_reason(bn, nn.Conv2d(5, 5, 1))
    assert "eval" in fold.bn_before_reason(random_bn(nn.BatchNorm2d, 4).train(), nn.Conv2d(4, 5, 1))
    assert "expected nn.Conv1d" in fold.bn_before_reason(bn, nn.ReLU())


def test_layer_refusals_name_the_argument():
    with pytest.raises(TypeError, match=r"layer: expected nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or nn.Linear"):
        fold.fold_layer_bn_weights(nn.ReLU(), random_bn(nn.BatchNorm1d, 3))
    with pytest.raises(ValueError, match=r"bn: expected 5 features to match the Linear's output channels, got 3"):
        fold.layer_bn_scale_shift(nn.Linear(2, 5), random_bn(nn.BatchNorm1d, 3))
    with pytest.raises(RuntimeError, match=r"bn: expected a BatchNorm in eval mode"):
        fold.layer_bn_scale_shift(nn.ConvTranspose2d(2, 3, 1), random_bn(nn.BatchNorm2d, 3).train())
    with pytest.raises(ValueError, match=r"layer weight: expected the folded values to fit torch.float16"):
        bn = nn.BatchNorm1d(2).eval()
        bn.running_var.fill_(1e-12)
        bn.eps = 0.0
        fold.fold_layer_bn_weights(nn.Linear(2, 2).half(), bn)


def test_layer_without_bn_gives_its_bias():
    convt = nn.ConvTranspose3d(2, 4, 1, bias=True)
    scale, shift = fold.layer_bn_scale_shift(convt, None)
    assert torch.equal(scale, torch.ones(4)) and torch.equal(shift, convt.bias.detach())
