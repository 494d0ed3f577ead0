"""Each K loop of the implicit-GEMM kernel (kernels/conv_kloops.py) under Triton's CPU interpreter vs float64.

The loop is chosen by the launcher from the shape: 1x1 GEMM, the per-tap loop with carried (kh, kw, chunk)
counters and a per-row tap bit set (int32 up to 32 taps, int64 up to 64, bounds compares beyond), the row-K
loop for small Cin_g (whole kernel rows per K step; the RGB stems), the flattened-K loop for small Cin_g with wide
kernel rows, and the CH_ALIGN=8 hint for channel counts that are multiples of 8 but not 16. Each case checks
first that the launcher really takes the loop it is meant to cover (so a change of the dispatch rule cannot
silently leave a loop untested), then the values against Conv2d -> BatchNorm2d(eval) (+ residual) -> activation
in float64. The list covers kernel sizes 1/3/5/7/9, strides 1 and 2, paddings 0/1/2/3/4, dilation 2, odd
spatial sizes, channels 3/8/12/16/24/40/64, groups 2, residual on and off and every activation, spread over
the cases rather than multiplied (the interpreter is slow). Split-K runs start slices mid-way through a tap's
channel chunks and mid-way through the kernel rows, which exercises the counters' starting position.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
import triton.language as tl

from fusedconv.kernels import configs as kconfigs
from fusedconv.kernels import conv_bn_act, pack_weight
from fusedconv.kernels.conv_kloops import row_k_rows
from test_kernel_interpret import ACTIVATION_NAMES, ConvCase, build_case, run_case

launcher = importlib.import_module("fusedconv.kernels.conv_bn_act")

# (case, loop the launcher must choose, CH_ALIGN for channels_last input with a packed weight: 8 when Cin_g,
# Cout_g and every pixel stride are multiples of 8 and one of them (here: a channel count of 8, 24 or 40) is not
# a multiple of 16; Cout_g = 4 in the grouped row-K case, hence 1 there)
LOOP_CASES = [
    (ConvCase("5x5_c24_align8", 1, 24, 7, 7, 24, (5, 5), padding=(2, 2)), "taps", 8),
    (ConvCase("3x3_c40_stride2_odd", 2, 40, 9, 11, 8, (3, 3), stride=(2, 2), padding=(1, 1)), "taps", 8),
    (ConvCase("3x3_c64_pad0", 1, 64, 5, 6, 16, (3, 3)), "taps", 1),
    (ConvCase("7x7_c16_int64_bits", 1, 16, 9, 8, 8, (7, 7), padding=(3, 3)), "taps", 8),
    (ConvCase("9x9_c16_bounds_compares", 1, 16, 6, 5, 8, (9, 9), padding=(4, 4)), "taps", 8),
    (ConvCase("3x3_c16_dil2_groups2", 2, 32, 7, 7, 16, (3, 3), padding=(2, 2), dilation=(2, 2), groups=2),
     "taps", 8),
    (ConvCase("7x7_stem_c3", 1, 3, 11, 13, 16, (7, 7), stride=(2, 2), padding=(3, 3)), "rows", 1),
    (ConvCase("3x3_c8_rowk_dil2", 1, 8, 7, 9, 8, (3, 3), padding=(2, 2), dilation=(2, 2)), "rows", 8),
    (ConvCase("5x5_c8_rowk_groups2_stride2", 1, 16, 9, 7, 8, (5, 5), stride=(2, 2), padding=(1, 1), groups=2),
     "rows", 1),
    # several kernel rows per K step: the 3x3 RGB stem in one step (27 of 32 columns), 5x5 x 3 channels in
    # steps of two rows whose last step has one row past KH (masked in A and in the weight)
    (ConvCase("3x3_stem_c3_stride2_odd", 2, 3, 9, 11, 16, (3, 3), stride=(2, 2), padding=(1, 1)), "rows", 1),
    (ConvCase("3x3_c3_pad0", 1, 3, 6, 5, 8, (3, 3)), "rows", 1),
    (ConvCase("5x5_c3_two_rows_per_step", 1, 3, 7, 8, 8, (5, 5), padding=(2, 2)), "rows", 1),
    # 33 kernel rows: more than the row bit set holds, so per-step bounds compares (10 rows per step)
    (ConvCase("33x3_c1_rows_compares", 1, 1, 35, 4, 8, (33, 3), padding=(1, 1)), "rows", 1),
    (ConvCase("7x7_c12_flat", 1, 12, 8, 7, 8, (7, 7), padding=(3, 3)), "flat", 1),
    (ConvCase("1x1_c24_to_c40_align8", 2, 24, 5, 3, 40, (1, 1)), "1x1", 8),
    (ConvCase("1x1_c64_stride2", 1, 64, 7, 7, 16, (1, 1), stride=(2, 2)), "1x1", 1),
]
LAYOUT_DTYPES = [("nchw", torch.float32), ("channels_last", torch.float16)]


def _launch_flags(case: ConvCase, dtype, layout: str) -> dict:
    """The constexpr flags the launcher plans for this case (no kernel run)."""
    x = torch.empty(case.n, case.cin, case.h, case.w, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.empty(case.cout, case.cin // case.groups, *case.kernel, dtype=dtype)
    if layout == "channels_last":
        w = pack_weight(w, case.groups)  # as _weight_for passes it
    key = (tuple(x.shape), tuple(x.stride()), dtype, torch.device("cpu"), tuple(w.shape), tuple(w.stride()),
           dtype, (case.cout,), (case.cout,), None, case.stride, case.padding, case.dilation, case.groups,
           "relu", 0.0, None, False, layout == "channels_last")
    return launcher._plan(*key)["flags"]


def _weight_for(layout: str):
    """channels_last cases run the fast path's packed weight (CH_ALIGN needs its strides), NCHW the plain one."""
    return pack_weight if layout == "channels_last" else None


def _loop_of(flags: dict) -> str:
    if flags["IS_1X1"]:
        return "1x1"
    if flags["ROW_K"]:
        return "rows"
    return "flat" if flags["FLAT_K"] else "taps"


def _params():
    params = []
    for i, (case, loop, align) in enumerate(LOOP_CASES):
        for j, (layout, dtype) in enumerate(LAYOUT_DTYPES):
            act = ACTIVATION_NAMES[(3 * i + j) % len(ACTIVATION_NAMES)]
            residual = (i + j) % 2 == 1
            params.append(pytest.param(case, loop, align if layout == "channels_last" else 1, layout, dtype, act,
                                       residual, id=f"{case.name}-{layout}-{act}-{'res' if residual else 'nores'}"))
    return params


@pytest.mark.parametrize("case,loop,align,layout,dtype,activation,with_residual", _params())
def test_launcher_picks_the_loop(case, loop, align, layout, dtype, activation, with_residual):
    """In-process: the dispatch the interpreter tests below rely on."""
    flags = _launch_flags(case, dtype, layout)
    assert _loop_of(flags) == loop, flags
    assert flags["CH_ALIGN"] == align, flags


@pytest.mark.interpret
@pytest.mark.parametrize("case,loop,align,layout,dtype,activation,with_residual", _params())
def test_loop_matches_float64(case, loop, align, layout, dtype, activation, with_residual):
    run_case(case, dtype, layout, activation, with_residual, weight_fn=_weight_for(layout))


SPLIT_CASES = [
    # 9 taps x 3 chunks of 16 channels = 27 steps; 4 slices of 7 start at (tap 2, chunk 1), (tap 4, chunk 2)...
    (ConvCase("split_taps_mid_chunk", 1, 40, 5, 4, 8, (3, 3), padding=(1, 1)), 4),
    # 7 kernel rows in 2 slices: the second starts at kh = 4.
    (ConvCase("split_rows", 1, 3, 9, 9, 8, (7, 7), stride=(2, 2), padding=(3, 3)), 2),
    (ConvCase("split_flat", 1, 12, 6, 6, 8, (7, 7), padding=(3, 3)), 3),
    # 5x5 x 3 channels: 3 steps of two kernel rows in 2 slices; the second starts at kh = 4 (its only row).
    (ConvCase("split_row_pairs", 1, 3, 7, 6, 8, (5, 5), stride=(2, 2), padding=(2, 2)), 2),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case,split_k", SPLIT_CASES, ids=[c.name for c, _ in SPLIT_CASES])
def test_split_k_starts_mid_loop(case, split_k):
    run_case(case, torch.float32, "channels_last", "silu", with_residual=True, split_k=split_k)


@triton.jit
def _rows_kernel(out_ptr, CIN_G, KH: tl.constexpr, KW: tl.constexpr):
    tl.store(out_ptr, row_k_rows(CIN_G, KH, KW))


@pytest.mark.interpret
def test_row_k_rows_per_step_agree_between_host_and_kernel():
    """The host pads ROW_WIDTH to `configs.row_k_rows` kernel rows and the kernel walks `conv_kloops.row_k_rows`
    rows per step: if they disagreed, a step would leave columns out (wrong sums) or overrun its tile."""
    out = torch.zeros(1, dtype=torch.int32)
    for kh, kw, cin_g in [(3, 3, 3), (7, 7, 3), (5, 5, 3), (3, 3, 1), (7, 7, 1), (3, 3, 8), (5, 5, 8), (7, 7, 9),
                          (1, 7, 3), (7, 1, 3), (2, 2, 15)]:
        _rows_kernel[(1,)](out, cin_g, kh, kw)
        assert int(out) == kconfigs.row_k_rows(kh, kw, cin_g), (kh, kw, cin_g)
        assert kconfigs.row_width(kw, cin_g, kh) >= int(out) * kw * cin_g


@pytest.mark.interpret
def test_unaligned_channel_strides_fall_back():
    """24 channels read from a 25-channel buffer: pixel stride 25, not a multiple of 8, so no CH_ALIGN hint (a
    wrong hint would make the compiler assume aligned vectors); the result is still right."""
    case = ConvCase("c24_in_c25", 1, 24, 5, 5, 8, (3, 3), padding=(1, 1))
    big = torch.zeros(case.n, 25, case.h, case.w, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    x_view = big[:, :24]
    assert x_view.stride(3) == 25

    out = run_case(case, torch.float16, "channels_last", "relu", True, weight_fn=pack_weight)
    # Same conv through the strided view: copy the case's input into it and compare with the dense run.
    inputs, _ = build_case(case, torch.float16, "channels_last", "relu", True)
    x_view.copy_(inputs["x"])
    weight = pack_weight(inputs["weight"])
    assert _launch_flags_for(inputs["x"], weight, case)["CH_ALIGN"] == 8  # the dense input does get the hint
    assert _launch_flags_for(x_view, weight, case)["CH_ALIGN"] == 1
    out_view = conv_bn_act(x_view, weight, inputs["scale"], inputs["shift"], padding=case.padding,
                           residual=inputs["residual"])
    torch.testing.assert_close(out_view, out, rtol=0, atol=0)


def _launch_flags_for(x, w, case: ConvCase) -> dict:
    key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, tuple(w.shape), tuple(w.stride()), w.dtype,
           (case.cout,), (case.cout,), None, case.stride, case.padding, case.dilation, case.groups, "relu", 0.0,
           None, False, True)
    return launcher._plan(*key)["flags"]


def launch_with_config(x, weight, scale, shift, *, padding, block, num_warps, num_stages, activation="relu"):
    """Run `_conv_gemm_kernel` itself with one explicit config (bypassing the autotuner and its warp rule), on
    the launcher's own plan. test_kernel_gpu uses it to check 8-warp spatial configs on real hardware."""
    stride, dilation = (1, 1), (1, 1)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, tuple(weight.shape), tuple(weight.stride()),
           weight.dtype, tuple(scale.shape), tuple(shift.shape), None, stride, padding, dilation, 1, activation,
           0.0, 1, False, channels_last)
    plan = launcher._plan(*key)
    y = torch.empty(plan["out_shape"], dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    bm, bn, bk = block
    grid = (-(-plan["m"] // bm) * -(-plan["cout_g"] // bn), 1, 1)
    extra = {} if launcher.interpreting() else dict(num_warps=num_warps, num_stages=num_stages)
    launcher._conv_gemm_kernel[grid](x, weight, scale.float(), shift.float(), y, y, scale.float(),
                                     *plan["int_args"], 0.0, **plan["flags"], BLOCK_M=bm, BLOCK_N=bn,
                                     BLOCK_K=bk, GROUP_M=8, **extra)
    return y


@pytest.mark.interpret
def test_launch_with_config_matches_the_launcher():
    """The explicit-config helper computes what the launcher does (so its GPU use checks the kernel, not itself)."""
    case = ConvCase("helper", 1, 16, 5, 6, 16, (3, 3), padding=(1, 1))
    inputs, _ = build_case(case, torch.float16, "channels_last", "relu", False)
    weight = pack_weight(inputs["weight"])
    expected = conv_bn_act(inputs["x"], weight, inputs["scale"], inputs["shift"], padding=case.padding)
    got = launch_with_config(inputs["x"], weight, inputs["scale"], inputs["shift"], padding=case.padding,
                             block=(16, 16, 16), num_warps=8, num_stages=4)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
