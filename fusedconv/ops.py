"""The `fusedconv::conv_bn_act` op: one PyTorch operator for act(conv(x, w) * scale + shift [+ residual]).

CUDA tensors run the Triton kernel (see `fusedconv.kernels`); every other device runs the standard-conv
fallback (`conv_bn_act_ref`). A fake (meta) implementation gives torch.compile and torch.export the output's
shape, dtype and memory format without running anything, so FusedConv2d traces with no graph break.
"""

from __future__ import annotations

import functools

import torch

from fusedconv.kernels.reference import conv_bn_act_ref

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def kernel_available() -> bool:
    """True when the Triton kernels can run on this machine's CUDA devices."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def pack_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The same weight values laid out (via strides) the way the kernel reads them fastest."""
    from fusedconv.kernels import pack_weight as _pack

    return _pack(weight, groups)


def use_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether FusedConv2d should call the op (CUDA + a kernel dtype) rather than its folded fallback."""
    return x.is_cuda and x.dtype in _KERNEL_DTYPES and weight.dtype == x.dtype and kernel_available()


@torch.library.custom_op("fusedconv::conv_bn_act", mutates_args=())
def _conv_bn_act_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    residual: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                    groups: int, activation: str, act_param: float) -> torch.Tensor:
    if x.is_cuda and kernel_available():
        from fusedconv.kernels import conv_bn_act as _launch

        return _launch(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation, groups=groups,
                       activation=activation, act_param=act_param, residual=residual)
    return conv_bn_act_ref(x, weight, scale, shift, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, activation=activation, act_param=act_param, residual=residual)


@_conv_bn_act_op.register_fake
def _(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, act_param):
    n, _, h, w = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    fmt = torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format
    return x.new_empty((n, weight.shape[0], oh, ow)).contiguous(memory_format=fmt)


def conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, act_param):
    """Call the registered op (positional arguments as in its schema)."""
    return torch.ops.fusedconv.conv_bn_act(x, weight, scale, shift, residual, list(stride), list(padding),
                                           list(dilation), groups, activation, float(act_param))
