"""A BatchNorm (and activation) after timm's MixedConv2d, folded into the convs of its channel groups.

timm's MixedConv2d (MixNet, MixConv) splits its input by channels, runs one conv per group (each its own kernel
size) and concatenates the outputs; a BatchNorm, usually with an activation (timm's BatchNormAct2d), follows it.
Both are per-channel, so BN + act over the concatenation equals, per group, BN + act over that group's output
channels: each group's conv becomes a FusedConv2d with its slice of the BatchNorm folded in and the activation in
its epilogue, and `FusedMixedConv2d` splits, calls them and concatenates as the original did.

Which MixedConv2d modules qualify (`mixed_conv_reason`): timm's class (the exact class object its module
exports), every group a conv FusedConv2d fuses
(nn.Conv2d or a recognised padding conv) without a bias and without hooks, `splits` matching the groups' input
channels, and a probe on a small float64 input showing that the module's forward computes exactly the
concatenation of its groups' outputs on the split input (a patched or subclassed forward fails it). A residual
add after the BatchNorm is not folded (the chain stops before it). The graph passes decide where a chain may be
fused (fusedconv/graph/chain_match.py, base `MixedConv2dKind`).

state_dict: each group keeps its conv's key (`conv_dw.0.weight`, unchanged) and adds its `scale` / `shift`, as
every fused conv does; the BatchNorm's keys are gone.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn as nn

from fusedconv import fold
from fusedconv.activations import as_spec
from fusedconv.modules import FusedConv2d, _epilogue_dtype


class MixedConv2dKind:
    """The layer kind of a chain that starts at a timm MixedConv2d (graph passes: `Chain.base`); never instantiated."""


def is_mixed_conv2d(module: nn.Module) -> bool:
    """timm's MixedConv2d: the exact class object timm's module exports (a subclass or a look-alike of the same name
    is not assumed); whether it qualifies is `mixed_conv_reason`."""
    t = type(module)
    if t.__name__ != "MixedConv2d" or not (t.__module__ or "").startswith("timm."):
        return False
    return getattr(sys.modules.get(t.__module__), "MixedConv2d", None) is t


def mixed_conv_reason(module: nn.Module) -> str | None:
    """Why `module` is not a MixedConv2d whose groups FusedMixedConv2d can fold a BatchNorm into; None when it is
    (see the module docstring; each group's conv must also be one FusedConv2d.from_modules accepts, and the graph
    passes refuse groups with hooks, fusedconv/graph/legality.py)."""
    convs = list(module._modules.values())
    splits = module.__dict__.get("splits")
    if not convs or not isinstance(splits, (list, tuple)) or len(splits) != len(convs):
        return "MixedConv2d: expected one conv per entry of `splits`"
    for i, (c, s) in enumerate(zip(convs, splits)):
        if not isinstance(c, nn.Conv2d):
            return f"MixedConv2d group {i} is a {type(c).__name__}, not a Conv2d"
        if c.bias is not None:
            return f"MixedConv2d group {i} has a bias"
        if type(s) is not int or c.in_channels != s:
            return f"MixedConv2d group {i}: split of {s!r} channels, its conv takes {c.in_channels}"
        if not c.weight.is_floating_point():
            return f"MixedConv2d group {i}: weight has dtype {c.weight.dtype}"
    return _probe(module, convs, list(splits))


def _probe(module: nn.Module, convs: list, splits: list) -> str | None:
    """The module's forward on a small float64 input equals the concatenation of its groups on the split input."""
    try:
        twin = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
        size = max(max(c.kernel_size) * max(c.dilation) for c in convs) + 2 * max(max(c.stride) for c in convs) + 1
        x = torch.randn(2, sum(splits), size, size + 1, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = twin(x)
            parts = torch.split(x, splits, 1)
            want = torch.cat([c(parts[i]) for i, c in enumerate(twin._modules.values())], 1)
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: not the computation assumed
        return f"MixedConv2d: probe failed ({type(e).__name__})"
    if type(got) is not torch.Tensor or got.shape != want.shape or not torch.equal(got, want):
        return "MixedConv2d: its forward does not compute the concatenation of its groups' outputs"
    return None


def out_channels(module: nn.Module) -> int:
    return sum(c.out_channels for c in module._modules.values())


class FusedMixedConv2d(nn.Module):
    """act(bn(MixedConv2d(x))) as one FusedConv2d per channel group: split, fused convs, concatenate.

    Children "0", "1", ... are the groups' FusedConv2d (the names of the MixedConv2d's convs); `splits` the input
    channels per group. `scale` / `shift` are the groups' ones, concatenated (what the folded BatchNorm computed per
    output channel)."""

    def __init__(self, convs: list[FusedConv2d], splits: list[int]):
        super().__init__()
        if len(convs) != len(splits) or not convs:
            raise ValueError(f"convs: expected one FusedConv2d per split, got {len(convs)} for splits {splits}")
        for i, c in enumerate(convs):
            if type(c) is not FusedConv2d:
                raise TypeError(f"convs[{i}]: expected FusedConv2d, got {type(c).__name__}")
            self.add_module(str(i), c)
        self.splits = [int(s) for s in splits]

    @classmethod
    def from_modules(cls, mixed: nn.Module, bn: nn.Module, act=None) -> "FusedMixedConv2d":
        """Fold `bn` (and `act`) after the timm MixedConv2d `mixed` into its groups (`mixed_conv_reason` must
        hold; raises ValueError / TypeError otherwise). The source modules are not modified."""
        if not is_mixed_conv2d(mixed):
            raise TypeError(f"mixed: expected timm's MixedConv2d, got {type(mixed).__name__}")
        reason = mixed_conv_reason(mixed)
        if reason is not None:
            raise ValueError(reason)
        act = as_spec(act)
        convs = list(mixed._modules.values())
        total = out_channels(mixed)
        fold.check_foldable(bn)
        nf = bn.running_mean.numel() if getattr(bn, "running_mean", None) is not None else None
        if nf != total:
            raise ValueError(f"bn: expected {total} features to match the MixedConv2d's output channels, got {nf}")
        scale, shift = fold.fold_bn(bn, None, dtype=torch.float64)
        fused, start = [], 0
        for c in convs:
            end = start + c.out_channels
            plain = FusedConv2d.from_modules(c, None, act)  # resolves padding='same', a padding conv's pre-pad
            epi = _epilogue_dtype(c.weight.dtype)
            fused.append(FusedConv2d(c.weight, scale[start:end].to(epi), shift[start:end].to(epi),
                                     stride=plain.stride, padding=plain.padding, dilation=plain.dilation,
                                     groups=plain.groups, padding_mode=plain.padding_mode, activation=act,
                                     pre_pad=plain.pre_pad))
            start = end
        return cls(fused, list(mixed.splits))

    @property
    def scale(self) -> torch.Tensor:
        return torch.cat([c.scale for c in self._modules.values()])

    @property
    def shift(self) -> torch.Tensor:
        return torch.cat([c.shift for c in self._modules.values()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return torch.cat([c(parts[i]) for i, c in enumerate(self._modules.values())], 1)

    def extra_repr(self) -> str:
        return f"splits={self.splits}"
