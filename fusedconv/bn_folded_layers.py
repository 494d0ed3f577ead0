"""Layers that absorbed the BatchNorm right before them, for the input ranks where that fold is exact.

`fold.fold_bn_into_next` turns `layer(bn(x))` into one layer when the BN's per-channel affine reaches every
output tap (no zero padding). For Conv2d / Conv3d the result is a plain nn.Conv2d / nn.Conv3d: BatchNorm2d/3d
refuse the unbatched input those convs also accept, so no input exists on which the two differ. BatchNorm1d
reads a 2-d tensor as (N, C) and a 3-d one as (N, C, L), so its channel axis depends on the input's rank:
  * before a Conv1d it is the conv's input channel only for a batched (N, C, L) input — on an unbatched (C, L)
    input the original BN normalises the length (and runs whenever L equals its feature count);
  * before a Linear it is the Linear's input feature only for a 2-d (N, C) input — on (N, C, L) the Linear
    contracts L while the BN scaled C.
The two classes below are that Conv1d / Linear with the fold, refusing (ValueError naming the input) the rank
on which the original computed something else, instead of silently computing another function.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BNFoldedConv1d(nn.Conv1d):
    """nn.Conv1d holding `conv(bn(x))`; only a batched (N, C, L) input has the original's meaning.

    `computes_as`: on every input it accepts it is exactly nn.Conv1d, so a following BN may fuse it into a
    FusedConv1d, which refuses unbatched input as well."""

    computes_as = nn.Conv1d

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 3:
            raise ValueError(f"input: this Conv1d absorbed the BatchNorm1d before it, which normalises dim 1 of a "
                             f"batched (N, C, L) input only; expected a 3-d tensor, got shape {tuple(input.shape)}")
        return super().forward(input)


class BNFoldedLinear(nn.Linear):
    """nn.Linear holding `linear(bn(x))`; only a 2-d (N, C) input has the original's meaning."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 2:
            raise ValueError(f"input: this Linear absorbed the BatchNorm1d before it, which normalises its input "
                             f"features only on a 2-d (N, C) input; expected a 2-d tensor, got shape "
                             f"{tuple(input.shape)}")
        return super().forward(input)


# The classes above: torch.nn layers with an input check, no user code (the flat forward calls them as leaves).
BN_FOLDED_LAYERS = (BNFoldedConv1d, BNFoldedLinear)

FOLDED_CLASS = {nn.Conv1d: BNFoldedConv1d, nn.Conv2d: nn.Conv2d, nn.Conv3d: nn.Conv3d, nn.Linear: BNFoldedLinear}


@torch.no_grad()
def folded_copy(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A new layer of the folded class with `layer`'s geometry and the given weight and bias."""
    base = type(layer)
    cls = FOLDED_CLASS[base]
    dd = {"device": weight.device, "dtype": weight.dtype}
    if base is nn.Linear:
        new = cls(layer.in_features, layer.out_features, bias=True, **dd)
    else:
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                  padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=True,
                  padding_mode=layer.padding_mode, **dd)
    new.weight.copy_(weight)
    new.bias.copy_(bias)
    return new.train(layer.training)
