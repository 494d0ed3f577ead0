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


# ------------------------------------------------------------------------------------------------ every layer kind
# The same per-channel affine folds into any layer whose output channel axis is a weight axis:
#   Conv1d/2d/3d           weight (Cout, Cin/groups, k...)            output channel = weight dim 0
#   ConvTranspose1d/2d/3d  weight (Cin, Cout/groups, k...)            output channel o = g * Cout_g + j, j = dim 1
#   Linear                 weight (out_features, in_features)         output channel = weight dim 0
# (a Linear's output channel is BatchNorm1d's channel only for 2-D (N, C) outputs; for 3-D (N, C, L) inputs
# BatchNorm1d normalises dim 1, which is not a weight axis: modules apply scale/shift to the output instead).

def is_conv_transpose(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.conv._ConvTransposeNd)


def _check_layer(layer: nn.Module, name: str = "layer") -> None:
    if not isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
        raise TypeError(f"{name}: expected nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d or nn.Linear, "
                        f"got {type(layer).__name__}")


def out_channels(layer: nn.Module) -> int:
    """The number of output channels (features) of a conv, transposed conv or linear layer."""
    _check_layer(layer)
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def in_channels(layer: nn.Module) -> int:
    """The number of input channels (features) of a conv, transposed conv or linear layer."""
    _check_layer(layer)
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def layer_bn_scale_shift(layer: nn.Module, bn: nn.Module | None,
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of `bn(layer(x))` relative to the bias-free layer, for any conv, transposed conv or linear
    layer; bn=None gives (1, layer bias or 0)."""
    _check_layer(layer)
    cout = out_channels(layer)
    if bn is not None:
        check_foldable(bn)
    if bn is None:
        dev = layer.weight.device
        shift = torch.zeros(cout, dtype=dtype, device=dev) if layer.bias is None else layer.bias.detach().to(dtype)
        return torch.ones(cout, dtype=dtype, device=dev), shift
    nf = bn.running_mean.numel()
    if nf != cout:
        raise ValueError(f"bn: expected {cout} features to match the {type(layer).__name__}'s output channels, "
                         f"got {nf}")
    return fold_bn(bn, layer.bias, dtype)


def _scale_weight_out(weight: torch.Tensor, scale: torch.Tensor, transposed: bool, groups: int) -> torch.Tensor:
    """weight * scale along its output-channel axis, in float64 (see the table above)."""
    w = weight.detach().to(torch.float64)
    s = scale.to(torch.float64)
    if not transposed:
        return w * s.view((-1,) + (1,) * (w.dim() - 1))
    cin, cout_g = w.shape[0], w.shape[1]
    grouped = w.reshape(groups, cin // groups, cout_g, *w.shape[2:])
    scaled = grouped * s.view(groups, 1, cout_g, *([1] * (w.dim() - 2)))
    return scaled.reshape(w.shape)


def _checked_cast(folded: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor):
    folded, bias = folded.to(dtype), bias.to(dtype)
    for name, t in (("layer weight", folded), ("layer bias", bias)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected the folded values to fit {dtype}, got {int((~torch.isfinite(t)).sum())} "
                             f"that overflow (max |scale| = {float(scale.abs().max()):.3g}); fold in float32 instead")
    return folded, bias


def fold_layer_bn_weights(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one layer of the same kind equal to `bn(layer(x))`, in the layer's dtype
    (computed in float64). For a Linear this is BatchNorm1d on its 2-D (N, out_features) output."""
    scale, shift = layer_bn_scale_shift(layer, bn, dtype=torch.float64)
    groups = getattr(layer, "groups", 1)
    folded = _scale_weight_out(layer.weight, scale, is_conv_transpose(layer), groups)
    return _checked_cast(folded, shift, layer.weight.dtype, scale)


def post_affine(bn: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a BatchNorm applied to an activation's output: `bn(a) = a * scale + shift`, the last step
    of a fused epilogue act(conv(x) * s1 + t1) * scale + shift."""
    return fold_bn(bn, None, dtype)


def bn_before_reason(bn: nn.Module, layer: nn.Module) -> str | None:
    """Why `layer(bn(x))` cannot be folded into one `layer` exactly, or None when it can.

    bn(x) = x * s + t per input channel. The scale always folds into the weight's input axis; the shift t
    becomes a constant input whose layer output is a per-output-channel bias only when every output sees every
    tap on real input: no zero padding (zeros padded *after* the BN are 0, not t), and never for a transposed
    conv (its border and stride-phase outputs receive different numbers of taps). Reflect / replicate / circular
    padding commutes with a per-channel affine, so it is exact.
    """
    try:
        _check_layer(layer)
        check_foldable(bn)
    except (TypeError, RuntimeError, ValueError) as e:
        return str(e)
    if is_conv_transpose(layer):
        return "a BatchNorm before a transposed conv does not fold into it (border outputs see fewer taps of its shift)"
    if bn.running_mean.numel() != in_channels(layer):
        return (f"BatchNorm has {bn.running_mean.numel()} features, {type(layer).__name__} has "
                f"{in_channels(layer)} input channels")
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer.padding, str):
        padded = layer.padding != "valid" and any(d * (k - 1) > 0 for k, d in zip(layer.kernel_size, layer.dilation))
    else:
        padded = any(p != 0 for p in layer.padding)
    if padded and layer.padding_mode == "zeros":
        return ("a BatchNorm before a zero-padded conv does not fold into it exactly (the padded zeros would have "
                "to be BN's shift); fold it only with padding 0 or a 1x1 conv")
    return None


def fold_bn_into_next(bn: nn.Module, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one layer equal to `layer(bn(x))` (conv with no zero padding, or a linear on 2-D
    (N, C) input), in the layer's dtype; raises ValueError with `bn_before_reason` when that is not exact."""
    reason = bn_before_reason(bn, layer)
    if reason is not None:
        raise ValueError(f"bn: cannot fold into the following {type(layer).__name__}: {reason}")
    s, t = fold_bn(bn, None, torch.float64)
    w = layer.weight.detach().to(torch.float64)
    groups = getattr(layer, "groups", 1)
    cout, cin_g = w.shape[0], w.shape[1]
    # Input channel of weight[o, i] is (o // (cout / groups)) * cin_g + i.
    gw = w.reshape(groups, cout // groups, cin_g, *w.shape[2:])
    s_g = s.view(groups, 1, cin_g, *([1] * (w.dim() - 2)))
    t_g = t.view(groups, 1, cin_g, *([1] * (w.dim() - 2)))
    folded = (gw * s_g).reshape(w.shape)
    extra = (gw * t_g).sum(dim=tuple(range(2, gw.dim()))).reshape(cout)
    bias = extra if layer.bias is None else layer.bias.detach().to(torch.float64) + extra
    return _checked_cast(folded, bias, layer.weight.dtype, s)
