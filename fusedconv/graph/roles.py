"""Stand-ins that compute what a block's original children computed, from the fused module that replaced them.

A rewritten block keeps its own forward as the exact fallback for calls its traced graphs do not cover. That
forward calls its children by name, but some children were changed by the rewrite (the conv is now a
FusedConv2d with BN folded in, the BN an nn.Identity, an absorbed FusedConv2d carries the activation). For the
fallback those names are bound to role modules that behave like the originals in isolation:
  * ConvRole: the convolution alone (`conv(x, weight) + conv bias`);
  * BNRole: the folded BatchNorm alone (`y * scale + bn_shift`, bn_shift = shift - scale * conv bias);
  * AffineRole: a FusedConv2d as it was before an activation / residual joined its epilogue.
They read the FusedConv2d's live tensors, so `.to()`, `.half()` and `load_state_dict` on the converted model
keep them consistent. The conv's own bias (usually None before a BN) is kept at convert time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedconv.modules import FusedConv2d


def _channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over (N, C, H, W) or unbatched (C, H, W), in like's dtype."""
    return t.to(device=like.device, dtype=like.dtype).view(-1, 1, 1)


class _Role(nn.Module):
    """Holds the FusedConv2d by plain reference (not as a child: a role is never part of the model's tree)."""

    def __init__(self, fused: FusedConv2d, conv_bias: torch.Tensor | None = None):
        super().__init__()
        self.__dict__["fused"] = fused
        self.__dict__["conv_bias"] = None if conv_bias is None else conv_bias.detach().clone()

    def _bias(self, like: torch.Tensor) -> torch.Tensor | None:
        b = self.__dict__["conv_bias"]
        return None if b is None else b.to(device=like.device, dtype=like.dtype)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        f = self.__dict__["fused"]
        x, padding = f._pad_input(x)
        w = f.weight.to(x.dtype)
        return F.conv2d(x, w, self._bias(x), f.stride, padding, f.dilation, f.groups)


class ConvRole(_Role):
    """The original nn.Conv2d: conv(x, weight) (+ its bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x)


class BNRole(_Role):
    """The original eval-mode BatchNorm: y * scale + (shift - scale * conv bias)."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        f = self.__dict__["fused"]
        shift = f.shift
        b = self.__dict__["conv_bias"]
        if b is not None:
            shift = shift - f.scale * b.to(device=shift.device, dtype=shift.dtype)
        return y * _channel(f.scale, y) + _channel(shift, y)


class AffineRole(_Role):
    """A FusedConv2d before an activation or residual joined it: conv(x) * scale + shift."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.__dict__["fused"]
        y = self._conv(x)
        return y * _channel(f.scale, y) + _channel(f.shift, y)


def substitute(modules: dict, path: str, installed: nn.Module, role) -> None:
    """Bind dotted `path` (relative to the dict `modules` of a block's children) to `role` when it still holds
    `installed`; containers on the way are shallow-copied so the block's own tree is never changed."""
    head, _, rest = path.partition(".")
    current = modules.get(head)
    if not rest:
        if current is installed:
            modules[head] = role
        return
    if current is None:
        return
    if not current.__dict__.get("_fusedconv_role_copy", False):
        copy = object.__new__(type(current))
        copy.__dict__.update(current.__dict__)
        copy.__dict__["_modules"] = dict(current.__dict__["_modules"])
        copy.__dict__["_fusedconv_role_copy"] = True
        modules[head] = copy
        current = copy
    substitute(current.__dict__["_modules"], rest, installed, role)
