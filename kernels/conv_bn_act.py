"""Implicit-GEMM Triton conv kernel with BN scale/shift, residual and activation fused, and its launcher.

The convolution is computed as a GEMM without materialising im2col:
    M = N*OH*OW output pixels (rows), N = Cout/groups output channels (columns), K = KH*KW*Cin/groups.
Each program computes a BLOCK_M x BLOCK_N output tile of one group (groups are grid axis 1). The K loops live in
`conv_kloops` (one per loop shape, chosen by constexpr flags; see there). A tiles are gathered from x by strides: with channels_last input each row of the tile is a contiguous run of
channels (the fast path); NCHW works through the same code without a copy. B tiles come from the weight by its
strides; `pack_weight` stores it (KH, KW, Cin_g, Cout) so they are contiguous. The accumulator is fp32; fp32
inputs use TF32 when `torch.backends.cudnn.allow_tf32` (as cuDNN would) else IEEE. The epilogue
(`epilogue.epilogue`) applies scale, shift, residual and the activation in fp32, then one cast and store in
the output's strides (the output follows x's memory format).

Specialisations (constexprs): IS_1X1 (1x1 kernel without padding: a plain GEMM over strided rows, no spatial
masks), ROW_K / ROW_WIDTH (Cin_g < 16 and KW * Cin_g <= 64, e.g. the RGB stem: one K step per kernel row),
FLAT_K (other Cin_g < 16 spatial convs: K chunks over the flattened (kh, kw, c) index), neither (the per-tap
loop with carried counters), EVEN_K (Cin_g multiple of BLOCK_K: no channel masks), CH_ALIGN (8 when channel
counts and strides are multiples of 8 but not all of 16: the kernel restates them as multiples of 8 so the
compiler builds vector loads), USE_INT64 (offsets in int64, chosen by the launcher only when some tensor spans
more than 2^31 elements, so small problems keep cheap int32 math), SPLIT_K (see configs.choose_split_k:
partial sums go to an fp32 workspace and `_splitk_epilogue_kernel` finishes them).

The public launcher `conv_bn_act(...)` validates, dispatches depthwise convs to `kernels.depthwise` when that
module is present, eligible 1x1 convs to the TMA-descriptor kernel of `conv_tma` when asked (`tma`), picks
split-K, and launches the autotuned kernel — or, under TRITON_INTERPRET=1 (CPU tensors), the plain kernel with
one small config.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from fusedconv.kernels import configs as _configs
from fusedconv.kernels import conv_tma as _tma
from fusedconv.kernels import conv_tma_kxk as _tma_kxk
from fusedconv.kernels.conv_kloops import k_loop_1x1, k_loop_flat, k_loop_rows, k_loop_taps
from fusedconv.kernels.epilogue import activation_id, epilogue_store, traceable
from fusedconv.kernels.reference import conv_output_shape as output_shape
from fusedconv.kernels.reference import output_memory_format

__all__ = ["conv_bn_act", "output_memory_format", "output_shape", "interpreting"]

_INT32_LIMIT = 2**31 - 1
# Spatial convs with fewer input channels per group than this use the flattened-K loop (FLAT_K): the smallest
# tensor-core K step is 16.
_FLAT_K_BELOW = 16
# ...and of those, the ones whose kernel row holds at most this many (kw, c) pairs use the row-K loop (ROW_K).
_ROW_K_MAX_WIDTH = 64
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Whether eligible 1x1 convs take the TMA-descriptor kernel by default (see conv_bn_act's `tma`).
TMA_DEFAULT = os.environ.get("FUSEDCONV_TMA", "0") == "1"


@triton.jit
def _conv_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, ws_ptr,
    N, H, W, OH, OW, M, CIN_G, COUT_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    KH: tl.constexpr, KW: tl.constexpr,
    ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    IS_1X1: tl.constexpr, ROW_K: tl.constexpr, ROW_WIDTH: tl.constexpr, FLAT_K: tl.constexpr,
    EVEN_K: tl.constexpr, CH_ALIGN: tl.constexpr, USE_INT64: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_k = tl.program_id(2)
    if CH_ALIGN > 1:
        # The launcher checked these are multiples of CH_ALIGN (8): saying so lets the compiler build 16-byte
        # vector loads and the async copies of the software pipeline for channel counts like 24, 40, 56 that
        # Triton's own specialisation (multiples of 16 only) would leave as scalar 2-byte gathers.
        CIN_G = (CIN_G // CH_ALIGN) * CH_ALIGN
        COUT_G = (COUT_G // CH_ALIGN) * CH_ALIGN
        sxn = (sxn // CH_ALIGN) * CH_ALIGN
        sxh = (sxh // CH_ALIGN) * CH_ALIGN
        sxw = (sxw // CH_ALIGN) * CH_ALIGN
        swi = (swi // CH_ALIGN) * CH_ALIGN
        swh = (swh // CH_ALIGN) * CH_ALIGN
        sww = (sww // CH_ALIGN) * CH_ALIGN
        syn = (syn // CH_ALIGN) * CH_ALIGN
        syh = (syh // CH_ALIGN) * CH_ALIGN
        syw = (syw // CH_ALIGN) * CH_ALIGN
        srn = (srn // CH_ALIGN) * CH_ALIGN
        srh = (srh // CH_ALIGN) * CH_ALIGN
        srw = (srw // CH_ALIGN) * CH_ALIGN

    # GROUP_M swizzle: consecutive programs sweep GROUP_M row tiles per column tile, so the input rows they
    # gather stay in L2 while the weight columns are reused.
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
        # Every index that multiplies a stride becomes int64, so no product can wrap.
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        g = g.to(tl.int64)

    # Row (output pixel) decomposition, done once per tile.
    ow_idx = offs_m % OW
    t = offs_m // OW
    oh_idx = t % OH
    n_idx = t // OH
    ih0 = oh_idx * stride_h - pad_h
    iw0 = ow_idx * stride_w - pad_w
    co = g * COUT_G + offs_n  # absolute output channel

    x_rows = x_ptr + (n_idx * sxn + (g * CIN_G) * sxc)  # [BLOCK_M] pointers to channel 0 of this group
    w_cols = w_ptr + co * swo                            # [BLOCK_N] pointers to (co, 0, 0, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if IS_1X1:
        k_total = tl.cdiv(CIN_G, BLOCK_K)
    elif ROW_K:
        k_total = KH
    elif FLAT_K:
        k_total = tl.cdiv(KH * KW * CIN_G, BLOCK_K)
    else:
        k_total = KH * KW * tl.cdiv(CIN_G, BLOCK_K)
    k_per_split = tl.cdiv(k_total, SPLIT_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k_total)

    if IS_1X1:
        acc = k_loop_1x1(acc, x_rows + ih0 * sxh + iw0 * sxw, w_cols, mask_m, mask_n, offs_k, k_start, k_end,
                         CIN_G, sxc, swi, EVEN_K, INPUT_PRECISION, BLOCK_K)
    elif ROW_K:
        acc = k_loop_rows(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, k_start, k_end, H, W, CIN_G,
                          dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww, KW, INPUT_PRECISION, ROW_WIDTH)
    elif FLAT_K:
        acc = k_loop_flat(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, offs_k, k_start, k_end, H, W, CIN_G,
                          dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww, KH, KW, INPUT_PRECISION, BLOCK_K)
    else:
        acc = k_loop_taps(acc, x_rows, w_cols, ih0, iw0, mask_m, mask_n, offs_k, k_start, k_end, H, W, CIN_G,
                          dil_h, dil_w, sxc, sxh, sxw, swi, swh, sww, KH, KW, EVEN_K, INPUT_PRECISION,
                          BLOCK_M, BLOCK_K)

    mask_mn = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        # Partial sums only: the non-linear epilogue needs the full K sum (done by _splitk_epilogue_kernel).
        # Workspace layout [SPLIT_K, M, Cout] fp32, contiguous.
        cout = COUT_G * tl.num_programs(1)
        ws_ptrs = ws_ptr + (pid_k * M + offs_m)[:, None] * cout + co[None, :]
        tl.store(ws_ptrs, acc, mask=mask_mn)
    else:
        epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, n_idx * srn + oh_idx * srh + ow_idx * srw,
                       n_idx * syn + oh_idx * syh + ow_idx * syw, co, src, syc, mask_n, mask_mn,
                       HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


@triton.jit
def _splitk_epilogue_kernel(
    ws_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr,
    M, COUT, OH, OW,
    srn, src, srh, srw,
    syn, syc, syh, syw,
    ACT_PARAM,
    SPLIT_K: tl.constexpr, ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K fp32 partial tiles of the workspace, then the full epilogue and the store."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < COUT
    if USE_INT64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: deterministic sums
        acc += tl.load(ws_ptr + (s * M + offs_m)[:, None] * COUT + offs_n[None, :], mask=mask_mn, other=0.0)
    ow_idx = offs_m % OW
    t = offs_m // OW
    oh_idx = t % OH
    n_idx = t // OH
    epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, n_idx * srn + oh_idx * srh + ow_idx * srw,
                   n_idx * syn + oh_idx * syh + ow_idx * syw, offs_n, src, syc, mask_n, mask_mn,
                   HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


_autotuned_kernel = None


def _get_autotuned_kernel():
    """The autotuner around _conv_gemm_kernel, built on first GPU use (never under the interpreter)."""
    global _autotuned_kernel
    if _autotuned_kernel is None:
        _autotuned_kernel = triton.autotune(
            configs=_configs.all_autotune_configs(),
            key=_configs.AUTOTUNE_KEY,
            prune_configs_by={"early_config_prune": _configs.prune_configs},
        )(_conv_gemm_kernel)
        from fusedconv.kernels.tuning_cache import bucket_m

        bucket_m(_autotuned_kernel, _configs.AUTOTUNE_KEY)  # a new batch size reuses its M bucket's config
    return _autotuned_kernel


# ---------------------------------------------------------------------------------------------- host side
def interpreting() -> bool:
    """Whether this module's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).

    Decided by what `@triton.jit` returned, not by the environment now: setting the variable after import
    does not turn the kernels into interpreted ones.
    """
    return not isinstance(_conv_gemm_kernel, triton.runtime.JITFunction)


def _pair(name, value):
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return pair


def _cdiv(a: int, b: int) -> int:
    # Host-side ceil division (triton.cdiv is a jit function: calling it from Python costs ~10 us).
    return -(-a // b)


def _check_tensors(x, weight, scale, shift, residual) -> None:
    """Per-call checks of the tensor objects themselves (types, same device); the rest is in _plan."""
    for name, t in (("input", x), ("weight", weight), ("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
    for name, t in (("weight", weight), ("scale", scale), ("shift", shift), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: expected device {x.device} (the input's), got {t.device}")


def _check_device(x) -> None:
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(f"input: the Triton kernel runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                           f"got a tensor on {x.device}")


def _check_meta(x_shape, x_dtype, w_shape, w_dtype, scale_shape, shift_shape, res_meta, groups, activation,
                act_param, stride, padding, dilation):
    """Argument checks on shapes / dtypes / geometry; returns the output shape."""
    if len(x_shape) != 4:
        raise ValueError(f"input: expected a 4-d (N, C, H, W) tensor, got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"weight: expected a 4-d (Cout, Cin/groups, KH, KW) tensor, got shape {tuple(w_shape)}")
    if x_dtype not in _KERNEL_DTYPES:
        raise TypeError(f"input: expected dtype float16, bfloat16 or float32 for the Triton kernel, got {x_dtype}")
    if w_dtype != x_dtype:
        raise TypeError(f"weight: expected dtype {x_dtype} (the input's), got {w_dtype}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    cout = w_shape[0]
    if cout % groups:
        raise ValueError(f"groups: expected to divide Cout={cout}, got {groups}")
    if x_shape[1] != w_shape[1] * groups:
        raise ValueError(f"input: expected {w_shape[1] * groups} channels (weight.shape[1] * groups), "
                         f"got {x_shape[1]}")
    for name, shape in (("scale", scale_shape), ("shift", shift_shape)):
        if tuple(shape) != (cout,):
            raise ValueError(f"{name}: expected shape ({cout},) (one value per output channel), got {tuple(shape)}")
    if activation not in _activation_names():
        raise ValueError(f"activation: expected one of {_activation_names()}, got {activation!r}")
    if activation != "leaky_relu" and act_param not in (0, 0.0):
        raise ValueError(f"act_param: only 'leaky_relu' takes a parameter, got {act_param!r} for {activation!r}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride/dilation: expected >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    out_shape = output_shape(x_shape, w_shape, stride, padding, dilation)
    if out_shape[2] < 1 or out_shape[3] < 1:
        raise ValueError(f"input: spatial size {tuple(x_shape[2:])} is too small for kernel "
                         f"{tuple(w_shape[2:])} with padding {padding} and dilation {dilation}")
    if res_meta is not None:
        res_shape, _, res_dtype = res_meta
        if tuple(res_shape) != out_shape:
            raise ValueError(f"residual: expected the output's shape {out_shape}, got {tuple(res_shape)}")
        if not res_dtype.is_floating_point:
            raise TypeError(f"residual: expected a floating-point tensor, got {res_dtype}")
    return out_shape


def _activation_names():
    from fusedconv.kernels.epilogue import ACTIVATION_IDS

    return tuple(ACTIVATION_IDS)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _depthwise_launcher():
    """kernels.depthwise.depthwise_conv_bn_act when that module exists, else None (the GEMM path covers it)."""
    try:
        from fusedconv.kernels.depthwise import depthwise_conv_bn_act
    except ImportError:
        return None
    return depthwise_conv_bn_act


def _span(shape, strides) -> int:
    """Largest element offset a strided tensor addresses (0 when empty)."""
    if any(size == 0 for size in shape):
        return 0
    return sum((size - 1) * abs(st) for size, st in zip(shape, strides))


def _dense_strides(shape, channels_last: bool) -> tuple[int, int, int, int]:
    n, c, h, w = shape
    if channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def _channel_alignment(cin_g, cout_g, x_stride, w_stride, res_stride, y_stride) -> int:
    """CH_ALIGN: 8 when the channel counts and every pixel / weight stride are multiples of 8 but some are not
    multiples of 16 (Triton's own specialisation already covers that case), else 1. The kernel then tells the
    compiler these values are multiples of 8, which makes channel runs 16-byte vector loads."""
    values = (cin_g, cout_g, x_stride[0], x_stride[2], x_stride[3], *w_stride[1:], res_stride[0],
              *res_stride[2:], y_stride[0], *y_stride[2:])
    if all(v % 16 == 0 for v in values) or any(v % 8 for v in values):
        return 1
    return 8


def _plan(x_shape, x_stride, x_dtype, device, w_shape, w_stride, w_dtype, scale_shape, shift_shape, res_meta,
          stride, padding, dilation, groups, activation, act_param, split_k, tf32, channels_last):
    """Everything about a launch that depends only on metadata: validation, output shape, split-K, int64,
    the integer arguments and constexpr flags. Pure, so the launcher caches it per distinct call signature."""
    out_shape = _check_meta(x_shape, x_dtype, w_shape, w_dtype, scale_shape, shift_shape, res_meta, groups,
                            activation, act_param, stride, padding, dilation)
    n, cout, oh, ow = out_shape
    cin = x_shape[1]
    cin_g, cout_g = cin // groups, cout // groups
    depthwise = groups > 1 and groups == cin == cout and split_k is None
    kh, kw = w_shape[2], w_shape[3]
    m = n * oh * ow
    interp = interpreting()
    is_1x1 = kh == 1 and kw == 1 and padding == (0, 0)
    small_cin = not is_1x1 and kh * kw > 1 and cin_g < _FLAT_K_BELOW
    row_k = small_cin and kw * cin_g <= _ROW_K_MAX_WIDTH
    flat_k = small_cin and not row_k
    if split_k is None:
        block_k_guess = _configs.INTERPRET_CONFIG["BLOCK_K"] if interp else 64
        if row_k:
            k_iters = kh
        elif flat_k:
            k_iters = _cdiv(kh * kw * cin_g, block_k_guess)
        else:
            k_iters = kh * kw * _cdiv(cin_g, block_k_guess)
        split_k = 1 if interp else _configs.choose_split_k(m, cout_g, groups, k_iters, _num_sms(device))
    if not isinstance(split_k, int) or isinstance(split_k, bool) or not 1 <= split_k <= 64:
        raise ValueError(f"split_k: expected None or an int in 1..64, got {split_k!r}")
    y_stride = _dense_strides(out_shape, channels_last)
    res_stride = tuple(res_meta[1]) if res_meta is not None else (0, 0, 0, 0)
    extents = [_span(x_shape, x_stride), _span(w_shape, w_stride), _span(out_shape, y_stride), split_k * m * cout]
    if res_meta is not None:
        extents.append(_span(res_meta[0], res_stride))
    use_int64 = max(extents) > _INT32_LIMIT
    int_args = (n, x_shape[2], x_shape[3], oh, ow, m, cin_g, cout_g,
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                *x_stride, *w_stride, *res_stride, *y_stride)
    flags = dict(KH=kh, KW=kw, ACTIVATION=activation_id(activation), HAS_RESIDUAL=res_meta is not None,
                 IS_1X1=is_1x1, ROW_K=row_k, ROW_WIDTH=_configs.row_width(kw, cin_g) if row_k else 16,
                 FLAT_K=flat_k, CH_ALIGN=_channel_alignment(cin_g, cout_g, x_stride, w_stride, res_stride, y_stride),
                 USE_INT64=use_int64, INPUT_PRECISION="tf32" if tf32 else "ieee", SPLIT_K=split_k)
    if small_cin:
        even_k = False  # the row-K and flattened loops mask K themselves
    elif interp:
        even_k = cin_g % _configs.INTERPRET_CONFIG["BLOCK_K"] == 0
    else:
        # EVEN_K depends on the config's BLOCK_K, so it is only set when every candidate BLOCK_K divides Cin_g.
        even_k = all(cin_g % bk == 0 for bk in _configs.block_k_values())
    flags["EVEN_K"] = even_k
    return dict(out_shape=out_shape, depthwise=depthwise, m=m, cout=cout, cout_g=cout_g, oh=oh, ow=ow,
                split_k=split_k, int_args=int_args, flags=flags, res_stride=res_stride, y_stride=y_stride)


_plan_cached = functools.lru_cache(maxsize=2048)(_plan)


def conv_bn_act(x, weight, scale, shift, *, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                act_param=0.0, residual=None, split_k=None, tma=None):
    """act(conv2d(x, weight) * scale + shift [+ residual]) in one Triton kernel launch.

    x: (N, Cin, H, W) fp16 / bf16 / fp32, any strides (channels_last is the fast path). weight: (Cout, Cin/groups,
    KH, KW) in x's dtype, any strides (`pack_weight` gives the fastest). scale, shift: (Cout,) — applied in fp32.
    residual: None or a tensor of the output's shape, any strides. activation: a name of
    `reference.ACTIVATIONS`; act_param is leaky_relu's slope. Returns a tensor in x's dtype and memory format.
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. Depthwise convs (groups == Cin == Cout)
    go to `kernels.depthwise` when it is present. `split_k` overrides the automatic split-K choice and keeps
    the conv on this GEMM kernel (tests use it to exercise those paths).

    `tma`: run eligible 1x1 convs (see `conv_tma.tma_1x1_eligible`) through the TMA-descriptor GEMM kernel and
    eligible stride-1 KxK convs (`conv_tma_kxk.tma_kxk_eligible`) through the 4-D NHWC descriptor kernel
    (True), never (False), or as `TMA_DEFAULT` says (None: off unless FUSEDCONV_TMA=1 at import, until a GPU
    check has validated that kernel on hardware). Ineligible convs always run the pointer kernel.

    The metadata-only part of a launch (checks, split-K, int64, integer arguments) is cached per distinct call
    signature, so a repeated call costs little more than the allocation and the kernel launch.
    """
    stride, padding, dilation = _pair("stride", stride), _pair("padding", padding), _pair("dilation", dilation)
    _check_tensors(x, weight, scale, shift, residual)
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32
    fmt = output_memory_format(x)
    res_meta = None if residual is None else (tuple(residual.shape), tuple(residual.stride()), residual.dtype)
    key = (tuple(x.shape), tuple(x.stride()), x.dtype, x.device, tuple(weight.shape), tuple(weight.stride()),
           weight.dtype, tuple(scale.shape), tuple(shift.shape), res_meta, stride, padding, dilation, groups,
           activation, act_param, split_k, tf32, fmt == torch.channels_last)
    try:
        plan = _plan_cached(*key)
    except TypeError:
        # Symbolic shapes (torch.compile with dynamic shapes) are unhashable: plan without the cache. (A
        # TypeError from the argument checks is raised again by this call.)
        plan = _plan(*key)
    _check_device(x)  # after the argument checks, so a bad argument is reported as such on any device

    if plan["depthwise"]:
        depthwise = _depthwise_launcher()
        if depthwise is not None:
            return depthwise(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation,
                             activation=activation, act_param=act_param, residual=residual)

    y = torch.empty(plan["out_shape"], dtype=x.dtype, device=x.device, memory_format=fmt)
    if y.numel() == 0:
        return y
    if tuple(y.stride()) != plan["y_stride"]:  # the plan's output strides must be the ones torch allocated
        raise RuntimeError(f"internal: output strides {tuple(y.stride())} differ from the planned {plan['y_stride']}")
    if scale.dtype != torch.float32 or not scale.is_contiguous():
        scale = scale.to(torch.float32).contiguous()
    if shift.dtype != torch.float32 or not shift.is_contiguous():
        shift = shift.to(torch.float32).contiguous()
    split_k, m, cout, cout_g = plan["split_k"], plan["m"], plan["cout"], plan["cout_g"]
    res = residual if residual is not None else y  # dummy pointer when HAS_RESIDUAL is False
    workspace = (torch.empty((split_k, m, cout), dtype=torch.float32, device=x.device) if split_k > 1
                 else scale)  # dummy pointer when SPLIT_K == 1
    flags = plan["flags"]
    args = (x, weight, scale, shift, res, y, workspace, *plan["int_args"], float(act_param))

    use_tma = TMA_DEFAULT if tma is None else bool(tma)
    if use_tma and flags["IS_1X1"] and split_k == 1 and \
            _tma.tma_1x1_eligible(x, weight, groups, stride, padding, split_k):
        return _tma.conv1x1_tma_launch(
            x, weight, scale, shift, residual, y, flags["ACTIVATION"], act_param, tf32, plan["res_stride"],
            None if interpreting() else traceable(_tma.autotuned_kernel()),
            interpret_cfg=_configs.INTERPRET_CONFIG if interpreting() else None)
    if use_tma and not flags["IS_1X1"] and split_k == 1 and _tma_kxk.tma_kxk_eligible(x, weight, groups, stride,
                                                                                        split_k):
        return _tma_kxk.conv_kxk_tma_launch(
            x, weight, scale, shift, residual, y, padding, dilation, flags["ACTIVATION"], act_param, tf32,
            plan["res_stride"], traceable, interpret_cfg=_tma_kxk.INTERPRET_CONFIG if interpreting() else None)

    if interpreting():
        cfg = _configs.INTERPRET_CONFIG
        grid = (_cdiv(m, cfg["BLOCK_M"]) * _cdiv(cout_g, cfg["BLOCK_N"]), groups, split_k)
        _conv_gemm_kernel[grid](*args, **flags, **cfg)
    else:
        def grid(meta):
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(cout_g, meta["BLOCK_N"]), groups, split_k)

        traceable(_get_autotuned_kernel())[grid](*args, **flags)

    if split_k > 1:
        block = 32 if interpreting() else 64
        grid2 = (_cdiv(m, block), _cdiv(cout, block))
        epi = _splitk_epilogue_kernel if interpreting() else traceable(_splitk_epilogue_kernel)
        epi[grid2](workspace, scale, shift, res, y, m, cout, plan["oh"], plan["ow"], *plan["res_stride"],
                   *plan["y_stride"], float(act_param), SPLIT_K=split_k, ACTIVATION=flags["ACTIVATION"],
                   HAS_RESIDUAL=flags["HAS_RESIDUAL"], USE_INT64=flags["USE_INT64"], BLOCK_M=block,
                   BLOCK_N=block)
    return y
