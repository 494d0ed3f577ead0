"""Input validation shared by FusedConv2d, the op and the public entry points.

Each error names the argument, what was expected and what was given, with the exception type PyTorch itself
would raise for the same mistake.
"""

from __future__ import annotations

import torch


def check_inputs(x: torch.Tensor, weight: torch.Tensor, groups: int, residual: torch.Tensor | None) -> None:
    """Raise a clear error for inputs the conv cannot take (names the argument, what was expected and given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input: expected a 4-d (N, C, H, W) tensor, got {x.dim()}-d with shape {tuple(x.shape)}")
    cin = weight.shape[1] * groups
    if x.shape[1] != cin:
        raise ValueError(f"input: expected {cin} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"input: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"input: expected dtype {weight.dtype} to match the weight, got {x.dtype}")
    if x.device != weight.device:
        raise RuntimeError(f"input: expected device {weight.device} to match the weight, got {x.device}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"residual: expected a torch.Tensor or None, got {type(residual).__name__}")
        if residual.device != x.device:
            raise RuntimeError(f"residual: expected device {x.device} to match the input, got {residual.device}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual: expected dtype {x.dtype} to match the input, got {residual.dtype}")
