"""torch.autocast for the fused layers: the dtype an autocast region would run the original layer in.

Conv1d/2d/3d, their transposed forms and Linear are on autocast's lower-precision list on CPU and CUDA: inside
`torch.autocast(device_type, dtype)` the original layer casts its input, weight and bias to `dtype` and returns a
`dtype` tensor, BatchNorm keeps that dtype and so does the activation. A fused layer's tensors stay as they are
(float32 weight, float32 scale / shift), so without this it would see a lower-precision input next to its float32
weight (and refuse it), or compute in float32 and hand the next layer another dtype than the original did. With it,
a fused layer inside such a region computes its layer in that dtype too, with the BatchNorm's scale and shift and
the activation applied to the result in float32 (the precision the original's BatchNorm computes in) and the
output in the region's dtype. Float64 tensors are never cast by autocast, so a float64 input or weight is not
either (and the usual dtype checks apply, as nn.Conv2d's own would fail).
"""

from __future__ import annotations

import torch

# One C call that is False outside every autocast region (the common case, read on every fused call); where a
# PyTorch lacks it, the per-device query for the two device types the fused layers run on.
any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def cast_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The dtype an autocast region active now runs a conv / linear layer in for input `x` and this `weight`, or
    None when the layer would run without a cast: no region for x's device type, or x or the weight is not a
    floating-point tensor autocast casts (float64 is left alone)."""
    if not any_enabled() or not isinstance(x, torch.Tensor):
        return None
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    if not (x.is_floating_point() and weight.is_floating_point()):
        return None
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device_type)


def cast_like_autocast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` in `dtype` as autocast would pass it to the layer (None stays None; float64 stays as it is)."""
    if t is None or t.dtype == dtype or t.dtype == torch.float64 or not t.is_floating_point():
        return t
    return t.to(dtype)
