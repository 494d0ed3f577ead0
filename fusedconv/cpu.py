"""Eager CPU fast path for FusedConv2d: oneDNN (mkldnn) convolution with a pre-packed weight and the activation
(and the residual add) fused into the conv as oneDNN post-ops.

These are the ops Inductor's CPU backend emits after freezing (`mkldnn::_reorder_convolution_weight`,
`mkldnn::_convolution_pointwise` and its `.binary` overload). They are private PyTorch ops, so everything here is
guarded: `available()` checks that they exist, callers fall back to F.conv2d when a call raises, and only float32
on CPU is ever routed here. Never used while tracing (torch.compile / torch.export / ONNX keep standard aten ops).
"""

from __future__ import annotations

import torch

from fusedconv.activations import apply_activation

# FusedConv2d activation name -> (oneDNN unary attr, scalars, algorithm); leaky_relu is built in unary_attr.
_UNARY = {
    "identity": ("none", [], ""),
    "relu": ("relu", [], ""),
    "relu6": ("hardtanh", [0.0, 6.0], ""),
    "silu": ("swish", [], ""),
    "hardswish": ("hardswish", [], ""),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
}
# Activations oneDNN fuses after a binary "add" post-op (measured: others raise "Unary Fusion behavior undefined").
_BINARY_UNARY = ("identity", "relu")

# Switch for the whole fast path (A/B measurements, or to rule it out when debugging): False -> F.conv2d fallback.
enabled = True

_available: bool | None = None


def available() -> bool:
    """True when this PyTorch build has oneDNN and the pointwise-conv ops (checked once)."""
    global _available
    if _available is None:
        try:
            ops = torch.ops.mkldnn
            _available = bool(
                torch.backends.mkldnn.is_available()
                and hasattr(ops, "_convolution_pointwise")
                and hasattr(ops._convolution_pointwise, "binary")
                and hasattr(ops, "_reorder_convolution_weight"))
        except (AttributeError, RuntimeError):
            _available = False
    return _available


def unary_attr(name: str, param: float) -> tuple[str, list, str]:
    """oneDNN post-op for an activation; leaky_relu carries its slope as the scalar."""
    if name == "leaky_relu":
        return "leaky_relu", [float(param)], ""
    return _UNARY[name]


def pack_weight(weight: torch.Tensor, padding, stride, dilation, groups: int, input_size) -> torch.Tensor:
    """The weight reordered once into oneDNN's blocked layout for this conv (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, list(input_size))


def conv_act(x, packed_weight, bias, padding, stride, dilation, groups, act_name, act_param, residual):
    """act(conv(x) + bias [+ residual]) in one oneDNN call where oneDNN can fuse it, otherwise conv (+ add) fused
    and the activation in place. Returns a channels_last tensor (oneDNN's output layout)."""
    padding, stride, dilation = list(padding), list(stride), list(dilation)
    if residual is None:
        attr, scalars, algorithm = unary_attr(act_name, act_param)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed_weight, bias, padding, stride, dilation, groups, attr, scalars, algorithm)
    # The binary post-op reads the residual in the output's layout.
    residual = residual.contiguous(memory_format=torch.channels_last)
    fused_act = act_name in _BINARY_UNARY
    unary = ("relu" if act_name == "relu" else None) if fused_act else None
    y = torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, packed_weight, bias, padding, stride, dilation, groups, "add", None, unary, [], "")
    if fused_act:
        return y
    return apply_activation(y, act_name, act_param, inplace=True)
