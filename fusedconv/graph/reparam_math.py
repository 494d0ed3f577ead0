"""Kernel algebra for structural re-parameterization: every linear branch as one conv, in float64.

A `ConvMap` is the exact description of a linear (affine) map from a branch's input to its output as a single
2-d convolution: `y = conv2d(x, weight, stride, padding, dilation, groups) + bias`. Branch pieces (a conv, an
eval BatchNorm, an average pool, a scalar factor, the identity) each become a ConvMap or modify one; a sequence
of pieces composes into one ConvMap when that is exact (including at the borders), and a sum of ConvMaps over
the same input merges into one when their strides, output sizes and kernel centres line up.

Everything here is float64 tensor math: no modules, no graphs. Whatever cannot be done exactly raises
`NotMergeable` with the reason, which ends up in the conversion report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

F64 = torch.float64


class NotMergeable(Exception):
    """The branches cannot be merged into one conv exactly; the message says why."""


def as_pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass
class ConvMap:
    """y = conv2d(x, weight, None, stride, padding, dilation, groups) + bias, with float64 weight and bias."""

    weight: torch.Tensor  # (out_channels, in_channels // groups, KH, KW), float64
    bias: torch.Tensor  # (out_channels,), float64
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    is_identity: bool = False  # exactly y = x (lets composition skip a no-op without comparing tensors)

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.weight.shape[2], self.weight.shape[3])

    @property
    def is_pointwise(self) -> bool:
        return self.kernel_size == (1, 1)

    def span_offset(self) -> tuple[int, int]:
        """2p - d(k-1) per dimension: two maps with the same stride give the same output size for every input
        size exactly when this matches (and, for centred kernels, then their centres line up too)."""
        return tuple(2 * p - d * (k - 1) for p, d, k in zip(self.padding, self.dilation, self.kernel_size))

    def describe(self) -> str:
        kh, kw = self.kernel_size
        s = f"{kh}x{kw}"
        if self.stride != (1, 1):
            s += f"/s{self.stride[0]}" if self.stride[0] == self.stride[1] else f"/s{self.stride}"
        if self.groups != 1:
            s += f"/g{self.groups}"
        return s


def identity_map(channels: int, device=None) -> ConvMap:
    """y = x as a depthwise 1x1 conv with unit weights."""
    return ConvMap(torch.ones(channels, 1, 1, 1, dtype=F64, device=device),
                   torch.zeros(channels, dtype=F64, device=device), groups=channels, is_identity=True)


def conv_map(conv: nn.Conv2d) -> ConvMap:
    """The ConvMap of an nn.Conv2d (zero padding only; 'same'/'valid' resolved when symmetric)."""
    if conv.padding_mode != "zeros":
        raise NotMergeable(f"conv uses padding_mode={conv.padding_mode!r}; only zero padding is linear-mergeable")
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:
            totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
            if any(t % 2 for t in totals):
                raise NotMergeable("conv padding='same' would need asymmetric padding")
            padding = tuple(t // 2 for t in totals)
    w = conv.weight.detach().to(F64)
    b = (torch.zeros(w.shape[0], dtype=F64, device=w.device) if conv.bias is None
         else conv.bias.detach().to(F64))
    return ConvMap(w, b, as_pair(conv.stride), as_pair(padding), as_pair(conv.dilation), conv.groups)


def avg_pool_map(pool: nn.AvgPool2d, channels: int, device=None) -> ConvMap:
    """An nn.AvgPool2d over `channels` channels as a depthwise conv with constant weights."""
    k = as_pair(pool.kernel_size)
    stride = as_pair(pool.stride if pool.stride not in (None, ()) else pool.kernel_size)
    padding = as_pair(pool.padding)
    if pool.ceil_mode:
        raise NotMergeable("AvgPool2d(ceil_mode=True) has partial windows at the border; not a fixed conv")
    if not pool.count_include_pad and padding != (0, 0):
        raise NotMergeable("AvgPool2d(count_include_pad=False) with padding divides border windows by fewer "
                           "elements; not a fixed conv")
    divisor = pool.divisor_override or k[0] * k[1]
    w = torch.full((channels, 1, k[0], k[1]), 1.0 / divisor, dtype=F64, device=device)
    return ConvMap(w, torch.zeros(channels, dtype=F64, device=device), stride, padding, (1, 1), channels)


def scale_shift(m: ConvMap, scale: torch.Tensor, shift: torch.Tensor | None = None) -> ConvMap:
    """Per-output-channel affine map after `m`: y * scale + shift (scale/shift broadcast to out_channels)."""
    c = m.out_channels
    scale = scale.detach().to(device=m.weight.device, dtype=F64).reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(c)
    if scale.numel() != c:
        raise NotMergeable(f"per-channel factor has {scale.numel()} values, the branch has {c} channels")
    shift = (torch.zeros(c, dtype=F64, device=m.weight.device) if shift is None
             else shift.detach().to(device=m.weight.device, dtype=F64).reshape(-1))
    if shift.numel() == 1:
        shift = shift.expand(c)
    if shift.numel() != c:
        raise NotMergeable(f"per-channel offset has {shift.numel()} values, the branch has {c} channels")
    return ConvMap(m.weight * scale.view(-1, 1, 1, 1), m.bias * scale + shift, m.stride, m.padding, m.dilation,
                   m.groups)


def regroup(weight: torch.Tensor, groups_from: int, groups_to: int) -> torch.Tensor:
    """Rewrite a grouped conv weight for fewer groups (`groups_to` divides `groups_from`): each new group holds
    several old ones, block-diagonally, with zeros between them."""
    if groups_from == groups_to:
        return weight
    if groups_from % groups_to:
        raise ValueError(f"groups_to: expected a divisor of {groups_from}, got {groups_to}")
    cout, cin_g, kh, kw = weight.shape
    r = groups_from // groups_to  # old groups per new group
    opg = cout // groups_from  # output channels per old group
    out = weight.new_zeros(groups_to, r, opg, r, cin_g, kh, kw)
    # Old group (t, a) sits at rows a and input block a of new group t: the diagonal over the two `r` axes.
    diag = out.diagonal(dim1=1, dim2=3)  # (groups_to, opg, cin_g, kh, kw, r), a view
    diag.copy_(weight.view(groups_to, r, opg, cin_g, kh, kw).permute(0, 2, 3, 4, 5, 1))
    return out.reshape(cout, r * cin_g, kh, kw)


def compose(first: ConvMap, second: ConvMap) -> ConvMap:
    """The ConvMap of `second(first(x))`, exact including borders, or NotMergeable.

    Supported: either side the identity; a stride-1 pointwise `first` (its padding becomes the result's, and
    zero padding in `second` is exact only when `first` has no bias); a pointwise, unpadded `second`.
    """
    if first.is_identity:
        if second.in_channels != first.out_channels:
            raise NotMergeable(f"expects {second.in_channels} input channels, gets {first.out_channels}")
        return second
    if second.is_identity:
        return first
    if second.in_channels != first.out_channels:
        raise NotMergeable(f"expects {second.in_channels} input channels, gets {first.out_channels}")
    g = math.gcd(first.groups, second.groups)
    c0, c1, c2 = first.in_channels, first.out_channels, second.out_channels
    a = regroup(first.weight, first.groups, g).reshape(g, c1 // g, c0 // g, *first.kernel_size)
    b = regroup(second.weight, second.groups, g).reshape(g, c2 // g, c1 // g, *second.kernel_size)
    # second's weight summed over its window, applied to first's constant bias (the interior value of first).
    bias = torch.einsum("gomhw,gm->go", b, first.bias.view(g, c1 // g)).reshape(c2) + second.bias
    if first.is_pointwise and first.stride == (1, 1):
        if second.padding != (0, 0) and bool((first.bias != 0).any()):
            raise NotMergeable("a pointwise conv with bias followed by a zero-padded kxk conv: the padded border "
                               "would see 0 instead of the bias (pad the pointwise conv instead, as DBB does)")
        w = torch.einsum("gomhw,gmi->goihw", b, a[..., 0, 0]).reshape(c2, c0 // g, *second.kernel_size)
        padding = (first.padding[0] + second.padding[0], first.padding[1] + second.padding[1])
        return ConvMap(w, bias, second.stride, padding, second.dilation, g)
    if second.is_pointwise and second.padding == (0, 0):
        w = torch.einsum("gom,gmihw->goihw", b[..., 0, 0], a).reshape(c2, c0 // g, *first.kernel_size)
        stride = (first.stride[0] * second.stride[0], first.stride[1] * second.stride[1])
        return ConvMap(w, bias, stride, first.padding, first.dilation, g)
    raise NotMergeable(f"composing a {first.describe()} conv with a {second.describe()} conv (both spatial) is "
                       "not supported")


def merge_sum(maps: list[ConvMap]) -> ConvMap:
    """One ConvMap equal to the sum of `maps` (all over the same input), or NotMergeable with the reason."""
    if not maps:
        raise ValueError("maps: expected at least one ConvMap, got none")
    first = maps[0]
    for m in maps[1:]:
        if m.in_channels != first.in_channels or m.out_channels != first.out_channels:
            raise NotMergeable(f"branch channels differ: {first.in_channels}->{first.out_channels} vs "
                               f"{m.in_channels}->{m.out_channels}")
        if m.stride != first.stride:
            # An identity branch against a strided conv has a different output size: not ours to fix.
            raise NotMergeable(f"branch strides differ: {first.stride} vs {m.stride}")
        if m.span_offset() != first.span_offset():
            raise NotMergeable(f"branch centres / output sizes do not line up: {first.describe()} padding "
                               f"{first.padding} vs {m.describe()} padding {m.padding}")
    dilation = []
    for dim in range(2):
        spatial = {m.dilation[dim] for m in maps if m.kernel_size[dim] > 1}
        if len(spatial) > 1:
            raise NotMergeable(f"branch dilations differ: {sorted(spatial)}")
        dilation.append(spatial.pop() if spatial else 1)
    reach = [max(m.dilation[d] * (m.kernel_size[d] - 1) if m.kernel_size[d] > 1 else 0 for m in maps)
             for d in range(2)]
    ksize = tuple(reach[d] // dilation[d] + 1 for d in range(2))
    offset = first.span_offset()
    padding = tuple((offset[d] + reach[d]) // 2 for d in range(2))
    groups = 0
    for m in maps:
        groups = math.gcd(groups, m.groups)
    weight = torch.zeros(first.out_channels, first.in_channels // groups, *ksize, dtype=F64,
                         device=first.weight.device)
    bias = torch.zeros(first.out_channels, dtype=F64, device=first.weight.device)
    for m in maps:
        w = regroup(m.weight, m.groups, groups)
        start = []
        for d in range(2):
            # Where this kernel's first tap lands in the merged kernel, in merged-kernel steps.
            shift = padding[d] - m.padding[d]
            if shift % dilation[d] or (m.kernel_size[d] > 1 and m.dilation[d] != dilation[d]):
                raise NotMergeable(f"a {m.describe()} branch does not land on the merged {ksize} kernel's grid")
            start.append(shift // dilation[d])
        if start[0] < 0 or start[1] < 0 or start[0] + m.kernel_size[0] > ksize[0] or \
                start[1] + m.kernel_size[1] > ksize[1]:
            raise NotMergeable(f"a {m.describe()} branch does not fit inside the merged {ksize} kernel")
        weight[:, :, start[0]:start[0] + m.kernel_size[0], start[1]:start[1] + m.kernel_size[1]] += w
        bias += m.bias
    return ConvMap(weight, bias, first.stride, padding, tuple(dilation), groups)


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, stride, padding, dilation,
                   groups: int) -> torch.Tensor:
    """F.conv2d computed as unfold + one batched matmul over the groups.

    Same result as F.conv2d; used for the float64 self-check, where PyTorch's CPU float64 conv loops over the
    groups one by one (a depthwise conv with 1024 channels takes ~0.1 s even on a 5x5 input).
    """
    n, _, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, Cin*kh*kw, L)
    cols = cols.view(n, groups, cin_g * kh * kw, -1)
    out = torch.einsum("gok,ngkl->ngol", weight.reshape(groups, cout // groups, cin_g * kh * kw), cols)
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = out.reshape(n, cout, oh, ow)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def apply_map(m: ConvMap, x: torch.Tensor) -> torch.Tensor:
    """Run a ConvMap (used by the merge self-check, in float64)."""
    return grouped_conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def to_conv2d(m: ConvMap, dtype: torch.dtype, device) -> nn.Conv2d:
    """An nn.Conv2d with bias holding `m` in `dtype` on `device` (eval mode, no grad needed for inference)."""
    # skip_init: the random initialisation would be overwritten anyway (and costs seconds on big models).
    conv = nn.utils.skip_init(nn.Conv2d, m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                              padding=m.padding, dilation=m.dilation, groups=m.groups, bias=True, device=device,
                              dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(m.weight.to(dtype))
        conv.bias.copy_(m.bias.to(dtype))
    return conv
