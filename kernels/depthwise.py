"""Direct (no tensor core) Triton kernel for depthwise conv + BN scale/shift + residual + activation.

Coordination note for `packing.pack_weight` / the GEMM launcher: the depthwise kernel reads the weight fastest
in physical order (KH, KW, C), channels innermost, logical shape (C, 1, KH, KW) unchanged. That is exactly what
`packing.pack_weight(weight, groups=C)` already produces ((KH, KW, Cin_g, Cout) with Cin_g == 1), so no separate
packing path is needed; `pack_depthwise_weight` here produces the same layout for callers that use this module
alone. The kernel takes any weight strides, so an unpacked weight still works (just with strided loads).

A depthwise conv (groups == Cin == Cout) does KH*KW multiply-adds per output element and reads each input
element about KH*KW/stride^2 times (from cache), so it is memory-bound: implicit GEMM would run tensor cores on
K = KH*KW with one channel per group and waste them. Each program instead computes a tile of BLOCK_P output
pixels (flattened over N*OH*OW) x BLOCK_C channels, loops over the KH x KW taps (unrolled: they are constexpr),
accumulates in fp32, runs the shared epilogue (`epilogue.epilogue`: scale, shift, residual, activation) and
stores once.

The tile's orientation follows the memory layout so that a warp's lanes walk the contiguous dimension:
channels_last (the fast path) holds the tile as [pixels, channels] (channels innermost, vectorised loads);
NCHW holds it as [channels, pixels] (output columns innermost). Both read the tensors through their strides, so
neither layout is copied. The output follows the input's memory format (`reference.output_memory_format`, the
rule the op's fake implementation and the GEMM launcher use). Offsets switch to int64 (constexpr USE_INT64)
when any tensor spans 2^31 elements or more.

On a GPU the block sizes are autotuned (`depthwise_configs`, keyed on shape, layout and dtype); under
TRITON_INTERPRET=1 one small config (`INTERPRET_CONFIG`) runs directly. `aot_variants()` lists the variants and
configs for the ahead-of-time compile tests.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fusedconv.kernels.epilogue import activation_id, epilogue, load_scale_shift, traceable
from fusedconv.kernels.packing import is_packed, pack_weight
from fusedconv.kernels.reference import output_memory_format

__all__ = ["depthwise_conv_bn_act", "pack_depthwise_weight", "is_depthwise_packed", "depthwise_configs",
           "aot_variants", "INTERPRET_CONFIG"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Block sizes used under TRITON_INTERPRET=1 (no autotuning there; large blocks mean fewer interpreted programs).
INTERPRET_CONFIG = {"BLOCK_P": 64, "BLOCK_C": 16}

# (BLOCK_P, BLOCK_C, num_warps) candidates. channels_last: channels are contiguous, so wide channel blocks give
# 16-byte vector loads; NCHW: output columns are contiguous, so wide pixel blocks and few channels.
_CONFIGS_CHANNELS_LAST = ((64, 64, 4), (32, 128, 4), (128, 32, 4), (128, 64, 8), (16, 128, 4), (256, 16, 8))
_CONFIGS_NCHW = ((256, 8, 4), (128, 16, 4), (512, 4, 8), (64, 32, 4), (1024, 2, 8))


#: Offsets switch to int64 when any tensor spans this many elements (a module constant so that tests can lower it
#: and exercise the int64 code path on small tensors).
INT64_THRESHOLD = 2 ** 31


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def _tile(p_vec, c_vec, PIXELS_INNER: tl.constexpr):
    """Outer sum of a per-pixel and a per-channel vector, as [C, P] when PIXELS_INNER else [P, C]."""
    if PIXELS_INNER:
        return c_vec[:, None] + p_vec[None, :]
    else:
        return p_vec[:, None] + c_vec[None, :]


@triton.jit
def _tile_and(p_mask, c_mask, PIXELS_INNER: tl.constexpr):
    """Outer AND of a per-pixel and a per-channel mask, oriented like `_tile`."""
    if PIXELS_INNER:
        return c_mask[:, None] & p_mask[None, :]
    else:
        return p_mask[:, None] & c_mask[None, :]


@triton.jit
def _per_channel(c_vec, PIXELS_INNER: tl.constexpr):
    """A per-channel vector shaped to broadcast over a tile oriented like `_tile`."""
    if PIXELS_INNER:
        return c_vec[:, None]
    else:
        return c_vec[None, :]


@triton.jit
def _depthwise_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr,
    M, C, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swc, swh, sww, srn, src, srh, srw, syn, syc, syh, syw,
    ACT_PARAM,
    KH: tl.constexpr, KW: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    USE_INT64: tl.constexpr, PIXELS_INNER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)

    offs_p = tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if USE_INT64:
        # Every index that is multiplied by a stride becomes int64 before the multiply. tl.cast, not .to():
        # the JIT passes strides equal to 1 as constexprs, which have no .to().
        offs_p = pid_p.to(tl.int64) * BLOCK_P + offs_p
        offs_c = offs_c.to(tl.int64)
        sxn = tl.cast(sxn, tl.int64)
        sxh = tl.cast(sxh, tl.int64)
        sxw = tl.cast(sxw, tl.int64)
        swh = tl.cast(swh, tl.int64)
        sww = tl.cast(sww, tl.int64)
        srn = tl.cast(srn, tl.int64)
        srh = tl.cast(srh, tl.int64)
        srw = tl.cast(srw, tl.int64)
        syn = tl.cast(syn, tl.int64)
        syh = tl.cast(syh, tl.int64)
        syw = tl.cast(syw, tl.int64)
    else:
        offs_p = pid_p * BLOCK_P + offs_p
    mask_p = offs_p < M
    mask_c = offs_c < C

    # Output pixel -> (n, oh, ow), once per program.
    ohw = OH * OW
    n = offs_p // ohw
    rem = offs_p % ohw
    oh = rem // OW
    ow = rem % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w

    # Offsets of tap (0, 0): per pixel plus per channel; each tap adds a scalar.
    x_pix = n * sxn + ih0 * sxh + iw0 * sxw
    x_offs = _tile(x_pix, offs_c * sxc, PIXELS_INNER)
    w_offs = offs_c * swc

    if PIXELS_INNER:
        acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(KH):
        ih = ih0 + kh * dil_h
        row_ok = mask_p & (ih >= 0) & (ih < H)
        for kw in tl.static_range(KW):
            iw = iw0 + kw * dil_w
            ok = row_ok & (iw >= 0) & (iw < W)
            tap = kh * dil_h * sxh + kw * dil_w * sxw
            xv = tl.load(x_ptr + (x_offs + tap), mask=_tile_and(ok, mask_c, PIXELS_INNER), other=0.0)
            wv = tl.load(w_ptr + (w_offs + (kh * swh + kw * sww)), mask=mask_c, other=0.0)
            acc += xv.to(tl.float32) * _per_channel(wv.to(tl.float32), PIXELS_INNER)

    scale, shift = load_scale_shift(scale_ptr, shift_ptr, offs_c, mask_c)
    out_mask = _tile_and(mask_p, mask_c, PIXELS_INNER)
    if HAS_RESIDUAL:
        r_offs = _tile(n * srn + oh * srh + ow * srw, offs_c * src, PIXELS_INNER)
        residual = tl.load(res_ptr + r_offs, mask=out_mask, other=0.0)
    else:
        residual = acc  # unused placeholder: HAS_RESIDUAL is a constexpr
    out = epilogue(acc, _per_channel(scale, PIXELS_INNER), _per_channel(shift, PIXELS_INNER), residual,
                   HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    y_offs = _tile(n * syn + oh * syh + ow * syw, offs_c * syc, PIXELS_INNER)
    tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------------------------------------------
# Configs and autotuning
# --------------------------------------------------------------------------------------------------------------

#: Autotuner key: shape, geometry and layout (sxc is 1 for channels_last); the autotuner adds the dtypes.
AUTOTUNE_KEY = ["M", "C", "H", "W", "OH", "OW", "stride_h", "stride_w", "dil_h", "dil_w", "sxc", "KH", "KW",
                "HAS_RESIDUAL"]


def depthwise_configs(channels_last: bool = True, max_c: int | None = None, max_p: int | None = None
                      ) -> list[triton.Config]:
    """Autotune candidates for one layout; blocks are capped at `max_c` channels / `max_p` pixels (powers of 2).

    Capping keeps small-channel layers (C = 8, 16, ...) from masking off most of each tile; duplicates that
    capping creates are dropped.
    """
    table = _CONFIGS_CHANNELS_LAST if channels_last else _CONFIGS_NCHW
    configs, seen = [], set()
    for block_p, block_c, warps in table:
        if max_c is not None:
            block_c = min(block_c, max_c)
        if max_p is not None:
            block_p = min(block_p, max_p)
        if (block_p, block_c, warps) in seen:
            continue
        seen.add((block_p, block_c, warps))
        configs.append(triton.Config({"BLOCK_P": block_p, "BLOCK_C": block_c}, num_warps=warps, num_stages=1))
    return configs


@functools.cache
def _autotuned(channels_last: bool, max_c: int, max_p: int):
    """An autotuner over `depthwise_configs(...)` (one per layout / cap class; cached so tuning results persist)."""
    return triton.autotune(configs=depthwise_configs(channels_last, max_c, max_p), key=AUTOTUNE_KEY)(
        _depthwise_kernel)


def _cap(n: int, floor: int) -> int:
    return max(floor, triton.next_power_of_2(max(int(n), 1)))


# --------------------------------------------------------------------------------------------------------------
# Weight packing
# --------------------------------------------------------------------------------------------------------------

def pack_depthwise_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (C, 1, KH, KW), same values and logical shape, stored in (KH, KW, C) order (channels innermost).

    Each tap's BLOCK_C weights are then one contiguous load. Identical to `packing.pack_weight(weight, C)`.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != 1:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a depthwise weight of shape (C, 1, KH, KW), got {got}")
    return pack_weight(weight, weight.shape[0])


def is_depthwise_packed(weight: torch.Tensor) -> bool:
    """Whether a (C, 1, KH, KW) weight is stored in (KH, KW, C) order."""
    return is_packed(weight)


# --------------------------------------------------------------------------------------------------------------
# The launcher
# --------------------------------------------------------------------------------------------------------------

def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return int(value[0]), int(value[0])
    raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset `t` can address (its storage span in elements)."""
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def depthwise_conv_bn_act(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *,
                          stride=1, padding=0, dilation=1, activation: str = "relu", act_param: float = 0.0,
                          residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(depthwise_conv(x, weight) * scale + shift [+ residual]) in one Triton kernel.

    x: (N, C, H, W) fp16 / bf16 / fp32, any strides (channels_last is the fast path). weight: (C, 1, KH, KW) in
    x's dtype, any strides (see `pack_depthwise_weight`). scale, shift: (C,) per-channel fp32 (other float
    dtypes are converted). residual: optional (N, C, OH, OW) in x's dtype, any strides. Zero padding only.
    Returns x's dtype in x's memory format. Runs on the tensors' device: CUDA, or CPU under TRITON_INTERPRET=1.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 4-d tensor (N, C, H, W), got {got}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    n_batch, channels, height, width = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[0] != channels \
            or weight.shape[1] != 1:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a depthwise weight of shape ({channels}, 1, KH, KW) for x with "
                         f"{channels} channels, got {got}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected x's dtype {x.dtype}, got {weight.dtype}")
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != channels:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 1-d tensor of {channels} per-channel values, got {got}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor (fp32), got {t.dtype}")
    stride_h, stride_w = _pair(stride, "stride")
    pad_h, pad_w = _pair(padding, "padding")
    dil_h, dil_w = _pair(dilation, "dilation")
    if stride_h < 1 or stride_w < 1:
        raise ValueError(f"stride: expected positive values, got {(stride_h, stride_w)}")
    if dil_h < 1 or dil_w < 1:
        raise ValueError(f"dilation: expected positive values, got {(dil_h, dil_w)}")
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"padding: expected non-negative values, got {(pad_h, pad_w)}")
    act = activation_id(activation)
    kh, kw = weight.shape[2], weight.shape[3]
    out_h = (height + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
    out_w = (width + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"x: spatial size {(height, width)} is too small for a {kh}x{kw} kernel with padding "
                         f"{(pad_h, pad_w)} and dilation {(dil_h, dil_w)} (output would be {(out_h, out_w)})")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (n_batch, channels, out_h, out_w):
            got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"residual: expected shape {(n_batch, channels, out_h, out_w)}, got {got}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual: expected x's dtype {x.dtype}, got {residual.dtype}")
    tensors = [("weight", weight), ("scale", scale), ("shift", shift)] + (
        [("residual", residual)] if residual is not None else [])
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device {x.device}, got {t.device}")
    if x.device.type == "cpu" and not _interpreting():
        raise RuntimeError("x: the depthwise Triton kernel runs on CPU tensors only under TRITON_INTERPRET=1; "
                           "got a CPU tensor without it (use the reference / op fallback on CPU)")

    # The kernel reads scale / shift as contiguous fp32 vectors (no-ops when they already are).
    scale = scale.to(torch.float32).contiguous()
    shift = shift.to(torch.float32).contiguous()
    y = torch.empty((n_batch, channels, out_h, out_w), dtype=x.dtype, device=x.device,
                    memory_format=output_memory_format(x))
    if y.numel() == 0:
        return y
    res = residual if residual is not None else y  # a valid pointer the kernel never reads
    m_total = n_batch * out_h * out_w
    use_int64 = max(_span(x), _span(weight), _span(y), _span(res), m_total + 1024) >= INT64_THRESHOLD
    # Orientation: channels innermost unless channels are strided and output columns contiguous (NCHW-like).
    pixels_inner = not (x.stride(1) == 1 and channels > 1)

    args = (x, weight, scale, shift, res, y,
            m_total, channels, height, width, out_h, out_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
            *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *res.stride(), *y.stride(),
            float(act_param))
    consts = dict(KH=kh, KW=kw, ACTIVATION=act, HAS_RESIDUAL=residual is not None, USE_INT64=use_int64,
                  PIXELS_INNER=pixels_inner)

    def grid(meta):
        return (triton.cdiv(m_total, meta["BLOCK_P"]), triton.cdiv(channels, meta["BLOCK_C"]))

    if _interpreting():
        _depthwise_kernel[grid](*args, **consts, **INTERPRET_CONFIG)
    else:
        # Caps above the largest block sizes would only create more autotuners with identical configs.
        kernel = _autotuned(not pixels_inner, min(_cap(channels, 2), 128), min(_cap(m_total, 16), 1024))
        traceable(kernel)[grid](*args, **consts)
    return y


# --------------------------------------------------------------------------------------------------------------
# Ahead-of-time compile descriptions
# --------------------------------------------------------------------------------------------------------------

def _signature(dtype: str, int64: bool = False, unit_strides: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton signature of `_depthwise_kernel` for element type 'fp16' / 'bf16' / 'fp32'.

    `unit_strides` become constexprs, as the JIT does with integer arguments equal to 1 (channels_last: the
    channel strides; NCHW: the column strides).
    """
    sig = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "scale_ptr": "*fp32", "shift_ptr": "*fp32",
           "res_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    for name in ("M", "C", "H", "W", "OH", "OW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"):
        sig[name] = "i32"
    for name in ("sxn", "sxc", "sxh", "sxw", "swc", "swh", "sww", "srn", "src", "srh", "srw",
                 "syn", "syc", "syh", "syw"):
        sig[name] = "constexpr" if name in unit_strides else ("i64" if int64 else "i32")
    sig["ACT_PARAM"] = "fp32"
    for name in ("KH", "KW", "ACTIVATION", "HAS_RESIDUAL", "USE_INT64", "PIXELS_INNER", "BLOCK_P", "BLOCK_C"):
        sig[name] = "constexpr"
    return sig


def aot_variants() -> list[dict]:
    """Every depthwise kernel variant x autotune config, described for ahead-of-time compilation.

    Same entry format as `configs.aot_variants()` (name, fn, signature, constexprs, num_warps, num_stages,
    dtype, expects_tensor_cores — always False: the direct kernel uses no tensor cores), plus
    `divisible_by_16`: the arguments the JIT would specialise as multiples of 16 for typical layers (pointers,
    and with C a multiple of 16, the pixel strides), so the compiled code is the vectorised code that runs.

    Covered: every config of both layouts in fp16 (3x3, relu + residual); the first config of each layout in
    bf16 and fp32 (the configs' code differs from fp16's only in the element type); 5x5 and 7x7 kernels; every
    activation once; the int64-offset variant for both layouts.
    """
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    variants: list[dict] = []

    def add(name, dtype, cfg, *, channels_last=True, k=3, act="relu", residual=True, int64=False):
        constexprs = {"KH": k, "KW": k, "ACTIVATION": ACTIVATION_IDS[act], "HAS_RESIDUAL": residual,
                      "USE_INT64": int64, "PIXELS_INNER": not channels_last, **cfg.kwargs}
        divisible = ["x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "res_ptr", "y_ptr", "C"]
        if channels_last:  # packed weight and NHWC tensors: unit channel strides, pixel strides 16 | C
            unit = ("sxc", "swc", "src", "syc")
            divisible += ["sxn", "sxh", "sxw", "swh", "sww", "srn", "srh", "srw", "syn", "syh", "syw"]
        else:  # NCHW tensors with 16 | W: unit column strides
            unit = ("swc", "sxw", "srw", "syw")
            divisible += ["sxn", "sxc", "sxh", "srn", "src", "srh", "syn", "syc", "syh", "swh", "sww"]
        constexprs.update({name: 1 for name in unit})
        variants.append({
            "name": f"dw_{name}", "fn": _depthwise_kernel, "signature": _signature(short[dtype], int64, unit),
            "constexprs": constexprs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "dtype": dtype, "expects_tensor_cores": False, "divisible_by_16": tuple(divisible),
        })

    for dtype in ("float16", "bfloat16", "float32"):
        for channels_last in (True, False):
            layout = "nhwc" if channels_last else "nchw"
            configs = depthwise_configs(channels_last)
            for cfg in configs if dtype == "float16" else configs[:1]:
                tag = "p{BLOCK_P}c{BLOCK_C}".format(**cfg.kwargs) + f"w{cfg.num_warps}"
                add(f"3x3_relu_res_{layout}_{short[dtype]}_{tag}", dtype, cfg, channels_last=channels_last)
    nhwc, nchw = depthwise_configs(True)[0], depthwise_configs(False)[1]
    for k in (5, 7):
        add(f"{k}x{k}_silu_nhwc_fp16", "float16", nhwc, k=k, act="silu", residual=False)
    for act in ACTIVATION_IDS:
        if act != "relu":
            add(f"3x3_{act}_nchw_bf16", "bfloat16", nchw, channels_last=False, act=act, residual=False)
    add("3x3_relu_res_int64_nhwc_fp16", "float16", nhwc, int64=True)
    add("3x3_relu_res_int64_nchw_fp32", "float32", nchw, channels_last=False, int64=True)
    return variants
