"""Stream-K schedules of the TMA-descriptor conv kernels: the fastest loads on sub-wave layers, full waves.

The TMA kernels of `conv_tma` (1x1 GEMM over 2-D descriptors) and `conv_tma_kxk` (stride-1 KxK over a 4-D
NHWC descriptor, also strided 1x1 convs through the strided view) run one program per output tile. Where the
schedule model (`schedule.choose_schedule`) gives a layer stream-K, that grid would leave SMs idle, so these
kernels run the same schedule as `conv_streamk._conv_streamk_kernel`: P programs (the plan's count, the SM
count on a GPU) each take a balanced contiguous slice of all tiles' K iterations (tile-major), a tile covered
whole ends in the fused epilogue, and a shared tile's partials meet in the workspace where the contributor
that completes the tile's counter sums them in program order and resets the counter (`conv_streamk`'s
`streamk_slice` / `streamk_fixup`, shared: no spin-waits, so the schedule runs in Triton's CPU interpreter).
Only the loads of a tile's K range differ: the TMA K loops of `conv_tma.k_loop_tma_1x1` and
`conv_tma_kxk.k_loop_tma_kxk`, started at any (tap, channel-chunk) position (`tap_position`).

Split-K is not offered for the TMA kernels: where the model picks split-K (batch-1 layers with a handful of
tiles) the pointer kernel runs it; the stream-K kernels here cover every layer the model gives stream-K.

Eligibility is the data-parallel kernels' (`tma_1x1_eligible`, `tma_kxk_eligible`, `strided_1x1_view`, asked
without a split); tiles are those kernels' configs that fit the workspace slots (BLOCK_M * BLOCK_N <=
`schedule.STREAMK_MAX_TILE`, as the pointer stream-K kernel's pruning keeps).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from fusedconv.kernels import conv_streamk as _streamk
from fusedconv.kernels import conv_tma as _tma
from fusedconv.kernels import conv_tma_kxk as _kxk
from fusedconv.kernels.conv_streamk import streamk_fixup, streamk_slice
from fusedconv.kernels.conv_tma import epilogue_1x1, k_loop_tma_1x1
from fusedconv.kernels.conv_tma_kxk import epilogue_kxk, k_loop_tma_kxk, tap_position
from fusedconv.kernels.schedule import STREAMK_MAX_TILE


@triton.jit
def _conv1x1_tma_streamk_kernel(
    a_desc, b_desc, scale_ptr, shift_ptr, res_ptr, y_ptr, ws_ptr, count_ptr,
    M, CIN, COUT, OH, OW,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, WS_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    tl.static_assert(BLOCK_M * BLOCK_N <= WS_TILE)  # a workspace slot holds WS_TILE fp32 values
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    k_tile = tl.cdiv(CIN, BLOCK_K)
    base, extra, start, end, t_lo, t_hi = streamk_slice(tl.cdiv(M, BLOCK_M) * num_pid_n * k_tile, k_tile, pid,
                                                        tl.num_programs(0))
    for t in range(t_lo, t_hi):
        tile_lo = t * k_tile
        k_lo = tl.maximum(start, tile_lo) - tile_lo
        k_hi = tl.minimum(end, tile_lo + k_tile) - tile_lo
        pid_m = t // num_pid_n
        m0 = pid_m * BLOCK_M
        n0 = (t - pid_m * num_pid_n) * BLOCK_N
        acc = k_loop_tma_1x1(a_desc, b_desc, m0, n0, k_lo, k_hi, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        acc, finish = streamk_fixup(acc, t, tile_lo, k_lo, k_hi, k_tile, start, base, extra, pid, ws_ptr, count_ptr,
                                    WS_TILE, BLOCK_M, BLOCK_N)
        if finish:
            epilogue_1x1(acc, m0, n0, scale_ptr, shift_ptr, res_ptr, y_ptr, M, COUT, OH, OW, srn, src, srh, srw,
                         syn, syc, syh, syw, ACT_PARAM, ACTIVATION, HAS_RESIDUAL, BLOCK_M, BLOCK_N)


@triton.jit
def _conv_kxk_tma_streamk_kernel(
    x_desc, w_desc, scale_ptr, shift_ptr, res_ptr, y_ptr, ws_ptr, count_ptr,
    N, OH, OW, CIN, COUT, pad_h, pad_w, dil_h, dil_w,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    KH: tl.constexpr, KW: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, WS_TILE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    tl.static_assert(BLOCK_M * BLOCK_N <= WS_TILE)
    pid = tl.program_id(0)
    tiles_h = tl.cdiv(OH, BLOCK_H)
    tiles_w = tl.cdiv(OW, BLOCK_W)
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    k_tile = KH * KW * tl.cdiv(CIN, BLOCK_K)
    base, extra, start, end, t_lo, t_hi = streamk_slice(N * tiles_h * tiles_w * num_pid_n * k_tile, k_tile, pid,
                                                        tl.num_programs(0))
    for t in range(t_lo, t_hi):
        tile_lo = t * k_tile
        k_lo = tl.maximum(start, tile_lo) - tile_lo
        k_hi = tl.minimum(end, tile_lo + k_tile) - tile_lo
        pid_m = t // num_pid_n
        n0 = (t - pid_m * num_pid_n) * BLOCK_N
        tw = pid_m % tiles_w
        r = pid_m // tiles_w
        th = r % tiles_h
        n = r // tiles_h
        oh0 = th * BLOCK_H
        ow0 = tw * BLOCK_W
        kh, kw, tap, c0 = tap_position(k_lo, CIN, KW, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = k_loop_tma_kxk(acc, x_desc, w_desc, n, oh0, ow0, n0, k_hi - k_lo, kh, kw, tap, c0, CIN, pad_h,
                             pad_w, dil_h, dil_w, KW, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        acc, finish = streamk_fixup(acc, t, tile_lo, k_lo, k_hi, k_tile, start, base, extra, pid, ws_ptr, count_ptr,
                                    WS_TILE, BLOCK_M, BLOCK_N)
        if finish:
            epilogue_kxk(acc, n, oh0, ow0, n0, scale_ptr, shift_ptr, res_ptr, y_ptr, OH, OW, COUT, srn, src, srh,
                         srw, syn, syc, syh, syw, ACT_PARAM, ACTIVATION, HAS_RESIDUAL, BLOCK_H, BLOCK_W, BLOCK_N)


def fits_workspace(configs, block_m) -> list:
    """The configs whose tile fits a workspace slot (`block_m(cfg)`: its GEMM rows)."""
    return [c for c in configs if block_m(c) * c.kwargs["BLOCK_N"] <= STREAMK_MAX_TILE]


#: Deny-list kernel names of the two stream-K TMA kernels: the GPU check runs them apart from the data-parallel
#: TMA kernels (other programs, a fix-up), so a config failing here is denied here. Entries of the data-parallel
#: kernel ("tma1x1" / "tmakxk") still apply: the K loop is the same code.
DENY_KERNEL = {"1x1": "tma1x1_streamk", "kxk": "tmakxk_streamk"}


def _drop_denied_streamk(kind: str, configs, tensor) -> list:
    from fusedconv.kernels.denylist import config_key, drop_denied

    return drop_denied(configs, {"IS_1X1": kind == "1x1"}, kernel=DENY_KERNEL[kind], tensor=tensor, key=config_key)


def _prune_1x1(configs, named_args, **kwargs):
    kept = fits_workspace(_tma._prune_tma(configs, named_args, **kwargs), lambda c: c.kwargs["BLOCK_M"])
    return _drop_denied_streamk("1x1", kept, named_args["a_desc"].base)


def _prune_kxk(configs, named_args, **kwargs):
    kept = fits_workspace(_kxk._prune_kxk(configs, named_args, **kwargs),
                          lambda c: c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"])
    return _drop_denied_streamk("kxk", kept, named_args["x_desc"].base)


def configs_1x1(dtype_bytes: int) -> list:
    """The 1x1 TMA configs whose tile fits a workspace slot (128x256 does not)."""
    return fits_workspace(_tma.tma_configs(dtype_bytes), lambda c: c.kwargs["BLOCK_M"])


#: The widest output-channel block the KxK stream-K kernel runs on 16-bit inputs. Measured, not derived: on an
#: H200 (triton 3.6, 2026-12-04 GPU check and its follow-up) the 16-bit BLOCK_N=128 tiles (8x8 and 8x16 pixels,
#: pipelined, num_stages 3-4) returned 1-2 % relative errors, different on every rerun, whenever the launch had
#: more programs than SMs (two resident per SM) — even on tiles one program covered whole, so not the fix-up —
#: while num_stages=1, BLOCK_N=64 and the fp32 BLOCK_N=128 tiles were exact at every program count. Until the
#: cause is found these tiles are not offered on any GPU or triton version (the data-parallel kernel keeps
#: them: it passed every check).
MAX_BLOCK_N_16BIT_KXK = 64


def configs_kxk(dtype_bytes: int) -> list:
    """The KxK TMA configs whose tile fits a workspace slot, without the 16-bit tiles wider than
    MAX_BLOCK_N_16BIT_KXK (see there)."""
    kept = fits_workspace(_kxk.kxk_configs(dtype_bytes), lambda c: c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"])
    return [c for c in kept if dtype_bytes > 2 or c.kwargs["BLOCK_N"] <= MAX_BLOCK_N_16BIT_KXK]


#: Autotuners by (kind, programs): the program count is the grid, not a kernel argument, so it cannot be in an
#: autotuner's key; one autotuner per count keeps a config tuned under one count from being reused under another.
_autotuned = {}


def _autotuned_kernel(kind: str, programs: int):
    """The autotuner around the 1x1 ("1x1") or KxK ("kxk") stream-K kernel for `programs` programs, built on
    first GPU use."""
    if (kind, programs) not in _autotuned:
        if kind == "1x1":
            _autotuned[kind, programs] = triton.autotune(
                configs=configs_1x1(2) + configs_1x1(4), key=["M", "CIN", "COUT", "HAS_RESIDUAL"],
                prune_configs_by={"early_config_prune": _prune_1x1})(_conv1x1_tma_streamk_kernel)
        else:
            _autotuned[kind, programs] = triton.autotune(
                configs=configs_kxk(2) + configs_kxk(4),
                key=["N", "OH", "OW", "CIN", "COUT", "KH", "KW", "HAS_RESIDUAL"],
                prune_configs_by={"early_config_prune": _prune_kxk})(_conv_kxk_tma_streamk_kernel)
    return _autotuned[kind, programs]


def workspace_tile(kind: str, named_args: dict) -> int:
    """Values per workspace slot of a TMA stream-K launch: the largest tile (GEMM rows x BLOCK_N) among the
    configs its autotuner may run for these arguments (the same pruning, deny-list included), so a small-tile
    layer does not get STREAMK_MAX_TILE slots per program. The kernels' static_assert refuses a larger tile."""
    if kind == "1x1":
        kept = _prune_1x1(configs_1x1(2) + configs_1x1(4), named_args)
        return max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in kept)
    kept = _prune_kxk(configs_kxk(2) + configs_kxk(4), named_args)
    return max(c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"] * c.kwargs["BLOCK_N"] for c in kept)


@functools.lru_cache(maxsize=1024)
def _launch_workspace_tile(kind: str, dtype, device, m: int, cin: int, cout: int, has_residual: bool) -> int:
    """`workspace_tile` of a launch, cached per problem (pruning builds configs: kept off the per-call path)."""
    base = SimpleNamespace(base=torch.empty(0, dtype=dtype, device=device))
    return workspace_tile(kind, {"a_desc" if kind == "1x1" else "x_desc": base, "M": m, "CIN": cin, "COUT": cout,
                                 "HAS_RESIDUAL": has_residual})


def _buffers(device, programs, ws_tile, tiles):
    return _streamk.partial_workspace(programs, ws_tile, device), _streamk.tile_counters(device, tiles)


def conv1x1_tma_streamk_launch(x, weight, scale, shift, residual, y, activation_id, act_param, tf32, res_stride,
                               programs, trace, interpret_cfg=None):
    """Stream-K launch of the 1x1 TMA kernel with `programs` programs on an eligible problem (the caller
    checked `conv_tma.tma_1x1_eligible`); `trace` wraps the autotuned kernel for torch tracing."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    m = n * h * w
    x2d = x.permute(0, 2, 3, 1).reshape(m, cin)  # views, as in conv_tma.conv1x1_tma_launch
    w2d = weight.permute(1, 2, 3, 0).reshape(cin, cout)
    first = interpret_cfg or {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}
    a_desc = _tma.TensorDescriptor(x2d, [m, cin], [cin, 1], [first["BLOCK_M"], first["BLOCK_K"]])
    b_desc = _tma.TensorDescriptor(w2d, [cin, cout], [cout, 1], [first["BLOCK_K"], first["BLOCK_N"]])
    # Slots sized for the largest tile a config may use; counters for the smallest (16x16: pruning's floor).
    ws_tile = (interpret_cfg["BLOCK_M"] * interpret_cfg["BLOCK_N"] if interpret_cfg else
               _launch_workspace_tile("1x1", x.dtype, x.device, m, cin, cout, residual is not None))
    workspace, counters = _buffers(x.device, programs, ws_tile, -(-m // 16) * -(-cout // 16))
    res = residual if residual is not None else y
    args = (a_desc, b_desc, scale, shift, res, y, workspace, counters, m, cin, cout, h, w, *res_stride, *y.stride(),
            float(act_param))
    flags = dict(ACTIVATION=activation_id, HAS_RESIDUAL=residual is not None,
                 INPUT_PRECISION="tf32" if tf32 else "ieee", WS_TILE=ws_tile)
    if interpret_cfg is not None:
        _conv1x1_tma_streamk_kernel[(programs,)](*args, **flags, **interpret_cfg)
    else:
        trace(_autotuned_kernel("1x1", programs))[(programs,)](*args, **flags)
    return y


def conv_kxk_tma_streamk_launch(x, weight, scale, shift, residual, y, padding, dilation, activation_id, act_param,
                                tf32, res_stride, programs, trace, interpret_cfg=None):
    """Stream-K launch of the KxK TMA kernel (x: the input, or the strided view of a strided 1x1 conv) on an
    eligible problem (the caller checked `conv_tma_kxk.tma_kxk_eligible` / `strided_1x1_view`)."""
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    x4d = x.permute(0, 2, 3, 1)
    w3d = weight.permute(2, 3, 1, 0).reshape(kh * kw, cin, cout)
    cfg0 = interpret_cfg or {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 64, "BLOCK_K": 16}
    x_desc = _tma.TensorDescriptor(x4d, [n, h, w, cin], list(x4d.stride()),
                                   [1, cfg0["BLOCK_H"], cfg0["BLOCK_W"], cfg0["BLOCK_K"]])
    w_desc = _tma.TensorDescriptor(w3d, [kh * kw, cin, cout], list(w3d.stride()),
                                   [1, cfg0["BLOCK_K"], cfg0["BLOCK_N"]])
    if interpret_cfg is not None:
        ws_tile = interpret_cfg["BLOCK_H"] * interpret_cfg["BLOCK_W"] * interpret_cfg["BLOCK_N"]
        min_h, min_w = interpret_cfg["BLOCK_H"], interpret_cfg["BLOCK_W"]
    else:
        ws_tile = _launch_workspace_tile("kxk", x.dtype, x.device, 0, cin, cout, residual is not None)
        min_h = min(c.kwargs["BLOCK_H"] for c in _kxk.kxk_configs(2))
        min_w = min(c.kwargs["BLOCK_W"] for c in _kxk.kxk_configs(2))
    tiles = n * -(-oh // min_h) * -(-ow // min_w) * -(-cout // 16)
    workspace, counters = _buffers(x.device, programs, ws_tile, tiles)
    res = residual if residual is not None else y
    args = (x_desc, w_desc, scale, shift, res, y, workspace, counters, n, oh, ow, cin, cout, padding[0], padding[1],
            dilation[0], dilation[1], *res_stride, *y.stride(), float(act_param))
    flags = dict(KH=kh, KW=kw, ACTIVATION=activation_id, HAS_RESIDUAL=residual is not None,
                 INPUT_PRECISION="tf32" if tf32 else "ieee", WS_TILE=ws_tile)
    if interpret_cfg is not None:
        _conv_kxk_tma_streamk_kernel[(programs,)](*args, **flags, **interpret_cfg)
    else:
        trace(_autotuned_kernel("kxk", programs))[(programs,)](*args, **flags)
    return y


#: (kernel, dtype, tile) pairs compiled ahead of time: every 16-bit tile of each kernel would double the TMA
#: compile tests, so the largest and smallest offered fp16 tiles, one bf16 and one fp32 (TF32) tile each.
_AOT_PICKS = (
    ("1x1", "float16", (128, 128)), ("1x1", "float16", (64, 64)), ("1x1", "bfloat16", (128, 64)),
    ("1x1", "float32", (128, 128)),
    ("kxk", "float16", (8, 16, 64)), ("kxk", "float16", (8, 8, 64)), ("kxk", "bfloat16", (4, 16, 64)),
    ("kxk", "float32", (8, 8, 128)),
)


def aot_variants() -> list[dict]:
    """The stream-K TMA kernels' variants for ahead-of-time compile tests (format: configs.aot_variants, with
    `expects_tma`)."""
    from fusedconv.kernels.configs import residual_spills
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    acts = list(ACTIVATION_IDS)
    variants = []
    for turn, (kind, dtype, tile) in enumerate(_AOT_PICKS):
        t = short[dtype]
        esize = 4 if dtype == "float32" else 2
        if kind == "1x1":
            fn = _conv1x1_tma_streamk_kernel
            cfg = next(c for c in configs_1x1(esize) if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == tile)
            k = cfg.kwargs
            bm = k["BLOCK_M"]
            sig = {"a_desc": f"tensordesc<{t}[{bm},{k['BLOCK_K']}]>",
                   "b_desc": f"tensordesc<{t}[{k['BLOCK_K']},{k['BLOCK_N']}]>"}
            ints = ("M", "CIN", "COUT", "OH", "OW")
            shape = {}
            label = "tma_streamk_conv1x1"
        else:
            fn = _conv_kxk_tma_streamk_kernel
            cfg = next(c for c in configs_kxk(esize)
                       if (c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.kwargs["BLOCK_N"]) == tile)
            k = cfg.kwargs
            bm = k["BLOCK_H"] * k["BLOCK_W"]
            sig = {"x_desc": f"tensordesc<{t}[1,{k['BLOCK_H']},{k['BLOCK_W']},{k['BLOCK_K']}]>",
                   "w_desc": f"tensordesc<{t}[1,{k['BLOCK_K']},{k['BLOCK_N']}]>"}
            ints = ("N", "OH", "OW", "CIN", "COUT", "pad_h", "pad_w", "dil_h", "dil_w")
            shape = {"KH": 3, "KW": 3}
            label = "tma_streamk_conv3x3"
        sig.update({"scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": f"*{t}", "y_ptr": f"*{t}",
                    "ws_ptr": "*fp32", "count_ptr": "*i32"})
        for name in ints + ("srn", "src", "srh", "srw", "syn", "syc", "syh", "syw"):
            sig[name] = "i32"
        sig["ACT_PARAM"] = "fp32"
        act = acts[(3 * turn + 1) % len(acts)]
        residual = turn % 2 == 0 and not residual_spills(bm, k["BLOCK_N"], cfg.num_warps)
        constexprs = dict(shape, ACTIVATION=ACTIVATION_IDS[act], HAS_RESIDUAL=residual,
                          INPUT_PRECISION="tf32" if dtype == "float32" else "ieee", WS_TILE=STREAMK_MAX_TILE, **k)
        for name in constexprs:
            sig[name] = "constexpr"
        units = ("src", "syc") + (("dil_h", "dil_w") if kind == "kxk" else ())
        for unit in units:  # channels_last unit strides (and dilation 1): constexpr 1 in real launches
            sig[unit] = "constexpr"
            constexprs[unit] = 1
        sig = {name: sig[name] for name in fn.arg_names}  # parameter order
        divisible = tuple(a for a in ("scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "ws_ptr", "count_ptr", "CIN",
                                      "COUT", "srn", "srh", "srw", "syn", "syh", "syw") if sig[a] != "constexpr")
        variants.append({
            "name": f"{label}_{act}_{'res_' if residual else ''}{t}_m{bm}n{k['BLOCK_N']}k{k['BLOCK_K']}"
                    f"s{cfg.num_stages}w{cfg.num_warps}",
            "fn": fn, "signature": sig, "constexprs": constexprs,
            "attrs": {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible},
            "divisible_by_16": divisible, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "dtype": dtype, "expects_tensor_cores": True, "expects_tma": True,
        })
    return variants
