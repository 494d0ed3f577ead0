"""Stand-ins that compute what a block's original children computed, from the fused module that replaced them.

A rewritten block keeps its own forward as the exact fallback for calls its traced graphs do not cover. That
forward calls its children by name, but some children were changed by the rewrite (the conv is now a
FusedConv2d with BN folded in, the BN an nn.Identity, an absorbed FusedConv2d carries the activation). For the
fallback those names are bound to role modules that behave like the originals in isolation:
  * ConvRole: the layer alone (`conv(x, weight) + conv bias`; a Conv1d / Conv3d / transposed conv / linear layer
    for the other members of the fused family);
  * BNRole: the folded BatchNorm alone (`y * scale + bn_shift`, bn_shift = shift - scale * conv bias; FusedLinear
    keeps its bias apart from the shift, so there bn_shift = shift), and the activation of a norm-act BN (timm's
    BatchNormAct2d) with it;
  * AffineRole: a fused module as it was before an activation / residual joined its epilogue.
They read the FusedConv2d's live tensors, so `.to()`, `.half()` and `load_state_dict` on the converted model
keep them consistent. The conv's own bias (usually None before a BN) is kept at convert time.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedconv.activations import ActivationSpec
from fusedconv.fused_layers import FusedAffineLayer, FusedConvNd
from fusedconv.fused_linear import FusedLinear
from fusedconv.fused_mixed import FusedMixedConv2d
from fusedconv.graph.private_residual import hooked
from fusedconv.modules import FusedConv2d


def _channel(t: torch.Tensor, like: torch.Tensor, fused: nn.Module) -> torch.Tensor:
    """A per-channel vector in like's dtype, shaped to broadcast over (N, C, H, W) or unbatched (C, H, W) for a
    FusedConv2d, and over dim 1 for the N-d family (where BatchNorm1d/3d normalise, for every input rank)."""
    t = t.to(device=like.device, dtype=like.dtype)
    return t.view(fused._channel_view(like)) if isinstance(fused, FusedAffineLayer) else t.view(-1, 1, 1)


def _close(now: torch.Tensor, then: torch.Tensor) -> bool:
    """`now` holds the values `then` held, up to a few roundings of `now`'s dtype (a `.half()` or `.double()` of the
    converted model keeps them; an edit does not)."""
    then = then.to(device=now.device, dtype=now.dtype)
    eps = torch.finfo(now.dtype).eps if now.is_floating_point() else 0.0
    atol = 4 * eps * float(then.abs().max()) if then.numel() else 0.0
    return bool(torch.allclose(now, then, rtol=4 * eps, atol=atol))


class _Role(nn.Module):
    """Holds the FusedConv2d by plain reference (not as a child: a role is never part of the model's tree).

    `pinned`: (fused module, message) for fused copies of a BN whose state the fallback cannot reproduce from them
    (a BN folded into several convs; a functional F.batch_norm whose tensors stay in the block): their scale and
    shift as convert made them. Edited after convert, the fused calls use them but the block's own forward could not,
    so the fallback raises the message instead of computing something else (`_check_pinned`)."""

    def __init__(self, fused: FusedConv2d, conv_bias: torch.Tensor | None = None, pinned: tuple = ()):
        super().__init__()
        self.__dict__["fused"] = fused
        self.__dict__["conv_bias"] = None if conv_bias is None else conv_bias.detach().clone()
        self.__dict__["pinned"] = tuple((f, message, f.scale.detach().clone(), f.shift.detach().clone())
                                        for f, message in pinned)

    def _check_pinned(self) -> None:
        for f, message, scale, shift in self.__dict__.get("pinned", ()):
            if not (_close(f.scale, scale) and _close(f.shift, shift)):
                raise RuntimeError(message)

    def _bias(self, like: torch.Tensor) -> torch.Tensor | None:
        b = self.__dict__["conv_bias"]
        return None if b is None else b.to(device=like.device, dtype=like.dtype)

    def _conv(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer alone with the role's bias (`bias` when given): unscaled weight, no epilogue."""
        f = self.__dict__["fused"]
        if isinstance(f, FusedMixedConv2d):  # its groups' convs on the split input, concatenated (no biases)
            parts = torch.split(x, f.splits, 1)
            return torch.cat([_Role(c)._conv(parts[i]) for i, c in enumerate(f._modules.values())], 1)
        bias = self._bias(x) if bias is None else bias.to(device=x.device, dtype=x.dtype)
        w = f.weight.to(x.dtype)
        if isinstance(f, FusedLinear):
            return F.linear(x, w, bias)
        if isinstance(f, FusedAffineLayer) and not isinstance(f, FusedConvNd):  # transposed convs
            return f._layer(x, w, bias)
        x, padding = f._pad_input(x)
        if isinstance(f, FusedConvNd):
            return f._layer(x, w, bias, padding)
        return F.conv2d(x, w, bias, f.stride, padding, f.dilation, f.groups)


class ConvRole(_Role):
    """The original nn.Conv2d: conv(x, weight) (+ its bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_pinned()
        return self._conv(x)


class BNRole(_Role):
    """The original eval-mode BatchNorm: y * scale + (shift - scale * conv bias), then `act` for a norm-act module
    (timm's BatchNormAct2d applies its activation itself: the fused module's epilogue took it over)."""

    def __init__(self, fused: FusedConv2d, conv_bias: torch.Tensor | None = None, act: ActivationSpec | None = None,
                 pinned: tuple = ()):
        super().__init__(fused, conv_bias, pinned)
        self.__dict__["act"] = None if act is None or act.is_identity else act

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_pinned()
        f = self.__dict__["fused"]
        shift = f.shift
        b = self.__dict__["conv_bias"]
        if b is not None and not isinstance(f, FusedLinear):
            shift = shift - f.scale * b.to(device=shift.device, dtype=shift.dtype)
        out = y * _channel(f.scale, y, f) + _channel(shift, y, f)
        act = self.__dict__["act"]
        return out if act is None else act.apply(out)


class AffineRole(_Role):
    """A fused module before an activation or residual joined it: conv(x) * scale + shift (FusedLinear:
    linear(x) with its own bias, then * scale + shift)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.__dict__["fused"]
        y = self._conv(x, f.bias if isinstance(f, FusedLinear) else None)
        return y * _channel(f.scale, y, f) + _channel(f.shift, y, f)


# The dicts nn.Module's call reads its hooks from.
_HOOK_STATE = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _with_hooks(role, installed: nn.Module):
    """`role`, or for an nn.Identity stand-in that user code hooked after convert (the BN or activation it stands
    for is what the hook meant to see: the block's guard sent the call here, graph/scope_rewrite.py), a copy of the
    role carrying those hooks."""
    if type(installed) is not nn.Identity or not isinstance(role, nn.Module) or not hooked(installed):
        return role
    copy = object.__new__(type(role))
    copy.__dict__.update(role.__dict__)
    copy.__dict__.update({k: installed.__dict__[k] for k in _HOOK_STATE if k in installed.__dict__})
    return copy


def substitute(modules: dict, path: str, installed: nn.Module, role) -> None:
    """Bind dotted `path` (relative to the dict `modules` of a block's children) to `role` when it still holds
    `installed`; containers on the way are shallow-copied so the block's own tree is never changed."""
    head, _, rest = path.partition(".")
    current = modules.get(head)
    if not rest:
        if current is installed:
            modules[head] = _with_hooks(role, installed)
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
