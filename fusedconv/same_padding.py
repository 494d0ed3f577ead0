"""Convs that zero-pad their input in forward, then convolve (TensorFlow "SAME" padding): which ones, and how.

Model libraries port TensorFlow models with Conv2d subclasses that pad inside forward: timm's `Conv2dSame`
(tf_* models) and efficientnet_pytorch's `Conv2dDynamicSamePadding` pad per input size so that the output is
ceil(in / stride); its `Conv2dStaticSamePadding` (vendored by segmentation_models_pytorch's efficientnet
encoders) pads by a fixed `static_padding` child computed at construction. All of them compute
`conv2d(F.pad(x, pad), weight, bias, stride, padding, dilation, groups)`, which a FusedConv2d with a pre-pad
computes too.

Recognition never guesses: a conv counts as one of these only when its class is exactly one of the allow-listed
classes (matched by the class object the library module exports, resolved from the already imported module,
nothing imported here), its forward is the class's own (none set on the instance; the class's function is the
one recorded when the class was first resolved, and defined in that class), padding_mode is "zeros", neither
the conv nor its pad child carries hooks, and a float64 probe on a copy of the instance (random weights, inputs
of odd and even sizes) gives the same values as `F.pad + F.conv2d` with the pad this module computes. Anything
else is reported with the reason and left alone.
"""

from __future__ import annotations

import copy
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The dynamic pre-pad: TF "SAME", computed per call from the input's height and width.
SAME = "same"

# (module, class name) -> how its forward pads: SAME (per input size) or "static" (its `static_padding` child).
PADDING_CONVS = {
    ("timm.layers.conv2d_same", "Conv2dSame"): SAME,
    ("timm.models.layers.conv2d_same", "Conv2dSame"): SAME,  # timm < 0.9
    ("segmentation_models_pytorch.encoders._efficientnet", "Conv2dDynamicSamePadding"): SAME,
    ("segmentation_models_pytorch.encoders._efficientnet", "Conv2dStaticSamePadding"): "static",
    ("efficientnet_pytorch.utils", "Conv2dDynamicSamePadding"): SAME,
    ("efficientnet_pytorch.utils", "Conv2dStaticSamePadding"): "static",
}

# class -> (kind, the forward function the class defined when it was first resolved); None: not allow-listed.
_resolved: dict[type, tuple[str, object] | None] = {}
# conv -> (fingerprint of what the probe depended on, its verdict): each instance is probed once per geometry.
_probed: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def same_pad(height: int, width: int, kernel_size, stride, dilation) -> tuple[int, int, int, int]:
    """TF "SAME" zero padding of a (height, width) input as F.pad takes it: (left, right, top, bottom).

    Per dimension pad_total = max((ceil(in / stride) - 1) * stride + (k - 1) * dilation + 1 - in, 0),
    the smaller half first (timm's pad_same, efficientnet_pytorch's Conv2dDynamicSamePadding). Integer math only.
    """
    pads = []
    for size, k, s, d in ((width, kernel_size[1], stride[1], dilation[1]),
                          (height, kernel_size[0], stride[0], dilation[0])):
        total = max(((size + s - 1) // s - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


@dataclass(frozen=True)
class PrePadVerdict:
    """How a Conv2d (or subclass) pads before convolving: `pre_pad` None (nothing: exactly nn.Conv2d), SAME, or
    a static (left, right, top, bottom); `reason` says why a subclass is not recognised (then pre_pad is None)."""

    pre_pad: str | tuple[int, int, int, int] | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def _allow_listed(cls: type) -> tuple[str, object] | None:
    """(kind, recorded forward) when `cls` is exactly an allow-listed class of an imported library module."""
    if cls in _resolved:
        return _resolved[cls]
    entry = None
    kind = PADDING_CONVS.get((cls.__module__, cls.__qualname__))
    library = sys.modules.get(cls.__module__) if kind is not None else None
    forward = cls.__dict__.get("forward")
    # The class the library module exports under that name (not a look-alike defined elsewhere), with a forward
    # defined in that class's body (a function patched in before this first look is defined somewhere else).
    if (library is not None and getattr(library, cls.__qualname__, None) is cls and forward is not None
            and getattr(forward, "__qualname__", None) == f"{cls.__qualname__}.forward"
            and getattr(forward, "__module__", None) == cls.__module__):
        entry = (kind, forward)
    _resolved[cls] = entry
    return entry


def _hooked(module: nn.Module) -> bool:
    return any(getattr(module, d, None) for d in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks",
                                                   "_backward_hooks"))


def _static_pad(conv: nn.Module) -> PrePadVerdict:
    """The pad of a Conv2dStaticSamePadding, read from its `static_padding` child as it is now."""
    pad = conv._modules.get("static_padding")
    name = type(conv).__name__
    if pad is not None and _hooked(pad):
        return PrePadVerdict(None, f"{name}.static_padding has hooks, which must keep seeing its input")
    if type(pad) is nn.Identity:
        return PrePadVerdict((0, 0, 0, 0))
    if type(pad) is nn.ZeroPad2d and "forward" not in pad.__dict__ and pad.value == 0:
        amounts = tuple(pad.padding)
        if len(amounts) == 4 and all(isinstance(v, int) and v >= 0 for v in amounts):
            return PrePadVerdict(amounts)
        return PrePadVerdict(None, f"{name}.static_padding pads by {amounts}; expected 4 non-negative ints")
    return PrePadVerdict(None, f"{name}.static_padding is {type(pad).__name__}; fusedconv takes only a zero pad "
                               "(nn.ZeroPad2d) or nn.Identity there")


def conv_pre_pad(conv: nn.Module) -> PrePadVerdict:
    """How `conv` (an nn.Conv2d or a subclass) pads before it convolves, or why that is not known.

    Exactly nn.Conv2d: no pre-pad. An allow-listed padding conv that passes every check (module docstring):
    SAME or its static pad. Any other subclass: a reason (it may compute differently in forward).
    """
    t = type(conv)
    if t is nn.Conv2d:
        return PrePadVerdict(None)
    name = t.__name__
    entry = _allow_listed(t) if isinstance(conv, nn.Conv2d) else None
    if entry is None:
        return PrePadVerdict(None, f"{name} subclasses Conv2d and may compute differently in forward")
    kind, forward = entry
    if "forward" in conv.__dict__ or t.__dict__.get("forward") is not forward:
        return PrePadVerdict(None, f"{name}'s forward was replaced; it may compute differently")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return PrePadVerdict(None, f"{name} with padding_mode={conv.padding_mode!r}, padding={conv.padding!r}: "
                                   "fusedconv fuses it only with padding_mode='zeros' and integer padding")
    if _hooked(conv):
        return PrePadVerdict(None, f"{name} has hooks, which must keep seeing its own output")
    verdict = PrePadVerdict(SAME) if kind == SAME else _static_pad(conv)
    if not verdict.ok:
        return verdict
    return _probe_verdict(conv, verdict)


def _probe_verdict(conv: nn.Module, verdict: PrePadVerdict) -> PrePadVerdict:
    pad_child = conv._modules.get("static_padding")
    # What the probe's answer depends on besides the class: the geometry and the pad child as they are now.
    fingerprint = (type(conv).forward, verdict.pre_pad, tuple(conv.weight.shape), conv.bias is not None,
                   tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups, id(pad_child),
                   type(pad_child), getattr(pad_child, "padding", None), getattr(pad_child, "value", None))
    cached = _probed.get(conv)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    why = _probe(conv, verdict.pre_pad)
    result = verdict if why is None else PrePadVerdict(
        None, f"{type(conv).__name__}: a float64 probe of its forward disagreed with zero pad {verdict.pre_pad} + "
              f"conv ({why})")
    _probed[conv] = (fingerprint, result)
    return result


def _probe_sizes(conv: nn.Module) -> list[tuple[int, int]]:
    """Input sizes covering odd and even heights and widths (and both parities of in / stride), each at least
    the kernel's extent."""
    a = []
    for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride):
        extent = (k - 1) * d + 1
        even = max(extent, s) + max(extent, s) % 2 + 2
        a.append(even)
    (h, w) = a
    return [(h, w + 1), (h + 1, w), (h + 2 * conv.stride[0] + 1, w + 2 * conv.stride[1] + 3)]


def _probe(conv: nn.Module, pre_pad) -> str | None:
    """None when the class's forward on a float64 copy of `conv` (fresh random weights, hooks not run) equals
    F.pad(x, pad) + F.conv2d(x, ..., padding=conv.padding) on every probe input; else what differed."""
    g = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(conv).to(device="cpu", dtype=torch.float64)
        with torch.no_grad():
            # Random weights: a module's own weights might be zeros, which would hide a wrong pad.
            probe.weight.copy_(torch.randn(probe.weight.shape, generator=g, dtype=torch.float64))
            if probe.bias is not None:
                probe.bias.copy_(torch.randn(probe.bias.shape, generator=g, dtype=torch.float64))
            for h, w in _probe_sizes(conv):
                x = torch.randn(1, conv.in_channels, h, w, generator=g, dtype=torch.float64)
                pad = same_pad(h, w, conv.kernel_size, conv.stride, conv.dilation) if pre_pad == SAME else pre_pad
                want = F.conv2d(F.pad(x, pad), probe.weight, probe.bias, probe.stride, probe.padding, probe.dilation,
                                probe.groups)
                got = type(probe).forward(probe, x.clone())
                if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
                    got_desc = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                    return f"input {h}x{w}: got {got_desc}, expected shape {tuple(want.shape)}"
                if not torch.allclose(got, want, rtol=1e-10, atol=1e-10):
                    return f"input {h}x{w}: values differ by up to {float((got - want).abs().max()):.3g}"
    except Exception as e:  # noqa: BLE001 - a forward that cannot run on the probe is simply not recognised
        return f"{type(e).__name__}: {e}"
    return None


# ------------------------------------------------------------------------------------------------ FusedConv2d's side
def normalize_pre_pad(pre_pad, padding: tuple[int, int], kernel_size, stride, dilation, padding_mode: str):
    """(pre_pad, padding) as FusedConv2d keeps them: SAME at stride 1 is a fixed pad (its total does not depend on
    the input size); a static pad symmetric per dimension joins the conv's own `padding` (no extra op); an
    all-zero one is None. Raises ValueError naming `pre_pad` for anything but None, SAME or 4 ints >= 0."""
    if pre_pad is None:
        return None, padding
    if padding_mode != "zeros":
        raise ValueError(f"pre_pad: expected padding_mode='zeros' with a pre-pad, got padding_mode={padding_mode!r}")
    if isinstance(pre_pad, str):
        if pre_pad != SAME:
            raise ValueError(f"pre_pad: expected None, {SAME!r} or (left, right, top, bottom), got {pre_pad!r}")
        if tuple(stride) != (1, 1):
            return SAME, padding
        # (ceil(in / 1) - 1) * 1 + (k - 1) * d + 1 - in = (k - 1) * d for every input size.
        pre_pad = same_pad(0, 0, kernel_size, stride, dilation)
    pads = tuple(pre_pad) if isinstance(pre_pad, (tuple, list)) else None
    if pads is None or len(pads) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                 for v in pads):
        raise ValueError(f"pre_pad: expected None, {SAME!r} or 4 ints >= 0 (left, right, top, bottom), "
                         f"got {pre_pad!r}")
    left, right, top, bottom = pads
    if left == right and top == bottom:
        return None, (padding[0] + top, padding[1] + left)
    return pads, padding


def apply_pre_pad(x: torch.Tensor, pre_pad, kernel_size, stride, dilation) -> torch.Tensor:
    """x zero-padded by `pre_pad` (SAME: from x's height and width), in x's memory format. An input that is not a
    3-d / 4-d tensor is returned as it is, for the caller's own input check to refuse."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        return x
    pads = same_pad(x.shape[-2], x.shape[-1], kernel_size, stride, dilation) if pre_pad == SAME else pre_pad
    if not any(pads):
        return x
    y = F.pad(x, pads)
    # The CPU fast path takes oneDNN only for channels_last input: keep the layout the input had.
    if (x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            and not y.is_contiguous(memory_format=torch.channels_last)):
        y = y.contiguous(memory_format=torch.channels_last)
    return y
