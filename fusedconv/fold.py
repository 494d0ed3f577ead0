"""Fold math: an inference-mode BatchNorm after a convolution is a per-output-channel affine map.

    bn(conv(x) + b) = conv(x) * scale + shift,   scale = gamma / sqrt(var + eps),
                                                 shift = beta + (b - mean) * scale

Everything is computed in float64 whatever the model's dtype, then cast (scale and shift to float32 by
default, because the fused epilogue applies them to the fp32 accumulator). Works for any BatchNorm whose
forward is the plain formula: nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm and FrozenBatchNorm2d (torchvision's
and timm's). Whether a BatchNorm *subclass* that overrides forward may be folded is the graph passes' call;
this module only does the arithmetic and refuses statistics it cannot fold.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

_FROZEN_BN_NAMES = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d or timm's FrozenBatchNorm2d: fixed buffers, no training mode."""
    return type(module).__name__ in _FROZEN_BN_NAMES and all(
        isinstance(getattr(module, n, None), torch.Tensor) for n in ("weight", "bias", "running_mean", "running_var")
    )


def is_batchnorm(module: nn.Module) -> bool:
    """Any module whose statistics this file can fold (the caller decides whether its forward is plain)."""
    return isinstance(module, _BatchNorm) or is_frozen_batchnorm(module)


def bn_scale_shift(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    conv_bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode batch norm applied after a conv with bias `conv_bias`.

    Raises ValueError on non-finite statistics or parameters, a negative variance, or mismatched lengths.
    """
    if running_mean is None or running_var is None:
        raise ValueError("bn: expected running statistics (track_running_stats=True), got running_mean/var = None")
    c = running_mean.numel()
    named = {"bn running_mean": running_mean, "bn running_var": running_var, "bn weight": weight, "bn bias": bias,
             "conv bias": conv_bias}
    for name, t in named.items():
        if t is None:
            continue
        if t.numel() != c:
            raise ValueError(f"{name}: expected {c} values (one per channel), got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: expected finite values, got {int((~torch.isfinite(t)).sum())} non-finite")
    if not (eps >= 0.0):
        raise ValueError(f"bn eps: expected a non-negative number, got {eps!r}")
    var = running_var.detach().to(torch.float64).reshape(-1)
    if (var + eps <= 0).any():
        raise ValueError("bn running_var: expected running_var + eps > 0 for every channel, "
                         f"got min(running_var + eps) = {float((var + eps).min()):g}")
    mean = running_mean.detach().to(torch.float64).reshape(-1)
    gamma = torch.ones_like(var) if weight is None else weight.detach().to(torch.float64).reshape(-1)
    beta = torch.zeros_like(var) if bias is None else bias.detach().to(torch.float64).reshape(-1)
    b = torch.zeros_like(var) if conv_bias is None else conv_bias.detach().to(torch.float64).reshape(-1)
    scale = gamma / torch.sqrt(var + eps)
    shift = beta + (b - mean) * scale
    return scale.to(dtype), shift.to(dtype)


def check_foldable(bn: nn.Module, name: str = "bn") -> None:
    """Raise unless `bn` is a batch norm in inference mode with running statistics."""
    if not is_batchnorm(bn):
        raise TypeError(f"{name}: expected a BatchNorm module (nn.BatchNorm*d, nn.SyncBatchNorm or FrozenBatchNorm2d), "
                        f"got {type(bn).__name__}")
    if is_frozen_batchnorm(bn):
        return
    if bn.training:
        raise RuntimeError(f"{name}: expected a BatchNorm in eval mode (call model.eval()), got one in training mode; "
                           "a training-mode BatchNorm normalises with batch statistics and cannot be folded")
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{name}: expected a BatchNorm with running statistics, got track_running_stats=False; "
                         "it normalises with batch statistics even in eval mode and cannot be folded")


def fold_bn(bn: nn.Module, conv_bias: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) for `bn` following a conv with bias `conv_bias`, in `dtype` (float32 by default)."""
    check_foldable(bn)
    eps = float(getattr(bn, "eps", 1e-5))
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, eps, conv_bias, dtype)


def _check_conv(conv: nn.Module) -> None:
    if not isinstance(conv, nn.modules.conv._ConvNd) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise TypeError(f"conv: expected nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(conv).__name__}")


def conv_bn_scale_shift(conv: nn.Module, bn: nn.Module | None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of `bn(conv(x))` relative to the bias-free conv; bn=None gives (1, conv bias or 0)."""
    _check_conv(conv)
    cout = conv.out_channels
    if bn is not None:
        check_foldable(bn)  # first, so a wrong module type is named as such rather than by its size
    if bn is None:
        scale = torch.ones(cout, dtype=dtype, device=conv.weight.device)
        shift = (torch.zeros(cout, dtype=dtype, device=conv.weight.device) if conv.bias is None
                 else conv.bias.detach().to(dtype))
        return scale, shift
    nf = bn.running_mean.numel() if getattr(bn, "running_mean", None) is not None else getattr(bn, "num_features", None)
    if nf != cout:
        raise ValueError(f"bn: expected {cout} features to match conv out_channels, got {nf}")
    return fold_bn(bn, conv.bias, dtype)


def fold_conv_bn_weights(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one conv equal to `bn(conv(x))`, in the conv's dtype (computed in float64)."""
    scale, shift = conv_bn_scale_shift(conv, bn, dtype=torch.float64)
    w = conv.weight.detach()
    view = (-1,) + (1,) * (w.dim() - 1)
    folded = (w.to(torch.float64) * scale.view(view)).to(w.dtype)
    bias = shift.to(w.dtype)
    for name, t in (("conv weight", folded), ("conv bias", bias)):
        if not bool(torch.isfinite(t).all()):
            # e.g. a tiny running_var folded into fp16 weights: refuse rather than return inf weights.
            raise ValueError(f"{name}: expected the folded values to fit {w.dtype}, got {int((~torch.isfinite(t)).sum())} "
                             f"that overflow (max |scale| = {float(scale.abs().max()):.3g}); fold in float32 instead")
    return folded, bias
