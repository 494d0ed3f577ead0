"""Numerics (issue 7 items 3 and 4): extreme BatchNorm statistics in fp16/bf16 models, the per-dtype
tolerances documented in docs/SUPPORT.md, and int64-safe addressing of the Triton kernel.

Extreme statistics: running_var ~ 0 (scale ~ 1e5), running_var > 65504 (not representable in fp16), gamma
huge. The scale is computed in float64 and stays float32 in FusedConv2d whatever the module's dtype; when
folding it into an fp16 weight would overflow or flush weights to subnormals, the fallback applies it to the
fp32 conv output instead. Each case first shows that naive folding into the fp16 weight really breaks, so the
test can fail, then that FusedConv2d stays within the fp16 tolerance of the float64 truth.

Big tensors: under TRITON_INTERPRET=1 the launcher gets an `as_strided` view whose element offsets exceed
2^31 while only a few pages of its (virtual, never touched) storage are written. Products of two int32 values
wrap there (the interpreter emulates int32), so without the kernel's int64 path this reads out of bounds.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from util import max_rel_error  # noqa: E402

from fusedconv import fold  # noqa: E402
from fusedconv.kernels.reference import conv_bn_act_ref  # noqa: E402
from fusedconv.modules import FusedConv2d  # noqa: E402

#: max |out - truth| / max |truth| per dtype, truth = float64 computation from the same dtype-rounded inputs
#: and weights. The same table is in docs/SUPPORT.md.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
LOW_PRECISION = [torch.float16, torch.bfloat16]


def extreme_block(case: str, seed: int = 0):
    """(conv, bn, x) in fp32 with one kind of extreme statistics; x is scaled so the output is a normal fp16."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        bn.running_mean.copy_(torch.randn(6, generator=g) * 1e-3)
        bn.bias.copy_(torch.randn(6, generator=g))
        if case == "var_near_zero":      # scale = 1 / sqrt(0 + 1e-10) = 1e5: folded weights ~1e5 > 65504
            bn.eps = 1e-10
            bn.running_var.zero_()
            bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
            x_scale = 1e-3
        elif case == "var_huge":         # running_var 1e9 > 65504: scale ~3e-5, folded weights subnormal in fp16
            bn.running_var.fill_(1e9)
            bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
            conv.weight.mul_(1e-3)
            bn.bias.mul_(1e-3)  # keep the output dominated by the conv term, which naive folding loses
            x_scale = 3e3
        elif case == "gamma_huge":       # gamma 1e6 > 65504: scale 1e6
            bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
            bn.weight.fill_(1e6)
            x_scale = 1e-3
        else:
            raise ValueError(f"case: unknown {case!r}")
    x = torch.randn(2, 4, 7, 7, generator=g) * x_scale
    return conv, bn, x


def truth64(conv, bn, x, dtype):
    """float64 Conv2d -> BatchNorm2d from the conv weight and input rounded to `dtype` (what the module sees)."""
    w = conv.weight.detach().to(dtype).double()
    y = F.conv2d(x.to(dtype).double(), w, None, conv.stride, conv.padding)
    return F.batch_norm(y, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                        False, 0.0, bn.eps)


CASES = ["var_near_zero", "var_huge", "gamma_huge"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
@torch.no_grad()
def test_extreme_statistics_low_precision_model(case, dtype):
    conv, bn, x = extreme_block(case)
    truth = truth64(conv, bn, x, dtype)
    assert torch.isfinite(truth).all() and truth.abs().max() < 6e4  # the true output fits fp16

    fused = FusedConv2d.from_modules(conv, bn).to(dtype)
    # scale / shift stay float32 and equal the float64 fold rounded once.
    scale64, shift64 = fold.conv_bn_scale_shift(conv, bn, dtype=torch.float64)
    assert fused.scale.dtype == fused.shift.dtype == torch.float32
    assert torch.equal(fused.scale, scale64.float()) and torch.equal(fused.shift, shift64.float())

    out = fused(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert max_rel_error(out, truth) < TOLERANCE[dtype]

    if dtype == torch.float16:
        # Naive folding into the fp16 weight breaks in every case (inf, or weights lost to subnormals): the
        # scenario is really extreme, so the assertion above is not vacuous.
        w = (conv.weight.double() * scale64.view(-1, 1, 1, 1)).half()
        naive = F.conv2d(x.half(), w, shift64.half(), padding=1)
        assert not torch.isfinite(naive).all() or max_rel_error(naive, truth) > TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp16", "bf16"])
@torch.no_grad()
def test_extreme_statistics_with_residual_and_activation(dtype):
    conv, bn, x = extreme_block("var_near_zero", seed=1)
    fused = FusedConv2d.from_modules(conv, bn, nn.SiLU()).to(dtype)
    truth = truth64(conv, bn, x, dtype)
    residual = torch.randn(truth.shape).to(dtype)
    out = fused(x.to(dtype), residual)
    assert max_rel_error(out, F.silu(truth + residual.double())) < TOLERANCE[dtype]


@torch.no_grad()
def test_fp16_batchnorm_with_overflowed_statistics_is_refused():
    """A BN cast to fp16 with running_var > 65504 holds inf: folding refuses instead of producing zeros."""
    conv, bn, _ = extreme_block("var_huge")
    bn.half()
    assert torch.isinf(bn.running_var).all()
    with pytest.raises(ValueError, match=r"bn running_var: expected finite values, got 6 non-finite"):
        FusedConv2d.from_modules(conv.half(), bn)


@torch.no_grad()
def test_tiny_variance_in_fp16_statistics_folds_in_float64():
    """running_var = 1e-7 (subnormal in fp16) + eps = 1e-8: exact in float64, would be 0 -> inf in fp16 math."""
    conv = nn.Conv2d(3, 2, 1, bias=False).half()
    bn = nn.BatchNorm2d(2, eps=1e-8).eval().half()
    bn.running_var.fill_(1e-7)
    fused = FusedConv2d.from_modules(conv, bn)
    expected = 1.0 / (float(bn.running_var[0]) + 1e-8) ** 0.5
    assert torch.isfinite(fused.scale).all()
    assert abs(float(fused.scale[0]) - expected) / expected < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp64", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("act", ["relu", "gelu", "leaky_relu"])
@torch.no_grad()
def test_documented_tolerance_per_dtype(dtype, act):
    """Ordinary statistics: the fallback meets the documented tolerance against the float64 truth."""
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(16).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(16, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(16, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(16, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(16, generator=g) * 0.2)
    act_module = {"relu": nn.ReLU(), "gelu": nn.GELU(), "leaky_relu": nn.LeakyReLU(0.1)}[act]
    if dtype == torch.float64:
        # An fp64 module keeps an fp64 scale only when built from an fp64 model (an fp32 model's fold is fp32).
        conv, bn = conv.double(), bn.double()
    fused = FusedConv2d.from_modules(conv, bn, act_module).to(dtype)
    x = torch.randn(2, 8, 12, 12, generator=g)
    w = conv.weight.detach().to(dtype).double()
    conv64 = nn.Conv2d(8, 16, 3, padding=1).double()
    conv64.weight.copy_(w)
    conv64.bias.copy_(conv.bias.detach().to(torch.float64))
    truth = act_module(bn.double()(conv64(x.to(dtype).double())))
    assert max_rel_error(fused(x.to(dtype)), truth) < TOLERANCE[dtype]


# ------------------------------------------------------------------------------------------------ big tensors
def _huge_strided(shape, batch_stride, dtype, generator):
    """A view of `shape` whose batch stride makes offsets exceed 2^31, over a storage that is allocated (virtual
    memory, never touched) but written only where the view lies; returns (view, its values contiguous)."""
    n, c, h, w = shape
    try:
        storage = torch.empty((n - 1) * batch_stride + c * h * w, dtype=dtype)
    except RuntimeError as e:  # a CI machine with strict overcommit
        pytest.skip(f"cannot reserve {(n - 1) * batch_stride * dtype.itemsize / 2**30:.1f} GiB of virtual memory: {e}")
    view = storage.as_strided(shape, (batch_stride, h * w, w, 1))
    values = torch.randn(shape, generator=generator).to(dtype)
    view.copy_(values)
    return view, values


@pytest.mark.interpret
@pytest.mark.parametrize("where", ["input", "residual", "depthwise"])
def test_kernel_int64_addressing_under_interpreter(where):
    from fusedconv.kernels import conv_bn_act

    g = torch.Generator().manual_seed(0)
    # 2^30 + 64 fits int32, but batch index 2 times it does not: an int32 product wraps to a negative offset.
    batch_stride = 2**30 + 64
    groups = 4 if where == "depthwise" else 1  # groups == Cin == Cout goes to the depthwise kernel
    cout = 4 if where == "depthwise" else 6
    shape_x, shape_y = (3, 4, 5, 5), (3, cout, 5, 5)
    dtype = torch.float16
    if where in ("input", "depthwise"):
        x, x_values = _huge_strided(shape_x, batch_stride, dtype, g)
        residual = res_values = torch.randn(shape_y, generator=g).to(dtype)
    else:
        x = x_values = torch.randn(shape_x, generator=g).to(dtype)
        residual, res_values = _huge_strided(shape_y, batch_stride, dtype, g)
    weight = (torch.randn(cout, 4 // groups, 3, 3, generator=g) / 4).to(dtype)
    scale, shift = torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
    assert max(s * (n - 1) for s, n in zip((residual if where == "residual" else x).stride(), shape_x)) > 2**31
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = conv_bn_act(x, weight, scale, shift, padding=1, groups=groups, activation="relu", residual=residual)
    expected = conv_bn_act_ref(x_values, weight, scale, shift, padding=1, groups=groups, activation="relu",
                               residual=res_values)
    assert out.shape == expected.shape
    assert max_rel_error(out, expected) < TOLERANCE[dtype]


@torch.no_grad()
def test_fused_module_with_huge_strided_input_on_fallback():
    """The same view through FusedConv2d's CPU fallback: strided input, correct values."""
    g = torch.Generator().manual_seed(1)
    x, x_values = _huge_strided((3, 4, 5, 5), 2**30 + 64, torch.float32, g)
    fused = FusedConv2d(torch.randn(6, 4, 3, 3, generator=g), torch.rand(6, generator=g) + 0.5,
                        torch.randn(6, generator=g), padding=1, activation="relu")
    assert max_rel_error(fused(x), fused(x_values)) < 1e-6


@pytest.mark.gpu
@torch.no_grad()
def test_kernel_int64_addressing_on_gpu():
    """The same huge-stride view on a real GPU (needs ~4 GiB of device memory for the strided storage)."""
    from fusedconv.kernels import conv_bn_act

    g = torch.Generator().manual_seed(2)
    batch_stride = 2**30 + 64
    try:
        storage = torch.empty(2 * batch_stride + 4 * 5 * 5, dtype=torch.float16, device="cuda")
    except torch.cuda.OutOfMemoryError:
        pytest.skip("not enough GPU memory for the 4 GiB strided storage")
    x = storage.as_strided((3, 4, 5, 5), (batch_stride, 25, 5, 1))
    values = torch.randn(3, 4, 5, 5, generator=g).half()
    x.copy_(values.cuda())
    weight = (torch.randn(6, 4, 3, 3, generator=g) / 6).half()
    scale, shift = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    out = conv_bn_act(x, weight.cuda(), scale.cuda(), shift.cuda(), padding=1, activation="relu")
    expected = conv_bn_act_ref(values.float(), weight.float(), scale, shift, padding=1, activation="relu")
    assert max_rel_error(out.cpu(), expected) < TOLERANCE[torch.float16]
    del storage, x
    torch.cuda.empty_cache()
