"""Helpers shared by the tests: randomised BN statistics, op counting, relative error."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from fusedconv import fold


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters (defaults hide folding mistakes)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if not fold.is_batchnorm(m) or getattr(m, "running_mean", None) is None:
            continue
        c = m.running_mean.numel()
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
        if getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the measure the issues state tolerances in)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a forward pass executes (by overload packet name, e.g. 'convolution')."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def count_ops(model: nn.Module, *inputs) -> Counter:
    """Aten op counts of one forward pass of `model` on `inputs`."""
    counter = OpCounter()
    with counter:
        model(*inputs)
    return counter.counts


def batch_norm_count(counts: Counter) -> int:
    return sum(v for k, v in counts.items() if "batch_norm" in k)
