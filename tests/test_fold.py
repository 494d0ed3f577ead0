"""Fold math against PyTorch: conv(x) * scale + shift == BatchNorm(eval)(conv(x)) and the folded conv weights.

Geometries (stride / padding / dilation / groups / bias), BN variants (affine or not, custom eps,
FrozenBatchNorm2d, BatchNorm1d/3d after Conv1d/3d), fp32 and fp64, random statistics; and the refusals
(training mode, no running statistics, non-finite or negative statistics, mismatched sizes), each asserting
that its message names the offending argument.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error, randomize_bn  # noqa: E402

from fusedconv import fold  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def random_bn(cls, c, *, affine=True, eps=1e-5, seed=0, dtype=torch.float32):
    bn = cls(c, eps=eps, affine=affine)
    randomize_bn(nn.Sequential(bn), seed)
    return bn.eval().to(dtype)


GEOMETRIES = [
    dict(stride=s, padding=p, dilation=d, groups=g, bias=b)
    for s, p, d, g, b in itertools.product([1, 2], [0, 1], [1, 2], [1, 2, 8], [False, True])
][::2]  # a half of the product that still covers every value of every axis with every other


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "-".join(f"{k}{int(v)}" for k, v in g.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@torch.no_grad()
def test_scale_shift_match_batchnorm(geometry, dtype):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, **geometry).to(dtype)
    bn = random_bn(nn.BatchNorm2d, 16, seed=1, dtype=dtype)
    x = torch.randn(2, 8, 11, 9, dtype=dtype)
    expected = bn(conv(x))
    scale, shift = fold.conv_bn_scale_shift(conv, bn, dtype=dtype)
    assert scale.dtype == shift.dtype == dtype
    out = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    out = out * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    assert max_rel_error(out, expected) < TOL[dtype]
    # The folded conv (weight and bias) computes the same.
    w, b = fold.fold_conv_bn_weights(conv, bn)
    assert w.dtype == b.dtype == dtype
    folded = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert max_rel_error(folded, expected) < TOL[dtype]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.1])
@torch.no_grad()
def test_affine_and_eps(affine, eps):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    bn = random_bn(nn.BatchNorm2d, 6, affine=affine, eps=eps, seed=3)
    x = torch.randn(2, 4, 7, 7)
    w, b = fold.fold_conv_bn_weights(conv, bn)
    assert max_rel_error(F.conv2d(x, w, b, padding=1), bn(conv(x))) < TOL[torch.float32]


@pytest.mark.parametrize("conv_cls,bn_cls,shape", [
    (nn.Conv1d, nn.BatchNorm1d, (2, 4, 13)),
    (nn.Conv3d, nn.BatchNorm3d, (2, 4, 5, 6, 7)),
])
@torch.no_grad()
def test_conv1d_and_conv3d(conv_cls, bn_cls, shape):
    torch.manual_seed(4)
    conv = conv_cls(4, 6, 3, padding=1, groups=2, bias=True)
    bn = random_bn(bn_cls, 6, seed=5)
    x = torch.randn(*shape)
    w, b = fold.fold_conv_bn_weights(conv, bn)
    assert w.shape == conv.weight.shape
    folded = conv._conv_forward(x, w, b)
    assert max_rel_error(folded, bn(conv(x))) < TOL[torch.float32]


@torch.no_grad()
def test_frozen_batchnorm():
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(6)
    conv = nn.Conv2d(3, 5, 3, bias=False)
    frozen = FrozenBatchNorm2d(5, eps=1e-3)
    frozen.running_mean.copy_(torch.randn(5))
    frozen.running_var.copy_(torch.rand(5) + 0.5)
    frozen.weight.copy_(torch.rand(5) + 0.5)
    frozen.bias.copy_(torch.randn(5))
    frozen.train()  # FrozenBatchNorm2d has no training behaviour: still foldable
    assert fold.is_batchnorm(frozen) and fold.is_frozen_batchnorm(frozen)
    x = torch.randn(2, 3, 8, 8)
    w, b = fold.fold_conv_bn_weights(conv, frozen)
    assert max_rel_error(F.conv2d(x, w, b), frozen(conv(x))) < TOL[torch.float32]


@torch.no_grad()
def test_sync_batchnorm_in_eval_folds():
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 1)
    sync = random_bn(nn.SyncBatchNorm, 4, seed=8)
    plain = nn.BatchNorm2d(4).eval()
    plain.load_state_dict(sync.state_dict())
    x = torch.randn(2, 3, 5, 5)
    w, b = fold.fold_conv_bn_weights(conv, sync)
    assert max_rel_error(F.conv2d(x, w, b), plain(conv(x))) < TOL[torch.float32]


def test_fold_is_computed_in_float64_whatever_the_dtype():
    """A var + eps that is 0 in fp16 arithmetic (tiny var, tiny eps) still gives the exact fp64 scale."""
    bn = nn.BatchNorm2d(2, eps=1e-8).eval().half()
    bn.running_var.fill_(1e-7)  # subnormal in fp16
    scale, shift = fold.fold_bn(bn)
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all()
    exact = 1.0 / (float(bn.running_var[0]) + bn.eps) ** 0.5
    assert abs(float(scale[0]) - exact) / exact < 1e-6


def test_bn_none_gives_identity_scale_and_conv_bias():
    conv = nn.Conv2d(3, 4, 1, bias=True)
    scale, shift = fold.conv_bn_scale_shift(conv, None)
    assert torch.equal(scale, torch.ones(4)) and torch.equal(shift, conv.bias.detach())
    scale, shift = fold.conv_bn_scale_shift(nn.Conv2d(3, 4, 1, bias=False), None)
    assert torch.equal(shift, torch.zeros(4))


def test_source_modules_untouched():
    conv = nn.Conv2d(3, 4, 3, bias=True)
    bn = random_bn(nn.BatchNorm2d, 4)
    before = [t.clone() for t in (*conv.state_dict().values(), *bn.state_dict().values())]
    fold.fold_conv_bn_weights(conv, bn)
    after = [*conv.state_dict().values(), *bn.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ------------------------------------------------------------------------------------------------ refusals
def test_training_mode_is_refused():
    bn = random_bn(nn.BatchNorm2d, 4).train()
    with pytest.raises(RuntimeError, match=r"bn: expected a BatchNorm in eval mode.*training mode"):
        fold.fold_bn(bn)
    with pytest.raises(RuntimeError, match=r"bn:.*eval"):
        fold.conv_bn_scale_shift(nn.Conv2d(3, 4, 1), bn)


def test_no_running_stats_is_refused():
    bn = nn.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=r"bn: expected a BatchNorm with running statistics.*track_running_stats"):
        fold.check_foldable(bn)
    with pytest.raises(ValueError, match=r"bn: expected running statistics"):
        fold.bn_scale_shift(None, None, None, None, 1e-5)


@pytest.mark.parametrize("field", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_statistics_are_refused(field, bad):
    bn = random_bn(nn.BatchNorm2d, 4)
    with torch.no_grad():
        getattr(bn, field)[2] = bad
    with pytest.raises(ValueError, match=rf"bn {field}: expected finite values, got 1 non-finite"):
        fold.fold_bn(bn)


def test_non_finite_conv_bias_is_refused():
    conv = nn.Conv2d(3, 4, 1, bias=True)
    with torch.no_grad():
        conv.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"conv bias: expected finite values"):
        fold.conv_bn_scale_shift(conv, random_bn(nn.BatchNorm2d, 4))


def test_negative_variance_and_eps_are_refused():
    bn = random_bn(nn.BatchNorm2d, 4)
    with torch.no_grad():
        bn.running_var[1] = -1.0
    with pytest.raises(ValueError, match=r"bn running_var: expected running_var \+ eps > 0"):
        fold.fold_bn(bn)
    ones = torch.ones(3)
    with pytest.raises(ValueError, match=r"bn eps: expected a non-negative number, got -1"):
        fold.bn_scale_shift(ones, ones, None, None, -1.0)
    with pytest.raises(ValueError, match=r"bn running_var: expected running_var \+ eps > 0"):
        fold.bn_scale_shift(ones, torch.zeros(3), None, None, 0.0)


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match=r"bn: expected 4 features to match conv out_channels, got 5"):
        fold.conv_bn_scale_shift(nn.Conv2d(3, 4, 1), random_bn(nn.BatchNorm2d, 5))
    with pytest.raises(ValueError, match=r"bn weight: expected 3 values \(one per channel\), got shape \(2,\)"):
        fold.bn_scale_shift(torch.zeros(3), torch.ones(3), torch.ones(2), None, 1e-5)


def test_wrong_module_types_are_refused():
    with pytest.raises(TypeError, match=r"bn: expected a BatchNorm module.*got LayerNorm"):
        fold.fold_bn(nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"bn: expected a BatchNorm module.*got GroupNorm"):
        fold.check_foldable(nn.GroupNorm(2, 4))
    with pytest.raises(TypeError, match=r"conv: expected nn.Conv1d, nn.Conv2d or nn.Conv3d, got ConvTranspose2d"):
        fold.conv_bn_scale_shift(nn.ConvTranspose2d(3, 4, 1), random_bn(nn.BatchNorm2d, 4))
    with pytest.raises(TypeError, match=r"conv: expected.*got Linear"):
        fold.fold_conv_bn_weights(nn.Linear(3, 4), random_bn(nn.BatchNorm2d, 4))


def test_folded_weights_that_overflow_the_dtype_are_refused():
    """fold_conv_bn_weights casts to the conv's dtype: a scale of 1e5 on fp16 weights ~1 would give inf."""
    conv = nn.Conv2d(3, 4, 3, bias=False).half()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    bn = nn.BatchNorm2d(4, eps=1e-10).eval()
    bn.running_var.zero_()
    with pytest.raises(ValueError, match=r"conv weight: expected the folded values to fit torch.float16, got 108 "):
        fold.fold_conv_bn_weights(conv, bn)
    # The scale/shift themselves are fine (float32), which is what FusedConv2d keeps.
    scale, _ = fold.conv_bn_scale_shift(conv, bn)
    assert scale.dtype == torch.float32 and torch.isfinite(scale).all()


def test_wrong_bn_type_is_named_before_its_size():
    with pytest.raises(TypeError, match=r"bn: expected a BatchNorm module.*got LayerNorm"):
        fold.conv_bn_scale_shift(nn.Conv2d(3, 4, 1), nn.LayerNorm(7))
