"""The memory format PyTorch's convolutions give their output, so that a fused layer's output has the original's.

PyTorch's CPU convolutions (oneDNN and the native kernels alike) and cuDNN write a channels_last output when the
input *or the weight* is channels_last by `suggest_memory_format` (ATen's `mkldnn_conv_use_channels_last`,
`thnn_conv_use_channels_last`, `cudnn_conv_suggest_memory_format`). A weight is channels_last after
`model.to(memory_format=torch.channels_last)`, the usual step before running a CNN in that layout, and an NCHW
input then still gets a channels_last output. A fused layer keeps its weight's layout in the weight it folds
(`dense_format`), so its conv answers the same way; a layer that stores its weight in a layout of its own (the CUDA
kernels' packing, fusedconv/kernels/packing.py, and FusedConv3d's on every device) is not channels_last by this
rule, and its output follows the input.

Why it matters beyond strides: code after a layer may branch on `is_contiguous()`, and `torch.randn_like` (noise,
dropout-like tricks) fills memory in its order, so the same values drawn for an NCHW and a channels_last tensor land
on different elements.
"""

from __future__ import annotations

import torch

__all__ = ["converted", "dense_copy", "dense_format", "suggests_channels_last"]


# How many times a fused layer's tensors were converted (`_apply`: `.to()`, `.cuda()`, `.half()`, ...): a weight may
# have changed layout, and with it the output layout of the model's layers, so the CPU layout boundary checks its
# signatures again (fusedconv/cpu_boundary.py).
conversions = 0


def converted() -> None:
    """A fused layer's tensors were converted (called from its `_apply`)."""
    global conversions
    conversions += 1


def suggests_channels_last(t: torch.Tensor) -> bool:
    """Whether ATen's `suggest_memory_format` answers channels_last for the 4-d tensor `t`: its strides ordered as
    channels_last's (C fastest, then W, H, N), with ATen's tie-breaks for size-1 dimensions (a port of c10's
    `is_channels_last_strides_2d_s4`; an ambiguous N111 tensor counts as NCHW)."""
    if t.dim() != 4 or t.layout != torch.strided:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False  # a trivial C dimension: NCHW by default
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False  # N111 with equal strides: ambiguous, NCHW
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def dense_format(weight: torch.Tensor, out_channels: int) -> torch.memory_format:
    """The memory format a copy of `weight` derived for a conv (a fold) is stored in: channels_last where PyTorch
    reads `weight` as channels_last (then its conv's output is channels_last whatever the input's layout), else
    plain contiguous (the output follows the input). A conv to one channel keeps plain contiguous: its output has
    the same memory in both layouts and differs only in the strides PyTorch reports for the channel dimension, and
    those the original's BatchNorm resets to NCHW's (ATen's CPU batch norm on a one-channel tensor), which an NCHW
    output already has."""
    return torch.channels_last if out_channels > 1 and suggests_channels_last(weight) else torch.contiguous_format


def _strides(shape, fmt: torch.memory_format) -> tuple[int, ...]:
    """The strides a new dense tensor of `shape` gets in `fmt` (channels_last: 4-d only)."""
    cl = fmt == torch.channels_last
    order = (1, 3, 2, 0) if cl else tuple(range(len(shape) - 1, -1, -1))
    strides, step = [0] * len(shape), 1
    for d in order:
        strides[d] = step
        step *= shape[d] if cl else max(shape[d], 1)  # (c10's channels_last strides take sizes as they are)
    return tuple(strides)


def dense_copy(folded: torch.Tensor, weight: torch.Tensor, out_channels: int) -> torch.Tensor:
    """`folded` (a tensor derived from `weight`, same shape) with exactly the strides a new tensor gets in
    `dense_format(weight, out_channels)`. Exactly: `.contiguous()` keeps the strides of a tensor that is contiguous
    only up to its size-1 dimensions (a (1, C, 3, 3) channels_last weight), which PyTorch's convs still read as
    channels_last."""
    fmt = dense_format(weight, out_channels)
    if folded.stride() == _strides(folded.shape, fmt):
        return folded
    return folded.clone(memory_format=fmt)
