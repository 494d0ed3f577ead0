"""The depthwise direct Triton kernel under TRITON_INTERPRET=1 on CPU tensors, against PyTorch.

Every test is marked `interpret`: tests/conftest.py runs them in one TRITON_INTERPRET=1 child pytest (or
in-process when the variable is already set). References: `kernels.reference.conv_bn_act_ref` (F.conv2d in the
input's dtype, fp32 epilogue) and, once, the module chain nn.Conv2d -> nn.BatchNorm2d(eval, randomised
statistics) -> activation. Shapes are tiny and prime-sized (the interpreter runs every program in Python) but
span several pixel and channel blocks of the interpreter config, so tile edges and masks are exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from util import max_rel_error, randomize_bn

pytestmark = pytest.mark.interpret

#: max |out - ref| / max |ref| allowed per dtype (fp16: the reference rounds the conv to fp16 before the
#: epilogue, the kernel keeps fp32 until the final cast).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

# (id, N, C, H, W, kernel, stride, padding, dilation); kernel/stride/padding/dilation: int or (h, w).
GEOMETRIES = [
    ("k3_s1_p1", 2, 37, 11, 7, 3, 1, 1, 1),
    ("k3_s2_p1", 1, 17, 13, 11, 3, 2, 1, 1),
    ("k3_s1_p0", 2, 5, 7, 5, 3, 1, 0, 1),
    ("k5_s2_p1", 1, 11, 13, 13, 5, 2, 1, 1),
    ("k7_s1_p3", 1, 7, 11, 13, 7, 1, 3, 1),
    ("k7_s2_p3", 2, 3, 17, 19, 7, 2, 3, 1),
    ("k3_d2_p3", 1, 19, 9, 11, 3, 1, 3, 2),
    ("k5_d2_p0", 1, 6, 13, 11, 5, 1, 0, 2),
    ("k3x5_s2x1_p1x2", 1, 23, 11, 13, (3, 5), (2, 1), (1, 2), 1),
]
ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "gelu_tanh")


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _problem(n, c, h, w, kernel, stride, padding, dilation, dtype, channels_last, residual, seed=0):
    """Random inputs (x in the requested layout), weight (unpacked), fp32 scale/shift, optional residual."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = _pair(kernel)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = (torch.randn(c, 1, kh, kw, generator=g) / (kh * kw) ** 0.5).to(dtype)
    scale = torch.rand(c, generator=g) + 0.5
    shift = torch.randn(c, generator=g) * 0.5
    res = None
    if residual:
        (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        res = torch.randn(n, c, oh, ow, generator=g).to(dtype)
        if not channels_last:  # mixed layouts: the residual's strides are independent of x's
            res = res.to(memory_format=torch.channels_last)
    return x, weight, scale, shift, res


def _run_and_check(x, weight, scale, shift, res, *, stride, padding, dilation, activation="relu",
                   act_param=0.0):
    from fusedconv.kernels.depthwise import depthwise_conv_bn_act
    from fusedconv.kernels.reference import conv_bn_act_ref

    out = depthwise_conv_bn_act(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation,
                                activation=activation, act_param=act_param, residual=res)
    ref = conv_bn_act_ref(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation,
                          groups=x.shape[1], activation=activation, act_param=act_param, residual=res)
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = max_rel_error(out, ref)
    assert err <= TOL[x.dtype], f"max relative error {err:.3g} > {TOL[x.dtype]:g}"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_geometry(geom, channels_last, dtype):
    _, n, c, h, w, kernel, stride, padding, dilation = geom
    with_residual = (GEOMETRIES.index(geom) + channels_last) % 2 == 0  # half the cases, both layouts
    x, weight, scale, shift, res = _problem(n, c, h, w, kernel, stride, padding, dilation, dtype, channels_last,
                                            with_residual)
    out = _run_and_check(x, weight, scale, shift, res, stride=stride, padding=padding, dilation=dilation)
    # The output follows the input's memory format.
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("geom", [GEOMETRIES[1], GEOMETRIES[6]], ids=[GEOMETRIES[1][0], GEOMETRIES[6][0]])
def test_bfloat16(geom, channels_last):
    _, n, c, h, w, kernel, stride, padding, dilation = geom
    x, weight, scale, shift, res = _problem(n, c, h, w, kernel, stride, padding, dilation, torch.bfloat16,
                                            channels_last, True, seed=4)
    _run_and_check(x, weight, scale, shift, res, stride=stride, padding=padding, dilation=dilation,
                   activation="gelu")


# The interpreter evaluates sigmoid(-large) as 1 / (1 + exp(large)) = 0 with a harmless numpy overflow warning.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation(activation, dtype, residual):
    channels_last = activation in ("relu6", "silu", "gelu", "hardswish")  # both layouts across the sweep
    x, weight, scale, shift, res = _problem(2, 19, 7, 5, 3, 1, 1, 1, dtype, channels_last, residual, seed=1)
    # Spread values so every activation's non-linear region (and relu6's upper clamp) is exercised.
    x = x * 3
    _run_and_check(x, weight, scale, shift, res, stride=1, padding=1, dilation=1, activation=activation,
                   act_param=0.13 if activation == "leaky_relu" else 0.0)


def test_strided_views_and_packed_weight():
    """Non-contiguous NCHW and channels_last views (no copies) and a packed weight give the same result."""
    from fusedconv.kernels.depthwise import depthwise_conv_bn_act, is_depthwise_packed, pack_depthwise_weight

    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 26, 15, 12, generator=g)
    x_nchw = base[:, ::2, 1:, ::2]  # channel, row and column strides all non-trivial
    x_nhwc = base.to(memory_format=torch.channels_last)[:, 3:16, :11, 1:]
    weight = torch.randn(13, 1, 3, 3, generator=g)
    packed = pack_depthwise_weight(weight)
    assert is_depthwise_packed(packed) and not is_depthwise_packed(weight)
    assert torch.equal(packed, weight) and packed.stride()[0] == 1
    assert pack_depthwise_weight(packed) is packed
    scale, shift = torch.rand(13, generator=g) + 0.5, torch.randn(13, generator=g)
    for x in (x_nchw, x_nhwc):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        out = _run_and_check(x, packed, scale, shift, None, stride=2, padding=1, dilation=1, activation="silu")
        out_unpacked = depthwise_conv_bn_act(x, weight, scale, shift, stride=2, padding=1, activation="silu")
        assert torch.equal(out, out_unpacked)


def test_int64_offsets(monkeypatch):
    """The int64-offset code path (taken for tensors over 2^31 elements) computes the same values."""
    from fusedconv.kernels import depthwise

    monkeypatch.setattr(depthwise, "INT64_THRESHOLD", 0)
    for channels_last in (False, True):
        x, weight, scale, shift, res = _problem(2, 11, 9, 7, 3, 2, 1, 1, torch.float32, channels_last, True)
        _run_and_check(x, weight, scale, shift, res, stride=2, padding=1, dilation=1, activation="hardswish")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_conv_bn_act_modules(channels_last):
    """Against the PyTorch chain itself: depthwise nn.Conv2d -> nn.BatchNorm2d(eval) -> nn.SiLU."""
    from fusedconv import fold
    from fusedconv.kernels.depthwise import depthwise_conv_bn_act

    torch.manual_seed(3)
    c = 29
    chain = nn.Sequential(nn.Conv2d(c, c, 5, stride=2, padding=2, groups=c, bias=True), nn.BatchNorm2d(c),
                          nn.SiLU())
    randomize_bn(chain, seed=3).eval()
    x = torch.randn(1, c, 13, 11)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scale, shift = fold.conv_bn_scale_shift(chain[0], chain[1])
    with torch.no_grad():
        ref = chain(x)
        out = depthwise_conv_bn_act(x, chain[0].weight, scale, shift, stride=2, padding=2, activation="silu")
    assert max_rel_error(out, ref) <= 1e-5


def test_gemm_launcher_dispatches_depthwise():
    """`kernels.conv_bn_act` with groups == Cin == Cout gives the depthwise kernel's result."""
    from fusedconv.kernels import conv_bn_act
    from fusedconv.kernels.depthwise import depthwise_conv_bn_act

    x, weight, scale, shift, res = _problem(1, 8, 9, 9, 3, 1, 1, 1, torch.float32, True, True)
    via_launcher = conv_bn_act(x, weight, scale, shift, stride=1, padding=1, groups=8, activation="relu6",
                               residual=res)
    direct = depthwise_conv_bn_act(x, weight, scale, shift, stride=1, padding=1, activation="relu6", residual=res)
    assert torch.equal(via_launcher, direct)


def test_bad_inputs_name_the_argument(monkeypatch):
    from fusedconv.kernels import depthwise

    x, weight, scale, shift, res = _problem(1, 4, 6, 6, 3, 1, 1, 1, torch.float32, False, True)
    call = depthwise.depthwise_conv_bn_act
    with pytest.raises(ValueError, match=r"weight: expected a depthwise weight of shape \(4, 1, KH, KW\)"):
        call(x, weight.expand(4, 2, 3, 3), scale, shift, padding=1)
    with pytest.raises(ValueError, match=r"x: expected a 4-d tensor"):
        call(x[0], weight, scale, shift, padding=1)
    with pytest.raises(TypeError, match=r"weight: expected x's dtype torch.float32, got torch.float16"):
        call(x, weight.half(), scale, shift, padding=1)
    with pytest.raises(ValueError, match=r"scale: expected a 1-d tensor of 4"):
        call(x, weight, scale[:3], shift, padding=1)
    with pytest.raises(ValueError, match=r"residual: expected shape \(1, 4, 6, 6\), got \(1, 4, 5, 5\)"):
        call(x, weight, scale, shift, padding=1, residual=res[..., :5, :5])
    with pytest.raises(ValueError, match=r"activation: expected one of"):
        call(x, weight, scale, shift, padding=1, activation="tanh")
    with pytest.raises(ValueError, match=r"stride: expected an int or a pair of ints, got 'x'"):
        call(x, weight, scale, shift, stride="x")
    with pytest.raises(ValueError, match=r"padding: expected non-negative"):
        call(x, weight, scale, shift, padding=-1)
    with pytest.raises(ValueError, match=r"x: spatial size \(6, 6\) is too small"):
        call(x, weight, scale, shift, dilation=4)
    with pytest.raises(TypeError, match=r"x: expected dtype float16, bfloat16 or float32, got torch.float64"):
        call(x.double(), weight.double(), scale, shift)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"CPU tensors only under TRITON_INTERPRET=1"):
        call(x, weight, scale, shift, padding=1)


def test_autotune_configs_respect_caps():
    """Configs come from a function, per layout; caps for small layers shrink blocks and drop duplicates."""
    from fusedconv.kernels.depthwise import depthwise_configs

    for channels_last in (True, False):
        full = depthwise_configs(channels_last)
        assert full and all(c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_C"] >= 1024 for c in full)
        capped = depthwise_configs(channels_last, max_c=8, max_p=32)
        assert capped and all(c.kwargs["BLOCK_C"] <= 8 and c.kwargs["BLOCK_P"] <= 32 for c in capped)
        sigs = [(c.kwargs["BLOCK_P"], c.kwargs["BLOCK_C"], c.num_warps) for c in capped]
        assert len(sigs) == len(set(sigs))
    # channels_last favours wide channel blocks, NCHW wide pixel blocks.
    assert max(c.kwargs["BLOCK_C"] for c in depthwise_configs(True)) > \
        max(c.kwargs["BLOCK_C"] for c in depthwise_configs(False))
