"""The fused epilogue shared by every conv kernel: fp32 scale/shift, optional residual, activation, by constexpr.

Kernels accumulate the convolution in fp32 and then call, on that fp32 tile,

    out = epilogue(acc, scale, shift, residual, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)

where `scale` / `shift` are fp32 values broadcastable to `acc` (one per output channel) and `residual` is the
loaded residual tile (any dtype; ignored unless HAS_RESIDUAL). The activation is an integer constexpr so each
activation compiles to its own straight-line code; `ACTIVATION_IDS` maps the names of
`fusedconv.kernels.reference.ACTIVATIONS` to those integers, and `activation_id(name)` validates a name.

`epilogue_store` ends every GEMM-style kernel with masked per-thread pointer stores; `epilogue_tile` is the same
arithmetic without the store, for the TMA kernels' variant that writes the tile through a tensor descriptor.

`traceable(kernel)` returns the kernel wrapped with `torch.library.wrap_triton` while torch is tracing: every
launcher calls its GPU kernels through it, so the `fusedconv::conv_bn_act` triton_op can be traced by
torch.compile / torch.export (an unwrapped kernel launched under tracing would see fake tensors and fail).
Outside tracing it returns the kernel itself (no per-launch wrapper overhead).

The formulas mirror `reference.apply_activation` (PyTorch's definitions) so the kernels and the reference agree
to rounding: exact GELU uses erf; tanh-GELU uses the identity 0.5 * (1 + tanh(u)) == sigmoid(2u), which avoids a
tanh primitive (not available in every Triton version / the interpreter) and is exact in real arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedconv.kernels.reference import ACTIVATIONS

#: Integer constexpr id of each epilogue activation (covers every name in reference.ACTIVATIONS).
ACTIVATION_IDS = {
    "identity": 0,
    "relu": 1,
    "relu6": 2,
    "leaky_relu": 3,
    "silu": 4,
    "hardswish": 5,
    "gelu": 6,
    "gelu_tanh": 7,
}
assert set(ACTIVATION_IDS) == set(ACTIVATIONS), "every reference activation needs a kernel id"


def activation_id(name: str) -> int:
    """The constexpr id for an activation name, with a clear error for unknown names."""
    try:
        return ACTIVATION_IDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation: expected one of {tuple(ACTIVATION_IDS)}, got {name!r}") from None


def traceable(kernel):
    """`kernel` wrapped so torch.compile / torch.export can trace its launch.

    The wrapper is only needed while tracing (torch.compile, or a dispatch mode such as fake tensors /
    functionalization / make_fx is active); an eager launch gets the kernel itself, because an enabled
    wrap_triton turns every eager call into a higher-order-op dispatch (pure Python overhead per launch).
    Torch without wrap_triton also gets the plain kernel (the op is then opaque to tracing anyway).
    """
    if _wrap_triton is None or not _tracing():
        return kernel
    return _wrap_triton(kernel)


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    if _in_dispatch_mode is None:  # cannot tell: wrapping is always correct, only slower
        return True
    return _in_dispatch_mode()


try:
    from torch.library import wrap_triton as _wrap_triton
except ImportError:
    _wrap_triton = None
try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as _in_dispatch_mode
except ImportError:
    _in_dispatch_mode = None


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr, ACT_PARAM):
    """The activation `ACTIVATION` (an id from ACTIVATION_IDS) applied elementwise to an fp32 tile.

    relu / relu6 / leaky_relu are written with comparisons against 0 so NaN propagates, as in PyTorch.
    """
    if ACTIVATION == 1:  # relu
        x = tl.where(x < 0.0, 0.0, x)
    elif ACTIVATION == 2:  # relu6 == hardtanh(0, 6)
        x = tl.where(x < 0.0, 0.0, tl.where(x > 6.0, 6.0, x))
    elif ACTIVATION == 3:  # leaky_relu, slope ACT_PARAM
        x = tl.where(x < 0.0, x * ACT_PARAM, x)
    elif ACTIVATION == 4:  # silu
        x = x * tl.sigmoid(x)
    elif ACTIVATION == 5:  # hardswish: x * relu6(x + 3) / 6
        t = x + 3.0
        t = tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t))
        x = x * t / 6.0
    elif ACTIVATION == 6:  # exact gelu: x * Phi(x)
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == 7:  # tanh gelu: 0.5x(1 + tanh(u)) == x * sigmoid(2u), u = sqrt(2/pi)(x + 0.044715x^3)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    return x


@triton.jit
def epilogue(acc, scale, shift, residual, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM):
    """act(acc * scale + shift [+ residual]) in fp32; `scale`/`shift` broadcast over the tile's pixels."""
    y = acc * scale + shift
    if HAS_RESIDUAL:
        y = y + residual.to(tl.float32)
    return apply_activation(y, ACTIVATION, ACT_PARAM)


@triton.jit
def load_scale_shift(scale_ptr, shift_ptr, offs_c, mask_c):
    """Per-channel fp32 scale and shift vectors for channel indices `offs_c` (masked lanes: 0)."""
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    return scale, shift


@triton.jit
def epilogue_store(acc, scale_ptr, shift_ptr, res_ptr, y_ptr, res_rows, y_rows, offs_n, src, syc, mask_n, mask_mn,
                   HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, ACT_PARAM):
    """The end of every GEMM-style conv kernel: load the channels' scale/shift (and the residual tile), apply
    `epilogue` to the fp32 accumulator and store the tile in the output's dtype.

    `res_rows` / `y_rows` are the per-pixel row offsets of the residual / output tile (the caller's layout:
    n * s_n + oh * s_h + ow * s_w), `src` / `syc` their channel strides; `res_rows` is unused (and compiled
    away) without HAS_RESIDUAL.
    """
    scale, shift = load_scale_shift(scale_ptr, shift_ptr, offs_n, mask_n)
    residual = 0.0
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + res_rows[:, None] + (offs_n * src)[None, :], mask=mask_mn, other=0.0)
    out = epilogue(acc, scale[None, :], shift[None, :], residual, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)
    tl.store(y_ptr + y_rows[:, None] + (offs_n * syc)[None, :], out.to(y_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def epilogue_tile(acc, scale_ptr, shift_ptr, offs_n, mask_n, residual, HAS_RESIDUAL: tl.constexpr,
                  ACTIVATION: tl.constexpr, ACT_PARAM):
    """`epilogue_store` without the store: the fp32 result tile act(acc * scale + shift [+ residual]) for the
    channels `offs_n`, for kernels that write it themselves (the TMA kernels' bulk-tensor store epilogue, which
    also loads `residual` itself: a tile of the accumulator's shape, ignored without HAS_RESIDUAL)."""
    scale, shift = load_scale_shift(scale_ptr, shift_ptr, offs_n, mask_n)
    return epilogue(acc, scale[None, :], shift[None, :], residual, HAS_RESIDUAL, ACTIVATION, ACT_PARAM)


@triton.jit
def post_affine(y, post_scale, post_shift, HAS_POST: tl.constexpr):
    """y * post_scale + post_shift when HAS_POST (a BatchNorm after the activation, folded to per-channel fp32
    scale/shift), else y unchanged: the last step of act(acc * scale + shift [+ residual]) * s2 + t2."""
    if HAS_POST:
        y = y * post_scale + post_shift
    return y
