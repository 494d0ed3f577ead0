"""Input validation shared by FusedConv2d, the op and the public entry points.

Each error names the argument, what was expected and what was given, with the exception type PyTorch itself
would raise for the same mistake (TypeError for a wrong type or dtype, ValueError for a wrong shape or value,
RuntimeError for a device mismatch).
"""

from __future__ import annotations

import torch


class BroadcastResidual(ValueError):
    """A residual of another shape than the output's that broadcasts to it: the fused op and kernels refuse it;
    FusedConv2d computes it on its unfused path (`act(conv(x) * scale + shift + residual)`, as the original
    modules would broadcast it)."""


def conv_output_hw(hw, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of a 2-d convolution (may be <= 0 when the kernel does not fit the padded input)."""
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def check_inputs(x: torch.Tensor, weight: torch.Tensor, groups: int, residual: torch.Tensor | None,
                 *, stride=None, padding=None, dilation=None) -> tuple[int, ...] | None:
    """Raise a clear error for inputs the conv cannot take (names the argument, what was expected and given).

    `x` may be batched (N, C, H, W) or, like nn.Conv2d accepts, unbatched (C, H, W); `residual` must then have
    the same number of dimensions. When the geometry (stride, padding, dilation) is given, also checks that the
    kernel fits the padded input and that the residual has the output's shape, and returns that output shape
    (3-d for unbatched input); otherwise returns None.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(f"input: expected a 4-d (N, C, H, W) or unbatched 3-d (C, H, W) tensor, got {x.dim()}-d "
                         f"with shape {tuple(x.shape)}")
    c_dim = x.dim() - 3
    cin = weight.shape[1] * groups
    if x.shape[c_dim] != cin:
        raise ValueError(f"input: expected {cin} channels (dim {c_dim}), got {x.shape[c_dim]} "
                         f"(shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"input: expected dtype {weight.dtype} to match the module's weight, got {x.dtype}")
    if x.device != weight.device:
        raise RuntimeError(f"input: expected device {weight.device} to match the module's weight, got {x.device}")
    out_shape = None
    if stride is not None:
        oh, ow = conv_output_hw(x.shape[-2:], weight.shape[2:], stride, padding, dilation)
        if oh < 0 or ow < 0 or (x.shape[-2] > 0 and oh < 1) or (x.shape[-1] > 0 and ow < 1):
            raise ValueError(f"input: spatial size {tuple(x.shape[-2:])} with padding {tuple(padding)} is smaller "
                             f"than the dilated kernel {tuple(weight.shape[2:])} (dilation {tuple(dilation)})")
        out_shape = tuple(x.shape[:c_dim]) + (weight.shape[0], max(oh, 0), max(ow, 0))
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
        if residual.dim() != x.dim():
            raise ValueError(f"residual: expected a {x.dim()}-d tensor like the input, got {residual.dim()}-d "
                             f"with shape {tuple(residual.shape)}")
        if out_shape is not None and tuple(residual.shape) != out_shape:
            error = ValueError
            try:
                if (torch.broadcast_shapes(tuple(residual.shape), out_shape) == out_shape
                        and residual.device == x.device and residual.dtype == x.dtype):
                    error = BroadcastResidual
            except RuntimeError:
                pass
            raise error(f"residual: expected the output's shape {out_shape}, got {tuple(residual.shape)} "
                        "(no broadcasting)")
        if residual.device != x.device:
            raise RuntimeError(f"residual: expected device {x.device} to match the input, got {residual.device}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual: expected dtype {x.dtype} to match the input, got {residual.dtype}")
    return out_shape
