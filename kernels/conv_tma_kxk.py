"""Stride-1 KxK conv through a 4-D NHWC TMA tensor descriptor whose out-of-bounds zero fill is the padding.

Each program computes BLOCK_H x BLOCK_W output pixels of one image (BLOCK_M = BLOCK_H * BLOCK_W GEMM rows) times
BLOCK_N output channels. For a stride-1 conv, the input pixels one tap reads for such a patch are again a
BLOCK_H x BLOCK_W patch, shifted by (kh * dil_h - pad_h, kw * dil_w - pad_w): one TMA box [1, BLOCK_H, BLOCK_W,
BLOCK_K] of the channels_last input, loaded at possibly negative or past-the-edge coordinates, where the copy
engine fills zeros — exactly the conv's zero padding — so the K loop has no masks and no address arithmetic
beyond four scalar coordinates. The packed weight is a 3-D descriptor [KH*KW, Cin, Cout] whose Cin tail is
zero-filled too. The (tap, channel-chunk) position is a carried counter as in `conv_kloops.k_loop_taps`.

When it applies (`tma_kxk_eligible`): stride 1, groups 1, a spatial kernel, x dense channels_last, weight packed,
16-byte aligned bases and rows (Cin and Cout times the element size multiples of 16), no split-K, sm_90+ on CUDA
(any CPU tensor under the interpreter). Otherwise the pointer kernel runs. A candidate beside the pointer
kernel (see conv_bn_act's `tma`). Spatial configs keep the 4-warp rule of `configs.SPATIAL_MAX_WARPS` until
validated on hardware.

TMA-store epilogue (TMA_EPILOGUE, as in `conv_tma`): the dense channels_last output is the 4-D tensor
[N, OH, OW, Cout], and a program's BLOCK_H x BLOCK_W patch of BLOCK_N channels is one box of it, so the tile is
written by one bulk-tensor store of a 4-D descriptor (the copy engine clips the patch at the image's bottom and
right edges and the last channel block) and a dense channels_last residual read by one box load. Twins of the
large patches only (`dp_configs`); without an output descriptor (`conv_tma.tma_store_eligible`) every config
stores through pointers.

Stream-K layers run this K loop (`k_loop_tma_kxk`, from any `tap_position`) and the pointer-store epilogue in
the stream-K kernel of `conv_tma_streamk` (configs `kxk_configs`, no twins); split-K layers run the pointer
kernel.

Strided 1x1 convs (`strided_1x1_view`): a stride-s unpadded 1x1 conv reads exactly the pixels of the strided
view x[:, :, ::s, ::s], which is again a regular 4-D NHWC tensor (strides s*W*C and s*C: 16-byte multiples
whenever the dense ones are), so this kernel runs it as a 1x1 stride-1 conv over a descriptor on that view —
ResNet's stride-2 downsample convs get TMA loads without a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedconv.kernels.conv_tma import TMA_EPILOGUE_MIN_TILE, TensorDescriptor, tma_store_eligible
from fusedconv.kernels.configs import constexpr_defaults, residual_spills
from fusedconv.kernels.epilogue import epilogue_store, epilogue_tile

#: (BLOCK_H, BLOCK_W, BLOCK_N, BLOCK_K, num_stages, num_warps), 16-bit inputs; fp32 halves BLOCK_K.
_KXK_CONFIGS = (
    (8, 16, 128, 64, 3, 4),
    (8, 8, 128, 64, 4, 4),
    (8, 16, 64, 64, 4, 4),
    (8, 8, 64, 64, 4, 4),
    (4, 16, 64, 64, 4, 4),
)
GROUP_M = 8


@triton.jit
def _conv_kxk_tma_kernel(
    x_desc, w_desc, y_desc, r_desc, scale_ptr, shift_ptr, res_ptr, y_ptr,
    N, OH, OW, CIN, COUT, pad_h, pad_w, dil_h, dil_w,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    KH: tl.constexpr, KW: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, TMA_EPILOGUE: tl.constexpr = False,
):
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    tiles_h = tl.cdiv(OH, BLOCK_H)
    tiles_w = tl.cdiv(OW, BLOCK_W)
    num_pid_m = N * tiles_h * tiles_w
    num_pid_n = tl.cdiv(COUT, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    tw = pid_m % tiles_w
    t = pid_m // tiles_w
    th = t % tiles_h
    n = t // tiles_h
    oh0 = th * BLOCK_H
    ow0 = tw * BLOCK_W
    n0 = pid_n * BLOCK_N

    # The whole K range from tap (0, 0), channel 0: constant start counters. (An assigned 0 is an int32 scalar,
    # as loop-carried counters must be; a literal argument would arrive as a constexpr.) The accumulator is
    # made here and the counters passed in this order: the loop then compiles to the same SASS as when it was
    # written inline (a different order of loop-carried values cost 1-2 instructions per K step).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    zero = 0
    acc = k_loop_tma_kxk(acc, x_desc, w_desc, n, oh0, ow0, n0, KH * KW * tl.cdiv(CIN, BLOCK_K), zero, zero, zero,
                         zero, CIN, pad_h, pad_w, dil_h, dil_w, KW, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if TMA_EPILOGUE and y_desc is not None:  # y_desc None: the output is not TMA-storable (tma_store_eligible)
        epilogue_kxk_tma_store(acc, n, oh0, ow0, n0, y_desc, r_desc, scale_ptr, shift_ptr, res_ptr, y_ptr, OH, OW,
                               COUT, srn, src, srh, srw, ACT_PARAM, ACTIVATION, HAS_RESIDUAL, BLOCK_H, BLOCK_W,
                               BLOCK_N)
    else:
        epilogue_kxk(acc, n, oh0, ow0, n0, scale_ptr, shift_ptr, res_ptr, y_ptr, OH, OW, COUT, srn, src, srh, srw,
                     syn, syc, syh, syw, ACT_PARAM, ACTIVATION, HAS_RESIDUAL, BLOCK_H, BLOCK_W, BLOCK_N)


@triton.jit
def tap_position(k_lo, CIN, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """(kh, kw, tap, c0) of K step k_lo in the (tap, channel-chunk) order: where a K range that starts mid-tile
    (stream-K) begins. The only divisions of such a range, once per tile."""
    k_chunks = tl.cdiv(CIN, BLOCK_K)
    tap = k_lo // k_chunks
    c0 = (k_lo - tap * k_chunks) * BLOCK_K
    kh = tap // KW
    kw = tap - kh * KW
    return kh, kw, tap, c0


@triton.jit
def k_loop_tma_kxk(acc, x_desc, w_desc, n, oh0, ow0, n0, steps, kh, kw, tap, c0, CIN, pad_h, pad_w, dil_h,
                   dil_w, KW: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """`acc` plus the patch at (n, oh0, ow0), channels n0.., over `steps` K steps of the (tap, channel-chunk)
    order from position (kh, kw, tap, c0) (`tap_position`); carried counters, no division in the loop."""
    for _ in range(0, steps):
        a = x_desc.load([n, oh0 - pad_h + kh * dil_h, ow0 - pad_w + kw * dil_w, c0])
        b = w_desc.load([tap, c0, n0])
        acc = tl.dot(tl.reshape(a, [BLOCK_M, BLOCK_K]), tl.reshape(b, [BLOCK_K, BLOCK_N]), acc,
                     input_precision=INPUT_PRECISION)
        c0 += BLOCK_K
        next_tap = c0 >= CIN
        row_end = next_tap & (kw == KW - 1)
        c0 = tl.where(next_tap, 0, c0)
        tap = tl.where(next_tap, tap + 1, tap)
        kw = tl.where(next_tap, tl.where(row_end, 0, kw + 1), kw)
        kh = tl.where(row_end, kh + 1, kh)
    return acc


@triton.jit
def epilogue_kxk(acc, n, oh0, ow0, n0, scale_ptr, shift_ptr, res_ptr, y_ptr, OH, OW, COUT, srn, src, srh, srw,
                 syn, syc, syh, syw, ACT_PARAM, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fused epilogue of the BLOCK_H x BLOCK_W output patch at (n, oh0, ow0), channels n0.."""
    rows = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = oh0 + rows // BLOCK_W  # BLOCK_W is a power-of-two constexpr: a shift
    ow = ow0 + rows % BLOCK_W
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_m = (oh < OH) & (ow < OW)
    mask_n = offs_n < COUT
    mask_mn = mask_m[:, None] & mask_n[None, :]
    epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, n * srn + oh * srh + ow * srw,
                   n * syn + oh * syh + ow * syw, offs_n, src, syc, mask_n, mask_mn,
                   HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


@triton.jit
def epilogue_kxk_tma_store(acc, n, oh0, ow0, n0, y_desc, r_desc, scale_ptr, shift_ptr, res_ptr, y_ptr, OH, OW, COUT,
                           srn, src, srh, srw, ACT_PARAM, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """The fused epilogue of the patch at (n, oh0, ow0), channels n0.., written by one bulk-tensor store of the
    4-D [N, OH, OW, COUT] output descriptor (box 1 x BLOCK_H x BLOCK_W x BLOCK_N; the copy engine clips the
    patch's rows, columns and channels past the edges: no masks). The residual box comes through `r_desc` when
    the residual has the output's dense layout, else by its strides."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT
    residual = 0.0
    if HAS_RESIDUAL:
        if r_desc is not None:
            residual = tl.reshape(r_desc.load([n, oh0, ow0, n0]), [BLOCK_M, BLOCK_N])
        else:
            rows = tl.arange(0, BLOCK_M)
            oh = oh0 + rows // BLOCK_W  # BLOCK_W is a power-of-two constexpr: a shift
            ow = ow0 + rows % BLOCK_W
            mask_mn = ((oh < OH) & (ow < OW))[:, None] & mask_n[None, :]
            residual = tl.load(res_ptr + (n * srn + oh * srh + ow * srw)[:, None] + (offs_n * src)[None, :],
                               mask=mask_mn, other=0.0)
    out = epilogue_tile(acc, scale_ptr, shift_ptr, offs_n, mask_n, residual, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    y_desc.store([n, oh0, ow0, n0], tl.reshape(out.to(y_ptr.dtype.element_ty), [1, BLOCK_H, BLOCK_W, BLOCK_N]))


def _set_block_shapes(nargs):
    """Autotune pre_hook: the descriptors' boxes follow the config being launched (the output and residual
    descriptors, where the launch has them, take the output patch's)."""
    nargs["x_desc"].block_shape = [1, nargs["BLOCK_H"], nargs["BLOCK_W"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [1, nargs["BLOCK_K"], nargs["BLOCK_N"]]
    for name in ("y_desc", "r_desc"):
        if nargs.get(name) is not None:
            nargs[name].block_shape = [1, nargs["BLOCK_H"], nargs["BLOCK_W"], nargs["BLOCK_N"]]


def kxk_configs(dtype_bytes: int) -> list:
    return [triton.Config({"BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_N": bn, "BLOCK_K": bk if dtype_bytes <= 2 else bk // 2,
                           "GROUP_M": GROUP_M}, num_stages=s, num_warps=w, pre_hook=_set_block_shapes)
            for bh, bw, bn, bk, s, w in _KXK_CONFIGS]


def dp_configs(dtype_bytes: int) -> list:
    """The data-parallel kernel's autotune candidates: `kxk_configs` (the stream-K kernel's too) plus a
    TMA_EPILOGUE twin of each patch of at least conv_tma.TMA_EPILOGUE_MIN_TILE outputs (see there why only
    those)."""
    base = kxk_configs(dtype_bytes)
    twins = [triton.Config({**c.kwargs, "TMA_EPILOGUE": True}, num_stages=c.num_stages, num_warps=c.num_warps,
                           pre_hook=_set_block_shapes) for c in base
             if c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"] * c.kwargs["BLOCK_N"] >= TMA_EPILOGUE_MIN_TILE]
    return base + twins


def _prune_kxk(configs, named_args, **kwargs):
    """Configs of the input's dtype class with BLOCK_N / BLOCK_K capped to the channel counts; the TMA_EPILOGUE
    twins only where the launch has an output descriptor (`y_desc`, see conv_tma.tma_store_eligible)."""
    args = {**named_args, **kwargs}
    store_ok = args.get("y_desc") is not None
    dtype_bytes = args["x_desc"].base.element_size()
    want_k = 64 if dtype_bytes <= 2 else 32

    def cap(v):
        return max(16, 1 << (max(int(v), 1) - 1).bit_length())

    kept, seen = [], set()
    for c in configs:
        if c.kwargs["BLOCK_K"] != want_k or (c.kwargs.get("TMA_EPILOGUE") and not store_ok):
            continue
        bn, bk = min(c.kwargs["BLOCK_N"], cap(args["COUT"])), min(c.kwargs["BLOCK_K"], cap(args["CIN"]))
        sig = (c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], bn, bk, c.num_stages, c.num_warps,
               bool(c.kwargs.get("TMA_EPILOGUE")))
        if args.get("HAS_RESIDUAL") and residual_spills(c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"], bn, c.num_warps):
            continue  # accumulator + residual tile spill in the epilogue (configs.residual_spills)
        if sig not in seen:
            seen.add(sig)
            kept.append(triton.Config({**c.kwargs, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=c.num_stages,
                                      num_warps=c.num_warps, pre_hook=_set_block_shapes))
    from fusedconv.kernels.denylist import config_key, drop_denied

    # configs the GPU check found wrong on this GPU + triton (keyed by every config value: see denylist)
    return drop_denied(kept, {"IS_1X1": False}, kernel="tmakxk", tensor=args["x_desc"].base,
                       key=config_key)


def tma_kxk_eligible(x, weight, groups, stride, split_k) -> bool:
    """Whether `_conv_kxk_tma_kernel` can run this conv; False means: use the pointer kernel."""
    if TensorDescriptor is None or groups != 1 or split_k not in (None, 1) or tuple(stride) != (1, 1):
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    esize = x.element_size()
    if kh * kw == 1 or x.stride() != (h * w * cin, 1, w * cin, cin):
        return False
    if weight.permute(2, 3, 1, 0).stride() != (kw * cin * cout, cin * cout, cout, 1):  # packed
        return False
    if (cin * esize) % 16 or (cout * esize) % 16:
        return False
    return x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0 and n * h * w > 0


def strided_1x1_view(x, weight, groups, stride, padding, split_k):
    """x[:, :, ::sh, ::sw] when this kernel can run a strided, unpadded 1x1 conv on that view (groups 1, x dense
    channels_last, packed weight, 16-byte rows, sm_90+ or the interpreter, no split-K), else None."""
    if TensorDescriptor is None or groups != 1 or split_k not in (None, 1) or tuple(stride) == (1, 1):
        return None
    if tuple(weight.shape[2:]) != (1, 1) or tuple(padding) != (0, 0):
        return None
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return None
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    esize = x.element_size()
    if x.stride() != (h * w * cin, 1, w * cin, cin) or weight.stride(0) != 1 or weight.stride(1) != cout:
        return None
    if (cin * esize) % 16 or (cout * esize) % 16 or n * h * w == 0:
        return None
    if x.data_ptr() % 16 or weight.data_ptr() % 16:
        return None
    return x[:, :, ::stride[0], ::stride[1]]


_autotuned = None


def _store_desc(t, box):
    """The 4-D [N, H, W, C] descriptor of an eligible NCHW-shaped, dense channels_last tensor (a view)."""
    v = t.permute(0, 2, 3, 1)
    return TensorDescriptor(v, list(v.shape), list(v.stride()), box)


def conv_kxk_tma_launch(x, weight, scale, shift, residual, y, padding, dilation, activation_id, act_param, tf32,
                        res_stride, trace, interpret_cfg=None):
    """Launch on an eligible problem (the caller checked `tma_kxk_eligible`); `trace` wraps the autotuned kernel
    for torch tracing (epilogue.traceable). The output (and the residual) get a 4-D descriptor where
    `tma_store_eligible`, else None: then every config, TMA_EPILOGUE twins included, stores (loads) through
    pointers. `interpret_cfg` may set TMA_EPILOGUE to force the variant."""
    global _autotuned
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    x4d = x.permute(0, 2, 3, 1)  # a view: dense NHWC
    w3d = weight.permute(2, 3, 1, 0).reshape(kh * kw, cin, cout)  # a view: the packed weight
    cfg0 = interpret_cfg or {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 64, "BLOCK_K": 16}
    x_desc = TensorDescriptor(x4d, [n, h, w, cin], list(x4d.stride()),
                              [1, cfg0["BLOCK_H"], cfg0["BLOCK_W"], cfg0["BLOCK_K"]])
    w_desc = TensorDescriptor(w3d, [kh * kw, cin, cout], list(w3d.stride()), [1, cfg0["BLOCK_K"], cfg0["BLOCK_N"]])
    box = [1, cfg0["BLOCK_H"], cfg0["BLOCK_W"], cfg0["BLOCK_N"]]
    y_desc = _store_desc(y, box) if tma_store_eligible(y) else None
    r_desc = None
    if y_desc is not None and residual is not None and tma_store_eligible(residual):
        r_desc = _store_desc(residual, box)
    res = residual if residual is not None else y
    args = (x_desc, w_desc, y_desc, r_desc, scale, shift, res, y, n, oh, ow, cin, cout, padding[0], padding[1],
            dilation[0], dilation[1], *res_stride, *y.stride(), float(act_param))
    flags = dict(KH=kh, KW=kw, ACTIVATION=activation_id, HAS_RESIDUAL=residual is not None,
                 INPUT_PRECISION="tf32" if tf32 else "ieee")

    def grid(meta):
        tiles = n * triton.cdiv(oh, meta["BLOCK_H"]) * triton.cdiv(ow, meta["BLOCK_W"])
        return (tiles * triton.cdiv(cout, meta["BLOCK_N"]),)

    if interpret_cfg is not None:
        _conv_kxk_tma_kernel[grid(interpret_cfg)](*args, **flags, **interpret_cfg)
        return y
    if _autotuned is None:
        _autotuned = triton.autotune(configs=dp_configs(2) + dp_configs(4),
                                     key=["N", "OH", "OW", "CIN", "COUT", "KH", "KW", "HAS_RESIDUAL"],
                                     prune_configs_by={"early_config_prune": _prune_kxk})(_conv_kxk_tma_kernel)
    trace(_autotuned)[grid](*args, **flags)
    return y


#: The config used under TRITON_INTERPRET=1 (tiny boxes: interpreted time scales with size).
INTERPRET_CONFIG = {"BLOCK_H": 4, "BLOCK_W": 4, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}


def aot_variants() -> list[dict]:
    """This kernel's configs for ahead-of-time compile tests (format: configs.aot_variants, with `expects_tma`);
    the TMA_EPILOGUE twins of fp16 and fp32 with `expects_tma_store` (as conv_tma.aot_variants)."""
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    acts = list(ACTIVATION_IDS)
    variants, turn = [], 0
    for dtype in ("float16", "bfloat16", "float32"):
        for cfg in dp_configs(4 if dtype == "float32" else 2):
            k = cfg.kwargs
            twin = bool(k.get("TMA_EPILOGUE"))
            if twin and dtype == "bfloat16":  # would compile fp16's store path again
                continue
            t = short[dtype]
            box = f"tensordesc<{t}[1,{k['BLOCK_H']},{k['BLOCK_W']},{k['BLOCK_N']}]>"
            sig = {"x_desc": f"tensordesc<{t}[1,{k['BLOCK_H']},{k['BLOCK_W']},{k['BLOCK_K']}]>",
                   "w_desc": f"tensordesc<{t}[1,{k['BLOCK_K']},{k['BLOCK_N']}]>", "y_desc": box, "r_desc": box,
                   "scale_ptr": "*fp32", "shift_ptr": "*fp32", "res_ptr": f"*{t}", "y_ptr": f"*{t}"}
            for name in ("N", "OH", "OW", "CIN", "COUT", "pad_h", "pad_w", "dil_h", "dil_w", "srn", "src", "srh",
                         "srw", "syn", "syc", "syh", "syw"):
                sig[name] = "i32"
            sig["ACT_PARAM"] = "fp32"
            act, residual = acts[turn % len(acts)], turn % 2 == 0
            kernel = (3, 3) if turn % 3 else (7, 7)
            turn += 1
            if twin:  # the residual through its descriptor
                residual = not residual_spills(k["BLOCK_H"] * k["BLOCK_W"], k["BLOCK_N"], cfg.num_warps)
            constexprs = dict(KH=kernel[0], KW=kernel[1], ACTIVATION=ACTIVATION_IDS[act], HAS_RESIDUAL=residual,
                              INPUT_PRECISION="tf32" if dtype == "float32" else "ieee")
            constexprs.update({**constexpr_defaults(_conv_kxk_tma_kernel), **k})  # the kernel's where k has none
            if not residual:  # the launcher passes no residual descriptor then
                constexprs["r_desc"] = None
            for name in constexprs:
                sig[name] = "constexpr"
            for unit in ("src", "syc", "dil_h", "dil_w"):  # channels_last unit strides; dilation 1
                sig[unit] = "constexpr"
                constexprs[unit] = 1
            divisible = tuple(a for a in ("scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "CIN", "COUT", "srn", "srh",
                                          "srw", "syn", "syh", "syw") if sig[a] != "constexpr")
            bm = k["BLOCK_H"] * k["BLOCK_W"]
            sig = {name: sig[name] for name in _conv_kxk_tma_kernel.arg_names}  # parameter order
            variants.append({
                "name": f"tma_conv{kernel[0]}x{kernel[1]}_{act}_{'res_' if residual else ''}{t}_m{bm}n{k['BLOCK_N']}"
                        f"k{k['BLOCK_K']}h{k['BLOCK_H']}s{cfg.num_stages}w{cfg.num_warps}{'_tmastore' if twin else ''}",
                "fn": _conv_kxk_tma_kernel, "signature": sig, "constexprs": constexprs,
                "attrs": {(_conv_kxk_tma_kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible},
                "divisible_by_16": divisible, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "dtype": dtype, "expects_tensor_cores": True, "expects_tma": True, "expects_tma_store": twin,
            })
    return variants
