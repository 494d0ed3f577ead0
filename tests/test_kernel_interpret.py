"""The real implicit-GEMM Triton kernel, run by Triton's CPU interpreter, against PyTorch's own modules.

Tests marked `interpret` run in a TRITON_INTERPRET=1 child process (see conftest.py). Each builds
nn.Conv2d -> nn.BatchNorm2d (eval, randomised statistics) -> activation module (+ residual before the
activation), computes the truth in float64 from the same dtype-rounded inputs, and runs the kernel through the
public launcher `fusedconv.kernels.conv_bn_act` with the BN folded to (scale, shift) by `fold`.

The cases are a chosen product, not the full cartesian one (the interpreter is slow): every geometry (1x1,
1x1/stride 2, 3x3, 7x7/stride 2, dilation 2, groups 2, depthwise, channel multiplier, rectangular kernel, prime
sizes, batch 1; Cin/groups < 16 takes the kernel's flattened-K loop, larger Cin the per-tap loop) runs once as fp32/NCHW and once as fp16/channels_last with the activation and residual rotating;
every activation runs in both dtypes; then split-K, packed / odd weight strides, non-contiguous inputs and
residuals. Unmarked tests (argument checking, packing, configs) run in-process without the interpreter.
The `CASES` / `run_case` helpers are reused by test_kernel_gpu.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from fusedconv import fold
from fusedconv.kernels import conv_bn_act, pack_weight
from fusedconv.kernels import configs as kconfigs
from util import max_rel_error, randomize_bn

#: Relative tolerance (max |out - truth| / max |truth|) per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}

ACTIVATION_MODULES = {
    "identity": lambda: nn.Identity(),
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "silu": lambda: nn.SiLU(),
    "hardswish": lambda: nn.Hardswish(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}
ACTIVATION_NAMES = tuple(ACTIVATION_MODULES)


@dataclass(frozen=True)
class ConvCase:
    """One conv geometry: input (n, cin, h, w), cout, kernel (kh, kw), stride, padding, dilation, groups."""

    name: str
    n: int
    cin: int
    h: int
    w: int
    cout: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


CASES = [
    ConvCase("1x1", 2, 8, 5, 5, 20, (1, 1)),
    ConvCase("1x1_even_k", 1, 32, 3, 4, 16, (1, 1)),
    ConvCase("1x1_stride2", 2, 16, 7, 7, 12, (1, 1), stride=(2, 2)),
    ConvCase("3x3", 1, 5, 7, 7, 6, (3, 3), padding=(1, 1)),
    ConvCase("3x3_prime_stride2", 2, 7, 11, 13, 11, (3, 3), stride=(2, 2), padding=(1, 1)),
    ConvCase("7x7_stride2", 1, 3, 13, 13, 8, (7, 7), stride=(2, 2), padding=(3, 3)),
    ConvCase("3x3_dilation2", 1, 17, 9, 9, 6, (3, 3), padding=(2, 2), dilation=(2, 2)),
    ConvCase("3x3_groups2", 2, 6, 5, 5, 10, (3, 3), padding=(1, 1), groups=2),
    ConvCase("depthwise", 2, 8, 6, 5, 8, (3, 3), padding=(1, 1), groups=8),
    ConvCase("depthwise_x2", 1, 4, 5, 5, 8, (3, 3), stride=(2, 2), padding=(1, 1), groups=4),
    ConvCase("rect_1x3", 1, 5, 4, 7, 3, (1, 3), stride=(1, 2), padding=(0, 1)),
    ConvCase("3x3_batch1_k_chunks", 1, 19, 5, 3, 5, (3, 3), padding=(1, 1)),
    ConvCase("3x3_even_k_two_chunks", 1, 32, 4, 5, 18, (3, 3), padding=(1, 1)),  # no K masks, 2 N tiles
    ConvCase("3x3_dilation2_small_cin", 2, 3, 8, 7, 5, (3, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
]
LAYOUT_DTYPES = [("nchw", torch.float32), ("channels_last", torch.float16)]


def build_case(case: ConvCase, dtype: torch.dtype, layout: str, activation: str, with_residual: bool,
               device="cpu", seed: int = 0):
    """Inputs for the launcher and the float64 truth from Conv2d -> BatchNorm2d(eval) -> (+residual) -> act."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(case.cin, case.cout, case.kernel, case.stride, case.padding, case.dilation, case.groups,
                     bias=True)
    bn = nn.BatchNorm2d(case.cout)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(conv.weight[0].numel()))
        conv.bias.copy_(torch.randn(case.cout, generator=g) * 0.1)
    randomize_bn(bn, seed)
    bn.eval()
    act = ACTIVATION_MODULES[activation]()

    x = torch.randn(case.n, case.cin, case.h, case.w, generator=g).to(dtype)
    weight = conv.weight.detach().to(dtype)
    scale, shift = fold.conv_bn_scale_shift(conv, bn)
    with torch.no_grad():
        conv64, bn64 = conv.double(), bn.double()
        conv64.weight.copy_(weight.double())  # the truth uses the weight exactly as the kernel sees it
        y64 = bn64(conv64(x.double()))
    residual = None
    if with_residual:
        residual = torch.randn(y64.shape, generator=g).to(dtype)
        y64 = y64 + residual.double()
    truth = act(y64)

    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
    to = dict(device=device)
    return dict(x=x.to(**to), weight=weight.to(**to), scale=scale.to(**to), shift=shift.to(**to),
                residual=None if residual is None else residual.to(**to),
                act_param=0.1 if activation == "leaky_relu" else 0.0), truth


def run_case(case: ConvCase, dtype, layout, activation, with_residual, device="cpu", weight_fn=None,
             tolerance=None, **launch):
    """Run the launcher on one case and check dtype, shape, memory format and values against the truth
    (relative tolerance `tolerance`, default TOLERANCE[dtype])."""
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    inputs, truth = build_case(case, dtype, layout, activation, with_residual, device=device)
    weight = inputs["weight"] if weight_fn is None else weight_fn(inputs["weight"], case.groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow in the interpreter's exp (sigmoid)
        out = conv_bn_act(inputs["x"], weight, inputs["scale"], inputs["shift"], stride=case.stride,
                          padding=case.padding, dilation=case.dilation, groups=case.groups, activation=activation,
                          act_param=inputs["act_param"], residual=inputs["residual"], **launch)
    assert out.dtype == dtype and tuple(out.shape) == tuple(truth.shape)
    if layout == "channels_last" and not inputs["x"].is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "output must follow channels_last input"
    else:
        assert out.is_contiguous(), "output must follow the input's contiguous format"
    err = max_rel_error(out.cpu(), truth)
    assert err <= tolerance, f"{case.name} {dtype} {layout} {activation} residual={with_residual}: " \
                             f"max rel error {err:.3g} > {tolerance:g}"
    return out


def _geometry_params():
    params = []
    for i, case in enumerate(CASES):
        for j, (layout, dtype) in enumerate(LAYOUT_DTYPES):
            act = ACTIVATION_NAMES[(3 * i + j) % len(ACTIVATION_NAMES)]
            residual = (i + j) % 2 == 0
            params.append(pytest.param(case, layout, dtype, act, residual,
                                       id=f"{case.name}-{layout}-{str(dtype)[6:]}-{act}-{'res' if residual else 'nores'}"))
    return params


# ------------------------------------------------------------------------------------------ interpreter tests
@pytest.mark.interpret
@pytest.mark.parametrize("case,layout,dtype,activation,with_residual", _geometry_params())
def test_geometry(case, layout, dtype, activation, with_residual):
    run_case(case, dtype, layout, activation, with_residual)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_every_activation(activation, dtype):
    case = ConvCase("3x3_act", 1, 18, 5, 6, 7, (3, 3), padding=(1, 1))  # Cin 18: per-tap K chunks, K masks
    layout = "channels_last" if dtype == torch.float32 else "nchw"
    run_case(case, dtype, layout, activation, with_residual=True)


@pytest.mark.interpret
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("layout,dtype", LAYOUT_DTYPES, ids=["nchw-fp32", "cl-fp16"])
def test_split_k_matches(split_k, layout, dtype):
    """The split-K path (fp32 workspace + epilogue kernel) gives the same result as one K pass."""
    case = ConvCase("splitk", 1, 21, 4, 5, 9, (3, 3), padding=(1, 1))
    run_case(case, dtype, layout, "gelu", with_residual=True, split_k=split_k)


@pytest.mark.interpret
def test_depthwise_through_gemm_path():
    """An explicit split_k keeps depthwise convs on the GEMM kernel (the launcher otherwise dispatches them)."""
    case = next(c for c in CASES if c.name == "depthwise")
    run_case(case, torch.float32, "channels_last", "relu6", with_residual=True, split_k=1)


@pytest.mark.interpret
def test_empty_batch():
    x = torch.randn(0, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    out = conv_bn_act(x, torch.randn(6, 4, 3, 3), torch.ones(6), torch.zeros(6), padding=1)
    assert out.shape == (0, 6, 5, 5)


def _odd_strides(weight, groups):
    # (Cout, Cin_g, KH, KW) values stored in (Cin_g, KW, Cout, KH) physical order: no stride is 1 on Cout or Cin.
    return weight.permute(1, 3, 0, 2).contiguous().permute(2, 0, 3, 1)


@pytest.mark.interpret
@pytest.mark.parametrize("weight_fn", [pack_weight, _odd_strides], ids=["packed", "odd_strides"])
def test_weight_layouts(weight_fn):
    case = next(c for c in CASES if c.name == "3x3_groups2")
    run_case(case, torch.float32, "nchw", "silu", with_residual=False, weight_fn=weight_fn)
    run_case(case, torch.float16, "channels_last", "relu", with_residual=True, weight_fn=weight_fn)


@pytest.mark.interpret
def test_non_contiguous_input_and_residual():
    """Sliced input (no copy needed) and an expanded / permuted residual are read by their strides."""
    case = ConvCase("views", 2, 6, 6, 7, 5, (3, 3), stride=(2, 1), padding=(1, 1))
    inputs, _ = build_case(case, torch.float32, "nchw", "identity", False)
    big = torch.randn(case.n, case.cin * 2, case.h + 3, case.w + 2)
    x = big[:, 1::2, 2:2 + case.h, 1:1 + case.w]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    x.copy_(inputs["x"])
    out_shape = (case.n, case.cout, 3, 7)
    residual = torch.randn(case.cout, 1, 7).expand(case.n, case.cout, 3, 7)  # stride 0 on batch and rows
    ref = conv_bn_act(inputs["x"], inputs["weight"], inputs["scale"], inputs["shift"], stride=case.stride,
                      padding=case.padding, activation="leaky_relu", act_param=0.2,
                      residual=residual.contiguous())
    out = conv_bn_act(x, inputs["weight"], inputs["scale"], inputs["shift"], stride=case.stride,
                      padding=case.padding, activation="leaky_relu", act_param=0.2, residual=residual)
    assert tuple(out.shape) == out_shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same kernel, same math: only the addressing differs
    truth = torch.nn.functional.leaky_relu(
        torch.nn.functional.conv2d(x.double(), inputs["weight"].double(), None, case.stride, case.padding)
        * inputs["scale"].double().view(1, -1, 1, 1) + inputs["shift"].double().view(1, -1, 1, 1)
        + residual.double(), 0.2)
    assert max_rel_error(out, truth) <= TOLERANCE[torch.float32]


@pytest.mark.interpret
def test_int64_offsets_path(monkeypatch):
    """The USE_INT64 variant (chosen for tensors over 2^31 elements) computes the same result; forced here by
    lowering the launcher's threshold, since a real > 2^31-element tensor is far too big for the interpreter."""
    import importlib

    launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")
    planning = importlib.import_module("fusedconv.kernels.conv_plan")  # where the launcher's threshold lives
    monkeypatch.setattr(planning, "_INT32_LIMIT", 0)
    launcher._plan_cached.cache_clear()  # launch plans (which hold USE_INT64) are cached per call signature
    try:
        assert launcher._plan(*_plan_key_example())["flags"]["USE_INT64"]
        flat = next(c for c in CASES if c.name == "3x3_prime_stride2")  # flattened-K loop
        run_case(flat, torch.float16, "channels_last", "leaky_relu", with_residual=True)
        per_tap = next(c for c in CASES if c.name == "3x3_batch1_k_chunks")  # per-tap loop + split-K
        run_case(per_tap, torch.float32, "nchw", "hardswish", with_residual=True, split_k=2)
        run_case(per_tap, torch.float16, "channels_last", "silu", with_residual=True, stream_k=4)
    finally:
        monkeypatch.setattr(planning, "_INT32_LIMIT", 2**31 - 1)
        launcher._plan_cached.cache_clear()


def _plan_key_example():
    """Arguments of the launcher's _plan for a small fp32 3x3 conv."""
    return ((1, 4, 5, 5), (100, 25, 5, 1), torch.float32, torch.device("cpu"), (6, 4, 3, 3), (36, 9, 3, 1),
            torch.float32, (6,), (6,), None, (1, 1), (1, 1), (1, 1), 1, "relu", 0.0, None, False, False)


# ------------------------------------------------------------------------------- in-process (no interpreter)
def _small_inputs():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    return x, w, torch.ones(6), torch.zeros(6)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(activation="swish"), ValueError, ["activation", "swish"]),
    (dict(act_param=0.5, activation="relu"), ValueError, ["act_param", "leaky_relu"]),
    (dict(groups=4), ValueError, ["groups", "4"]),
    (dict(residual=torch.zeros(1, 6, 4, 4)), ValueError, ["residual", "(1, 6, 3, 3)"]),
    (dict(padding=(1, 2, 3)), ValueError, ["padding"]),
])
def test_launcher_rejects_bad_arguments(kwargs, exc, words):
    x, w, scale, shift = _small_inputs()
    with pytest.raises(exc) as info:
        conv_bn_act(x, w, scale, shift, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_launcher_rejects_bad_tensors():
    x, w, scale, shift = _small_inputs()
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        conv_bn_act(x, w.half(), scale, shift)
    with pytest.raises(TypeError, match="input: expected dtype float16, bfloat16 or float32.*float64"):
        conv_bn_act(x.double(), w.double(), scale, shift)
    with pytest.raises(ValueError, match=r"scale: expected shape \(6,\)"):
        conv_bn_act(x, w, scale[:5], shift)
    with pytest.raises(ValueError, match="input: expected 4 channels"):
        conv_bn_act(x[:, :3], w, scale, shift)
    with pytest.raises(ValueError, match="too small"):
        conv_bn_act(x[:, :, :2], w, scale, shift)


@pytest.mark.skipif(bool(__import__("os").environ.get("TRITON_INTERPRET")), reason="checks the non-interpreter error")
def test_launcher_needs_cuda_or_interpreter():
    x, w, scale, shift = _small_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        conv_bn_act(x, w, scale, shift)


@pytest.mark.parametrize("shape,groups", [((8, 4, 3, 3), 1), ((8, 2, 3, 3), 2), ((8, 1, 3, 3), 8), ((5, 3, 1, 7), 1)])
def test_pack_weight_keeps_values_and_orders_cout_innermost(shape, groups):
    w = torch.randn(shape)
    packed = pack_weight(w, groups)
    assert packed.shape == w.shape and torch.equal(packed, w)
    assert packed.stride(0) == 1, "Cout must be innermost so B tiles are contiguous"
    assert packed.permute(2, 3, 1, 0).is_contiguous()
    assert pack_weight(packed, groups) is packed  # already packed: no copy


def test_pack_weight_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight: expected a 4-d"):
        pack_weight(torch.zeros(3, 3), 1)
    with pytest.raises(ValueError, match="groups: expected a positive int dividing Cout=8, got 3"):
        pack_weight(torch.zeros(8, 1, 3, 3), 3)


def test_prune_configs_fits_problem():
    configs = kconfigs.all_autotune_configs()
    small = kconfigs.prune_configs(configs, dict(x_ptr=torch.empty(0, dtype=torch.float16), M=49, COUT_G=512,
                                                 CIN_G=512))
    assert small and all(c.kwargs["BLOCK_M"] <= 64 for c in small)
    big = kconfigs.prune_configs(configs, dict(x_ptr=torch.empty(0, dtype=torch.float16), M=100352, COUT_G=256,
                                               CIN_G=256, IS_1X1=True))
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 128 * 256 for c in big)
    fp32 = kconfigs.prune_configs(configs, dict(x_ptr=torch.empty(0), M=4096, COUT_G=64, CIN_G=64))
    assert fp32 and all(c.kwargs["BLOCK_K"] <= 32 for c in fp32)
    tiny = kconfigs.prune_configs(configs, dict(x_ptr=torch.empty(0, dtype=torch.float16), M=1, COUT_G=1, CIN_G=1))
    # Capped, not dropped: every tile shrinks to the 16x16x16 minimum (a few stage / warp variants remain).
    assert tiny and all((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) == (16, 16, 16) for c in tiny)
    assert len(tiny) <= 3
    for cfgs in (small, big, fp32):
        for c in cfgs:
            bytes_ = 2 if c in small or c in big else 4
            assert (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * bytes_ * c.num_stages \
                <= 160 * 1024


def test_choose_split_k():
    # ResNet-50 batch 1, last stage 3x3: M = 49, Cout = 512, K = 9 * 512 -> split on a 132-SM H100.
    assert kconfigs.choose_split_k(49, 512, 1, 9 * 8, 132) > 1
    # layer1 3x3 at batch 32 fills the GPU with ~6 waves of tiles: no split. (Batch-32 layer4, 52 tiles of
    # 128x128 on 132 SMs, does not: the schedule rule runs it stream-K, and its best split is not 1.)
    assert kconfigs.choose_split_k(32 * 56 * 56, 64, 1, 9, 132) == 1
    # short K: no split; empty problem: no split.
    assert kconfigs.choose_split_k(49, 64, 1, 2, 132) == 1
    assert kconfigs.choose_split_k(0, 64, 1, 72, 132) == 1


def test_aot_variants_are_well_formed():
    variants = kconfigs.aot_variants()
    names = [v["name"] for v in variants]
    assert len(names) == len(set(names))
    for v in variants:
        assert set(v) >= {"name", "fn", "signature", "constexprs", "num_warps", "num_stages", "dtype",
                          "expects_tensor_cores"}
        assert list(v["signature"]) == list(v["fn"].arg_names), v["name"]
        assert {k for k, t in v["signature"].items() if t == "constexpr"} == set(v["constexprs"]), v["name"]
        assert v["dtype"] in ("float16", "bfloat16", "float32")
    for dtype, n_configs in (("float16", len(kconfigs.autotune_configs(2))),
                             ("float32", len(kconfigs.autotune_configs(4)))):
        assert sum(v["dtype"] == dtype and v["name"].startswith("conv1x1") for v in variants) == n_configs
    gemm = [v for v in variants if v["fn"].__name__ == "_conv_gemm_kernel"]
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    for dtype in ("float16", "bfloat16", "float32"):
        assert {v["constexprs"]["ACTIVATION"] for v in gemm if v["dtype"] == dtype} == set(ACTIVATION_IDS.values())
