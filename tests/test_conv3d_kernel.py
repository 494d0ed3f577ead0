"""The Triton 3-D conv kernel (kernels/conv3d.py): interpreter runs against a float64 truth, argument checks,
and ahead-of-time compiles for sm_80 / sm_90 that must use tensor-core instructions.

Truth: nn.Conv3d -> nn.BatchNorm3d(eval, randomised statistics) (+ residual) -> activation module
(-> a second BatchNorm3d as the post-affine), in float64 from the same dtype-rounded inputs; the kernel gets the
BNs folded by `fold`. Interpreter shapes are tiny (every program instance runs in Python).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn

from fusedconv import fold
from fusedconv.kernels.conv3d import aot_variants, conv3d_bn_act, configs_3d, pack_weight_3d
from util import ACT_MODULES, max_rel_error, randomize_bn

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
ACTS = tuple(ACT_MODULES)


def build(cin, cout, k, *, n=1, size=(4, 5, 5), stride=1, padding=0, dilation=1, groups=1, dtype=torch.float32,
          activation="relu", residual=False, post=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv3d(cin, cout, k, stride, padding, dilation, groups, bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(conv.weight[0].numel()))
        conv.bias.copy_(torch.randn(cout, generator=g) * 0.1)
    bn, bn2 = nn.BatchNorm3d(cout), nn.BatchNorm3d(cout)
    randomize_bn(nn.Sequential(bn, bn2), seed)
    bn.eval(), bn2.eval()
    x = torch.randn(n, cin, *size, generator=g).to(dtype)
    weight = conv.weight.detach().to(dtype)
    scale, shift = fold.layer_bn_scale_shift(conv, bn)
    with torch.no_grad():
        conv64 = conv.double()
        conv64.weight.copy_(weight.double())
        y = bn.double()(conv64(x.double()))
        res = torch.randn(y.shape, generator=g).to(dtype) if residual else None
        if res is not None:
            y = y + res.double()
        y = ACT_MODULES[activation](y)
        if post:
            y = bn2.double()(y)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation=activation,
                  act_param=float(getattr(ACT_MODULES[activation], "negative_slope", 0.0)), residual=res)
    if post:
        kwargs["post_scale"], kwargs["post_shift"] = fold.post_affine(bn2)
    return x, weight, scale, shift, kwargs, y


def check(x, weight, scale, shift, kwargs, truth, channels_last):
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if kwargs["residual"] is not None:
            kwargs["residual"] = kwargs["residual"].contiguous(memory_format=torch.channels_last_3d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow in the interpreter's exp (sigmoid)
        out = conv3d_bn_act(x, weight, scale, shift, **kwargs)
    assert out.dtype == x.dtype and out.shape == truth.shape
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    else:
        assert out.is_contiguous()
    err = max_rel_error(out, truth)
    assert err <= TOLERANCE[x.dtype], f"max rel error {err:.3g}"


GEOMETRIES = [  # name, cin, cout, kernel, extra
    ("1x1x1", 8, 12, 1, {}),
    ("3x3x3_pad", 5, 6, 3, dict(padding=1)),
    ("3x3x3_stride2", 4, 7, 3, dict(stride=2, padding=1, size=(5, 6, 7))),
    ("1x3x3_spatial", 17, 6, (1, 3, 3), dict(padding=(0, 1, 1))),  # r2plus1d spatial conv, Cin > 16
    ("3x1x1_temporal", 18, 5, (3, 1, 1), dict(padding=(1, 0, 0), n=2)),  # r2plus1d temporal conv
    ("3x7x7_stem", 3, 8, (3, 7, 7), dict(stride=(1, 2, 2), padding=(1, 3, 3), size=(3, 9, 9))),
    ("dilation2", 16, 6, 3, dict(padding=2, dilation=2)),  # Cin 16: EVEN_K (no channel masks)
    ("groups2", 6, 10, 3, dict(padding=1, groups=2)),
    ("groups3_strided_dilated", 36, 9, 3, dict(stride=(2, 1, 2), padding=(2, 1, 1), dilation=(2, 1, 1),
                                                groups=3, size=(5, 4, 5))),
]


def _geometry_params():
    params = []
    for i, (name, cin, cout, k, extra) in enumerate(GEOMETRIES):
        for j, (dtype, cl) in enumerate(((torch.float32, False), (torch.float16, True))):
            act = ACTS[(3 * i + j) % len(ACTS)]
            res, post = (i + j) % 2 == 0, (i + j) % 3 == 0
            params.append(pytest.param(cin, cout, k, extra, dtype, cl, act, res, post,
                                       id=f"{name}-{str(dtype)[6:]}-{'cl' if cl else 'ncdhw'}-{act}"
                                          f"{'-res' if res else ''}{'-post' if post else ''}"))
    return params


@pytest.mark.interpret
@pytest.mark.parametrize("cin,cout,k,extra,dtype,channels_last,activation,residual,post", _geometry_params())
def test_geometry(cin, cout, k, extra, dtype, channels_last, activation, residual, post):
    x, w, s, t, kw, truth = build(cin, cout, k, dtype=dtype, activation=activation, residual=residual, post=post,
                                  **extra)
    check(x, w, s, t, kw, truth, channels_last)


@pytest.mark.interpret
@pytest.mark.parametrize("activation", ACTS)
def test_every_activation_with_residual_and_post_affine(activation):
    x, w, s, t, kw, truth = build(5, 6, 3, padding=1, size=(3, 4, 4), activation=activation, residual=True,
                                  post=True, seed=3)
    check(x, w, s, t, kw, truth, channels_last=True)


@pytest.mark.interpret
def test_packed_weight():
    # bfloat16 is left to the compile tests: Triton's interpreter computes bf16 tl.dot wrongly (the 2-D kernel
    # gives the same garbage there), so an interpreted bf16 run would test the interpreter, not the kernel.
    x, w, s, t, kw, truth = build(6, 5, 3, padding=1, size=(3, 4, 3), dtype=torch.float16, activation="silu",
                                  residual=True, seed=4)
    packed = pack_weight_3d(w)
    assert torch.equal(packed, w) and packed.permute(2, 3, 4, 1, 0).is_contiguous()
    check(x, packed, s, t, kw, truth, channels_last=True)


@pytest.mark.interpret
def test_empty_batch():
    out = conv3d_bn_act(torch.randn(0, 4, 3, 3, 3), torch.randn(5, 4, 3, 3, 3), torch.ones(5), torch.zeros(5),
                        padding=1)
    assert out.shape == (0, 5, 3, 3, 3)


# ------------------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize("call,kind,message", [
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3), torch.randn(5, 4, 1, 1, 1), torch.ones(5), torch.zeros(5)),
     ValueError, r"input: expected a 5-d \(N, C, D, H, W\)"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3), torch.randn(5, 4, 1, 1), torch.ones(5), torch.zeros(5)),
     ValueError, r"weight: expected a 5-d"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3), torch.randn(5, 4, 1, 1, 1), torch.ones(4), torch.zeros(5)),
     ValueError, r"scale: expected shape \(5,\)"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3), torch.randn(5, 2, 1, 1, 1), torch.ones(5), torch.zeros(5)),
     ValueError, r"input: expected 2 channels"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3).double(), torch.randn(5, 4, 1, 1, 1).double(),
                           torch.ones(5), torch.zeros(5)), TypeError, r"input: expected dtype float16"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3), torch.randn(5, 4, 1, 1, 1), torch.ones(5), torch.zeros(5),
                           post_scale=torch.ones(5)), ValueError, r"post_scale/post_shift: expected both"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3), torch.randn(5, 4, 1, 1, 1), torch.ones(5), torch.zeros(5),
                           post_scale=torch.ones(3), post_shift=torch.zeros(5)), ValueError,
     r"post_scale: expected shape \(5,\)"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3), torch.randn(5, 4, 1, 1, 1), torch.ones(5), torch.zeros(5),
                           stride=(1, 2)), ValueError, r"stride: expected an int or three ints"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 3, 3, 3), torch.randn(5, 4, 1, 1, 1), torch.ones(5), torch.zeros(5),
                           activation="tanh"), ValueError, r"activation: expected one of"),
    (lambda: conv3d_bn_act(torch.randn(1, 4, 2, 2, 2), torch.randn(5, 4, 3, 3, 3), torch.ones(5), torch.zeros(5)),
     ValueError, r"input: spatial size .* too small"),
])
def test_bad_arguments_are_named(call, kind, message):
    with pytest.raises(kind, match=message):
        call()


def test_configs_come_from_a_function():
    assert configs_3d(2) and configs_3d(4)
    assert all(c.kwargs["BLOCK_K"] == 32 for c in configs_3d(4))


# ------------------------------------------------------------------------------------------ ahead-of-time compiles
_VARIANTS = {v["name"]: v for v in aot_variants()}
_AOT_SELECTION = ["conv3d_3x3x3_identity_res_fp16_m128n128k64s3w8", "conv3d_stem_flatk_fp16",
                  "conv3d_3x3x3_gelu_tanh_post_bf16_m64n128k64s4w4", "conv3d_int64_fp16",
                  "conv3d_3x3x3_relu6_res_post_fp32_m128n64k32s3w4"]


def test_aot_selection_names_exist():
    missing = [n for n in _AOT_SELECTION if n not in _VARIANTS]
    assert not missing, (missing, sorted(_VARIANTS))


@pytest.mark.parametrize("cap", (80, 90), ids=lambda c: f"sm{c}")
@pytest.mark.parametrize("name", _AOT_SELECTION)
def test_aot_compile_uses_tensor_cores(name, cap):
    """A selection of the variants (large tiles, flattened-K stem, int64, bf16, fp32/TF32 with the post-affine):
    compiled to PTX and cubin, the PTX holding mma (sm_80) / wgmma or mma (sm_90) of the variant's input type."""
    from test_kernel_compile import _MMA_TYPE, compile_one

    if name not in _VARIANTS:
        pytest.fail(f"no variant {name}")
    variant = _VARIANTS[name]
    result = compile_one(variant, cap)
    assert result["ok"], result.get("error")
    assert result["cubin"] and result["target_line"].startswith(f".target sm_{cap}")
    wanted = ("mma.",) if cap == 80 else ("wgmma.", "mma.")
    used = [op for op in result["tensor_core_ops"] if op.startswith(wanted)]
    assert used, f"no tensor-core instruction in the sm_{cap} PTX"
    assert any(_MMA_TYPE[variant["dtype"]] in op for op in used), used
