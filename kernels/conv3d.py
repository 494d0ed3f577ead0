"""Implicit-GEMM Triton 3-D conv with BN scale/shift, residual, activation and a post-activation affine fused.

The 3-D convolution is a GEMM without materialising im2col:
    M = N*OD*OH*OW output voxels (rows), N = Cout/groups output channels (columns), K = KD*KH*KW*Cin/groups.
Each program computes a BLOCK_M x BLOCK_N output tile of one group (groups are grid axis 1). K runs as one
flattened loop over (kd, kh, kw) taps x Cin_g chunks of BLOCK_K, so the software pipeliner sees one long loop.
With channels_last_3d input each row of an A tile is a contiguous run of channels (the fast path); NCDHW works
through the same code by strides. `pack_weight_3d` stores the weight (KD, KH, KW, Cin_g, Cout) so B tiles are
contiguous rows of output channels. FLAT_K (Cin_g < 16, e.g. the RGB stem of video nets) runs K over the
flattened (tap, channel) index instead of padding each tap's few channels up to BLOCK_K.

Epilogue (shared with the 2-D kernels, `epilogue.py`), in fp32 on the accumulator:
    out = act(acc * scale + shift [+ residual]) [* post_scale + post_shift]
the optional post-affine being a BatchNorm that follows the activation (ConvMixer-style blocks).

USE_INT64 (chosen by the launcher when any tensor spans more than 2^31 elements — video activations get there
quickly) makes the program ids and every index that multiplies a stride int64. Autotune configs come from
`configs_3d(dtype_bytes)`; under TRITON_INTERPRET=1 the plain kernel runs with `INTERPRET_CONFIG`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusedconv.kernels.epilogue import activation_id, epilogue, load_scale_shift, post_affine, traceable
from fusedconv.kernels import precision as _precision

__all__ = ["conv3d_bn_act", "conv3d_output_shape", "output_memory_format_3d", "pack_weight_3d", "configs_3d",
           "aot_variants"]

_INT32_LIMIT = 2**31 - 1
_FLAT_K_BELOW = 16
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); 16-bit dtypes, then fp32 with half the K depth.
_TABLE_16BIT = ((128, 128, 64, 3, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                (32, 64, 64, 4, 4))
_TABLE_32BIT = ((128, 64, 32, 3, 4), (64, 64, 32, 4, 4), (32, 64, 32, 4, 4))
_SMEM_BUDGET = 160 * 1024


@triton.jit
def _conv3d_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, pscale_ptr, pshift_ptr, res_ptr, y_ptr,
    D, H, W, OD, OH, OW, M, CIN_G, COUT_G,
    stride_d, stride_h, stride_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
    sxn, sxc, sxd, sxh, sxw,
    swo, swi, swd, swh, sww,
    srn, src, srd, srh, srw,
    syn, syc, syd, syh, syw,
    ACT_PARAM,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_POST: tl.constexpr,
    FLAT_K: tl.constexpr, EVEN_K: tl.constexpr, USE_INT64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    if USE_INT64:
        pid = pid.to(tl.int64)
        g = g.to(tl.int64)
    # GROUP_M swizzle: consecutive programs share weight columns while their input rows stay in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < COUT_G
    if USE_INT64:
        offs_k = offs_k.to(tl.int64)

    # Output voxel of each row, decomposed once per tile.
    ow_idx = offs_m % OW
    t = offs_m // OW
    oh_idx = t % OH
    t = t // OH
    od_idx = t % OD
    n_idx = t // OD
    id0 = od_idx * stride_d - pad_d
    ih0 = oh_idx * stride_h - pad_h
    iw0 = ow_idx * stride_w - pad_w
    co = g * COUT_G + offs_n

    x_rows = x_ptr + (n_idx * sxn + (g * CIN_G) * sxc)
    w_cols = w_ptr + co * swo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        k_len = KD * KH * KW * CIN_G
        for k0 in range(0, k_len, BLOCK_K):
            kk = k0 + offs_k
            c = kk % CIN_G
            tap = kk // CIN_G
            kd = tap // (KH * KW)
            r = tap - kd * (KH * KW)
            kh = r // KW
            kw = r - kh * KW
            k_ok = kk < k_len
            idd = id0[:, None] + (kd * dil_d)[None, :]
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            a_mask = (mask_m[:, None] & k_ok[None, :] & (idd >= 0) & (idd < D) & (ih >= 0) & (ih < H)
                      & (iw >= 0) & (iw < W))
            a = tl.load(x_rows[:, None] + idd * sxd + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=a_mask,
                        other=0.0)
            b_ptrs = w_cols[None, :] + (c * swi + kd * swd + kh * swh + kw * sww)[:, None]
            b = tl.load(b_ptrs, mask=mask_n[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        k_chunks = tl.cdiv(CIN_G, BLOCK_K)
        for it in range(0, KD * KH * KW * k_chunks):
            tap = it // k_chunks
            c = (it - tap * k_chunks) * BLOCK_K + offs_k
            kd = tap // (KH * KW)
            r = tap - kd * (KH * KW)
            kh = r // KW
            kw = r - kh * KW
            idd = id0 + kd * dil_d
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            row_ok = mask_m & (idd >= 0) & (idd < D) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = (x_rows + idd * sxd + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc
            b_ptrs = (w_cols + kd * swd + kh * swh + kw * sww)[None, :] + c[:, None] * swi
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=row_ok[:, None] & (c[None, :] < CIN_G), other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[None, :] & (c[:, None] < CIN_G), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    mask_mn = mask_m[:, None] & mask_n[None, :]
    scale, shift = load_scale_shift(scale_ptr, shift_ptr, co, mask_n)
    residual = 0.0
    if HAS_RESIDUAL:
        r_ptrs = (res_ptr + (n_idx * srn + od_idx * srd + oh_idx * srh + ow_idx * srw)[:, None]
                  + (co * src)[None, :])
        residual = tl.load(r_ptrs, mask=mask_mn, other=0.0)
    out = epilogue(acc, scale[None, :], shift[None, :], residual, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    pscale, pshift = 1.0, 0.0
    if HAS_POST:
        pscale, pshift = load_scale_shift(pscale_ptr, pshift_ptr, co, mask_n)
        pscale = pscale[None, :]
        pshift = pshift[None, :]
    out = post_affine(out, pscale, pshift, HAS_POST)
    y_ptrs = y_ptr + (n_idx * syn + od_idx * syd + oh_idx * syh + ow_idx * syw)[:, None] + (co * syc)[None, :]
    tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_mn)


# ---------------------------------------------------------------------------------------------- configs
def configs_3d(dtype_bytes: int) -> list[triton.Config]:
    """Autotune candidates for inputs of `dtype_bytes` bytes per element (2: fp16/bf16, 4: fp32)."""
    table = _TABLE_16BIT if dtype_bytes <= 2 else _TABLE_32BIT
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in table]


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


def _prune(configs, named_args, **kwargs):
    """Keep the configs of this dtype class whose tiles fit the problem and shared memory (never empty)."""
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    dtype_bytes = x.element_size() if hasattr(x, "element_size") else 2
    own = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in configs_3d(dtype_bytes)}
    k_extent = args["CIN_G"] * args["KD"] * args["KH"] * args["KW"] if args.get("FLAT_K") else args["CIN_G"]
    caps = (_pow2_at_least_16(args["M"]), _pow2_at_least_16(args["COUT_G"]), _pow2_at_least_16(k_extent))
    candidates = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in own]
    kept = [c for c in candidates
            if c.kwargs["BLOCK_M"] <= caps[0] and c.kwargs["BLOCK_N"] <= caps[1] and c.kwargs["BLOCK_K"] <= caps[2]
            and (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * dtype_bytes * c.num_stages
            <= _SMEM_BUDGET]
    return kept or [min(candidates or configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_AUTOTUNE_KEY = ["M", "CIN_G", "COUT_G", "D", "H", "W", "OW", "stride_d", "stride_h", "stride_w", "sxc", "syc",
                 "KD", "KH", "KW"]


@functools.cache
def _autotuned():
    return triton.autotune(configs=configs_3d(2) + configs_3d(4), key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _prune})(_conv3d_kernel)


# ---------------------------------------------------------------------------------------------- host side
def interpreting() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 when this was imported)."""
    return not isinstance(_conv3d_kernel, triton.runtime.JITFunction)


def _triple(name, value) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * 3
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        out = ()
    if len(out) != 3:
        raise ValueError(f"{name}: expected an int or three ints, got {value!r}")
    return out


def conv3d_output_shape(x_shape, w_shape, stride, padding, dilation) -> tuple[int, ...]:
    """(N, Cout, OD, OH, OW) of a 3-D conv of an (N, C, D, H, W) input with a (Cout, Cin/groups, KD, KH, KW) weight."""
    spatial = tuple((x_shape[2 + i] + 2 * padding[i] - dilation[i] * (w_shape[2 + i] - 1) - 1) // stride[i] + 1
                    for i in range(3))
    return (x_shape[0], w_shape[0], *spatial)


def output_memory_format_3d(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when x is channels_last_3d and not also plain contiguous, else contiguous."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def pack_weight_3d(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (Cout, Cin/groups, KD, KH, KW), same values and shape, stored in (KD, KH, KW, Cin_g, Cout) order."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a 5-d tensor (Cout, Cin/groups, KD, KH, KW), got {got}")
    if weight.permute(2, 3, 4, 1, 0).is_contiguous():
        return weight
    return weight.permute(2, 3, 4, 1, 0).contiguous().permute(4, 3, 0, 1, 2)


def _span(shape, strides) -> int:
    if any(s == 0 for s in shape):
        return 0
    return sum((s - 1) * abs(st) for s, st in zip(shape, strides))


def _check(x, weight, scale, shift, residual, post, stride, padding, dilation, groups, activation, act_param):
    for name, t in (("input", x), ("weight", weight), ("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 5:
        raise ValueError(f"input: expected a 5-d (N, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"weight: expected a 5-d (Cout, Cin/groups, KD, KH, KW) tensor, got shape "
                         f"{tuple(weight.shape)}")
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"input: expected dtype float16, bfloat16 or float32 for the Triton kernel, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (the input's), got {weight.dtype}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups: expected a positive int dividing Cout={weight.shape[0]}, got {groups!r}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"input: expected {weight.shape[1] * groups} channels (weight.shape[1] * groups), "
                         f"got {x.shape[1]}")
    cout = weight.shape[0]
    named = [("scale", scale), ("shift", shift)] + ([("post_scale", post[0]), ("post_shift", post[1])] if post else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (cout,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected shape ({cout},) (one value per output channel), got {got}")
    for name, t in [("weight", weight), *named, ("residual", residual)]:
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: expected device {x.device} (the input's), got {t.device}")
    activation_id(activation)
    if activation != "leaky_relu" and act_param not in (0, 0.0):
        raise ValueError(f"act_param: only 'leaky_relu' takes a parameter, got {act_param!r} for {activation!r}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride/dilation: expected >= 1 and padding >= 0, got stride={stride}, padding={padding}, "
                         f"dilation={dilation}")
    out_shape = conv3d_output_shape(x.shape, weight.shape, stride, padding, dilation)
    if min(out_shape[2:]) < 1:
        raise ValueError(f"input: spatial size {tuple(x.shape[2:])} is too small for kernel {tuple(weight.shape[2:])} "
                         f"with padding {padding} and dilation {dilation}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual: expected the output's shape {out_shape}, got {tuple(residual.shape)}")
        if not residual.is_floating_point():
            raise TypeError(f"residual: expected a floating-point tensor, got {residual.dtype}")
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"input: the Triton kernel runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                           f"got a tensor on {x.device}")
    return out_shape


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def conv3d_bn_act(x, weight, scale, shift, *, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                  act_param=0.0, residual=None, post_scale=None, post_shift=None):
    """act(conv3d(x, weight) * scale + shift [+ residual]) [* post_scale + post_shift] in one Triton kernel.

    x: (N, Cin, D, H, W) fp16 / bf16 / fp32, any strides (channels_last_3d is the fast path). weight: (Cout,
    Cin/groups, KD, KH, KW) in x's dtype, any strides (`pack_weight_3d` gives the fastest). scale, shift and the
    optional post_scale / post_shift (both or neither): (Cout,), applied in fp32. residual: None or a tensor of the
    output's shape. Returns a tensor in x's dtype and memory format. CUDA tensors, or CPU under TRITON_INTERPRET=1.
    """
    stride, padding, dilation = _triple("stride", stride), _triple("padding", padding), _triple("dilation", dilation)
    if (post_scale is None) != (post_shift is None):
        raise ValueError("post_scale/post_shift: expected both or neither, got only one")
    post = None if post_scale is None else (post_scale, post_shift)
    out_shape = _check(x, weight, scale, shift, residual, post, stride, padding, dilation, groups, activation,
                       act_param)
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format_3d(x))
    if y.numel() == 0:
        return y
    scale, shift = _fp32(scale), _fp32(shift)
    pscale, pshift = (scale, shift) if post is None else (_fp32(post[0]), _fp32(post[1]))
    n, cout = out_shape[0], out_shape[1]
    od, oh, ow = out_shape[2:]
    cin_g, cout_g = x.shape[1] // groups, cout // groups
    kd, kh, kw = weight.shape[2:]
    m = n * od * oh * ow
    res = residual if residual is not None else y
    res_stride = tuple(residual.stride()) if residual is not None else (0,) * 5
    extents = [_span(x.shape, x.stride()), _span(weight.shape, weight.stride()), _span(y.shape, y.stride()),
               _span(res.shape, res_stride), m * cout]
    use_int64 = max(extents) > _INT32_LIMIT
    flat_k = kd * kh * kw > 1 and cin_g < _FLAT_K_BELOW
    tf32 = x.dtype == torch.float32 and x.is_cuda and _precision.cudnn_conv_allows_tf32()
    interp = interpreting()
    block_ks = (INTERPRET_CONFIG["BLOCK_K"],) if interp else tuple({c.kwargs["BLOCK_K"] for c in
                                                                    configs_3d(x.element_size())})
    flags = dict(KD=kd, KH=kh, KW=kw, ACTIVATION=activation_id(activation), HAS_RESIDUAL=residual is not None,
                 HAS_POST=post is not None, FLAT_K=flat_k, EVEN_K=not flat_k and all(cin_g % b == 0 for b in block_ks),
                 USE_INT64=use_int64, INPUT_PRECISION="tf32" if tf32 else "ieee")
    args = (x, weight, scale, shift, pscale, pshift, res, y,
            *x.shape[2:], od, oh, ow, m, cin_g, cout_g, *stride, *padding, *dilation,
            *x.stride(), *weight.stride(), *res_stride, *y.stride(), float(act_param))
    if interp:
        cfg = INTERPRET_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(cout_g, cfg["BLOCK_N"]), groups)
        _conv3d_kernel[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)

        traceable(_autotuned())[grid](*args, **flags)
    return y


# ---------------------------------------------------------------------------------------------- AOT variants
def aot_variants() -> list[dict]:
    """Kernel variants x configs for ahead-of-time compile tests (same dict format as `kernels.aot_variants()`):
    every config of each dtype's table for the general (3x3x3) loop with the activation / residual / post-affine
    rotating, the flattened-K stem (3x7x7, Cin 3), and the int64 variant."""
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    names = ["x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "pscale_ptr", "pshift_ptr", "res_ptr", "y_ptr"]
    ints = ["D", "H", "W", "OD", "OH", "OW", "M", "CIN_G", "COUT_G", "stride_d", "stride_h", "stride_w", "pad_d",
            "pad_h", "pad_w", "dil_d", "dil_h", "dil_w", "sxn", "sxc", "sxd", "sxh", "sxw", "swo", "swi", "swd", "swh",
            "sww", "srn", "src", "srd", "srh", "srw", "syn", "syc", "syd", "syh", "syw"]
    acts = list(ACTIVATION_IDS)
    variants = []

    def add(name, dtype, cfg, *, k=(3, 3, 3), act="relu", residual=False, post=False, flat_k=False, int64=False):
        t = short[dtype]
        sig = {n: ("*fp32" if "scale" in n or "shift" in n else f"*{t}") for n in names}
        sig.update({n: ("i64" if int64 else "i32") for n in ints})
        sig["ACT_PARAM"] = "fp32"
        constexprs = dict(KD=k[0], KH=k[1], KW=k[2], ACTIVATION=ACTIVATION_IDS[act], HAS_RESIDUAL=residual,
                          HAS_POST=post, FLAT_K=flat_k, EVEN_K=not flat_k, USE_INT64=int64,
                          INPUT_PRECISION="tf32" if dtype == "float32" else "ieee", **cfg.kwargs)
        for key in constexprs:
            sig[key] = "constexpr"
        # channels_last_3d input / output and the packed weight have unit channel strides: specialised to 1.
        for unit in ("sxc", "swo", "syc"):
            sig[unit] = "constexpr"
            constexprs[unit] = 1
        divisible = tuple(n for n in names) + (() if flat_k else ("CIN_G", "COUT_G", "sxw", "swi", "syw"))
        variants.append({"name": name, "fn": _conv3d_kernel, "signature": sig, "constexprs": constexprs,
                         "divisible_by_16": divisible, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                         "dtype": dtype, "expects_tensor_cores": True})

    turn = 0
    for dtype in ("float16", "bfloat16", "float32"):
        for cfg in configs_3d(4 if dtype == "float32" else 2):
            act, residual, post = acts[turn % len(acts)], turn % 2 == 0, turn % 3 == 1
            turn += 1
            tag = "m{BLOCK_M}n{BLOCK_N}k{BLOCK_K}".format(**cfg.kwargs) + f"s{cfg.num_stages}w{cfg.num_warps}"
            add(f"conv3d_3x3x3_{act}{'_res' if residual else ''}{'_post' if post else ''}_{short[dtype]}_{tag}",
                dtype, cfg, act=act, residual=residual, post=post)
        add(f"conv3d_stem_flatk_{short[dtype]}", dtype, configs_3d(4 if dtype == "float32" else 2)[-1],
            k=(3, 7, 7), flat_k=True)
    add("conv3d_int64_fp16", "float16", configs_3d(2)[3], int64=True, residual=True)
    return variants
