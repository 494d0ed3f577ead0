"""Weight packing: the conv weight's values in the physical layout the implicit-GEMM kernel reads fastest.

The kernel's B tile is [BLOCK_K input channels, BLOCK_N output channels] at one (kh, kw) tap, so the fastest
layout stores Cout innermost, then Cin/groups, then KW, then KH: physical order (KH, KW, Cin_g, Cout). Each B
tile row is then a contiguous run of output channels (coalesced, vectorised loads) and consecutive K chunks are
adjacent in memory. The packed tensor keeps PyTorch's logical shape (Cout, Cin_g, KH, KW) — only the strides
change — so it is still a valid conv weight everywhere (F.conv2d, state_dict, the reference), and the kernel,
which takes any weight strides, reads it without a copy.

Packing is a one-time cost, done when FusedConv2d is built or moved; the launcher never packs per call.
"""

from __future__ import annotations

import torch

__all__ = ["pack_weight", "is_packed"]


def pack_weight(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """`weight` (Cout, Cin/groups, KH, KW) with the same values and shape, stored in (KH, KW, Cin_g, Cout) order.

    Depthwise weights (Cin_g == 1) come out the same way: (KH, KW, Cout) order, channels innermost, which is also
    what a channels-vectorised depthwise kernel wants. Returns `weight` itself when it is already packed.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a 4-d tensor (Cout, Cin/groups, KH, KW), got {got}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups: expected a positive int dividing Cout={weight.shape[0]}, got {groups!r}")
    if is_packed(weight):
        return weight
    # permute to physical order, materialise, permute back to the logical order: values unchanged.
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def is_packed(weight: torch.Tensor) -> bool:
    """Whether `weight` is already stored in (KH, KW, Cin_g, Cout) order."""
    return weight.permute(2, 3, 1, 0).is_contiguous()
