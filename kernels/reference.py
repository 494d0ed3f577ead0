"""PyTorch reference for the fused kernels: act(conv(x, w) * scale + shift [+ residual]), plain torch.

The conv runs in the input's dtype (as cuDNN would), the epilogue in fp32 (fp64 for fp64 inputs), then one
cast to the input's dtype: the same order of operations as the Triton epilogue. Tests compare kernels with it;
the op's fallback for configurations no kernel covers is this function too. It also defines the epilogue's
activation names and their exact PyTorch meaning, which the kernels must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Names understood by the kernels' epilogue. `gelu` is exact (erf) GELU, `gelu_tanh` GELU(approximate="tanh").
ACTIVATIONS = ("identity", "relu", "relu6", "leaky_relu", "silu", "hardswish", "gelu", "gelu_tanh")


def apply_activation(x: torch.Tensor, name: str, param: float = 0.0, inplace: bool = False) -> torch.Tensor:
    """PyTorch implementation of each epilogue activation, by name; `param` is leaky_relu's slope."""
    if name == "identity":
        return x
    if name == "relu":
        return F.relu(x, inplace=inplace)
    if name == "relu6":
        return F.hardtanh(x, 0.0, 6.0, inplace=inplace)
    if name == "leaky_relu":
        return F.leaky_relu(x, param, inplace=inplace)
    if name == "silu":
        return F.silu(x, inplace=inplace)
    if name == "hardswish":
        return F.hardswish(x, inplace=inplace)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def conv_output_shape(x_shape, weight_shape, stride, padding, dilation) -> tuple[int, int, int, int]:
    """(N, Cout, OH, OW) of a conv of an (N, C, H, W) input with a (Cout, Cin/groups, KH, KW) weight."""
    n, _, h, w = x_shape
    kh, kw = weight_shape[2], weight_shape[3]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return (n, weight_shape[0], oh, ow)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The fused op's output memory format: channels_last when x is channels_last (and not also plain
    contiguous, e.g. 1x1 spatial), else contiguous — the rule cuDNN convolutions follow."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv_bn_act_ref(x, weight, scale, shift, *, stride=1, padding=0, dilation=1, groups=1, activation="relu",
                    act_param=0.0, residual=None):
    """act(conv(x, weight) * scale + shift [+ residual]) with the epilogue in fp32 (fp64 for fp64 input)."""
    y = F.conv2d(x, weight.to(x.dtype), None, stride, padding, dilation, groups)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = y.to(acc) * scale.to(acc).view(1, -1, 1, 1) + shift.to(acc).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(acc)
    y = apply_activation(y, activation, act_param)
    return y.to(x.dtype)
