"""Launch planning of the implicit-GEMM conv: argument checks, output shape, loop flags, schedule, int64.

Everything here depends only on metadata (shapes, strides, dtypes, geometry, the SM count), so the launcher
(`conv_bn_act`) caches `_plan` per distinct call signature and a repeated call costs little more than the
allocation and the launch. The plan says which schedule runs (`schedule.choose_schedule`: data-parallel,
split-K or stream-K; where that leaves the GPU short, `filling_streamk` names the stream-K schedule the
launcher also times at warm-up), which K loop (IS_1X1 / ROW_K / FLAT_K / per-tap), whether K masks can go (EVEN_K),
whether 8-aligned channels get vector loads (CH_ALIGN) and whether offsets need int64.
"""

from __future__ import annotations

import torch
import triton

from fusedconv.kernels import configs as _configs
from fusedconv.kernels import schedule as _schedule_model
from fusedconv.kernels.conv_gemm import _conv_gemm_kernel
from fusedconv.kernels.epilogue import activation_id
from fusedconv.kernels.reference import conv_output_shape as output_shape

_INT32_LIMIT = 2**31 - 1
# Spatial convs with fewer input channels per group than this use the flattened-K loop (FLAT_K): the smallest
# tensor-core K step is 16.
_FLAT_K_BELOW = 16
# ...and of those, the ones whose kernel row holds at most this many (kw, c) pairs use the row-K loop (ROW_K).
_ROW_K_MAX_WIDTH = 64
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Stream-K programs under the interpreter when a test asks for stream-K without a count (no SMs to count).
INTERPRET_STREAMK_PROGRAMS = 3


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


_SM_COUNTS: dict = {}  # CUDA device index -> SM count (asked once: the persistent TMA grid asks per launch)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


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


def _k_iterations_guess(kh, kw, cin_g, row_k, flat_k, block_k) -> int:
    """K iterations per output tile for the schedule model (BLOCK_K as the common 16-bit configs have it)."""
    if row_k:
        return _cdiv(kh, _configs.row_k_rows(kh, kw, cin_g))
    if flat_k:
        return _cdiv(kh * kw * cin_g, block_k)
    return kh * kw * _cdiv(cin_g, block_k)


def _schedule(split_k, stream_k, m, cout_g, groups, k_iters, device, interp, sm_count=None, nbytes=None):
    """(split_k, stream-K programs or 0) from the caller's overrides, else `schedule.choose_schedule`.
    `sm_count(device)` gives the SM count (default `_num_sms`); `nbytes` the layer's compulsory bytes."""
    _num_sms_of = sm_count or _num_sms
    if stream_k is not None and (not isinstance(stream_k, int) or (not isinstance(stream_k, bool) and stream_k < 1)):
        raise ValueError(f"stream_k: expected None, a bool or a positive int (programs), got {stream_k!r}")
    if stream_k is not None and stream_k is not False and split_k not in (None, 1):
        raise ValueError(f"split_k: expected None or 1 with stream_k={stream_k!r}, got {split_k!r}")
    if stream_k is True:
        return 1, (INTERPRET_STREAMK_PROGRAMS if interp else max(_num_sms_of(device), 1))
    if stream_k:
        return 1, int(stream_k)
    if split_k is None:
        if interp:
            return 1, 0
        if stream_k is None:
            kind, value = _configs.choose_schedule(m, cout_g, groups, k_iters, _num_sms_of(device), nbytes=nbytes)
            if kind == "stream_k":
                return 1, value
            split_k = value
        else:
            split_k = _configs.choose_split_k(m, cout_g, groups, k_iters, _num_sms_of(device), nbytes=nbytes)
    if not isinstance(split_k, int) or isinstance(split_k, bool) or not 1 <= split_k <= 64:
        raise ValueError(f"split_k: expected None or an int in 1..64, got {split_k!r}")
    return split_k, 0


def _plan(x_shape, x_stride, x_dtype, device, w_shape, w_stride, w_dtype, scale_shape, shift_shape, res_meta,
          stride, padding, dilation, groups, activation, act_param, split_k, tf32, channels_last,
          stream_k=None, sm_count=None):
    """Everything about a launch that depends only on metadata: validation, output shape, split-K, int64,
    the integer arguments and constexpr flags. Pure, so the launcher caches it per distinct call signature.
    `sm_count(device)`: how the schedule learns the SM count (default `_num_sms`)."""
    out_shape = _check_meta(x_shape, x_dtype, w_shape, w_dtype, scale_shape, shift_shape, res_meta, groups,
                            activation, act_param, stride, padding, dilation)
    n, cout, oh, ow = out_shape
    cin = x_shape[1]
    cin_g, cout_g = cin // groups, cout // groups
    # Depthwise convs go to their own kernel unless the caller pins a GEMM schedule (split_k / stream_k).
    depthwise = groups > 1 and groups == cin == cout and split_k is None and not stream_k
    kh, kw = w_shape[2], w_shape[3]
    m = n * oh * ow
    interp = interpreting()
    is_1x1 = kh == 1 and kw == 1 and padding == (0, 0)
    small_cin = not is_1x1 and kh * kw > 1 and cin_g < _FLAT_K_BELOW
    row_k = small_cin and kw * cin_g <= _ROW_K_MAX_WIDTH
    flat_k = small_cin and not row_k
    block_k_guess = _configs.INTERPRET_CONFIG["BLOCK_K"] if interp else 64
    k_iters = _k_iterations_guess(kh, kw, cin_g, row_k, flat_k, block_k_guess)
    filling_streamk = 0
    if depthwise:
        # The depthwise kernel has its own schedule; the split only matters if that module is absent.
        split_k, streamk_programs = _schedule(split_k, False, m, cout_g, groups, k_iters, device, interp, sm_count)
    else:
        nbytes = _schedule_model.layer_bytes(m, cout_g, groups, k_iters, block_k_guess, input_k=cin_g,
                                             elem_bytes=x_dtype.itemsize)
        auto = split_k is None and stream_k is None and not interp
        split_k, streamk_programs = _schedule(split_k, stream_k, m, cout_g, groups, k_iters, device, interp,
                                              sm_count, nbytes)
        if auto:
            # Where the rule's schedule leaves the GPU short, the stream-K schedule that fills it is timed at
            # warm-up beside it (the model alone cannot tell which is faster there).
            filling_streamk = _schedule_model.filling_streamk(m, cout_g, groups, k_iters,
                                                              (sm_count or _num_sms)(device), nbytes=nbytes)
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
                 IS_1X1=is_1x1, ROW_K=row_k, ROW_WIDTH=_configs.row_width(kw, cin_g, kh) if row_k else 16,
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
                split_k=split_k, streamk_programs=streamk_programs, filling_streamk=filling_streamk,
                int_args=int_args, flags=flags,
                res_stride=res_stride, y_stride=y_stride)


